"""Synthetic disease cohort: ground truth, carried labels, controls, bad input (real IXI data)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from neuroexplain.errors import InputError
from neuroexplain.io.nifti import sidecar_path
from neuroexplain.jacobian import jacobian_determinant
from neuroexplain.synth import fields as F
from neuroexplain.synth.cohort import make_cohort, plant_subject

SHRINK, ENLARGE = [47, 48], [51, 52]
GT = "derivatives/groundtruth"


def _data(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _gt(root: Path, sub: str, desc: str) -> Path:
    return root / GT / sub / "anat" / f"{sub}_desc-{desc}.nii.gz"


def _source(ixi: Path, sub: str) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray]:
    img = nib.load(str(ixi / sub / "anat" / f"{sub}_T1w.nii.gz"))
    lab = _data(ixi / "derivatives" / "dlmuse" / sub / "anat" / f"{sub}_dseg.nii.gz")
    return img, np.asarray(img.dataobj), lab.astype(np.int32)


def _pullback_vox(root: Path, sub: str, affine: np.ndarray) -> np.ndarray:
    """The saved disease displacement (mm, RAS+) back in voxel units, (3, X, Y, Z)."""
    world = _data(_gt(root, sub, "disease_xfm"))[:, :, :, 0, :].astype(np.float64)
    return np.einsum("ab,...b->a...", np.linalg.inv(affine[:3, :3]), world)


@pytest.fixture(scope="module")
def cohort(ixi_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "cohort"
    make_cohort(
        ixi_root, out, shrink=SHRINK, enlarge=ENLARGE, paired=False, fraction=0.5,
        magnitude_min=0.15, magnitude_max=0.30, seed=3, limit=4,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def participants(cohort) -> pd.DataFrame:
    return pd.read_csv(cohort / "participants.tsv", sep="\t")


def test_layout_and_balance(cohort, participants, ixi_root):
    assert len(participants) == 4
    assert (participants["diagnosis"] == "disease").sum() == 2  # round(0.5 * 4) exactly
    src_ids = sorted(p.name for p in ixi_root.glob("sub-*"))[:4]
    assert participants["participant_id"].tolist() == src_ids
    assert (participants["source_subject"] == participants["participant_id"]).all()
    assert {"sex", *(f"volume_change_{r}" for r in SHRINK + ENLARGE)} <= set(participants)
    dis = participants[participants["diagnosis"] == "disease"]
    ctl = participants[participants["diagnosis"] == "control"]
    assert dis["effect_magnitude"].between(0.15, 0.30).all()
    assert (ctl["effect_magnitude"] == 0).all()
    for r in SHRINK + ENLARGE:  # realised change = drawn magnitude, with the right sign
        sign = -1 if r in SHRINK else 1
        np.testing.assert_allclose(
            dis[f"volume_change_{r}"], sign * dis["effect_magnitude"], atol=1e-3
        )
        assert (ctl[f"volume_change_{r}"] == 0).all()
    desc = json.loads((cohort / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Name"].endswith("make-cohort")
    prov = json.loads((cohort / "cohort.json").read_text())
    assert prov["seed"] == 3 and prov["params"]["shrink"] == SHRINK and prov["inputs"]
    assert prov["summary"]["min_det"] > 0.3  # invertible, far from folding
    assert (cohort / "derivatives" / "dlmuse" / "dseg.tsv").exists()
    assert not list(cohort.parent.glob(".cohort*"))  # no temporary leftovers
    for sub in participants["participant_id"]:
        for desc_ in ("disease_jacobian", "disease_logjacobian", "planted_mask", "disease_xfm"):
            assert _gt(cohort, sub, desc_).exists()
            assert sidecar_path(_gt(cohort, sub, desc_)).exists()
        assert not _gt(cohort, sub, "nuisance_logjacobian").exists()  # nuisance off


def test_logjacobian_sign_in_planted_regions(cohort, participants, ixi_root):
    for sub in participants.loc[participants["diagnosis"] == "disease", "participant_id"]:
        logj = _data(_gt(cohort, sub, "disease_logjacobian"))
        lab = _data(cohort / "derivatives" / "dlmuse" / sub / "anat" / f"{sub}_dseg.nii.gz")
        for r in SHRINK:
            assert logj[lab == r].mean() < -0.05
        for r in ENLARGE:
            assert logj[lab == r].mean() > 0.05
        # the effect is local: beyond the kernel radius (5 sigma = 10 voxels) nothing changes
        planted = np.isin(lab, SHRINK + ENLARGE)
        cube = ndi.generate_binary_structure(3, 3)
        far = ~ndi.binary_dilation(planted, cube, iterations=12)
        assert np.all(logj[far] == 0)


def test_label_volumes_agree_with_jacobian_integral(cohort, participants, ixi_root):
    """|V(carried labels) - integral_R det(D psi)| / integral < 2 %, psi from the saved field."""
    worst = 0.0
    for sub in participants.loc[participants["diagnosis"] == "disease", "participant_id"]:
        img, _, src_lab = _source(ixi_root, sub)
        w = _pullback_vox(cohort, sub, img.affine)
        jac = _data(_gt(cohort, sub, "disease_jacobian")).astype(np.float64)
        lab = _data(cohort / "derivatives" / "dlmuse" / sub / "anat" / f"{sub}_dseg.nii.gz")
        for r in SHRINK + ENLARGE:
            y = np.stack(np.nonzero(src_lab == r)).astype(np.float64)
            z, info = F.invert_at_points(w, y)  # psi(y): the healthy voxel in diseased space
            assert info.converged and info.max_residual < 1e-4
            v_gt = F.sample(jac, z, order=3).sum()  # integral over R of det(D psi), voxels
            v_lab = int((lab == r).sum())
            rel = abs(v_lab - v_gt) / v_gt
            worst = max(worst, rel)
            assert rel < 0.02, (sub, r, v_lab, v_gt)
            change = v_lab / (src_lab == r).sum() - 1
            assert (change < -0.1) if r in SHRINK else (change > 0.1)
    print(f"max relative label-vs-Jacobian volume difference: {worst:.4f}")


def test_numeric_jacobian_of_saved_field_matches_ground_truth(cohort, participants, ixi_root):
    sub = participants.loc[participants["diagnosis"] == "disease", "participant_id"].iloc[0]
    img, _, _ = _source(ixi_root, sub)
    w = _pullback_vox(cohort, sub, img.affine)
    jac = _data(_gt(cohort, sub, "disease_jacobian")).astype(np.float64)
    numeric = jacobian_determinant(np.moveaxis(w, 0, -1))  # central differences, voxel units
    support = np.any(w != 0, axis=0)
    err = np.abs(numeric - 1.0 / jac)
    assert err.max() < 0.1  # finite-difference truncation on a sigma = 2 voxel field
    assert err[support].mean() < 5e-3
    assert np.corrcoef(numeric[support], 1.0 / jac[support])[0, 1] > 0.995
    # mm along voxel axes with the voxel size as spacing: the same determinant
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    mm = np.moveaxis(w * zooms[:, None, None, None], 0, -1)
    np.testing.assert_allclose(jacobian_determinant(mm, zooms), numeric, atol=1e-10)


def test_controls_are_untouched(cohort, participants, ixi_root):
    for sub in participants.loc[participants["diagnosis"] == "control", "participant_id"]:
        img, t1, lab = _source(ixi_root, sub)
        out_img = nib.load(str(cohort / sub / "anat" / f"{sub}_T1w.nii.gz"))
        assert out_img.get_data_dtype() == np.float32
        np.testing.assert_array_equal(np.asarray(out_img.dataobj), t1.astype(np.float32))
        np.testing.assert_array_equal(out_img.affine, img.affine)
        assert out_img.header.get_sform(coded=True)[1] == img.header.get_sform(coded=True)[1]
        assert np.all(_data(_gt(cohort, sub, "disease_logjacobian")) == 0)
        assert np.all(_data(_gt(cohort, sub, "disease_jacobian")) == 1)
        assert np.all(_data(_gt(cohort, sub, "disease_xfm")) == 0)
        out_lab = _data(cohort / "derivatives" / "dlmuse" / sub / "anat" / f"{sub}_dseg.nii.gz")
        np.testing.assert_array_equal(out_lab, lab)


def test_diseased_t1_changes_only_near_the_effect(cohort, participants, ixi_root):
    sub = participants.loc[participants["diagnosis"] == "disease", "participant_id"].iloc[0]
    _, t1, _ = _source(ixi_root, sub)
    out = np.asarray(nib.load(str(cohort / sub / "anat" / f"{sub}_T1w.nii.gz")).dataobj)
    logj = _data(_gt(cohort, sub, "disease_logjacobian"))
    moved = np.any(_data(_gt(cohort, sub, "disease_xfm")) != 0, axis=(3, 4))
    assert np.any(out != t1)
    # copied where nothing moves (float32 of the source values, as for controls)
    np.testing.assert_array_equal(out[~moved], t1.astype(np.float32)[~moved])
    assert out.min() >= t1.min() and out.max() <= t1.max()
    assert np.abs(logj).max() > 0.1


# ------------------------------------------------------------------ in-memory, synthetic labels
def _spheres(shape=(40, 40, 40)):
    idx = np.indices(shape).astype(float)
    lab = np.ones(shape, dtype=np.int32)  # "tissue"
    for label, centre, radius in ((5, (13, 20, 20), 5.0), (6, (28, 20, 20), 6.0)):
        d = np.sqrt(sum((idx[a] - c) ** 2 for a, c in enumerate(centre)))
        lab[d <= radius] = label
    t1 = (lab * 20.0).astype(np.float32)
    return t1, lab


def test_plant_subject_spheres_and_determinism():
    t1, lab = _spheres()
    kw = {"shrink": [5], "enlarge": [6], "magnitude": 0.2, "nuisance": 1.5, "sigma": 3.0}
    a = plant_subject(t1, lab, (1.5, 1.5, 1.5), rng=np.random.default_rng(7), **kw)
    b = plant_subject(t1, lab, (1.5, 1.5, 1.5), rng=np.random.default_rng(7), **kw)
    np.testing.assert_array_equal(a.t1, b.t1)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.jacobian, b.jacobian)
    assert a.t1.dtype == np.float32
    assert a.stats["volume_change"][5] == pytest.approx(-0.2, abs=1e-3)
    assert a.stats["volume_change"][6] == pytest.approx(0.2, abs=1e-3)
    for r, sign in ((5, -1), (6, 1)):
        assert sign * np.log(a.jacobian[a.labels == r]).mean() > 0.05
        rel = a.stats["label_volume_vox"][r] / (
            (1 + a.stats["volume_change"][r]) * a.stats["healthy_volume_vox"][r]
        )
        assert abs(rel - 1) < 0.03
    assert a.nuisance_logjacobian is not None and np.abs(a.nuisance_logjacobian).max() > 0.01
    assert a.stats["nuisance_min_det"] > 0.5
    # a control with nuisance: no disease ground truth, deformed image
    c = plant_subject(t1, lab, (1.5,) * 3, rng=np.random.default_rng(7), **{**kw, "magnitude": 0})
    assert np.all(c.jacobian == 1) and np.all(c.ddf == 0)
    assert np.any(c.t1 != t1) and c.stats["volume_change"] == {5: 0.0, 6: 0.0}


def test_nearest_neighbour_labels_miss_subvoxel_change():
    """Why labels are carried by partial volume: a 20 % shrink moves the boundary < 0.5 voxel."""
    t1, lab = _spheres()
    eff = plant_subject(t1, lab, (2.0,) * 3, shrink=[5], enlarge=[], magnitude=0.2, sigma=3.0)
    moved = np.any(eff.ddf != 0, axis=0)
    coords = np.stack(np.nonzero(moved)).astype(float) + eff.ddf[:, moved]
    nn = lab.copy()
    nn[moved] = F.warp_labels(lab, coords, method="nearest")
    target = (lab == 5).sum() * (1 + eff.stats["volume_change"][5])
    err_nn = abs((nn == 5).sum() - target) / target
    err_carried = abs((eff.labels == 5).sum() - target) / target
    assert err_carried < 0.02 < err_nn


def test_invert_displacement_round_trip():
    rng = np.random.default_rng(0)
    w = np.stack([ndi.gaussian_filter(rng.normal(size=(24, 22, 20)), 3.0) * 8 for _ in range(3)])
    inv, info = F.invert_displacement(w)
    assert info.converged and info.max_residual < 1e-4
    y = np.stack(np.meshgrid(*[np.arange(5, 15.0)] * 3, indexing="ij")).reshape(3, -1)
    z = y + np.stack([F.sample(inv[a], y) for a in range(3)])  # psi(y)
    back = z + np.stack([F.sample(w[a], z) for a in range(3)])  # phi(psi(y))
    assert np.abs(back - y).max() < 1e-3


def test_gaussian_derivatives_are_exact_derivatives():
    """For one impulse, the filters return the analytic derivatives of the (normalised) kernel."""
    img = np.zeros((25, 25, 25))
    img[12, 12, 12] = 1.0
    sig = np.array([2.0, 1.5, 2.5])
    s, g, h = F.gaussian_derivatives(img, sig)
    d = np.indices(img.shape).astype(float) - 12.0
    kernel = np.exp(-0.5 * sum((d[a] / sig[a]) ** 2 for a in range(3)))
    radius = (F.TRUNCATE * sig + 0.5).astype(int)  # scipy cuts each axis at this many voxels
    kernel *= np.all(np.abs(d) <= radius[:, None, None, None], axis=0)
    np.testing.assert_allclose(s, kernel * s[12, 12, 12], atol=1e-15)  # one separable kernel
    for a in range(3):
        np.testing.assert_allclose(g[a], -d[a] / sig[a] ** 2 * s, atol=1e-15)
        for b in range(3):
            expect = d[a] * d[b] / (sig[a] ** 2 * sig[b] ** 2) * s - (a == b) / sig[a] ** 2 * s
            np.testing.assert_allclose(h[a, b], expect, atol=1e-15)


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shrink", "47,999"], "999"),
        (["--fraction", "1.5"], "--fraction"),
        (["--shrink", "47,51"], "both shrunk and enlarged"),
        (["--magnitude-max", "0.95"], "--magnitude"),
        (["--magnitude-min", "0.3", "--magnitude-max", "0.2"], "--magnitude"),
        (["--shrink", "a,b"], "--shrink"),
        (["--workers", "0"], "--workers"),
        (["--label-probability", "0"], "--label-probability"),
    ],
)
def test_cli_bad_input_leaves_nothing(ixi_root, tmp_path, capsys, args, message):
    from neuroexplain.cli import main

    out = tmp_path / "cohort"
    code = main(["make-cohort", "--bids", str(ixi_root), "--out", str(out), "--limit", "2", *args])
    assert code != 0
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_label_names_the_dseg_file(ixi_root, tmp_path):
    with pytest.raises(InputError, match=r"_dseg\.nii\.gz.*999"):
        make_cohort(ixi_root, tmp_path / "c", shrink=[999], enlarge=[], limit=1)
    assert not list(tmp_path.iterdir())


def test_missing_bids_and_refusal_to_overwrite(tmp_path, ixi_root):
    with pytest.raises(InputError, match="no such folder"):
        make_cohort(tmp_path / "nope", tmp_path / "c")
    other = tmp_path / "precious"
    other.mkdir()
    (other / "data.txt").write_text("keep me")
    with pytest.raises(InputError, match="refusing"):
        make_cohort(ixi_root, other, limit=1)
    assert (other / "data.txt").read_text() == "keep me"


def test_failure_midway_leaves_no_output(ixi_root, tmp_path, monkeypatch):
    """An error while writing subjects removes the whole partial output folder."""
    from neuroexplain.synth import cohort as C

    calls = {"n": 0}
    real = C.plant_subject

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise F.CalibrationError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "plant_subject", flaky)
    out = tmp_path / "c"
    with pytest.raises(InputError, match="boom"):
        make_cohort(ixi_root, out, paired=False, fraction=0.0, limit=2)
    assert calls["n"] == 2
    assert not out.exists() and not list(tmp_path.iterdir())


def test_zero_magnitude_keeps_the_assignment(ixi_root, tmp_path):
    out = make_cohort(
        ixi_root, tmp_path / "c", paired=False, magnitude_min=0.0, magnitude_max=0.0, limit=2,
        seed=0,
    )  # fmt: skip
    table = pd.read_csv(out / "participants.tsv", sep="\t")
    assert sorted(table["diagnosis"]) == ["control", "disease"]  # balanced even at magnitude 0
    assert (table["effect_magnitude"] == 0).all()


def test_worker_count_does_not_change_a_byte(ixi_root, tmp_path):
    """Each subject is planted from the seed and its source id, not from the worker that runs
    it: 1 and 2 worker processes write the same files, byte for byte (the slow test below has
    the nuisance field's random stream on 2 workers)."""
    trees = []
    for workers in (1, 2):
        out = make_cohort(
            ixi_root, tmp_path / f"w{workers}", shrink=SHRINK, enlarge=ENLARGE, paired=False,
            fraction=0.5, magnitude_min=0.2, magnitude_max=0.3, seed=1, limit=2, workers=workers,
        )  # fmt: skip
        trees.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()})
    assert len(trees[0]) > 20 and trees[0].keys() == trees[1].keys()
    assert [str(k) for k in trees[0] if trees[0][k] != trees[1][k]] == []
    table = pd.read_csv(tmp_path / "w2" / "participants.tsv", sep="\t")
    assert sorted(table["diagnosis"]) == ["control", "disease"]


