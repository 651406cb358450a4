"""Run every ``benchmarks/bench_*.py`` and collect their JSON results.

Each script runs in its own process (``python benchmarks/bench_<name>.py``) from the repository
root and writes ``benchmarks/results/<name>.json``. This runner records each script's exit code
and wall time and merges every ``benchmarks/results/*.json`` into
``benchmarks/results/summary.json``. It exits non-zero if any script failed.

Usage::

    python benchmarks/run_all.py [-k SUBSTRING] [--list]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from neuroexplain.io.atomic import write_json

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
SUMMARY = RESULTS / "summary.json"


def _scripts(keyword: str | None) -> list[Path]:
    scripts = sorted(HERE.glob("bench_*.py"))
    return [s for s in scripts if keyword is None or keyword in s.stem]


def _collect() -> dict[str, object]:
    results: dict[str, object] = {}
    for path in sorted(RESULTS.glob("*.json")):
        if path == SUMMARY:
            continue
        try:
            results[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            results[path.stem] = {"error": f"unreadable JSON: {exc}"}
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmark scripts; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="keyword", help="only scripts whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the scripts and exit")
    args = parser.parse_args(argv)

    scripts = _scripts(args.keyword)
    if args.list:
        print("\n".join(str(s.relative_to(REPO)) for s in scripts) or "no bench_*.py scripts")
        return 0

    RESULTS.mkdir(exist_ok=True)
    runs = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script)], cwd=REPO, check=False)
        seconds = time.perf_counter() - start
        runs.append({"script": script.name, "returncode": proc.returncode, "seconds": seconds})
        print(f"   exit {proc.returncode} after {seconds:.1f} s", flush=True)

    summary = {"runs": runs, "results": _collect()}
    write_json(summary, SUMMARY)
    print(f"wrote {SUMMARY.relative_to(REPO)} ({len(summary['results'])} result file(s))")
    failed = [r["script"] for r in runs if r["returncode"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
