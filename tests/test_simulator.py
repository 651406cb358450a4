"""Tests of the conditional warping simulator (Liu et al., IPMI 2021) and its disease maps.

Everything runs on tiny synthetic volumes (16³-32³) with a frozen toy classifier whose logit
grows with the volume of a bright blob, so the tests are fast and self-contained.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuroexplain.cli._common import parse_regions
from neuroexplain.errors import InputError
from neuroexplain.simulator import (
    CondConv3d,
    SimulatorConfig,
    SimulatorNet,
    TrainConfig,
    ddf_to_world,
    disease_log_jacobian,
    group_stats,
    invert_displacement,
    load_simulator,
    logit_shift_loss,
    region_means,
    save_simulator,
    select_training_subjects,
    train_simulator,
    warp_native,
)
from neuroexplain.simulator.train import (
    class_targets,
    cls_weight,
    epoch_objective,
    hinge_values,
    objective_met,
    select_pass,
    volume_change_loss,
)

TINY = SimulatorConfig(channels=(4, 8), num_experts=2, downsample=1)


# ------------------------------------------------------------------------------------ helpers


class BlobClassifier(nn.Module):
    """Frozen toy classifier: logit = a * (fraction of bright voxels - threshold).

    Has a BatchNorm layer with non-trivial running statistics (in eval mode it is the identity),
    so a test can see whether training touched them.
    """

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm3d(1)
        self.head = nn.Linear(1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / 27)
            self.bn.running_mean.fill_(0.2)
            self.bn.running_var.fill_(4.0)
            self.bn.weight.fill_(2.0)  # (h - 0.2) / 2 * 2 + 0.2 = h in eval mode
            self.bn.bias.fill_(0.2)
            self.head.weight.fill_(200.0)
            self.head.bias.fill_(-200.0 * threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid((self.bn(self.conv(x)) - 0.75) * 10)
        return self.head(h.mean(dim=(2, 3, 4)))


def _grid(size: int) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(size, dtype=np.float64)] * 3, indexing="ij"))


def toy_images(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Balls of tissue (0.5) holding a bright blob (1.0): small in healthy, large in diseased."""
    rng = np.random.default_rng(seed)
    g = _grid(size)
    imgs, y = [], []
    for k in range(n):
        c = size / 2 - 0.5 + rng.uniform(-1, 1, 3)
        d = np.sqrt(((g - c[:, None, None, None]) ** 2).sum(0))
        r = 0.16 * size if k % 2 == 0 else 0.24 * size
        imgs.append(0.5 * (d < 0.45 * size) + 0.5 / (1 + np.exp((d - r) * 3)))
        y.append(k % 2)
    return torch.tensor(np.stack(imgs)[:, None], dtype=torch.float32), torch.tensor(y).float()


def toy_classifier(size: int = 16) -> BlobClassifier:
    frac_small = 4 / 3 * np.pi * (0.16 * size) ** 3 / size**3
    frac_large = 4 / 3 * np.pi * (0.24 * size) ** 3 / size**3
    return BlobClassifier(threshold=0.5 * (frac_small + frac_large)).eval()


def soft_ball(size: int, centre: float, radius: float) -> torch.Tensor:
    d = np.sqrt(((_grid(size) - centre) ** 2).sum(0))
    return torch.tensor(1 / (1 + np.exp((d - radius) * 4)), dtype=torch.float32)[None, None]


def radial_bump(size: int, centre: float, amplitude: float, sigma: float) -> torch.Tensor:
    """u(x) = a (x - c) exp(-|x - c|² / 2σ²): a > 0 points outward (pull-back shrinks)."""
    r = _grid(size) - centre
    g = np.exp(-(r**2).sum(0) / (2 * sigma**2))
    return torch.tensor(amplitude * r * g, dtype=torch.float32)[None]


def warp(img: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    import warnings

    from monai.networks.blocks import Warp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Warp(mode="bilinear", padding_mode="border")(img, ddf)


# ------------------------------------------------------------------------------------ CondConv


@pytest.mark.parametrize("mode", ["grouped", "experts"])
@pytest.mark.parametrize("stride", [1, 2])
def test_condconv_equals_per_sample_convolution_with_mixed_kernel(mode: str, stride: int) -> None:
    torch.manual_seed(0)
    conv = CondConv3d(3, 5, num_experts=4, stride=stride, mode=mode).double()
    x = torch.randn(3, 3, 9, 8, 7, dtype=torch.float64)
    o = torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)
    out = conv(x, o)
    r = conv.routing_weights(x, o)
    assert r.shape == (3, 4) and torch.all((r > 0) & (r < 1))
    for b in range(3):
        w = sum(r[b, k] * conv.weight[k] for k in range(4))
        bias = sum(r[b, k] * conv.bias[k] for k in range(4))
        ref = F.conv3d(x[b : b + 1], w, bias, stride=stride, padding=1)
        torch.testing.assert_close(out[b : b + 1], ref, rtol=1e-10, atol=1e-10)


def test_condconv_routing_depends_on_condition() -> None:
    torch.manual_seed(1)
    conv = CondConv3d(2, 8, num_experts=3)
    x = torch.randn(1, 2, 6, 6, 6).expand(2, -1, -1, -1, -1)
    out = conv(x, torch.tensor([-1.0, 1.0]))
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="expected input"):
        conv(torch.randn(1, 3, 6, 6, 6), 1.0)


# ----------------------------------------------------------------------------------- network


@pytest.mark.parametrize("diffeomorphic", [False, True])
@pytest.mark.parametrize("downsample", [1, 2])
def test_zero_initialised_head_gives_the_identity_warp(
    diffeomorphic: bool, downsample: int
) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16, 16)
    cfg = SimulatorConfig(
        channels=(4, 8), downsample=downsample, diffeomorphic=diffeomorphic, init_std=0.0
    )
    with torch.no_grad():
        warped, ddf = SimulatorNet(cfg)(x, torch.tensor([-1.0, 1.0]))
    assert ddf.shape == (2, 3, 16, 16, 16)
    assert float(ddf.abs().max()) == 0.0
    torch.testing.assert_close(warped, x, rtol=0, atol=1e-5)
    # the default initialisation is near zero, not exactly zero
    with torch.no_grad():
        _, ddf = SimulatorNet(SimulatorConfig(channels=(4, 8)))(x, -1.0)
    assert 0 < float(ddf.abs().max()) < 1e-2