@pytest.mark.slow
def test_more_subjects_with_nuisance_and_workers(ixi_root, tmp_path):
    out = tmp_path / "c"
    make_cohort(ixi_root, out, paired=False, fraction=0.5, nuisance=2.0, seed=1, limit=4, workers=2)
    prov = json.loads((out / "cohort.json").read_text())
    summary = prov["summary"]
    assert summary["n_disease"] == 2
    assert summary["min_det"] > 0.3 and summary["nuisance_min_det"] > 0.5
    assert summary["max_target_error"] < 1e-3
    assert summary["max_label_vs_jacobian_rel_diff"] < 0.02
    table = pd.read_csv(out / "participants.tsv", sep="\t")
    for sub in table["participant_id"]:
        nlj = _data(_gt(out, sub, "nuisance_logjacobian"))
        assert np.abs(nlj).max() > 0.01
    for sub in table.loc[table["diagnosis"] == "control", "participant_id"]:
        assert np.all(_data(_gt(out, sub, "disease_logjacobian")) == 0)


def test_paired_cohort_shares_anatomy_and_nuisance(ixi_root, tmp_path):
    """--paired: a control and a diseased version of one source, same nuisance field."""
    out = make_cohort(
        ixi_root, tmp_path / "c", limit=1, paired=True, nuisance=1.5, magnitude_min=0.2,
        magnitude_max=0.2,
    )  # fmt: skip
    table = pd.read_csv(out / "participants.tsv", sep="\t")
    src = sorted(p.name for p in ixi_root.glob("sub-*"))[0]
    assert table["participant_id"].tolist() == [f"{src}ctl", f"{src}dis"]
    assert table["diagnosis"].tolist() == ["control", "disease"]
    assert table["source_subject"].tolist() == [src, src]
    assert table["effect_magnitude"].tolist() == [0.0, 0.2]
    ctl = _data(out / f"{src}ctl" / "anat" / f"{src}ctl_T1w.nii.gz")
    dis = _data(out / f"{src}dis" / "anat" / f"{src}dis_T1w.nii.gz")
    source = np.asarray(nib.load(str(ixi_root / src / "anat" / f"{src}_T1w.nii.gz")).dataobj)
    assert not np.allclose(ctl, source)  # the nuisance deformation changed the anatomy ...
    moved = np.any(_data(_gt(out, f"{src}dis", "disease_xfm")) != 0, axis=(3, 4))
    assert 0 < moved.mean() < 0.2
    np.testing.assert_array_equal(ctl[~moved], dis[~moved])  # ... identically in both versions
    assert np.abs(ctl[moved] - dis[moved]).max() > 0
    assert np.all(_data(_gt(out, f"{src}ctl", "disease_logjacobian")) == 0)
    lj = _data(_gt(out, f"{src}dis", "disease_logjacobian"))
    assert lj.min() < -0.05 and lj.max() > 0.05
    assert json.loads((out / "cohort.json").read_text())["params"]["paired"] is True
    assert "Paired design" in (out / "README").read_text()


