"""Benchmark: ``neuroexplain ingest-mri`` on the 100 IXI subjects, and ``to_native`` speed.

Runs :func:`neuroexplain.mri.ingest.ingest_mri` on the shared IXI BIDS dataset (all subjects by
default) into a temporary folder and times it: the import of torch / MONAI separately
(``import_seconds``), then the ingest itself (``seconds``, ``subjects_per_s``). Then times
:func:`neuroexplain.mri.preprocess.to_native` of one 64³ model map onto a 120 x 120 x 90 native
grid (median of repeats, bilinear and nearest), and reports the round-trip quality on a few
subjects (T1 -> model -> native correlation inside the brain, dseg agreement). The machine is
shared: the load average before and after is recorded.

Usage:
    python benchmarks/bench_ingest_mri.py [--workers 2] [--shape 64] [--limit N] [--repeats 10]

Writes ``benchmarks/results/ingest_mri.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("NEUROEXPLAIN_SHARED_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--bids", type=Path, default=default_data / "ixi")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shape", type=int, default=64, help="cube side of the model grid")
    parser.add_argument("--fov-mm", type=float, default=224.0)
    parser.add_argument("--limit", type=int, default=None, help="default: all subjects")
    parser.add_argument("--repeats", type=int, default=10, help="to_native timing repeats")
    parser.add_argument("--quality-subjects", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ingest_mri.json")
    args = parser.parse_args(argv)
    if not (args.bids / "participants.tsv").is_file():
        print(f"error: no IXI BIDS dataset at {args.bids}", file=sys.stderr)
        return 1

    machine_before = _machine()
    t0 = time.perf_counter()
    import nibabel as nib
    import numpy as np
    import torch
    from monai.transforms import Spacingd  # noqa: F401 - counted in import_seconds

    from neuroexplain.io.atomic import write_json
    from neuroexplain.mri.ingest import ingest_mri, load_preproc
    from neuroexplain.mri.preprocess import to_native
    from neuroexplain.provenance import provenance

    import_seconds = time.perf_counter() - t0

    shape = (args.shape,) * 3
    with tempfile.TemporaryDirectory(prefix="bench_ingest_mri.") as tmp:
        out = Path(tmp) / "ingest"
        t0 = time.perf_counter()
        summary = ingest_mri(
            out,
            bids=args.bids,
            shape=shape,
            fov_mm=args.fov_mm,
            align="none",  # the whole-head grid of the published numbers (README)
            mask="none",
            limit=args.limit,
            workers=args.workers,
            progress=False,
        )
        seconds = time.perf_counter() - t0
        pre = load_preproc(out / "preproc.pt")
        size_mb = (out / "preproc.pt").stat().st_size / 1e6

    n = summary["n_subjects"]
    # ---- to_native speed on a 120 x 120 x 90 native grid
    native = nib.load(pre["t1_paths"][0])
    maff = pre["model_affines"][0].numpy()
    vol = pre["images"][0, 0].numpy()
    seg = pre["dseg"][0, 0].numpy() if pre["dseg"] is not None else None
    timings: dict[str, list[float]] = {"bilinear": [], "nearest": []}
    to_native(vol, maff, native)  # warm-up
    for _ in range(args.repeats):
        for mode, src in (("bilinear", vol), ("nearest", seg if seg is not None else vol)):
            t = time.perf_counter()
            to_native(src, maff, native, mode=mode)
            timings[mode].append(time.perf_counter() - t)

    # ---- round-trip quality (information lost at the model spacing, not a mapping error)
    corr, agree = [], []
    for i in range(min(args.quality_subjects, n)):
        img = nib.load(pre["t1_paths"][i])
        maff = pre["model_affines"][i].numpy()
        back = to_native(pre["images"][i, 0].numpy(), maff, img)
        if pre["dseg"] is None:
            continue
        labels = np.asarray(nib.load(pre["dseg_paths"][i]).dataobj).astype(np.int16)
        brain = labels > 0
        corr.append(float(np.corrcoef(back[brain], img.get_fdata()[brain])[0, 1]))
        seg_back = to_native(pre["dseg"][i, 0].numpy(), maff, img, mode="nearest")
        agree.append(float((seg_back[brain] == labels[brain]).mean()))

    params = {
        "bids": str(args.bids),
        "workers": args.workers,
        "shape": list(shape),
        "fov_mm": args.fov_mm,
        "limit": args.limit,
        "repeats": args.repeats,
    }
    result = {
        "name": "ingest_mri",
        "n_subjects": n,
        "seconds": seconds,
        "subjects_per_s": n / seconds,
        "import_seconds": import_seconds,
        "shape": list(shape),
        "spacing_mm": summary["spacing_mm"],
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "preproc_pt_mb": size_mb,
        "n_cropped": summary["n_cropped"],
        "n_brain_cropped": summary["n_brain_cropped"],
        "fg_extent_mm": summary["fg_extent_mm"],
        "to_native_native_shape": list(native.shape),
        "to_native_bilinear_seconds_median": statistics.median(timings["bilinear"]),
        "to_native_nearest_seconds_median": statistics.median(timings["nearest"]),
        "round_trip_t1_corr_in_brain": corr,
        "round_trip_dseg_agreement_in_brain": agree,
        "machine": {**machine_before, "loadavg_1m_after": _machine()["loadavg_1m"]},
        "provenance": provenance(params, command="bench_ingest_mri"),
    }
    write_json(result, args.out)
    print(
        f"ingest-mri: {n} subjects in {seconds:.1f} s ({n / seconds:.2f} subjects/s, "
        f"{args.workers} workers, {'x'.join(map(str, shape))}; imports {import_seconds:.1f} s); "
        f"to_native {statistics.median(timings['bilinear']) * 1e3:.0f} ms -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
