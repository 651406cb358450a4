"""Benchmark: training step time of the classifier and the simulator on CPU, fp32 vs bf16.

Times ``--steps`` training steps (forward, backward, optimiser step) at the demo's grid (64³) and
the default batch sizes (classifier 8, simulator 4), for every ``--precisions`` value, on random
volumes, with ``torch.set_num_threads(--threads)``:

- classifier: the default ``small`` network in the channels-last layout, AdamW, BCE with logits,
  the forward pass under :meth:`neuroexplain.utils.Precision.autocast` and the loss in float32,
  as in ``train-classifier`` (without augmentation, which runs before the forward pass and does
  not depend on the precision);
- simulator: the real step of ``train-simulator`` (``neuroexplain.simulator.train``'s
  ``_optimise_step``: simulator forward, frozen-classifier forward / backward to the image,
  cycle pass, regularisers, Adam) with the default simulator and a frozen ``small`` classifier.

Each (model, precision) gets ``--warmup`` untimed steps first (oneDNN picks its kernels). The
report gives seconds per step, volumes per second, the speed-up of each precision over fp32, the
first step's loss (how far bf16 moves it), the CPU's model name and flags (``avx512_bf16`` /
``amx_bf16``: native bfloat16; without them bf16 is emulated and slower), and the 1-minute load
average before and after: on a shared machine the numbers scale with the CPU actually free.
Quality (AUC, map table) is not measured here; only time.

Usage:
    .venv/bin/python benchmarks/bench_precision.py --size 64 --steps 5 --threads 2 \\
        --out benchmarks/results/precision.json      # also writes precision.md beside it
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["main"]

#: CPU flags worth reporting next to the timings (vector / matrix units)
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def _timed(step: Callable[[], float], steps: int, warmup: int) -> tuple[float, float]:
    """``(seconds per step, loss of the first warm-up step)`` of ``step`` (returns the loss)."""
    first = step()
    for _ in range(max(warmup - 1, 0)):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps, first


def _classifier_step(size: int, batch_size: int, precision) -> Callable[[], float]:
    """One training step of the default classifier, as ``train-classifier`` takes it."""
    import torch

    from neuroexplain.classifier import build_model
    from neuroexplain.settings import ClassifierConfig

    cfg = ClassifierConfig()
    torch.manual_seed(0)
    shape = (size, size, size)
    fmt = torch.channels_last_3d
    model = build_model(cfg.arch, spatial_size=shape).to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    scaler = precision.grad_scaler()
    x = torch.rand(batch_size, 1, *shape).contiguous(memory_format=fmt)
    y = (torch.arange(batch_size) % 2).float()
    model.train()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with precision.autocast():
            logit = model(x)[:, 0]
        loss = loss_fn(logit.float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return float(loss.detach())

    return step


def _simulator_step(size: int, batch_size: int, precision_name: str) -> Callable[[], float]:
    """One step of ``train-simulator`` (its own code path) with the default simulator."""
    import torch

    from neuroexplain.classifier import build_model
    from neuroexplain.settings import SimulatorConfig, SimulatorTrainConfig
    from neuroexplain.simulator.train import _optimise_step, _setup_run

    torch.manual_seed(0)
    shape = (size, size, size)
    images = torch.rand(batch_size, 1, *shape)
    clf = build_model("small", spatial_size=shape)
    cfg = SimulatorTrainConfig(
        batch_size=batch_size, device="cpu", checkpoint_every=0, precision=precision_name
    )
    run = _setup_run(images, clf, cfg, SimulatorConfig())
    o = torch.where(torch.arange(batch_size) % 2 == 0, 1.0, -1.0)
    l_in = torch.zeros(batch_size)
    run.model.train()

    def step() -> float:
        return float(_optimise_step(run, images, o, l_in, cfg.w_cls).loss.detach())

    return step


def _cpu() -> dict:
    """The CPU's model name, the reported flags it has and whether bf16 is native."""
    from neuroexplain.utils import BF16_CPU_FLAGS, cpu_flags

    flags = cpu_flags()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {
        "model_name": name,
        "cpus": os.cpu_count(),
        "flags": [f for f in REPORTED_FLAGS if f in flags],
        "native_bf16": bool(set(BF16_CPU_FLAGS) & flags),
    }


