"""Benchmark: ``neuroexplain.jacobian.jacobian_determinant`` vs SimpleITK on a 128^3 field.

Paired runs: each repetition times ours and SimpleITK's
``DisplacementFieldJacobianDeterminantFilter`` back to back (order alternating), so load from
other processes hits both alike; the medians and the median of the per-pair ratios are reported.
Ours runs on float32 (NumPy, cache-blocked kernel, one thread); SimpleITK on float64 (its
usual pixel type for displacement fields) with the same number of threads. The torch tensor
entry (CPU, no grad) uses the same kernel; the autograd path (``requires_grad=True``) is timed
for information.

Usage:
    python benchmarks/bench_jacobian.py [--size 128] [--repeats 7] [--threads 1]

Writes ``benchmarks/results/jacobian.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np


def _smooth_field(size: int, seed: int = 0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(3, size // 4, size // 4, size // 4))
    comps = [np.kron(gaussian_filter(c, 1.0), np.ones((4, 4, 4))) for c in coarse]
    return np.stack([gaussian_filter(c, 2.0) * 4.0 for c in comps], axis=-1)  # (X, Y, Z, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "jacobian.json"
    )
    args = parser.parse_args()

    import SimpleITK as sitk
    import torch

    import neuroexplain
    from neuroexplain.io.atomic import write_json
    from neuroexplain.jacobian import jacobian_determinant

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    spacing = (1.0, 1.0, 1.0)
    u64 = _smooth_field(args.size)
    u32 = u64.astype(np.float32)
    img = sitk.GetImageFromArray(np.ascontiguousarray(u64.transpose(2, 1, 0, 3)), isVector=True)
    img.SetSpacing(spacing)
    ddf_t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(u32, -1, 0))[None])
    ddf_grad = ddf_t.clone().requires_grad_(True)

    def ours() -> np.ndarray:
        return jacobian_determinant(u32, spacing)

    def itk() -> object:  # the filter alone; converting its output to NumPy is not timed
        return sitk.DisplacementFieldJacobianDeterminant(img)

    def ours_torch() -> object:
        return jacobian_determinant(ddf_t, spacing)

    def ours_autograd() -> object:
        with torch.enable_grad():
            return jacobian_determinant(ddf_grad, spacing)

    # correctness of what is timed (interior; borders differ by design)
    ref = sitk.GetArrayFromImage(itk()).transpose(2, 1, 0)
    inner = (slice(1, -1),) * 3
    det = ours()
    max_abs_diff = float(np.abs(det - ref)[inner].max())

    timings: dict[str, list[float]] = {"ours": [], "simpleitk": [], "torch": [], "autograd": []}
    ratios = []
    for rep in range(args.repeats):
        pair = [("ours", ours), ("simpleitk", itk)]
        if rep % 2:
            pair.reverse()
        got = {}
        for name, fn in pair:
            t0 = time.perf_counter()
            fn()
            got[name] = time.perf_counter() - t0
            timings[name].append(got[name])
        ratios.append(got["simpleitk"] / got["ours"])
        for name, fn in (("torch", ours_torch), ("autograd", ours_autograd)):
            t0 = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in timings.items()}
    result = {
        "benchmark": "jacobian_determinant vs SimpleITK DisplacementFieldJacobianDeterminant",
        "shape": [args.size] * 3,
        "repeats": args.repeats,
        "threads": args.threads,
        "dtype": {"ours": "float32", "simpleitk": "float64"},
        "seconds": timings,
        "median_seconds": med,
        "speedup_median_of_ratios": statistics.median(ratios),
        "speedup_ratio_of_medians": med["simpleitk"] / med["ours"],
        "speedup_torch": med["simpleitk"] / med["torch"],
        "speedup_autograd": med["simpleitk"] / med["autograd"],
        "target_speedup": 5.0,
        "max_abs_diff_interior": max_abs_diff,
        "det_range": [float(det.min()), float(det.max())],
        "versions": {
            "neuroexplain": neuroexplain.__version__,
            "numpy": np.__version__,
            "torch": torch.__version__,
            "simpleitk": sitk.Version_VersionString(),
            "python": platform.python_version(),
        },
        "machine": {"processor": platform.machine(), "cpus": __import__("os").cpu_count()},
    }
    write_json(result, args.out)
    print(json.dumps({k: result[k] for k in ("median_seconds", "speedup_median_of_ratios")}))


if __name__ == "__main__":
    main()
