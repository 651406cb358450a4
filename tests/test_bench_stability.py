"""The comparisons of ``benchmarks/bench_stability.py`` on fabricated per-seed outputs."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_stability", REPO / "benchmarks" / "bench_stability.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(concept, verdict, score=0.9, p=0.001, layer="features.3"):
    return {"concept": concept, "layer": layer, "verdict": verdict, "tcav_score": score,
            "random_score": 0.5, "p_value": p, "p_adjusted": p, "cav_accuracy": 0.9}  # fmt: skip


def test_tcav_a_changed_verdict_breaks_the_criterion(bench):
    same = {s: [_row("a", "significant"), _row("b", "not significant", 0.5, 0.4)] for s in range(3)}
    res = bench.compare_tcav(same)
    assert res["criterion_met"] and res["n_identical"] == 2
    assert all(r["identical"] for r in res["rows"])

    flipped = {s: [dict(r) for r in rows] for s, rows in same.items()}
    flipped[2][1]["verdict"] = "inconclusive"  # concept b, seed 2
    res = bench.compare_tcav(flipped)
    assert not res["criterion_met"] and res["n_identical"] == 1
    assert res["concepts"]["a"]["identical"] and not res["concepts"]["b"]["identical"]
    assert res["concepts"]["b"]["verdicts"]["features.3"] == [
        "not significant",
        "not significant",
        "inconclusive",
    ]
    b = next(r for r in res["rows"] if r["concept"] == "b")
    assert b["tcav_score"] == {0: 0.5, 1: 0.5, 2: 0.5} and b["p_adjusted"][2] == 0.4

    # a concept x layer a seed did not report is not "identical"
    missing = {s: [dict(r) for r in rows] for s, rows in same.items()}
    missing[1].append(_row("a", "significant", layer="features.1"))
    res = bench.compare_tcav(missing)
    assert not res["concepts"]["a"]["identical"] and res["concepts"]["b"]["identical"]
    assert not res["criterion_met"]
    # the same verdict at a different score or p is still identical
    moved = {s: [_row("a", "significant", 0.8 + 0.05 * s, 10.0**-s)] for s in range(3)}
    assert bench.compare_tcav(moved)["criterion_met"]


def _save(path: Path, vol: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), path)
    return path


def test_sacv_ncc_per_subject_pair_and_mask(bench, tmp_path):
    rng = np.random.default_rng(0)
    shape = (6, 7, 5)
    brain = np.zeros(shape, np.int16)
    brain[1:5, 1:6, 1:4] = 1
    inside = brain > 0
    subjects = ["s1", "s2"]
    masks = {s: _save(tmp_path / "dseg" / f"{s}.nii.gz", brain) for s in subjects}
    base = {s: rng.normal(size=shape) for s in subjects}
    noisy = {s: base[s] + rng.normal(scale=1.5, size=shape) for s in subjects}
    for s in subjects:  # outside the brain, seed 2 is the negative of seed 0
        noisy[s][~inside] = -base[s][~inside] * 10
    vols = {
        0: base,
        1: {s: 2 * base[s] + 1 for s in subjects},  # an affine copy: NCC 1
        2: noisy,
    }
    for seed, per in vols.items():
        for s, v in per.items():
            for desc, sign in (("sacvrelevancex", 1), ("sacvcontributionx", -1)):
                _save(tmp_path / f"seed{seed}" / f"sub-{s}" / f"sub-{s}_desc-{desc}_map.nii.gz",
                      sign * v)  # fmt: skip
    maps = {seed: bench.find_maps(tmp_path / f"seed{seed}") for seed in vols}
    assert set(maps[0]) == {"sacvrelevancex", "sacvcontributionx"}
    assert set(maps[0]["sacvrelevancex"]) == set(subjects)

    res = bench.compare_sacv(maps, masks)
    rel = res["maps"]["sacvrelevancex"]
    expected = {s: float(np.corrcoef(base[s][inside], noisy[s][inside])[0, 1]) for s in subjects}
    assert 0.2 < min(expected.values()) and max(expected.values()) < 0.9
    for s in subjects:
        assert rel["subjects"][s]["0-1"] == pytest.approx(1.0)
        assert rel["subjects"][s]["0-2"] == pytest.approx(expected[s], abs=1e-5)
        assert rel["subjects"][s]["1-2"] == pytest.approx(expected[s], abs=1e-5)
    pair02 = next(p for p in rel["pairs"] if p["seeds"] == [0, 2])
    assert pair02["mean"] == pytest.approx(np.mean(list(expected.values())), abs=1e-5)
    assert pair02["min"] == pytest.approx(min(expected.values()), abs=1e-5)
    assert pair02["n"] == 2 and pair02["n_below"] == 2
    assert not rel["criterion_met"] and not res["criterion_met"]
    # the sign flip of the contribution maps is the same in every seed: same NCC
    con = res["maps"]["sacvcontributionx"]
    assert con["subjects"]["s1"]["0-2"] == pytest.approx(expected["s1"], abs=1e-5)

    # without the mask the anticorrelated outside drags the NCC down
    whole = bench.compare_sacv(maps)["maps"]["sacvrelevancex"]
    assert whole["subjects"]["s1"]["0-2"] < expected["s1"] - 0.1
    # seeds 0 and 1 alone meet the criterion; a subject missing in one seed is reported
    only01 = {0: maps[0], 1: maps[1]}
    only01[1] = {d: {s: p for s, p in m.items() if s != "s2"} for d, m in maps[1].items()}
    res01 = bench.compare_sacv(only01, masks)
    assert res01["criterion_met"]
    assert res01["maps"]["sacvrelevancex"]["missing_subjects"] == ["s2"]


def _srae_json(usage, r2=0.99, agreement=1.0):
    return {
        "metrics": {
            "test": {"n": 40, "feature_usage": usage, "r2": r2,
                     "decision_agreement": agreement, "sparsity": 1.2},
            "train": {"n": 120, "feature_usage": [1.0] * len(usage), "r2": 0.1,
                      "decision_agreement": 0.5},
        },
        "attempts": [{"attempt": 0, "alpha_pt": 0.1, "seed": 0, "features_used": 5}],
    }  # fmt: skip


def test_xnn_usage_faithfulness_and_feature_matching(bench):
    good = {s: _srae_json([0.3, 0.2, 0.1, 0.05, 0.5]) for s in range(3)}
    res = bench.compare_xnn(good, split="test")
    assert res["criterion_met"] and all(p["unused"] == [] for p in res["seeds"].values())

    bad = dict(good)
    bad[1] = _srae_json([0.3, 0.0, 0.1, 0.04, 0.5])
    bad[2] = _srae_json([0.3, 0.2, 0.1, 0.05, 0.5], r2=0.94)
    res = bench.compare_xnn(bad, split="test")
    assert not res["criterion_met"]
    assert res["seeds"][1]["unused"] == [2, 4] and not res["seeds"][1]["usage_met"]
    assert res["seeds"][1]["min_usage"] == 0.0
    assert res["seeds"][2]["usage_met"] and not res["seeds"][2]["r2_met"]
    assert res["seeds"][0]["criterion_met"]
    # the split judged is the one asked for (train: usage fine, R² not)
    assert not bench.compare_xnn(good, split="train")["seeds"][0]["r2_met"]

    # correspondence: seed 1's features are seed 0's permuted (and scaled)
    rng = np.random.default_rng(1)
    n, k = 30, 3
    c0 = rng.normal(size=(n, k))
    perm = [2, 0, 1]  # feature j+1 of seed 1 = feature perm[j]+1 of seed 0
    c1 = 3 * c0[:, perm]
    subjects = [f"sub-{i}" for i in range(n)]

    def table(c):
        df = pd.DataFrame({"subject": subjects, "split": ["test"] * n})
        for j in range(k):
            df[f"xnnfeature{j + 1}_contribution"] = c[:, j]
        return df

    three = {s: _srae_json([0.5, 0.5, 0.5]) for s in range(2)}
    res = bench.compare_xnn(three, {0: table(c0), 1: table(c1)}, split="test")
    (pair,) = res["pairs"]
    assert pair["match"] == {1: 2, 2: 3, 3: 1}
    assert pair["abs_r"] == pytest.approx([1.0] * 3) and pair["mean_abs_r"] == pytest.approx(1)


def test_stage_args_are_the_workflows_with_the_seed(bench):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    a = bench.stage_args(config, 7, ["plantedregions"])
    for step in ("tcav", "xnn_train"):
        assert a[step][a[step].index("--seed") + 1] == "7"
    sacv = a["sacv"]["plantedregions"]
    assert sacv[sacv.index("--seed") + 1] == "7"
    assert sacv[sacv.index("--desc-label") + 1] == "plantedregions"
    assert "--seed" not in a["xnn_explain"]
    # the options the workflow leaves to the stage's default are not passed
    assert config["concepts3d"]["n_random"] is None and "--n-random" not in a["tcav"]
    subjects = config["evaluation"]["subjects"]
    assert a["tcav"][a["tcav"].index("--class-split") + 1] == subjects
    assert a["xnn_train"][a["xnn_train"].index("--epochs") + 1] == str(config["xnn"]["epochs"])


def test_markdown_has_a_criterion_column(bench):
    tcav = bench.compare_tcav({s: [_row("a", "significant")] for s in range(2)})
    xnn = bench.compare_xnn({s: _srae_json([0.5, 0.01]) for s in range(2)})
    sacv = {"seeds": [0, 1], "min_ncc": 0.9, "mask": "whole volume", "maps": {},
            "criterion_met": False}  # fmt: skip
    doc = {"seeds": [0, 1], "classifier": "c", "tcav": tcav, "sacv": sacv, "xnn": xnn,
           "seconds": {"0": {"tcav": 1.0}}}  # fmt: skip
    md = bench.markdown(doc)
    assert "| criterion | target | measured | criterion met |" in md
    assert "| TCAV verdicts | identical for every concept and layer | 1 of 1" in md
    assert "| 0 | 0.50 0.01 | 2 |" in md
    json.dumps(doc)  # JSON-safe


@pytest.mark.workflow
def test_stage_args_match_the_workflows_dry_run(bench, repo_root, tmp_path):
    """The benchmark's options are the ones the rules pass (contiguous in their command)."""
    from test_workflow import _ok, _shell_command, _snakemake

    out = _ok(
        _snakemake(
            repo_root, tmp_path, "-n", "-p", configfile="config/config.yaml", mirror=tmp_path
        )
    )
    config = yaml.safe_load((repo_root / "config" / "config.yaml").read_text())
    concepts = config["concepts3d"]["sacv_concepts"]
    a = bench.stage_args(config, config["seed"], concepts)
    expected = {
        "tcav": a["tcav"],
        "sacv": a["sacv"][concepts[0]],
        "xnn-train": a["xnn_train"],
        "xnn-explain": a["xnn_explain"],
    }
    for command, args in expected.items():
        tokens = shlex.split(_shell_command(out, command).split(">")[0])
        n = len(args)
        assert any(tokens[i : i + n] == args for i in range(len(tokens) - n + 1)), (
            command,
            args,
            tokens,
        )
