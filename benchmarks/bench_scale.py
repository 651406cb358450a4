"""Benchmark: ingest + simulator disease maps for 100, 300 and 1,000 subjects (issue 22).

The cohort of ``N`` subjects replicates the demo's IXI subjects (``--source``, default
``../shared/data/ixi``): a sample sheet (``subject, t1, dseg, label, group``) whose rows point at
the source T1w and dseg files, cycling through them (row ``k`` is source subject ``k mod n``; no
image is copied). The labels are the source's ``mri.label_column`` (``diagnosis`` of a planted
cohort) when it has one, else control / disease alternately (they only choose the direction of
each subject's disease map).

For each ``N`` two steps run as the workflow runs them (``workflow/rules/ingest.smk``,
``simulator.smk``, options from ``config/config.yaml`` as ``common.smk`` builds them), each its
own process on ``--threads`` cores (default 2):

* ``neuroexplain ingest-mri --sheet ... --workers THREADS`` (the model grid, ``preproc.pt``);
* ``neuroexplain simulate --subjects all --threads THREADS`` (native-space log-Jacobian disease
  maps and region tables of every subject; ``--images`` also writes the simulated T1w images and
  displacement fields, as the demo does).

Per step: wall seconds (imports included: a workflow job pays them too), seconds per subject,
the peak RSS of its largest process (``VmHWM``) and of its whole process tree (the sum over the
processes; both sampled every 0.2 s with psutil; forked ingest workers share pages, so the sum
over-counts), and the size of ``preproc.pt``. Across sizes: a least-squares fit
``seconds = a + b * N`` per step, the seconds per subject at each size and between consecutive
sizes (the marginal cost), and the worst ratio of each; the same fit of the peak RSS, whose slope
(MB per subject) is compared with ``preproc.pt``'s MB per subject (memory that grows faster
than the data means something is held twice).

The classifier and simulator only need to exist (the benchmark measures inference and map cost,
not quality): without ``--classifier`` / ``--simulator`` tiny ones are trained first, in this
process, on ``--train-subjects`` replicated subjects (one classifier epoch, two simulator steps;
the workflow's architectures). The baseline saliency maps (``neuroexplain saliency``, the
workflow's methods and options) run once on ``--saliency-subjects`` subjects; their seconds per
subject per method come from ``saliency.json`` (the maps' compute; writing them is in the step's
wall time).

Target (issue 22): 1,000 subjects through ingest + simulator disease maps <= 20 min on 2 cores.

Usage:
    python benchmarks/bench_scale.py [--sizes 100 300 1000] [--threads 2] [--shape 64]
        [--classifier model.pt --simulator model.pt] [--images] [--keep DIR]

Writes ``benchmarks/results/scale.json`` and ``scale.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEUROEXPLAIN_SHARED_DATA", REPO.parent / "shared" / "data"))
TARGET_N = 1000
TARGET_SECONDS = 20 * 60
STEPS = ("ingest", "simulate")
#: a marginal cost per subject that grows by more than this between sizes is not linear growth
LINEAR_TOLERANCE = 1.25


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("neuroexplain")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "neuroexplain"]


def _hwm_bytes(proc) -> int:
    """Peak resident memory of one process so far: ``VmHWM`` (Linux), else its current RSS."""
    try:
        with open(f"/proc/{proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return proc.memory_info().rss


def _sample(proc) -> tuple[int, int]:
    """(largest peak RSS of one process, summed current RSS) over ``proc`` and its children."""
    import psutil

    largest = total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for p in procs:
        try:
            largest = max(largest, _hwm_bytes(p))
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return largest, total


def run_step(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``cmd``: wall seconds, peak RSS of its largest process and of its process tree (MiB).

    Both are sampled every 0.2 s (``VmHWM`` of each process, the sum of the current RSS over the
    tree): ``os.wait4``'s ``ru_maxrss`` would do for the first, but Linux carries the parent's
    peak over into the child (this process holds torch and the tiny training, ~0.5 GB).
    """
    import psutil

    start = time.perf_counter()
    peak = [0, 0]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            try:
                ps = psutil.Process(proc.pid)
            except psutil.Error:
                return
            while not done.is_set():
                largest, total = _sample(ps)
                peak[0], peak[1] = max(peak[0], largest), max(peak[1], total)
                done.wait(0.2)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        _, status, _ = os.wait4(proc.pid, 0)
        done.set()
        thread.join()
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(peak[0] / 2**20, 1),
        "peak_tree_rss_mb": round(max(peak) / 2**20, 1),
    }


