"""Benchmark: the demo workflow end to end (wall time and peak memory of the whole job tree).

Runs the README's main job (``snakemake --cores 2 --workflow-profile
workflow/profiles/default --report results/report.html --report-after-run`` on
``config/config.yaml``) in a fresh temporary working directory (so the repository's own
``results/`` are left alone), with the demo data taken from ``../shared/data``.
While it runs, the resident memory of snakemake and all its child processes is summed every
0.5 s (psutil); the peak of that sum is the memory the machine must have. Per-rule wall times
and peak RSS come from the rules' own ``benchmark:`` tables.

Targets (issue "whole workflow"): <= 15 minutes and <= 4 GB on 2 cores.

Usage::

    python benchmarks/bench_workflow.py [--cores 2] [--keep DIR] [--config key=value ...]

Writes ``benchmarks/results/workflow.json``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from neuroexplain.io.atomic import write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "results" / "workflow.json"
TARGET_SECONDS = 15 * 60
TARGET_MB = 4096


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _rule_tables(workdir: Path) -> dict[str, dict[str, float]]:
    rules = {}
    for tsv in sorted((workdir / "results" / "benchmarks").rglob("*.tsv")):
        with tsv.open() as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            name = str(tsv.relative_to(workdir / "results" / "benchmarks").with_suffix(""))
            rules[name] = {
                "seconds": float(rows[0]["s"]),
                "max_rss_mb": float(rows[0]["max_rss"]) if rows[0]["max_rss"] != "NA" else None,
            }
    return rules


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it")
    ap.add_argument("--config", nargs="*", default=[], help="extra snakemake --config items")
    args = ap.parse_args()

    mirror = (REPO / ".." / "shared" / "data").resolve()
    work = args.keep or Path(tempfile.mkdtemp(prefix="nx_workflow_"))
    work.mkdir(parents=True, exist_ok=True)
    snakemake = Path(sys.executable).with_name("snakemake")
    cmd = [
        str(snakemake if snakemake.exists() else "snakemake"),
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(work),
        "--configfile", str(REPO / "config" / "config.yaml"),
        "--cores", str(args.cores),
        "--workflow-profile", str(REPO / "workflow" / "profiles" / "default"),
        "--config", f"data={{mirror: '{mirror}'}}", *args.config,
        "--report", str(work / "results" / "report.html"), "--report-after-run",
    ]  # fmt: skip
    print("running:", " ".join(cmd), flush=True)
    log = work / "bench_workflow.log"
    peak = [0]
    t0 = time.perf_counter()
    with log.open("w") as fh:
        # the jobs call `neuroexplain`: the one installed beside this Python, even if the
        # virtual environment is not activated
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=work, env={**os.environ, "PATH": path}
        )
        ps = psutil.Process(proc.pid)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss(ps))
                done.wait(0.5)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        rc = proc.wait()
        done.set()
        thread.join()
    seconds = time.perf_counter() - t0
    report_ok = (work / "results" / "report.html").is_file()
    peak_mb = peak[0] / 2**20
    result = {
        "benchmark": "workflow",
        "command": " ".join(cmd),
        "returncode": rc,
        "wall_seconds": round(seconds, 1),
        "peak_memory_mb": round(peak_mb, 1),
        "report_written": report_ok,
        "target_seconds": TARGET_SECONDS,
        "target_memory_mb": TARGET_MB,
        "meets_time_target": rc == 0 and seconds <= TARGET_SECONDS,
        "meets_memory_target": peak_mb <= TARGET_MB,
        "rules": _rule_tables(work),
        "machine": {
            "cores": os.cpu_count(),
            "cores_used": args.cores,
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
        },
    }
    write_json(result, OUT)
    print(
        f"workflow: rc={rc}, {seconds / 60:.1f} min, peak {peak_mb:.0f} MB, "
        f"report {'ok' if report_ok else 'missing'} -> {OUT}"
    )
    if args.keep is None and rc == 0:
        shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
