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
from pathlib import Path

import pytest

pytestmark = pytest.mark.workflow

BIN = Path(sys.executable).parent


def _snakemake(
    repo: Path, workdir: Path, *args: str, configfile: str, mirror: Path | str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``snakemake`` of this environment on the repository's workflow inside ``workdir``."""
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(repo / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(repo / configfile),
        "--config", "data=" + json.dumps({"mirror": str(mirror)}),
        *args,
    ]  # fmt: skip
    # jobs call `neuroexplain`: use the one installed beside this Python even if not activated
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


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

    # the MRI ingest: 4 subjects on the 32^3 model grid
    ingest = workdir / "results/ingest/mri"
    preproc = torch.load(ingest / "preproc.pt", weights_only=True)
    assert tuple(preproc["images"].shape) == (4, 1, 32, 32, 32)
    assert torch.isfinite(preproc["images"]).all()
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

    # logs and benchmarks where the path convention puts them
    assert (workdir / "logs/ingest/mri.log").is_file()
    assert (workdir / "results/benchmarks/ingest/mri.tsv").is_file()

    # a second run has nothing to do
    again = _ok(_snakemake(repo_root, workdir, *args, configfile=config, mirror=ixi_root.parent))
    assert "Nothing to be done" in again


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
