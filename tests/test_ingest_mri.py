"""``neuroexplain ingest-mri``: BIDS / sheet ingest, model-grid preprocessing, mapping to native."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from neuroexplain.cli import main
from neuroexplain.errors import InputError
from neuroexplain.mri.ingest import PREPROC_KEYS, ingest_mri, load_preproc, native_grid
from neuroexplain.mri.preprocess import (
    Grid,
    preprocess_arrays,
    preprocess_subject,
    resample_to_grid,
    to_model,
    to_native,
)

FIRST = ["sub-IXI014HH1236", "sub-IXI015HH1258", "sub-IXI034HH1260"]


def _t1(root: Path, sid: str) -> Path:
    return root / sid / "anat" / f"{sid}_T1w.nii.gz"


def _dseg(root: Path, sid: str) -> Path:
    return root / "derivatives" / "dlmuse" / sid / "anat" / f"{sid}_dseg.nii.gz"


def _world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinates (X, Y, Z, 3) of every voxel centre of a grid."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _linear(world: np.ndarray) -> np.ndarray:
    return 100.0 + 0.3 * world[..., 0] - 0.2 * world[..., 1] + 0.1 * world[..., 2]


def _inside(
    src_affine: np.ndarray, src_shape, dst_affine: np.ndarray, dst_shape, margin: float = -1e-6
) -> np.ndarray:
    """Destination voxels whose source voxel coordinates lie in ``[-margin, n - 1 + margin]``."""
    src = _world(np.linalg.inv(src_affine) @ dst_affine, tuple(dst_shape))
    upper = np.array(src_shape) - 1
    return np.all((src >= -margin) & (src <= upper + margin), axis=-1)


# ------------------------------------------------------------------ a small real ingest (CLI)

#: the unaligned, unmasked whole-head grid (224 mm) the mapping tests are written for (the
#: defaults, the workflow's, align by labels and mask the brain in a 180 mm field of view)
PLAIN = {"fov_mm": 224.0, "align": "none", "mask": "none"}
PLAIN_ARGS = ["--fov-mm", "224", "--align", "none", "--mask", "none"]


@pytest.fixture(scope="module")
def ingested(ixi_root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ingest") / "out"
    code = main(
        [
            "ingest-mri",
            "--bids",
            str(ixi_root),
            "--out",
            str(out),
            "--limit",
            "3",
            "--label-column",
            "sex",
            *PLAIN_ARGS,
        ]
    )
    assert code == 0
    return out


def test_outputs_keys_shapes_dtypes(ingested: Path, ixi_root: Path) -> None:
    assert sorted(p.name for p in ingested.iterdir()) == [
        "ingest.json",
        "preproc.pt",
        "subjects.tsv",
    ]
    raw = torch.load(ingested / "preproc.pt", weights_only=True)
    assert set(PREPROC_KEYS) <= set(raw)
    pre = load_preproc(ingested / "preproc.pt")
    assert pre["subjects"] == FIRST
    assert pre["images"].dtype == torch.float32 and tuple(pre["images"].shape) == (3, 1, 64, 64, 64)
    assert pre["dseg"].dtype == torch.int16 and pre["dseg"].shape == pre["images"].shape
    assert (
        pre["model_affines"].dtype == torch.float64 and pre["native_affines"].dtype == torch.float64
    )
    assert pre["native_shapes"].dtype == torch.int64
    assert pre["native_shapes"].tolist() == [[120, 120, 90]] * 3
    # percentile normalisation: values in [0, 1], background 0, head mostly non-zero
    img = pre["images"]
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0
    assert 0.2 < float((img > 0).float().mean()) < 0.8
    # labels from participants.tsv (sex), positive class = second sorted value
    tsv = pd.read_csv(ixi_root / "participants.tsv", sep="\t").set_index("participant_id")
    assert pre["label"] == [tsv.loc[s, "sex"] for s in FIRST]
    assert pre["positive_class"] == "M"
    assert pre["y"].tolist() == [float(v == "M") for v in pre["label"]]
    assert pre["dseg_names"][47] == "Hippocampus_R"
    for i, sid in enumerate(FIRST):
        assert pre["t1_paths"][i] == str(_t1(ixi_root, sid).resolve())
        native = nib.load(pre["t1_paths"][i])
        np.testing.assert_allclose(pre["native_affines"][i].numpy(), native.affine)
        assert native_grid(pre, i).shape == native.shape
    assert pre["params"]["shape"] == [64, 64, 64]
    assert pre["params"]["provenance"]["command"] == "ingest-mri"
    table = pd.read_csv(ingested / "subjects.tsv", sep="\t")
    assert table["participant_id"].tolist() == FIRST
    assert (table[["fg_extent_r_mm", "fg_extent_a_mm", "fg_extent_s_mm"]] > 100).all().all()
    assert (table["brain_kept"] == 1.0).all()
    summary = json.loads((ingested / "ingest.json").read_text())
    assert summary["n_subjects"] == 3 and summary["spacing_mm"] == 3.5
    assert sum(summary["class_counts"].values()) == 3


def test_model_affines_are_ras_with_fov_spacing(ingested: Path) -> None:
    pre = load_preproc(ingested)
    for aff in pre["model_affines"].numpy():
        assert nib.aff2axcodes(aff) == ("R", "A", "S")
        np.testing.assert_allclose(aff[:3, :3], np.eye(3) * 224.0 / 64, atol=1e-9)
    # the brain (dseg > 0) sits inside the grid, away from its faces
    for seg in pre["dseg"][:, 0].numpy():
        idx = np.argwhere(seg > 0)
        assert idx.min() >= 2 and idx.max() <= 61


def test_deterministic_and_parallel(ingested: Path, ixi_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    ingest_mri(out, bids=ixi_root, label_column="sex", limit=3, workers=2, progress=False, **PLAIN)
    a, b = load_preproc(ingested), load_preproc(out)
    for key in ("images", "dseg", "y", "model_affines", "native_affines", "native_shapes"):
        assert torch.equal(a[key], b[key]), key
    assert a["subjects"] == b["subjects"] and a["label"] == b["label"]
    # same options (the fixture's CLI run used one worker): byte-identical outputs
    same = tmp_path / "same"
    ingest_mri(same, bids=ixi_root, label_column="sex", limit=3, progress=False, **PLAIN)
    for name in ("preproc.pt", "subjects.tsv", "ingest.json"):
        assert (same / name).read_bytes() == (ingested / name).read_bytes(), name


# ------------------------------------------------------------------ exactness of the mappings


def test_pipeline_affine_is_exact(ixi_root: Path) -> None:
    """A native volume linear in world coordinates stays the same function on the model grid."""
    native = nib.load(_t1(ixi_root, FIRST[0]))  # permuted (P, S, R) affine
    shape = (60, 70, 45)
    aff = native.affine.copy()
    vol = _linear(_world(aff, shape)).astype(np.float32)
    res = preprocess_arrays(vol, aff, shape=(24, 24, 20), fov_mm=120.0, norm="none")
    expected = _linear(_world(res.model_affine, res.image.shape))
    inside = _inside(aff, shape, res.model_affine, res.image.shape)
    assert inside.mean() > 0.5  # both padding and cropping happened, most voxels are inside
    np.testing.assert_allclose(res.image[inside], expected[inside], rtol=1e-4)
    assert np.all(res.image[~_inside(aff, shape, res.model_affine, (24, 24, 20), margin=1)] == 0)
    assert nib.aff2axcodes(res.model_affine) == ("R", "A", "S")


def test_to_native_reproduces_linear_function(ingested: Path) -> None:
    pre = load_preproc(ingested)
    maff = pre["model_affines"][0].numpy()
    grid = native_grid(pre, 0)
    model_vol = _linear(_world(maff, (64, 64, 64)))
    native = to_native(model_vol.astype(np.float32), maff, grid)
    assert native.shape == grid.shape and native.dtype == np.float32
    inside = _inside(maff, (64, 64, 64), grid.affine, grid.shape)
    assert inside.mean() > 0.5
    expected = _linear(_world(grid.affine, grid.shape))
    rel = np.abs(native[inside] - expected[inside]) / np.abs(expected[inside])
    assert rel.max() < 1e-3
    outside = ~_inside(maff, (64, 64, 64), grid.affine, grid.shape, margin=1)
    assert np.all(native[outside] == 0)
    # channels-first input and the inverse direction
    two = to_native(np.stack([model_vol, 2 * model_vol]).astype(np.float32), maff, grid)
    assert two.shape == (2, *grid.shape)
    np.testing.assert_allclose(two[1][inside], 2 * native[inside], rtol=1e-5)
    back = to_model(expected.astype(np.float32), grid, maff, (64, 64, 64))
    inside_m = _inside(grid.affine, grid.shape, maff, (64, 64, 64))
    rel = np.abs(back[inside_m] - model_vol[inside_m]) / np.abs(model_vol[inside_m])
    assert rel.max() < 1e-3


def test_resample_matches_scipy() -> None:
    """Independent reference: scipy.ndimage.map_coordinates on an oblique grid pair."""
    from scipy.ndimage import map_coordinates
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    src = rng.normal(size=(2, 17, 13, 11)).astype(np.float32)
    src_aff = np.diag([2.0, 1.5, 3.0, 1.0])
    src_aff[:3, 3] = [-10, 4, 2]
    dst_aff = np.eye(4)
    dst_aff[:3, :3] = Rotation.from_euler("xyz", [10, -20, 30], degrees=True).as_matrix() * 1.3
    dst_aff[:3, 3] = [-2, 6, 8]
    dst_shape = (15, 16, 14)
    got = resample_to_grid(src, src_aff, dst_aff, dst_shape)
    coords = _world(np.linalg.inv(src_aff) @ dst_aff, dst_shape)
    inside = _inside(src_aff, src.shape[1:], dst_aff, dst_shape)
    assert inside.sum() > 100
    for c in range(2):
        ref = map_coordinates(src[c], coords.reshape(-1, 3).T, order=1).reshape(dst_shape)
        np.testing.assert_allclose(got[c][inside], ref[inside], atol=1e-4)
    labels = (src[0] > 0).astype(np.int16) + 3
    nn = resample_to_grid(labels, src_aff, dst_aff, dst_shape, mode="nearest")
    assert nn.dtype == np.int16 and set(np.unique(nn)) <= {0, 3, 4}
    ref0 = map_coordinates(labels, coords.reshape(-1, 3).T, order=0).reshape(dst_shape)
    assert (nn[inside] == ref0[inside]).mean() > 0.99  # ties at exact half-voxels may differ


def test_round_trip_on_aligned_grid_is_identity(ixi_root: Path) -> None:
    """At the native 2 mm spacing the model grid is a shifted native grid: exact round trip."""
    t1, dseg = _t1(ixi_root, FIRST[1]), _dseg(ixi_root, FIRST[1])
    res = preprocess_subject(t1, dseg, shape=(112, 112, 112), fov_mm=224.0, norm="none")
    native = nib.load(t1)
    data = native.get_fdata()
    labels = np.asarray(nib.load(dseg).dataobj).astype(np.int16)
    inside = _inside(res.model_affine, (112,) * 3, native.affine, native.shape)
    back = to_native(res.image, res.model_affine, native)
    np.testing.assert_allclose(back[inside], data[inside], rtol=1e-4, atol=1e-3 * data.max())
    seg = to_native(res.dseg, res.model_affine, native, mode="nearest")
    assert np.array_equal(seg[inside], labels[inside])


def test_round_trip_96_and_dseg(ixi_root: Path, tmp_path: Path) -> None:
    """T1 -> 96³ model grid -> native reproduces the T1 and the dseg inside the brain."""
    out = tmp_path / "o96"
    ingest_mri(out, bids=ixi_root, subjects=[FIRST[2]], shape=(96, 96, 96), progress=False, **PLAIN)
    pre = load_preproc(out)
    assert tuple(pre["images"].shape) == (1, 1, 96, 96, 96)
    np.testing.assert_allclose(pre["model_affines"][0, 0, 0].item(), 224.0 / 96)
    native = nib.load(pre["t1_paths"][0])
    labels = np.asarray(nib.load(pre["dseg_paths"][0]).dataobj).astype(np.int16)
    brain = labels > 0
    back = to_native(pre["images"][0, 0].numpy(), pre["model_affines"][0].numpy(), native)
    corr = np.corrcoef(back[brain], native.get_fdata()[brain])[0, 1]
    assert corr > 0.95
    seg = to_native(
        pre["dseg"][0, 0].numpy(), pre["model_affines"][0].numpy(), native, mode="nearest"
    )
    assert seg.dtype == np.int16
    # nearest -> nearest through 2.33 mm voxels: ~90 % (measured 0.90); 3.5 mm gives ~0.76
    assert (seg[brain] == labels[brain]).mean() > 0.85


# ------------------------------------------------------------------ sample sheet


def test_sample_sheet(ixi_root: Path, tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    rows = []
    for sid, dx in zip(FIRST[:2], ["disease", "control"], strict=True):
        os.symlink(_t1(ixi_root, sid), tmp_path / "img" / f"{sid}_T1w.nii.gz")
        rows.append({"subject": sid, "t1": f"img/{sid}_T1w.nii.gz", "dseg": "", "diagnosis": dx})
    pd.DataFrame(rows).to_csv(tmp_path / "sheet.csv", index=False)
    out = tmp_path / "out"
    ingest_mri(
        out,
        sheet=tmp_path / "sheet.csv",
        label_column="diagnosis",
        positive_class="disease",
        progress=False,
        **PLAIN,
    )
    pre = load_preproc(out / "preproc.pt")
    assert pre["dseg"] is None and pre["dseg_paths"] == ["", ""]
    assert pre["y"].tolist() == [1.0, 0.0] and pre["positive_class"] == "disease"
    assert pre["t1_paths"][0] == str(_t1(ixi_root, FIRST[0]).resolve())


def test_label_groups_from_a_numeric_column(ixi_root: Path, tmp_path: Path) -> None:
    """IXI age -> young / old classes; subjects in between or without an age are left out."""
    from neuroexplain.mri.bids import apply_label_groups, find_bids_subjects, parse_label_groups

    part = pd.read_csv(ixi_root / "participants.tsv", sep="\t")
    age = pd.to_numeric(part["age"], errors="coerce")
    cohort = find_bids_subjects(ixi_root, label_column="age")
    grouped = apply_label_groups(cohort, parse_label_groups(["young=<40", "old=>60"]))
    labels = {r.subject: r.label for r in grouped.records}
    assert sum(v == "young" for v in labels.values()) == int((age < 40).sum())
    assert sum(v == "old" for v in labels.values()) == int((age > 60).sum())
    for sid, a in zip(part["participant_id"], age, strict=True):
        assert labels.get(sid) == ("young" if a < 40 else "old" if a > 60 else None), sid
    # a range, inclusive bounds
    groups = parse_label_groups({"a": "20..40", "b": ">=60"})
    assert groups == {"a": ("..", 20.0, 40.0), "b": (">=", 60.0, None)}
    for bad, msg in (
        (["young<40", "old=>60"], "NAME=CONDITION"),
        (["young=~40", "old=>60"], "expected a condition"),
        (["young=<40"], "at least two groups"),
    ):
        with pytest.raises(InputError, match=msg):
            parse_label_groups(bad)
    with pytest.raises(InputError, match="overlap"):
        apply_label_groups(cohort, parse_label_groups(["a=<50", "b=<60"]))
    with pytest.raises(InputError, match="not a number"):
        apply_label_groups(
            find_bids_subjects(ixi_root, label_column="sex"), parse_label_groups(["a=<1", "b=>2"])
        )
    # through the command: two subjects, one per group
    young = part.loc[age < 40, "participant_id"].iloc[0]
    old = part.loc[age > 60, "participant_id"].iloc[0]
    out = tmp_path / "o"
    ingest_mri(
        out,
        bids=ixi_root,
        label_column="age",
        positive_class="old",
        label_groups=["young=<40", "old=>60"],
        subjects=[young, old],
        progress=False,
        **PLAIN,
    )
    pre = load_preproc(out / "preproc.pt")
    assert dict(zip(pre["subjects"], pre["y"].tolist(), strict=True)) == {young: 0.0, old: 1.0}
    meta = json.loads((out / "ingest.json").read_text())
    assert meta["class_counts"] == {"old": 1, "young": 1}


# ------------------------------------------------------------------ bad inputs


def _bids(
    tmp: Path, ixi: Path, subjects: list[str], labels: list[str] | None = None, dseg: bool = True
) -> Path:
    """A small BIDS dataset of symlinks to real IXI subjects."""
    root = tmp / "bids"
    for sid in subjects:
        (root / sid / "anat").mkdir(parents=True)
        if _t1(ixi, sid).exists():
            os.symlink(_t1(ixi, sid), _t1(root, sid))
        if dseg and _dseg(ixi, sid).exists():
            _dseg(root, sid).parent.mkdir(parents=True)
            os.symlink(_dseg(ixi, sid), _dseg(root, sid))
    table = {"participant_id": subjects}
    if labels is not None:
        table["diagnosis"] = labels
    pd.DataFrame(table).to_csv(root / "participants.tsv", sep="\t", index=False)
    return root


def _save(img_data: np.ndarray, path: Path, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(img_data, np.eye(4) * 2 if affine is None else affine), str(path))


def _case(name: str, tmp: Path, ixi: Path) -> tuple[Path, list[str], str]:
    """Build one broken dataset; return (bids root, extra CLI args, file name in the message)."""
    bad = "sub-AAA"  # sorts first, so the run fails on it straight away
    real = FIRST[:2]
    if name == "missing_participants":
        root = _bids(tmp, ixi, real)
        (root / "participants.tsv").unlink()
        return root, [], "participants.tsv"
    if name == "missing_t1":
        return _bids(tmp, ixi, [bad, *real]), [], "participants.tsv"
    if name == "label_column_absent":
        return _bids(tmp, ixi, real), ["--label-column", "diagnosis"], "participants.tsv"
    if name == "one_class":
        return (
            _bids(tmp, ixi, real, ["control", "control"]),
            ["--label-column", "diagnosis"],
            "participants.tsv",
        )
    if name == "missing_label":
        return (
            _bids(tmp, ixi, real, ["disease", "n/a"]),
            ["--label-column", "diagnosis"],
            "participants.tsv",
        )
    if name == "bad_positive_class":
        return (
            _bids(tmp, ixi, real, ["disease", "control"]),
            ["--label-column", "diagnosis", "--positive-class", "patient"],
            "participants.tsv",
        )
    root = _bids(tmp, ixi, [bad, *real])
    t1, dseg = _t1(root, bad), _dseg(root, bad)
    ref = nib.load(_t1(ixi, real[0]))
    if name == "truncated_gz":
        blob = _t1(ixi, real[0]).read_bytes()
        t1.write_bytes(blob[: len(blob) // 2])
        dseg.parent.mkdir(parents=True)
        os.symlink(_dseg(ixi, real[0]), dseg)
        return root, [], t1.name
    if name == "not_gzip":
        t1.write_bytes(gzip.compress(b"this is not a nifti file" * 10))
        return root, ["--derivatives", ""], t1.name
    if name == "4d":
        _save(np.ones((12, 12, 12, 2), np.float32), t1)
        return root, ["--derivatives", ""], t1.name
    if name == "2d":
        _save(np.ones((12, 12), np.float32), t1)
        return root, ["--derivatives", ""], t1.name
    if name == "nan":
        data = np.ones((12, 12, 12), np.float32)
        data[3, 4, 5] = np.nan
        _save(data, t1)
        return root, ["--derivatives", ""], t1.name
    if name == "dseg_grid_mismatch":
        os.symlink(_t1(ixi, real[0]), t1)
        shifted = ref.affine.copy()
        shifted[:3, 3] += 4.0
        _save(np.asarray(nib.load(_dseg(ixi, real[0])).dataobj).astype(np.int16), dseg, shifted)
        return root, [], dseg.name
    raise AssertionError(name)


CASES = [
    "missing_participants",
    "missing_t1",
    "label_column_absent",
    "one_class",
    "missing_label",
    "bad_positive_class",
    "truncated_gz",
    "not_gzip",
    "4d",
    "2d",
    "nan",
    "dseg_grid_mismatch",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_input_error(case: str, ixi_root: Path, tmp_path: Path) -> None:
    root, args, fname = _case(case, tmp_path, ixi_root)
    label = args[args.index("--label-column") + 1] if "--label-column" in args else None
    positive = args[args.index("--positive-class") + 1] if "--positive-class" in args else None
    deriv = "" if "--derivatives" in args else "dlmuse"
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        ingest_mri(
            out,
            bids=root,
            derivatives=deriv or None,
            label_column=label,
            positive_class=positive,
            progress=False,
            **PLAIN,
        )
    assert fname in str(info.value)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("case", ["missing_t1", "one_class", "truncated_gz", "dseg_grid_mismatch"])
def test_bad_input_cli_one_line(case: str, ixi_root: Path, tmp_path: Path, capsys) -> None:
    root, args, fname = _case(case, tmp_path, ixi_root)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["ingest-mri", "--bids", str(root), "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == err[-1] and fname in errors[0]
    assert not out.exists() or not any(out.iterdir())


def test_sheet_and_option_errors(ixi_root: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.tsv"
    pd.DataFrame(
        {
            "subject": FIRST[:2],
            "t1": [str(_t1(ixi_root, s)) for s in FIRST[:2]],
            "dseg": [str(_dseg(ixi_root, FIRST[0])), ""],
        }
    ).to_csv(sheet, sep="\t", index=False)
    with pytest.raises(InputError, match=r"sheet\.tsv.*dseg given for some"):
        ingest_mri(tmp_path / "o", sheet=sheet)
    pd.DataFrame({"subject": ["a"], "t1": ["nope.nii.gz"]}).to_csv(sheet, sep="\t", index=False)
    with pytest.raises(InputError, match=r"sheet\.tsv.*not found"):
        ingest_mri(tmp_path / "o", sheet=sheet)
    with pytest.raises(InputError, match=r"exactly one of"):
        ingest_mri(tmp_path / "o")
    with pytest.raises(InputError, match=r"participants\.tsv.*sub-XYZ"):
        ingest_mri(tmp_path / "o", bids=ixi_root, subjects=["sub-XYZ"])
    assert not (tmp_path / "o").exists()


def test_real_missing_label_value(ixi_root: Path, tmp_path: Path) -> None:
    """IXI's participants.tsv has sex = n/a for one subject: a clear error, not a third class."""
    with pytest.raises(InputError, match=r"participants\.tsv.*sub-IXI643HH2787.*--subjects"):
        ingest_mri(tmp_path / "o", bids=ixi_root, label_column="sex")
    assert not (tmp_path / "o").exists()


