"""The classifier's quality gate: linear reference, bootstrap AUC interval, check-classifier.

Small synthetic problems only (volumes of 16³ and smaller), so the module runs in seconds. AUCs
are checked against scikit-learn's ``roc_auc_score`` and pooling against torch's
``avg_pool3d``, both independent of the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from neuroexplain.cli import main
from neuroexplain.errors import InputError
from neuroexplain.evaluate import quality
from neuroexplain.evaluate.quality import (
    bootstrap_auc,
    check_classifier_quality,
    fit_linear_reference,
    linear_reference,
    quality_table,
    write_quality_table,
)


def _planted(n: int = 40, size: int = 16, effect: float = 1.5, seed: int = 0):
    """``n`` noise volumes ``(n, 1, size, size, size)``; the odd ones brighter in a 4³ cube."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, size, size, size)).astype(np.float32)
    y = np.arange(n) % 2
    x[y == 1, :, 4:8, 4:8, 4:8] += effect
    return x, y


def _parts(n: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A split stratified by the alternating labels of :func:`_planted`."""
    rng = np.random.default_rng(seed)
    pos, neg = rng.permutation(np.arange(1, n, 2)), rng.permutation(np.arange(0, n, 2))
    cut = [n_val // 2, (n_val + n_test) // 2]
    return {
        "val": np.concatenate([pos[: cut[0]], neg[: cut[0]]]),
        "test": np.concatenate([pos[cut[0] : cut[1]], neg[cut[0] : cut[1]]]),
        "train": np.concatenate([pos[cut[1] :], neg[cut[1] :]]),
    }


# ------------------------------------------------------------------------- linear reference


def test_linear_reference_finds_a_planted_difference() -> None:
    x, y = _planted()
    ref = linear_reference(x, y, _parts(40, 8, 8))
    assert ref["model"] == "l2_logistic_regression"
    assert ref["n_features"] == 16**3 and ref["pool"] == 1  # every voxel varies; no pooling
    assert ref["val"]["auc"] >= 0.9 and ref["test"]["auc"] >= 0.9
    assert ref["train"]["auc"] == 1.0
    assert ref["val"]["n"] == 8 and ref["test"]["n"] == 8 and ref["train"]["n"] == 24
    # C is chosen on validation AUC; ties go to the smaller C
    by_c = ref["val_auc_by_C"]
    assert list(by_c) == ["0.0001", "0.001", "0.01", "0.1", "1", "10"]
    best = max(by_c.values())
    assert ref["C"] == min(float(c) for c, auc in by_c.items() if auc == best)
    assert ref["val"]["auc"] == by_c[f"{ref['C']:g}"]
    json.dumps(ref)  # plain JSON, as metrics.json stores it
    assert ref["seconds"] >= 0


def test_linear_reference_on_noise_labels_is_near_chance() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 1, 10, 10, 10)).astype(np.float32)
    y = rng.permutation(np.arange(120) % 2)
    idx = rng.permutation(120)
    ref = linear_reference(x, y, {"train": idx[:60], "val": idx[60:90], "test": idx[90:]})
    assert ref["train"]["auc"] > 0.99  # 1000 voxels for 60 subjects: it fits the noise ...
    assert 0.25 < ref["test"]["auc"] < 0.75  # ... and learns nothing that holds on new subjects


def test_linear_reference_chooses_c_on_validation(monkeypatch) -> None:
    """The reported C is the one with the best validation AUC, not the first or the last."""
    x, y = _planted(effect=0.8)
    parts = _parts(40, 10, 0)
    aucs = {1.0: 0.6, 10.0: 0.9, 100.0: 0.9}  # a tie between 10 and 100: the smaller wins
    from neuroexplain.classifier import metrics as metrics_module

    real = metrics_module.binary_metrics
    calls: list[int] = []

    def fake(y_true, logits):
        out = real(y_true, logits)
        if len(y_true) == len(parts["val"]) and len(calls) < len(aucs):
            out["auc"] = list(aucs.values())[len(calls)]
            calls.append(1)
        return out

    monkeypatch.setattr(metrics_module, "binary_metrics", fake)
    ref = linear_reference(x, y, parts, Cs=(100.0, 1.0, 10.0))
    assert ref["val_auc_by_C"] == {"1": 0.6, "10": 0.9, "100": 0.9}
    assert ref["C"] == 10.0
    assert "test" not in ref  # an empty test split is left out


def test_linear_reference_is_deterministic_and_takes_tensors() -> None:
    import torch

    x, y = _planted(n=24, size=8)
    parts = _parts(24, 6, 6)
    a = linear_reference(x, y, parts, seed=3)
    b = linear_reference(torch.from_numpy(x), y.astype(np.float32), parts, seed=3)
    a.pop("seconds"), b.pop("seconds")
    assert a == b


def test_linear_reference_mask_and_constant_voxels() -> None:
    x, y = _planted(n=24, size=8)
    x[:, :, 0] = 0.0  # a constant slab (background): dropped
    ref = linear_reference(x, y, _parts(24, 6, 6))
    assert ref["n_features"] == 8**3 - 8 * 8
    mask = np.zeros((8, 8, 8), dtype=bool)
    mask[4:8, 4:8, 4:8] = True  # the planted cube
    ref = linear_reference(x, y, _parts(24, 6, 6), mask=mask)
    assert ref["n_features"] == 64
    assert ref["val"]["auc"] == 1.0
    with pytest.raises(ValueError, match=r"expected a mask of shape \(8, 8, 8\)"):
        linear_reference(x, y, _parts(24, 6, 6), mask=np.ones((4, 4, 4)))


def test_large_volumes_are_average_pooled(monkeypatch) -> None:
    import torch

    assert quality._pool_factor((64, 64, 64)) == 2  # 262,144 voxels -> 32³ = 32,768
    assert quality._pool_factor((40, 40, 40)) == 1  # 64,000: kept
    assert quality._pool_factor((128, 128, 128)) == 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 9, 8, 7)).astype(np.float32)  # odd sizes: the remainder is dropped
    want = torch.nn.functional.avg_pool3d(torch.from_numpy(x), 2).numpy()
    np.testing.assert_allclose(quality._pool(x, 2), want, rtol=1e-6, atol=1e-6)
    # through linear_reference: with a lower limit, 16³ is pooled to 8³ features
    monkeypatch.setattr(quality, "MAX_REFERENCE_VOXELS", 1000)
    xs, ys = _planted(n=24)
    ref = linear_reference(xs, ys, _parts(24, 6, 6))
    assert ref["pool"] == 2 and ref["n_features"] == 8**3


def test_fitted_reference_reproduces_its_decision_function(monkeypatch) -> None:
    from neuroexplain.classifier import binary_metrics

    monkeypatch.setattr(quality, "MAX_REFERENCE_VOXELS", 1000)  # 15³ (odd) pooled by 2 to 7³
    x, y = _planted(n=32, size=15)
    x[:, :, :3] = 0.25  # constant voxels: dropped features
    parts = _parts(32, 8, 8)
    metrics, model = fit_linear_reference(x, y, parts, seed=1)
    assert metrics == {**linear_reference(x, y, parts, seed=1), "seconds": metrics["seconds"]}
    assert model.pool == metrics["pool"] == 2 and model.shape == (1, 15, 15, 15)
    assert len(model.keep) == 7**3 and int(model.keep.sum()) == metrics["n_features"] < 7**3
    assert model.C == metrics["C"]
    assert np.all(model.coef[~model.keep] == 0) and np.all(model.sd[~model.keep] == 1)
    logits = model.decision_function(x)
    np.testing.assert_allclose(
        logits, model.estimator.decision_function(model.features(x)), rtol=0, atol=1e-12
    )
    for split in ("train", "val", "test"):
        assert binary_metrics(y[parts[split]], logits[parts[split]]) == metrics[split]


def test_linear_reference_needs_both_classes() -> None:
    x, y = _planted(n=24, size=8)
    parts = _parts(24, 6, 6)
    parts["val"] = parts["val"][y[parts["val"]] == 1]
    with pytest.raises(InputError, match="expected both classes in the val split"):
        linear_reference(x, y, parts)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, C, X, Y, Z\)"):
        linear_reference(x[:, 0], y, parts)


# --------------------------------------------------------------------------------- bootstrap


def test_resampled_aucs_match_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 5, 7).astype(float)  # few distinct values: many ties
    neg = np.sort(rng.integers(0, 5, 9).astype(float))
    draw_pos = rng.integers(0, 7, (20, 7))
    draw_neg = rng.integers(0, 9, (20, 9))
    got = quality._resampled_aucs(pos, neg, draw_pos, draw_neg)
    for b in range(20):
        p, n = pos[draw_pos[b]], neg[draw_neg[b]]
        want = roc_auc_score(np.r_[np.ones(7), np.zeros(9)], np.r_[p, n])
        assert got[b] == pytest.approx(want)


def test_bootstrap_interval_contains_the_auc_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    scores = rng.normal(size=60) + 0.8 * y
    auc = roc_auc_score(y, scores)
    lo, hi = bootstrap_auc(y, scores, seed=1)
    assert 0 <= lo < auc < hi <= 1
    assert bootstrap_auc(y, scores, seed=1) == (lo, hi)
    assert bootstrap_auc(y, scores, seed=2) != (lo, hi)
    lo90, hi90 = bootstrap_auc(y, scores, seed=1, level=0.9)
    assert lo <= lo90 < hi90 <= hi
    # stratified: every resample keeps both classes, so a perfect ranking stays perfect
    assert bootstrap_auc(y, y + 0.0, n_boot=50) == (1.0, 1.0)


def test_bootstrap_with_one_class_is_none() -> None:
    assert bootstrap_auc([1, 1, 1], [0.2, 0.5, 0.9]) is None
    assert bootstrap_auc([], []) is None
    with pytest.raises(ValueError, match="expected labels 0/1"):
        bootstrap_auc([0, 2], [0.1, 0.2])


# ------------------------------------------------------------------------------ quality gate


def _metrics(test_auc=0.52, ci=(0.40, 0.65), ref_auc=0.93, val_auc=0.6):
    m = {"val": {"auc": val_auc}, "test": {"auc": test_auc}, "best_epoch": 3}
    if ci is not None:
        m["test"]["auc_ci"] = list(ci)
    if ref_auc is not None:
        m["reference"] = {"model": "l2_logistic_regression", "test": {"auc": ref_auc}}
    return m


def test_quality_gate_passes() -> None:
    summary = check_classifier_quality(_metrics(test_auc=0.85), 0.7, source="metrics.json")
    assert summary == {
        "split": "test",
        "auc": 0.85,
        "auc_ci": [0.40, 0.65],
        "reference_auc": 0.93,
        "min_auc": 0.7,
        "passed": True,
        "model": None,
        "explained_apart": False,
        "linear_reference_only": False,
    }
    # without test split, reference or interval: the validation AUC, nothing else
    summary = check_classifier_quality({"val": {"auc": 0.75}}, 0.7, source="metrics.json")
    assert summary["split"] == "val" and summary["auc"] == 0.75
    assert summary["auc_ci"] is None and summary["reference_auc"] is None


def test_quality_gate_fails_with_one_line_naming_both_aucs() -> None:
    with pytest.raises(InputError) as err:
        check_classifier_quality(_metrics(), 0.7, source="results/classifier/metrics.json")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("results/classifier/metrics.json: classifier test AUC 0.52")
    assert "(95 % CI 0.40-0.65) is below quality.min_auc 0.70" in msg
    assert "a linear reference on the same split reaches 0.93" in msg
    assert "signal the CNN did not learn" in msg and "epochs" in msg


def test_quality_gate_with_a_weak_reference_blames_the_data() -> None:
    with pytest.raises(InputError) as err:
        check_classifier_quality(_metrics(ref_auc=0.55, ci=None), 0.7, source="m.json")
    msg = str(err.value)
    assert "classifier test AUC 0.52 is below quality.min_auc 0.70" in msg
    assert "reaches only 0.55" in msg and "no learnable signal at this resolution" in msg
    # no reference at all, and no AUC at all
    with pytest.raises(InputError, match="no linear reference"):
        check_classifier_quality(_metrics(ref_auc=None), 0.7, source="m.json")
    with pytest.raises(InputError, match="val AUC is missing"):
        check_classifier_quality({"val": {"auc": None}}, 0.7, source="m.json")


def test_quality_gate_judges_the_explained_model_not_the_ensemble() -> None:
    """A final ensemble above the threshold does not let a weak explained model through."""
    m = _metrics(test_auc=0.95, ci=None, ref_auc=0.93)
    m["model"] = "ensemble"
    m["explained"] = {"model": "cnn", "val": {"auc": 0.6}, "test": {"auc": 0.55}}
    with pytest.raises(InputError) as err:
        check_classifier_quality(m, 0.7, source="m.json")
    msg = str(err.value)
    assert "explained classifier (cnn) test AUC 0.55 is below quality.min_auc 0.70" in msg
    assert "reaches 0.93" in msg
    m["explained"]["test"]["auc"] = 0.8
    summary = check_classifier_quality(m, 0.7, source="m.json")
    assert summary["auc"] == 0.8 and summary["model"] == "cnn" and summary["explained_apart"]
    rows = dict(quality_table(m, summary))
    assert rows["explained model"].startswith("cnn")
    assert rows["CNN AUC (test)"] == "0.800"
    assert rows["ensemble model AUC val / test (predictions)"] == "0.600 / 0.950"
    assert "linear reference" not in rows["explained model"]
    m["explained"]["model"], m["trained_is_linear_reference"] = "cnn+linear", True
    summary = check_classifier_quality(m, 0.7, source="m.json", allow_linear_reference=True)
    rows = dict(quality_table(m, summary))
    assert "the CNN did not improve on the linear reference" in rows["explained model"]
    m["cnn_logit_share"] = 0.0
    rows = dict(quality_table(m, summary))
    assert rows["CNN path's share of the trained logit"].startswith("0.00 (sd on the training")


def test_quality_gate_stops_a_model_that_is_the_linear_reference() -> None:
    """A CNN that never improved on the linear reference stops the gate whatever its AUC."""
    m = _metrics(test_auc=0.95, ci=None, ref_auc=0.95)
    m["model"], m["trained_is_linear_reference"] = "cnn+linear", True
    with pytest.raises(InputError) as err:
        check_classifier_quality(m, 0.7, source="results/classifier/metrics.json")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("results/classifier/metrics.json: the explained classifier (cnn+linear)")
    assert "is the linear reference itself" in msg
    assert "quality.allow_linear_reference: true" in msg
    # allowed, or the gate off: it passes and says what it passed
    summary = check_classifier_quality(m, 0.7, source="m.json", allow_linear_reference=True)
    assert summary["passed"] and summary["linear_reference_only"]
    assert check_classifier_quality(m, 0.0, source="m.json")["linear_reference_only"]
    # a low AUC is still reported as such first
    m["test"]["auc"] = 0.5
    with pytest.raises(InputError, match=r"test AUC 0\.50 is below quality\.min_auc 0\.70"):
        check_classifier_quality(m, 0.7, source="m.json")
    # a CNN that improved on the reference (not at its epoch 0) passes
    m["test"]["auc"], m["trained_is_linear_reference"] = 0.95, False
    assert not check_classifier_quality(m, 0.7, source="m.json")["linear_reference_only"]


def test_quality_gate_off() -> None:
    summary = check_classifier_quality(_metrics(test_auc=0.3), 0.0, source="m.json")
    assert summary["passed"] and summary["auc"] == 0.3 and summary["min_auc"] == 0.0
    assert check_classifier_quality({}, 0, source="m.json")["auc"] is None


# ------------------------------------------------------------------------------ command line


def test_check_classifier_command_stops_on_the_linear_reference(tmp_path: Path, capsys) -> None:
    m = _metrics(test_auc=0.9, ci=None, ref_auc=0.9)
    m["model"], m["trained_is_linear_reference"] = "cnn+linear", True
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(m))
    out = tmp_path / "out" / "quality.json"
    args = ["check-classifier", "--metrics", str(metrics), "--out", str(out)]
    capsys.readouterr()
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1].startswith(f"error: {metrics}: the explained classifier (cnn+linear) is the")
    assert not out.parent.exists()  # nothing written
    assert main([*args, "--allow-linear-reference"]) == 0
    written = json.loads(out.read_text())
    assert written["linear_reference_only"] and written["provenance"]["params"] == {
        "min_auc": 0.7,
        "allow_linear_reference": True,
    }


def test_check_classifier_command(tmp_path: Path, capsys) -> None:
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(_metrics()))
    out = tmp_path / "out" / "quality.json"
    args = ["check-classifier", "--metrics", str(metrics), "--out", str(out)]
    capsys.readouterr()
    assert main([*args, "--min-auc", "0.7"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1].startswith(f"error: {metrics}: classifier test AUC 0.52")
    assert "reaches 0.93" in err[-1]
    assert not out.parent.exists() and sorted(tmp_path.iterdir()) == [metrics]  # nothing written

    assert main([*args, "--min-auc", "0.5"]) == 0
    table = out.with_suffix(".html")  # the table's default: beside --out
    assert capsys.readouterr().out.strip() == (
        f"classifier test AUC 0.520 >= 0.5 -> {out}, {table}"
    )
    written = json.loads(out.read_text())
    assert written["passed"] and written["reference_auc"] == 0.93
    assert written["provenance"]["command"] == "check-classifier"
    assert written["provenance"]["params"] == {"min_auc": 0.5, "allow_linear_reference": False}
    page = table.read_text()
    assert "Classifier quality gate passed: test AUC 0.520 &gt;= quality.min_auc 0.5" in page
    assert "<td>linear reference AUC (test)</td><td>0.930</td>" in page
    # no temporary left
    assert sorted(p.name for p in out.parent.iterdir()) == ["quality.html", "quality.json"]

    # the earlier stages' warnings reach the report's first page
    ingest = tmp_path / "ingest.json"
    ingest.write_text(json.dumps({"warnings": ["sub-01_T1w.nii.gz: sform and qform disagree"]}))
    assert main([*args, "--min-auc", "0.5", "--warnings", str(ingest)]) == 0
    assert "1 input warning(s)" in capsys.readouterr().out
    assert "<td>warning (ingest.json)</td><td>sub-01_T1w.nii.gz: sform and qform" in (
        table.read_text()
    )
    assert json.loads(out.read_text())["warnings"][0]["source"] == "ingest.json"
    assert main([*args, "--warnings", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: expected a JSON output" in capsys.readouterr().err

    tsv = tmp_path / "tables" / "quality.tsv"
    assert main([*args, "--min-auc", "0", "--table", str(tsv)]) == 0
    assert "(gate off)" in capsys.readouterr().out
    rows = dict(ln.split("\t") for ln in tsv.read_text().splitlines()[1:])
    assert rows["passed"] == "yes (gate off)" and rows["quality.min_auc"] == "0 (gate off)"
    for bad in (str(tmp_path / "q.txt"), str(out)):
        assert main([*args, "--table", bad]) == 2
        assert "--table: expected" in capsys.readouterr().err

    assert main([*args, "--min-auc", "1.5"]) == 2
    assert "--min-auc: expected a number in [0, 1], got 1.5" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    bad = ["check-classifier", "--metrics", str(tmp_path / "bad.json"), "--out", str(out)]
    assert main(bad) == 2
    assert "expected JSON" in capsys.readouterr().err


def test_the_gate_default_is_the_settings_default() -> None:
    """``check-classifier --min-auc`` comes from QualityConfig, like every other default.

    tests/test_settings.py checks that the command line, the schema, config/config.yaml and
    config/README.md hold the same value.
    """
    from neuroexplain.cli._settings import SETTINGS_ATTR
    from neuroexplain.cli.quality import check_classifier_cmd
    from neuroexplain.settings import SETTINGS, QualityConfig

    assert QualityConfig in SETTINGS and QualityConfig.SECTION == "quality"
    assert getattr(check_classifier_cmd, SETTINGS_ATTR) == (("config", QualityConfig),)
    with pytest.raises(InputError, match=r"^--min-auc: expected a number in \[0, 1\], got nan"):
        QualityConfig(min_auc=float("nan"))


# ----------------------------------------------------------------------------- quality table


def _full_metrics() -> dict:
    """metrics.json as train-classifier writes it (the parts the table reads)."""
    return {
        "val": {"auc": 0.81, "auc_ci": [0.62, 0.95], "n": 12, "n_positive": 6},
        "test": {
            "auc": 0.85,
            "auc_ci": [0.7, 0.96],
            "n": 20,
            "n_positive": 10,
            "balanced_accuracy": 0.8,
            "confusion_matrix": [[9, 1], [3, 7]],
        },
        "reference": {"C": 0.01, "val": {"auc": 0.9}, "test": {"auc": 0.93}},
    }


def test_quality_table_rows() -> None:
    m = _full_metrics()
    rows = quality_table(m, check_classifier_quality(m, 0.7, source="m.json"))
    assert rows == [
        ("split judged", "test (20 subjects, 10 positive)"),
        ("CNN AUC (test)", "0.850 (95 % CI 0.700-0.960)"),
        ("linear reference AUC (test)", "0.930 (L2 logistic regression, C = 0.01)"),
        ("quality.min_auc", "0.7"),
        ("passed", "yes"),
        ("CNN confusion matrix (test)", "TN 9, FP 1 / FN 3, TP 7"),
        ("CNN balanced accuracy (test)", "0.800"),
        ("CNN AUC val / test", "0.810 (95 % CI 0.620-0.950) / 0.850 (95 % CI 0.700-0.960)"),
        ("linear reference AUC val / test", "0.900 / 0.930"),
    ]
    # a metrics.json without test split, reference or matrix: the validation split, n/a
    m = {"val": {"auc": 0.75}}
    rows = dict(quality_table(m, check_classifier_quality(m, 0.7, source="m.json")))
    assert rows["split judged"] == "val (n/a)" and rows["CNN AUC (val)"] == "0.750"
    assert rows["linear reference AUC (val)"] == "n/a"
    assert rows["CNN confusion matrix (val)"] == "n/a"
    assert rows["CNN AUC val / test"] == "0.750 / n/a"


def test_write_quality_table_formats(tmp_path: Path) -> None:
    rows = [("split judged", "test"), ("a <b> & c", "TN 1, FP 2 / FN 3, TP 4")]
    page = write_quality_table(rows, tmp_path / "q.html", title="Gate <passed>").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<title>Gate &lt;passed&gt;</title>" in page
    assert "<tr><td>a &lt;b&gt; &amp; c</td><td>TN 1, FP 2 / FN 3, TP 4</td></tr>" in page
    md = write_quality_table(rows, tmp_path / "q.md", title="Gate").read_text()
    assert md.splitlines()[:5] == [
        "## Gate",
        "",
        "| item | value |",
        "|---|---|",
        "| split judged | test |",
    ]
    tsv = write_quality_table(rows, tmp_path / "q.tsv", title="Gate").read_text()
    assert tsv == "item\tvalue\nsplit judged\ttest\na <b> & c\tTN 1, FP 2 / FN 3, TP 4\n"
    with pytest.raises(ValueError, match=r"expected a table path ending in \.html, \.md, \.tsv"):
        write_quality_table(rows, tmp_path / "q.txt", title="Gate")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.html", "q.md", "q.tsv"]


# ------------------------------------------------------------------ a cohort without a signal


def _noise_preproc(n: int, size: int = 16, seed: int = 0) -> dict:
    """``n`` noise volumes ``(n, 1, size, size, size)`` with labels half / half, unrelated to them.

    The in-memory ``preproc.pt`` format of ``ingest-mri`` (the fields training reads; see
    tests/test_classifier.py ``_toy_preproc``).
    """
    import torch

    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2).astype(np.float32)
    images = rng.normal(0.3, 0.1, size=(n, 1, size, size, size)).astype(np.float32)
    return {
        "images": torch.tensor(images),
        "y": torch.tensor(y),
        "subjects": [f"sub-{i:02d}" for i in range(n)],
        "label": ["disease" if v else "control" for v in y],
        "positive_class": "disease",
    }


def test_a_cohort_without_signal_stops_at_the_gate(tmp_path: Path, capsys) -> None:
    """Train on noise, then the real command: exit 2, one line, nothing written.

    96 subjects, 40 % of them (38) in the test split: a chance AUC there has a standard error of
    ~0.09, so a seed can still reach 0.7 by luck (seed 1 does: 0.78). With seed 2 the CNN's test
    AUC is ~0.50 and the reference's ~0.42, both far from the threshold; the CNN's validation AUC
    (~0.62) is above the reference's (~0.60), so the linear-path retraining
    (``reference_fallback``) is not triggered either.
    """
    from neuroexplain.classifier import train_classifier

    metrics_dir = tmp_path / "classifier"
    m = train_classifier(
        _noise_preproc(96, seed=2),
        metrics_dir,
        epochs=2,
        batch_size=8,
        seed=2,
        patience=0,
        val_fraction=0.2,
        test_fraction=0.4,
        augment=False,
        flip=False,
        device="cpu",
        progress=False,
    )
    # the gate judges the explained model (the CNN beside the final ensemble)
    judged = m.get("explained", m)
    auc, ref = judged["test"]["auc"], m["reference"]["test"]["auc"]
    assert judged["test"]["n"] == 38
    assert abs(auc - 0.5) < 0.15 and judged["test"]["auc_ci"][0] < 0.5 < judged["test"]["auc_ci"][1]
    assert abs(ref - 0.5) < 0.15  # the linear reference finds nothing either

    out = tmp_path / "q.json"
    metrics = metrics_dir / "metrics.json"
    capsys.readouterr()
    args = ["check-classifier", "--metrics", str(metrics), "--min-auc", "0.7", "--out", str(out)]
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in (captured.out + captured.err).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    (line,) = lines
    who = f"explained classifier ({m['explained']['model']})" if "explained" in m else "classifier"
    assert line.startswith(f"error: {metrics}: {who} test AUC {auc:.2f} (95 % CI ")
    assert "is below quality.min_auc 0.70" in line
    assert f"a linear reference on the same split reaches only {ref:.2f}" in line
    assert "no learnable signal" in line
    assert not out.exists() and not out.with_suffix(".html").exists()


def test_paired_auc_difference_is_paired_and_deterministic():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(15), np.ones(15)]
    a = y * 2 + rng.normal(0, 1, 30)
    b = y * 0.2 + rng.normal(0, 1, 30)
    res = quality.paired_auc_difference(y, a, b, seed=3)
    assert res["diff"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    assert res["low"] <= res["diff"] <= res["high"] and res["separated"] == (res["low"] > 0)
    assert quality.paired_auc_difference(y, a, b, seed=3) == res
    # the same ranking (any monotone rescaling): no difference, an interval of width 0
    same = quality.paired_auc_difference(y, a, 5 * a + 1)
    assert same["diff"] == same["low"] == same["high"] == 0 and not same["separated"]
    # pairing: a model against a small perturbation of itself has a narrower interval than
    # the unpaired intervals of the two AUCs would suggest
    near = quality.paired_auc_difference(y, a, a + rng.normal(0, 0.05, 30))
    lo, hi = quality.bootstrap_auc(y, a)
    assert near["high"] - near["low"] < (hi - lo) / 2
    assert quality.paired_auc_difference(np.zeros(4), a[:4], b[:4]) is None
    with pytest.raises(ValueError, match="one score per label"):
        quality.paired_auc_difference(y, a[:5], b)
