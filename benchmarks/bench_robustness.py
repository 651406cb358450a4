"""Benchmark: does the classifier stage learn whatever the data hold, on cohorts nobody tuned it on?

Every cohort of ``benchmarks/cohorts/*.yaml`` is built from the 100 IXI subjects of the data
mirror (``../shared/data/ixi``) and the classifier stage runs on it with the *default* settings
(the same for every cohort: no per-cohort tuning), for each seed. Reported per cohort and seed:
the CNN's validation / test AUC (with the bootstrap interval when ``train-classifier`` writes
one), the linear reference's AUC on the same split, the best epoch, epochs run and seconds.

A cohort file holds either a planted effect (``cohort:`` with ``shrink``, ``enlarge``,
``paired``, ``magnitude`` and optionally ``fraction``, ``label_probability``, ``limit``) or the
real age task (``age:`` with ``young_below`` and ``old_above``: a sample sheet with label
``old`` / ``young`` is written from ``participants.tsv``).

Everything is done through the ``neuroexplain`` command (make-cohort, ingest-mri,
train-classifier); cohorts and ingests are cached under ``--work`` (reused when present).

Usage:
    python benchmarks/bench_robustness.py                      # every cohort, seeds 0 and 1
    python benchmarks/bench_robustness.py --cohorts small_paired --seeds 0 --shape 48 \\
        --set epochs=20                                         # a quick look
    python benchmarks/bench_robustness.py --cohorts age --seeds 0 --simulator \
        --sim-tag valobj                   # simulator on the age task: train / val / test flips

With ``--simulator`` a cohort with a planted effect also gets the simulator's and a gradient
baseline's maps scored against the ground truth; the age task (no ground truth) gets the flip
rates and the mean log-Jacobian of its ``expected`` regions.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
COHORTS = ROOT / "benchmarks" / "cohorts"


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("neuroexplain")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "neuroexplain"]


def _run(args: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.run([*_cli(), *args], stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"neuroexplain {args[0]} failed (log {log}): {' | '.join(tail)}")


def _age_sheet(ixi: Path, spec: dict, out: Path) -> Path:
    import pandas as pd

    part = pd.read_csv(ixi / "participants.tsv", sep="\t")
    rows = []
    for _, r in part.iterrows():
        age = float(r["age"]) if str(r["age"]) not in ("", "nan", "n/a") else float("nan")
        if age < spec["young_below"]:
            label = "young"
        elif age > spec["old_above"]:
            label = "old"
        else:
            continue
        sid = r["participant_id"]
        rows.append(
            {
                "subject": sid,
                "t1": str(ixi / sid / "anat" / f"{sid}_T1w.nii.gz"),
                "dseg": str(ixi / "derivatives/dlmuse" / sid / "anat" / f"{sid}_dseg.nii.gz"),
                "label": label,
            }
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out, sep="\t", index=False)
    return out


def prepare(name: str, spec: dict, work: Path, ixi: Path, shape: int) -> Path:
    """Build (or reuse) the cohort's ``preproc.pt`` and return its path."""
    base = work / name
    ingest = base / f"ingest_{shape}"
    preproc = ingest / "preproc.pt"
    if preproc.exists():
        return preproc
    common = [
        "--shape", str(shape), "--fov-mm", "180", "--norm", "percentile", "--fg-threshold",
        "0.1", "--align", "labels", "--mask", "brain", "--mask-margin-mm", "5.0",
        "--workers", "2", "--derivatives", "dlmuse",
    ]  # fmt: skip
    if "age" in spec:
        sheet = _age_sheet(ixi, spec["age"], base / "sheet.tsv")
        args = ["ingest-mri", "--out", str(ingest), "--sheet", str(sheet)]
        _run([*args, "--positive-class", "old", *common], base / "ingest.log")
        return preproc
    c = spec["cohort"]
    cohort = base / "cohort"
    if not (cohort / "participants.tsv").exists():
        if cohort.exists():
            shutil.rmtree(cohort)
        args = [
            "make-cohort", "--bids", str(ixi), "--out", str(cohort), "--derivatives", "dlmuse",
            "--shrink", ",".join(map(str, c.get("shrink", []))),
            "--enlarge", ",".join(map(str, c.get("enlarge", []))),
            "--fraction", str(c.get("fraction", 0.5)),
            "--magnitude-min", str(c["magnitude"][0]), "--magnitude-max", str(c["magnitude"][1]),
            "--label-probability", str(c.get("label_probability", 1.0)),
            "--seed", str(c.get("seed", 0)), "--workers", "2",
            "--paired" if c.get("paired", True) else "--unpaired",
        ]  # fmt: skip
        if c.get("limit"):
            args += ["--limit", str(c["limit"])]
        _run(args, base / "cohort.log")
    args = ["ingest-mri", "--out", str(ingest), "--bids", str(cohort), "--label-column"]
    _run([*args, "diagnosis", "--positive-class", "disease", *common], base / "ingest.log")
    return preproc