def test_load_preproc_rejects_bad_files(tmp_path: Path, ingested: Path) -> None:
    with pytest.raises(InputError, match=r"missing\.pt"):
        load_preproc(tmp_path / "missing.pt")
    blob = (ingested / "preproc.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(InputError, match=r"trunc\.pt"):
        load_preproc(tmp_path / "trunc.pt")
    torch.save({"images": torch.zeros(1, 1, 8, 8, 8)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match=r"other\.pt.*missing keys"):
        load_preproc(tmp_path / "other.pt")


def test_grid_argument_forms(ingested: Path) -> None:
    pre = load_preproc(ingested)
    vol = pre["images"][1, 0].numpy()
    maff = pre["model_affines"][1].numpy()
    g = native_grid(pre, 1)
    a = to_native(vol, maff, g)
    b = to_native(vol, maff, (g.affine, g.shape))
    c = to_native(vol, maff, nib.load(pre["t1_paths"][1]))
    assert isinstance(g, Grid) and np.array_equal(a, b) and np.array_equal(a, c)


@pytest.mark.slow
def test_all_ixi_subjects_fit(ixi_root: Path, tmp_path: Path) -> None:
    """All 100 subjects: the whole labelled brain lies inside the 224 mm model grid."""
    summary = ingest_mri(tmp_path / "all", bids=ixi_root, workers=2, progress=False, **PLAIN)
    assert summary["n_subjects"] == 100 and summary["n_brain_cropped"] == 0
    table = pd.read_csv(tmp_path / "all" / "subjects.tsv", sep="\t")
    assert (table["brain_kept"] == 1.0).all()


def test_align_labels_puts_anatomy_at_the_same_voxels(ixi_root: Path, tmp_path: Path) -> None:
    """--align labels: hippocampus centroids agree across subjects; maps still go home exactly."""
    from scipy import ndimage

    from neuroexplain.mri.preprocess import fit_affine

    spread = {}
    for align in ("none", "labels"):
        out = tmp_path / align
        ingest_mri(
            out, bids=ixi_root, limit=4, shape=(32, 32, 32), align=align, mask="none",
            fov_mm=224.0, progress=False,
        )  # fmt: skip
        d = load_preproc(out / "preproc.pt")
        cents = np.array([ndimage.center_of_mass(d["dseg"][i, 0].numpy() == 47) for i in range(4)])
        spread[align] = float(np.linalg.norm(cents - cents.mean(0), axis=1).mean())
        assert d["params"]["align"] == align
    # 7 mm voxels: unaligned hippocampi scatter by ~6 mm, aligned ones by about half that
    assert spread["labels"] < 0.7 * spread["none"], spread
    assert spread["labels"] < 0.6, spread

    # the native mapping stays exact: a linear function of native world coordinates survives
    d = load_preproc(tmp_path / "labels" / "preproc.pt")
    i = 2
    grid = native_grid(d, i)
    m_aff = d["model_affines"][i].numpy()
    idx = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"), -1).reshape(-1, 3)
    world = idx @ m_aff[:3, :3].T + m_aff[:3, 3]
    model_vals = (world @ np.array([0.3, -0.2, 0.1])).reshape(32, 32, 32)
    native = to_native(model_vals, m_aff, grid)
    nidx = np.argwhere(native != 0)[::97]
    nworld = nidx @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    expected = nworld @ np.array([0.3, -0.2, 0.1])
    mvox = (np.linalg.inv(m_aff) @ np.c_[nworld, np.ones(len(nworld))].T)[:3]
    inside = np.all((mvox >= 0) & (mvox <= 31), 0)  # between the outermost model voxel centres
    np.testing.assert_allclose(native[tuple(nidx[inside].T)], expected[inside], atol=1e-3)

    # the affine fit recovers a known affine from points
    rng = np.random.default_rng(0)
    pts = {k: rng.normal(size=3) * 50 for k in range(20)}
    true = np.array([[1.1, 0.1, 0, 3], [0, 0.9, 0.05, -2], [0.02, 0, 1.05, 1], [0, 0, 0, 1]])
    moved = {k: (true @ np.r_[p, 1])[:3] for k, p in pts.items()}
    np.testing.assert_allclose(fit_affine(pts, moved), true, atol=1e-9)


def test_align_labels_needs_dseg(ixi_root: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--align"):
        ingest_mri(
            tmp_path / "o", bids=ixi_root, derivatives=None, limit=2, align="labels", mask="none"
        )
    assert not (tmp_path / "o").exists()


def test_brain_mask_and_groups(ixi_root: Path, tmp_path: Path) -> None:
    """--mask brain zeroes what lies beyond the dilated dseg > 0; groups come from the table."""
    from scipy import ndimage

    from neuroexplain.mri.ingest import brain_mask

    root = _bids(tmp_path, ixi_root, FIRST)
    table = pd.read_csv(root / "participants.tsv", sep="\t")
    table["source_subject"] = ["a", "a", "b"]  # as a paired make-cohort output has it
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    common = dict(bids=root, shape=(32, 32, 32), fov_mm=192.0, align="none", progress=False)
    plain = ingest_mri(tmp_path / "plain", mask="none", **common) and tmp_path / "plain"
    plain = load_preproc(plain)
    masked = load_preproc(
        ingest_mri(tmp_path / "m", mask="brain", mask_margin_mm=6.0, **common) and tmp_path / "m"
    )
    assert masked["groups"] == ["a", "a", "b"] and plain["groups"] == ["a", "a", "b"]
    assert masked["params"]["mask"] == "brain"
    brain = masked["dseg"].numpy() > 0
    keep = brain_mask(brain, 1.0) > 0  # 6 mm at 6 mm voxels: one voxel (6-neighbourhood)
    cross = ndimage.generate_binary_structure(3, 1)[None, None]
    np.testing.assert_array_equal(keep, ndimage.binary_dilation(brain, cross))
    img, ref = masked["images"].numpy(), plain["images"].numpy()
    np.testing.assert_array_equal(img[keep], ref[keep])
    assert np.all(img[~keep] == 0) and np.abs(ref[~keep]).sum() > 100  # the scalp is gone
    assert keep.sum() > brain.sum()  # the margin keeps the brain's border
    sheet_groups = pd.read_csv(tmp_path / "m" / "subjects.tsv", sep="\t")["group"].tolist()
    assert sheet_groups == ["a", "a", "b"]
    with pytest.raises(InputError, match="group column 'site' not found"):
        ingest_mri(tmp_path / "x", group_column="site", **common)
    with pytest.raises(InputError, match="--mask"):
        ingest_mri(tmp_path / "x", mask="skull", **common)
    assert not (tmp_path / "x").exists()


def test_preproc_assembly_releases_each_subject() -> None:
    """Assembling preproc.pt copies subject by subject (one copy of the data in memory, not three)
    and masks each subject as the whole-cohort mask would."""
    from types import SimpleNamespace

    from neuroexplain.mri.ingest import _preproc_data, brain_mask
    from neuroexplain.mri.preprocess import Preprocessed
    from neuroexplain.settings import MRIIngestConfig

    rng = np.random.default_rng(0)
    shape = (12, 10, 8)
    images = rng.random((3, *shape), dtype=np.float32)
    labels = np.zeros((3, *shape), np.int16)
    for i in range(3):
        labels[i, 3 + i : 8, 3:7, 2:6] = 4 + i
    results = [
        Preprocessed(images[i].copy(), labels[i].copy(), np.eye(4), np.eye(4), (20, 20, 20),
                     np.ones(3), np.zeros((3, 2)), 1.0)
        for i in range(3)
    ]  # fmt: skip
    recs = [SimpleNamespace(subject=f"s{i}", label="x", t1=f"t{i}", dseg=f"d{i}", group="")
            for i in range(3)]  # fmt: skip
    cohort = SimpleNamespace(dseg_names={})
    ing = SimpleNamespace(recs=recs, results=results, has_dseg=True, spacing=2.0,
                          y=np.zeros(3), positive=None, cohort=cohort)  # fmt: skip
    cfg = MRIIngestConfig(shape=shape, mask="brain", mask_margin_mm=2.0)
    data = _preproc_data(ing, cfg, {}, {})
    expected = images[:, None] * brain_mask(labels[:, None] > 0, 1.0)
    np.testing.assert_array_equal(data["images"].numpy(), expected)
    np.testing.assert_array_equal(data["dseg"].numpy(), labels[:, None])
    assert data["images"].dtype == torch.float32 and data["dseg"].dtype == torch.int16
    assert all(r.image is None and r.dseg is None for r in results)  # released as copied
    assert [tuple(r.native_shape) for r in results] == [(20, 20, 20)] * 3  # the rest is kept