# --------------------------------------------------------------------------- inputs


def workflow_options(shape: int) -> dict:
    """The workflow's options of the steps measured (``config/config.yaml``, as common.smk)."""
    import yaml

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    mri, sim, sal = cfg["mri"], cfg["simulator"], cfg["saliency"]

    def pairs(*items: tuple[str, object]) -> list[str]:
        return [a for opt, v in items if v not in (None, "") for a in (opt, str(v))]

    ingest = pairs(
        ("--positive-class", mri["positive_class"] or None),
        ("--shape", shape),
        ("--fov-mm", mri["fov_mm"]),
        ("--norm", mri["norm"]),
        ("--fg-threshold", mri["fg_threshold"]),
        ("--align", mri["align"]),  # a sheet with dseg: as the workflow with mri.sheet
        ("--mask", mri["mask"]),
        ("--mask-margin-mm", mri["mask_margin_mm"]),
    )
    regions = [
        a
        for name, labels in mri["regions"].items()
        for a in ("--regions", f"{name}={','.join(str(v) for v in labels)}")
    ]
    simulate = [*regions, *pairs(("--map-direction", sim["map_direction"]))]
    saliency = pairs(
        ("--methods", ",".join(sal["methods"])),
        ("--layer", sal["layer"] or None),
        ("--ig-steps", sal["ig_steps"]),
        ("--smoothgrad-samples", sal["smoothgrad_samples"]),
        ("--occlusion-mask", sal["occlusion_mask"]),
        ("--occlusion-overlap", sal["occlusion_overlap"]),
        ("--seed", cfg["seed"]),
    )
    return {
        "ingest": ingest,
        "simulate": simulate,
        "saliency": saliency,
        "methods": list(sal["methods"]),
        "label_column": mri["label_column"] or None,
        "positive_class": mri["positive_class"] or "disease",
        "derivatives": mri["derivatives"],
        "classifier_arch": cfg["classifier"]["arch"],
        "simulator_net": {
            "channels": tuple(sim["channels"]),
            "num_experts": sim["experts"],
            "downsample": sim["downsample"],
            "diffeomorphic": sim["diffeomorphic"],
        },
        "seed": cfg["seed"],
    }


def source_subjects(
    bids: Path, derivatives: str, label_column: str | None, positive: str
) -> list[dict[str, str]]:
    """The source subjects (id, T1w, dseg, label) of a BIDS root, read as ingest-mri reads it."""
    from neuroexplain.mri.bids import find_bids_subjects

    with (bids / "participants.tsv").open() as fh:
        columns = next(csv.reader(fh, delimiter="\t"))
    column = label_column if label_column in columns else None
    cohort = find_bids_subjects(bids, derivatives=derivatives, label_column=column)
    rows = []
    for k, r in enumerate(cohort.records):
        if r.dseg is None:
            raise SystemExit(f"{r.subject} has no dseg under {bids}/derivatives/{derivatives}")
        label = str(r.label) if column else (positive if k % 2 else "control")
        rows.append({"source": r.subject, "t1": str(r.t1), "dseg": str(r.dseg), "label": label})
    if not rows:
        raise SystemExit(f"no subjects in {bids}")
    return rows


def write_sheet(path: Path, sources: Sequence[dict[str, str]], n: int) -> Path:
    """A sample sheet of ``n`` subjects, row ``k`` pointing at source subject ``k mod len``."""
    width = max(5, len(str(n)))
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["subject", "t1", "dseg", "label", "group"])
        for k in range(n):
            s = sources[k % len(sources)]
            w.writerow([f"rep{k:0{width}d}", s["t1"], s["dseg"], s["label"], s["source"]])
    return path


# --------------------------------------------------------------------------- setup


