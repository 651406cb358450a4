"""The workflow on a real (single-node) Slurm cluster, compared with a local run.

The cluster is ``../shared/tools/slurm-local`` (slurmctld, slurmd, slurmdbd with MariaDB, munge
on localhost; partition ``debug``, account ``x``). The module fixture starts it, installing its
Debian packages on a cold machine, and stops it afterwards only if it was not already fully
running before the test (``slurm-local start`` is idempotent, so a cluster a developer or
another test left running is reused and left alone). It needs root: without root or without
the tool the test skips on a developer machine and fails in CI (``CI`` set).

The ingest stages of a small configuration (3 IXI subjects on a 32^3 grid with the synthetic
cohort, plus the MOB spatial transcriptomics) run once through the official Slurm executor
with ``workflow/profiles/slurm`` (account and partition overridden on the command line) and,
at the same time, once locally. The test checks in ``sacct`` that every job ran as a Slurm job
of this run and completed with the requested resources, and that both runs wrote the same
results.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_workflow import _ok, _snakemake

pytestmark = [pytest.mark.slurm, pytest.mark.workflow, pytest.mark.slow]

ACCOUNT = "x"  # slurm-local creates this account
PARTITION = "debug"  # and this partition
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")

# Only the ingest stages run (named by their outputs, so stages added later stay out of it);
# the cohort comes in as the input of the MRI ingest.
TARGETS = (
    "results/ingest/mri/preproc.pt",
    "results/ingest/mri/subjects.tsv",
    "results/ingest/mri/ingest.json",
    "results/ingest/st/mob.h5ad",
)
# The MRI ingest records the absolute paths of its inputs (the cohort under the working
# directory) in its provenance, so these files differ between two working directories in
# those paths and in the provenance config hash computed over them, and in nothing else.
RECORDS_WORKDIR = {
    "results/ingest/mri/preproc.pt",
    "results/ingest/mri/subjects.tsv",
    "results/ingest/mri/ingest.json",
}


def _unavailable(msg: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def slurm_cluster(repo_root: Path):
    """A running slurm-local cluster with accounting (started here unless it already runs)."""
    tool = Path(
        os.environ.get("NEUROEXPLAIN_SLURM_LOCAL", repo_root.parent / "shared/tools/slurm-local")
    )
    if not tool.is_file():
        _unavailable(f"slurm-local not found at {tool} (set NEUROEXPLAIN_SLURM_LOCAL)")
    if os.geteuid() != 0:
        _unavailable("slurm-local must run as root")
    env = {
        **os.environ,
        "SLURM_ACCOUNTING": "dbd",  # sacct must work
        "SLURM_PARTITION": PARTITION,
        "SLURM_TEST_ACCOUNT": ACCOUNT,
    }
    status = _run(["bash", str(tool), "status"], env=env)
    was_running = all(f"{daemon}: running" in status for daemon in DAEMONS)
    try:
        # a cold start installs the Debian packages first (about a minute)
        _run(["bash", str(tool), "start"], env=env, timeout=900)
        yield
    finally:
        if not was_running:  # stops exactly the daemons slurm-local started (its pid files)
            _run(["bash", str(tool), "stop"], env=env)


def _slurm_args(repo: Path) -> list[str]:
    """Options of the Slurm run: the repository's profile with this cluster's account/partition.

    ``--default-resources`` replaces the profile's whole list, so its other defaults are
    passed again.
    """
    profile = repo / "workflow/profiles/slurm"
    defaults = yaml.safe_load((profile / "config.yaml").read_text())["default-resources"]
    defaults |= {"slurm_account": ACCOUNT, "slurm_partition": PARTITION}
    return [
        "--workflow-profile", str(profile),
        "--jobs", "2",
        "--retries", "0",  # fail at once
        "--slurm-init-seconds-before-status-checks", "5",  # not 40 s per step
        "--default-resources", *(f"{key}={value}" for key, value in defaults.items()),
    ]  # fmt: skip


def _job_logs(workdir: Path) -> str:
    """The Slurm and rule logs of a run, for a failure message."""
    logs = sorted((workdir / ".snakemake/slurm_logs").rglob("*.log"))
    logs += sorted((workdir / "logs").rglob("*.log"))
    return "".join(f"\n--- {p}\n{p.read_text(errors='replace')[-2000:]}" for p in logs)


def _rule_resources(out: str) -> dict[str, dict[str, str]]:
    """Threads and resources of each rule as Snakemake printed them (``threads`` 1 if absent)."""
    rules = {}
    for match in re.finditer(r"^rule (\w+):\n((?:[ \t]+.*\n)+)", out, re.MULTILINE):
        body = match.group(2)
        threads = re.search(r"^\s+threads: (\d+)$", body, re.MULTILINE)
        resources = re.search(r"^\s+resources: (.*)$", body, re.MULTILINE)
        rules[match.group(1)] = {
            "threads": threads.group(1) if threads else "1",
            **dict(item.split("=", 1) for item in resources.group(1).split(", ")),
        }
    return rules


def _minutes(limit: str) -> int:
    """Minutes of a Slurm time limit ``[D-]HH:MM:SS``."""
    days, _, clock = limit.rpartition("-")
    hours, minutes, _ = (int(v) for v in clock.split(":"))
    return (int(days or 0) * 24 + hours) * 60 + minutes


def _slurm_jobs(run_id: str, since: datetime) -> dict[str, dict[str, str]]:
    """sacct records of the run's jobs (job name = run id) by rule (from the job comment).

    slurmdbd does not store job comments (no ``AccountingStoreFlags=job_comment``), so the
    comment, ``rule_<name>[_wildcards_<values>]``, comes from slurmctld via ``squeue``, which
    keeps finished jobs for ``MinJobAge`` (600 s with slurm-local).
    """
    fields = "JobIDRaw,State,ExitCode,AllocCPUS,ReqMem,Timelimit,Partition,Account,WorkDir"
    sacct = _run(
        ["sacct", "-X", "--parsable2", "--noheader", "--name", run_id,
         "--starttime", f"{since:%Y-%m-%dT%H:%M:%S}", "--endtime", "now", "--format", fields]
    )  # fmt: skip
    rows = [
        dict(zip(fields.split(","), line.split("|"), strict=True)) for line in sacct.splitlines()
    ]
    records = {row["JobIDRaw"]: row for row in rows}
    squeue = _run(["squeue", "--states=all", "--noheader", "--name", run_id, "--format=%i|%k"])
    comments = dict(line.strip().split("|", 1) for line in squeue.splitlines())
    assert comments.keys() == records.keys(), (sacct, squeue)
    rules = {re.sub(r"^rule_(.+?)(_wildcards_.*)?$", r"\1", c): i for i, c in comments.items()}
    assert len(rules) == len(records), comments
    return {rule: records[job_id] for rule, job_id in rules.items()}


def _normalised(value: Any, prefix: str) -> Any:
    """A loaded output with ``prefix`` cut from its strings and without provenance hashes.

    Tensors become ``(dtype, shape, bytes)``, so equality below is exact.
    """
    import torch

    if isinstance(value, dict):
        return {k: _normalised(v, prefix) for k, v in value.items() if k != "config_hash"}
    if isinstance(value, list | tuple):
        return [_normalised(v, prefix) for v in value]
    if isinstance(value, str):
        return value.replace(prefix, "<workdir>")
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape), value.contiguous().numpy().tobytes())
    return value


def _load_normalised(path: Path, workdir: Path) -> Any:
    import torch

    if path.suffix == ".pt":
        value = torch.load(path, weights_only=True)
    elif path.suffix == ".json":
        value = json.loads(path.read_text())
    else:
        value = path.read_text()
    return _normalised(value, str(workdir))


def _results(workdir: Path) -> dict[str, Path]:
    """Every result file of a run by relative path (benchmark timings left out)."""
    return {
        str(p.relative_to(workdir)): p
        for p in (workdir / "results").rglob("*")
        if p.is_file() and "benchmarks" not in p.relative_to(workdir).parts
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ingest_on_slurm_matches_local_run(
    slurm_cluster, repo_root: Path, tmp_path: Path, ixi_root: Path, mob_root: Path
) -> None:
    config = yaml.safe_load((repo_root / "tests/config/config.yaml").read_text())
    config["mri"]["limit"] = 2  # paired cohort: 2 controls + their 2 diseased versions
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    runs = {"local": tmp_path / "local", "slurm": tmp_path / "slurm"}
    for workdir in runs.values():
        workdir.mkdir()

    def run(name: str, *args: str):
        # targets follow a one-value option: --config / --default-resources take lists
        return _snakemake(
            repo_root, runs[name], "--jobs", "2", *TARGETS, *args,
            configfile=str(configfile), mirror=ixi_root.parent, timeout=900,
        )  # fmt: skip

    since = datetime.now() - timedelta(minutes=5)
    # the local reference runs while the Slurm run waits for its jobs
    with ThreadPoolExecutor(1) as pool:
        local = pool.submit(run, "local", "--cores", "2")
        slurm = run("slurm", *_slurm_args(repo_root))
        _ok(local.result())
    out = slurm.stdout + slurm.stderr
    assert slurm.returncode == 0, out[-4000:] + _job_logs(runs["slurm"])

    # every job ran as a Slurm job of this run, with the threads and resources of its rule
    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)
    jobs = _slurm_jobs(run_id, since)
    requested = _rule_resources(out)
    assert jobs.keys() == requested.keys() == {"make_cohort", "ingest_mri", "ingest_st"}
    for rule, job in jobs.items():
        res = requested[rule]
        assert (job["State"], job["ExitCode"]) == ("COMPLETED", "0:0"), (rule, job)
        assert (job["Account"], job["Partition"]) == (ACCOUNT, PARTITION), (rule, job)
        assert job["WorkDir"] == str(runs["slurm"]), (rule, job)
        assert job["AllocCPUS"] == res["threads"], (rule, job, res)
        assert job["ReqMem"] == f"{res['mem_mb']}M", (rule, job, res)
        assert _minutes(job["Timelimit"]) == int(res["runtime"]), (rule, job, res)

    # both runs wrote the same results: bitwise, except the recorded working directory
    local_files, slurm_files = _results(runs["local"]), _results(runs["slurm"])
    assert local_files.keys() == slurm_files.keys()
    assert set(TARGETS) <= local_files.keys()
    assert any(name.startswith("results/cohort/sub-") for name in local_files)
    for name in sorted(local_files.keys() - RECORDS_WORKDIR):
        assert _sha256(local_files[name]) == _sha256(slurm_files[name]), name
    for name in sorted(RECORDS_WORKDIR):
        local_value = _load_normalised(local_files[name], runs["local"])
        assert local_value == _load_normalised(slurm_files[name], runs["slurm"]), name
