"""``neuroexplain fetch-data``: pinned, sha256-checked demo data (mirror mode + downloader).

No test touches the network: downloads are served from local bytes by replacing the URL opener.
"""

from __future__ import annotations

import gzip
import io
import shutil
import urllib.error
from pathlib import Path

import pandas as pd
import pytest

from neuroexplain import datasets
from neuroexplain.cli import main
from neuroexplain.errors import InputError
from neuroexplain.provenance import sha256_file


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _no_leftovers(root: Path) -> bool:
    return not any(
        p.name.startswith(".fetch-") or p.name.endswith(".part") for p in root.rglob("*")
    )


# ------------------------------------------------------------------------------------------
# mirror mode on the shared data
# ------------------------------------------------------------------------------------------


def test_fetch_ixi_from_mirror(ixi_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ixi"
    # the mirror may be the data folder holding ixi/ or the BIDS root itself
    datasets.fetch("ixi", out, mirror=ixi_root.parent, limit=3)
    subjects = pd.read_csv(out / "participants.tsv", sep="\t")["participant_id"].tolist()
    expected = pd.read_csv(ixi_root / "participants.tsv", sep="\t")["participant_id"].tolist()[:3]
    assert subjects == expected
    for sub in subjects:
        for rel in (
            f"{sub}/anat/{sub}_T1w.nii.gz",
            f"derivatives/dlmuse/{sub}/anat/{sub}_dseg.nii.gz",
        ):
            assert (out / rel).read_bytes() == (ixi_root / rel).read_bytes(), rel
    for rel in (
        "dataset_description.json",
        "derivatives/dlmuse/dseg.tsv",
        "derivatives/dlmuse/dataset_description.json",
    ):
        assert (out / rel).read_bytes() == (ixi_root / rel).read_bytes(), rel
    n_nifti = len(list(out.rglob("*.nii.gz")))
    assert n_nifti == 6
    assert _no_leftovers(out)
    # a second run finds everything in place and does not rewrite it
    t1 = out / f"{subjects[0]}/anat/{subjects[0]}_T1w.nii.gz"
    before = t1.stat().st_mtime_ns
    datasets.fetch("ixi", out, mirror=ixi_root, limit=3)
    assert t1.stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def mob_fetched(mob_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fetch") / "mob"
    rc = main(["fetch-data", "mob", "--out", str(out), "--mirror", str(mob_root)])
    assert rc == 0
    return out


def test_fetch_mob_from_mirror_reproduces_shared_tables(mob_fetched: Path, mob_root: Path) -> None:
    """The converter applied to the pinned mOB.rda gives exactly the shared CSVs' content."""
    assert sha256_file(mob_fetched / "mOB.rda") == datasets.load_manifest("mob")["source"]["sha256"]
    with (
        gzip.open(mob_fetched / datasets.MOB_COUNTS) as a,
        gzip.open(mob_root / datasets.MOB_COUNTS) as b,
    ):
        assert a.read() == b.read()
    assert (mob_fetched / datasets.MOB_SPOTS).read_bytes() == (
        mob_root / datasets.MOB_SPOTS
    ).read_bytes()
    spots = pd.read_csv(mob_fetched / datasets.MOB_SPOTS, index_col=0)
    assert spots["layer_short"].value_counts().to_dict() == {
        "GCL": 66,
        "EPL": 59,
        "GL": 50,
        "ONL": 47,
        "MCL": 38,
    }
    assert int(spots["layer"].isna().sum()) == 2
    # layer_short is the fixed abbreviation of the rda's layer names
    short = spots["layer"].map(datasets.MOB_LAYER_ABBREVIATIONS)
    pd.testing.assert_series_equal(short, spots["layer_short"], check_names=False)
    assert _no_leftovers(mob_fetched)


# ------------------------------------------------------------------------------------------
# tampered mirror, bad options
# ------------------------------------------------------------------------------------------


def _small_mirror(ixi_root: Path, dest: Path, n: int = 2) -> list[str]:
    subjects = pd.read_csv(ixi_root / "participants.tsv", sep="\t")["participant_id"][:n]
    for sub in subjects:
        for rel in (
            f"{sub}/anat/{sub}_T1w.nii.gz",
            f"derivatives/dlmuse/{sub}/anat/{sub}_dseg.nii.gz",
        ):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ixi_root / rel, dest / rel)
    return list(subjects)


def test_tampered_mirror_file_is_rejected(ixi_root: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    subjects = _small_mirror(ixi_root, mirror)
    bad = mirror / f"derivatives/dlmuse/{subjects[1]}/anat/{subjects[1]}_dseg.nii.gz"
    data = bytearray(bad.read_bytes())
    data[100] ^= 0xFF
    bad.write_bytes(bytes(data))
    out = tmp_path / "new"
    with pytest.raises(InputError, match="sha256 mismatch") as info:
        datasets.fetch("ixi", out, mirror=mirror, limit=2)
    assert str(bad) in str(info.value)
    assert not out.exists()  # created by the run, removed with everything in it
    # an existing folder keeps its own content and gets nothing of the failed run
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    rc = main(
        ["fetch-data", "ixi", "--out", str(existing), "--mirror", str(mirror), "--limit", "2"]
    )
    assert rc == 2
    assert _all_files(existing) == [existing / "notes.txt"]


def test_bad_options() -> None:
    with pytest.raises(InputError, match="expected one of"):
        datasets.fetch("adni", "/nonexistent")
    with pytest.raises(InputError, match="positive"):
        datasets.fetch("ixi", "/nonexistent", limit=0)


def test_mirror_without_the_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a ixi mirror"):
        datasets.fetch("ixi", tmp_path / "out", mirror=tmp_path, limit=1)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------
# the downloader, served from local bytes
# ------------------------------------------------------------------------------------------


class _Server:
    """Stands in for ``urllib.request.urlopen``: maps URLs to bytes, records requests."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requested: list[str] = []

    def __call__(self, request, timeout=None):
        url = request.full_url
        self.requested.append(url)
        if url not in self.files:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        return io.BytesIO(self.files[url])


def _ixi_urls(ixi_root: Path, n: int) -> dict[str, bytes]:
    manifest = datasets.load_manifest("ixi")
    base = manifest["source"]["base_url"]
    return {
        base + f["source"]: (ixi_root / f["path"]).read_bytes()
        for s in manifest["subjects"][:n]
        for f in s["files"]
    }


def test_download_writes_verified_files(ixi_root: Path, tmp_path: Path, monkeypatch) -> None:
    server = _Server(_ixi_urls(ixi_root, 1))
    monkeypatch.setattr(datasets, "_urlopen", server)
    out = datasets.fetch("ixi", tmp_path / "ixi", limit=1)
    commit = "99cbdbf781d6f541239dc251f990ff03b758c510"
    assert sorted(server.requested) == sorted(server.files)
    assert all(
        f"/CBICA/NiChart_Project/{commit}/test_data/processed/IXI/" in u for u in server.requested
    )
    sub = pd.read_csv(out / "participants.tsv", sep="\t")["participant_id"].tolist()
    assert len(sub) == 1
    t1 = out / f"{sub[0]}/anat/{sub[0]}_T1w.nii.gz"
    assert t1.read_bytes() == (ixi_root / t1.relative_to(out)).read_bytes()
    assert _no_leftovers(out)


def test_download_checksum_mismatch(tmp_path: Path, monkeypatch) -> None:
    url = "https://example.org/data.bin"
    monkeypatch.setattr(datasets, "_urlopen", _Server({url: b"tampered bytes"}))
    dest = tmp_path / "data.bin"
    good = sha256_file(__file__)
    with pytest.raises(InputError, match="sha256 mismatch") as info:
        datasets.download(url, dest, good)
    msg = str(info.value)
    assert msg.startswith(url) and good in msg and "got " in msg
    assert list(tmp_path.iterdir()) == []
    # the right bytes pass
    monkeypatch.setattr(datasets, "_urlopen", _Server({url: Path(__file__).read_bytes()}))
    assert datasets.download(url, dest, good).read_bytes() == Path(__file__).read_bytes()


def test_download_mismatch_in_fetch_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    src = datasets.load_manifest("mob")["source"]
    server = _Server({src["url"]: b"not the rda"})
    monkeypatch.setattr(datasets, "_urlopen", server)
    out = tmp_path / "mob"
    rc = main(["fetch-data", "mob", "--out", str(out)])
    assert rc == 2
    assert server.requested == [src["url"]]
    assert not out.exists()


def test_download_network_error(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def offline(request, timeout=None):
        calls.append(request.full_url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(datasets, "_urlopen", offline)
    monkeypatch.setattr(datasets.time, "sleep", lambda s: None)
    with pytest.raises(InputError, match="download failed"):
        datasets.download("https://example.org/x", tmp_path / "x", "0" * 64, retries=2)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []
