"""Benchmark: the spot VAE's optimisation budget vs the layer concepts' quality (issue 22).

On one ingested data set (``neuroexplain ingest-st`` output, e.g. a tiled MOB kept by
``bench_st_scale.py --keep DIR``: ``DIR/10000/st.h5ad``) the spot VAE is trained with each
budget variant (``SpotVAE.train`` keyword arguments), then the layer concepts and their saliency
are computed as ``st-concepts`` does (no spots x genes layers) and compared with scanpy's Wilcoxon
markers as ``st-evaluate`` does. Per variant: training seconds, optimisation steps, epochs run
and kept, the final / best held-out negative ELBO, the mean top-50 overlap per layer and the
cross-validated layer accuracy. The held-out ELBO measures the fit; the overlap is the criterion
of issue 22 (>= 0.75), so the table shows how they move together as the budget grows.

Without ``--adata`` the data are MOB tiled to ``--cells`` (default 10,000) and ingested here;
without ``--variant`` the budgets are 800, 1,000, 1,600 steps and no limit (2,400 steps).

Usage:
    python benchmarks/bench_st_budget.py [--cells 10000 | --adata DIR/10000/st.h5ad] \
        [--variant 'steps800={"max_steps": 800}' --variant 'steps2400={"max_steps": null}']

Writes ``benchmarks/results/st_budget.json`` and ``.md`` (``--out``); one JSON line per variant on
stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

DEFAULT_VARIANTS = [
    ("steps800", {"max_steps": 800}),
    ("steps1000", {"max_steps": 1000}),
    ("steps1600", {"max_steps": 1600}),
    ("steps2400", {"max_steps": None}),
]


def named(text: str, parse=lambda v: json.loads(v or "{}")) -> tuple[str, object]:
    """``NAME=VALUE`` of a command-line option: ``(NAME, parse(VALUE))`` (default: JSON)."""
    name, _, value = text.partition("=")
    return name, parse(value)


def run_variant(path: Path, label_key: str, kwargs: dict, *, seed: int) -> dict:
    """Train one budget variant on the data in ``path`` and score its layer concepts."""
    import anndata as ad

    from neuroexplain.st.concepts import concept_saliency
    from neuroexplain.st.evaluate import evaluate_concepts
    from neuroexplain.st.vae import SpotVAE

    adata = ad.read_h5ad(path)
    model = SpotVAE(adata, seed=seed, device="cpu")
    t0 = time.perf_counter()
    model.train(progress=False, **kwargs)
    train_s = time.perf_counter() - t0
    concept_saliency(adata, model, label_key=label_key, store_spot_gene=False, seed=seed)
    metrics = evaluate_concepts(adata, label_key=label_key, seed=seed)
    val = model.history["validation"]
    return {
        "train_seconds": round(train_s, 1),
        "steps": int(model.train_params["steps"]),
        "epochs_run": len(val),
        "kept_epoch": int(model.train_params["kept_epoch"]),
        "validation_final": round(float(val[-1]), 1),
        "validation_best": round(float(min(val)), 1),
        "mean_overlap": float(metrics["mean_overlap"]),
        "per_layer_overlap": {k: v["overlap"] for k, v in metrics["layers"].items()},
        "cv_accuracy": float(metrics["classification"]["accuracy"]),
    }


def ingested_mob(n_cells: int, folder: Path) -> Path:
    """MOB (``n_cells`` 0) or MOB tiled to ``n_cells`` (``bench_st_scale.py``'s tiling, 2,000
    genes) through ``neuroexplain ingest-st``, in ``folder``; returns the ``.h5ad``."""
    from bench_st_scale import SHARED, _cli, _workflow_args, tile_mob

    out = folder / f"st_{n_cells or 'mob'}.h5ad"
    cmd = [*_cli(), "ingest-st", "--label-key", "layer_short", "--out", str(out)]
    if n_cells:
        tiled = folder / f"tiled_{n_cells}.h5ad"
        tile_mob(n_cells, 2000, _workflow_args()[2].split(",")).write_h5ad(tiled)
        cmd += ["--h5ad", str(tiled)]
    else:
        mob = SHARED / "mob"
        cmd += ["--counts", str(mob / "mob_rep11_counts.csv.gz")]
        cmd += ["--spots", str(mob / "mob_rep11_spots.csv")]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def machine(threads: int) -> dict:
    """The machine record of the ST benchmarks' JSON (cores, torch threads, load, platform)."""
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "loadavg_1min_after": os.getloadavg()[0],
        "platform": platform.platform(),
    }


def _markdown(result: dict) -> str:
    d = result["data"]
    rows = [
        f"# Spot-VAE budget vs layer concepts ({d['n_spots']:,} spots x {d['n_genes']:,} genes, "
        f"`{Path(d['path']).name}`)",
        "",
        "| variant | SpotVAE.train | steps | epochs run / kept | train s | held-out -ELBO final "
        "(best) | mean overlap | CV accuracy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["runs"]:
        rows.append(
            f"| {r['name']} | `{json.dumps(r['train_kwargs'])}` | {r['steps']} "
            f"| {r['epochs_run']} / {r['kept_epoch']} | {r['train_seconds']} "
            f"| {r['validation_final']} ({r['validation_best']}) | {r['mean_overlap']:.3f} "
            f"| {r['cv_accuracy']:.3f} |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--adata", type=Path, default=None, help="ingest-st output (.h5ad); default: --cells"
    )
    parser.add_argument(
        "--cells", type=int, default=10_000, help="without --adata: MOB tiled to this many cells"
    )
    parser.add_argument("--label-key", default="layer_short")
    parser.add_argument(
        "--variant",
        action="append",
        type=named,
        default=None,
        help="NAME=JSON keyword arguments of SpotVAE.train (repeat; default: "
        f"{' '.join(n for n, _ in DEFAULT_VARIANTS)})",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import anndata as ad
    import torch

    from neuroexplain.io.atomic import write_json
    from neuroexplain.provenance import provenance

    torch.set_num_threads(args.threads)
    variants = args.variant or DEFAULT_VARIANTS
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_st_budget_") as tmp:
        path = args.adata or ingested_mob(args.cells, Path(tmp))
        shape = ad.read_h5ad(path, backed="r").shape
        for name, kwargs in variants:
            run = {"name": name, "train_kwargs": kwargs}
            run.update(run_variant(path, args.label_key, kwargs, seed=args.seed))
            runs.append(run)
            print(json.dumps(run), flush=True)
    result = {
        "name": "st_budget",
        "data": {
            "path": str(args.adata or f"MOB tiled to {args.cells} cells"),
            "n_spots": shape[0],
            "n_genes": shape[1],
        },
        "runs": runs,
        "machine": machine(args.threads),
        "provenance": provenance(
            {"label_key": args.label_key, "variants": dict(variants), "threads": args.threads},
            seed=args.seed,
            command="bench_st_budget",
        ),
    }
    out = args.out or Path(__file__).parent / "results" / "st_budget.json"
    write_json(result, out)
    out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