def _flags(overrides: list[str]) -> list[str]:
    """``KEY=VALUE`` -> command-line options (``true`` / ``false``: the switch's two names)."""
    args: list[str] = []
    for item in overrides:
        key, _, value = item.partition("=")
        flag = "--" + key.replace("_", "-")
        if value.lower() in ("true", "false"):
            args.append(flag if value.lower() == "true" else f"--no-{flag[2:]}")
        else:
            args += [flag, value]
    return args


def train(preproc: Path, out: Path, seed: int, overrides: list[str], threads: int) -> dict:
    """Train with the default settings (plus ``overrides``) and return a result row."""
    metrics_path = out / "metrics.json"
    if not metrics_path.exists():
        args = ["train-classifier", "--preproc", str(preproc), "--out", str(out)]
        args += ["--seed", str(seed), "--threads", str(threads)]
        args += _flags(overrides)
        t0 = time.perf_counter()
        _run(args, out / "train.log")
        wall = time.perf_counter() - t0
    else:
        wall = None
    m = json.loads(metrics_path.read_text())
    ref = m.get("reference") or {}
    row = {
        "seed": seed,
        "cnn_val_auc": m["val"].get("auc"),
        "cnn_test_auc": m.get("test", {}).get("auc"),
        "cnn_test_auc_ci": m.get("test", {}).get("auc_ci"),
        "cnn_test_balanced_accuracy": m.get("test", {}).get("balanced_accuracy"),
        "reference_val_auc": (ref.get("val") or {}).get("auc"),
        "reference_test_auc": (ref.get("test") or {}).get("auc"),
        "model": m.get("model"),
        "explained_model": (m.get("explained") or {}).get("model", m.get("model")),
        "explained_test_auc": (m.get("explained") or m).get("test", {}).get("auc"),
        "final_selection": m.get("final_selection"),
        "best_epoch": m.get("best_epoch"),
        "epochs_run": m.get("epochs_run"),
        "train_seconds": m.get("train_seconds"),
        "wall_seconds": None if wall is None else round(wall, 1),
        "n_train": m.get("train", {}).get("n"),
        "n_test": m.get("test", {}).get("n"),
        "trained_is_linear_reference": m.get("trained_is_linear_reference"),
        "cnn_logit_share": m.get("cnn_logit_share"),
        "quality_gate": _gate(m, metrics_path),
    }
    return row


def _gate(metrics: dict, path: Path) -> str:
    """The workflow's quality gate on these metrics, with its default settings."""
    from neuroexplain.errors import InputError
    from neuroexplain.evaluate.quality import check_classifier_quality
    from neuroexplain.settings import QualityConfig

    cfg = QualityConfig()
    try:
        check_classifier_quality(
            metrics,
            cfg.min_auc,
            source=path,
            allow_linear_reference=cfg.allow_linear_reference,
        )
    except InputError as exc:
        return "stops: linear reference" if "linear reference itself" in str(exc) else "stops"
    return "passes"


def _planted_regions(spec: dict) -> list[tuple[str, str, int]]:
    """``(name, labels, expected sign)`` of every planted label (shrink -1, enlarge +1), or of
    the ``expected`` regions of a cohort without a planted effect (the age task)."""
    c = spec.get("cohort") or {}
    if not c:
        return [
            (r["name"], ",".join(str(int(v)) for v in r["labels"]), int(r["sign"]))
            for r in spec.get("expected", [])
        ]
    return [(f"shrink{lab}", str(int(lab)), -1) for lab in c.get("shrink", [])] + [
        (f"enlarge{lab}", str(int(lab)), 1) for lab in c.get("enlarge", [])
    ]


