"""Benchmark: the gene-as-image mode's cost and stability at several sizes (issue 22).

For each ingested data set (``neuroexplain ingest-st`` output: MOB itself, or a tiled MOB kept by
``bench_st_scale.py --keep DIR``) and each variant (keyword arguments of
:func:`neuroexplain.st.genemode`, e.g. ``{"n_top_genes": 500}`` or ``{"seed": 1}``), the gene-mode
concept maps of the seeds Penk, Doc2g and Kctd12 are computed as ``st-concepts`` does. Per data
set and variant: seconds, the layer where each seed's map peaks (Penk: GCL, Doc2g: MCL, Kctd12:
ONL on MOB) and the Pearson correlation of each map with the first variant's (the reference). A
``{"seed": 1}`` variant gives the seed-to-seed correlation, the noise against which a change of
the settings is judged. Variants start from 1,000 genes (the default before it became 500) and
seed 0, so ``{}`` is that baseline. Without ``--adata`` the data are MOB and MOB tiled to
``--cells`` (default ``0 10000``), ingested here; without ``--variant``: :data:`DEFAULT_VARIANTS`.

Usage:
    python benchmarks/bench_st_genemode.py --adata mob=MOB.h5ad --adata 10k=DIR/10000/st.h5ad \
        --variant 'genes1000={}' --variant 'seed1={"seed": 1}' \
        --variant 'genes500={"n_top_genes": 500}'

Writes ``benchmarks/results/st_genemode.json`` and ``.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

# this folder is on sys.path when run as a script
from bench_st_budget import ingested_mob, machine, named

SEEDS = ("Penk", "Doc2g", "Kctd12")
#: variants start from 1,000 genes (the default before 500) and seed 0: ``{}`` is that baseline
DEFAULT_VARIANTS = [
    ("genes1000", {}),
    ("genes1000_seed1", {"seed": 1}),
    ("genes500", {"n_top_genes": 500}),
    ("genes500_seed1", {"n_top_genes": 500, "seed": 1}),
]


def run_variant(path: Path, label_key: str, kwargs: dict) -> tuple[dict, object]:
    """Gene-mode maps of one variant: ``(record, maps spots x seeds)``."""
    import anndata as ad
    import numpy as np

    from neuroexplain.st.concepts import genemode, spot_labels
    from neuroexplain.st.evaluate import _genemode_by_layer

    adata = ad.read_h5ad(path)
    kw = {"n_top_genes": 1000, "seed": 0, **kwargs}
    t0 = time.perf_counter()
    genemode(adata, list(SEEDS), device="cpu", progress=False, **kw)
    seconds = time.perf_counter() - t0
    maps = np.asarray(adata.obsm["concept_saliency_genemode"])
    by_layer = _genemode_by_layer(
        maps, adata.uns["concept_saliency"], spot_labels(adata, label_key, min_spots=5)
    )
    return {
        "seconds": round(seconds, 1),
        "peak_layer": {s: v["peak_layer"] for s, v in by_layer.items()},
    }, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--adata",
        action="append",
        default=None,
        type=lambda t: named(t, Path),
        help="NAME=PATH of an ingest-st output (repeat); default: --cells",
    )
    parser.add_argument(
        "--cells",
        type=int,
        nargs="+",
        default=[0, 10_000],
        help="without --adata: MOB (0) and MOB tiled to these many cells",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        type=named,
        help="NAME=JSON keyword arguments of genemode (repeat; default: "
        f"{' '.join(n for n, _ in DEFAULT_VARIANTS)})",
    )
    parser.add_argument("--label-key", default="layer_short")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    import torch

    from neuroexplain.io.atomic import write_json
    from neuroexplain.provenance import provenance

    torch.set_num_threads(args.threads)
    variants = args.variant or DEFAULT_VARIANTS
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_st_genemode_") as tmp:
        data = args.adata or [
            (f"{n // 1000}k" if n else "mob", ingested_mob(n, Path(tmp))) for n in args.cells
        ]
        for data_name, path in data:
            reference = None
            for name, kwargs in variants:
                record, maps = run_variant(path, args.label_key, kwargs)
                if reference is None:
                    reference = maps
                record["correlation_with_first"] = {
                    s: round(float(np.corrcoef(reference[:, j], maps[:, j])[0, 1]), 3)
                    for j, s in enumerate(SEEDS)
                }
                run = {"data": data_name, "n_spots": int(maps.shape[0]), "variant": name}
                run.update({"kwargs": kwargs, **record})
                runs.append(run)
                print(json.dumps(run), flush=True)
    result = {
        "name": "st_genemode",
        "data": {name: str(path) for name, path in data},
        "runs": runs,
        "machine": machine(args.threads),
        "provenance": provenance(
            {"variants": dict(variants), "threads": args.threads, "seeds": list(SEEDS)},
            seed=0,
            command="bench_st_genemode",
        ),
    }
    out = args.out or Path(__file__).parent / "results" / "st_genemode.json"
    write_json(result, out)
    lines = [
        "# Gene-as-image mode: seconds, peak layer and map correlation with the first variant",
        "",
        "| data | spots | variant | genemode kwargs | seconds | peak layer (Penk / Doc2g / "
        "Kctd12) | r with first (Penk / Doc2g / Kctd12) |",
        "| --- | ---: | --- | --- | ---: | --- | --- |",
    ]
    for r in runs:
        peaks = " / ".join(r["peak_layer"][s] for s in SEEDS)
        corr = " / ".join(f"{r['correlation_with_first'][s]:.2f}" for s in SEEDS)
        lines.append(
            f"| {r['data']} | {r['n_spots']:,} | {r['variant']} | `{json.dumps(r['kwargs'])}` "
            f"| {r['seconds']} | {peaks} | {corr} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
