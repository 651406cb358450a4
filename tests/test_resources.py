"""Resource limits: training-memory estimate and the check that refuses a run that cannot fit.

The command-line case (``NEUROEXPLAIN_MEMORY_LIMIT_MB`` tiny -> ``neuroexplain train-simulator``
exits 2 with one line and writes nothing) is ``memory-limit-train-simulator`` in
``test_bad_inputs.py``.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from neuroexplain.errors import InputError
from neuroexplain.utils import (
    MEMORY_LIMIT_ENV,
    available_memory,
    check_memory_fits,
    estimate_activation_memory,
    estimate_training_memory,
    format_bytes,
)

F32 = 4


def _toy() -> nn.Module:
    """conv 1->2 (3³, no bias) -> ReLU -> flatten -> linear 128->1 on a 1x4x4x4 input."""
    return nn.Sequential(
        nn.Conv3d(1, 2, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(128, 1)
    )


def test_estimate_matches_a_hand_count() -> None:
    """By hand: 183 weights; autograd keeps the input (64 floats) for the convolution and the
    ReLU output (128 floats; the linear layer's input is a view of it); the largest layer output
    is 128 floats."""
    torch.manual_seed(0)
    net = _toy()
    weights = (2 * 27 + 128 + 1) * F32
    per_sample = (64 + 128) * F32 + 2 * 128 * F32
    for batch in (1, 3):
        acts = estimate_activation_memory(net, (1, 4, 4, 4), batch)
        assert acts == batch * per_sample
        # Adam: a gradient and two moments per trainable weight
        assert estimate_training_memory(net, (1, 4, 4, 4), batch) == 4 * weights + acts
    assert estimate_training_memory(net, (1, 4, 4, 4), 2, optimizer_states=0) == 2 * weights + (
        2 * per_sample
    )
    for p in net.parameters():  # frozen: only the weights and the activations count
        p.requires_grad_(False)
    assert estimate_training_memory(net, (1, 4, 4, 4), 2) == weights + 2 * per_sample


def test_measurement_leaves_the_model_as_it_was() -> None:
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.ReLU()).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    need = estimate_training_memory(net, (1, 6, 6, 6), 8)
    assert need > 0 and net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert all(p.grad is None for p in net.parameters())


def test_activations_grow_with_the_input_and_the_custom_forward() -> None:
    net = _toy()
    small = estimate_activation_memory(nn.Conv3d(1, 4, 3, padding=1), (1, 8, 8, 8), 2)
    large = estimate_activation_memory(nn.Conv3d(1, 4, 3, padding=1), (1, 16, 16, 16), 2)
    assert large == 8 * small
    calls = []

    def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return model(x * 2)

    estimate_activation_memory(net, (1, 4, 4, 4), 5, forward=forward)
    assert calls == [(1, 1, 4, 4, 4)]  # measured on a batch of one


def test_limit_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "3")
    assert available_memory() == (3 * 2**20, f"{MEMORY_LIMIT_ENV}=3")
    check_memory_fits(2 * 2**20, "a small job", "data.pt")
    with pytest.raises(InputError) as info:
        check_memory_fits(5 * 2**20, "training the toy", "data.pt", hint="use less")
    msg = str(info.value)
    assert msg == (
        "data.pt: training the toy needs about 5.0 MiB of memory, but only 3.0 MiB is available "
        f"({MEMORY_LIMIT_ENV}=3); use less"
    )
    assert "\n" not in msg
    for bad in ("lots", "0", "-1"):
        monkeypatch.setenv(MEMORY_LIMIT_ENV, bad)
        with pytest.raises(InputError, match=MEMORY_LIMIT_ENV):
            available_memory()


def test_system_memory_from_psutil_or_meminfo(monkeypatch) -> None:
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    avail, source = available_memory()
    assert avail is not None and avail > 2**20, source
    monkeypatch.setitem(sys.modules, "psutil", None)  # "not installed": read /proc/meminfo
    avail2, source2 = available_memory()
    if avail2 is not None:
        assert "MemAvailable" in source2 and avail2 > 2**20
    check_memory_fits(1, "one byte", "x")  # fits on any machine


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**30) == "3.0 GiB"


def test_simulator_training_refuses_before_anything_is_written(tmp_path, monkeypatch) -> None:
    from neuroexplain.simulator import SimulatorConfig, TrainConfig, train_simulator

    x = torch.rand(4, 1, 16, 16, 16)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(16**3, 1))
    state = tmp_path / "model.state.pt"
    kw = {
        "config": TrainConfig(
            epochs=1, objective=0, batch_size=2, device="cpu", checkpoint_every=1
        ),
        "net_config": SimulatorConfig(channels=(4, 8), num_experts=2, downsample=1),
        "state_path": state,
        "source": tmp_path / "preproc.pt",
        "progress": False,
    }
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1")
    with pytest.raises(InputError, match=r"preproc\.pt: training the simulator .* needs about"):
        train_simulator(x, torch.tensor([1.0, -1.0, 1.0, -1.0]), clf, **kw)
    assert not state.exists() and not list(tmp_path.iterdir())
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "4096")  # enough: trains and checkpoints
    _, history = train_simulator(x, torch.tensor([1.0, -1.0, 1.0, -1.0]), clf, **kw)
    assert len(history) == 2 and state.is_file()