def _score_maps(common: list[str], model: str, split: str, out: Path, cohort: Path) -> dict:
    """A gradient baseline and both maps scored against the cohort's ground truth."""
    maps, sal, evaluation = out / "simulator", out / "saliency", out / "evaluation" / "maps"
    if not (sal / "saliency.json").exists() and not any(sal.glob("sub-*")):
        _run(
            ["saliency", *common, "--checkpoint", model, "--split", split, "--out", str(sal),
             "--subjects", "test", "--methods", "gradient"],
            out / "saliency.log",
        )  # fmt: skip
    if not evaluation.with_suffix(".json").exists():
        template = str(maps / "{subject}" / "{subject}_desc-simulator_logjacobian.nii.gz")
        _run(
            ["evaluate-maps", "--cohort", str(cohort), "--maps", f"simulator={template}",
             "--maps", f"gradient={sal}", "--subjects", split, "--split-name", "test",
             "--out", str(evaluation)],
            out / "evaluate.log",
        )  # fmt: skip
    return json.loads(evaluation.with_suffix(".json").read_text())["methods"]


def explain(
    preproc: Path,
    clf_dir: Path,
    cohort: Path,
    spec: dict,
    out: Path,
    threads: int,
    overrides: list[str] | None = None,
) -> dict:
    """Simulator stage (default settings) on the test split; with a planted effect a gradient
    baseline too, both scored against the cohort's ground truth (without one, the age task:
    flip rates and the expected regions' mean log-Jacobian only); returns the simulator's
    result row."""
    import pandas as pd
    import torch

    sim_model = out / "simulator_model" / "model.pt"
    maps = out / "simulator"
    regions = _planted_regions(spec)
    region_args = [a for name, lab, _ in regions for a in ("--regions", f"{name}={lab}")]
    common = ["--preproc", str(preproc), "--threads", str(threads)]
    split = str(clf_dir / "split.tsv")
    model = str(clf_dir / "model.pt")
    t0 = time.perf_counter()
    if not sim_model.exists():
        _run(
            ["train-simulator", *common, "--classifier", model, "--logits",
             str(clf_dir / "logits.tsv"), "--split", split, "--out", str(sim_model),
             *_flags(overrides or [])],
            out / "train_simulator.log",
        )  # fmt: skip
    train_s = time.perf_counter() - t0
    if not (maps / "simulate.json").exists():
        _run(
            ["simulate", *common, "--simulator", str(sim_model), "--classifier", model,
             "--split", split, "--out", str(maps), "--subjects", "test", "--no-images",
             *region_args],
            out / "simulate.log",
        )  # fmt: skip
    ev = _score_maps(common, model, split, out, cohort) if "cohort" in spec else {}
    ckpt = torch.load(sim_model, weights_only=True)
    objective = (ckpt.get("summary") or {}).get("objective", {})
    sim = json.loads((maps / "simulate.json").read_text())
    group = pd.DataFrame(sim.get("group", []))
    region_rows = []
    for name, _, sign in regions:
        sel = group
        if len(group):
            sel = group[
                (group["region"] == name)
                & (group["map"] == "simulator")
                & (group["group"] == "all")
            ]
        row = sel.iloc[0].to_dict() if len(sel) else {}
        mean = row.get("mean")
        region_rows.append(
            {
                "region": name,
                "expected_sign": sign,
                "mean_logjacobian": mean,
                "p": row.get("p"),
                "right_sign": None if mean is None else bool(np.sign(mean) == sign),
            }
        )
    return {
        "train_seconds": round(train_s, 1),
        "objective": objective,
        "flip_rate": sim.get("flip_rate"),
        "gradient_agreement": (sim.get("gradient_agreement") or {}).get("mean"),
        "ncc_abs": {m: v["ncc_abs"]["mean"] for m, v in ev.items()},
        "ncc_signed": {m: v["ncc_signed"]["mean"] for m, v in ev.items()},
        "regions": region_rows,
    }


def _fmt(v: float | None, digits: int) -> str:
    """A table cell: ``–`` for a missing value."""
    return "–" if v is None else f"{v:.{digits}f}"


