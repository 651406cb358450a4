"""Region transplants: the classifier's reliance on each region of a paired cohort."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from _toy3d import write_cohort
from torch import nn

from neuroexplain.evaluate.reliance import paired_indices, region_reliance

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RegionSum(nn.Module):
    """logit = 2 * sum of the image over region A + 0 * region B (a known reliance)."""

    def __init__(self, mask_a: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask_a.float())
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return (self.scale * (x * self.mask).flatten(1).sum(1))[:, None]


def test_paired_indices_needs_one_control_and_one_diseased_per_group():
    groups = ["a", "a", "b", "c", "c", "d", "d", "d"]
    y = [0, 1, 0, 1, 0, 0, 1, 1]
    assert paired_indices(groups, y) == [(0, 1), (4, 3)]  # b alone, d has three: no pairs
    assert paired_indices(groups, y, among=[0, 1, 3]) == [(0, 1)]


def test_shares_of_a_model_with_known_reliance():
    dseg = torch.zeros(2, 1, 8, 8, 8, dtype=torch.int16)
    dseg[:, :, 1:3, 1:3, 1:3] = 10  # region A
    dseg[:, :, 5:7, 5:7, 5:7] = 20  # region B
    x = torch.zeros(2, 1, 8, 8, 8)
    x[1] = (dseg[1] > 0).float()  # the diseased image is bright in A and B
    model = RegionSum(dseg[0, 0] == 10)
    table = region_reliance(
        model, x, dseg, [(0, 1)], {"A": [10], "B": [20]}, names=["ctl", "dis"], dilate=0
    )
    a, b = (table[table["region"] == r].iloc[0] for r in ("A", "B"))
    assert a["logit_control"] == 0 and a["logit_diseased"] == pytest.approx(16.0)
    assert a["share_inject"] == pytest.approx(1.0) and a["share_remove"] == pytest.approx(1.0)
    assert b["share_inject"] == 0 and b["share_remove"] == 0
    assert a["n_voxels"] == 8 and a["control"] == "ctl" and a["diseased"] == "dis"
    # dilation grows the mask (6-connected, one voxel: 8 + 6 * 4 voxels)
    wide = region_reliance(model, x, dseg, [(0, 1)], {"A": [10]}, dilate=1)
    assert wide["n_voxels"].iloc[0] == 32


def test_cli_on_a_paired_toy_cohort(tmp_path):
    from neuroexplain.cli import main

    paths = write_cohort(tmp_path / "toy")
    pre = torch.load(paths["root"] / "preproc.pt", weights_only=True)
    # subjects 2k (control) and 2k + 1 (diseased) as one "anatomy" each
    pre["groups"] = [f"src{i // 2}" for i in range(len(pre["subjects"]))]
    torch.save(pre, paths["root"] / "preproc.pt")
    out = tmp_path / "res" / "reliance"
    args = [
        "region-reliance", "--preproc", str(paths["root"] / "preproc.pt"),
        "--checkpoint", str(paths["root"] / "model.pt"), "--out", str(out),
        "--regions", "A=10", "--regions", "B=20", "--dilate", "1",
    ]  # fmt: skip
    assert main(args) == 0
    summary = pd.read_csv(tmp_path / "res" / "reliance_summary.tsv", sep="\t")
    table = pd.read_csv(tmp_path / "res" / "reliance.tsv", sep="\t")
    assert summary["region"].tolist() == ["A", "B"] and (summary["n"] == 4).all()
    assert len(table) == 8 and set(table["control"]) == {"sub-16", "sub-18", "sub-20", "sub-22"}
    a, b = summary.set_index("region").loc[["A", "B"], "share_inject_mean"]
    assert a > 0.5 and abs(b) < 0.3 and a > 2 * abs(b)  # the toy disease lives in region A
    meta = json.loads((tmp_path / "res" / "reliance.json").read_text())
    assert meta["n_pairs"] == 4 and meta["params"]["regions"] == {"A": [10], "B": [20]}
    assert meta["checkpoint_sha256"]
    np.testing.assert_allclose(
        [r["share_inject_mean"] for r in meta["summary"]], summary["share_inject_mean"]
    )


def test_cli_refuses_an_unpaired_cohort_and_empty_regions(tmp_path, capsys):
    from neuroexplain.cli import main

    paths = write_cohort(tmp_path / "toy")
    base = [
        "region-reliance", "--preproc", str(paths["root"] / "preproc.pt"),
        "--checkpoint", str(paths["root"] / "model.pt"), "--out", str(tmp_path / "r"),
    ]  # fmt: skip
    assert main([*base, "--regions", "A=10"]) != 0
    assert "paired cohort" in capsys.readouterr().err
    pre = torch.load(paths["root"] / "preproc.pt", weights_only=True)
    pre["groups"] = [f"src{i // 2}" for i in range(len(pre["subjects"]))]
    torch.save(pre, paths["root"] / "preproc.pt")
    assert main([*base, "--regions", "X=99"]) != 0
    assert "empty in every" in capsys.readouterr().err
    # a label no subject has, in a region that is not empty (a typo beside a good label)
    assert main([*base, "--regions", "A=10,11"]) != 0
    err = capsys.readouterr().err
    assert "error: --regions: 1 label(s) in none of the 8 subjects' label maps" in err
    assert "label 11 (region 'A'): nearest present 1, 10, 20" in err
    assert main(base) != 0
    assert "--regions" in capsys.readouterr().err
    assert not list(tmp_path.glob("r*"))