def test_network_shapes_odd_sizes_and_errors() -> None:
    net = SimulatorNet(SimulatorConfig(channels=(4, 8, 8), num_experts=2, init_std=0.1))
    x = torch.rand(1, 1, 17, 20, 15)
    warped, ddf, low = net(x, 1.0, return_lowres=True)
    assert warped.shape == x.shape and ddf.shape == (1, 3, 17, 20, 15)
    assert low.shape == (1, 3, 9, 10, 8)
    with pytest.raises(ValueError, match="expected images"):
        net(torch.rand(1, 2, 16, 16, 16), 1.0)
    with pytest.raises(ValueError, match="condition"):
        net(torch.rand(2, 1, 16, 16, 16), torch.ones(3))


# ------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("hinge", ["relative", "flip"])
def test_hinge_pushes_the_logit_in_the_asked_direction(hinge: str) -> None:
    l_in = torch.tensor([-2.0, 2.0])
    o = torch.tensor([-1.0, 1.0])  # inject on the healthy one, remove on the diseased one
    l_sim = torch.tensor([-2.0, 2.0], requires_grad=True)  # no change yet
    loss = logit_shift_loss(l_in, l_sim, o, 1.0, hinge=hinge)
    loss.backward()
    assert float(loss.detach()) > 0
    # gradient descent raises the inject logit and lowers the remove logit
    assert l_sim.grad[0] < 0 and l_sim.grad[1] > 0
    # satisfied: inject went up by >= margin (and past margin), remove went down likewise
    done = torch.tensor([1.5, -1.5]) if hinge == "flip" else torch.tensor([-0.5, 0.5])
    assert float(logit_shift_loss(l_in, done, o, 1.0, hinge=hinge)) == 0.0
    # the wrong direction is penalised more than no change
    wrong = torch.tensor([-4.0, 4.0])
    assert float(logit_shift_loss(l_in, wrong, o, 1.0, hinge=hinge)) > float(loss)


def test_select_training_subjects_keeps_correct_train_subjects() -> None:
    idx = select_training_subjects(
        ["a", "b", "c", "d", "e"],
        [0, 1, 1, 0, 1],
        [-1.0, 2.0, -0.5, 0.3, 1.0],
        ["train", "train", "train", "train", "test"],
    )
    assert idx.tolist() == [0, 1]
    idx = select_training_subjects(
        ["a", "b", "c"], [0, 1, 1], [-1.0, 2.0, -0.5], ["train"] * 3, correct_only=False
    )
    assert idx.tolist() == [0, 1, 2]


# ------------------------------------------------------------------------- disease-map maths


def test_disease_map_signs_with_linear_scaling() -> None:
    size, a = 20, 0.1
    c = (size - 1) / 2
    u = torch.tensor(a * (_grid(size) - c), dtype=torch.float32)[None]
    inner = (slice(None), 0, slice(6, 14), slice(6, 14), slice(6, 14))
    inject = disease_log_jacobian(u, "inject")[inner]
    # pulling from farther out shrinks the simulated (diseased) image: map = -3 log(1 + a)
    torch.testing.assert_close(inject, torch.full_like(inject, -3 * np.log1p(a)), atol=1e-5, rtol=0)
    remove = disease_log_jacobian(u, -1.0 * -1.0)[inner]  # +1 = remove
    # the simulated healthy image is the shrunk one: the diseased input is expanded
    torch.testing.assert_close(remove, torch.full_like(remove, 3 * np.log1p(a)), atol=1e-3, rtol=0)


def test_inject_map_is_negative_in_a_ball_shrunk_by_a_radial_field() -> None:
    size, c = 32, 15.5
    ball = soft_ball(size, c, 5.0)
    u = radial_bump(size, c, amplitude=0.12, sigma=5.0)  # outward: pull-back shrinks the ball
    sim = warp(ball, u)
    assert float(sim.sum()) < 0.9 * float(ball.sum())  # the simulated ball really shrank
    m = disease_log_jacobian(u, "inject")
    inside = ball > 0.5
    assert float(m[inside].max()) < 0  # shrunk tissue: negative everywhere in the ball
    # change of variables: the simulated ball weighted by 1/exp(map) has the input's volume
    vol = float((sim * torch.exp(-m)).sum())
    assert vol == pytest.approx(float(ball.sum()), rel=0.02)


def test_remove_map_is_expressed_in_the_input_space() -> None:
    size, c = 32, 15.5
    diseased = soft_ball(size, c, 4.0)  # the input: an atrophied ball
    u = radial_bump(size, c, amplitude=-0.1, sigma=5.0)  # inward: pull-back enlarges it
    healthy = warp(diseased, u)
    assert float(healthy.sum()) > 1.2 * float(diseased.sum())
    m = disease_log_jacobian(u, "remove")
    inside = diseased > 0.5
    assert float(m[inside].max()) < 0  # the diseased ball is the smaller one
    # volumes: the diseased ball weighted by healthy / diseased volume = the healthy ball
    assert float((diseased * torch.exp(-m)).sum()) == pytest.approx(float(healthy.sum()), rel=0.02)
    # and it equals +log J_u sampled at the inverse map (first-order: +log J_u itself)
    from neuroexplain.jacobian import log_jacobian

    v, resid = invert_displacement(u)
    assert resid < 1e-3
    at_inverse = warp(log_jacobian(u), v)
    torch.testing.assert_close(m[inside], at_inverse[inside], atol=0.02, rtol=0)
    composed = v + warp(u, v)
    assert float(composed.abs().max()) < 1e-3


# ----------------------------------------------------------------------------------- training


def _train(steps: int, tmp: Path | None = None, **kw) -> tuple[SimulatorNet, list, nn.Module]:
    x, y = toy_images(4)
    clf = toy_classifier()
    val = kw.pop("val", None)
    cfg = TrainConfig(
        epochs=kw.pop("epochs", 10),
        batch_size=2,
        lr=1e-3,
        max_steps=steps,
        seed=kw.pop("seed", 3),
        device="cpu",
        checkpoint_every=kw.pop("checkpoint_every", 0),
        **kw,
    )
    net, hist = train_simulator(
        x,
        torch.where(y == 1, 1.0, -1.0),
        clf,
        config=cfg,
        net_config=TINY,
        state_path=None if tmp is None else tmp / "state.pt",
        progress=False,
        val_images=None if val is None else val[0],
        val_conditions=None if val is None else val[1],
    )
    return net, hist, clf


