"""Benchmark: the spatial-transcriptomics stage at 10,000 and 100,000 cells (issue 22).

The mouse olfactory bulb (Stahl et al. 2016, replicate 11: 262 spots x 15,928 genes) is tiled
to ``N`` cells: tile ``t`` holds every MOB spot once, its counts resampled as
``Poisson(original count)`` (zeros stay zero, so the sparsity is the original's), its layer
label kept, and its array coordinates shifted so that the tiles lie side by side on a square
grid of tiles (a tissue ``N / 262`` times larger, not spots stacked on one another). The last
tile takes a random subset of the spots to reach ``N`` exactly. Genes: ``--n-genes`` in all, the
known markers and gene-mode seeds plus MOB's most highly variable genes (scanpy ``seurat``
flavour on the original data, the pipeline's own selection); ``--n-genes 0`` keeps all 15,928.

For each ``N`` the stage runs end to end, each step its own process with the options of the
workflow (``config/config.yaml``, as ``workflow/rules/common.smk`` passes them):
``neuroexplain ingest-st --h5ad`` (the tiled data written as a plain ``.h5ad``), then
``neuroexplain st-concepts`` (figures, model, gene-as-image mode) and
``neuroexplain st-evaluate``. Per step: wall seconds and peak resident memory of that process
(``os.wait4``'s ``ru_maxrss``; no ``/usr/bin/time`` needed). Per ``N``: the MOB overlap metric
(mean top-50 overlap of the layer concepts' saliency genes with scanpy's Wilcoxon markers), the
marker checks, the CV accuracy, and the spot VAE's epochs and optimisation steps.

Targets (issue 22): 10,000 cells x 2,000 genes end to end <= 60 s; 100,000 cells <= 600 s and
<= 8 GB peak memory; mean overlap >= 0.75 at every size.

Usage:
    python benchmarks/bench_st_scale.py [--sizes 10000 100000] [--threads 1] [--n-genes 2000]

Writes ``benchmarks/results/st_scale.json`` and ``st_scale.md`` (``--out`` / ``--tag``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEUROEXPLAIN_SHARED_DATA", REPO.parent / "shared" / "data"))
TARGETS = {10_000: {"seconds": 60.0}, 100_000: {"seconds": 600.0, "peak_rss_mb": 8192.0}}
MIN_OVERLAP = 0.75


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("neuroexplain")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "neuroexplain.cli"]


def _run(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``cmd``; its wall seconds and peak RSS (MiB) from ``os.wait4``."""
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    # ru_maxrss: KiB on Linux, bytes on macOS
    rss_mb = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(rss_mb, 1)}


def _workflow_args() -> tuple[list[str], list[str], str]:
    """st-concepts and st-evaluate options of the workflow's config (as common.smk builds them)."""
    import yaml

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    stc, label_key = cfg["st_concepts"], cfg["st"]["label_key"]

    def pairs(*items: tuple[str, object]) -> list[str]:
        return [a for opt, v in items if v not in (None, "") for a in (opt, str(v))]

    concepts = pairs(
        ("--label-key", label_key),
        ("--seed", cfg["seed"]),
        ("--n-latent", stc["n_latent"]),
        ("--n-top-genes", stc["n_top_genes"]),
        ("--likelihood", stc["likelihood"]),
        ("--method", stc["method"]),
        ("--saliency", stc["saliency"]),
        ("--epochs", stc["epochs"]),
        ("--max-steps", stc["max_steps"]),
        ("--genemode-seeds", ",".join(stc["genemode_seeds"])),
        ("--genemode-epochs", stc["genemode_epochs"]),
        ("--max-concepts", stc["max_concepts"]),
    )
    evaluate = pairs(
        ("--label-key", label_key),
        ("--seed", cfg["seed"]),
        ("--n-top", stc["n_top"]),
        ("--markers", stc["markers"]),
    )
    seeds = list(stc["genemode_seeds"])
    markers = [g for part in str(stc["markers"]).split(";") if ":" in part
               for g in part.split(":", 1)[1].split(",")]  # fmt: skip
    return concepts, evaluate, ",".join(dict.fromkeys(seeds + markers))