def _sim_table(results: dict) -> str:
    lines = [
        "| cohort | seed | objective met on (kept pass / passes) | train flip inj / rem "
        "| val flip inj / rem | test flip inj / rem | NCC simulator | NCC gradient | signed NCC "
        "| gradient agreement | regions right sign |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def f(v: float | None) -> str:
        return _fmt(v, 2)

    for name, res in results.items():
        for r in res.get("runs", []):
            s = r.get("simulator")
            if not s:
                continue
            o, fr = s.get("objective", {}), s.get("flip_rate") or {}
            v, kept = o.get("validation") or {}, (o.get("selected") or {}).get("pass")
            right = [x["right_sign"] for x in s["regions"]]
            lines.append(
                f"| {name} | {r['seed']} | {o.get('met')} {o.get('measured_on', 'train')} "
                f"({kept} / {o.get('epochs')}) | "
                f"{f(o.get('flipped_inject'))} / {f(o.get('flipped_remove'))} | "
                f"{f(v.get('flipped_inject'))} / {f(v.get('flipped_remove'))} | "
                f"{f(fr.get('inject'))} / {f(fr.get('remove'))} | "
                f"{f(s['ncc_abs'].get('simulator'))} | {f(s['ncc_abs'].get('gradient'))} | "
                f"{f(s['ncc_signed'].get('simulator'))} | {f(s.get('gradient_agreement'))} | "
                f"{sum(bool(x) for x in right)} of "
                f"{len(right)} |"
            )
    return "\n".join(lines) + "\n"


def _table(results: dict) -> str:
    lines = [
        "| cohort | seed | CNN val AUC | CNN test AUC | reference val AUC | reference test AUC "
        "| best / run epochs | s | quality gate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def f(v: float | None) -> str:
        return _fmt(v, 3)

    for name, res in results.items():
        for r in res.get("runs", []):
            lines.append(
                f"| {name} | {r['seed']} | {f(r['cnn_val_auc'])} | {f(r['cnn_test_auc'])} | "
                f"{f(r['reference_val_auc'])} | {f(r['reference_test_auc'])} | "
                f"{r['best_epoch']} / {r['epochs_run']} | {r['train_seconds']:.0f} | "
                f"{r.get('quality_gate', 'n/a')} |"
            )
        if "error" in res:
            lines.append(f"| {name} | – | error: {res['error']} | | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohorts", nargs="*", help="cohort names (default: every file)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--shape", type=int, default=64, help="model grid (cube) in voxels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="train-classifier overrides, e.g. epochs=20 (default: none)")  # fmt: skip
    ap.add_argument("--ixi", type=Path, default=ROOT.parent / "shared" / "data" / "ixi")
    ap.add_argument("--work", type=Path, default=ROOT / "results" / "robustness")
    ap.add_argument("--tag", default="", help="suffix of the run folders and the result file")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--sim-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="train-simulator overrides, e.g. hinge=flip objective=0",
    )
    ap.add_argument("--sim-tag", default="", help="suffix of the simulator run folders")
    ap.add_argument("--simulator", action="store_true",
                    help="also train the simulator (defaults) and score its maps and a gradient "
                    "baseline against the ground truth (synthetic cohorts)")  # fmt: skip
    args = ap.parse_args(argv)

    from neuroexplain.provenance import provenance

    names = args.cohorts or sorted(p.stem for p in COHORTS.glob("*.yaml"))
    tag = f"_{args.tag}" if args.tag else ""
    out = args.out or ROOT / "benchmarks" / "results" / f"robustness{tag}.json"
    results: dict[str, dict] = {}
    for name in names:
        spec = yaml.safe_load((COHORTS / f"{name}.yaml").read_text())
        res: dict = {"description": spec.get("description", ""), "runs": []}
        results[name] = res
        try:
            preproc = prepare(name, spec, args.work, args.ixi, args.shape)
            for seed in args.seeds:
                run_dir = args.work / name / f"classifier_{args.shape}{tag}_seed{seed}"
                res["runs"].append(train(preproc, run_dir, seed, args.set, args.threads))
                print(f"{name} seed {seed}: {res['runs'][-1]}", flush=True)
                if args.simulator and ("cohort" in spec or "expected" in spec):
                    auc = res["runs"][-1]["cnn_test_auc"] or 0.0
                    if auc < 0.7:
                        res["runs"][-1]["simulator"] = None
                        print(f"{name} seed {seed}: classifier below the gate", flush=True)
                        continue
                    res["runs"][-1]["simulator"] = explain(
                        preproc, run_dir, args.work / name / "cohort", spec,
                        run_dir / f"explain{'_' + args.sim_tag if args.sim_tag else ''}",
                        args.threads, args.sim_set,
                    )  # fmt: skip
                    print(f"{name} seed {seed}: {res['runs'][-1]['simulator']}", flush=True)
        except RuntimeError as exc:
            res["error"] = str(exc)
            print(f"{name}: {exc}", file=sys.stderr, flush=True)
        doc = {
            "name": "robustness",
            "shape": args.shape,
            "overrides": args.set,
            "cohorts": results,
            "machine": platform.platform(),
            "provenance": provenance(
                {"cohorts": names, "seeds": args.seeds, "shape": args.shape, "set": args.set},
                seed=args.seeds[0] if args.seeds else 0,
                command="bench_robustness",
            ),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        md = _table(results)
        if args.simulator:
            md += "\n" + _sim_table(results)
        out.with_suffix(".md").write_text(md)
    print(_table(results))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