def test_label_probability_plants_a_random_subset_of_labels(ixi_root, tmp_path):
    """--label-probability < 1: each diseased subject gets its own subset of the labels."""
    labels = [47, 48, 59, 60, 57, 58, 51, 52]
    shrink, enlarge = labels[:6], labels[6:]
    out = make_cohort(
        ixi_root, tmp_path / "c", shrink=shrink, enlarge=enlarge, limit=2, paired=True,
        magnitude_min=0.3, magnitude_max=0.3, label_probability=0.3, seed=2,
    )  # fmt: skip
    table = pd.read_csv(out / "participants.tsv", sep="\t", keep_default_na=False)
    prov = json.loads((out / "cohort.json").read_text())
    assert prov["params"]["label_probability"] == 0.3
    assert prov["summary"]["max_target_error"] < 1e-3  # the affected labels hit their target
    dis = table[table["diagnosis"] == "disease"]
    subsets = []
    for _, row in dis.iterrows():
        hit = [int(r) for r in row["affected_labels"].split(",")]
        assert hit and set(hit) < set(labels)  # at least one, never all at p = 0.3 here
        subsets.append(hit)
        for r in labels:
            change = row[f"volume_change_{r}"]
            if r in hit:
                assert change == pytest.approx(-0.3 if r in shrink else 0.3, abs=1e-3)
            else:  # not planted: only what the neighbours' fields do to it
                assert abs(change) < 0.1
        sub = row["participant_id"]
        mask = _data(_gt(out, sub, "planted_mask")) > 0
        lab = _data(out / "derivatives" / "dlmuse" / sub / "anat" / f"{sub}_dseg.nii.gz")
        np.testing.assert_array_equal(mask, np.isin(lab, hit))
        side = json.loads(sidecar_path(_gt(out, sub, "planted_mask")).read_text())
        assert side["Labels"] == hit
    assert subsets[0] != subsets[1]
    assert (table.loc[table["diagnosis"] == "control", "affected_labels"] == "").all()


def test_label_probability_is_checked(ixi_root, tmp_path):
    for p in (0.0, 1.5):
        with pytest.raises(InputError, match="label-probability"):
            make_cohort(ixi_root, tmp_path / "c", limit=1, label_probability=p)
    assert not (tmp_path / "c").exists()
