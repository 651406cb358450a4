"""The precision of the training forward passes (fp32 / bf16 / auto): how it is chosen, refused,
recorded, and that a bf16 training stays deterministic on CPU."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml
from test_classifier import _toy_preproc
from test_simulator import _train

from neuroexplain.classifier import train_classifier
from neuroexplain.cli import main
from neuroexplain.errors import InputError
from neuroexplain.settings import PRECISIONS, ClassifierConfig, SimulatorTrainConfig
from neuroexplain.utils import cpu_flags, resolve_precision

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx2 avx512f {extra}
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu sse2
"""


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra="avx512_bf16 amx_bf16"))
    flags = cpu_flags(path)
    assert {"avx512f", "avx512_bf16", "amx_bf16"} <= flags and "spectre_v1" not in flags
    assert cpu_flags(tmp_path / "missing") == frozenset()  # not Linux: no flags, fp32


@pytest.mark.parametrize(
    ("requested", "device", "flags", "expected"),
    [
        ("fp32", "cpu", {"avx512_bf16"}, "fp32"),
        ("auto", "cpu", {"avx512f", "avx512_bf16"}, "bf16"),
        ("auto", "cpu", {"amx_bf16"}, "bf16"),
        ("auto", "cpu", {"avx2", "avx512f"}, "fp32"),  # no native bfloat16: stays fp32
        ("auto", "cpu", set(), "fp32"),
        ("bf16", "cpu", {"avx2"}, "bf16"),  # asked for: emulated, with a warning
        ("auto", "cuda", set(), "fp16"),  # CUDA's mixed precision with a gradient scaler
        ("auto", torch.device("cuda", 1), set(), "fp16"),
        ("fp32", "cuda", set(), "fp32"),
    ],
)
def test_precision_follows_the_setting_and_the_cpu_flags(requested, device, flags, expected):
    p = resolve_precision(requested, device, flags=flags)
    assert (p.name, p.requested) == (expected, requested)
    assert p.enabled == (expected != "fp32")


def test_emulated_bf16_is_a_warning(caplog):
    with caplog.at_level("WARNING", logger="neuroexplain.utils"):
        resolve_precision("bf16", "cpu", flags={"avx2"})
    assert "emulated" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="neuroexplain.utils"):
        resolve_precision("bf16", "cpu", flags={"amx_bf16"})
    assert "emulated" not in caplog.text


def test_an_invalid_precision_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(InputError, match=r"--precision: expected one of fp32, bf16, auto"):
        resolve_precision("fp64", "cpu", flags=set())
    for cls in (ClassifierConfig, SimulatorTrainConfig):
        with pytest.raises(InputError, match="--precision"):
            cls(precision="half")
    torch.save(_toy_preproc(n=12), tmp_path / "preproc.pt")
    args = ["--preproc", str(tmp_path / "preproc.pt"), "--out", str(tmp_path / "o")]
    assert main(["train-classifier", *args, "--precision", "half"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--precision" in err and "'half'" in err, err
    assert not (tmp_path / "o").exists()


def test_workflow_default_is_the_library_default(repo_root):
    schema = yaml.safe_load((repo_root / "workflow/schemas/config.schema.yaml").read_text())
    compute = schema["properties"]["compute"]["properties"]["precision"]
    config = yaml.safe_load((repo_root / "config/config.yaml").read_text())["compute"]
    assert compute["enum"] == list(PRECISIONS)
    assert compute["default"] == config["precision"] == ClassifierConfig().precision
    assert SimulatorTrainConfig().precision == ClassifierConfig().precision == "fp32"


def test_bf16_classifier_training_runs_records_its_precision_and_is_deterministic(tmp_path):
    # 32^3, not the toy's usual 16^3: there the small network's last convolution sees 2^3
    # feature maps, where oneDNN's bfloat16 weight gradient (torch 2.13, CPU without native
    # bf16) is wrong (inf / 60 % error) and differs between runs; from 4^3 on it is exact to
    # bf16 rounding and deterministic
    pre = _toy_preproc(n=12, size=32)
    kw = {"epochs": 1, "batch_size": 4, "seed": 1, "patience": 0, "progress": False}
    kw |= {"augment": False, "reference_fallback": False, "device": "cpu", "precision": "bf16"}
    metrics = train_classifier(pre, tmp_path / "a", **kw)
    train_classifier(pre, tmp_path / "b", **kw)
    written = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["precision"] == written["precision"] == "bf16"
    assert written["provenance"]["params"]["precision"] == "bf16"
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "logits.tsv").read_bytes() == (
        tmp_path / "b" / "logits.tsv"
    ).read_bytes()
    logs = [pd.read_csv(tmp_path / r / "train_log.tsv", sep="\t") for r in ("a", "b")]
    pd.testing.assert_frame_equal(*(log.drop(columns="seconds") for log in logs))
    fp32 = train_classifier(pre, tmp_path / "c", **{**kw, "precision": "fp32"})
    assert fp32["precision"] == "fp32"


def test_bf16_simulator_training_is_deterministic():
    a, ha, _ = _train(2, precision="bf16")
    b, hb, _ = _train(2, precision="bf16")
    assert ha == hb
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    _, hc, _ = _train(2)  # fp32: a different trajectory
    assert hc != ha