def _measure(args: argparse.Namespace) -> list[dict]:
    """One row per (model, precision): seconds per step, volumes / s, first loss."""
    import torch

    from neuroexplain.settings import ClassifierConfig, SimulatorTrainConfig
    from neuroexplain.utils import resolve_precision

    torch.set_num_threads(args.threads)
    batches = {
        "classifier": args.classifier_batch or ClassifierConfig().batch_size,
        "simulator": args.simulator_batch or SimulatorTrainConfig().batch_size,
    }
    rows = []
    for model in args.models:
        for name in args.precisions:
            precision = resolve_precision(name, "cpu", log=False)  # the step logs it
            bs = batches[model]
            if model == "classifier":
                step = _classifier_step(args.size, bs, resolve_precision(name, "cpu"))
            else:
                step = _simulator_step(args.size, bs, name)
            seconds, loss = _timed(step, args.steps, args.warmup)
            rows.append(
                {
                    "model": model,
                    "precision": precision.name,
                    "requested": name,
                    "batch_size": bs,
                    "seconds_per_step": round(seconds, 4),
                    "volumes_per_second": round(bs / seconds, 3),
                    "first_loss": loss,
                }
            )
            print(f"{model} {precision.name}: {seconds:.3f} s/step ({bs / seconds:.2f} vol/s)")
    for row in rows:  # fp32 is always measured (main adds it)
        ref = next(r for r in rows if r["model"] == row["model"] and r["requested"] == "fp32")
        row["speedup_vs_fp32"] = round(ref["seconds_per_step"] / row["seconds_per_step"], 3)
    return rows


def _markdown(result: dict) -> str:
    """The report as a Markdown table with the machine's CPU and flags."""
    cpu = result["cpu"]
    lines = [
        f"# Training step time, fp32 vs bf16 ({result['shape'][0]}³, {result['threads']} threads)",
        "",
        f"CPU: {cpu['model_name']} ({cpu['cpus']} CPUs); flags: "
        f"{', '.join(cpu['flags']) or 'none of the reported'}; native bf16: "
        f"{'yes' if cpu['native_bf16'] else 'no (bf16 is emulated)'}. "
        f"Load average (1 min) before / after: {result['load_average_1min'][0]:.2f} / "
        f"{result['load_average_1min'][1]:.2f}. {result['steps']} timed steps after "
        f"{result['warmup']} warm-up.",
        "",
        "| model | precision | batch | s / step | volumes / s | vs fp32 | first loss |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['batch_size']} | "
            f"{r['seconds_per_step']:.3f} | {r['volumes_per_second']:.2f} | "
            f"{r['speedup_vs_fp32']:.2f}x | "
            f"{r['first_loss']:.5g} |"
        )
    lines += ["", "Time only: AUC and map quality under bf16 are not measured here.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="cubic volume size (demo: 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--classifier-batch", type=int, help="default: train-classifier's")
    parser.add_argument("--simulator-batch", type=int, help="default: train-simulator's")
    parser.add_argument(
        "--models", nargs="+", choices=("classifier", "simulator"),
        default=["classifier", "simulator"],
    )  # fmt: skip
    parser.add_argument(
        "--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"]
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/precision.json"))
    args = parser.parse_args(argv)
    if "fp32" not in args.precisions:
        args.precisions = ["fp32", *args.precisions]  # the reference of the speed-ups

    import torch

    from neuroexplain.io.atomic import atomic_output, write_json
    from neuroexplain.provenance import provenance

    load_before = os.getloadavg()[0]
    runs = _measure(args)
    params = vars(args) | {"out": str(args.out)}
    result = {
        "name": "precision",
        "shape": [args.size] * 3,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "runs": runs,
        "cpu": _cpu(),
        "torch": torch.__version__,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "provenance": provenance(params, seed=0, command="bench_precision"),
    }
    write_json(result, args.out)
    with atomic_output(args.out.with_suffix(".md")) as tmp:
        tmp.write_text(_markdown(result))
    print(f"-> {args.out}, {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