def train_tiny(work: Path, sheet: Path, opts: dict, shape: int, threads: int) -> dict:
    """Ingest the setup subjects and train a tiny classifier and simulator, in this process."""
    import torch

    from neuroexplain.classifier import train_classifier
    from neuroexplain.mri.ingest import ingest_mri
    from neuroexplain.settings import ClassifierConfig, SimulatorConfig, SimulatorTrainConfig
    from neuroexplain.simulator import run_train_simulator

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ingest_mri(
        work / "ingest",
        sheet=sheet,
        positive_class=opts["positive_class"],
        shape=(shape,) * 3,
        workers=threads,
        progress=False,
    )
    ingest_s = time.perf_counter() - t0
    clf_dir = work / "classifier"
    t0 = time.perf_counter()
    train_classifier(
        work / "ingest" / "preproc.pt",
        clf_dir,
        ClassifierConfig(
            arch=opts["classifier_arch"],
            epochs=1,
            batch_size=4,
            patience=0,
            val_fraction=0.25,
            test_fraction=0.25,
            reference_fallback=False,
            seed=opts["seed"],
        ),
        progress=False,
        resume=False,
    )
    clf_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_train_simulator(
        work / "ingest" / "preproc.pt",
        clf_dir / "model.pt",
        clf_dir / "logits.tsv",
        work / "simulator" / "model.pt",
        config=SimulatorTrainConfig(
            epochs=1, max_epochs=1, objective=0.0, max_steps=2, batch_size=2, seed=opts["seed"]
        ),
        net_config=SimulatorConfig(**opts["simulator_net"]),
        correct_only=False,
        resume=False,
        progress=False,
    )
    sim_s = time.perf_counter() - t0
    return {
        "classifier": str(clf_dir / "model.pt"),
        "simulator": str(work / "simulator" / "model.pt"),
        "trained": True,
        "seconds": {
            "ingest": round(ingest_s, 2),
            "train_classifier": round(clf_s, 2),
            "train_simulator": round(sim_s, 2),
        },
    }


# --------------------------------------------------------------------------- analysis


def linear_fit(sizes: Sequence[int], values: Sequence[float]) -> dict[str, float | None]:
    """Least-squares ``value = a + b * N``; ``r2`` is ``None`` with fewer than three sizes."""
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(values) / n
    sxx = sum((x - mx) ** 2 for x in sizes)
    if sxx == 0:
        return {"a": None, "b": None, "r2": None}
    b = sum((x - mx) * (y - my) for x, y in zip(sizes, values, strict=True)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(sizes, values, strict=True))
    ss_tot = sum((y - my) ** 2 for y in values)
    r2 = (1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0) if n >= 3 else None
    return {"a": a, "b": b, "r2": r2}


def is_linear(marginal: Sequence[float], tolerance: float = LINEAR_TOLERANCE) -> bool:
    """Whether the marginal cost per subject stays positive and grows by at most ``tolerance``
    (a factor) from one interval of sizes to the next (a cost that falls is still linear)."""
    return all(m > 0 for m in marginal) and all(
        b <= a * tolerance for a, b in itertools.pairwise(marginal)
    )


def growth(sizes: Sequence[int], seconds: Sequence[float]) -> dict:
    """Per-subject and marginal costs across sizes, the fit and the linear-growth verdict.

    ``worst_per_subject_ratio``: max / min over sizes of ``seconds / N`` (a fixed start-up cost
    makes the small sizes dearer per subject). ``worst_marginal_ratio``: max / min of the cost of
    the subjects added between consecutive sizes, ``(t_j - t_i) / (N_j - N_i)``; linear growth
    keeps it near 1, a cost per subject that grows with ``N`` (e.g. quadratic work) raises it.
    ``linear``: :func:`is_linear` of the marginal costs.
    """
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    xs = [sizes[i] for i in order]
    ys = [seconds[i] for i in order]
    per = [y / x for x, y in zip(xs, ys, strict=True)]
    marginal = [
        (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1) if xs[i + 1] > xs[i]
    ]
    fit = linear_fit(xs, ys)
    worst_marg = max(marginal) / min(marginal) if marginal and min(marginal) > 0 else None
    return {
        "sizes": xs,
        "seconds": ys,
        "seconds_per_subject": [round(v, 4) for v in per],
        "worst_per_subject_ratio": round(max(per) / min(per), 3),
        "marginal_seconds_per_subject": [round(v, 4) for v in marginal],
        "worst_marginal_ratio": None if worst_marg is None else round(worst_marg, 3),
        "fit": {k: None if v is None else round(v, 4) for k, v in fit.items()},
        "linear": None if not marginal else is_linear(marginal),
    }


