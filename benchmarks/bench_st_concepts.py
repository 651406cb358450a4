"""Benchmark: concept saliency on MOB (Brocki & Chung 2019) -- batched saliency and whole stage.

1. Whole ST stage on the mouse olfactory bulb (262 spots x 15,928 genes): the
   ``neuroexplain st-concepts`` command (its own process, imports included: read .h5ad, select
   2000 HVGs, train the spot VAE with early stopping, concept vectors, saliency of all concepts,
   gene-as-image mode for Penk, Doc2g, Kctd12, figures, write .h5ad), then
   ``neuroexplain st-evaluate`` whose metrics (Wilcoxon overlap, marker ranks, CV accuracy) are
   copied into the result. The input .h5ad is made by ``neuroexplain ingest-st`` (timed apart).
2. Saliency of all concepts over all spots on the trained model: the batched
   :class:`~neuroexplain.st.concepts.ConceptSaliency` (one forward pass + ``vmap``-ed VJPs) vs a
   per-concept loop of Captum's ``Saliency`` (one call per concept, each batched over spots),
   and, for information, vs a per-(concept, spot) Captum loop and for the other variants
   (``InputXGradient``, ``IntegratedGradients``, ``NoiseTunnel`` SmoothGrad) per concept.
   Paired repetitions (order alternating); medians and the median of per-pair ratios.

The machine is shared: the 1-minute load average before and after is recorded with the timings.

Usage:
    python benchmarks/bench_st_concepts.py [--threads 1] [--repeats 7] [--seed 0]

Writes ``benchmarks/results/st_concepts.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEUROEXPLAIN_SHARED_DATA", REPO.parent / "shared" / "data"))


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("neuroexplain")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "neuroexplain.cli"]


def _run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return seconds


def _paired(fns: dict[str, object], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()  # type: ignore[operator]
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "st_concepts.json"
    )
    args = parser.parse_args()

    import numpy as np
    import torch

    from neuroexplain.io.atomic import write_json
    from neuroexplain.provenance import provenance

    mob = SHARED / "mob"
    if not (mob / "mob_rep11_counts.csv.gz").is_file():
        raise SystemExit(f"MOB data not found under {mob}")
    torch.set_num_threads(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), NEUROEXPLAIN_DEBUG="1")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_st_") as tmpdir:
        tmp = Path(tmpdir)
        ingest_s = _run(
            [*_cli(), "ingest-st", "--counts", str(mob / "mob_rep11_counts.csv.gz"),
             "--spots", str(mob / "mob_rep11_spots.csv"), "--label-key", "layer_short",
             "--out", str(tmp / "mob.h5ad")],
            env,
        )  # fmt: skip
        stage_cmd = [
            *_cli(), "st-concepts", "--adata", str(tmp / "mob.h5ad"), "--label-key",
            "layer_short", "--out", str(tmp / "out.h5ad"), "--figures", str(tmp / "figs"),
            "--seed", str(args.seed), "--genemode-seeds", "Penk,Doc2g,Kctd12",
            "--model-dir", str(tmp / "model"), "--threads", str(args.threads),
            "--device", "cpu",
        ]  # fmt: skip
        stage_s = _run(stage_cmd, env)
        eval_s = _run(
            [*_cli(), "st-evaluate", "--adata", str(tmp / "out.h5ad"), "--label-key",
             "layer_short", "--out", str(tmp / "metrics.json")],
            env,
        )  # fmt: skip
        metrics = json.loads((tmp / "metrics.json").read_text())
        load_after_stage = os.getloadavg()[0]

        # ------------------------------------------------------------ saliency timings
        import anndata as ad
        from captum.attr import (
            InputXGradient,
            IntegratedGradients,
            NoiseTunnel,
            Saliency,
        )

        from neuroexplain.st.concepts import ConceptSaliency, ConceptScorer
        from neuroexplain.st.vae import SpotVAE

        adata = ad.read_h5ad(tmp / "out.h5ad")
        model = SpotVAE.load(tmp / "model", adata, device="cpu")
        vectors = np.asarray(adata.uns["concept_saliency"]["concept_vectors"])
        scorer = ConceptScorer(model.posterior_mean(), vectors).eval()
        x = torch.from_numpy(model.get_normalized_input(adata))
        n_c, (n_spots, n_genes) = len(vectors), tuple(x.shape)
        expl = ConceptSaliency(scorer)

        def captum_loop(make, **kw):
            return lambda: [make(scorer).attribute(x, target=c, **kw) for c in range(n_c)]

        # correctness on the benchmark model itself
        ours = expl.attribute(x, method="gradient")
        ref = torch.stack([Saliency(scorer).attribute(x, target=c, abs=False) for c in range(n_c)])
        max_abs_diff = float((ours - ref).abs().max())

        sal = _paired(
            {
                "batched": lambda: expl.attribute(x, method="gradient"),
                "captum_per_concept": captum_loop(Saliency, abs=False),
            },
            args.repeats,
        )
        sub = x[:40]
        per_spot = _paired(
            {
                "batched_40_spots": lambda: expl.attribute(sub, method="gradient"),
                "captum_per_concept_per_spot_40_spots": lambda: [
                    Saliency(scorer).attribute(sub[i : i + 1], target=c, abs=False)
                    for c in range(n_c)
                    for i in range(len(sub))
                ],
            },
            max(3, args.repeats // 2),
        )
        variants = {}
        for name, ours_fn, theirs_fn in [
            (
                "grad_x_input",
                lambda: expl.attribute(x, method="grad_x_input"),
                captum_loop(InputXGradient),
            ),
            (
                "ig_50_steps",
                lambda: expl.attribute(x, method="ig", n_steps=50),
                captum_loop(IntegratedGradients, n_steps=50),
            ),
            (
                "smoothgrad_25_samples",
                lambda: expl.attribute(x, method="smoothgrad", nt_samples=25, stdevs=0.5),
                lambda: [
                    NoiseTunnel(Saliency(scorer)).attribute(
                        x, target=c, nt_type="smoothgrad", nt_samples=25, stdevs=0.5, abs=False
                    )
                    for c in range(n_c)
                ],
            ),
        ]:
            t = _paired({"batched": ours_fn, "captum_per_concept": theirs_fn}, 3)
            variants[name] = {
                "batched_seconds": statistics.median(t["batched"]),
                "captum_per_concept_seconds": statistics.median(t["captum_per_concept"]),
                "ratio": statistics.median(
                    [b / a for a, b in zip(t["batched"], t["captum_per_concept"], strict=True)]
                ),
            }
    load_after = os.getloadavg()[0]

    ratio = statistics.median(
        [b / a for a, b in zip(sal["batched"], sal["captum_per_concept"], strict=True)]
    )
    spot_ratio = statistics.median(
        [
            b / a
            for a, b in zip(
                per_spot["batched_40_spots"],
                per_spot["captum_per_concept_per_spot_40_spots"],
                strict=True,
            )
        ]
    )
    params = {"threads": args.threads, "repeats": args.repeats, "stage_command": stage_cmd[1:]}
    result = {
        "name": "st_concepts",
        "data": "MOB Stahl 2016 replicate 11 (262 spots x 15928 genes)",
        "n_spots": n_spots,
        "n_model_genes": n_genes,
        "n_concepts": n_c,
        "saliency_gradient": {
            "batched_seconds": statistics.median(sal["batched"]),
            "captum_per_concept_seconds": statistics.median(sal["captum_per_concept"]),
            "ratio": ratio,
            "target_ratio": 10.0,
            "meets_target": ratio >= 10.0,
            "max_abs_diff_vs_captum": max_abs_diff,
        },
        "saliency_gradient_vs_per_spot_loop_40_spots": {
            "batched_seconds": statistics.median(per_spot["batched_40_spots"]),
            "captum_per_concept_per_spot_seconds": statistics.median(
                per_spot["captum_per_concept_per_spot_40_spots"]
            ),
            "ratio": spot_ratio,
        },
        "saliency_variants": variants,
        "stage": {
            "ingest_seconds": ingest_s,
            "st_concepts_seconds": stage_s,
            "st_evaluate_seconds": eval_s,
            "target_seconds": 120.0,
            "meets_target": stage_s < 120.0,
        },
        "acceptance": {
            "mean_top50_overlap": metrics["mean_overlap"],
            "per_layer_overlap": {k: v["overlap"] for k, v in metrics["layers"].items()},
            "mean_spearman": metrics["mean_spearman"],
            "markers": metrics["markers"],
            "cv_accuracy": metrics["classification"]["accuracy"],
            "chance": metrics["classification"]["chance"],
            "genemode_peak_layer": {
                k: v["peak_layer"] for k, v in metrics.get("genemode", {}).items()
            },
            "checks": metrics["checks"],
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "loadavg_1min_before": load_before,
            "loadavg_1min_after_stage": load_after_stage,
            "loadavg_1min_after": load_after,
            "platform": platform.platform(),
        },
        "provenance": provenance(params, seed=args.seed, command="bench_st_concepts"),
    }
    write_json(result, args.out)
    print(json.dumps({k: result[k] for k in ("saliency_gradient", "stage")}, indent=2))


if __name__ == "__main__":
    main()
