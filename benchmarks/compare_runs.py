"""Compare the quality numbers of two workflow runs (e.g. fp32 against bf16).

Reads from each run's ``results/`` folder: the explained classifier's and the final model's
test AUC (``classifier/metrics.json``), the simulator's flip rates and gradient agreement
(``simulator/simulate.json``), the mean of every column of the map table per method
(``evaluation/maps_subjects.tsv``, the numbers of ``maps.md``) and the simulator's mean
log-Jacobian per region (``simulator/group.tsv``: the ``simulator`` map, all subjects). Writes
one Markdown table with both values, their difference and whether it lies within
``--tolerance`` (the issue's ±0.02).

Usage::

    python benchmarks/compare_runs.py RUN_A RUN_B --names fp32 bf16 \\
        --out benchmarks/results/precision_demo.md

``RUN_A`` / ``RUN_B`` are the folders that hold ``results/`` (``bench_workflow.py --keep``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

MAP_COLUMNS = ("ncc_abs", "ncc_signed", "top1_in_regions", "top5_in_regions")


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def quality_numbers(run: Path) -> dict[str, float]:
    """The run's quality numbers, by name (missing parts are left out)."""
    res = run / "results"
    out: dict[str, float] = {}
    metrics = _json(res / "classifier" / "metrics.json")
    if metrics:
        out["classifier: final model test AUC"] = metrics["test"]["auc"]
        explained = metrics.get("explained") or {}
        if explained:
            out[f"classifier: explained ({explained.get('model')}) test AUC"] = explained["test"][
                "auc"
            ]
    sim = _json(res / "simulator" / "simulate.json")
    for direction, rate in sorted((sim.get("flip_rate") or {}).items()):
        out[f"simulator: flip rate {direction}"] = rate
    agreement = (sim.get("gradient_agreement") or {}).get("mean")
    if agreement is not None:
        out["simulator: gradient agreement"] = agreement
    table = res / "evaluation" / "maps_subjects.tsv"
    if table.is_file():
        values: dict[tuple[str, str], list[float]] = defaultdict(list)
        with table.open() as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                for col in MAP_COLUMNS:
                    if row.get(col) not in (None, ""):
                        values[(row["method"], col)].append(float(row[col]))
        for (method, col), vals in values.items():
            out[f"map {method}: {col}"] = sum(vals) / len(vals)
    group = res / "simulator" / "group.tsv"
    if group.is_file():
        with group.open() as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                if row["map"] == "simulator" and row["group"] == "all":
                    out[f"simulator log-Jacobian: {row['region']}"] = float(row["mean"])
    return out


def compare(a: dict[str, float], b: dict[str, float], tolerance: float) -> list[dict]:
    rows = []
    for key in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(key, math.nan), b.get(key, math.nan)
        diff = vb - va
        rows.append(
            {
                "quantity": key,
                "a": va,
                "b": vb,
                "diff": diff,
                "within": bool(abs(diff) <= tolerance),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--names", nargs=2, default=["a", "b"])
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = compare(quality_numbers(args.run_a), quality_numbers(args.run_b), args.tolerance)
    na, nb = args.names
    lines = [
        f"| quantity | {na} | {nb} | {nb} − {na} | within ±{args.tolerance:g} |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['quantity']} | {r['a']:.3f} | {r['b']:.3f} | {r['diff']:+.3f} | "
            f"{'yes' if r['within'] else 'no'} |"
        )
    n_out = sum(not r["within"] for r in rows)
    lines.append("")
    lines.append(f"{len(rows) - n_out} of {len(rows)} quantities within ±{args.tolerance:g}.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