# --------------------------------------------------------------------------- runs


def run_saliency(
    work: Path, ckpt: dict, opts: dict, n: int, threads: int, env: dict[str, str]
) -> dict:
    """The baseline maps of the first ``n`` setup subjects: seconds per subject per method."""
    from neuroexplain.mri.ingest import load_preproc

    pre = work / "ingest" / "preproc.pt"
    ids = [str(s) for s in load_preproc(pre)["subjects"]][:n]
    out = work / "saliency"
    step = run_step(
        [*_cli(), "saliency", "--preproc", str(pre), "--checkpoint", ckpt["classifier"],
         "--out", str(out), "--subjects", ",".join(ids), "--threads", str(threads),
         "--device", "cpu", *opts["saliency"]],
        env, work / "saliency.log",
    )  # fmt: skip
    summary = json.loads((out / "saliency.json").read_text())
    per = summary["seconds_per_subject"]
    return {
        "n_subjects": len(ids),
        "methods": list(per),
        "seconds_per_subject": per,
        "all_methods_seconds_per_subject": round(sum(per.values()), 3),
        "n_maps": sum(len(v) for v in summary["maps"].values()),
        "step": step,
    }


def run_size(
    n: int, work: Path, sources: list, ckpt: dict, opts: dict, args, env: dict[str, str]
) -> dict:
    sheet = write_sheet(work / "sheet.tsv", sources, n)
    cli = _cli()
    ingest = run_step(
        [*cli, "ingest-mri", "--sheet", str(sheet), "--out", str(work / "ingest"),
         *opts["ingest"], "--workers", str(args.threads)],
        env, work / "ingest.log",
    )  # fmt: skip
    pre = work / "ingest" / "preproc.pt"
    preproc_mb = pre.stat().st_size / 2**20
    simulate = run_step(
        [*cli, "simulate", "--preproc", str(pre), "--simulator", ckpt["simulator"],
         "--classifier", ckpt["classifier"], "--out", str(work / "simulate"),
         "--subjects", "all", *opts["simulate"],
         "--images" if args.images else "--no-images",
         "--device", "cpu", "--threads", str(args.threads)],
        env, work / "simulate.log",
    )  # fmt: skip
    summary = json.loads((work / "simulate" / "simulate.json").read_text())
    with (work / "simulate" / "regions.tsv").open() as fh:
        region_rows = sum(1 for _ in fh) - 1
    manifest = json.loads((work / "simulate" / "maps.json").read_text())
    n_maps = sum(len(m["files"]) for m in manifest["methods"])
    files = [p for p in (work / "simulate").rglob("*") if p.is_file()]
    steps = {"ingest": ingest, "simulate": simulate}
    total = sum(s["seconds"] for s in steps.values())
    return {
        "n_subjects": n,
        "steps": steps,
        "seconds_per_subject": {k: round(s["seconds"] / n, 4) for k, s in steps.items()},
        "total_seconds": round(total, 2),
        "total_seconds_per_subject": round(total / n, 4),
        "preproc_pt_mb": round(preproc_mb, 2),
        "n_simulated": summary["n_subjects"],
        "n_maps": n_maps,
        "region_rows": region_rows,
        "output_files": len(files),
        "output_mb": round(sum(p.stat().st_size for p in files) / 2**20, 1),
        "meets_target": (total <= TARGET_SECONDS) if n == TARGET_N else None,
    }


