"""The Snakemake workflow: lint, formatting, dry runs and one tiny end-to-end run.

Every Snakemake call runs in a temporary working directory (``--directory``), so nothing is
written into the repository, and points ``data.mirror`` at the shared data by absolute path.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.workflow

BIN = Path(sys.executable).parent


_FAKEBIN = tempfile.TemporaryDirectory(prefix="neuroexplain-fakebin-")


def _no_scontrol() -> str:
    """A folder with an ``scontrol`` that fails at once, to put first on PATH.

    The Slurm executor plugin runs ``scontrol show config`` when snakemake starts, which waits
    10 s for a controller where the Slurm client is installed but no cluster runs; failing at
    once makes the plugin skip it. Runs on Slurm (any ``slurm`` argument) keep the real one.
    """
    fake = Path(_FAKEBIN.name) / "scontrol"
    if not fake.exists():
        fake.write_text("#!/bin/sh\nexit 1\n")
        fake.chmod(0o755)
    return _FAKEBIN.name


def _snakemake(
    repo: Path,
    workdir: Path,
    *args: str,
    configfile: str | list[str],
    mirror: Path | str,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``snakemake`` of this environment on the repository's workflow inside ``workdir``.

    ``configfile``: one or more config files (relative to the repository or absolute); later
    ones override keys of earlier ones.
    """
    configfiles = [configfile] if isinstance(configfile, str) else configfile
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(repo / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", *[str(repo / c) for c in configfiles],
        "--config", "data=" + json.dumps({"mirror": str(mirror)}),
        *args,
    ]  # fmt: skip
    # jobs call `neuroexplain`: use the one installed beside this Python even if not activated
    path = [str(BIN), os.environ.get("PATH", "")]
    if not any("slurm" in a for a in args):
        path.insert(0, _no_scontrol())
    env = {**os.environ, "PATH": os.pathsep.join(path)}
    return subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _job_counts(out: str) -> dict[str, int]:
    """``{rule: count}`` from the "Job stats" table a (dry) run prints."""
    lines = out.split("Job stats:", 1)[1].splitlines() if "Job stats:" in out else []
    counts = {}
    for line in lines[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.parametrize("configfile", ["config/config.yaml", "tests/config/config.yaml"])
def test_lint_clean(repo_root: Path, tmp_path: Path, configfile: str) -> None:
    out = _ok(
        _snakemake(repo_root, tmp_path, "--lint", configfile=configfile, mirror=tmp_path / "none")
    )
    assert "Lints for" not in out


def test_rules_are_snakefmt_formatted(repo_root: Path) -> None:
    cmd = [
        str(BIN / "snakefmt"),
        "--check",
        str(repo_root / "Snakefile"),
        str(repo_root / "workflow"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dry_run_default_config_reads_the_mirror(
    repo_root: Path, tmp_path: Path, ixi_root: Path
) -> None:
    out = _ok(
        _snakemake(
            repo_root, tmp_path, "-n", "-p", configfile="config/config.yaml", mirror=ixi_root.parent
        )
    )
    for rule in ("make_cohort", "ingest_mri", "ingest_st"):
        assert f"rule {rule}:" in out
    assert "rule fetch_" not in out  # the mirror has both datasets: nothing is downloaded
    assert f"--bids {shlex.quote(str(ixi_root))}" in out
    assert "--shape 64 --shape 64 --shape 64" in out


# the rules of the MRI explanation stages and the report, in the default configuration
EXPLANATION_RULES = (
    "train_classifier",
    "classifier_quality",
    "region_reliance",
    "saliency",
    "train_simulator",
    "simulate",
    "tcav",
    "sacv",
    "xnn_train",
    "xnn_explain",
    "evaluate_maps",
    "figures",
)


def _shell_command(out: str, command: str) -> str:
    """The one dry-run shell command line that runs ``neuroexplain <command>``."""
    lines = [line for line in out.splitlines() if f"neuroexplain {command} " in line]
    lines = [line for line in lines if not line.lstrip().startswith(("input:", "output:"))]
    assert len(lines) == 1, (command, lines)
    return lines[0]


def _option(out: str, command: str, option: str) -> str:
    """The value of ``option`` in the dry-run command line of ``neuroexplain <command>``."""
    args = shlex.split(_shell_command(out, command).split("Shell command:", 1)[-1])
    return args[args.index(option) + 1]


def test_dry_run_default_config_has_every_stage(repo_root: Path, tmp_path: Path) -> None:
    out = _ok(
        _snakemake(
            repo_root, tmp_path, "-n", "-p", configfile="config/config.yaml", mirror=tmp_path
        )
    )
    for rule in EXPLANATION_RULES:
        assert f"rule {rule}:" in out, rule
    # every map stage writes the evaluated split; the simulator trains against the classifier
    for command in ("saliency", "simulate", "sacv", "xnn-explain"):
        assert "--subjects test" in _shell_command(out, command), command
    train = _shell_command(out, "train-simulator")
    assert "--classifier results/classifier/model.pt" in train
    assert "--out results/simulator_model/model.pt" in train
    assert "--channels 8,16,32,32" in train and "--correct-only" in train
    # compute.precision reaches both trainings
    assert "--precision fp32" in train and "--precision fp32" in _shell_command(
        out, "train-classifier"
    )
    # the demo concepts ship with the workflow; selectors come from the cohort's participants
    sacv = _shell_command(out, "sacv")
    assert f"--concepts {repo_root / 'config/concepts3d.yaml'}" in sacv
    assert "--participants results/cohort/participants.tsv" in sacv
    assert "--concept plantedregions --desc-label plantedregions" in sacv
    # evaluate-maps and figures get the maps manifest of every map stage, in the folder the
    # stage writes (the method names and files come from the manifests)
    from neuroexplain.concepts3d.run import sacv_manifest_name

    manifests = [
        f"{_option(out, 'saliency', '--out')}/maps.json",
        f"{_option(out, 'simulate', '--out')}/maps.json",
        f"{_option(out, 'sacv', '--out')}/{sacv_manifest_name('plantedregions')}",
        f"{_option(out, 'xnn-explain', '--out')}/maps.json",
    ]
    assert manifests[2] == "results/concepts3d/sacv/plantedregions/sacvplantedregions_maps.json"
    for command in ("evaluate-maps", "figures"):
        line = _shell_command(out, command)
        assert " ".join(f"--manifest {m}" for m in manifests) in line, command
        assert "--maps" not in line and "--logjacobian-maps" not in line, command
    figures = _shell_command(out, "figures")
    assert "--regions-figure results/figures/regions_logjacobian.png" in figures
    assert (
        "--regions hippocampus=47,48 --regions thalamus=59,60 --regions putamen=57,58 "
        "--regions lateral_ventricles=51,52 --regions cerebellum_cortex=38,39" in figures
    )
    cohort = _shell_command(out, "make-cohort")
    assert "--shrink 47,48,59,60,57,58 --enlarge 51,52" in cohort and "--paired" in cohort
    assert "--label-probability 1.0" in cohort
    reliance = _shell_command(out, "region-reliance")
    assert "--split results/classifier/split.tsv --out results/classifier/reliance" in reliance
    assert "--regions hippocampus=47,48" in reliance and "--subjects test" in reliance
    ingest = _shell_command(out, "ingest-mri")
    assert "--mask brain" in ingest and "--fov-mm 180" in ingest and "--limit" not in ingest
    clf = _shell_command(out, "train-classifier")
    assert (
        "--standardize" in clf
        and "--flip" in clf
        and "--translate-vox 1" in clf
        and "--scale 0.03" in clf
    )
    sal = _shell_command(out, "saliency")
    assert "--ig-steps 16" in sal and "--occlusion-mask 16" in sal


def _rule_settings(out: str) -> dict[str, dict[str, str]]:
    """``{rule: {"threads": ..., resource: value}}`` of the jobs a dry run prints."""
    rules = {}
    for block in out.split("\nrule ")[1:]:
        name, _, body = block.partition(":\n")
        found = {"threads": "1"}
        for line in body.splitlines():
            key, _, value = line.strip().partition(": ")
            if key == "threads":
                found["threads"] = value
            elif key == "resources":
                found |= dict(item.split("=", 1) for item in value.split(", "))
        rules[name] = found
    return rules


BRANCH_RULES = ("saliency", "train_simulator", "simulate", "tcav", "sacv", "xnn_train")


@pytest.mark.parametrize(
    ("cores", "gpu", "branch_threads", "gpus"),
    [("2", "auto", "1", "0"), ("4", "auto", "2", "0"), ("2", "1", "1", "1")],
)
def test_independent_branches_run_side_by_side(
    repo_root: Path, tmp_path: Path, monkeypatch, cores, gpu, branch_threads, gpus
) -> None:
    """Locally without a GPU, no job holds the profile's single `gpu`, and on 2 cores the jobs
    of the branches after the classifier take 1 thread each, so two of them run together; the
    classifier's training keeps its 2 threads."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, even on a machine with one
    override = tmp_path / "compute.yaml"
    override.write_text(f"compute:\n  gpu: {gpu}\n")
    profile = str(repo_root / "workflow/profiles/default")
    args = ("-n", "--workflow-profile", profile, "--cores", cores)
    configfile = ["config/config.yaml", str(override)]
    out = _ok(_snakemake(repo_root, tmp_path, *args, configfile=configfile, mirror=tmp_path))
    rules = _rule_settings(out)
    assert rules["train_classifier"]["threads"] == "2"
    assert rules["train_classifier"]["gpu"] == gpus
    for rule in BRANCH_RULES:
        assert rules[rule]["threads"] == branch_threads, (rule, rules[rule])
        assert rules[rule]["gpu"] == gpus, (rule, rules[rule])
    assert "gpu" not in rules["evaluate_maps"]


def test_dry_run_tiny_config_with_every_stage(repo_root: Path, tmp_path: Path) -> None:
    """The tiny config keeps the model stages off (4 subjects); switched on, they form the DAG."""
    override = tmp_path / "on.yaml"
    override.write_text("classifier:\n  activate: true\nsaliency:\n  activate: true\n")
    out = _ok(
        _snakemake(
            repo_root,
            tmp_path,
            "-n",
            "-p",
            configfile=["tests/config/config.yaml", str(override)],
            mirror=tmp_path,
        )
    )
    for rule in EXPLANATION_RULES:
        assert f"rule {rule}:" in out, rule
    # the override merges into the tiny config's sections: its fast settings stay
    assert "--epochs 2 " in _shell_command(out, "train-classifier")
    assert "--max-steps 2" in _shell_command(out, "train-simulator")
    assert "--no-images" in _shell_command(out, "simulate")
    figures = _shell_command(out, "figures")
    assert "--manifest results/xnn/maps.json" in figures
    assert "--n-features 2" in _shell_command(out, "xnn-train")  # xnnfeature1, xnnfeature2
    assert "--n-subjects 2" in figures


def test_dry_run_age_config(repo_root: Path, tmp_path: Path, ixi_root: Path) -> None:
    """config/age.yaml: IXI young vs old from participants.tsv, no cohort, every MRI stage."""
    from neuroexplain.concepts3d.concepts import load_concept_config

    out = _ok(
        _snakemake(
            repo_root,
            tmp_path,
            "-n",
            "-p",
            configfile=["config/config.yaml", "config/age.yaml"],
            mirror=ixi_root.parent,
        )
    )
    ingest = _shell_command(out, "ingest-mri")
    assert "--label-column age --label-group 'young=<40' --label-group 'old=>60'" in ingest
    assert "--positive-class old" in ingest
    for rule in ("train_simulator", "simulate", "saliency", "tcav", "sacv", "xnn_train"):
        assert f"rule {rule}:" in out, rule
    for rule in ("make_cohort", "evaluate_maps", "ingest_st"):
        assert f"rule {rule}:" not in out, rule
    assert "--regions third_ventricle=4" in _shell_command(out, "simulate")
    concepts = load_concept_config(repo_root / "config/concepts3d_age.yaml")
    assert [c.name for c in concepts.concepts] == ["ventricles", "hippocampus", "cerebellum"]


def test_sacv_concepts_must_be_defined(repo_root: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("concepts3d:\n  sacv_concepts: [nosuchconcept]\n")
    proc = _snakemake(repo_root, tmp_path, "-n", configfile=str(cfg), mirror=tmp_path)
    assert proc.returncode != 0
    assert "concepts3d.sacv_concepts" in proc.stdout + proc.stderr
    assert "nosuchconcept" in proc.stdout + proc.stderr


def test_dry_run_without_mirror_downloads(repo_root: Path, tmp_path: Path) -> None:
    out = _ok(
        _snakemake(
            repo_root,
            tmp_path,
            "-n",
            "-p",
            configfile="config/config.yaml",
            mirror=tmp_path / "none",
        )
    )
    assert "rule fetch_ixi:" in out
    assert "rule fetch_mob:" in out
    assert "--bids resources/ixi" in out


def test_invalid_config_is_rejected(repo_root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("mri:\n  shape: [4, 64, 64]\n")
    proc = _snakemake(repo_root, tmp_path, "-n", configfile=str(bad), mirror=tmp_path)
    assert proc.returncode != 0
    assert "shape" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_end_to_end_tiny_config(repo_root: Path, tmp_path: Path, ixi_root: Path, mob_root: Path):
    import anndata
    import torch

    workdir = tmp_path / "run"
    workdir.mkdir()
    args = ("--cores", "2")
    config = "tests/config/config.yaml"
    _ok(
        _snakemake(
            repo_root, workdir, *args, configfile=config, mirror=ixi_root.parent, timeout=1200
        )
    )

    # the synthetic cohort: a BIDS dataset with diseased and control subjects
    with open(workdir / "results/cohort/participants.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert len(rows) == 4
    labels = {row["diagnosis"] for row in rows}
    assert {"disease", "control"} <= labels, labels
    # paired: each of the 2 source subjects once as a control and once diseased
    pairs = {(row["source_subject"], row["diagnosis"]) for row in rows}
    assert len({src for src, _ in pairs}) == 2 and len(pairs) == 4

    # the MRI ingest: 4 subjects on the 32^3 model grid
    ingest = workdir / "results/ingest/mri"
    preproc = torch.load(ingest / "preproc.pt", weights_only=True)
    assert tuple(preproc["images"].shape) == (4, 1, 32, 32, 32)
    assert torch.isfinite(preproc["images"]).all()
    assert preproc["groups"] == [row["source_subject"] for row in rows]  # the split unit
    assert preproc["params"]["mask"] == "brain"
    assert sorted(preproc["y"].tolist()) == sorted(
        1.0 if row["diagnosis"] == "disease" else 0.0 for row in rows
    )
    with open(ingest / "subjects.tsv", newline="") as fh:
        assert len(list(csv.DictReader(fh, delimiter="\t"))) == 4
    json.loads((ingest / "ingest.json").read_text())

    # the spatial transcriptomics ingest: all 262 MOB spots
    adata = anndata.read_h5ad(workdir / "results/ingest/st/mob.h5ad")
    assert adata.n_obs == 262

    # concept saliency: one concept per labelled MOB layer, scores per spot, saliency per gene
    concepts = anndata.read_h5ad(workdir / "results/st_concepts/mob.h5ad")
    names = list(concepts.uns["concept_saliency"]["concepts"])
    assert {"GCL", "MCL", "EPL", "GL", "ONL"} <= set(names)
    assert concepts.obsm["concept_saliency_scores"].shape == (262, len(names))
    assert concepts.varm["concept_saliency_saliency"].shape[1] == len(names)
    metrics = json.loads((workdir / "results/st_concepts/mob_metrics.json").read_text())
    assert metrics

    # figures: the ground truth of the diseased subjects on their native T1w, region bars
    figures = workdir / "results/figures"
    assert (figures / "maps/groundtruth.png").stat().st_size > 10_000
    text = (figures / "regions_logjacobian.tsv").read_text().splitlines()
    bars = list(csv.DictReader(text, delimiter="\t"))
    diseased = [r for r in bars if r["y"] == "1" and r["region"] == "hippocampus"]
    assert diseased and all(float(r["mean_logjacobian"]) < 0 for r in diseased)  # shrunk
    assert (figures / "regions_logjacobian.png").is_file()

    # logs and benchmarks where the path convention puts them
    assert (workdir / "logs/ingest/mri.log").is_file()
    assert (workdir / "results/benchmarks/ingest/mri.tsv").is_file()

    # a second run has nothing to do
    again = _ok(_snakemake(repo_root, workdir, *args, configfile=config, mirror=ixi_root.parent))
    assert "Nothing to be done" in again

    # changing one stage's settings reruns that stage and what depends on it, nothing upstream
    changed = tmp_path / "changed.yaml"
    changed.write_text("st_concepts:\n  epochs: 21\n")
    dry = _ok(
        _snakemake(
            repo_root,
            workdir,
            "-n",
            *args,
            configfile=[config, str(changed)],
            mirror=ixi_root.parent,
        )
    )
    jobs = _job_counts(dry)
    assert {"st_concepts", "st_evaluate"} <= set(jobs), jobs
    assert not {"make_cohort", "ingest_mri", "ingest_st"} & set(jobs), jobs

    # the Snakemake report: every figure and metrics file marked with report(...)
    report = workdir / "results/report.html"
    out = _ok(
        _snakemake(
            repo_root,
            workdir,
            "--report",
            str(report),
            configfile=config,
            mirror=ixi_root.parent,
        )
    )
    assert "ERROR" not in out  # e.g. a caption with broken reStructuredText
    for name in ("groundtruth.png", "regions_logjacobian.png", "mob_metrics.json"):
        assert f"Adding {name}" in out, name
    assert report.stat().st_size > 100_000


def _properties(schema: dict, prefix: str = ""):
    """(dotted key, subschema) of every property in a JSON schema, depth first."""
    for key, sub in schema.get("properties", {}).items():
        yield prefix + key, sub
        yield from _properties(sub, prefix + key + ".")


def test_every_config_key_has_description_and_default(repo_root: Path) -> None:
    import yaml

    schema = yaml.safe_load((repo_root / "workflow/schemas/config.schema.yaml").read_text())
    keys = dict(_properties(schema))
    assert {"seed", "data.mirror", "mri.bids", "cohort.activate", "st.counts"} <= keys.keys()
    for key, sub in keys.items():
        assert sub.get("description"), f"{key} has no description"
        assert "default" in sub, f"{key} has no default"


def test_default_config_equals_schema_defaults(repo_root: Path) -> None:
    import yaml
    from snakemake.utils import validate

    config = yaml.safe_load((repo_root / "config/config.yaml").read_text())
    defaults: dict = {}
    validate(defaults, str(repo_root / "workflow/schemas/config.schema.yaml"), set_default=True)
    assert config == defaults
