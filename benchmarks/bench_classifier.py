"""Benchmark: classifier training throughput and peak memory on CPU at 64³ and 96³.

Each shape runs in its own subprocess (so the peak RSS, ``resource.getrusage(RUSAGE_SELF)``,
belongs to that shape alone), with ``torch.set_num_threads(threads)``, the default ``small``
network in the channels-last layout used by ``train-classifier``, AdamW and BCE loss on random
volumes. Reported per shape: training volumes / s without augmentation and with the default
batched augmentation of ``train-classifier`` (random affine + intensity), seconds per
step, inference volumes / s, peak RSS and its increase over the RSS after building the model.

Usage:
    .venv/bin/python benchmarks/bench_classifier.py --shapes 64 96 --threads 2 \\
        --out benchmarks/results/classifier.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main", "run_one"]


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(size: int, batch_size: int, steps: int, threads: int) -> dict:
    """Time training steps of the default network on ``(batch_size, 1, size, size, size)``."""
    import resource

    import torch

    from neuroexplain.classifier import build_model
    from neuroexplain.classifier.augment import build_augmenter
    from neuroexplain.classifier.train import TrainConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape = (size, size, size)
    model = build_model("small", spatial_size=shape).to(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x = torch.rand(batch_size, 1, *shape)
    y = (torch.arange(batch_size) % 2).float()
    aug = build_augmenter(TrainConfig(), 0, 0)
    rss_model = _rss_mb()

    def step(augment: bool) -> None:
        xb = x
        if augment:
            xb = aug(x)
        xb = xb.contiguous(memory_format=torch.channels_last_3d)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb)[:, 0], y)
        loss.backward()
        opt.step()

    model.train()
    step(False)  # warm-up (oneDNN kernel selection)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(False)
    train_s = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        step(True)
    aug_s = (time.perf_counter() - t0) / steps
    model.eval()
    with torch.no_grad():
        model(x)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        infer_s = (time.perf_counter() - t0) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {
        "shape": list(shape),
        "batch_size": batch_size,
        "threads": threads,
        "steps": steps,
        "seconds_per_step": round(train_s, 4),
        "train_volumes_per_s": round(batch_size / train_s, 3),
        "train_volumes_per_s_with_augmentation": round(batch_size / aug_s, 3),
        "inference_volumes_per_s": round(batch_size / infer_s, 3),
        "peak_rss_mb": round(peak, 1),
        "rss_after_model_mb": round(rss_model, 1),
        "peak_rss_increase_mb": round(peak - rss_model, 1),
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every shape in a subprocess and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", type=int, nargs="+", default=[64, 96])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/classifier.json"))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: one shape
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.batch_size, args.steps, args.threads)))
        return 0

    import torch

    import neuroexplain
    from neuroexplain.io.atomic import write_json

    results = []
    load_before = os.getloadavg()
    for size in args.shapes:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(size),
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{size}³: {res['train_volumes_per_s']} volumes/s training "
            f"({res['train_volumes_per_s_with_augmentation']} with augmentation), "
            f"peak RSS {res['peak_rss_mb']} MB",
            flush=True,
        )
        results.append(res)
    report = {
        "benchmark": "classifier training throughput and peak memory (CPU)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "neuroexplain": neuroexplain.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "note": "shared machine: other processes may compete for the cores (see load averages)",
        "results": results,
    }
    write_json(report, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