def _markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Ingest + simulator disease maps at scale ({result['params']['shape']}³, "
        f"{result['params']['threads']} core(s) of {m['cpu_count']}; load "
        f"{m['loadavg_1min_before']:.1f} -> {m['loadavg_1min_after']:.1f})",
        "",
        "| subjects | ingest s | ingest s/subject | simulate s | simulate s/subject | total s "
        "| total s/subject | preproc.pt MB | ingest peak RSS MB | simulate peak RSS MB "
        "| meets target |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["runs"]:
        s = r["steps"]
        target = {None: "", True: "yes", False: "no"}[r["meets_target"]]
        lines.append(
            f"| {r['n_subjects']} | {s['ingest']['seconds']:.1f} "
            f"| {r['seconds_per_subject']['ingest']:.3f} | {s['simulate']['seconds']:.1f} "
            f"| {r['seconds_per_subject']['simulate']:.3f} | {r['total_seconds']:.1f} "
            f"| {r['total_seconds_per_subject']:.3f} | {r['preproc_pt_mb']:.1f} "
            f"| {s['ingest']['peak_rss_mb']:.0f} | {s['simulate']['peak_rss_mb']:.0f} | {target} |"
        )
    lines += ["", "Growth (fit seconds = a + b·N; marginal = cost of the subjects added):", ""]
    lines += [
        "| step | a (s) | b (s/subject) | worst s/subject ratio | worst marginal ratio "
        "| linear | RSS MB/subject | preproc.pt MB/subject |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for step, g in result["growth"].items():
        fit = g["fit"]
        rss = result["memory"].get(step, {})
        lines.append(
            f"| {step} | {_num(fit['a'], 1)} | {_num(fit['b'], 3)} "
            f"| {g['worst_per_subject_ratio']} | {_num(g['worst_marginal_ratio'], 2)} "
            f"| {g['linear']} | {_num(rss.get('rss_mb_per_subject'), 2)} "
            f"| {_num(result['memory'].get('preproc_pt_mb_per_subject'), 2)} |"
        )
    ex = result["extrapolated_seconds"]
    lines += [
        "",
        f"Extrapolated to {TARGET_N} subjects (fit): ingest {_num(ex['ingest'], 0)} s, simulate "
        f"{_num(ex['simulate'], 0)} s, total {_num(ex['total'], 0)} s (target "
        f"{TARGET_SECONDS} s).",
        "",
        f"Baseline saliency maps (classifier logit, {result['saliency']['n_subjects']} subjects, "
        "compute only), seconds per subject:",
        "",
        "| " + " | ".join(result["saliency"]["methods"]) + " | all |",
        "|" + "---:|" * (len(result["saliency"]["methods"]) + 1),
        "| "
        + " | ".join(f"{v:.3f}" for v in result["saliency"]["seconds_per_subject"].values())
        + f" | {result['saliency']['all_methods_seconds_per_subject']:.3f} |",
        "",
        f"Setup: {result['setup']['note']}.",
        "",
    ]
    return "\n".join(lines)


def _num(v, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--threads", type=int, default=2, help="ingest workers / torch threads")
    parser.add_argument("--shape", type=int, default=64, help="cube side of the model grid")
    parser.add_argument("--source", type=Path, default=SHARED / "ixi", help="BIDS root replicated")
    parser.add_argument("--classifier", type=Path, help="model.pt to reuse (with --simulator)")
    parser.add_argument("--simulator", type=Path, help="model.pt trained against --classifier")
    parser.add_argument("--train-subjects", type=int, default=8, help="setup subjects")
    parser.add_argument("--saliency-subjects", type=int, default=4)
    parser.add_argument(
        "--images",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="simulate also writes simulated T1w images and displacement fields",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--keep", type=Path, default=None, help="keep the work folders here")
    args = parser.parse_args(argv)
    if (args.classifier is None) != (args.simulator is None):
        parser.error("--classifier and --simulator go together (the simulator is trained on it)")
    if min(args.sizes) < 2 or args.threads < 1:
        parser.error("--sizes of at least 2 (both classes) and a positive --threads, please")
    if not (args.source / "participants.tsv").is_file():
        print(f"error: no BIDS dataset at {args.source}", file=sys.stderr)
        return 1

    from neuroexplain.io.atomic import write_json
    from neuroexplain.provenance import provenance

    opts = workflow_options(args.shape)
    sources = source_subjects(
        args.source, opts["derivatives"], opts["label_column"], opts["positive_class"]
    )
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        # the jobs call `neuroexplain`: the one installed beside this Python
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    load_before = os.getloadavg()[0]
    tmp_root = tempfile.TemporaryDirectory(prefix="bench_scale_")
    root = args.keep or Path(tmp_root.name)
    root.mkdir(parents=True, exist_ok=True)
    try:
        setup_dir = root / "setup"
        setup_dir.mkdir(exist_ok=True)
        n_setup = max(args.saliency_subjects, args.train_subjects if not args.classifier else 0)
        sheet = write_sheet(setup_dir / "sheet.tsv", sources, n_setup)
        if args.classifier is None:
            ckpt = train_tiny(setup_dir, sheet, opts, args.shape, args.threads)
            note = (
                f"tiny classifier ({opts['classifier_arch']}, 1 epoch) and simulator (2 steps) "
                f"trained on {n_setup} replicated subjects"
            )
        else:
            from neuroexplain.mri.ingest import ingest_mri

            ingest_mri(
                setup_dir / "ingest",
                sheet=sheet,
                positive_class=opts["positive_class"],
                shape=(args.shape,) * 3,
                workers=args.threads,
                progress=False,
            )
            ckpt = {
                "classifier": str(args.classifier.resolve()),
                "simulator": str(args.simulator.resolve()),
                "trained": False,
            }
            note = f"classifier {args.classifier}, simulator {args.simulator}"
        saliency = run_saliency(setup_dir, ckpt, opts, args.saliency_subjects, args.threads, env)
        print(json.dumps({"saliency_seconds_per_subject": saliency["seconds_per_subject"]}))
        runs = []
        for n in sorted(set(args.sizes)):
            work = root / f"n{n}"
            work.mkdir(exist_ok=True)
            run = run_size(n, work, sources, ckpt, opts, args, env)
            runs.append(run)
            print(json.dumps({k: run[k] for k in ("n_subjects", "steps", "total_seconds")}))
            if args.keep is None:  # the maps of 1,000 subjects fill the disk otherwise
                import shutil

                shutil.rmtree(work, ignore_errors=True)
    finally:
        tmp_root.cleanup()

    sizes = [r["n_subjects"] for r in runs]
    grow = {s: growth(sizes, [r["steps"][s]["seconds"] for r in runs]) for s in STEPS}
    grow["total"] = growth(sizes, [r["total_seconds"] for r in runs])
    memory: dict = {}
    if len(sizes) >= 2:
        preproc_fit = linear_fit(sizes, [r["preproc_pt_mb"] for r in runs])
        memory["preproc_pt_mb_per_subject"] = preproc_fit["b"]
        for s in STEPS:
            fit = linear_fit(sizes, [r["steps"][s]["peak_rss_mb"] for r in runs])
            tree = linear_fit(sizes, [r["steps"][s]["peak_tree_rss_mb"] for r in runs])
            memory[s] = {
                "rss_mb_per_subject": fit["b"],
                "rss_mb_fixed": fit["a"],
                "tree_rss_mb_per_subject": tree["b"],
            }
    extrapolated = {
        s: (None if g["fit"]["b"] is None else g["fit"]["a"] + g["fit"]["b"] * TARGET_N)
        for s, g in grow.items()
    }
    target_run = next((r for r in runs if r["n_subjects"] == TARGET_N), None)
    result = {
        "name": "scale",
        "data": f"{len(sources)} subjects of {args.source} replicated (sample sheet, no copies)",
        "params": {
            "sizes": sizes,
            "threads": args.threads,
            "shape": args.shape,
            "images": args.images,
            "ingest_args": opts["ingest"],
            "simulate_args": opts["simulate"],
            "saliency_args": opts["saliency"],
            "source": str(args.source),
        },
        "setup": {**ckpt, "note": note},
        "saliency": saliency,
        "runs": runs,
        "growth": grow,
        "memory": memory,
        "extrapolated_seconds": {
            k: None if v is None else round(v, 1) for k, v in extrapolated.items()
        },
        "target": {"n_subjects": TARGET_N, "seconds": TARGET_SECONDS},
        "meets_target": None if target_run is None else target_run["meets_target"],
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "loadavg_1min_before": load_before,
            "loadavg_1min_after": os.getloadavg()[0],
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "provenance": provenance(
            {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            seed=opts["seed"],
            command="bench_scale",
        ),
    }
    write_json(result, args.out)
    md = _markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
