"""``benchmarks/bench_scale.py``: its growth analysis, and a tiny end-to-end run (2 and 3 subjects
at 16³, one thread) whose JSON must hold every field the report needs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_scale.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_growth_tells_linear_from_superlinear(bench):
    sizes = [100, 300, 1000]
    linear = bench.growth(sizes, [20 + 0.5 * n for n in sizes])
    assert linear["linear"] is True
    assert linear["fit"]["a"] == pytest.approx(20) and linear["fit"]["b"] == pytest.approx(0.5)
    assert linear["fit"]["r2"] == pytest.approx(1.0)
    assert linear["marginal_seconds_per_subject"] == [0.5, 0.5]
    assert linear["worst_marginal_ratio"] == 1.0
    # the start-up cost makes the small size dearer per subject: not a growth problem
    ratio = (20 / 100 + 0.5) / (20 / 1000 + 0.5)
    assert linear["worst_per_subject_ratio"] == pytest.approx(ratio, abs=1e-3)

    quadratic = bench.growth(sizes, [20 + 0.5 * n + 0.001 * n * n for n in sizes])
    assert quadratic["linear"] is False and quadratic["worst_marginal_ratio"] > 1.25
    # a falling marginal cost (warm caches, a fixed start-up) is still linear; a flat one too
    assert bench.is_linear([0.6, 0.5]) and bench.is_linear([0.5, 0.6])
    assert not bench.is_linear([0.5, 0.7]) and not bench.is_linear([0.5, -0.1])
    # unsorted sizes are sorted; one size has no marginal cost and no verdict
    assert bench.growth([300, 100], [170, 70])["sizes"] == [100, 300]
    single = bench.growth([5], [10.0])
    assert single["linear"] is None and single["fit"]["b"] is None


def test_sheet_replicates_the_source(bench, tmp_path):
    sources = [{"source": f"sub-{c}", "t1": f"/d/{c}_T1w.nii.gz", "dseg": f"/d/{c}_dseg.nii.gz",
                "label": lab} for c, lab in (("a", "control"), ("b", "disease"))]  # fmt: skip
    sheet = bench.write_sheet(tmp_path / "s.tsv", sources, 5)
    rows = [line.split("\t") for line in sheet.read_text().splitlines()]
    assert rows[0] == ["subject", "t1", "dseg", "label", "group"]
    assert [r[0] for r in rows[1:]] == [f"rep0000{k}" for k in range(5)]
    assert [r[4] for r in rows[1:]] == ["sub-a", "sub-b", "sub-a", "sub-b", "sub-a"]
    assert rows[2][1:4] == ["/d/b_T1w.nii.gz", "/d/b_dseg.nii.gz", "disease"]


@pytest.mark.slow
def test_tiny_run_writes_the_report(ixi_root, tmp_path):
    out = tmp_path / "scale.json"
    env = dict(os.environ, NEUROEXPLAIN_SHARED_DATA=str(ixi_root.parent), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPT), "--sizes", "3", "2", "--shape", "16", "--threads", "1",
           "--saliency-subjects", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["name"] == "scale" and res["params"]["shape"] == 16
    assert res["params"]["sizes"] == [2, 3] and res["params"]["threads"] == 1
    assert res["setup"]["trained"] is True
    for n, run in zip([2, 3], res["runs"], strict=True):
        assert run["n_subjects"] == n and run["n_simulated"] == n
        assert run["n_maps"] == 3 * n  # simulator, simulatorinject, simulatorremove
        assert run["region_rows"] > 0 and run["preproc_pt_mb"] > 0
        for step in ("ingest", "simulate"):
            s = run["steps"][step]
            assert s["seconds"] > 0 and s["peak_rss_mb"] > 50
            assert s["peak_tree_rss_mb"] >= s["peak_rss_mb"]
            assert run["seconds_per_subject"][step] == pytest.approx(s["seconds"] / n, abs=1e-3)
        assert run["meets_target"] is None  # only the 1,000-subject run is judged
    assert res["runs"][1]["preproc_pt_mb"] > res["runs"][0]["preproc_pt_mb"]
    for step in ("ingest", "simulate", "total"):
        g = res["growth"][step]
        assert g["sizes"] == [2, 3] and len(g["marginal_seconds_per_subject"]) == 1
        assert g["fit"]["b"] is not None and g["worst_per_subject_ratio"] >= 1
    assert res["extrapolated_seconds"]["total"] is not None
    assert set(res["memory"]) == {"preproc_pt_mb_per_subject", "ingest", "simulate"}
    sal = res["saliency"]
    methods = ["gradient", "gradxinput", "smoothgrad", "ig", "gradcam", "occlusion"]
    assert sorted(sal["seconds_per_subject"]) == sorted(methods)
    assert all(v >= 0 for v in sal["seconds_per_subject"].values())
    assert sal["n_subjects"] == 1 and sal["n_maps"] == len(methods)
    assert res["provenance"]["command"] == "bench_scale"
    md = out.with_suffix(".md").read_text()
    assert "| 3 |" in md and "occlusion" in md and "Extrapolated to 1000" in md