def test_training_leaves_the_classifier_untouched() -> None:
    clf = toy_classifier()
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    x, y = toy_images(4)
    clf.train()  # even if handed over in training mode
    net, hist = train_simulator(
        x,
        torch.where(y == 1, 1.0, -1.0),
        clf,
        config=TrainConfig(epochs=1, objective=0, batch_size=2, device="cpu", checkpoint_every=0),
        net_config=TINY,
        progress=False,
    )
    assert len(hist) == 2
    after = clf.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # weights, BatchNorm running stats, batch counter
    assert not clf.training
    assert all(not p.requires_grad and p.grad is None for p in clf.parameters())
    # ... while the simulator did learn something
    fresh = SimulatorNet(TINY)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(net.state_dict().values(), fresh.state_dict().values(), strict=True)
    )


def test_training_is_deterministic_on_cpu() -> None:
    a, ha, _ = _train(3)
    b, hb, _ = _train(3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert ha == hb
    c, _, _ = _train(3, seed=4)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_resumed_training_ends_with_the_same_weights(tmp_path: Path) -> None:
    ref, href, _ = _train(4)
    # interrupted after 3 steps (state checkpoint every 2 steps + at the stop) ...
    _train(3, tmp_path, checkpoint_every=2)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 3 and "optimizer" in state and "rng" in state
    # ... then the same command again: it resumes at step 3 and finishes
    res, hres, _ = _train(4, tmp_path, checkpoint_every=2)
    assert len(hres) == 4 and hres == href
    for (k, va), vb in zip(ref.state_dict().items(), res.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    # a state written with other options is ignored (fresh start, same as the reference)
    other, _, _ = _train(4, tmp_path, checkpoint_every=2, w_cycle=0.0)
    assert not all(
        torch.equal(p, q) for p, q in zip(ref.parameters(), other.parameters(), strict=True)
    )


def test_resumed_training_keeps_the_best_validation_weights(tmp_path: Path) -> None:
    x, _ = toy_images(4)
    val = (torch.zeros(2, *x.shape[1:]), torch.tensor([-1.0, -1.0]))  # never flipped: ties
    ref, href, _ = _train(5, epochs=1, val=val)
    assert select_pass(href, TrainConfig(epochs=1))["epoch"] == 0
    assert "val_n_inject" in href[-1]  # stopped within pass 2: its last weights were measured
    _train(3, tmp_path, checkpoint_every=2, epochs=1, val=val)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["best"]["step"] == 2 and "val_n_inject" not in state["history"][-1]
    res, hres, _ = _train(5, tmp_path, checkpoint_every=2, epochs=1, val=val)
    assert hres == href
    for (k, va), vb in zip(ref.state_dict().items(), res.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    last, _, _ = _train(5, epochs=1, val=val, objective_on="train")  # the last weights differ
    assert not all(
        torch.equal(p, q) for p, q in zip(ref.parameters(), last.parameters(), strict=True)
    )


def test_simulator_learns_to_move_the_toy_logit() -> None:
    x, y = toy_images(8, size=12, seed=1)
    clf = toy_classifier(12)
    cond = torch.where(y == 1, 1.0, -1.0)
    net, hist = train_simulator(
        x,
        cond,
        clf,
        config=TrainConfig(  # the paper's loss: bending energy, no volume prior
            epochs=10,
            objective=0,
            hinge="flip",
            batch_size=4,
            lr=1e-3,
            margin=1.0,
            device="cpu",
            checkpoint_every=0,
            smoothness="bending",
            w_volume=0.0,
        ),
        net_config=SimulatorConfig(channels=(4, 8), num_experts=2, downsample=1),
        progress=False,
    )
    with torch.no_grad():
        l0 = clf(x)[:, 0]
        sim, ddf = net(x, cond)
        l1 = clf(sim)[:, 0]
    shift = (l1 - l0) * cond  # negative = moved in the asked direction
    assert float(shift.max()) < 0 and float(shift.mean()) < -0.5
    first, last = (np.mean([h["cls"] for h in part]) for part in (hist[:4], hist[-4:]))
    assert last < 0.8 * first
    # the disease map of the healthy (inject) subjects expands the bright blob
    m = disease_log_jacobian(ddf[cond < 0], "inject")
    blob = x[cond < 0] > 0.9
    assert float(m[blob].mean()) > 0


def test_target_hinge_aims_at_the_other_class_median_logit() -> None:
    logits = torch.tensor([-6.0, -4.0, -2.0, 1.0, 3.0, 9.0])
    cond = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])  # healthy inject, diseased remove
    t_inject, t_remove, scale = class_targets(logits, cond, 1.0)
    assert (t_inject, t_remove, scale) == (3.0, -4.0, 3.5)
    # a weak classifier's medians near the boundary: the target keeps the margin
    assert class_targets(torch.tensor([-0.2, 0.1]), torch.tensor([-1.0, 1.0]), 1.0)[:2] == (
        1.0,
        -1.0,
    )
    targets = (t_inject, t_remove, scale)
    o = torch.tensor([-1.0, 1.0])
    # flipped by the margin is not enough: satisfied only at the other class's median
    h = hinge_values(o, torch.tensor([1.5, -1.5]), o, 1.0, hinge="target", targets=targets)
    assert torch.all(h > 0)
    h = hinge_values(o, torch.tensor([3.0, -4.0]), o, 1.0, hinge="target", targets=targets)
    assert torch.allclose(h, torch.zeros(2))
    # scaled by the logit spread: the same relative distance costs the same on any scale
    h10 = hinge_values(
        o, 10 * torch.tensor([1.5, -1.5]), o, 1.0, hinge="target", targets=(30.0, -40.0, 35.0)
    )
    h1 = hinge_values(o, torch.tensor([1.5, -1.5]), o, 0.1, hinge="target", targets=targets)
    assert torch.allclose(h10, h1)
    # the gradient pushes the logit the asked way
    l_sim = torch.tensor([0.0, 0.0], requires_grad=True)
    logit_shift_loss(o, l_sim, o, 1.0, hinge="target", targets=targets).backward()
    assert l_sim.grad[0] < 0 and l_sim.grad[1] > 0
    with pytest.raises(ValueError, match="targets"):
        hinge_values(o, l_sim, o, 1.0, hinge="target")


def test_objective_bookkeeping_and_weight_schedule() -> None:
    hist = [
        {"epoch": 0, "n_inject": 2, "n_remove": 2, "reached_inject": 2, "reached_remove": 1,
         "flipped_inject": 2, "flipped_remove": 1},
        {"epoch": 0, "n_inject": 2, "n_remove": 0, "reached_inject": 2, "reached_remove": 0,
         "flipped_inject": 2, "flipped_remove": 0},
    ]  # fmt: skip
    st = epoch_objective(hist, 0)
    assert st["reached_inject"] == 1.0 and st["reached_remove"] == 0.5
    assert st["flipped_remove"] == 0.5 and st["n_inject"] == 4
    assert objective_met(st, 0.5) and not objective_met(st, 0.95)  # 'reached' only reported
    st_flip = {**st, "reached_remove": 0.0, "flipped_remove": 1.0}
    assert objective_met(st_flip, 0.95)
    assert not objective_met({**st_flip, "flipped_inject": 0.9}, 0.95)
    cfg = TrainConfig(epochs=3, w_cls=2.0, w_cls_growth=2.0)
    assert [cls_weight(cfg, e) for e in range(5)] == [2.0, 2.0, 2.0, 4.0, 8.0]
    assert cls_weight(cfg, 30) == 20.0  # at most 10 x w_cls
    assert cls_weight(TrainConfig(epochs=3, objective=0, w_cls_growth=2.0), 9) == 1.0


def test_training_goes_on_until_the_objective_and_says_when_it_is_not_met() -> None:
    x, y = toy_images(8, size=12, seed=1)
    clf = toy_classifier(12)
    cond = torch.where(y == 1, 1.0, -1.0)
    net_cfg = SimulatorConfig(channels=(4, 8), num_experts=2, downsample=1)

    def run(**kw):
        cfg = TrainConfig(  # the paper's regularisers: the toy flips within a few passes
            batch_size=4,
            lr=3e-3,
            device="cpu",
            checkpoint_every=0,
            smoothness="bending",
            w_volume=0.0,
            **{"epochs": 1, **kw},
        )
        return train_simulator(x, cond, clf, config=cfg, net_config=net_cfg, progress=False)[1]

    # objective off: exactly `epochs` passes
    assert max(h["epoch"] for h in run(epochs=2, objective=0)) == 1
    # an easy objective is met before max_epochs, and training stops at the first pass meeting it
    hist = run(objective=0.5, max_epochs=30)
    last = int(hist[-1]["epoch"])
    assert last < 29
    assert objective_met(epoch_objective(hist, last), 0.5)
    assert all(not objective_met(epoch_objective(hist, e), 0.5) for e in range(last))
    # an unreachable one runs to max_epochs, the hinge's weight growing after `epochs`
    hist = run(objective=1.0, max_epochs=3, w_cls_growth=2.0, w_smooth=1e6)
    assert max(h["epoch"] for h in hist) == 2
    assert [h["w_cls"] for h in hist if h["step"] % 2 == 0] == [1.0, 2.0, 4.0]


def _val_row(epoch: int, step: int, n: tuple[int, int], flipped: tuple[int, int]) -> dict:
    return {
        "epoch": epoch, "step": step, "w_cls": 1.0,
        "val_n_inject": n[0], "val_n_remove": n[1],
        "val_flipped_inject": flipped[0], "val_flipped_remove": flipped[1],
        "val_reached_inject": flipped[0], "val_reached_remove": flipped[1],
    }  # fmt: skip


def test_select_pass_keeps_the_best_validation_pass() -> None:
    cfg = TrainConfig(epochs=2, objective=0.95)
    hist = [
        _val_row(0, 1, (4, 4), (4, 4)),  # best of all, but before the minimum `epochs`
        _val_row(1, 2, (4, 4), (2, 4)),  # worse direction 0.5
        _val_row(2, 3, (4, 4), (3, 2)),  # 0.5 again, lower mean
        _val_row(3, 4, (4, 4), (3, 3)),  # 0.75: the best candidate
        _val_row(4, 5, (4, 4), (4, 3)),  # 0.75, higher mean: wins the tie
        _val_row(5, 6, (4, 4), (3, 4)),  # same scores, later: loses the tie
    ]
    sel = select_pass(hist, cfg)
    assert (sel["epoch"], sel["pass"], sel["step"]) == (4, 5, 5)
    assert "not met" in sel["reason"]
    assert select_pass(hist[:3], cfg)["epoch"] == 1  # ties: the earlier pass
    # stopped (max_steps) before `epochs` passes: the last pass
    assert select_pass(hist[:1], TrainConfig(epochs=5))["epoch"] == 0
    # a direction without validation subjects does not count
    one_way = [_val_row(1, 2, (4, 0), (4, 0)), _val_row(2, 3, (4, 0), (3, 0))]
    sel = select_pass(one_way, cfg)
    assert sel["epoch"] == 1 and "met" in sel["reason"] and "not met" not in sel["reason"]
    st = epoch_objective(one_way, 1, validation=True)
    assert st["flipped_inject"] == 1.0 and st["flipped_remove"] is None
    # the objective on the training subjects (or no validation rows): the last pass
    assert select_pass(hist, TrainConfig(epochs=2, objective_on="train"))["epoch"] == 5
    train_rows = [{"epoch": 0, "step": 1, "w_cls": 1.0}, {"epoch": 1, "step": 2, "w_cls": 1.0}]
    sel = select_pass(train_rows, cfg)
    assert sel["epoch"] == 1 and "no validation subjects" in sel["reason"]
    assert select_pass([], cfg) is None
    with pytest.raises(InputError, match="--objective-on"):
        TrainConfig(objective_on="test")


def _toy_run(val: tuple[torch.Tensor, torch.Tensor] | None, **kw) -> tuple[SimulatorNet, list]:
    """Train on the toy (8 subjects, 12³, the paper's regularisers: flips within a few passes)."""
    x, y = toy_images(8, size=12, seed=1)
    cfg = TrainConfig(
        batch_size=4,
        lr=3e-3,
        device="cpu",
        checkpoint_every=0,
        smoothness="bending",
        w_volume=0.0,
        **{"epochs": 1, "objective": 0.5, **kw},
    )
    return train_simulator(
        x,
        torch.where(y == 1, 1.0, -1.0),
        toy_classifier(12),
        config=cfg,
        net_config=SimulatorConfig(channels=(4, 8), num_experts=2, downsample=1),
        progress=False,
        val_images=None if val is None else val[0],
        val_conditions=None if val is None else val[1],
    )


def _strip_val(hist: list) -> list:
    return [{k: v for k, v in h.items() if not k.startswith("val_")} for h in hist]


def test_objective_on_validation_subjects_keeps_the_best_validation_pass() -> None:
    x, y = toy_images(8, size=12, seed=1)
    # validation: two black images asked to inject (nothing to warp: never flipped) and two
    # diseased training images asked to remove (flippable)
    vx = torch.cat([torch.zeros(2, *x.shape[1:]), x[y == 1][:2]])
    vc = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    net, hist = _toy_run((vx, vc), max_epochs=8)
    val_rows = [h for h in hist if "val_n_inject" in h]
    # counted on the validation subjects only, once per pass, after the pass's last step
    assert [h["step"] for h in val_rows] == list(range(2, 17, 2))
    assert all(h["val_n_inject"] == 2 and h["val_n_remove"] == 2 for h in val_rows)
    assert all(h["val_flipped_inject"] == 0 for h in val_rows)
    assert max(h["n_inject"] + h["n_remove"] for h in hist) == 4  # training batches
    assert sum(h["flipped_inject"] for h in hist) > 0  # training injections do flip
    # the objective is unmet on validation: all passes (the training objective is easy)
    assert int(hist[-1]["epoch"]) == 7
    _, hist_train = _toy_run((vx, vc), max_epochs=8, objective_on="train")
    assert int(hist_train[-1]["epoch"]) < 7
    # the kept pass is the best validation pass; its weights give the recorded counts
    cfg = TrainConfig(epochs=1, objective=0.5)
    sel = select_pass(hist, cfg)
    rem = [h["val_flipped_remove"] for h in val_rows]
    assert sel["epoch"] == rem.index(max(rem)) and 0 < sel["epoch"] < 7  # neither first nor last
    with torch.no_grad():
        sim, _ = net(vx, vc)
        l_sim = toy_classifier(12)(sim)[:, 0]
    assert int((l_sim[2:] < 0).sum()) == val_rows[sel["epoch"]]["val_flipped_remove"]
    # ... and are those of a run that stopped after that pass (bitwise, CPU)
    short, _ = _toy_run((vx, vc), max_epochs=sel["epoch"] + 1)
    for (k, va), vb in zip(net.state_dict().items(), short.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_validation_ties_keep_the_earlier_pass_not_the_last() -> None:
    x, _ = toy_images(8, size=12, seed=1)
    vx, vc = torch.zeros(2, *x.shape[1:]), torch.tensor([-1.0, -1.0])  # never flipped
    net, hist = _toy_run((vx, vc), max_epochs=3, w_cls_growth=2.0)
    assert int(hist[-1]["epoch"]) == 2 and hist[-1]["w_cls"] == 4.0
    sel = select_pass(hist, TrainConfig(epochs=1))
    assert sel["epoch"] == 0 and sel["w_cls"] == 1.0  # all tied at 0: the first candidate
    first, _ = _toy_run((vx, vc), max_epochs=1)
    for (k, va), vb in zip(net.state_dict().items(), first.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_objective_on_train_and_no_validation_subjects_train_as_before() -> None:
    x, _ = toy_images(8, size=12, seed=1)
    vx, vc = torch.zeros(2, *x.shape[1:]), torch.tensor([-1.0, -1.0])
    # no validation subjects: the objective on the training subjects, the last pass kept
    ref, href = _toy_run(None, max_epochs=30)
    assert not any(k.startswith("val_") for h in href for k in h)
    last = int(href[-1]["epoch"])
    assert objective_met(epoch_objective(href, last), 0.5)
    assert all(not objective_met(epoch_objective(href, e), 0.5) for e in range(last))
    assert "no validation subjects" in select_pass(href, TrainConfig(epochs=1))["reason"]
    # objective_on train with validation subjects: the same run, validation only reported
    net, hist = _toy_run((vx, vc), max_epochs=30, objective_on="train")
    assert _strip_val(hist) == href
    assert sum("val_n_inject" in h for h in hist) == last + 1
    for (k, va), vb in zip(ref.state_dict().items(), net.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_volume_change_loss_counts_volume_change_not_motion() -> None:
    g = torch.tensor(_grid(10), dtype=torch.float64)[None]
    shift = torch.ones_like(g) * 2.5
    rot = torch.stack([-g[:, 1] + g[:, 1].mean(), g[:, 0] - g[:, 0].mean(), 0 * g[:, 2]], 1)
    scale = 0.05 * g  # x -> 1.05 x: det = 1.05^3 everywhere
    assert float(volume_change_loss(shift)) == pytest.approx(0.0, abs=1e-12)
    # a small rotation changes volume only to second order
    assert float(volume_change_loss(1e-3 * rot)) < 1e-5
    assert float(volume_change_loss(scale)) == pytest.approx(3 * np.log(1.05), rel=1e-9)
    # a focal bump costs in proportion to the volume it changes: less than a global scaling
    # with the same peak change
    bump = radial_bump(10, 4.5, 0.05, 1.5).double()
    assert 0 < float(volume_change_loss(bump)) < float(volume_change_loss(scale))
    u = scale.clone().requires_grad_(True)
    volume_change_loss(u).backward()
    assert u.grad is not None and float(u.grad.abs().sum()) > 0
    with pytest.raises(InputError, match="--w-volume"):
        TrainConfig(w_volume=-1)


# -------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = SimulatorNet(SimulatorConfig(channels=(4, 8), init_std=0.05, diffeomorphic=True))
    path = save_simulator(
        tmp_path / "model.pt",
        net,
        train_config=TrainConfig(),
        input_shape=[1, 16, 16, 16],
        extra={"train_subjects": ["sub-01"], "history": [{"step": 1, "loss": 0.5}]},
    )
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "neuroexplain-simulator/1" and raw["input_shape"] == [1, 16, 16, 16]
    loaded, ckpt = load_simulator(path)
    assert ckpt["train_subjects"] == ["sub-01"] and not loaded.training
    assert loaded.config == net.config
    x = torch.rand(2, 1, 16, 16, 16)
    net.eval()
    with torch.no_grad():
        for a, b in zip(net(x, -1.0), loaded(x, -1.0), strict=True):
            assert torch.equal(a, b)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"bad\.pt"):
        load_simulator(tmp_path / "bad.pt")
    with pytest.raises(InputError, match="not found"):
        load_simulator(tmp_path / "missing.pt")


# -------------------------------------------------------------------------------- tables, I/O


def test_region_means_and_group_stats() -> None:
    from scipy import stats

    labels = np.zeros((4, 4, 4), int)
    labels[:2] = 47
    labels[2:, :2] = 51
    values = np.where(labels == 47, -1.0, 0.0) + np.where(labels == 51, 2.0, 0.0)
    regs = parse_regions(["hippocampus=47,48", "ventricles=51"])
    assert regs == {"hippocampus": [47, 48], "ventricles": [51]}
    means = region_means(values, labels, {**regs, "none": [99]})
    assert means["hippocampus"] == (-1.0, 32) and means["ventricles"] == (2.0, 16)
    assert np.isnan(means["none"][0]) and means["none"][1] == 0
    rng = np.random.default_rng(0)
    vals = rng.normal(-0.1, 0.05, 12)
    df = pd.DataFrame({"group": "all", "region": "hippocampus", "mean_logjacobian": vals})
    out = group_stats(df)
    ref = stats.ttest_1samp(vals, 0.0)
    assert out.loc[0, "n"] == 12
    assert out.loc[0, "t"] == pytest.approx(ref.statistic) and out.loc[0, "p"] == pytest.approx(
        ref.pvalue
    )
    assert out.loc[0, "mean"] == pytest.approx(vals.mean())
    for bad in (["hippocampus"], ["=1"], ["a=x"], ["a=1", "a=2"], ["a="]):
        with pytest.raises(InputError, match="--regions"):
            parse_regions(bad)


def test_world_displacement_and_native_warp_follow_the_affine() -> None:
    # permuted, flipped native axes (as in IXI): voxel i -> world -y, j -> +z, k -> -x (2 mm)
    aff = np.array(
        [[0, 0, -2.0, 30], [-2.0, 0, 0, 40], [0, 2.0, 0, -20], [0, 0, 0, 1]], dtype=np.float64
    )
    u = np.zeros((3, 5, 6, 7), np.float32)
    u[0] = 1.5  # 1.5 voxels along axis i
    d = ddf_to_world(u, aff)
    np.testing.assert_allclose(d[:, 0, 0, 0], [0.0, -3.0, 0.0])
    img = np.arange(10 * 9 * 8, dtype=np.float32).reshape(10, 9, 8)
    disp = np.zeros((3, 10, 9, 8), np.float32)
    disp[2] = 4.0  # +4 mm along world z = +2 voxels along axis j
    out = warp_native(img, aff, disp)
    np.testing.assert_allclose(out[:, :7], img[:, 2:9], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- command line


def _write_pipeline(
    root: Path, n: int = 6, size: int = 16, splits: list[str] | None = None
) -> dict[str, Path]:
    """A tiny preproc.pt + native T1w/dseg on a permuted grid + classifier files."""
    from neuroexplain.classifier import build_model, save_classifier
    from neuroexplain.mri.preprocess import to_native

    x, y = toy_images(n, size)
    model_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    model_aff[:3, 3] = -15.0
    native_aff = np.array(
        [[0, 0, -1.6, 12], [-1.6, 0, 0, 14], [0, 1.6, 0, -13], [0, 0, 0, 1]], dtype=np.float64
    )
    native_shape = (18, 19, 17)
    dseg = torch.zeros(n, 1, size, size, size, dtype=torch.int16)
    dseg[x > 0.3] = 2
    dseg[x > 0.75] = 47
    subs, t1s, dsegs = [], [], []
    for i in range(n):
        sub = f"sub-{i:02d}"
        anat = root / "bids" / sub / "anat"
        anat.mkdir(parents=True)
        t1 = to_native(x[i, 0].numpy(), model_aff, (native_aff, native_shape))
        lab = to_native(dseg[i, 0].numpy(), model_aff, (native_aff, native_shape), mode="nearest")
        for arr, name in ((t1.astype(np.float32), "T1w"), (lab.astype(np.int16), "dseg")):
            im = nib.Nifti1Image(arr, native_aff)
            im.set_sform(native_aff, code=1)
            im.set_qform(native_aff, code=1)
            nib.save(im, anat / f"{sub}_{name}.nii.gz")
        subs.append(sub)
        t1s.append(str(anat / f"{sub}_T1w.nii.gz"))
        dsegs.append(str(anat / f"{sub}_dseg.nii.gz"))
    pre = {
        "images": x,
        "dseg": dseg,
        "subjects": subs,
        "y": y,
        "label": ["disease" if v else "control" for v in y.tolist()],
        "positive_class": "disease",
        "model_affines": torch.tensor(np.stack([model_aff] * n)),
        "native_affines": torch.tensor(np.stack([native_aff] * n)),
        "native_shapes": torch.tensor([native_shape] * n),
        "t1_paths": t1s,
        "dseg_paths": dsegs,
        "dseg_names": {2: "tissue", 47: "blob"},
        "params": {},
    }
    torch.save(pre, root / "preproc.pt")
    clf = build_model("small", spatial_size=(size,) * 3, channels=[4, 8], hidden=[])
    save_classifier(
        root / "model.pt",
        clf.eval(),
        arch="small",
        model_kwargs={"channels": [4, 8], "hidden": []},
        input_shape=[1, size, size, size],
        config={},
        epoch=0,
        seed=0,
        best_metric={"name": "val_loss", "value": 0.0},
    )
    splits = splits or ["train"] * (n - 2) + ["test"] * 2
    logits = [(-1.0 if v == 0 else 1.0) for v in y.tolist()]
    logits[0] = 0.5  # misclassified healthy training subject: not used for training
    pd.DataFrame({"subject": subs, "split": splits, "y": y.tolist(), "logit": logits}).to_csv(
        root / "logits.tsv", sep="\t", index=False
    )
    pd.DataFrame({"subject": subs, "split": splits}).to_csv(
        root / "split.tsv", sep="\t", index=False
    )
    return {
        "preproc": root / "preproc.pt",
        "model": root / "model.pt",
        "logits": root / "logits.tsv",
    }


def test_cli_train_and_simulate(tmp_path: Path) -> None:
    from neuroexplain.cli import main

    p = _write_pipeline(tmp_path)
    out = tmp_path / "sim"
    rc = main(
        [
            "train-simulator",
            "--preproc", str(p["preproc"]),
            "--classifier", str(p["model"]),
            "--logits", str(p["logits"]),
            "--out", str(out / "model.pt"),
            "--epochs", "1", "--max-epochs", "1", "--batch-size", "2", "--channels", "4,8",
            "--experts", "2", "--downsample", "1", "--device", "cpu",
        ]
    )  # fmt: skip
    assert rc == 0
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["train_subjects"] == ["sub-01", "sub-02", "sub-03"]  # sub-00 misclassified
    assert ckpt["train_conditions"] == [1.0, -1.0, 1.0]
    assert not (out / "model.state.pt").exists()
    assert len(pd.read_csv(out / "train_log.tsv", sep="\t")) == 2
    objective = ckpt["summary"]["objective"]
    assert objective["epochs"] == 1 and objective["hinge"] == "flip"
    assert objective["n_inject"] == 1 and objective["n_remove"] == 2
    assert isinstance(objective["met"], bool)
    # no validation subjects in the split: measured on the training subjects, and said so
    assert objective["measured_on"] == "train" and objective["validation"] is None
    assert "no validation subjects" in objective["note"]
    assert objective["selected"]["pass"] == 1 and "no validation" in objective["selected"]["reason"]
    on_disk = json.loads((out / "train_summary.json").read_text())
    assert on_disk["objective"] == objective and "seconds" not in on_disk
    assert on_disk["provenance"]["command"] == "train-simulator"
    assert on_disk["precision"] == "fp32"  # the default (compute.precision)
    assert on_disk["provenance"]["params"]["train"]["precision"] == "fp32"
    rc = main(
        [
            "simulate",
            "--preproc", str(p["preproc"]),
            "--simulator", str(out / "model.pt"),
            "--classifier", str(p["model"]),
            "--out", str(out),
            "--subjects", "test",
            "--regions", "blob=47", "--regions", "tissue=2",
            "--device", "cpu",
        ]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "simulate.json").read_text())
    assert summary["n_subjects"] == 2
    subj = pd.read_csv(out / "subjects.tsv", sep="\t")
    # the check without ground truth: per subject in subjects.tsv, the mean and verdict here
    agreement = summary["gradient_agreement"]
    assert agreement["mean"] == pytest.approx(subj["gradient_agreement"].mean())
    assert agreement["ok"] == (agreement["mean"] >= agreement["min_expected"])
    assert any("classifier input gradient" in w for w in summary["warnings"]) != agreement["ok"]
    assert list(subj["subject"]) == ["sub-04", "sub-05"]
    assert list(subj["map_direction"]) == ["inject", "remove"]  # healthy, diseased
    t1 = nib.load(tmp_path / "bids/sub-05/anat/sub-05_T1w.nii.gz")
    folder = out / "sub-05"
    for name in (
        "desc-simulator_logjacobian", "desc-simulator_jacobian",
        "desc-simulatorinject_logjacobian", "desc-simulatorremove_logjacobian",
        "desc-inject_T1w", "desc-remove_T1w",
    ):  # fmt: skip
        img = nib.load(folder / f"sub-05_{name}.nii.gz")
        assert img.shape == t1.shape and np.allclose(img.affine, t1.affine), name
        assert (folder / f"sub-05_{name}.json").is_file()
    disp = nib.load(folder / "sub-05_desc-remove_displacement.nii.gz")
    assert disp.shape == (*t1.shape, 1, 3)
    assert disp.header.get_intent()[0] == "vector" or int(disp.header["intent_code"]) == 1006
    # the subject's disease map is its remove map (diseased subject)
    a = nib.load(folder / "sub-05_desc-simulator_logjacobian.nii.gz").get_fdata()
    b = nib.load(folder / "sub-05_desc-simulatorremove_logjacobian.nii.gz").get_fdata()
    np.testing.assert_array_equal(a, b)
    # the maps manifest: the three log-Jacobian maps of each subject, the chosen one primary
    from neuroexplain.stage import read_maps_manifest

    man = read_maps_manifest(out / "maps.json")
    assert man.stage == "simulate" and man.primary == ["simulator"]
    assert man.methods == dict.fromkeys(
        ["simulator", "simulatorinject", "simulatorremove"], "log-jacobian"
    )
    listed = {f for files in man.files.values() for f in files.values()}
    assert listed == set(out.glob("sub-*/*_logjacobian.nii.gz"))
    assert set(man.files["simulator"]) == {"sub-04", "sub-05"}
    regions = pd.read_csv(out / "regions.tsv", sep="\t")
    assert set(regions["region"]) == {"blob", "tissue"}
    group = pd.read_csv(out / "group.tsv", sep="\t")
    assert {"map", "group", "region", "n", "mean", "sd", "t", "p"} <= set(group.columns)
    # a bad region option is a one-line user error
    rc = main(
        [
            "simulate", "--preproc", str(p["preproc"]), "--simulator", str(out / "model.pt"),
            "--classifier", str(p["model"]), "--out", str(out), "--regions", "blob",
        ]
    )  # fmt: skip
    assert rc == 2


def test_simulate_files_do_not_depend_on_the_writer_threads(tmp_path: Path) -> None:
    """1 or 2 writer threads (and a queue of 1 or 4 writes) give the same files, byte for byte,
    and the same manifest (subjects in order)."""
    from neuroexplain.io.atomic import WritePool
    from neuroexplain.simulator import run_simulate

    p = _write_pipeline(tmp_path, n=5, splits=["test"] * 5)
    net = SimulatorNet(TINY)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero head: the maps and fields are not all zeros
        for w in net.parameters():
            w.add_(0.1 * torch.randn(w.shape, generator=gen))
    save_simulator(tmp_path / "sim.pt", net, input_shape=[1, 16, 16, 16])
    trees = []
    for writers, pending in ((1, 1), (2, 4)):
        out = tmp_path / f"w{writers}"
        pool = functools.partial(WritePool, pending=pending)
        with mock.patch("neuroexplain.io.atomic.WritePool", pool):
            run_simulate(
                p["preproc"], tmp_path / "sim.pt", p["model"], out,
                subjects="test", split=tmp_path / "split.tsv", regions={"blob": [47]},
                batch_size=2, device="cpu", writers=writers, progress=False,
            )  # fmt: skip
        trees.append({f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()})
    assert len(trees[0]) == 5 * 16 + 5  # 8 NIfTI + 8 sidecars per subject; 5 tables / JSON
    assert trees[0].keys() == trees[1].keys()
    differ = [str(k) for k in trees[0] if trees[0][k] != trees[1][k]]
    assert not differ, differ
    maps = nib.load(tmp_path / "w2/sub-03/sub-03_desc-simulator_logjacobian.nii.gz").get_fdata()
    assert np.abs(maps).max() > 1e-4
    manifest = json.loads((tmp_path / "w2" / "maps.json").read_text())
    (entry,) = [m for m in manifest["methods"] if m["name"] == "simulator"]
    assert list(entry["files"]) == [f"sub-{i:02d}" for i in range(5)]


def test_run_train_simulator_measures_the_objective_on_the_validation_split(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from neuroexplain.simulator import run_train_simulator

    splits = ["train"] * 4 + ["val"] * 3 + ["test"]
    p = _write_pipeline(tmp_path, n=8, splits=splits)
    lg = pd.read_csv(p["logits"], sep="\t")
    lg.loc[6, "logit"] = -lg.loc[6, "logit"]  # a misclassified validation subject: left out
    lg.to_csv(p["logits"], sep="\t", index=False)
    out = tmp_path / "sim" / "model.pt"
    cfg = TrainConfig(epochs=1, max_epochs=2, batch_size=2, device="cpu", checkpoint_every=0)
    net_cfg = SimulatorConfig(channels=(4, 8), num_experts=2, downsample=1)
    with caplog.at_level("WARNING"):
        summary = run_train_simulator(
            p["preproc"], p["model"], p["logits"], out, config=cfg, net_config=net_cfg
        )
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["val_subjects"] == ["sub-04", "sub-05"] and ckpt["val_conditions"] == [-1.0, 1.0]
    obj = summary["objective"]
    assert obj["objective_on"] == "val" and obj["measured_on"] == "val" and obj["note"] is None
    assert obj["validation"]["n_inject"] == 1 and obj["validation"]["n_remove"] == 1
    assert obj["n_inject"] == 1 and obj["n_remove"] == 2  # training subjects (sub-00 left out)
    assert obj["met_on_validation"] == obj["met"]
    sel = obj["selected"]
    assert sel["pass"] in (1, 2) and sel["rule"].startswith("the pass whose validation")
    log = pd.read_csv(out.parent / "train_log.tsv", sep="\t")
    rows = log[log["val_n_inject"].notna()]
    assert list(rows["step"]) == [2 * (e + 1) for e in range(obj["epochs"])]
    assert set(rows["val_n_inject"]) == {1} and set(rows["val_n_remove"]) == {1}
    picked = rows[rows["epoch"] == sel["epoch"]].iloc[0]
    assert obj["validation"]["flipped_inject"] == picked["val_flipped_inject"]
    on_disk = json.loads((out.parent / "train_summary.json").read_text())
    assert on_disk["objective"] == obj and on_disk["n_validation"] == 2
    if not obj["met"]:  # the warning states the validation rates
        assert any("validation subjects" in r.message for r in caplog.records)


def test_gradient_agreement_separates_maps_where_the_classifier_looks() -> None:
    """The disease map's agreement with the classifier's input gradient: high when the map lies
    where the classifier's weights are, about zero when it lies elsewhere."""
    from neuroexplain.simulator.maps import gradient_agreement, input_gradient

    gen = torch.Generator().manual_seed(0)
    w = torch.zeros(1, 1, 8, 8, 8)
    w[..., 2:4, 2:4, 2:4] = 1.0 + torch.rand(1, 1, 2, 2, 2, generator=gen)

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(w.clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * self.w).flatten(1).sum(1, keepdim=True)

    clf = Linear()
    x = torch.rand(2, 1, 8, 8, 8, generator=gen)
    grad = input_gradient(clf, x)
    torch.testing.assert_close(grad, w.expand(2, -1, -1, -1, -1))  # d(w . x)/dx = w
    assert clf.w.grad is None  # the weights get no gradient
    brain = np.ones((8, 8, 8), dtype=bool)
    near = np.zeros((8, 8, 8))
    near[2:4, 2:4, 2:4] = -0.3  # a shrinking region where the weights are
    far = np.zeros((8, 8, 8))
    far[5:8, 5:8, 5:8] = 0.3  # the same change where the classifier does not look
    g = grad[0, 0].numpy()
    assert gradient_agreement(near, g, brain) > 0.5
    assert gradient_agreement(far, g, brain) < 0.0


def test_agreement_check_samples_the_subjects_of_a_large_run(tmp_path: Path) -> None:
    """Beyond AGREEMENT_SUBJECTS subjects only an evenly spaced sample gets the input gradient;
    the others read NaN and the mean is over the sample."""
    import neuroexplain.simulator.maps as M
    from neuroexplain.simulator import run_simulate

    p = _write_pipeline(tmp_path, n=5, splits=["test"] * 5)
    save_simulator(tmp_path / "sim.pt", SimulatorNet(TINY), input_shape=[1, 16, 16, 16])
    with mock.patch.object(M, "AGREEMENT_SUBJECTS", 2):
        summary = run_simulate(
            p["preproc"], tmp_path / "sim.pt", p["model"], tmp_path / "out",
            subjects="test", split=tmp_path / "split.tsv", batch_size=1, device="cpu",
            progress=False,
        )  # fmt: skip
    subj = pd.read_csv(tmp_path / "out" / "subjects.tsv", sep="\t")
    checked = subj["gradient_agreement"].notna().to_numpy()
    assert checked.tolist() == [True, False, False, True, False]  # every third of five
    assert summary["gradient_agreement"]["n_subjects"] == 2
