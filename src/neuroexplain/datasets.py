"""Public demo data, fetched from pinned upstream commits and checked against sha256 manifests.

Two datasets (``neuroexplain fetch-data ixi|mob --out DIR``):

``ixi``
    T1-weighted MRI of healthy adults (IXI, Hammersmith Hospital; CC BY-SA 3.0) resampled to 2 mm
    with DL-MUSE anatomical label maps, both from the NiChart project
    (github.com/CBICA/NiChart_Project, commit ``99cbdbf781d6f541239dc251f990ff03b758c510``, paths
    ``test_data/processed/IXI/Nifti/T1/<id>_T1.nii.gz`` and
    ``test_data/processed/IXI/DLMUSE/<id>_T1_DLMUSE.nii.gz``; ``<id>`` like ``IXI014-HH-1236``),
    written as BIDS::

        DIR/participants.tsv, DIR/dataset_description.json
        DIR/sub-IXI014HH1236/anat/sub-IXI014HH1236_T1w.nii.gz
        DIR/derivatives/dlmuse/dseg.tsv, DIR/derivatives/dlmuse/dataset_description.json
        DIR/derivatives/dlmuse/sub-IXI014HH1236/anat/sub-IXI014HH1236_dseg.nii.gz

    ``participants.tsv`` (sex), ``dseg.tsv`` (label names) and the two
    ``dataset_description.json`` files are shipped as package data (``neuroexplain/data/ixi_*``).

    **About the IXI checksums**: the sha256 values in ``data/manifest_ixi.json`` were computed from
    the project's shared mirror of these files (``../shared/data/ixi``), not from a download of
    the upstream URLs: the machine that wrote this module had no network access. They pin the
    bytes the project was developed and tested with; if the upstream files differ byte-wise from
    the mirror, a download fails with a checksum error naming the URL (nothing is written) and the
    manifest must be checked and regenerated (:func:`make_ixi_manifest`).

``mob``
    Mouse olfactory bulb spatial transcriptomics, replicate 11 of Stahl et al., Science 353:78
    (2016), as packaged by MERINGUE (github.com/JEFworks-Lab/MERINGUE, GPL-3; commit
    ``ca9e2ccabd95680d9ca0b323a8a507c038f2ea13``, ``data/mOB.rda``, sha256 ``45fc5178...cb3cb``,
    pinned upstream value). The ``.rda`` is converted with the pure-Python ``rdata`` package into
    ``mob_rep11_counts.csv.gz`` (262 spots x 15,928 genes, raw counts; first column the barcode)
    and ``mob_rep11_spots.csv`` (``x``, ``y`` array coordinates, ``layer``, ``layer_short``).
    The layer labels are in the ``.rda`` itself (``mOB$annot``, a factor named by barcode: 260 of
    262 spots, assigned by the MERINGUE authors); ``layer_short`` is the fixed abbreviation map
    :data:`MOB_LAYER_ABBREVIATIONS`. The converted content is checked against checksums of the
    decompressed CSV text in ``data/manifest_mob.json``.

Every file is written to a hidden staging folder inside ``DIR``, verified, and only moved into
place when the whole dataset verified; on any error the staging folder is deleted and nothing of
the run is left. Files already present with the right checksum are not fetched again.
``mirror=`` copies from a local folder with the output layout (``DIR`` of an earlier fetch, or its
parent holding ``ixi/`` / ``mob/``) instead of downloading, with the same checks; files are
copied, not linked, so the result does not depend on the mirror staying in place or unmodified.
Downloads use the standard library only (``urllib``).

Example:
    >>> fetch("ixi", "resources/ixi", limit=3)  # doctest: +SKIP
    PosixPath('resources/ixi')
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import Any

from neuroexplain.errors import InputError
from neuroexplain.io.atomic import atomic_output, write_json
from neuroexplain.provenance import sha256_file

__all__ = [
    "DATASETS",
    "MOB_LAYER_ABBREVIATIONS",
    "convert_mob_rda",
    "download",
    "fetch",
    "fetch_ixi",
    "fetch_mob",
    "load_manifest",
    "make_ixi_manifest",
    "read_mob_rda",
]

log = logging.getLogger(__name__)

PathArg = str | PathLike[str]

DATASETS = ("ixi", "mob")

MOB_COUNTS = "mob_rep11_counts.csv.gz"
MOB_SPOTS = "mob_rep11_spots.csv"
MOB_RDA = "mOB.rda"
MOB_LAYER_ABBREVIATIONS = {
    "1: Granular Cell Layer": "GCL",
    "2: Mitral Cell Layer": "MCL",
    "3: Outer Plexiform Layer": "EPL",
    "4: Glomerular Layer": "GL",
    "5: Olfactory Nerve Layer": "ONL",
}
PROVENANCE_FILE = "neuroexplain_fetch.json"

_IXI_PACKAGE_FILES = {
    # output path -> package data file
    "participants.tsv": "ixi_participants.tsv",
    "dataset_description.json": "ixi_dataset_description.json",
    "derivatives/dlmuse/dataset_description.json": "ixi_dlmuse_dataset_description.json",
    "derivatives/dlmuse/dseg.tsv": "ixi_dseg.tsv",
}
_IXI_ID = re.compile(r"^sub-(IXI\d{3})([A-Za-z]+)(\d{4})$")
_CHUNK = 1 << 20

# the URL opener; tests replace it to serve local bytes (no network in tests)
_urlopen = urllib.request.urlopen


# --------------------------------------------------------------------------------------------
# manifests and package data
# --------------------------------------------------------------------------------------------


def _package_data(name: str) -> bytes:
    return (resources.files("neuroexplain") / "data" / name).read_bytes()


def load_manifest(dataset: str) -> dict[str, Any]:
    """The pinned manifest of ``dataset`` (``"ixi"`` or ``"mob"``) shipped as package data."""
    _check_dataset(dataset)
    return json.loads(_package_data(f"manifest_{dataset}.json"))


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise InputError("dataset", f"expected one of {DATASETS}, got {dataset!r}")


def make_ixi_manifest(mirror: PathArg) -> dict[str, Any]:
    """Build the IXI manifest (BIDS path, upstream path, sha256) from a local BIDS mirror.

    This is how ``data/manifest_ixi.json`` was made (from ``../shared/data/ixi``).

    Args:
        mirror: BIDS root with ``participants.tsv``, ``sub-*/anat/*_T1w.nii.gz`` and
            ``derivatives/dlmuse/sub-*/anat/*_dseg.nii.gz``.

    Returns:
        ``{"source": {...}, "subjects": [{"participant_id", "source_id", "files": [{"path",
        "source", "sha256"}, ...]}, ...]}`` with subjects in ``participants.tsv`` order.
    """
    root = Path(mirror)
    lines = (root / "participants.tsv").read_text().splitlines()
    subjects = []
    for line in lines[1:]:
        pid = line.split("\t")[0]
        match = _IXI_ID.match(pid)
        if match is None:
            raise InputError(root / "participants.tsv", f"unexpected participant id {pid!r}")
        source_id = "-".join(match.groups())
        files = [
            {
                "path": f"{pid}/anat/{pid}_T1w.nii.gz",
                "source": f"test_data/processed/IXI/Nifti/T1/{source_id}_T1.nii.gz",
            },
            {
                "path": f"derivatives/dlmuse/{pid}/anat/{pid}_dseg.nii.gz",
                "source": f"test_data/processed/IXI/DLMUSE/{source_id}_T1_DLMUSE.nii.gz",
            },
        ]
        for f in files:
            f["sha256"] = sha256_file(root / f["path"])
        subjects.append({"participant_id": pid, "source_id": source_id, "files": files})
    commit = "99cbdbf781d6f541239dc251f990ff03b758c510"
    return {
        "source": {
            "repository": "https://github.com/CBICA/NiChart_Project",
            "commit": commit,
            "base_url": f"https://raw.githubusercontent.com/CBICA/NiChart_Project/{commit}/",
            "licence": "IXI images CC BY-SA 3.0 (brain-development.org/ixi-dataset); "
            "2 mm resampling and DL-MUSE label maps from the NiChart project",
            "checksums": "computed from the project's shared mirror (../shared/data/ixi), "
            "not verified against the upstream URLs (no network when the manifest was made)",
        },
        "subjects": subjects,
    }


# --------------------------------------------------------------------------------------------
# verified transfers
# --------------------------------------------------------------------------------------------


def _hash_copy(src: Any, dest: Path) -> str:
    """Stream ``src`` (a binary file-like) into ``dest``; return the sha256 of what was written."""
    h = hashlib.sha256()
    with open(dest, "wb") as fh:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            fh.write(chunk)
    return h.hexdigest()


def _temp_sibling(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
    return Path(name)


def download(
    url: str, dest: PathArg, sha256: str, *, timeout: float = 60.0, retries: int = 3
) -> Path:
    """Download ``url`` to ``dest`` (via a temporary file), verifying its sha256.

    Args:
        url: the URL (a pinned-commit raw GitHub URL here).
        dest: destination file; only created when the checksum matches.
        sha256: expected hex sha256 of the bytes.
        timeout: seconds per connection attempt.
        retries: attempts on network errors (not on checksum or HTTP 4xx errors).

    Returns:
        ``dest``.

    Raises:
        InputError: naming the URL, on a network failure or a checksum mismatch (the download is
            deleted; the message gives the expected and the received sha256).
    """
    dest = Path(dest)
    tmp = _temp_sibling(dest)
    got = ""
    try:
        for attempt in range(1, retries + 1):
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "neuroexplain"})
                with _urlopen(request, timeout=timeout) as response:
                    got = _hash_copy(response, tmp)
                break
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                permanent = isinstance(exc, urllib.error.HTTPError) and exc.code < 500
                if permanent or attempt == retries:
                    raise InputError(url, f"download failed: {exc}") from exc
                log.warning("%s: %s; retrying (%d/%d)", url, exc, attempt, retries)
                time.sleep(2.0 ** (attempt - 1))
        if got != sha256:
            raise InputError(
                url, f"sha256 mismatch: expected {sha256}, got {got}; the download was deleted"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _copy_verified(src: Path, dest: Path, sha256: str) -> Path:
    """Copy a mirror file to ``dest`` (via a temporary file), verifying its sha256."""
    if not src.is_file():
        raise InputError(src, "missing from the mirror")
    tmp = _temp_sibling(dest)
    try:
        with open(src, "rb") as fh:
            got = _hash_copy(fh, tmp)
        if got != sha256:
            raise InputError(
                src,
                f"sha256 mismatch: expected {sha256}, got {got}; mirror file differs from the "
                "pinned manifest, nothing was copied",
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _present(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def _resolve_mirror(mirror: PathArg, dataset: str, probe: str) -> Path:
    root = Path(mirror)
    if not root.is_dir():
        raise InputError(root, "mirror folder not found")
    for candidate in (root, root / dataset):
        if (candidate / probe).is_file():
            return candidate
    raise InputError(root, f"not a {dataset} mirror: expected {probe} in it or in {dataset}/")


class _Staging:
    """Files verified into a hidden folder inside ``out``, moved into place all at once."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.dir = Path(tempfile.mkdtemp(prefix=".fetch-", suffix=".tmp", dir=out))
        self.files: list[str] = []

    def path(self, rel: str) -> Path:
        """Staging path for the output file ``rel``; registers it for :meth:`commit`."""
        path = self.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        self.files.append(rel)
        return path

    def commit(self) -> None:
        for rel in self.files:
            dest = self.out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.dir / rel, dest)
        shutil.rmtree(self.dir)


@contextmanager
def _staging(out: Path) -> Iterator[_Staging]:
    if out.exists() and not out.is_dir():
        raise InputError(out, "expected an output folder, got a file")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = _Staging(out)
    try:
        yield stage
        stage.commit()
    except BaseException:
        shutil.rmtree(stage.dir, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def _progress(items: list[Any], desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="subject", disable=None, leave=False)


def _write_provenance(
    out: Path, dataset: str, params: dict[str, Any], files: dict[str, str]
) -> None:
    from neuroexplain.provenance import provenance

    block = provenance(params, command="fetch-data")
    block["torch"] = str(block["torch"])
    block["dataset"] = dataset
    block["files"] = dict(sorted(files.items()))
    write_json(block, out / PROVENANCE_FILE)


# --------------------------------------------------------------------------------------------
# IXI
# --------------------------------------------------------------------------------------------


def fetch_ixi(out: PathArg, *, mirror: PathArg | None = None, limit: int | None = None) -> Path:
    """Fetch the IXI T1w + DL-MUSE dseg BIDS dataset into ``out``.

    Args:
        out: destination BIDS root (created).
        mirror: local folder with the same layout to copy from instead of downloading.
        limit: only the first ``limit`` subjects (``participants.tsv`` order, sorted by id);
            ``participants.tsv`` then lists just those.

    Returns:
        ``out``.

    Raises:
        InputError: bad ``limit`` / mirror, download failure, or a checksum mismatch (nothing of
            the run is left in ``out``).
    """
    out = Path(out)
    manifest = load_manifest("ixi")
    subjects = manifest["subjects"]
    if limit is not None:
        if limit < 1:
            raise InputError("--limit", f"expected a positive number of subjects, got {limit}")
        subjects = subjects[:limit]
    base_url = manifest["source"]["base_url"]
    root = None
    if mirror is not None:
        root = _resolve_mirror(mirror, "ixi", subjects[0]["files"][0]["path"])
    ids = {s["participant_id"] for s in subjects}
    sums: dict[str, str] = {}
    n_fetched = 0
    with _staging(out) as stage:
        for subj in _progress(subjects, "ixi"):
            for f in subj["files"]:
                rel, sha = f["path"], f["sha256"]
                sums[rel] = sha
                if _present(out / rel, sha):
                    continue
                if root is not None:
                    _copy_verified(root / rel, stage.path(rel), sha)
                else:
                    download(base_url + f["source"], stage.path(rel), sha)
                n_fetched += 1
        for rel, name in _IXI_PACKAGE_FILES.items():
            data = _package_data(name)
            if rel == "participants.tsv":
                lines = data.decode().splitlines(keepends=True)
                data = "".join(
                    [lines[0]] + [ln for ln in lines[1:] if ln.split("\t")[0] in ids]
                ).encode()
            stage.path(rel).write_bytes(data)
            sums[rel] = hashlib.sha256(data).hexdigest()
        stage.path(".bidsignore").write_text(PROVENANCE_FILE + "\n")
    params = {
        "dataset": "ixi",
        "mirror": None if root is None else str(root),
        "limit": limit,
        "source": manifest["source"],
    }
    _write_provenance(out, "ixi", params, sums)
    log.info(
        "ixi: %d subjects in %s (%d files %s, %d already present)",
        len(subjects),
        out,
        n_fetched,
        "copied" if root is not None else "downloaded",
        2 * len(subjects) - n_fetched,
    )
    return out


# --------------------------------------------------------------------------------------------
# mouse olfactory bulb
# --------------------------------------------------------------------------------------------


def _named_factor(obj: Any, attrs: Any) -> Any:
    """rdata's factor constructor drops ``names``; keep them (``mOB$annot`` is named by barcode)."""
    import pandas as pd
    from rdata.conversion import factor_constructor

    cat = factor_constructor(obj, attrs)
    names = attrs.get("names")
    return pd.Series(cat, index=None if names is None else [str(n) for n in names])


def read_mob_rda(rda: PathArg) -> tuple[Any, Any]:
    """Read MERINGUE's ``mOB.rda`` into a counts table and a spot table.

    Args:
        rda: path of ``mOB.rda`` (a list ``mOB`` with ``counts`` genes x spots, ``pos`` spot
            coordinates, ``annot`` the layer factor named by barcode).

    Returns:
        ``(counts, spots)``: ``counts`` a DataFrame spots x genes (int, spots in the ``.rda``'s
        column order); ``spots`` a DataFrame indexed the same with ``x``, ``y`` (float),
        ``layer`` (full name, NaN if unlabelled) and ``layer_short`` (abbreviation).

    Raises:
        InputError: the file cannot be read or does not hold the expected objects.
    """
    import numpy as np
    import pandas as pd
    import rdata
    from rdata.conversion import DEFAULT_CLASS_MAP

    path = Path(rda)
    try:
        data = rdata.read_rda(path, constructor_dict={**DEFAULT_CLASS_MAP, "factor": _named_factor})
    except Exception as exc:  # rdata raises many types on bad files
        raise InputError(path, f"cannot read as R data: {type(exc).__name__}: {exc}") from exc
    mob = data.get("mOB")
    if not isinstance(mob, dict) or not {"counts", "pos", "annot"} <= set(mob):
        raise InputError(path, "expected an R list 'mOB' with counts, pos and annot")
    counts_da, pos, annot = mob["counts"], mob["pos"], mob["annot"]
    genes = [str(g) for g in counts_da.coords[counts_da.dims[0]].values]
    spots = [str(s) for s in counts_da.coords[counts_da.dims[1]].values]
    counts = pd.DataFrame(np.asarray(counts_da.values).T, index=spots, columns=genes)
    if set(pos.index) != set(spots) or list(pos.columns) != ["x", "y"]:
        raise InputError(path, "mOB$pos does not hold x, y for the spots of mOB$counts")
    unknown = set(annot.dropna().astype(str)) - set(MOB_LAYER_ABBREVIATIONS)
    if unknown:
        raise InputError(path, f"unexpected layer names in mOB$annot: {sorted(unknown)}")
    layer = annot.astype(object).reindex(spots)
    table = pd.DataFrame(
        {
            "x": pos.loc[spots, "x"].to_numpy(dtype=np.float64),
            "y": pos.loc[spots, "y"].to_numpy(dtype=np.float64),
            "layer": layer.to_numpy(),
            "layer_short": layer.map(MOB_LAYER_ABBREVIATIONS).to_numpy(),
        },
        index=spots,
    )
    return counts, table


def convert_mob_rda(rda: PathArg, out_dir: PathArg) -> tuple[Path, Path]:
    """Convert ``mOB.rda`` into ``mob_rep11_counts.csv.gz`` and ``mob_rep11_spots.csv``.

    The gzip stream is written with ``mtime=0`` and no file name, so the output is reproducible.

    Args:
        rda: MERINGUE's ``mOB.rda``.
        out_dir: folder to write the two files to (atomically each).

    Returns:
        The paths of the counts table (spots x genes, first column the barcode) and the spot
        table (barcode, ``x``, ``y``, ``layer``, ``layer_short``; empty labels for the 2
        unlabelled spots).
    """
    counts, spots = read_mob_rda(rda)
    out_dir = Path(out_dir)
    counts_path, spots_path = out_dir / MOB_COUNTS, out_dir / MOB_SPOTS
    buf = io.StringIO()
    counts.to_csv(buf)
    with atomic_output(counts_path) as tmp, open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
            gz.write(buf.getvalue().encode())
    del buf
    with atomic_output(spots_path) as tmp:
        spots.to_csv(tmp)
    return counts_path, spots_path


def _content_sha256(path: Path) -> str:
    """sha256 of a file's content, decompressed if gzipped (gzip bytes vary with zlib)."""
    h = hashlib.sha256()
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch_mob(out: PathArg, *, mirror: PathArg | None = None) -> Path:
    """Fetch MERINGUE's ``mOB.rda`` (pinned, sha256-checked) and convert it into ``out``.

    Writes ``mOB.rda``, ``mob_rep11_counts.csv.gz`` and ``mob_rep11_spots.csv``; the converted
    files' content must match the manifest's checksums.

    Args:
        out: destination folder (created).
        mirror: local folder holding ``mOB.rda`` (or ``mob/mOB.rda``) to copy instead of
            downloading.

    Returns:
        ``out``.

    Raises:
        InputError: download / mirror / checksum problem, or a conversion that does not reproduce
            the pinned content (nothing of the run is left in ``out``).
    """
    out = Path(out)
    manifest = load_manifest("mob")
    src = manifest["source"]
    expected = manifest["content_sha256"]
    root = None if mirror is None else _resolve_mirror(mirror, "mob", MOB_RDA)
    done = _present(out / MOB_RDA, src["sha256"]) and all(
        (out / name).is_file() and _content_sha256(out / name) == sha
        for name, sha in expected.items()
    )
    if not done:
        with _staging(out) as stage:
            rda = out / MOB_RDA
            if not _present(rda, src["sha256"]):
                rda = stage.path(MOB_RDA)
                if root is not None:
                    _copy_verified(root / MOB_RDA, rda, src["sha256"])
                else:
                    download(src["url"], rda, src["sha256"])
            log.info("mob: converting %s with rdata", MOB_RDA)
            convert_mob_rda(rda, stage.dir)
            for name, sha in expected.items():
                got = _content_sha256(stage.dir / name)
                if got != sha:
                    raise InputError(
                        out / name,
                        f"converted content sha256 mismatch: expected {sha}, got {got} "
                        "(rdata / pandas version differences?)",
                    )
                stage.files.append(name)
    else:
        log.info("mob: %s already complete", out)
    params = {"dataset": "mob", "mirror": None if root is None else str(root), "source": src}
    files = {MOB_RDA: src["sha256"], **{f"{k} (content)": v for k, v in expected.items()}}
    _write_provenance(out, "mob", params, files)
    return out


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def fetch(
    dataset: str, out: PathArg, mirror: PathArg | None = None, limit: int | None = None
) -> Path:
    """Fetch a demo dataset (``"ixi"`` or ``"mob"``) into ``out``; see the module docstring.

    Args:
        dataset: ``"ixi"`` or ``"mob"``.
        out: destination folder.
        mirror: local folder with the same layout to copy from (checksums verified too).
        limit: IXI only: the first N subjects (ignored with a warning for ``mob``).

    Returns:
        ``out``.
    """
    _check_dataset(dataset)
    if dataset == "ixi":
        return fetch_ixi(out, mirror=mirror, limit=limit)
    if limit is not None:
        log.warning("--limit applies to ixi only; ignored for mob")
    return fetch_mob(out, mirror=mirror)
