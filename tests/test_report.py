"""Report figures (``neuroexplain figures``) on a tiny synthetic cohort written in ``tmp_path``."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neuroexplain.cli import main
from neuroexplain.errors import InputError
from neuroexplain.report import (
    GROUND_TRUTH,
    cut_coords,
    make_figures,
    pick_subjects,
    read_subjects,
    region_table,
)

SHAPE = (24, 22, 20)
AFFINE = np.array(
    [  # permuted voxel axes, as the IXI T1w
        [0.0, 0.0, -2.0, 30.0],
        [-2.0, 0.0, 0.0, 40.0],
        [0.0, 2.0, 0.0, -20.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
HIPPO, VENT = 47, 51
SUBJECTS = {"sub-01": 1, "sub-02": 0, "sub-03": 1, "sub-04": 0}  # id -> y
MAGNITUDE = {"sub-01": 0.2, "sub-03": 0.3}


def _save(data, path: Path, affine=AFFINE, dtype=np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, path)
    return path


def _dseg() -> np.ndarray:
    d = np.zeros(SHAPE, np.int16)
    d[2:22, 2:20, 2:18] = 1
    d[4:9, 4:9, 4:9] = HIPPO
    d[13:19, 12:18, 10:16] = VENT
    return d


def _logj(sub: str) -> np.ndarray:
    """Piecewise-constant ground truth: -m in the hippocampus, +m in the ventricles."""
    d = _dseg()
    m = MAGNITUDE.get(sub, 0.0)
    out = np.zeros(SHAPE, np.float32)
    out[d == HIPPO] = -m
    out[d == VENT] = m
    out[6, 6, 6] = -2 * m  # the largest |log J|: where the slices must cross
    return out


@pytest.fixture
def study(tmp_path: Path) -> dict[str, Path]:
    """Cohort (BIDS + ground truth), subjects.tsv, split.tsv and two map folders."""
    rng = np.random.default_rng(0)
    cohort = tmp_path / "cohort"
    rows = []
    for sub, y in SUBJECTS.items():
        t1 = _save(
            100 + 50 * rng.random(SHAPE) * (_dseg() > 0),
            cohort / sub / "anat" / f"{sub}_T1w.nii.gz",
        )
        dseg = _save(
            _dseg(),
            cohort / "derivatives" / "dlmuse" / sub / "anat" / f"{sub}_dseg.nii.gz",
            dtype=np.int16,
        )
        gt = cohort / "derivatives" / "groundtruth" / sub / "anat"
        _save(_logj(sub), gt / f"{sub}_desc-disease_logjacobian.nii.gz")
        # the simulator's disease map: half the ground truth; a saliency map: |ground truth|
        _save(
            0.5 * _logj(sub),
            tmp_path / "simulator" / sub / f"{sub}_desc-simulator_logjacobian.nii.gz",
        )
        _save(np.abs(_logj(sub)), tmp_path / "saliency" / sub / f"{sub}_desc-ig_saliency.nii.gz")
        rows.append({"participant_id": sub, "t1": str(t1), "dseg": str(dseg), "label": "", "y": y})
    pd.DataFrame(
        {
            "participant_id": list(SUBJECTS),
            "diagnosis": ["disease" if y else "control" for y in SUBJECTS.values()],
            "effect_magnitude": [MAGNITUDE.get(s, "") for s in SUBJECTS],
        }
    ).to_csv(cohort / "participants.tsv", sep="\t", index=False)
    for row in rows:
        row["label"] = "disease" if row["y"] else "control"
    subjects = tmp_path / "subjects.tsv"
    pd.DataFrame(rows).to_csv(subjects, sep="\t", index=False)
    split = tmp_path / "split.tsv"
    pd.DataFrame({"subject": list(SUBJECTS), "split": ["train", "test", "test", "test"]}).to_csv(
        split, sep="\t", index=False
    )
    return {
        "root": tmp_path,
        "cohort": cohort,
        "subjects": subjects,
        "split": split,
        "simulator": tmp_path / "simulator/{subject}/{subject}_desc-simulator_logjacobian.nii.gz",
        "saliency": tmp_path / "saliency",
    }


def _png_shape(path: Path) -> tuple[int, ...]:
    import matplotlib.image as mpimg

    return mpimg.imread(path).shape


def test_make_figures_writes_every_method_and_the_region_bars(study) -> None:
    out = study["root"] / "figures" / "maps"
    bars = study["root"] / "figures" / "regions_logjacobian.png"
    summary = make_figures(
        study["subjects"],
        out,
        cohort=study["cohort"],
        maps={"simulator": str(study["simulator"]), "ig": str(study["saliency"])},
        logjacobian_maps=["simulator"],
        split=study["split"],
        split_name="test",
        n_subjects=2,
        regions={"hippocampus": [HIPPO], "lateral_ventricles": [VENT]},
        regions_figure=bars,
    )
    # one figure per method, the ground truth first; only diseased test subjects are shown
    assert list(summary["figures"]) == [GROUND_TRUTH, "simulator", "ig"]
    assert summary["subjects"] == ["sub-03"]  # sub-01 is diseased but in the train split
    for method in summary["figures"]:
        h, w, _ = _png_shape(out / f"{method}.png")
        assert h > 100 and w > 300
    assert all("sub-03" in m for m in summary["figures"]["ig"]["maps"])

    # the slices cross at the ground truth's largest |log J| (voxel 6, 6, 6), in world mm
    expected = AFFINE @ np.array([6.0, 6.0, 6.0, 1.0])
    np.testing.assert_allclose(summary["cut_coords_mm"]["sub-03"], expected[:3])

    # the bar figure's table: every test subject (both groups), exact region means
    table = pd.read_csv(bars.with_suffix(".tsv"), sep="\t")
    assert set(table["subject"]) == {"sub-02", "sub-03", "sub-04"}
    assert set(table["source"]) == {GROUND_TRUTH, "simulator"}
    hippo = _dseg() == HIPPO
    gt_mean = float(_logj("sub-03")[hippo].mean())
    got = table.set_index(["subject", "source", "region"])["mean_logjacobian"]
    assert got[("sub-03", GROUND_TRUTH, "hippocampus")] == pytest.approx(gt_mean, rel=1e-6)
    assert got[("sub-03", "simulator", "hippocampus")] == pytest.approx(gt_mean / 2, rel=1e-6)
    assert got[("sub-03", GROUND_TRUTH, "lateral_ventricles")] == pytest.approx(0.3, rel=1e-6)
    assert got[("sub-02", GROUND_TRUTH, "hippocampus")] == 0.0
    assert _png_shape(bars)[0] > 100

    meta = json.loads((out / "figures.json").read_text())
    assert meta["provenance"]["command"] == "figures"
    assert "expanded" in meta["convention"]


def test_figures_without_cohort_cut_at_the_first_region(study) -> None:
    out = study["root"] / "nocohort"
    summary = make_figures(
        study["subjects"],
        out,
        maps={"ig": str(study["saliency"])},
        n_subjects=5,
        regions={"hippocampus": [HIPPO]},
    )
    assert list(summary["figures"]) == ["ig"]
    assert summary["subjects"] == ["sub-01", "sub-03"]  # all diseased subjects, no split
    centroid = np.argwhere(_dseg() == HIPPO).mean(axis=0)
    expected = AFFINE @ np.append(centroid, 1.0)
    np.testing.assert_allclose(summary["cut_coords_mm"]["sub-01"], expected[:3])
    assert not (out / f"{GROUND_TRUTH}.png").exists()


def test_map_on_another_grid_is_rejected(study) -> None:
    bad = study["root"] / "bad"
    shifted = AFFINE.copy()
    shifted[0, 3] += 4.0
    _save(np.zeros(SHAPE), bad / "sub-01" / "sub-01_desc-ig_saliency.nii.gz", affine=shifted)
    with pytest.raises(InputError, match="grid mismatch"):
        make_figures(study["subjects"], study["root"] / "out", maps={"ig": str(bad)}, n_subjects=1)
    assert not (study["root"] / "out" / "ig.png").exists()


def test_bad_options_are_input_errors(study) -> None:
    with pytest.raises(InputError, match="not among --maps"):
        make_figures(
            study["subjects"],
            study["root"] / "o1",
            maps={"ig": str(study["saliency"])},
            logjacobian_maps=["simulator"],
        )
    with pytest.raises(InputError, match="nothing to plot"):
        make_figures(study["subjects"], study["root"] / "o2")
    with pytest.raises(InputError, match="needs --cohort or --logjacobian-maps"):
        make_figures(
            study["subjects"],
            study["root"] / "o3",
            maps={"ig": str(study["saliency"])},
            regions={"hippocampus": [HIPPO]},
            regions_figure=study["root"] / "bars.png",
        )
    with pytest.raises(InputError, match="subject table not found"):
        read_subjects(study["root"] / "missing.tsv")


def test_selection_helpers(study) -> None:
    table = read_subjects(study["subjects"], split=study["split"], split_name="test")
    assert list(table["subject"]) == ["sub-02", "sub-03", "sub-04"]
    assert pick_subjects(table, 3) == ["sub-03"]
    healthy = table[table["y"] == 0]
    assert pick_subjects(healthy, 1) == ["sub-02"]  # no diseased: the first subjects instead
    with pytest.raises(InputError):
        pick_subjects(table, 0)
    assert cut_coords(AFFINE) is None
    assert cut_coords(AFFINE, values=np.zeros(SHAPE)) is None
    df = region_table(table, {}, {"ventricles": [VENT]}, cohort=study["cohort"])
    means = df.set_index("subject")["mean_logjacobian"]
    assert means["sub-03"] == pytest.approx(0.3) and means["sub-04"] == 0.0


def test_cli_figures(study, capsys) -> None:
    out = study["root"] / "cli"
    code = main(
        [
            "figures",
            "--subjects", str(study["subjects"]),
            "--out", str(out),
            "--cohort", str(study["cohort"]),
            "--maps", f"simulator={study['simulator']}",
            "--logjacobian-maps", "simulator",
            "--regions", f"hippocampus={HIPPO}",
            "--regions-figure", str(out.parent / "bars.png"),
            "--n-subjects", "1",
        ]
    )  # fmt: skip
    assert code == 0
    assert (out / f"{GROUND_TRUTH}.png").is_file() and (out / "simulator.png").is_file()
    assert (out.parent / "bars.tsv").is_file()
    code = main(["figures", "--subjects", str(study["subjects"]), "--out", str(out), "--maps", "x"])
    assert code == 2
    assert "expected METHOD=PATH" in capsys.readouterr().err


def test_cli_figures_from_manifests_equals_maps(study) -> None:
    """--manifest gives the same methods, maps and region table as --maps/--logjacobian-maps;
    the log-Jacobian maps come from the manifest's kinds."""
    from neuroexplain.stage import write_maps_manifest

    root = study["root"]
    for stage, method, kind, suffix in (
        ("saliency", "ig", "saliency", "saliency"),
        ("simulator", "simulator", "log-jacobian", "logjacobian"),
    ):
        written = {
            sub: {method: root / stage / sub / f"{sub}_desc-{method}_{suffix}.nii.gz"}
            for sub in SUBJECTS
        }
        write_maps_manifest(root / stage, stage, written, {method: kind})
    common = [
        "figures", "--subjects", str(study["subjects"]), "--cohort", str(study["cohort"]),
        "--split", str(study["split"]), "--regions", f"hippocampus={HIPPO}", "--n-subjects", "1",
    ]  # fmt: skip
    by_maps = [
        "--maps", f"ig={study['saliency']}", "--maps", f"simulator={study['simulator']}",
        "--logjacobian-maps", "simulator",
    ]  # fmt: skip
    by_manifest = ["--manifest", str(root / "saliency" / "maps.json"), "--manifest",
                   str(root / "simulator")]  # fmt: skip
    for name, args in (("a", by_maps), ("b", by_manifest)):
        out = root / name / "maps"
        bars = ["--regions-figure", str(root / name / "bars.png")]
        assert main([*common, "--out", str(out), *bars, *args]) == 0
    a, b = (json.loads((root / n / "maps" / "figures.json").read_text()) for n in "ab")
    assert a["figures"] == b["figures"] and list(b["figures"]) == [GROUND_TRUTH, "ig", "simulator"]
    assert a["subjects"] == b["subjects"] and a["cut_coords_mm"] == b["cut_coords_mm"]
    assert b["provenance"]["params"]["logjacobian_maps"] == ["simulator"]
    ta, tb = (pd.read_csv(root / n / "bars.tsv", sep="\t") for n in "ab")
    pd.testing.assert_frame_equal(ta, tb)
