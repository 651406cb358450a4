"""Benchmark: simulator training step time and inference throughput on CPU at 64³.

Times the real code paths on random volumes with the default ``small`` classifier (frozen):

- ``train_step_seconds``: one optimisation step of :func:`neuroexplain.simulator.train_simulator`
  (simulator forward, frozen-classifier forward / backward to the image, cycle pass, smoothness,
  Adam), measured as the difference between a run of ``1 + steps`` steps and a run of 1 step
  (so start-up costs cancel); also without the cycle pass;
- ``inference_subjects_per_second``: :func:`neuroexplain.simulator.simulate` (field + warp, no
  gradients) in batches;
- ``disease_map_seconds_per_subject``: the remove-direction disease map (field inversion by
  fixed-point iteration + log-Jacobian) of one 64³ field.

Each measurement is repeated for every ``--threads`` value (default 2, then 1); the machine's
1-minute load average is recorded before and after: on a shared machine the numbers scale with
the CPU actually available, and with other processes running, 2 torch threads can be slower than
1 (OpenMP threads wait for each other).

Usage:
    .venv/bin/python benchmarks/bench_simulator.py --size 64 --threads 2 1 \\
        --out benchmarks/results/simulator.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

__all__ = ["main"]


def _train_seconds(x, cond, clf, *, steps: int, cycle: bool, batch_size: int) -> float:
    from neuroexplain.simulator import SimulatorConfig, TrainConfig, train_simulator

    def run(n: int) -> float:
        cfg = TrainConfig(
            epochs=1000,
            batch_size=batch_size,
            max_steps=n,
            device="cpu",
            checkpoint_every=0,
            w_cycle=1.0 if cycle else 0.0,
        )
        t0 = time.perf_counter()
        train_simulator(x, cond, clf, config=cfg, net_config=SimulatorConfig(), progress=False)
        return time.perf_counter() - t0

    one = run(1)
    more = run(1 + steps)
    return (more - one) / steps


def _measure(args: argparse.Namespace, threads: int) -> dict:
    import torch

    from neuroexplain.classifier import build_model
    from neuroexplain.simulator import SimulatorConfig, SimulatorNet, disease_log_jacobian, simulate

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    s = args.size
    load_before = os.getloadavg()[0]
    clf = build_model("small", spatial_size=(s, s, s)).eval()
    x = torch.rand(2 * args.batch_size, 1, s, s, s)
    cond = torch.tensor([-1.0, 1.0] * args.batch_size)
    step_s = _train_seconds(x, cond, clf, steps=args.steps, cycle=True, batch_size=args.batch_size)
    step_nc = _train_seconds(
        x, cond, clf, steps=args.steps, cycle=False, batch_size=args.batch_size
    )
    net = SimulatorNet(SimulatorConfig(init_std=0.05)).eval()
    xi = torch.rand(args.infer_subjects, 1, s, s, s)
    simulate(net, xi[: args.infer_batch], "inject", batch_size=args.infer_batch)  # warm-up
    t0 = time.perf_counter()
    _, ddf = simulate(net, xi, "remove", batch_size=args.infer_batch)
    infer_s = time.perf_counter() - t0
    reps = 4
    t0 = time.perf_counter()
    for i in range(reps):
        disease_log_jacobian(ddf[i : i + 1], "remove")
    map_s = (time.perf_counter() - t0) / reps
    out = {
        "threads": threads,
        "train_step_seconds": round(step_s, 3),
        "train_step_seconds_no_cycle": round(step_nc, 3),
        "train_subjects_per_second": round(args.batch_size / step_s, 3),
        "inference_subjects_per_second": round(args.infer_subjects / infer_s, 2),
        "disease_map_seconds_per_subject": round(map_s, 3),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }
    print(
        f"{threads} thread(s): train step {step_s:.2f} s (no cycle {step_nc:.2f} s) at batch "
        f"{args.batch_size}; inference {out['inference_subjects_per_second']} subjects/s; "
        f"disease map {map_s:.2f} s; load {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="cubic volume size")
    parser.add_argument("--batch-size", type=int, default=4, help="training batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--infer-subjects", type=int, default=32, help="volumes to simulate")
    parser.add_argument("--infer-batch", type=int, default=8, help="inference batch size")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[2, 1], help="torch CPU thread counts to time"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/simulator.json"))
    args = parser.parse_args(argv)

    from neuroexplain.io.atomic import write_json
    from neuroexplain.provenance import provenance
    from neuroexplain.simulator import SimulatorConfig

    runs = [_measure(args, t) for t in args.threads]
    params = vars(args) | {"out": str(args.out), "simulator": SimulatorConfig().to_dict()}
    result = {
        "name": "simulator",
        "shape": [args.size] * 3,
        "train_batch_size": args.batch_size,
        "inference_batch_size": args.infer_batch,
        **{k: v for k, v in runs[0].items() if k != "load_average_1min"},
        "load_average_1min": runs[0]["load_average_1min"],
        "by_threads": runs,
        "note": "the machine is shared: on a loaded machine 1 thread can beat 2 (see load)",
        "machine": {"cpus": os.cpu_count(), "processor": platform.machine()},
        "provenance": provenance(params, seed=0, command="bench_simulator"),
    }
    write_json(result, args.out)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