def _mob(n_genes: int, keep: list[str]):
    """MOB counts (CSR), spot table and the genes kept (positions)."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from neuroexplain.st.vae import select_genes

    mob = SHARED / "mob"
    counts = pd.read_csv(mob / "mob_rep11_counts.csv.gz", index_col=0)
    spots = pd.read_csv(mob / "mob_rep11_spots.csv", index_col=0).reindex(counts.index)
    x = sp.csr_matrix(counts.to_numpy(dtype=np.float32))
    genes = np.asarray(counts.columns, dtype=str)
    if n_genes and n_genes < len(genes):
        tmp = ad.AnnData(X=x)
        tmp.var_names = genes
        # the markers and seeds, then the most variable genes up to n_genes in all (so the
        # stage's own 2,000-HVG selection keeps every gene, as on a targeted panel)
        forced = {int(np.flatnonzero(genes == g)[0]) for g in keep if g in set(genes)}
        hvg = select_genes(tmp, layer=None, n_top_genes=n_genes)
        disp = [i for i in hvg.tolist() if i not in forced]
        idx = forced | set(disp[: n_genes - len(forced)])
        gi = np.asarray(sorted(idx))
    else:
        gi = np.arange(len(genes))
    return x[:, gi], spots, genes[gi]


def tile_mob(n_cells: int, n_genes: int, keep: list[str], seed: int = 0):
    """The tiled MOB AnnData: ``n_cells`` x genes, raw counts in ``.X`` (CSR float32)."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    x, spots, genes = _mob(n_genes, keep)
    rng = np.random.default_rng(seed)
    n0 = x.shape[0]
    n_tiles = math.ceil(n_cells / n0)
    side = math.ceil(math.sqrt(n_tiles))
    xy = spots[["x", "y"]].to_numpy(dtype=np.float64)
    width = xy.max(0) - xy.min(0) + 3.0  # two empty array columns between tiles
    blocks, coords, labels, names = [], [], [], []
    for t in range(n_tiles):
        rows = np.arange(n0) if (t + 1) * n0 <= n_cells else np.sort(
            rng.choice(n0, n_cells - t * n0, replace=False)
        )  # fmt: skip
        sub = x[rows].copy()
        sub.data = rng.poisson(sub.data).astype(np.float32)
        sub.eliminate_zeros()
        blocks.append(sub)
        coords.append(xy[rows] + width * np.array([t % side, t // side]))
        labels.append(spots["layer_short"].to_numpy()[rows])
        names.append([f"t{t}_{s}" for s in spots.index[rows]])
    obs = pd.DataFrame(
        {"layer_short": pd.Categorical(np.concatenate(labels))},
        index=pd.Index(np.concatenate(names), dtype=object),
    )
    adata = ad.AnnData(X=sp.vstack(blocks, format="csr"), obs=obs)
    adata.var_names = genes
    adata.obsm["spatial"] = np.concatenate(coords)
    return adata


def run_size(n: int, args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> dict:
    import anndata as ad

    concept_args, eval_args, keep = _workflow_args()
    t0 = time.perf_counter()
    tiled = tile_mob(n, args.n_genes, keep.split(","), seed=args.seed)
    shape, nnz = [int(v) for v in tiled.shape], int(tiled.X.nnz)
    tiled.write_h5ad(tmp / "tiled.h5ad")
    del tiled
    tile_s = time.perf_counter() - t0
    cli = _cli()
    steps = {
        "ingest_st": _run(
            [*cli, "ingest-st", "--h5ad", str(tmp / "tiled.h5ad"), "--label-key", "layer_short",
             "--out", str(tmp / "st.h5ad")],
            env, tmp / "ingest.log",
        ),
        "st_concepts": _run(
            [*cli, "st-concepts", "--adata", str(tmp / "st.h5ad"), "--out",
             str(tmp / "concepts.h5ad"), "--figures", str(tmp / "figures"), "--model-dir",
             str(tmp / "model"), "--threads", str(args.threads), "--device", "cpu",
             *concept_args],
            env, tmp / "st_concepts.log",
        ),
        "st_evaluate": _run(
            [*cli, "st-evaluate", "--adata", str(tmp / "concepts.h5ad"), "--out",
             str(tmp / "metrics.json"), *eval_args],
            env, tmp / "st_evaluate.log",
        ),
    }  # fmt: skip
    metrics = json.loads((tmp / "metrics.json").read_text())
    out = ad.read_h5ad(tmp / "concepts.h5ad", backed="r")
    train = {
        k: v.item() if hasattr(v, "item") else v
        for k, v in dict(out.uns["concept_saliency"]["params"]["params"]["train"]).items()
    }
    spot_gene_layers = bool(out.uns["concept_saliency"].get("spot_gene_layers", True))
    out.file.close()
    total = sum(s["seconds"] for s in steps.values())
    peak = max(s["peak_rss_mb"] for s in steps.values())
    target = TARGETS.get(n, {})
    return {
        "n_cells": shape[0],
        "n_genes": shape[1],
        "nnz": nnz,
        "tiling_seconds": round(tile_s, 2),
        "steps": steps,
        "total_seconds": round(total, 2),
        "peak_rss_mb": peak,
        "mean_overlap": metrics["mean_overlap"],
        "per_layer_overlap": {k: v["overlap"] for k, v in metrics["layers"].items()},
        "markers_in_top": {k: v for k, v in metrics["checks"].items() if "marker" in k},
        "cv_accuracy": metrics["classification"]["accuracy"],
        "genemode_peak_layer": {k: v["peak_layer"] for k, v in metrics.get("genemode", {}).items()},
        "vae": {k: train.get(k) for k in ("epochs_run", "kept_epoch", "steps", "epoch_samples")},
        "spot_gene_layers_stored": spot_gene_layers,
        "targets": target,
        "meets_targets": (
            metrics["mean_overlap"] >= MIN_OVERLAP
            and total <= target.get("seconds", math.inf)
            and peak <= target.get("peak_rss_mb", math.inf)
        ),
    }


def _markdown(result: dict) -> str:
    lines = [
        f"# ST stage at scale ({result['data']}; {result['machine']['torch_threads']} thread(s), "
        f"{result['machine']['cpu_count']} cores)",
        "",
        "| cells | genes | ingest s | st-concepts s | st-evaluate s | total s | peak RSS MB "
        "| VAE epochs / steps | mean overlap | meets targets |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in result["runs"]:
        s = r["steps"]
        lines.append(
            f"| {r['n_cells']} | {r['n_genes']} | {s['ingest_st']['seconds']:.1f} "
            f"| {s['st_concepts']['seconds']:.1f} | {s['st_evaluate']['seconds']:.1f} "
            f"| {r['total_seconds']:.1f} | {r['peak_rss_mb']:.0f} "
            f"| {r['vae']['epochs_run']} / {r['vae']['steps']} | {r['mean_overlap']:.3f} "
            f"| {'yes' if r['meets_targets'] else 'no'} |"
        )
    lines += [
        "",
        "Targets: 10,000 cells end to end <= 60 s; 100,000 cells <= 600 s and <= 8 GB peak; "
        f"mean top-50 overlap >= {MIN_OVERLAP}. Peak RSS is the largest of the three steps.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--n-genes", type=int, default=2000, help="genes kept (0 = all 15,928 MOB genes)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the result names (st_scale_<tag>)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep the work folders here")
    args = parser.parse_args()

    from neuroexplain.io.atomic import write_json
    from neuroexplain.provenance import provenance

    if not (SHARED / "mob" / "mob_rep11_counts.csv.gz").is_file():
        raise SystemExit(f"MOB data not found under {SHARED / 'mob'}")
    name = "st_scale" + (f"_{args.tag}" if args.tag else "")
    out = args.out or Path(__file__).parent / "results" / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    load_before = os.getloadavg()[0]
    runs = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix=f"bench_st_scale_{n}_") as tmpdir:
            tmp = Path(tmpdir)
            if args.keep is not None:
                tmp = args.keep / str(n)
                tmp.mkdir(parents=True, exist_ok=True)
            run = run_size(n, args, tmp, env)
        runs.append(run)
        print(json.dumps({k: run[k] for k in ("n_cells", "steps", "mean_overlap")}), flush=True)
    result = {
        "name": name,
        "data": "MOB Stahl 2016 rep. 11 tiled with Poisson-resampled counts"
        + (f", {args.n_genes} HVGs + markers" if args.n_genes else ", all genes"),
        "runs": runs,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "loadavg_1min_before": load_before,
            "loadavg_1min_after": os.getloadavg()[0],
            "platform": platform.platform(),
        },
        "provenance": provenance(
            {"sizes": args.sizes, "threads": args.threads, "n_genes": args.n_genes},
            seed=args.seed,
            command="bench_st_scale",
        ),
    }
    write_json(result, out)
    out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
