"""Benchmark: the spot VAE's optimisation budget vs the layer concepts' quality (issue 22).

On one ingested data set (``neuroexplain ingest-st`` output, e.g. a tiled MOB kept by
``bench_st_scale.py --keep DIR``: ``DIR/10000/st.h5ad``) the spot VAE is trained with each
budget variant (``SpotVAE.train`` keyword arguments), then the layer concepts and their saliency
are computed as ``st-concepts`` does (no spots x genes layers) and compared with scanpy's Wilcoxon
markers as ``st-evaluate`` does. Per variant: training seconds, optimisation steps, epochs run
and kept, the final / best held-out negative ELBO, the mean top-50 overlap per layer and the
cross-validated layer accuracy. The held-out ELBO measures the fit; the overlap is the criterion
of issue 22 (>= 0.75), so the table shows how they move together as the budget grows.

Usage:
    python benchmarks/bench_st_budget.py --adata DIR/10000/st.h5ad --label-key layer_short \
        --variant 'steps800={"max_steps": 800}' --variant 'steps2400={"max_steps": 2400}'

Writes ``benchmarks/results/st_budget.json`` and ``.md`` (``--out``); one JSON line per variant on
stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def _variant(text: str) -> tuple[str, dict]:
    name, _, kwargs = text.partition("=")
    return name, json.loads(kwargs or "{}")


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
    parser.add_argument("--adata", type=Path, required=True, help="ingest-st output (.h5ad)")
    parser.add_argument("--label-key", default="layer_short")
    parser.add_argument(
        "--variant",
        action="append",
        type=_variant,
        required=True,
        help="NAME=JSON keyword arguments of SpotVAE.train (repeat)",
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
    shape = ad.read_h5ad(args.adata, backed="r").shape
    runs = []
    for name, kwargs in args.variant:
        run = {"name": name, "train_kwargs": kwargs}
        run.update(run_variant(args.adata, args.label_key, kwargs, seed=args.seed))
        runs.append(run)
        print(json.dumps(run), flush=True)
    result = {
        "name": "st_budget",
        "data": {"path": str(args.adata), "n_spots": shape[0], "n_genes": shape[1]},
        "runs": runs,
        "machine": machine(args.threads),
        "provenance": provenance(
            {"label_key": args.label_key, "variants": dict(args.variant), "threads": args.threads},
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
