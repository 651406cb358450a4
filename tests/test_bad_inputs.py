"""Bad-input corpus: every stage, broken inputs made here, each run through the real CLI.

Each case builds one broken input in ``tmp_path`` (no committed binaries) and runs the
``neuroexplain`` entry point (:func:`neuroexplain.cli.main`, in-process for speed; a few cases as
a real subprocess to prove the exit code and that no traceback reaches the user). A case passes
when the run

* exits non-zero (2 for a user error),
* prints exactly ONE ``error:`` line, the last line of stderr, naming the file (or option /
  config key) and the problem,
* prints no traceback, and
* leaves no partial output: the listing of every folder the case watches (its whole
  ``tmp_path`` and the shared toy pipeline) is the same before and after, temporary files
  included.

``test_corpus_summary`` (last in the module) prints ``bad-input corpus: N cases, N clear
errors, 0 tracebacks, 0 partial outputs`` in pytest's terminal summary and asserts the last two.
The existing per-stage bad-input tests (``test_ingest_mri.py``, ``test_ingest_st.py``,
``test_cohort.py``, ...) stay where they are; this corpus covers the same ground on synthetic data
through the CLI, plus checkpoints, layers, config (duplicate keys, YAML syntax), resource limits,
doubtful inputs that would otherwise pass silently (a reference subject that empties the cohort,
labels or genes that differ only by case, region labels that no subject has, a label column of
too many concepts), output paths of the wrong kind and a full disk (training commands included).
Doubtful inputs that are legitimate (sform and qform that disagree, no orientation codes, a region
label some subjects lack) run on with a warning naming the file; tests after the corpus.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from _fulldisk import fill_disk
from conftest import SUMMARY_LINES

from neuroexplain.cli import main

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from neuroexplain.cli import main; sys.exit(main())"]

# ------------------------------------------------------------------------------ the harness


@dataclass
class Case:
    """One broken input and what the user must be told.

    Attributes:
        argv: the ``neuroexplain`` arguments (or the whole command for ``runner="snakemake"``).
        names: the error must name one of these (file name, path, option or config key).
        problem: regular expression the error line must match (the problem, in words).
        watch: folders whose listing must not change (the case's ``tmp_path`` is always added).
        env: extra environment variables.
        canary: a file that must NOT exist afterwards (a tampered pickle's payload target).
        runner: ``"inprocess"`` (``main(argv)``), ``"subprocess"`` (a real process) or
            ``"snakemake"`` (a dry run of the workflow against the config schema).
        setup: called with pytest's ``monkeypatch`` just before an in-process run (e.g. to
            simulate a full disk with :func:`_fulldisk.fill_disk`).
    """

    argv: list[str]
    names: tuple[str, ...]
    problem: str
    watch: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    canary: Path | None = None
    runner: str = "inprocess"
    setup: Callable[[pytest.MonkeyPatch], object] | None = None


@dataclass
class Outcome:
    code: int
    error_lines: list[str]
    last_line: str
    traceback: bool
    new_paths: list[str]
    canary_created: bool

    def clear(self, case: Case) -> bool:
        if self.code == 0 or len(self.error_lines) != 1 or self.traceback:
            return False
        line = self.error_lines[0]
        return (
            line == self.last_line.strip()
            and any(n in line for n in case.names)
            and re.search(case.problem, line, re.IGNORECASE) is not None
        )


#: case name -> outcome summary, filled by test_case, read by test_corpus_summary
RESULTS: dict[str, dict[str, bool]] = {}
CASES: dict[str, Callable[[Path, Kit], Case]] = {}


def case(name: str):
    def register(fn: Callable[[Path, Kit], Case]) -> Callable[[Path, Kit], Case]:
        assert name not in CASES, name
        CASES[name] = fn
        return fn

    return register


def _listing(roots: list[Path]) -> set[str]:
    """Every path under ``roots`` (hidden temporary files too), with file sizes."""
    out = set()
    for root in roots:
        if not root.exists():
            continue
        for p in root.rglob("*"):
            out.add(f"{p}{'/' if p.is_dir() else ''} {p.stat().st_size if p.is_file() else ''}")
    return out


def _error_lines(text: str) -> list[str]:
    # "error: ..." from neuroexplain, "Error: ..." from click's usage errors
    return [ln for ln in text.splitlines() if re.match(r"^error:", ln.strip(), re.IGNORECASE)]


def run_case(c: Case, tmp: Path, capsys, monkeypatch) -> Outcome:
    watch = [tmp, *c.watch]
    if c.runner == "snakemake":
        # the Slurm executor plugin runs `scontrol show config` when snakemake is imported,
        # which waits 10 s for a controller where the Slurm client is installed but no cluster
        # runs; a stand-in that fails at once makes the plugin skip it (made before the listing)
        fake = tmp / "fakebin" / "scontrol"
        fake.parent.mkdir(exist_ok=True)
        fake.write_text("#!/bin/sh\nexit 1\n")
        fake.chmod(0o755)
    before = _listing(watch)
    if c.runner == "inprocess":
        for k, v in c.env.items():
            monkeypatch.setenv(k, v)
        if c.setup is not None:
            c.setup(monkeypatch)
        capsys.readouterr()
        code = main(c.argv)
        monkeypatch.undo()  # a simulated full disk ends with the run
        captured = capsys.readouterr()
        out, err = captured.out, captured.err
    else:
        cmd = c.argv if c.runner == "snakemake" else [*CLI, *c.argv]
        env = {**os.environ, **c.env}
        if c.runner == "snakemake":
            env["PATH"] = f"{tmp / 'fakebin'}{os.pathsep}{env.get('PATH', '')}"
        env.pop("NEUROEXPLAIN_DEBUG", None)
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=180, check=False, cwd=tmp
        )
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    after = _listing(watch)
    text = out + "\n" + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if c.runner == "snakemake":
        # Snakemake frames the workflow's one-line message ("invalid config (...): key: problem",
        # raised in workflow/rules/common.smk) with a header and the line of the .smk file
        errors = [ln.strip() for ln in text.splitlines() if ln.startswith("invalid config")]
        lines = errors[-1:]
    else:
        errors = _error_lines(err)
    return Outcome(
        code=code,
        error_lines=errors,
        last_line=lines[-1].strip() if lines else "",
        traceback="Traceback (most recent call last)" in text,
        new_paths=sorted(after - before),
        canary_created=c.canary is not None and c.canary.exists(),
    )


# ------------------------------------------------------------------------------ synthetic data

SIZE = 20
AFFINE = np.array(
    [[0, 0, -2.0, 20], [-2.0, 0, 0, 22], [0, 2.0, 0, -18], [0, 0, 0, 1]], dtype=np.float64
)  # axes permuted relative to RAS, like the IXI images


def _head(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic 20³ "head": a bright ball with a labelled blob; T1w float32 and dseg int16."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"), -1).astype(float)
    d = np.sqrt(((g - 9.5) ** 2).sum(-1))
    blob = np.sqrt(((g - (7.0, 9.0, 11.0)) ** 2).sum(-1)) < 3
    t1 = np.where(d < 8, 80.0, 0.0) + 40.0 * blob + rng.normal(0, 2, d.shape) * (d < 8)
    dseg = np.where(d < 8, 1, 0).astype(np.int16)
    dseg[blob & (d < 8)] = 47
    return t1.astype(np.float32), dseg


def _save(data: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


def t1_path(root: Path, sid: str) -> Path:
    return root / sid / "anat" / f"{sid}_T1w.nii.gz"


def dseg_path(root: Path, sid: str) -> Path:
    return root / "derivatives" / "dlmuse" / sid / "anat" / f"{sid}_dseg.nii.gz"


GOOD_SUBJECTS = ["sub-01", "sub-02", "sub-03", "sub-04"]
BAD = "sub-00"  # sorts first: a run fails on it straight away


def make_bids(
    root: Path,
    subjects: list[str] = GOOD_SUBJECTS,
    labels: list[str] | None = None,
    *,
    dseg: bool = True,
) -> Path:
    """A small valid BIDS dataset of synthetic subjects (``diagnosis`` alternates by default)."""
    for i, sid in enumerate(subjects):
        t1, lab = _head(i)
        _save(t1, t1_path(root, sid))
        if dseg:
            _save(lab, dseg_path(root, sid))
    if labels is None:
        labels = ["control" if i % 2 == 0 else "disease" for i in range(len(subjects))]
    pd.DataFrame({"participant_id": subjects, "diagnosis": labels}).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )
    if dseg:
        (root / "derivatives" / "dlmuse" / "dseg.tsv").write_text(
            "index\tname\n1\tbrain\n47\tblob\n"
        )
    return root


def ingest_args(root: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "ingest-mri", "--bids", str(root), "--out", str(tmp / "out"), "--shape", "16",
        "--fov-mm", "64", "--align", "none", "--mask", "none", *extra,
    ]  # fmt: skip


def _parcels(dseg: np.ndarray) -> np.ndarray:
    """The labelled ball of :func:`_head` cut into 3x3x3 parcels (labels 1-27): enough label
    centroids (>= 12) for ``--align labels``."""
    cell = np.stack(np.meshgrid(*[np.arange(SIZE) // 7] * 3, indexing="ij"))
    return np.where(dseg > 0, 1 + cell[0] * 9 + cell[1] * 3 + cell[2], 0).astype(np.int16)


def make_parcellated_bids(root: Path, subjects: list[str] = GOOD_SUBJECTS) -> Path:
    """:func:`make_bids` with 27-parcel dseg maps, which ``--align labels`` can align."""
    make_bids(root, subjects)
    for sid in subjects:
        _save(_parcels(np.asarray(nib.load(dseg_path(root, sid)).dataobj)), dseg_path(root, sid))
    names = "".join(f"{i}\tparcel{i}\n" for i in range(1, 28))
    (root / "derivatives" / "dlmuse" / "dseg.tsv").write_text("index\tname\n" + names)
    return root


def align_args(root: Path, tmp: Path, *extra: str) -> list[str]:
    """:func:`ingest_args` aligning by labels to the first subject (the reference)."""
    return _replace(ingest_args(root, tmp, *extra), "--align", "labels")


def bids_with_bad_subject(tmp: Path) -> tuple[Path, Path, Path]:
    """A valid dataset plus ``sub-00`` listed in participants.tsv; returns its T1w / dseg paths."""
    root = make_bids(tmp / "bids", [BAD, *GOOD_SUBJECTS])
    return root, t1_path(root, BAD), dseg_path(root, BAD)


# ST tables
N_SPOTS, N_GENES = 8, 6
SPOTS = [f"AACG{i:02d}" for i in range(N_SPOTS)]
GENES = [f"Gene{i}" for i in range(N_GENES)]


def st_counts() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(rng.poisson(3.0, (N_SPOTS, N_GENES)), index=SPOTS, columns=GENES)


def st_spots() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame(
        {
            "x": rng.uniform(0, 30, N_SPOTS).round(3),
            "y": rng.uniform(0, 30, N_SPOTS).round(3),
            "layer": ["GCL", "GCL", "MCL", "MCL", "ONL", "ONL", "GCL", ""],
        },
        index=pd.Index(SPOTS, name="barcode"),
    )


def st_tables(
    tmp: Path, counts: pd.DataFrame | None = None, spots: pd.DataFrame | None = None
) -> list[str]:
    cpath, spath = tmp / "counts.csv", tmp / "spots.csv"
    (st_counts() if counts is None else counts).to_csv(cpath)
    (st_spots() if spots is None else spots).to_csv(spath)
    return ["--counts", str(cpath), "--spots", str(spath)]


def st_args(tmp: Path, *inputs: str) -> list[str]:
    return ["ingest-st", "--out", str(tmp / "out" / "st.h5ad"), "--label-key", "layer", *inputs]


def st_adata(n_per_layer: int = 10, layers: tuple[str, ...] = ("GCL", "MCL", "ONL")) -> ad.AnnData:
    """An ingest-st style AnnData: raw counts layer, ``.obsm['spatial']``, a layer label."""
    rng = np.random.default_rng(2)
    n = n_per_layer * len(layers)
    genes = [f"Gene{i}" for i in range(30)]
    x = rng.poisson(2.0, (n, len(genes))).astype(np.float32)
    a = ad.AnnData(
        X=x.copy(),
        obs=pd.DataFrame(
            {"layer": pd.Categorical(np.repeat(layers, n_per_layer))},
            index=[f"s{i}" for i in range(n)],
        ),
        var=pd.DataFrame(index=genes),
    )
    a.layers["counts"] = x
    a.obsm["spatial"] = rng.uniform(0, 30, (n, 2))
    return a


class Payload:
    """Pickles to ``open(target, "w")``: unpickling it without weights_only creates ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def tampered_pt(path: Path, canary: Path, fmt: str) -> Path:
    """A torch file that looks like a neuroexplain file but carries a code-running payload."""
    with open(path, "wb") as fh:
        torch.save({"format": fmt, "images": Payload(canary), "state_dict": {}}, fh)
    return path


# ------------------------------------------------------------------------------ shared toy kit


@dataclass
class Kit:
    root: Path
    preproc: Path
    model: Path
    split: Path
    concepts: Path
    logits: Path
    simulator: Path
    repo: Path = REPO


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Kit:
    """A tiny valid pipeline (16³ toy cohort, small CNN, split, concepts, logits, simulator)."""
    from _toy3d import CONCEPTS_YAML, write_cohort

    from neuroexplain.simulator import SimulatorConfig, SimulatorNet, save_simulator

    root = tmp_path_factory.mktemp("kit")
    paths = write_cohort(root / "toy", n=8, seed=0, epochs=1)
    concepts = root / "toy" / "concepts.yaml"
    concepts.write_text(CONCEPTS_YAML)
    pre = torch.load(paths["preproc"], weights_only=True)
    split = pd.read_csv(paths["split"], sep="\t")
    logits = root / "toy" / "logits.tsv"
    split.assign(logit=np.where(split["y"] == 1, 2.0, -2.0)).to_csv(logits, sep="\t", index=False)
    sim = root / "toy" / "simulator.pt"
    torch.manual_seed(0)
    net = SimulatorNet(SimulatorConfig(channels=(4, 8), num_experts=2, downsample=1))
    save_simulator(sim, net, input_shape=list(pre["images"].shape[1:]))
    return Kit(
        root=root / "toy",
        preproc=paths["preproc"],
        model=paths["model"],
        split=paths["split"],
        concepts=concepts,
        logits=logits,
        simulator=sim,
    )


def _kit_args(k: Kit, cmd: str, tmp: Path, *extra: str) -> list[str]:
    base = {
        "saliency": ["--preproc", str(k.preproc), "--checkpoint", str(k.model)],
        "tcav": ["--preproc", str(k.preproc), "--checkpoint", str(k.model)],
        "sacv": ["--preproc", str(k.preproc), "--checkpoint", str(k.model)],
        "xnn-train": ["--preproc", str(k.preproc), "--checkpoint", str(k.model)],
        "simulate": [
            "--preproc", str(k.preproc), "--simulator", str(k.simulator),
            "--classifier", str(k.model),
        ],
        "train-simulator": [
            "--preproc", str(k.preproc), "--classifier", str(k.model), "--logits", str(k.logits),
            "--channels", "4,8", "--experts", "2", "--downsample", "1", "--epochs", "1",
            "--max-epochs", "1",
        ],
    }[cmd]  # fmt: skip
    out = tmp / "out" / "model.pt" if cmd == "train-simulator" else tmp / "out"
    if cmd in ("tcav", "sacv"):
        base = [*base, "--concepts", str(k.concepts)]
    return [cmd, *base, "--out", str(out), "--device", "cpu", *extra]


def _replace(args: list[str], option: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(option) + 1] = value
    return args


# ============================================================================== MRI: ingest-mri


@case("mri-truncated-gz")
def _(tmp: Path, k: Kit) -> Case:
    root, t1, _ = bids_with_bad_subject(tmp)
    blob = t1.read_bytes()
    t1.write_bytes(blob[: len(blob) // 2])
    # a real process: the exit code and stderr the shell sees
    return Case(
        ingest_args(root, tmp), (t1.name,), r"truncated|corrupt|not a readable", runner="subprocess"
    )


@case("mri-not-gzip")
def _(tmp: Path, k: Kit) -> Case:
    root, t1, _ = bids_with_bad_subject(tmp)
    t1.write_bytes(b"this is not a NIfTI file, nor gzip\n" * 20)
    return Case(ingest_args(root, tmp), (t1.name,), r"not a readable NIfTI")


@case("mri-gzip-of-garbage")
def _(tmp: Path, k: Kit) -> Case:
    root, t1, _ = bids_with_bad_subject(tmp)
    t1.write_bytes(gzip.compress(b"not a nifti header" * 40))
    return Case(ingest_args(root, tmp), (t1.name,), r"not a readable NIfTI")


@case("mri-2d")
def _(tmp: Path, k: Kit) -> Case:
    root, t1, _ = bids_with_bad_subject(tmp)
    _save(np.ones((SIZE, SIZE), np.float32), t1)
    return Case(ingest_args(root, tmp), (t1.name,), r"expected a 3D volume, got shape \(20, 20\)")


@case("mri-4d")
def _(tmp: Path, k: Kit) -> Case:
    root, t1, _ = bids_with_bad_subject(tmp)
    _save(np.ones((SIZE, SIZE, SIZE, 3), np.float32), t1)
    return Case(
        ingest_args(root, tmp), (t1.name,), r"expected a 3D volume, got shape \(20, 20, 20, 3\)"
    )


@case("mri-all-zero")
def _(tmp: Path, k: Kit) -> Case:
    root, t1, _ = bids_with_bad_subject(tmp)
    _save(np.zeros((SIZE,) * 3, np.float32), t1)
    return Case(ingest_args(root, tmp), (t1.name,), r"all-zero")


@case("mri-nan")
def _(tmp: Path, k: Kit) -> Case:
    root, t1, _ = bids_with_bad_subject(tmp)
    data = _head()[0]
    data[3, 4, 5] = np.nan
    _save(data, t1)
    return Case(ingest_args(root, tmp), (t1.name,), r"finite.*1 NaN/Inf")


@case("mri-inf")
def _(tmp: Path, k: Kit) -> Case:
    root, t1, _ = bids_with_bad_subject(tmp)
    data = _head()[0]
    data[:2] = np.inf
    _save(data, t1)
    return Case(ingest_args(root, tmp), (t1.name,), r"finite.*NaN/Inf")


@case("mri-int16-scaling-overflow")
def _(tmp: Path, k: Kit) -> Case:
    """int16 storage whose scl_slope takes the values past float32's range (inf after scaling)."""
    root, t1, _ = bids_with_bad_subject(tmp)
    img = nib.Nifti1Image(np.full((SIZE,) * 3, 32000, np.int16), AFFINE)
    img.header.set_slope_inter(1e36, 0.0)
    nib.save(img, str(t1))
    return Case(
        ingest_args(root, tmp), (t1.name,), r"intensities overflow float32 \(largest 3\.2e\+40"
    )


@case("mri-singular-affine")
def _(tmp: Path, k: Kit) -> Case:
    root, t1, _ = bids_with_bad_subject(tmp)
    flat = AFFINE.copy()
    flat[:3, 2] = 0.0  # the third voxel axis has no extent in the world
    img = nib.Nifti1Image(_head()[0], None)
    img.header.set_sform(flat, code=1)  # the qform cannot hold a singular matrix: code 0
    nib.save(img, str(t1))
    return Case(ingest_args(root, tmp), (t1.name,), r"singular|invertible")


@case("mri-dseg-other-shape")
def _(tmp: Path, k: Kit) -> Case:
    root, _, dseg = bids_with_bad_subject(tmp)
    _save(np.ones((SIZE, SIZE, SIZE - 2), np.int16), dseg)
    return Case(ingest_args(root, tmp), (dseg.name,), r"grid|shape")


@case("mri-dseg-other-affine")
def _(tmp: Path, k: Kit) -> Case:
    root, _, dseg = bids_with_bad_subject(tmp)
    moved = AFFINE.copy()
    moved[:3, 3] += 4.0
    _save(_head()[1], dseg, moved)
    return Case(ingest_args(root, tmp), (dseg.name,), r"grid|affine")


@case("mri-dseg-fractional-labels")
def _(tmp: Path, k: Kit) -> Case:
    root, _, dseg = bids_with_bad_subject(tmp)
    _save(_head()[1].astype(np.float32) + 0.5, dseg)
    return Case(ingest_args(root, tmp), (dseg.name,), r"integer labels")


@case("mri-no-participants-tsv")
def _(tmp: Path, k: Kit) -> Case:
    root = make_bids(tmp / "bids")
    (root / "participants.tsv").unlink()
    return Case(ingest_args(root, tmp), ("participants.tsv",), r"not found")


@case("mri-participants-empty")
def _(tmp: Path, k: Kit) -> Case:
    root = make_bids(tmp / "bids")
    (root / "participants.tsv").write_text("participant_id\tdiagnosis\n")
    return Case(ingest_args(root, tmp), ("participants.tsv",), r"at least one subject|empty")


@case("mri-participants-duplicate-id")
def _(tmp: Path, k: Kit) -> Case:
    root = make_bids(tmp / "bids")
    tsv = root / "participants.tsv"
    tsv.write_text(tsv.read_text() + "sub-02\tdisease\n")
    return Case(ingest_args(root, tmp), ("participants.tsv",), r"duplicate.*sub-02")


@case("mri-t1-missing")
def _(tmp: Path, k: Kit) -> Case:
    root, t1, _ = bids_with_bad_subject(tmp)
    t1.unlink()
    return Case(ingest_args(root, tmp), ("participants.tsv",), r"sub-00 has no T1w")


@case("mri-dseg-missing")
def _(tmp: Path, k: Kit) -> Case:
    root, _, dseg = bids_with_bad_subject(tmp)
    dseg.unlink()
    return Case(ingest_args(root, tmp), ("dlmuse",), r"sub-00 has no .*_dseg")


@case("mri-label-column-absent")
def _(tmp: Path, k: Kit) -> Case:
    root = make_bids(tmp / "bids")
    args = ingest_args(root, tmp, "--label-column", "group")
    return Case(args, ("participants.tsv",), r"label column 'group' not found")


@case("mri-label-one-class")
def _(tmp: Path, k: Kit) -> Case:
    root = make_bids(tmp / "bids", labels=["control"] * 4)
    args = ingest_args(root, tmp, "--label-column", "diagnosis")
    return Case(args, ("participants.tsv",), r"one|single|two|class")


@case("mri-label-missing-value")
def _(tmp: Path, k: Kit) -> Case:
    root = make_bids(tmp / "bids", labels=["control", "disease", "n/a", "disease"])
    args = ingest_args(root, tmp, "--label-column", "diagnosis")
    return Case(args, ("participants.tsv",), r"sub-03")


@case("mri-label-unknown-positive-class")
def _(tmp: Path, k: Kit) -> Case:
    root = make_bids(tmp / "bids")
    args = ingest_args(root, tmp, "--label-column", "diagnosis", "--positive-class", "patient")
    return Case(args, ("participants.tsv", "--positive-class"), r"patient")


@case("mri-sheet-file-missing")
def _(tmp: Path, k: Kit) -> Case:
    sheet = tmp / "sheet.tsv"
    sheet.write_text("subject\tt1\nA\tnope_T1w.nii.gz\n")
    args = ["ingest-mri", "--sheet", str(sheet), "--out", str(tmp / "out"), "--shape", "16"]
    return Case(args, ("sheet.tsv",), r"not found")


@case("mri-sheet-no-t1-column")
def _(tmp: Path, k: Kit) -> Case:
    sheet = tmp / "sheet.csv"
    sheet.write_text("subject,image\nA,a.nii.gz\n")
    args = ["ingest-mri", "--sheet", str(sheet), "--out", str(tmp / "out"), "--shape", "16"]
    return Case(args, ("sheet.csv",), r"missing \['t1'\]")


@case("mri-align-reference-wrong-unit")
def _(tmp: Path, k: Kit) -> Case:
    """The --align labels reference with its voxel size in the wrong unit (affine / 100): its
    brain shrinks to a voxel of the model grid, and every subject would follow it."""
    root = make_parcellated_bids(tmp / "bids", [BAD, *GOOD_SUBJECTS])
    t1, dseg = t1_path(root, BAD), dseg_path(root, BAD)
    tiny = AFFINE.copy()
    tiny[:3] /= 100.0
    for p in (t1, dseg):
        _save(np.asarray(nib.load(p).dataobj), p, tiny)
    return Case(align_args(root, tmp), (t1.name,), r"reference.*covering only \d+ of 4096")


@case("mri-align-reference-constant")
def _(tmp: Path, k: Kit) -> Case:
    """A constant (not all-zero) T1w, which as the reference would shift every subject's grid."""
    root = make_parcellated_bids(tmp / "bids", [BAD, *GOOD_SUBJECTS])
    t1 = t1_path(root, BAD)
    _save(np.full((SIZE,) * 3, 7.0, np.float32), t1)
    return Case(align_args(root, tmp), (t1.name,), r"constant volume \(every voxel 7\)")


@case("mri-subject-wrong-unit")
def _(tmp: Path, k: Kit) -> Case:
    """Without alignment, a subject whose voxel size is in the wrong unit becomes (nearly) empty
    on the model grid."""
    root, t1, dseg = bids_with_bad_subject(tmp)
    tiny = AFFINE.copy()
    tiny[:3] /= 100.0
    for p in (t1, dseg):
        _save(np.asarray(nib.load(p).dataobj), p, tiny)
    return Case(ingest_args(root, tmp), (t1.name,), r"sub-00 has a labelled brain .*covering only")


@case("mri-brain-outside-grid")
def _(tmp: Path, k: Kit) -> Case:
    """The labelled brain far from the head the model grid is centred on: it would be cut off."""
    root, t1, dseg = bids_with_bad_subject(tmp)
    big = 48
    head = np.zeros((big,) * 3, np.float32)
    brain = np.zeros((big,) * 3, np.int16)
    head[:SIZE, :SIZE, :SIZE], lab = _head()
    brain[-SIZE:, -SIZE:, -SIZE:] = lab
    _save(head, t1)
    _save(brain, dseg)
    return Case(ingest_args(root, tmp), (t1.name,), r"sub-00 keeps only 0\.00 % of its labelled")


@case("mri-label-case-clash")
def _(tmp: Path, k: Kit) -> Case:
    """``Disease`` beside ``disease``: a typo that would silently become a third class."""
    root = make_bids(tmp / "bids", labels=["control", "disease", "Disease", "control"])
    args = ingest_args(root, tmp, "--label-column", "diagnosis", "--positive-class", "disease")
    return Case(
        args, ("participants.tsv",), r"'diagnosis'.*differ only by case.*'Disease'.*'disease'"
    )


@case("mri-sheet-label-whitespace-clash")
def _(tmp: Path, k: Kit) -> Case:
    """Sheet labels ``mild AD`` / ``mild  AD`` (two spaces): one class written two ways."""
    root = make_bids(tmp / "bids", dseg=False)
    sheet = tmp / "sheet.tsv"
    rows = [f"{s}\t{t1_path(root, s)}\t{lab}" for s, lab in zip(
        GOOD_SUBJECTS, ["control", "mild AD", "control", "mild  AD"], strict=True
    )]  # fmt: skip
    sheet.write_text("subject\tt1\tlabel\n" + "\n".join(rows) + "\n")
    args = ["ingest-mri", "--sheet", str(sheet), "--out", str(tmp / "out"), "--shape", "16",
            "--fov-mm", "64", "--align", "none", "--mask", "none"]  # fmt: skip
    return Case(args, ("sheet.tsv",), r"'label'.*whitespace: 'mild  AD' .* vs 'mild AD'")


# ============================================================================== ST: ingest-st


@case("st-h5ad-without-coordinates")
def _(tmp: Path, k: Kit) -> Case:
    a = st_adata()
    del a.obsm["spatial"]
    a.write_h5ad(tmp / "nospatial.h5ad")
    return Case(
        st_args(tmp, "--h5ad", str(tmp / "nospatial.h5ad")), ("nospatial.h5ad",), r"no coordinates"
    )


@case("st-h5ad-duplicate-genes")
def _(tmp: Path, k: Kit) -> Case:
    a = st_adata()
    a.var_names = [*a.var_names[:-1], a.var_names[0]]
    a.write_h5ad(tmp / "dupgenes.h5ad")
    return Case(
        st_args(tmp, "--h5ad", str(tmp / "dupgenes.h5ad")), ("dupgenes.h5ad",), r"duplicate"
    )


@case("st-h5ad-negative-counts")
def _(tmp: Path, k: Kit) -> Case:
    a = st_adata()
    a.layers["counts"][0, 0] = -3
    a.write_h5ad(tmp / "neg.h5ad")
    return Case(st_args(tmp, "--h5ad", str(tmp / "neg.h5ad")), ("neg.h5ad",), r"negative")


@case("st-corrupt-h5ad")
def _(tmp: Path, k: Kit) -> Case:
    (tmp / "broken.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    return Case(st_args(tmp, "--h5ad", str(tmp / "broken.h5ad")), ("broken.h5ad",), r"cannot read")


@case("st-duplicate-genes")
def _(tmp: Path, k: Kit) -> Case:
    c = st_counts()
    c.columns = [*GENES[:-1], GENES[0]]
    return Case(st_args(tmp, *st_tables(tmp, counts=c)), ("counts.csv",), r"duplicated gene names")


@case("st-duplicate-spots")
def _(tmp: Path, k: Kit) -> Case:
    c = st_counts()
    c.index = [*SPOTS[:-1], SPOTS[0]]
    return Case(st_args(tmp, *st_tables(tmp, counts=c)), ("counts.csv",), r"duplicated spot ids")


@case("st-negative-counts")
def _(tmp: Path, k: Kit) -> Case:
    c = st_counts()
    c.iloc[2, 3] = -1
    return Case(st_args(tmp, *st_tables(tmp, counts=c)), ("counts.csv",), r"negative counts")


@case("st-non-integer-counts")
def _(tmp: Path, k: Kit) -> Case:
    c = st_counts().astype(float)
    c.iloc[1, 1] = 2.5
    return Case(st_args(tmp, *st_tables(tmp, counts=c)), ("counts.csv",), r"non-integer counts")


@case("st-empty-table")
def _(tmp: Path, k: Kit) -> Case:
    args = st_tables(tmp)
    Path(args[1]).write_text("," + ",".join(GENES) + "\n")
    return Case(st_args(tmp, *args), ("counts.csv",), r"empty table")


@case("st-empty-file")
def _(tmp: Path, k: Kit) -> Case:
    args = st_tables(tmp)
    Path(args[3]).write_text("")
    return Case(st_args(tmp, *args), ("spots.csv",), r"empty")


@case("st-label-column-absent")
def _(tmp: Path, k: Kit) -> Case:
    args = st_tables(tmp, spots=st_spots().rename(columns={"layer": "region"}))
    return Case(st_args(tmp, *args), ("spots.csv",), r"label column 'layer' not found")


@case("st-truncated-gz")
def _(tmp: Path, k: Kit) -> Case:
    args = st_tables(tmp)
    gz = tmp / "counts.csv.gz"
    gz.write_bytes(gzip.compress(Path(args[1]).read_bytes())[:40])
    return Case(st_args(tmp, "--counts", str(gz), *args[2:]), ("counts.csv.gz",), r"cannot")


@case("st-label-case-clash")
def _(tmp: Path, k: Kit) -> Case:
    """``gcl`` beside ``GCL`` would become a layer of its own."""
    spots = st_spots()
    spots.loc[SPOTS[6], "layer"] = "gcl"
    return Case(
        st_args(tmp, *st_tables(tmp, spots=spots)),
        ("spots.csv",),
        r"'layer'.*differ only by case.*'GCL' \(2 spot\(s\)\) vs 'gcl' \(1 spot\(s\)\)",
    )


@case("st-gene-case-clash")
def _(tmp: Path, k: Kit) -> Case:
    """``Penk`` and ``PENK``: the same gene twice (e.g. two references merged)."""
    c = st_counts()
    c.columns = [*GENES[:-2], "Penk", "PENK"]
    return Case(
        st_args(tmp, *st_tables(tmp, counts=c)),
        ("counts.csv",),
        r"gene names that differ only by case.*'PENK' vs 'Penk'",
    )


@case("st-h5ad-label-whitespace-clash")
def _(tmp: Path, k: Kit) -> Case:
    """An .h5ad whose categorical label has both ``MCL`` and ``MCL `` (trailing space)."""
    a = st_adata()
    layer = a.obs["layer"].astype(str).to_numpy()
    layer[:3] = "MCL "
    a.obs["layer"] = pd.Categorical(layer)
    a.write_h5ad(tmp / "labels.h5ad")
    return Case(
        st_args(tmp, "--h5ad", str(tmp / "labels.h5ad")),
        ("labels.h5ad",),
        r"'layer'.*differ only by case or whitespace.*'MCL'.*'MCL '",
    )


@case("st-h5ad-gene-case-clash")
def _(tmp: Path, k: Kit) -> Case:
    a = st_adata()
    a.var_names = [*a.var_names[:-1], a.var_names[0].upper()]
    a.write_h5ad(tmp / "genes.h5ad")
    return Case(
        st_args(tmp, "--h5ad", str(tmp / "genes.h5ad")),
        ("genes.h5ad",),
        r"gene names \(var_names\) that differ only by case.*'GENE0' vs 'Gene0'",
    )


# ============================================================================== ST: st-concepts


def _concepts_args(tmp: Path, adata: ad.AnnData, *extra: str) -> list[str]:
    src = tmp / "in.h5ad"
    adata.write_h5ad(src)
    return [
        "st-concepts", "--adata", str(src), "--out", str(tmp / "out" / "c.h5ad"),
        "--figures", str(tmp / "out" / "figures"), "--model-dir", str(tmp / "out" / "model"),
        "--label-key", "layer", "--epochs", "2", "--n-top-genes", "0", "--genemode-seeds", "",
        "--device", "cpu", *extra,
    ]  # fmt: skip


@case("stc-label-key-absent")
def _(tmp: Path, k: Kit) -> Case:
    args = _replace(_concepts_args(tmp, st_adata()), "--label-key", "region")
    return Case(args, ("in.h5ad", "--label-key", "region"), r"label key not found")


@case("stc-one-class")
def _(tmp: Path, k: Kit) -> Case:
    return Case(
        _concepts_args(tmp, st_adata(layers=("GCL",))),
        ("in.h5ad", "layer"),
        r"one|two|class|layers",
    )


@case("stc-unknown-counts-layer")
def _(tmp: Path, k: Kit) -> Case:
    args = _concepts_args(tmp, st_adata(), "--layer", "raw")
    return Case(args, ("in.h5ad", "--layer"), r"raw")


@case("stc-unknown-gene-concept")
def _(tmp: Path, k: Kit) -> Case:
    args = _concepts_args(tmp, st_adata(), "--gene-concepts", "mine:Gene1,NotAGene")
    return Case(args, ("in.h5ad", "--gene-concepts"), r"NotAGene")


@case("stc-too-many-concepts")
def _(tmp: Path, k: Kit) -> Case:
    """A label column of 60 categories (a cluster id, say) with --min-spots 1: 60 concepts, each a
    spots x genes layer; refused before training (244 categories grew to 21.6 GB)."""
    layers = tuple(f"cluster{i:02d}" for i in range(60))
    args = _concepts_args(tmp, st_adata(n_per_layer=1, layers=layers), "--min-spots", "1")
    return Case(
        args,
        ("in.h5ad", "adata.obs['layer']"),
        r"60 categories make 60 concepts, more than --max-concepts 50 .*raise --max-concepts or "
        r"choose a --label-key",
    )


# ============================================================================== regions


@case("region-simulate-label-in-no-subject")
def _(tmp: Path, k: Kit) -> Case:
    """--regions naming a label no subject has (1047 for 47): it would be an empty row."""
    args = _kit_args(k, "simulate", tmp, "--regions", "blob=1047", "--no-images")
    return Case(
        args,
        ("--regions",),
        r"label 1047 \(region 'blob'\): nearest present \d+",
        watch=[k.root],
    )


@case("region-simulate-typo-beside-a-good-label")
def _(tmp: Path, k: Kit) -> Case:
    """A region of a good and a mistyped label (its row would be the good label's alone)."""
    args = _kit_args(k, "simulate", tmp, "--regions", "a=10,11", "--regions", "b=20")
    return Case(
        args,
        ("--regions",),
        r"1 label\(s\) in none of the \d+ subjects' label maps \(preproc\.pt, model grid\): "
        r"label 11 \(region 'a'\)",
        watch=[k.root],
    )


# ============================================================================== output paths


@case("out-st-concepts-char-device")
def _(tmp: Path, k: Kit) -> Case:
    """--out names a character device (a symlink to /dev/null here, so that even a failing check
    would only replace the link): refused before training, never renamed over."""
    dev = tmp / "out.h5ad"
    dev.symlink_to(os.devnull)
    args = _replace(_concepts_args(tmp, st_adata()), "--out", str(dev))
    return Case(args, ("out.h5ad",), r"expected a regular file .*got an existing character device")


@case("out-ingest-st-named-pipe")
def _(tmp: Path, k: Kit) -> Case:
    fifo = tmp / "st.h5ad"
    os.mkfifo(fifo)
    args = _replace(st_args(tmp, *st_tables(tmp)), "--out", str(fifo))
    return Case(args, ("st.h5ad",), r"expected a regular file .*got an existing named pipe")


@case("out-ingest-st-is-folder")
def _(tmp: Path, k: Kit) -> Case:
    (tmp / "out" / "st.h5ad").mkdir(parents=True)
    return Case(
        st_args(tmp, *st_tables(tmp)), ("st.h5ad",), r"expected a regular file .*existing folder"
    )


@case("out-ingest-mri-is-file")
def _(tmp: Path, k: Kit) -> Case:
    root = make_bids(tmp / "bids")
    (tmp / "out").write_text("not a folder\n")
    return Case(ingest_args(root, tmp), (str(tmp / "out"),), r"expected a folder .*existing file")


@case("out-st-concepts-figures-is-file")
def _(tmp: Path, k: Kit) -> Case:
    args = _concepts_args(tmp, st_adata())
    (tmp / "out").mkdir()
    (tmp / "out" / "figures").write_text("not a folder\n")
    return Case(args, ("figures", "--figures"), r"expected a folder .*\(--figures\).*existing file")


@case("out-train-classifier-is-file")
def _(tmp: Path, k: Kit) -> Case:
    (tmp / "model_out").write_text("not a folder\n")
    args = ["train-classifier", "--preproc", str(k.preproc), "--out", str(tmp / "model_out")]
    return Case(
        [*args, "--device", "cpu"], ("model_out",), r"expected a folder .*existing file",
        watch=[k.root],
    )  # fmt: skip


@case("out-saliency-parent-is-file")
def _(tmp: Path, k: Kit) -> Case:
    (tmp / "results").write_text("a file where a folder should be\n")
    args = _replace(_kit_args(k, "saliency", tmp), "--out", str(tmp / "results" / "saliency"))
    return Case(
        args, ("saliency",), r"cannot create the output .*results is an existing file",
        watch=[k.root],
    )  # fmt: skip


# ============================================================================== a full disk
# Writes to the temporary output files fail with ENOSPC (tests/_fulldisk.py); a real tmpfs run is
# in test_write_safety.py. The run must end with one line naming the output, and leave nothing.


@case("full-disk-ingest-mri")
def _(tmp: Path, k: Kit) -> Case:
    root = make_bids(tmp / "bids")
    return Case(
        ingest_args(root, tmp), ("preproc.pt",), r"no space left on device while writing it",
        setup=lambda mp: fill_disk(mp),
    )  # fmt: skip


@case("full-disk-ingest-mri-last-file")
def _(tmp: Path, k: Kit) -> Case:
    """The disk fills up at the last of the three outputs: the other two go again."""
    root = make_bids(tmp / "bids")
    return Case(
        ingest_args(root, tmp), ("ingest.json",), r"no space left on device",
        setup=lambda mp: fill_disk(mp, room=0, only=r"^ingest\.json$"),
    )  # fmt: skip


@case("full-disk-ingest-st")
def _(tmp: Path, k: Kit) -> Case:
    return Case(
        st_args(tmp, *st_tables(tmp)), ("st.h5ad",), r"no space left on device",
        setup=lambda mp: fill_disk(mp),
    )  # fmt: skip


@case("full-disk-st-concepts")
def _(tmp: Path, k: Kit) -> Case:
    """Model and figures are written, then the .h5ad hits the full disk: all of them go."""
    args = _concepts_args(tmp, st_adata())
    return Case(
        args, ("c.h5ad",), r"no space left on device",
        setup=lambda mp: fill_disk(mp, room=0, only=r"^c\.h5ad$"),
    )  # fmt: skip


@case("full-disk-saliency")
def _(tmp: Path, k: Kit) -> Case:
    args = _kit_args(k, "saliency", tmp, "--methods", "gradient", "--layer", "features.1")
    return Case(
        args, (".nii.gz", ".json", ".tsv"), r"no space left on device", watch=[k.root],
        setup=lambda mp: fill_disk(mp, room=0, only=r"\.nii\.gz$|summary|\.tsv$"),
    )  # fmt: skip


@case("full-disk-tcav")
def _(tmp: Path, k: Kit) -> Case:
    return Case(
        _kit_args(k, "tcav", tmp, "--layers", "features.1"), ("tcav.json", "tcav.tsv", "tcav.png"),
        r"no space left",
        watch=[k.root], setup=lambda mp: fill_disk(mp, room=0, only=r"^tcav\."),
    )  # fmt: skip


@case("full-disk-train-classifier")
def _(tmp: Path, k: Kit) -> Case:
    """The last of the five outputs hits the full disk: the model and the tables go again, and
    the run's resume state with them (an interruption would keep it)."""
    args = [
        "train-classifier", "--preproc", str(k.preproc), "--out", str(tmp / "out"),
        "--epochs", "1", "--no-augment", "--device", "cpu",
    ]  # fmt: skip
    return Case(
        args, ("metrics.json",), r"no space left on device while writing it", watch=[k.root],
        setup=lambda mp: fill_disk(mp, room=0, only=r"^metrics\.json$"),
    )  # fmt: skip


@case("full-disk-train-classifier-state")
def _(tmp: Path, k: Kit) -> Case:
    """The resume state after the first epoch does not fit: nothing is left, not even OUT/."""
    args = [
        "train-classifier", "--preproc", str(k.preproc), "--out", str(tmp / "out"),
        "--epochs", "2", "--no-augment", "--device", "cpu",
    ]  # fmt: skip
    return Case(
        args, ("train_state.pt",), r"no space left on device", watch=[k.root],
        setup=lambda mp: fill_disk(mp, room=100, only=r"^train_state\.pt$"),
    )  # fmt: skip


@case("full-disk-train-simulator")
def _(tmp: Path, k: Kit) -> Case:
    """model.pt is written, then train_log.tsv hits the full disk: model.pt goes again."""
    return Case(
        _kit_args(k, "train-simulator", tmp), ("train_log.tsv",), r"no space left on device",
        watch=[k.root], setup=lambda mp: fill_disk(mp, room=0, only=r"^train_log\.tsv$"),
    )  # fmt: skip


@case("full-disk-xnn-train")
def _(tmp: Path, k: Kit) -> Case:
    """srae.pt and the log are written, then srae_train.json hits the full disk."""
    args = _kit_args(k, "xnn-train", tmp, "--epochs", "2")
    return Case(
        args, ("srae_train.json",), r"no space left on device", watch=[k.root],
        setup=lambda mp: fill_disk(mp, room=0, only=r"^srae_train\.json$"),
    )  # fmt: skip


# ============================================================================== config / options


def _snakemake_case(tmp: Path, config: str, key: str, problem: str) -> Case:
    cfg = tmp / "bad_config.yaml"
    cfg.write_text(config)
    work = tmp / "work"
    work.mkdir()
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(work), "--configfile", str(REPO / "config" / "config.yaml"), str(cfg),
        "-n", "--quiet",
    ]  # fmt: skip
    return Case(cmd, (key,), problem, runner="snakemake")


@case("config-wrong-type")
def _(tmp: Path, k: Kit) -> Case:
    return _snakemake_case(
        tmp, 'seed: "zero"\n', "seed", r"bad_config\.yaml\): seed: 'zero' is not of type 'integer'"
    )


@case("config-out-of-range")
def _(tmp: Path, k: Kit) -> Case:
    return _snakemake_case(
        tmp,
        "mri:\n  fov_mm: -5\n",
        "mri.fov_mm",
        r"bad_config\.yaml\): mri\.fov_mm: -5 is less than",
    )


@case("config-duplicate-key")
def _(tmp: Path, k: Kit) -> Case:
    """``mri:`` twice: Snakemake's reader would keep the second block only (a 2-subject test
    silently becoming a run over every subject)."""
    return _snakemake_case(
        tmp,
        "mri:\n  limit: 2\nseed: 1\nmri:\n  fov_mm: 200\n",
        "mri",
        r"bad_config\.yaml:4\): duplicate key 'mri' \(first on line 1\)",
    )


@case("config-nested-duplicate-key")
def _(tmp: Path, k: Kit) -> Case:
    return _snakemake_case(
        tmp,
        "classifier:\n  epochs: 5\n  lr: 0.001\n  epochs: 50\n",
        "epochs",
        r"bad_config\.yaml:4\): duplicate key 'epochs' \(first on line 2\)",
    )


@case("config-syntax-error")
def _(tmp: Path, k: Kit) -> Case:
    """A YAML syntax error in the workflow's own config/config.yaml (the one ``configfile:``
    reads): the error names the file and the line."""
    work = tmp / "work"
    (work / "config").mkdir(parents=True)
    good = (REPO / "config" / "config.yaml").read_text()
    (work / "config" / "config.yaml").write_text("seed: 0\n\tlimit: 2\n" + good)  # a tab
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(work), "-n", "--quiet",
    ]  # fmt: skip
    problem = r"config\.yaml:2\): YAML syntax error: found character '\\t'"
    return Case(cmd, ("config.yaml",), problem, runner="snakemake")


@case("option-wrong-type")
def _(tmp: Path, k: Kit) -> Case:
    args = _replace(_kit_args(k, "train-simulator", tmp), "--epochs", "ten")
    return Case(args, ("--epochs",), r"invalid value|integer", watch=[k.root])


@case("option-out-of-range")
def _(tmp: Path, k: Kit) -> Case:
    args = _replace(_kit_args(k, "train-simulator", tmp), "--epochs", "0")
    return Case(args, ("--epochs",), r"expected >= 1, got 0", watch=[k.root])


@case("option-unknown-choice")
def _(tmp: Path, k: Kit) -> Case:
    args = [*_kit_args(k, "train-simulator", tmp), "--hinge", "sideways"]
    return Case(args, ("--hinge",), r"sideways", watch=[k.root])


@case("option-cohort-fraction")
def _(tmp: Path, k: Kit) -> Case:
    root = make_bids(tmp / "bids")
    args = ["make-cohort", "--bids", str(root), "--out", str(tmp / "out"), "--fraction", "1.5"]
    return Case(args, ("--fraction",), r"1\.5")


@case("option-saliency-method")
def _(tmp: Path, k: Kit) -> Case:
    args = _kit_args(k, "saliency", tmp, "--methods", "gradient,telepathy")
    return Case(args, ("--methods",), r"telepathy", watch=[k.root])


# ============================================================================== layers


@case("layer-saliency")
def _(tmp: Path, k: Kit) -> Case:
    args = _kit_args(k, "saliency", tmp, "--methods", "gradcam", "--layer", "features.9")
    return Case(args, ("--layer",), r"no layer .*features\.9", watch=[k.root])


@case("layer-tcav")
def _(tmp: Path, k: Kit) -> Case:
    args = _kit_args(k, "tcav", tmp, "--layers", "features.1,head.7")
    return Case(args, ("--layers",), r"no layer .*head\.7", watch=[k.root])


@case("layer-sacv")
def _(tmp: Path, k: Kit) -> Case:
    args = _kit_args(k, "sacv", tmp, "--layer", "nope")
    return Case(args, ("--layer",), r"no layer .*nope", watch=[k.root])


@case("layer-xnn")
def _(tmp: Path, k: Kit) -> Case:
    args = _kit_args(k, "xnn-train", tmp, "--layer", "classifier.42")
    return Case(args, ("--layer",), r"no layer .*classifier\.42", watch=[k.root])


# ============================================================================== checkpoints


@case("checkpoint-other-model")
def _(tmp: Path, k: Kit) -> Case:
    args = _replace(_kit_args(k, "saliency", tmp), "--checkpoint", str(k.simulator))
    return Case(
        args,
        (k.simulator.name,),
        r"expected a neuroexplain-classifier/1 checkpoint",
        watch=[k.root],
    )


@case("checkpoint-other-shape")
def _(tmp: Path, k: Kit) -> Case:
    from _toy3d import MODEL_KW

    from neuroexplain.classifier import build_model, save_classifier

    other = tmp / "model24.pt"
    net = build_model("small", spatial_size=(24, 24, 24), **MODEL_KW)
    save_classifier(
        other, net, arch="small", model_kwargs=MODEL_KW, input_shape=[1, 24, 24, 24], config={},
        epoch=0, seed=0, best_metric={"name": "none", "value": 0.0},
    )  # fmt: skip
    args = _replace(_kit_args(k, "saliency", tmp), "--checkpoint", str(other))
    return Case(
        args, ("model24.pt",), r"shape \[1, 24, 24, 24\].*\[1, 16, 16, 16\]", watch=[k.root]
    )


@case("checkpoint-tampered-payload")
def _(tmp: Path, k: Kit) -> Case:
    canary = tmp / "PWNED"
    evil = tampered_pt(tmp / "evil_model.pt", canary, "neuroexplain-classifier/1")
    args = _replace(_kit_args(k, "saliency", tmp), "--checkpoint", str(evil))
    return Case(
        args, ("evil_model.pt",), r"refused to unpickle.*tampered", watch=[k.root], canary=canary,
        runner="subprocess",
    )  # fmt: skip


@case("checkpoint-truncated")
def _(tmp: Path, k: Kit) -> Case:
    bad = tmp / "model.pt"
    blob = k.model.read_bytes()
    bad.write_bytes(blob[: len(blob) // 2])
    args = _replace(_kit_args(k, "tcav", tmp), "--checkpoint", str(bad))
    return Case(args, (str(bad),), r"truncated or corrupt", watch=[k.root])


@case("checkpoint-empty-file")
def _(tmp: Path, k: Kit) -> Case:
    bad = tmp / "empty.pt"
    bad.write_bytes(b"")
    args = _replace(_kit_args(k, "xnn-train", tmp), "--checkpoint", str(bad))
    return Case(args, ("empty.pt",), r"empty file", watch=[k.root])


@case("checkpoint-simulator-is-a-classifier")
def _(tmp: Path, k: Kit) -> Case:
    args = _replace(_kit_args(k, "simulate", tmp), "--simulator", str(k.model))
    return Case(
        args, (k.model.name,), r"expected a neuroexplain-simulator/1 checkpoint", watch=[k.root]
    )


@case("preproc-truncated")
def _(tmp: Path, k: Kit) -> Case:
    bad = tmp / "preproc.pt"
    blob = k.preproc.read_bytes()
    bad.write_bytes(blob[: len(blob) // 3])
    args = _replace(_kit_args(k, "saliency", tmp), "--preproc", str(bad))
    return Case(args, (str(bad),), r"truncated or corrupt", watch=[k.root])


@case("preproc-tampered-payload")
def _(tmp: Path, k: Kit) -> Case:
    canary = tmp / "PWNED"
    evil = tampered_pt(tmp / "preproc.pt", canary, "preproc")
    args = _replace(_kit_args(k, "train-simulator", tmp), "--preproc", str(evil))
    return Case(args, (str(evil),), r"refused to unpickle", watch=[k.root], canary=canary)


@case("preproc-foreign-dict")
def _(tmp: Path, k: Kit) -> Case:
    other = tmp / "preproc.pt"
    torch.save({"images": torch.zeros(2, 1, 8, 8, 8)}, other)
    args = _replace(_kit_args(k, "simulate", tmp), "--preproc", str(other))
    return Case(args, (str(other),), r"missing keys", watch=[k.root])


@case("logits-missing-columns")
def _(tmp: Path, k: Kit) -> Case:
    bad = tmp / "logits.tsv"
    bad.write_text("subject\tscore\nsub-00\t1.0\n")
    args = _replace(_kit_args(k, "train-simulator", tmp), "--logits", str(bad))
    return Case(args, ("logits.tsv",), r"expected columns subject, logit", watch=[k.root])


@case("concepts-config-broken-yaml")
def _(tmp: Path, k: Kit) -> Case:
    bad = tmp / "concepts.yaml"
    bad.write_text("concepts:\n  a: [unclosed\n")
    args = _replace(_kit_args(k, "tcav", tmp), "--concepts", str(bad))
    return Case(args, ("concepts.yaml",), r"yaml|parse|read", watch=[k.root])


@case("concepts-config-duplicate-concept")
def _(tmp: Path, k: Kit) -> Case:
    """The same concept name twice: YAML would keep the second definition only."""
    from _toy3d import CONCEPTS_YAML

    bad = tmp / "concepts.yaml"
    body = CONCEPTS_YAML.split("concepts:", 1)[1]
    bad.write_text(CONCEPTS_YAML + body)
    args = _replace(_kit_args(k, "tcav", tmp), "--concepts", str(bad))
    return Case(args, ("concepts.yaml",), r"concepts\.yaml:\d+: duplicate key", watch=[k.root])


@case("classifier-preproc-unlabelled")
def _(tmp: Path, k: Kit) -> Case:
    pre = torch.load(k.preproc, weights_only=True)
    pre["y"] = torch.full_like(pre["y"], float("nan"))  # ingested without --label-column
    torch.save(pre, tmp / "unlabelled.pt")
    args = ["train-classifier", "--preproc", str(tmp / "unlabelled.pt"), "--out", str(tmp / "out")]
    return Case([*args, "--device", "cpu"], ("unlabelled.pt",), r"8 subjects have no label")


@case("classifier-split-fractions")
def _(tmp: Path, k: Kit) -> Case:
    args = [
        "train-classifier", "--preproc", str(k.preproc), "--out", str(tmp / "out"),
        "--val-fraction", "0.6", "--test-fraction", "0.5", "--device", "cpu",
    ]  # fmt: skip
    return Case(args, ("--test-fraction", "--val-fraction"), r"0\.5|0\.6", watch=[k.root])


@case("classifier-unknown-arch")
def _(tmp: Path, k: Kit) -> Case:
    args = ["train-classifier", "--preproc", str(k.preproc), "--out", str(tmp / "out")]
    return Case(
        [*args, "--arch", "vgg"], ("--arch",), r"expected one of .*got 'vgg'", watch=[k.root]
    )


@case("split-unknown-values")
def _(tmp: Path, k: Kit) -> Case:
    bad = tmp / "split.tsv"
    bad.write_text(k.split.read_text().replace("\ttest\t", "\tholdout\t"))
    args = _kit_args(k, "saliency", tmp, "--split", str(bad), "--methods", "gradient")
    return Case(args, ("split.tsv",), r"holdout", watch=[k.root])


@case("memory-limit-train-simulator")
def _(tmp: Path, k: Kit) -> Case:
    args = _kit_args(k, "train-simulator", tmp)
    env = {"NEUROEXPLAIN_MEMORY_LIMIT_MB": "0.01"}
    return Case(
        args, (k.preproc.name,), r"needs about .* of memory, but only .* available", env=env,
        watch=[k.root],
    )  # fmt: skip


# ------------------------------------------------------------------------------ doubtful inputs
# Legitimate but doubtful: the run goes on (exit 0) with a warning naming the file and what is
# done about it, also kept in the stage's summary file.


def _recode(path: Path, *, sform_code: int, qform_code: int, qform_shift: float = 0.0) -> None:
    img = nib.load(path)
    new = nib.Nifti1Image(np.asarray(img.dataobj), AFFINE)
    moved = AFFINE.copy()
    moved[:3, 3] += qform_shift
    new.set_sform(AFFINE, code=sform_code)
    new.set_qform(moved, code=qform_code)
    nib.save(new, str(path))


@pytest.mark.parametrize(
    ("kind", "warning"),
    [
        (
            "disagree",
            r"sform and qform disagree \(codes 1 and 2, largest difference 5 mm\); using the "
            r"sform, as nibabel does \(ITK-based tools such as ANTs use the qform\)",
        ),
        (
            "no-codes",
            r"no orientation codes \(sform_code = qform_code = 0\); using a default LAS affine "
            r"from the voxel sizes \(2x2x2 mm, centred on the volume\)",
        ),
    ],
)
def test_doubtful_orientation_warns(
    kind: str, warning: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # one log record, one line
    root = make_bids(tmp_path / "bids")
    t1 = t1_path(root, "sub-02")
    if kind == "disagree":
        _recode(t1, sform_code=1, qform_code=2, qform_shift=5.0)
    else:
        for p in (t1, dseg_path(root, "sub-02")):  # the dseg must stay on the T1w's grid
            _recode(p, sform_code=0, qform_code=0)
    assert main(ingest_args(root, tmp_path)) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "WARNING" in ln and str(t1) in ln]
    assert len(lines) == 1 and re.search(warning, lines[0]), err  # once, though read twice
    notes = json.loads((tmp_path / "out" / "ingest.json").read_text())["warnings"]
    assert any(n.startswith(f"{t1}: ") and re.search(warning, n) for n in notes), notes
    assert all("sub-01" not in n for n in notes)


def test_consistent_orientation_is_quiet(tmp_path: Path) -> None:
    from neuroexplain.io.nifti import orientation_warning

    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), AFFINE)
    assert orientation_warning(img, "a") is None  # sform only (nibabel's default)
    img.set_qform(AFFINE, code=1)
    assert orientation_warning(img, "a") is None  # both, equal
    img.set_sform(None, code=0)
    assert orientation_warning(img, "a") is None  # qform only


def test_region_label_some_subjects_lack_warns(caplog) -> None:
    from neuroexplain.errors import InputError
    from neuroexplain.utils import check_region_labels

    present = [{0, 1, 47, 48}, {0, 1, 47}, {0, 1, 47, 48}]
    with caplog.at_level("WARNING"):
        notes = check_region_labels(
            {"hippocampus": [47, 48]}, present, where="preproc.pt", subjects=["a", "b", "c"]
        )
    assert notes == [
        "--regions: label 48 (region 'hippocampus') is missing from 1 of 3 subjects' label maps "
        "(preproc.pt), e.g. b"
    ]
    assert notes[0] in caplog.text
    with pytest.raises(InputError, match=r"\(cohort\): label 49: nearest present 1, 47, 48; "):
        check_region_labels([47, 49], present, where="cohort")
    assert check_region_labels({"all": [1]}, present, where="x") == []


# ------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("name", list(CASES))
def test_case(name: str, kit: Kit, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("NEUROEXPLAIN_DEBUG", raising=False)
    inputs = tmp_path / "in"
    inputs.mkdir()
    c = CASES[name](inputs, kit)
    if c.canary is not None:  # the payload is live: unpickled without weights_only it fires
        assert not c.canary.exists()
    res = run_case(c, tmp_path, capsys, monkeypatch)
    RESULTS[name] = {
        "clear": res.clear(c),
        "traceback": res.traceback,
        "partial": bool(res.new_paths) or res.canary_created,
    }
    detail = f"{name}: exit {res.code}, errors {res.error_lines}, last line {res.last_line!r}"
    print(detail)  # shown with pytest -rP
    assert res.code != 0, detail
    if c.runner != "snakemake":
        assert res.code == 2, detail
    assert not res.traceback, detail
    assert not res.canary_created, f"{name}: the pickle payload ran (weights_only not used)"
    assert not res.new_paths, f"{name}: partial output left: {res.new_paths}"
    assert len(res.error_lines) == 1, detail
    assert res.clear(c), detail


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch) -> None:
    """``neuroexplain --debug`` re-raises the error (the traceback), without it one line."""
    from neuroexplain.errors import InputError

    monkeypatch.delenv("NEUROEXPLAIN_DEBUG", raising=False)
    root = make_bids(tmp_path / "bids")
    (root / "participants.tsv").unlink()
    with pytest.raises(InputError, match=r"participants\.tsv: file not found"):
        main(["--debug", *ingest_args(root, tmp_path)])
    assert not (tmp_path / "out").exists()


def test_tampered_payload_is_live(tmp_path: Path) -> None:
    """The corpus's tampered files really run code when loaded unsafely (so the cases prove
    that neuroexplain loads with ``weights_only=True``)."""
    canary = tmp_path / "PWNED"
    evil = tampered_pt(tmp_path / "evil.pt", canary, "neuroexplain-classifier/1")
    torch.load(evil, weights_only=False)
    assert canary.exists()


def test_good_inputs_pass(kit: Kit, tmp_path: Path, capsys) -> None:
    """Controls: the generators' valid versions go through the same commands (exit 0), so every
    corpus case fails because of its planted defect."""
    root = make_bids(tmp_path / "bids")
    assert main(ingest_args(root, tmp_path, "--label-column", "diagnosis")) == 0
    assert (tmp_path / "out" / "preproc.pt").is_file()
    aligned = make_parcellated_bids(tmp_path / "parcels", [BAD, *GOOD_SUBJECTS])
    assert main(align_args(aligned, tmp_path / "aligned")) == 0
    pre = torch.load(tmp_path / "aligned" / "out" / "preproc.pt", weights_only=True)
    assert all(bool(im.any()) for im in pre["images"])
    st = tmp_path / "st"
    st.mkdir()
    assert main(st_args(st, *st_tables(st))) == 0
    assert (st / "out" / "st.h5ad").is_file()
    a = st_adata()
    a.write_h5ad(st / "good.h5ad")
    assert main(st_args(st, "--h5ad", str(st / "good.h5ad"))) == 0
    args = _kit_args(
        kit, "saliency", tmp_path / "sal", "--methods", "gradient", "--layer", "features.1"
    )
    assert main(args) == 0
    assert main(["make-cohort", "--help"]) == 0
    capsys.readouterr()


def test_corpus_summary(request) -> None:
    """``bad-input corpus: N cases, N clear errors, 0 tracebacks, 0 partial outputs``."""
    if not RESULTS:
        pytest.skip("no corpus case ran")
    n = len(RESULTS)
    clear = sum(r["clear"] for r in RESULTS.values())
    tracebacks = sum(r["traceback"] for r in RESULTS.values())
    partial = sum(r["partial"] for r in RESULTS.values())
    line = (
        f"bad-input corpus: {n} cases, {clear} clear errors, {tracebacks} tracebacks, "
        f"{partial} partial outputs"
    )
    request.config.stash.setdefault(SUMMARY_LINES, []).append(line)  # printed by conftest
    unclear = sorted(k for k, r in RESULTS.items() if not r["clear"])
    assert tracebacks == 0 and partial == 0, line
    assert clear == n, f"{line}; unclear: {unclear}"
    if n == len(CASES):
        assert n >= 35
