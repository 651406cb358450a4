"""Evaluation harness: scores of perfect, random and misplaced maps on a tiny synthetic cohort."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from scipy.stats import pearsonr

from neuroexplain.cli import main
from neuroexplain.errors import InputError
from neuroexplain.evaluate import (
    evaluate_maps,
    ncc,
    parse_subjects,
    resolve_map,
    summarize,
    topk_fraction,
    write_evaluation,
)

SHAPE = (30, 28, 24)
AFFINE = np.array(
    [  # permuted voxel axes, as the IXI T1w
        [0.0, 0.0, -2.0, 30.0],
        [-2.0, 0.0, 0.0, 40.0],
        [0.0, 2.0, 0.0, -20.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SHRINK, ENLARGE, OTHER = 7, 9, 3


def _save(data, path, dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), AFFINE)
    img.set_sform(AFFINE, code=1)
    img.set_qform(AFFINE, code=1)
    nib.save(img, path)
    return path


def _dseg() -> np.ndarray:
    d = np.zeros(SHAPE, np.int16)
    d[3:27, 3:25, 3:21] = 1  # brain
    d[5:13, 5:13, 5:13] = SHRINK  # planted regions: ~11 % of the brain
    d[16:24, 13:21, 10:18] = ENLARGE
    d[4:10, 15:22, 6:18] = OTHER  # a region with no effect, > 5 % of the brain
    return d


def _logj(d: np.ndarray, magnitude: float) -> np.ndarray:
    """Smooth log-Jacobian inside the planted regions only (negative = shrunk)."""
    bump = ndi.gaussian_filter((d == SHRINK).astype(float), 1.0) * (d == SHRINK)
    blob = ndi.gaussian_filter((d == ENLARGE).astype(float), 1.0) * (d == ENLARGE)
    return magnitude * (blob / blob.max() - bump / bump.max())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    rows = [("sub-01", "disease", 0.2), ("sub-02", "disease", 0.3), ("sub-03", "control", 0.0)]
    pd.DataFrame(rows, columns=["participant_id", "diagnosis", "effect_magnitude"]).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )
    d = _dseg()
    for sub, diag, mag in rows:
        _save(d, root / "derivatives" / "dlmuse" / sub / "anat" / f"{sub}_dseg.nii.gz", np.int16)
        gt = root / "derivatives" / "groundtruth" / sub / "anat"
        logj = _logj(d, mag) if diag == "disease" else np.zeros(SHAPE)
        _save(logj, gt / f"{sub}_desc-disease_logjacobian.nii.gz")
        _save(np.isin(d, [SHRINK, ENLARGE]), gt / f"{sub}_desc-planted_mask.nii.gz", np.uint8)
        maps = root.parent / f"{root.name}_maps" / sub
        rng = np.random.default_rng(int(sub[-1]))
        _save(logj, maps / f"{sub}_desc-perfect_saliency.nii.gz")
        _save(rng.normal(size=SHAPE), maps / f"{sub}_desc-random_saliency.nii.gz")
        _save(
            (d == OTHER) * 5.0 + rng.random(SHAPE) * 0.01,
            maps / f"{sub}_desc-wrong_saliency.nii.gz",
        )
    return root, root.parent / f"{root.name}_maps"


def test_ncc_matches_pearson():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 5, 4)), rng.normal(size=(6, 5, 4))
    mask = rng.random((6, 5, 4)) > 0.3
    assert ncc(a, b, mask) == pytest.approx(pearsonr(a[mask], b[mask])[0])
    assert ncc(a, -3 * a + 2) == pytest.approx(-1.0)
    assert np.isnan(ncc(np.ones(5), a.ravel()[:5]))


def test_topk_fraction_by_hand():
    values = np.arange(10.0)
    regions = np.zeros(10, bool)
    regions[[9, 8, 2]] = True
    mask = np.ones(10, bool)
    assert topk_fraction(values, regions, mask, 20) == 1.0  # voxels 9, 8
    assert topk_fraction(values, regions, mask, 40) == 0.5  # 9, 8, 7, 6
    assert topk_fraction(-values, regions, mask, 10) == 1.0  # ranked by |map|


def test_perfect_random_and_misplaced_maps(cohort):
    root, maps = cohort
    spec = {m: str(maps) for m in ("perfect", "random", "wrong")}
    df = evaluate_maps(root, spec)
    assert sorted(set(df["subject"])) == ["sub-01", "sub-02"]  # controls are not scored
    by = df.set_index(["method", "subject"])
    for sub in ("sub-01", "sub-02"):
        perfect = by.loc[("perfect", sub)]
        assert perfect["ncc_abs"] == pytest.approx(1.0) and perfect["ncc_signed"] == pytest.approx(
            1.0
        )
        assert perfect["top1_in_regions"] == pytest.approx(1.0)
        assert perfect["top5_in_regions"] == pytest.approx(1.0)
        rand = by.loc[("random", sub)]
        assert abs(rand["ncc_abs"]) < 0.1 and abs(rand["ncc_signed"]) < 0.1
        assert rand["top5_in_regions"] < 3 * rand["chance_in_regions"]
        wrong = by.loc[("wrong", sub)]
        assert wrong["top1_in_regions"] == 0.0 and wrong["top5_in_regions"] == 0.0
    assert 0 < df["chance_in_regions"].iloc[0] < 0.2
    table = summarize(df)
    assert list(table.index) == ["perfect", "random", "wrong"]
    assert table.loc["perfect", ("ncc_abs", "mean")] == pytest.approx(1.0)
    assert (table["n_subjects"] == 2).all()


def test_regions_from_dseg_labels_and_subject_lists(cohort, tmp_path):
    root, maps = cohort
    tmpl = str(maps / "{subject}" / "{subject}_desc-{method}_saliency.nii.gz")
    # planted regions given as labels: the unaffected region counts as "planted" now
    df = evaluate_maps(root, {"wrong": tmpl}, ["sub-02", "sub-03"], regions=[OTHER])
    assert df["subject"].tolist() == ["sub-02"]
    assert df["top1_in_regions"].iloc[0] == 1.0
    (tmp_path / "split.tsv").write_text("subject\tsplit\ty\nsub-01\ttest\t1\nsub-02\ttrain\t1\n")
    assert parse_subjects(str(tmp_path / "split.tsv")) == ["sub-01"]
    assert parse_subjects("01,sub-02") == ["sub-01", "sub-02"]
    assert parse_subjects("all") is None
    assert resolve_map(tmpl, "01", "random").name == "sub-01_desc-random_saliency.nii.gz"


def test_errors_name_the_problem(cohort, tmp_path):
    root, maps = cohort
    with pytest.raises(InputError, match="no map of 'nothere'"):
        evaluate_maps(root, {"nothere": str(maps)})
    with pytest.raises(InputError, match="not in the cohort"):
        evaluate_maps(root, {"perfect": str(maps)}, ["sub-99"])
    with pytest.raises(InputError, match="no 'disease' subjects"):
        evaluate_maps(root, {"perfect": str(maps)}, ["sub-03"])
    # a map on the model grid (not resampled to native space) is refused
    bad = tmp_path / "m" / "sub-01" / "sub-01_desc-x_saliency.nii.gz"
    bad.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), bad)
    with pytest.raises(InputError, match="grid mismatch"):
        evaluate_maps(root, {"x": str(tmp_path / "m")}, ["sub-01"])


def test_write_evaluation_and_cli(cohort, tmp_path):
    root, maps = cohort
    df = evaluate_maps(root, {"perfect": str(maps), "random": str(maps)})
    paths = write_evaluation(df, tmp_path / "ev" / "table", provenance={"seed": 1})
    summary = json.loads(paths["json"].read_text())
    assert summary["methods"]["perfect"]["ncc_abs"]["mean"] == pytest.approx(1.0)
    assert summary["methods"]["perfect"]["n_subjects"] == 2
    md = paths["markdown"].read_text()
    assert md.startswith("| method |") and "| perfect | 1.000 ± 0.000" in md
    assert len(pd.read_csv(paths["tsv"], sep="\t")) == 4

    out = tmp_path / "cli" / "table"
    rc = main(
        [
            "evaluate-maps",
            "--cohort",
            str(root),
            "--maps",
            f"perfect={maps}",
            "--maps",
            f"wrong={maps}/{{subject}}/{{subject}}_desc-wrong_saliency.nii.gz",
            "--out",
            str(out),
            "--topk",
            "1,5,10",
        ]
    )
    assert rc == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert set(res["methods"]) == {"perfect", "wrong"}
    assert "top10_in_regions" in res["metrics"]
    assert res["methods"]["wrong"]["top1_in_regions"]["mean"] == 0.0
    assert (tmp_path / "cli" / "table.md").is_file() and (
        tmp_path / "cli" / "table_subjects.tsv"
    ).is_file()
    assert main(["evaluate-maps", "--cohort", str(root), "--maps", "oops", "--out", str(out)]) == 2
    assert (
        main(
            [
                "evaluate-maps",
                "--cohort",
                str(tmp_path / "none"),
                "--maps",
                f"a={maps}",
                "--out",
                str(out),
            ]
        )
        == 2
    )


def _manifest_copy(maps, tmp_path, methods=("perfect", "random", "wrong")):
    """A copy of the toy maps as a stage folder with its maps manifest."""
    import shutil

    from neuroexplain.stage import write_maps_manifest

    stage = tmp_path / "stage"
    shutil.copytree(maps, stage)
    written = {
        sub.name: {m: sub / f"{sub.name}_desc-{m}_saliency.nii.gz" for m in methods}
        for sub in sorted(stage.glob("sub-*"))
    }
    path = write_maps_manifest(
        stage, "saliency", written, dict.fromkeys(methods, "saliency"), provenance={"seed": 1}
    )
    return stage, path


def test_manifest_lists_exactly_the_maps_written(cohort, tmp_path):
    from neuroexplain.stage import read_maps_manifest

    _, maps = cohort
    stage, path = _manifest_copy(maps, tmp_path)
    assert path == stage / "maps.json"
    raw = json.loads(path.read_text())
    assert raw["stage"] == "saliency" and raw["subjects"] == ["sub-01", "sub-02", "sub-03"]
    assert [m["name"] for m in raw["methods"]] == ["perfect", "random", "wrong"]
    listed = {stage / rel for m in raw["methods"] for rel in m["files"].values()}
    assert listed == set(stage.glob("sub-*/*.nii.gz"))
    assert all(not p.startswith("/") for m in raw["methods"] for p in m["files"].values())
    man = read_maps_manifest(stage)  # the folder works too
    assert man.path == path and man.stage == "saliency"
    assert man.primary == ["perfect", "random", "wrong"]
    assert man.methods == dict.fromkeys(man.primary, "saliency")
    assert man.files["random"].path("02") == stage / "sub-02" / "sub-02_desc-random_saliency.nii.gz"


def test_evaluate_maps_manifest_equals_maps(cohort, tmp_path):
    root, maps = cohort
    stage, manifest = _manifest_copy(maps, tmp_path)
    out = {}
    for how, args in {
        "maps": [a for m in ("perfect", "random", "wrong") for a in ("--maps", f"{m}={stage}")],
        "manifest": ["--manifest", str(manifest)],
    }.items():
        out[how] = tmp_path / how / "table"
        cmd = ["evaluate-maps", "--cohort", str(root), "--out", str(out[how]), *args]
        assert main([*cmd, "--subjects", "sub-02,sub-01,sub-03"]) == 0
    a, b = (json.loads(out[h].with_suffix(".json").read_text()) for h in ("maps", "manifest"))
    assert a["methods"] == b["methods"] and a["subjects"] == b["subjects"]
    assert list(b["methods"]) == ["perfect", "random", "wrong"]
    ta, tb = (pd.read_csv(out[h].parent / "table_subjects.tsv", sep="\t") for h in out)
    pd.testing.assert_frame_equal(ta, tb)  # same rows, order and map paths
    assert (
        out["maps"].with_suffix(".md").read_text() == out["manifest"].with_suffix(".md").read_text()
    )


def test_manifest_errors_name_the_file(cohort, tmp_path, capsys):
    from neuroexplain.stage import read_maps_manifest

    root, maps = cohort
    stage, manifest = _manifest_copy(maps, tmp_path)
    with pytest.raises(InputError, match="maps manifest not found"):
        read_maps_manifest(tmp_path / "nothere.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match=r"bad\.json: not a readable JSON maps manifest"):
        read_maps_manifest(bad)
    bad.write_text('{"methods": []}')
    with pytest.raises(InputError, match="expected a maps manifest"):
        read_maps_manifest(bad)
    # a map the manifest lists is gone
    (stage / "sub-02" / "sub-02_desc-wrong_saliency.nii.gz").unlink()
    with pytest.raises(InputError, match=r"maps.json: lists 1 missing maps of 'wrong'"):
        read_maps_manifest(manifest)
    # a subject the stage did not explain
    _, only = _manifest_copy(maps, tmp_path / "b", methods=("perfect",))
    raw = json.loads(only.read_text())
    del raw["methods"][0]["files"]["sub-01"]
    only.write_text(json.dumps(raw))
    with pytest.raises(InputError, match="lists no map of 'perfect' for sub-01"):
        evaluate_maps(root, {"perfect": read_maps_manifest(only).files["perfect"]}, ["sub-01"])
    # the command: one line naming the manifest; a method also given by --maps is refused
    out = str(tmp_path / "ev" / "t")
    assert main(["evaluate-maps", "--cohort", str(root), "--manifest", str(bad), "--out", out]) == 2
    assert "bad.json" in capsys.readouterr().err
    cmd = ["evaluate-maps", "--cohort", str(root), "--out", out, "--manifest", str(only)]
    assert main([*cmd, "--maps", f"perfect={maps}"]) == 2
    assert "also in" in capsys.readouterr().err
    assert main(["evaluate-maps", "--cohort", str(root), "--out", out]) == 2
    assert not (tmp_path / "ev").exists()
