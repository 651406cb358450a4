"""Outputs: path checks, a full disk, all-or-nothing groups, strict config YAML.

The bad-input corpus (``test_bad_inputs.py``) runs the same failures through the CLI; these are
the writers and helpers one by one, plus one run on a real, tiny tmpfs where the test may mount
one (root).
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import anndata as ad
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from _fulldisk import fill_disk, mount_tmpfs

from neuroexplain.errors import InputError
from neuroexplain.io.atomic import (
    WritePool,
    atomic_output,
    output_group,
    save_torch,
    write_failure,
    write_h5ad,
    write_json,
    write_table,
)
from neuroexplain.io.config import ConfigFileError, load_yaml_strict, read_yaml
from neuroexplain.io.nifti import save_map
from neuroexplain.io.paths import check_output, existing_kind

CLI = [sys.executable, "-c", "import sys; from neuroexplain.cli import main; sys.exit(main())"]


def _adata(n: int = 40, genes: int = 30) -> ad.AnnData:
    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, (n, genes)).astype(np.float32)
    a = ad.AnnData(
        X=x.copy(),
        obs=pd.DataFrame(
            {"layer": pd.Categorical(rng.choice(["GCL", "MCL"], n))},
            index=[f"s{i}" for i in range(n)],
        ),
        var=pd.DataFrame(index=[f"G{i}" for i in range(genes)]),
    )
    a.layers["counts"] = x
    a.obsm["spatial"] = rng.uniform(0, 30, (n, 2))
    a.uns["params"] = {"seed": 0, "genes": ["G1", "G2"]}
    return a


def _everything(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------------------ output paths


def test_check_output_accepts_new_and_matching_paths(tmp_path: Path) -> None:
    (tmp_path / "f.tsv").write_text("x\n")
    (tmp_path / "d").mkdir()
    assert check_output(tmp_path / "f.tsv", "file") == tmp_path / "f.tsv"
    assert check_output(tmp_path / "d", "folder") == tmp_path / "d"
    assert check_output(tmp_path / "new" / "deeper" / "x.json", "file") is not None
    assert check_output(None, "file") is None


@pytest.mark.parametrize(
    ("make", "kind", "problem"),
    [
        ("folder", "file", r"expected a regular file to write \(--out\), got an existing folder"),
        ("file", "folder", r"expected a folder to write in \(--out\), got an existing file"),
        ("device", "file", r"got an existing character device; refusing to replace it"),
        ("device", "folder", r"got an existing character device"),
        ("fifo", "file", r"got an existing named pipe"),
    ],
)
def test_check_output_refuses_the_wrong_kind(
    tmp_path: Path, make: str, kind: str, problem: str
) -> None:
    target = tmp_path / "out"
    if make == "folder":
        target.mkdir()
    elif make == "file":
        target.write_text("x\n")
    elif make == "device":
        target.symlink_to(os.devnull)  # a character device behind a link we may replace
    else:
        os.mkfifo(target)
    with pytest.raises(InputError, match=problem) as err:
        check_output(target, kind)
    assert err.value.path == str(target)


def test_check_output_refuses_a_file_in_the_parents(tmp_path: Path) -> None:
    (tmp_path / "results").write_text("x\n")
    with pytest.raises(InputError, match=r"results is an existing file, not a folder"):
        check_output(tmp_path / "results" / "a" / "b.json", "file")


def test_atomic_output_never_renames_over_a_device(tmp_path: Path) -> None:
    dev = tmp_path / "out.json"
    dev.symlink_to(os.devnull)
    with pytest.raises(InputError, match="character device"):
        write_json({"a": 1}, dev)
    assert dev.is_symlink() and os.readlink(dev) == os.devnull
    assert existing_kind(os.devnull) == "character device"
    assert _everything(tmp_path) == ["out.json"]


def test_atomic_output_refuses_a_device_that_appears_meanwhile(tmp_path: Path) -> None:
    target = tmp_path / "x.tsv"
    with pytest.raises(InputError, match="character device"):
        with atomic_output(target) as tmp:
            tmp.write_text("a\n")
            target.symlink_to(os.devnull)
    assert os.readlink(target) == os.devnull
    assert _everything(tmp_path) == ["x.tsv"]


# ------------------------------------------------------------------------------ a full disk


def _writers(tmp_path: Path):
    ref = nib.Nifti1Image(np.zeros((6, 6, 6), np.float32), np.eye(4))
    return {
        "json": (lambda p: write_json({"a": list(range(500))}, p), "x.json"),
        "table": (lambda p: write_table(pd.DataFrame({"a": range(500)}), p), "x.tsv"),
        "nifti": (
            lambda p: save_map(np.random.default_rng(0).random((6, 6, 6)), ref, p, description="t"),
            "sub-01_desc-test_map.nii.gz",
        ),
        "h5ad": (lambda p: write_h5ad(_adata(), p), "x.h5ad"),
        "torch": (lambda p: save_torch({"w": torch.randn(2000)}, p), "x.pt"),
    }


@pytest.mark.parametrize("writer", ["json", "table", "nifti", "h5ad", "torch"])
def test_full_disk_is_one_error_and_leaves_nothing(
    writer: str, tmp_path: Path, monkeypatch
) -> None:
    write, name = _writers(tmp_path)[writer]
    target = tmp_path / "new" / "folder" / name
    hits = fill_disk(monkeypatch, room=100)
    with pytest.raises(InputError, match=r"no space left on device while writing it") as err:
        write(target)
    assert hits, "the simulated full disk was not reached"
    assert err.value.path == str(target)
    assert _everything(tmp_path) == []  # no temporary file, no folder made for it
    monkeypatch.undo()
    write(target)  # the same write works with room on the disk
    assert target.is_file()


def test_write_failure_reads_the_exception_chain() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from inner
    except RuntimeError as exc:
        assert write_failure(exc) == "no space left on device"
    assert write_failure(OSError(errno.EDQUOT, "quota")) == "disk quota exceeded"
    assert write_failure(RuntimeError("file write failed: errno = 28")) is not None
    assert write_failure(KeyError("x")) is None


def test_write_h5ad_reads_back(tmp_path: Path) -> None:
    a = _adata()
    write_h5ad(a, tmp_path / "a.h5ad")
    b = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(b.layers["counts"], a.layers["counts"])
    np.testing.assert_array_equal(b.obsm["spatial"], a.obsm["spatial"])
    assert list(b.obs["layer"]) == list(a.obs["layer"])
    assert b.raw is None and list(b.uns["params"]["genes"]) == ["G1", "G2"]
    first = (tmp_path / "a.h5ad").read_bytes()
    write_h5ad(a, tmp_path / "a.h5ad")
    assert (tmp_path / "a.h5ad").read_bytes() == first  # reproducible bytes


def test_output_group_removes_what_it_made(tmp_path: Path, monkeypatch) -> None:
    old = tmp_path / "out" / "old.txt"
    old.parent.mkdir()
    old.write_text("from an earlier run\n")
    fill_disk(monkeypatch, room=0, only=r"^b\.json$")
    with pytest.raises(InputError, match=r"b\.json: no space left"):
        with output_group(tmp_path / "figs"):
            write_table(pd.DataFrame({"a": [1]}), tmp_path / "out" / "sub" / "a.tsv")
            (tmp_path / "figs").mkdir()  # a folder made outside atomic_output
            (tmp_path / "figs" / "f.png").write_bytes(b"png")
            write_json({"b": 2}, tmp_path / "out" / "b.json")
    assert _everything(tmp_path) == ["out", "out/old.txt"]


def test_output_group_only_on_keeps_a_resume_state_when_interrupted(tmp_path: Path) -> None:
    """A training command cleans up on its own errors (a full disk) only: an interruption keeps
    the resume state for the next run."""
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with output_group(out, only_on=InputError):
            save_torch({"epoch": 3}, out / "train_state.pt")
            raise KeyboardInterrupt
    assert _everything(tmp_path) == ["model", "model/train_state.pt"]
    with pytest.raises(InputError):
        with output_group(tmp_path / "other", only_on=InputError):
            save_torch({"epoch": 3}, tmp_path / "other" / "train_state.pt")
            raise InputError("x.json", "no space left on device while writing it")
    assert _everything(tmp_path) == ["model", "model/train_state.pt"]


def test_output_group_keeps_everything_on_success(tmp_path: Path) -> None:
    with output_group(tmp_path / "o"):
        write_json({"a": 1}, tmp_path / "o" / "a.json")
    assert (tmp_path / "o" / "a.json").is_file()


def test_write_pool_bounds_the_outstanding_writes_and_keeps_every_file(tmp_path: Path) -> None:
    lock, outstanding, peak = threading.Lock(), [0], [0]
    ref = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4))

    def write(i: int) -> None:
        with lock:
            outstanding[0] += 1
            peak[0] = max(peak[0], outstanding[0])
        time.sleep(0.01)
        save_map(np.full((4, 5, 6), i, np.float32), ref, tmp_path / f"m{i}.nii.gz", description="m")
        with lock:
            outstanding[0] -= 1

    with WritePool(2, pending=3) as pool:
        for i in range(12):
            pool.submit(write, i)
    assert 2 <= peak[0] <= 3
    assert [float(nib.load(tmp_path / f"m{i}.nii.gz").get_fdata()[0, 0, 0]) for i in range(12)] == [
        float(i) for i in range(12)
    ]
    with pytest.raises(ValueError, match="at least 1 writer"):
        WritePool(0)


def test_write_pool_raises_the_first_failed_write_and_waits_for_the_running_ones(
    tmp_path: Path,
) -> None:
    started, done = threading.Event(), []

    def fail(name: str) -> None:
        raise OSError(f"{name} failed")

    def slow() -> None:
        started.set()
        time.sleep(0.2)
        done.append("slow")

    with pytest.raises(OSError, match="first failed"):  # submission order, not finishing order
        with WritePool(2) as pool:
            pool.submit(slow)
            started.wait()
            pool.submit(fail, "first")
            pool.submit(fail, "second")
    assert done == ["slow"]  # the block ended after the running write finished
    with pytest.raises(OSError, match="a failed"):  # the next submit reports a failed write
        with WritePool(1) as pool:
            pool.submit(fail, "a")
            time.sleep(0.1)
            pool.submit(done.append, "never")
    assert done == ["slow"]


def test_full_disk_during_pooled_writes_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    fill_disk(monkeypatch, room=0, only=r"^m3\.nii\.gz$")
    ref = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4))
    with pytest.raises(InputError, match=r"m3\.nii\.gz: no space left"):
        with output_group(tmp_path / "out"), WritePool(2) as pool:
            for i in range(6):
                pool.submit(
                    save_map, np.zeros((4, 5, 6)), ref, tmp_path / "out" / "s" / f"m{i}.nii.gz",
                    description="m",
                )  # fmt: skip
    assert _everything(tmp_path) == []


def test_full_tmpfs_ingest_st(tmp_path: Path) -> None:
    """A real full disk (a 64 KiB tmpfs): one line, exit 2, nothing left, no crash."""
    src = tmp_path / "big.h5ad"
    _adata(n=400, genes=300).write_h5ad(src)
    with mount_tmpfs(tmp_path / "small") as small:
        out = small / "results" / "st.h5ad"
        env = {k: v for k, v in os.environ.items() if k != "NEUROEXPLAIN_DEBUG"}
        proc = subprocess.run(
            [*CLI, "ingest-st", "--h5ad", str(src), "--out", str(out)],
            capture_output=True, text=True, timeout=300, check=False, env=env,
        )  # fmt: skip
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert [ln for ln in lines if ln.startswith("error:")] == [lines[-1]]
        assert lines[-1].startswith(f"error: {out}: no space left on device")
        assert _everything(small) == []


# ------------------------------------------------------------------------------ config YAML


def test_strict_yaml_refuses_duplicate_keys_with_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("mri:\n  limit: 2\nseed: 0\nmri:\n  fov_mm: 200\n")
    with pytest.raises(ConfigFileError) as err:
        load_yaml_strict(cfg)
    assert str(err.value) == f"{cfg}:4: duplicate key 'mri' (first on line 1)"
    with pytest.raises(InputError, match=r"config\.yaml:4: duplicate key 'mri'"):
        read_yaml(cfg)


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("a:\n  b: 1\n  b: 2\n", 3, "duplicate key 'b' (first on line 2)"),
        ("a: 1\n\tb: 2\n", 2, "YAML syntax error: found character '\\t'"),
        ("a: [1, 2\nb: 3\n", 2, "YAML syntax error: expected ',' or ']'"),
        ("a: 1\n  b: 2\n", 2, "YAML syntax error: mapping values are not allowed here"),
        ('{"a": 1, "a": 2}\n', 1, "duplicate key 'a'"),
    ],
)
def test_strict_yaml_names_the_line(text: str, line: int, problem: str) -> None:
    with pytest.raises(ConfigFileError) as err:
        load_yaml_strict(io.StringIO(text))
    assert err.value.line == line
    assert err.value.problem.startswith(problem), err.value.problem


def test_strict_yaml_accepts_merges_and_equal_list_items() -> None:
    text = "base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\nl: [a, a]\n"
    assert load_yaml_strict(io.StringIO(text)) == {
        "base": {"x": 1, "y": 2},
        "d": {"x": 3, "y": 2},
        "l": ["a", "a"],
    }
