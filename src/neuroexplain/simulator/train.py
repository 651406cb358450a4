"""Training of the conditional warping simulator against a frozen classifier.

Liu, Adeli, Pohl and Zhao (IPMI 2021, "Going Beyond Saliency Maps: Training Deep Models to
Interpret Deep Models"): a simulator ``G(x, o) -> (x~, u)`` warps an image so that a *frozen*
classifier's logit ``l`` (positive class = disease) moves in the direction ``o``:

* ``o = -1`` (inject): ``l(x~) > l(x) + margin``;
* ``o = +1`` (remove): ``l(x~) < l(x) - margin``.

Losses (weights in :class:`TrainConfig`):

* logit hinge ``relu(o * l(x~) + margin)`` (``hinge="flip"``, the default: zero once the
  decision is flipped with ``margin`` to spare) or the logit *shift* hinge
  ``relu((l(x~) - l(x)) * o + margin)`` (``hinge="relative"``: zero exactly when the logit moved
  by at least ``margin`` in the asked direction). Sign check: with ``o = -1`` (inject) both are
  zero only when ``l(x~)`` went *up* (towards disease), and their gradient with respect to
  ``l(x~)`` is negative, so gradient descent raises the logit; ``o = +1`` the reverse. (The
  form ``relu((l(x) - l(x~)) * o + margin)`` would push the wrong way.) The relative hinge
  with a fixed margin leaves subjects with ``|l(x)| > margin`` on their side of the boundary;
  on the toy problem of the tests it flips half of them where ``"flip"`` flips all;
* cycle consistency ``mean |G(G(x, o), -o) - x|``;
* smoothness of both fields (MONAI ``BendingEnergyLoss`` or ``DiffusionLoss``), on the field
  at the U-Net's resolution (the full-resolution field is its trilinear interpolation; the loss
  is ``downsample**3`` times cheaper there);
* magnitude ``mean |u|^2`` (prefers the smallest deformation that moves the logit and rules out
  global shifts of the head, which the bending energy does not penalise).

Each training subject is simulated in the direction that flips its class (healthy -> inject,
diseased -> remove); the cycle pass trains the other direction on the simulated image. Only
subjects the classifier gets right are used. The classifier is frozen: eval mode (BatchNorm
running statistics untouched), ``requires_grad=False`` on every parameter, and it is not part of
the optimiser; gradients flow through it to the simulated image only.

Objective and model selection (``objective_on="val"``, the default): after every pass the
simulator (eval mode, no gradient) warps the validation subjects (the classifier split's ``val``
subjects, selected like the training ones); training stops, from ``epochs`` passes on, once
their simulations flip ``objective`` of each direction, and the weights of the best validation
pass are kept (:data:`SELECTION_RULE`), not the last ones: the training subjects alone say "met"
for a simulator that flips them and few others. Without validation subjects, or with
``objective_on="train"``, the objective is measured on the training subjects of each pass and
the last pass is kept.

Checkpoints (every ``checkpoint_every`` steps, atomically) hold the weights, the optimiser and
AMP-scaler states, the step and the RNG states; the batch order of epoch ``e`` comes from a
generator seeded with ``(seed, e)``, so a run resumed from a checkpoint ends with the same
weights as an uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neuroexplain.errors import InputError
from neuroexplain.io.checkpoint import to_plain as _plain
from neuroexplain.jacobian import jacobian_determinant
from neuroexplain.settings import HINGES, SimulatorTrainConfig
from neuroexplain.simulator.network import SimulatorConfig, SimulatorNet
from neuroexplain.utils import Precision

__all__ = [
    "CHECKPOINT_FORMAT",
    "TrainConfig",
    "class_targets",
    "epoch_objective",
    "freeze",
    "hinge_values",
    "load_simulator",
    "logit_of",
    "logit_shift_loss",
    "objective_met",
    "read_logits",
    "run_train_simulator",
    "save_simulator",
    "select_pass",
    "select_training_subjects",
    "train_simulator",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "neuroexplain-simulator/1"
STATE_FORMAT = "neuroexplain-simulator-state/1"


#: the hinge's weight grows to at most this multiple of ``w_cls`` (on the demo, 17x made the
#: field jump to large, brain-wide displacements within one pass)
MAX_CLS_GROWTH = 10.0

OBJECTIVE_DEFINITION = (
    "reached_<direction>: fraction of the training subjects of that direction (inject = healthy, "
    "remove = diseased) whose simulated logit satisfied the hinge (with hinge 'target': reached "
    "the other class's median logit) in the selected pass (counted on the batches as they were "
    "simulated during it); flipped_<direction>: whose decision flipped; validation: the same "
    "for the validation subjects, simulated by the weights at the end of the selected pass "
    "(eval mode); met: every direction flipped >= objective on the subjects of measured_on "
    "(the target is what the hinge asks for; reaching it is reported, not required: half of the "
    "other class lies beyond its median)"
)

#: how the kept weights are chosen with the objective on the validation subjects
SELECTION_RULE = (
    "the pass whose validation simulations flip the most subjects of their worse direction "
    "(min over inject / remove of the validation flip rate); ties: the higher mean of the two "
    "rates, then the earlier pass (smaller w_cls, typically a smaller field); candidates: the "
    "passes from the minimum `epochs` on, or the last pass when training stopped before"
)

#: the simulator's training options (defined once in :mod:`neuroexplain.settings`)
TrainConfig = SimulatorTrainConfig


# ------------------------------------------------------------------------------------ helpers


def freeze(model: nn.Module) -> nn.Module:
    """Freeze a classifier in place: eval mode and ``requires_grad=False`` on all parameters."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def logit_of(output: torch.Tensor) -> torch.Tensor:
    """Positive-class logit ``(B,)`` of a classifier output ``(B,)``, ``(B, 1)`` or ``(B, 2)``.

    Two outputs are read as class scores (healthy, disease): the logit is their difference.
    """
    if output.ndim == 1:
        return output
    if output.ndim == 2 and output.shape[1] == 1:
        return output[:, 0]
    if output.ndim == 2 and output.shape[1] == 2:
        return output[:, 1] - output[:, 0]
    raise ValueError(
        f"expected classifier outputs (B,), (B, 1) or (B, 2), got {tuple(output.shape)}"
    )


def class_targets(
    logits: torch.Tensor, condition: torch.Tensor, margin: float
) -> tuple[float, float, float]:
    """Targets of the ``"target"`` hinge from the training subjects' input logits.

    Injecting aims at the diseased subjects' median logit, removing at the healthy subjects'
    (each at least ``margin`` past the decision boundary); the scale is half the distance
    between the two targets (at least ``margin``, and ``1`` when ``margin`` is ``0`` and the
    targets coincide).

    Args:
        logits: ``(N,)`` input logits of the training subjects.
        condition: ``(N,)`` directions: ``-1`` inject (healthy), ``+1`` remove (diseased).
        margin: the least distance past the boundary.

    Returns:
        ``(inject_target, remove_target, scale)``.

    Example:
        >>> class_targets(torch.tensor([-4.0, -2.0, 3.0, 5.0]), torch.tensor([-1, -1, 1, 1.0]), 1)
        (4.0, -3.0, 3.5)
    """
    lg = torch.as_tensor(logits, dtype=torch.float64).reshape(-1)
    o = torch.as_tensor(condition, dtype=torch.float64).reshape(-1)
    pos, neg = lg[o > 0], lg[o < 0]
    med_pos = float(pos.quantile(0.5)) if pos.numel() else float(margin)
    med_neg = float(neg.quantile(0.5)) if neg.numel() else -float(margin)
    t_inject = max(med_pos, float(margin))
    t_remove = min(med_neg, -float(margin))
    scale = max(0.5 * (t_inject - t_remove), float(margin)) or 1.0
    return t_inject, t_remove, scale


def hinge_values(
    logit_input: torch.Tensor,
    logit_simulated: torch.Tensor,
    condition: torch.Tensor,
    margin: float,
    *,
    hinge: str = "relative",
    targets: tuple[float, float, float] | None = None,
) -> torch.Tensor:
    """Per-subject hinge ``(B,)`` before the ``relu`` (satisfied where ``<= 0``).

    See :func:`logit_shift_loss`; ``targets`` (``"target"`` hinge) is
    ``(inject_target, remove_target, scale)`` from :func:`class_targets`.
    """
    o = condition.reshape(-1).to(logit_simulated.dtype)
    if hinge == "relative":
        return (logit_simulated - logit_input.detach()) * o + margin
    if hinge == "flip":
        return o * logit_simulated + margin
    if hinge == "target":
        if targets is None:
            raise ValueError("the 'target' hinge needs targets (class_targets)")
        t_inject, t_remove, scale = targets
        t = torch.where(o < 0, torch.full_like(o, t_inject), torch.full_like(o, t_remove))
        return o * (logit_simulated - t) / scale
    raise ValueError(f"expected hinge in {HINGES}, got {hinge!r}")


def logit_shift_loss(
    logit_input: torch.Tensor,
    logit_simulated: torch.Tensor,
    condition: torch.Tensor,
    margin: float,
    *,
    hinge: str = "relative",
    targets: tuple[float, float, float] | None = None,
) -> torch.Tensor:
    """Hinge on the classifier logit of the simulated image (positive class = disease).

    Args:
        logit_input: ``l(x)`` ``(B,)`` (no gradient needed).
        logit_simulated: ``l(x~)`` ``(B,)``.
        condition: ``o`` ``(B,)``: ``-1`` inject, ``+1`` remove.
        margin: required shift (``"relative"``) or distance past the decision boundary
            (``"flip"``).
        hinge: ``"relative"``: ``relu((l(x~) - l(x)) * o + margin)``, zero iff ``l(x~) >=
            l(x) + margin`` when injecting and ``l(x~) <= l(x) - margin`` when removing;
            ``"flip"``: ``relu(o * l(x~) + margin)``, zero iff ``l(x~) >= margin`` (inject) or
            ``l(x~) <= -margin`` (remove); ``"target"``: ``relu(o * (l(x~) - t_o) / s)`` with
            ``t_o`` the inject / remove target and ``s`` the scale of ``targets``.
        targets: ``(inject_target, remove_target, scale)`` (:func:`class_targets`), for
            ``"target"``.

    Returns:
        The mean hinge (scalar).

    Example:
        >>> o = torch.tensor([-1.0])  # inject: the logit must go up
        >>> float(logit_shift_loss(torch.tensor([0.0]), torch.tensor([2.0]), o, 1.0))
        0.0
    """
    v = hinge_values(logit_input, logit_simulated, condition, margin, hinge=hinge, targets=targets)
    return torch.relu(v).mean()


def select_training_subjects(
    subjects: Sequence[str],
    y: Sequence[float],
    logits: Sequence[float],
    split: Sequence[str],
    *,
    which: str = "train",
    correct_only: bool = True,
) -> np.ndarray:
    """Indices of the subjects to train on: split ``which``, labelled, and (by default) correctly
    classified (``logit > 0`` iff ``y == 1``).

    Returns:
        ``(M,)`` int indices into ``subjects`` (sorted).
    """
    yy = np.asarray(y, dtype=np.float64)
    lg = np.asarray(logits, dtype=np.float64)
    sp = np.asarray(split, dtype=object)
    ok = (sp == which) & np.isfinite(yy) & np.isfinite(lg)
    if correct_only:
        ok &= (lg > 0) == (yy == 1)
    return np.flatnonzero(ok)


def _rng_state() -> dict[str, Any]:
    """torch RNG states (the only generators training draws from)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def volume_change_loss(ddf: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Mean ``|log det(I + du/dx)|`` of a ``(B, 3, X, Y, Z)`` voxel-unit field (differentiable).

    The determinant does not depend on the voxel unit (displacement and coordinates scale
    together), so the low-resolution field gives the volume change of the full-resolution one.
    Folded voxels (determinant <= ``eps``) count as ``|log eps|``.

    Example:
        >>> float(volume_change_loss(torch.zeros(1, 3, 4, 4, 4)))
        0.0
    """
    det = jacobian_determinant(ddf)
    return torch.log(torch.clamp(det, min=eps)).abs().mean()


def _smooth_loss(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    import warnings

    from monai.losses import BendingEnergyLoss, DiffusionLoss

    loss = BendingEnergyLoss() if kind == "bending" else DiffusionLoss()

    def fn(ddf: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # MONAI indexes with lists (a torch deprecation warning)
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence")
            return loss(ddf)

    return fn


# -------------------------------------------------------------------------------- checkpoints


def save_simulator(
    path: str | os.PathLike[str],
    model: SimulatorNet,
    *,
    train_config: TrainConfig | dict[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a simulator checkpoint, loadable with ``torch.load(path, weights_only=True)``.

    The dict holds ``format``, ``config`` (:class:`SimulatorConfig`), ``state_dict`` (CPU),
    ``train_config``, ``input_shape`` ``[C, X, Y, Z]``, ``version`` and anything in ``extra``
    (training subjects, classifier checksum, history, provenance).
    """
    import neuroexplain
    from neuroexplain.io.atomic import save_torch

    tc = train_config.to_dict() if isinstance(train_config, TrainConfig) else train_config
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "train_config": _plain(tc or {}),
        "input_shape": [int(s) for s in input_shape] if input_shape is not None else None,
        "version": neuroexplain.__version__,
        **_plain(extra or {}),
    }
    save_torch(ckpt, path)  # fixed archive name: same bytes
    return Path(path)


def load_simulator(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[SimulatorNet, dict[str, Any]]:
    """Rebuild a simulator from :func:`save_simulator` output (``weights_only=True``).

    Returns:
        ``(model, checkpoint)`` with the model in eval mode.

    Raises:
        InputError: missing or unreadable file, or not a simulator checkpoint.
    """
    from neuroexplain.io.checkpoint import load_checkpoint

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "simulator checkpoint not found (run neuroexplain train-simulator)")
    ckpt = load_checkpoint(p, CHECKPOINT_FORMAT, map_location=map_location)
    try:
        model = SimulatorNet(SimulatorConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        msg = str(exc).splitlines()[0]
        raise InputError(p, f"weights do not fit the simulator network ({msg})") from exc
    return model.to(map_location).eval(), ckpt


def _save_state(
    path: Path,
    model: SimulatorNet,
    opt: torch.optim.Optimizer,
    scaler: Any,
    step: int,
    key: dict[str, Any],
    history: list[dict[str, float]],
    best: dict[str, Any] | None = None,
) -> None:
    from neuroexplain.io.atomic import save_torch

    state = {
        "format": STATE_FORMAT,
        "step": int(step),
        "key": _plain(key),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": _rng_state(),
        "history": _plain(history),
        # the weights of the best validation pass so far (kept at the end unless beaten)
        "best": best if best is not None else {},
    }
    save_torch(state, path)  # fixed archive name: same bytes


def _load_state(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    from neuroexplain.io.checkpoint import load_training_state

    return load_training_state(
        path, fmt=STATE_FORMAT, key=_plain(key), what="simulator training checkpoint"
    )


# ---------------------------------------------------------------------------------- training


@dataclass
class _SimulatorRun:
    """What every step of one :func:`train_simulator` call shares."""

    cfg: TrainConfig
    model: SimulatorNet
    classifier: nn.Module
    clf_params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    scaler: Any
    smooth: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    precision: Precision
    net_config: SimulatorConfig
    targets: tuple[float, float, float] | None = None


@dataclass
class _SimulatorStep:
    """The losses of one batch (tensors, before ``detach``) and its hinge and logits."""

    loss: torch.Tensor
    cls: torch.Tensor
    cycle: torch.Tensor
    smooth: torch.Tensor
    magnitude: torch.Tensor
    volume: torch.Tensor
    hinge: torch.Tensor
    logit_simulated: torch.Tensor


def _check_conditions(images: torch.Tensor, conditions: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``(N, conditions as a float (N,) tensor)``; raises on no images or bad conditions."""
    n = int(images.shape[0])
    if n == 0:
        raise InputError(
            "--logits", "no training subjects (none correctly classified in the train split?)"
        )
    cond = torch.as_tensor(conditions, dtype=torch.float32).reshape(-1)
    if cond.shape[0] != n or not torch.all((cond == -1) | (cond == 1)):
        raise InputError(
            "conditions", f"expected {n} values in {{-1, +1}}, got {cond.tolist()[:8]}"
        )
    return n, cond


def _setup_run(
    images: torch.Tensor,
    classifier: nn.Module,
    cfg: TrainConfig,
    net_config: SimulatorConfig | None,
) -> _SimulatorRun:
    """Seed, build the simulator and its optimiser, freeze the classifier."""
    from neuroexplain.utils import resolve_device, resolve_precision, seed_everything

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)

    ncfg = net_config or SimulatorConfig()
    if ncfg.in_channels != images.shape[1]:
        ncfg = SimulatorConfig(**{**ncfg.to_dict(), "in_channels": int(images.shape[1])})
    model = SimulatorNet(ncfg).to(device)
    classifier = freeze(classifier).to(device)
    clf_params = [p for p in classifier.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = precision.grad_scaler() if precision.name == "fp16" else None
    smooth = _smooth_loss(cfg.smoothness)
    return _SimulatorRun(
        cfg, model, classifier, clf_params, opt, scaler, smooth, device, precision, ncfg
    )


def _check_step_memory(
    run: _SimulatorRun, images: torch.Tensor, source: str | os.PathLike[str] | None
) -> None:
    """Memory of one step, before anything is computed or written: the simulator (weights,
    gradients, Adam state, activations; its activations twice with the cycle pass) and the
    frozen classifier (weights, activations kept for the gradient to the simulated image)."""
    from neuroexplain.utils import (
        check_memory_fits,
        estimate_activation_memory,
        estimate_training_memory,
    )

    cfg, model, use_amp = run.cfg, run.model, run.precision.enabled
    shape = tuple(int(s) for s in images.shape[1:])
    bs = min(cfg.batch_size, int(images.shape[0]))

    def sim_forward(m: nn.Module, x: torch.Tensor) -> Any:
        return m(x, torch.ones(x.shape[0], device=x.device), return_lowres=True)

    need = estimate_training_memory(model, shape, bs, use_amp, forward=sim_forward)
    if cfg.w_cycle > 0:
        need += estimate_activation_memory(model, shape, bs, use_amp, forward=sim_forward)
    need += estimate_training_memory(run.classifier, shape, bs, use_amp)
    check_memory_fits(
        need,
        f"training the simulator (batch size {bs}, images {'x'.join(map(str, shape))})",
        source if source is not None else "--batch-size",
        device=run.device,
        hint="use a smaller --batch-size, --channels or a larger --downsample",
    )


def _input_logits(run: _SimulatorRun, images: torch.Tensor) -> torch.Tensor:
    """Logits ``(N,)`` of the input images, once (the classifier is fixed)."""
    bs, device = run.cfg.batch_size, run.device
    with torch.no_grad(), run.precision.autocast():
        return torch.cat(
            [
                logit_of(run.classifier(images[i : i + bs].to(device))).float().cpu()
                for i in range(0, int(images.shape[0]), bs)
            ]
        )


@dataclass
class _Progress:
    """Where a training run is: its history, steps done and the best validation weights."""

    history: list[dict[str, Any]]
    step: int = 0
    best: dict[str, Any] | None = None


def _resume_state(
    run: _SimulatorRun, sp: Path | None, resume: bool, key: dict[str, Any], total: int
) -> _Progress:
    """The progress of the training state at ``sp`` (loaded into the run) when it belongs to
    this run, else a fresh start."""
    history: list[dict[str, float]] = []
    step = 0
    best = None
    if sp is not None and resume and sp.is_file():
        state = _load_state(sp, key)
        if state is not None:
            run.model.load_state_dict(state["model"])
            run.opt.load_state_dict(state["optimizer"])
            if run.scaler is not None and state["scaler"]:
                run.scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"])
            history = [dict(h) for h in state["history"]]
            step = int(state["step"])
            best = state.get("best") or None
            logger.info("resuming simulator training from %s at step %d / %d", sp, step, total)
    return _Progress(history, step, best)


def _simulator_losses(
    run: _SimulatorRun, x: torch.Tensor, o: torch.Tensor, l_in: torch.Tensor, w_cls: float
) -> _SimulatorStep:
    """The weighted losses of one batch: the forward passes under the run's precision, the
    losses in float32."""
    cfg, model, device, smooth = run.cfg, run.model, run.device, run.smooth
    with run.precision.autocast():
        sim, ddf, low = model(x, o, return_lowres=True)
        l_sim = logit_of(run.classifier(sim))
        if cfg.w_cycle > 0:
            back, _, low_back = model(sim, -o, return_lowres=True)
    l_sim, ddf, low = l_sim.float(), ddf.float(), low.float()
    h = hinge_values(l_in, l_sim, o, cfg.margin, hinge=cfg.hinge, targets=run.targets)
    loss_cls = torch.relu(h).mean()
    loss = w_cls * loss_cls
    loss_cycle = torch.zeros((), device=device)
    loss_smooth = smooth(low)
    fields = [low]
    if cfg.w_cycle > 0:
        loss_cycle = (back.float() - x).abs().mean()
        loss_smooth = 0.5 * (loss_smooth + smooth(low_back.float()))
        fields.append(low_back)
        loss = loss + cfg.w_cycle * loss_cycle
    loss = loss + cfg.w_smooth * loss_smooth
    loss_mag = ddf.float().pow(2).sum(1).mean()
    if cfg.w_magnitude > 0:
        loss = loss + cfg.w_magnitude * loss_mag
    loss_volume = torch.zeros((), device=device)
    if cfg.w_volume > 0:  # a Jacobian per field: only when it is part of the loss
        loss_volume = sum(volume_change_loss(f.float()) for f in fields) / len(fields)
        loss = loss + cfg.w_volume * loss_volume
    return _SimulatorStep(loss, loss_cls, loss_cycle, loss_smooth, loss_mag, loss_volume, h, l_sim)


def _optimise_step(
    run: _SimulatorRun, x: torch.Tensor, o: torch.Tensor, l_in: torch.Tensor, w_cls: float
) -> _SimulatorStep:
    """One optimiser step of the simulator on a batch; the classifier stays frozen."""
    run.classifier.eval()  # never let BatchNorm statistics move
    run.opt.zero_grad(set_to_none=True)
    s = _simulator_losses(run, x, o, l_in, w_cls)
    if run.scaler is not None:
        run.scaler.scale(s.loss).backward()
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        s.loss.backward()
        run.opt.step()
    if any(p.grad is not None for p in run.clf_params):  # pragma: no cover - defensive
        raise RuntimeError("gradients reached the frozen classifier's parameters")
    return s


def _direction_counts(
    o: torch.Tensor, logit_simulated: torch.Tensor, hinge: torch.Tensor, prefix: str = ""
) -> dict[str, int]:
    """Per direction: subjects, decisions flipped (the simulated logit on the other class's
    side) and hinges satisfied, keys ``<prefix>n_inject``, ``<prefix>flipped_remove``, ..."""
    flips = (logit_simulated.detach() > 0) == (o < 0)
    reached = hinge.detach() <= 0
    inj = o < 0
    return {
        f"{prefix}n_inject": int(inj.sum()),
        f"{prefix}n_remove": int((~inj).sum()),
        f"{prefix}flipped_inject": int((flips & inj).sum()),
        f"{prefix}flipped_remove": int((flips & ~inj).sum()),
        f"{prefix}reached_inject": int((reached & inj).sum()),
        f"{prefix}reached_remove": int((reached & ~inj).sum()),
    }


def _step_record(
    step: int, epoch: int, w_cls: float, o: torch.Tensor, s: _SimulatorStep
) -> dict[str, Any]:
    """The history row of one step: losses, flip rate and per-direction counts."""
    flipped = ((s.logit_simulated.detach() > 0) == (o < 0)).float().mean()
    return {
        "step": step,
        "epoch": epoch,
        "loss": float(s.loss.detach()),
        "cls": float(s.cls.detach()),
        "cycle": float(s.cycle.detach()),
        "smooth": float(s.smooth.detach()),
        "magnitude": float(s.magnitude.detach()),
        "volume": float(s.volume.detach()),
        "flipped": float(flipped),
        "w_cls": float(w_cls),
        **_direction_counts(o, s.logit_simulated, s.hinge),
    }


@dataclass
class _ValData:
    """The validation subjects of a run: images, directions and input logits."""

    images: torch.Tensor
    cond: torch.Tensor
    logit_in: torch.Tensor


def _validation_data(
    run: _SimulatorRun, images: torch.Tensor | None, conditions: torch.Tensor | None
) -> _ValData | None:
    """The validation subjects (``None`` without any)."""
    if images is None or int(images.shape[0]) == 0:
        return None
    cond = torch.as_tensor(conditions, dtype=torch.float32).reshape(-1)
    if cond.shape[0] != images.shape[0] or not torch.all((cond == -1) | (cond == 1)):
        raise InputError(
            "val_conditions",
            f"expected {int(images.shape[0])} values in {{-1, +1}}, got {cond.tolist()[:8]}",
        )
    return _ValData(images, cond, _input_logits(run, images))


def _validation_counts(run: _SimulatorRun, val: _ValData) -> dict[str, int]:
    """Simulate the validation subjects with the current weights (eval mode, no gradient) and
    count them like the training rows (keys ``val_n_inject``, ``val_flipped_inject``, ...)."""
    cfg, model, device = run.cfg, run.model, run.device
    model.eval()
    counts: dict[str, int] = {}
    with torch.no_grad(), run.precision.autocast():
        for i in range(0, int(val.images.shape[0]), cfg.batch_size):
            sl = slice(i, i + cfg.batch_size)
            x = val.images[sl].to(device, torch.float32)
            o = val.cond[sl].to(device)
            sim, _ = model(x, o)
            l_sim = logit_of(run.classifier(sim)).float()
            l_in = val.logit_in[sl].to(device)
            h = hinge_values(l_in, l_sim, o, cfg.margin, hinge=cfg.hinge, targets=run.targets)
            for k, v in _direction_counts(o, l_sim, h, "val_").items():
                counts[k] = counts.get(k, 0) + v
    model.train()
    return counts


def _total_steps(cfg: TrainConfig, n: int) -> tuple[int, int]:
    """``(steps per pass, most steps)``: ``max_epochs`` passes with an objective, else
    ``epochs``, at most ``max_steps``."""
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    max_epochs = max(cfg.epochs, cfg.max_epochs) if cfg.objective > 0 else cfg.epochs
    total = max_epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, int(cfg.max_steps))
    return steps_per_epoch, total


def _checkpoint_due(
    cfg: TrainConfig,
    history: Sequence[dict[str, float]],
    step: int,
    steps_per_epoch: int,
    total: int,
) -> bool:
    """Write the training state after ``step``: every ``checkpoint_every`` steps, at the last
    step and at the end of the pass that stops training."""
    epoch = (step - 1) // steps_per_epoch
    return cfg.checkpoint_every > 0 and (
        step % cfg.checkpoint_every == 0
        or step == total
        or (step % steps_per_epoch == 0 and _objective_done(history, epoch + 1, cfg))
    )


def train_simulator(
    images: torch.Tensor,
    conditions: torch.Tensor,
    classifier: nn.Module,
    *,
    config: TrainConfig | None = None,
    net_config: SimulatorConfig | None = None,
    state_path: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool | None = None,
    data_key: dict[str, Any] | None = None,
    source: str | os.PathLike[str] | None = None,
    val_images: torch.Tensor | None = None,
    val_conditions: torch.Tensor | None = None,
) -> tuple[SimulatorNet, list[dict[str, float]]]:
    """Train a :class:`SimulatorNet` to move a frozen classifier's logit.

    Args:
        images: ``(N, C, X, Y, Z)`` training images (CPU tensor; batches move to the device).
        conditions: ``(N,)`` direction per image: ``-1`` inject (healthy subjects), ``+1`` remove
            (diseased subjects).
        classifier: the model to explain, ``(B, C, X, Y, Z) -> (B, 1)`` positive-class logits.
            It is frozen here (eval mode, no parameter gradients) and never updated.
        config: training options.
        net_config: simulator architecture (``in_channels`` is taken from ``images``).
        state_path: training checkpoint written every ``config.checkpoint_every`` steps; if it
            exists, matches this run's options and data and ``resume`` is set, training
            continues from it.
        resume: continue from ``state_path`` when possible.
        progress: show a progress bar (``None``: only on a terminal).
        data_key: identifies the data (e.g. subjects and input checksums) for resuming.
        source: the file the images came from, named in the error when the estimated memory
            of a training step (:func:`neuroexplain.utils.estimate_training_memory`) exceeds
            what is available (``NEUROEXPLAIN_MEMORY_LIMIT_MB`` overrides that).
        val_images: ``(M, C, X, Y, Z)`` validation images, simulated (eval mode, no gradient)
            after every pass and after the last step; their counts go to that step's history
            row (``val_n_inject``, ``val_flipped_inject``, ...). With
            ``config.objective_on == "val"`` they decide when training stops and which pass's
            weights are returned (:func:`select_pass`); ``None`` or empty: the objective is
            measured on the training subjects and the last weights are returned.
        val_conditions: ``(M,)`` directions of the validation images (as ``conditions``).

    Returns:
        ``(model, history)``: the trained simulator (eval mode, on CPU; the weights of the pass
        :func:`select_pass` chooses) and one dict of losses per step (``step, epoch, loss, cls,
        cycle, smooth, magnitude, flipped``, per-direction counts, validation counts).

    Raises:
        InputError: no training images, conditions not in ``{-1, +1}``, or a training step
            needs more memory than is available.
    """
    cfg = config or TrainConfig()
    n, cond = _check_conditions(images, conditions)
    run = _setup_run(images, classifier, cfg, net_config)
    _check_step_memory(run, images, source)
    logit_in = _input_logits(run, images)
    run.targets = class_targets(logit_in, cond, cfg.margin) if cfg.hinge == "target" else None
    if run.targets is not None:
        logger.info(
            "simulator targets: inject -> logit %.3g, remove -> logit %.3g (scale %.3g)",
            *run.targets,
        )
    val = _validation_data(run, val_images, val_conditions)
    total = _total_steps(cfg, n)[1]
    key = {
        "train": cfg.run_key(),
        "net": run.net_config.to_dict(),
        "n": n,
        "n_val": 0 if val is None else int(val.images.shape[0]),
        "shape": list(images.shape[1:]),
        "data": data_key or {},
    }
    sp = Path(state_path) if state_path is not None else None
    prog = _resume_state(run, sp, resume, key, total)
    t0 = time.perf_counter()
    _run_passes(run, images, cond, logit_in, val, prog, total, sp, key, progress)
    if val is not None and prog.history and "val_n_inject" not in prog.history[-1]:
        # stopped within a pass (max_steps): the last weights are a candidate too (not in the
        # resumable state, so a run resumed with more steps is the uninterrupted one)
        prog.history[-1].update(_validation_counts(run, val))
    logger.info("trained the simulator for %d steps in %.1f s", prog.step, time.perf_counter() - t0)
    _restore_selected(run, prog)
    run.model.eval()
    return run.model.cpu(), prog.history


def _run_passes(
    run: _SimulatorRun,
    images: torch.Tensor,
    cond: torch.Tensor,
    logit_in: torch.Tensor,
    val: _ValData | None,
    prog: _Progress,
    total: int,
    sp: Path | None,
    key: dict[str, Any],
    progress: bool | None,
) -> None:
    """The training loop: passes until the objective or ``total`` steps; validation after
    every pass."""
    from tqdm.auto import tqdm

    cfg, model, history = run.cfg, run.model, prog.history
    n = int(images.shape[0])
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    disable = None if progress is None else not progress
    bar = tqdm(total=total, initial=prog.step, desc="train simulator", unit="step", disable=disable)
    model.train()
    while prog.step < total:
        epoch, pos = divmod(prog.step, steps_per_epoch)
        if pos == 0 and epoch > 0 and _objective_done(history, epoch, cfg):
            break
        w_cls = cls_weight(cfg, epoch)
        order = _epoch_order(n, cfg.seed, epoch)
        idx = order[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
        x = images[idx].to(run.device, torch.float32)
        o = cond[idx].to(run.device)
        s = _optimise_step(run, x, o, logit_in[idx].to(run.device), w_cls)
        prog.step += 1
        rec = _step_record(prog.step, epoch, w_cls, o, s)
        if val is not None and prog.step % steps_per_epoch == 0:
            rec.update(_validation_counts(run, val))
        history.append(rec)
        _track_best(run, prog)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", flip=f"{rec['flipped']:.2f}")
        if sp is not None and _checkpoint_due(cfg, history, prog.step, steps_per_epoch, total):
            _save_state(sp, model, run.opt, run.scaler, prog.step, key, history, prog.best)
    bar.close()


def _track_best(run: _SimulatorRun, prog: _Progress) -> None:
    """Keep a copy of the weights when the step just done is the one :func:`select_pass`
    chooses so far (only with the objective on validation subjects)."""
    last = prog.history[-1]
    if "val_n_inject" not in last or objective_source(prog.history, run.cfg) != "val":
        return
    sel = select_pass(prog.history, run.cfg)
    if sel is not None and sel["step"] == int(last["step"]):
        weights = {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}
        prog.best = {"epoch": int(last["epoch"]), "step": int(last["step"]), "model": weights}


def _restore_selected(run: _SimulatorRun, prog: _Progress) -> None:
    """Load the weights of the selected pass when it is not the last one."""
    sel = select_pass(prog.history, run.cfg)
    if sel is None or sel["step"] == int(prog.history[-1]["step"]):
        return
    if prog.best is None or int(prog.best["step"]) != sel["step"]:  # pragma: no cover
        raise RuntimeError(f"the weights of the selected step {sel['step']} were not kept")
    run.model.load_state_dict(prog.best["model"])
    logger.info(
        "kept the weights of pass %d (%s), not those of the last pass %d",
        sel["pass"],
        sel["reason"],
        int(prog.history[-1]["epoch"]) + 1,
    )


def cls_weight(cfg: TrainConfig, epoch: int) -> float:
    """Weight of the hinge in pass ``epoch`` (0-based): ``w_cls``, grown by ``w_cls_growth``
    for every pass from ``epochs`` on, at most ``MAX_CLS_GROWTH * w_cls``. Training only gets
    there while the objective is unmet on the subjects it is measured on (the validation
    subjects by default), so the weight grows with every pass that leaves them short."""
    k = max(0, epoch - cfg.epochs + 1) if cfg.objective > 0 else 0
    return float(cfg.w_cls * min(cfg.w_cls_growth**k, MAX_CLS_GROWTH))


def epoch_objective(
    history: Sequence[dict[str, Any]], epoch: int, *, validation: bool = False
) -> dict[str, Any]:
    """Subjects of pass ``epoch`` (0-based) that reached the target / flipped, per direction.

    Training subjects (default): counted on the batches as they were simulated during the
    pass. ``validation``: the validation subjects simulated after the pass (the pass's last
    validation row; rates ``None`` when it has none).
    """
    pre = "val_" if validation else ""
    rows = [h for h in history if int(h["epoch"]) == epoch and f"{pre}n_inject" in h]
    if validation:
        rows = rows[-1:]
    out: dict[str, Any] = {"epoch": epoch}
    for d in ("inject", "remove"):
        n = sum(int(h[f"{pre}n_{d}"]) for h in rows)
        out[f"n_{d}"] = n
        for what in ("reached", "flipped"):
            k = sum(int(h[f"{pre}{what}_{d}"]) for h in rows)
            out[f"{what}_{d}"] = k / n if n else None
    return out


def objective_met(stats: dict[str, Any], objective: float) -> bool:
    """Every direction that has subjects flipped the decision in at least ``objective`` of them."""
    rates = [stats[f"flipped_{d}"] for d in ("inject", "remove") if stats[f"n_{d}"]]
    return bool(rates) and all(r >= objective for r in rates)


def has_validation(history: Sequence[dict[str, Any]]) -> bool:
    """Did the run simulate validation subjects (validation counts in its history)?"""
    return any("val_n_inject" in h for h in history)


def objective_source(history: Sequence[dict[str, Any]], cfg: TrainConfig) -> str:
    """``"val"`` when the objective is measured on the validation subjects
    (``objective_on="val"`` and a run with validation subjects), else ``"train"``."""
    return "val" if cfg.objective_on == "val" and has_validation(history) else "train"


def _objective_done(history: Sequence[dict[str, Any]], done: int, cfg: TrainConfig) -> bool:
    """Stop after ``done`` complete passes? Only from ``epochs`` passes on, when the objective
    is off or met by the last pass (on the subjects of :func:`objective_source`)."""
    if done < cfg.epochs:
        return False
    if cfg.objective <= 0:
        return True
    val = objective_source(history, cfg) == "val"
    return objective_met(epoch_objective(history, done - 1, validation=val), cfg.objective)


def _val_score(stats: dict[str, Any]) -> tuple[float, float]:
    """``(worse direction's, mean)`` validation flip rate of :func:`epoch_objective` stats."""
    rates = [stats[f"flipped_{d}"] for d in ("inject", "remove") if stats[f"n_{d}"]]
    return min(rates), float(np.mean(rates))


def select_pass(history: Sequence[dict[str, Any]], cfg: TrainConfig) -> dict[str, Any] | None:
    """The pass whose weights a run keeps (``None`` before the first step).

    With the objective on the validation subjects (:func:`objective_source`), the best
    validation pass by :data:`SELECTION_RULE`; else the last pass.

    Returns:
        ``{"epoch" (0-based), "pass" (1-based), "step" (the history row after which the weights
        were taken), "w_cls", "reason"}``.
    """
    if not history:
        return None
    last = history[-1]
    if objective_source(history, cfg) == "train":
        if cfg.objective_on == "train":
            return _selected(last, "the last pass (objective_on: train)")
        return _selected(last, "the last pass (no validation subjects: objective on training)")
    rows = {int(h["epoch"]): h for h in history if "val_n_inject" in h}  # last per pass
    cands = [e for e in rows if e >= cfg.epochs - 1] or [max(rows)]
    scores = {e: _val_score(epoch_objective(history, e, validation=True)) for e in cands}
    best = max(cands, key=lambda e: (*scores[e], -e))
    worst, mean = scores[best]
    if cfg.objective > 0 and worst >= cfg.objective:
        reason = f"validation objective met: worse direction flips {format_rate(worst)}"
    else:
        reason = (
            f"best validation pass: worse direction flips {format_rate(worst)} "
            f"(mean {format_rate(mean)}"
            + (f", objective {format_rate(cfg.objective)} not met)" if cfg.objective > 0 else ")")
        )
    return _selected(rows[best], reason)


def _selected(row: dict[str, Any], reason: str) -> dict[str, Any]:
    e = int(row["epoch"])
    return {
        "epoch": e,
        "pass": e + 1,
        "step": int(row["step"]),
        "w_cls": row["w_cls"],
        "reason": reason,
    }


# ----------------------------------------------------------------------------- from files


def format_rate(v: float | None) -> str:
    """A rate as a whole percentage (``"n/a"`` when unknown), for log lines and messages."""
    return "n/a" if v is None else f"{100 * v:.0f} %"


def read_logits(path: str | os.PathLike[str]) -> Any:
    """Read the classifier's ``logits.tsv`` (columns ``subject``, ``logit``, and ``split``, ``y``).

    ``logit`` is the explained model's: the file's ``explained_logit`` column when it has one
    (the final model's then moves to ``final_logit``), as the explanation stages load that model
    (:func:`neuroexplain.stage.load_mri_context`).

    Raises:
        InputError: missing file or columns.
    """
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "logits file not found (run neuroexplain train-classifier)")
    df = pd.read_csv(p, sep="\t", dtype={"subject": str})
    need = {"subject", "logit"}
    if not need <= set(df.columns):
        raise InputError(p, f"expected columns subject, logit (split, y); got {list(df.columns)}")
    if "explained_logit" in df.columns:
        df = df.rename(columns={"logit": "final_logit", "explained_logit": "logit"})
    return df


@dataclass
class _TrainingInputs:
    """The preprocessed images, the classifier and the training subjects of
    :func:`run_train_simulator`."""

    images: torch.Tensor
    clf: nn.Module
    idx: np.ndarray
    cond: torch.Tensor
    train_subjects: list[str]
    val_idx: np.ndarray
    val_cond: torch.Tensor
    val_subjects: list[str]


def _load_training_inputs(
    preproc: str | os.PathLike[str],
    classifier: str | os.PathLike[str],
    logits: str | os.PathLike[str],
    split: str | os.PathLike[str] | None,
    correct_only: bool,
) -> _TrainingInputs:
    """Read the images, classifier, logits and split; select the training subjects."""
    from neuroexplain.classifier.data import read_split
    from neuroexplain.stage import load_mri_context

    # on the CPU (the training moves it); its split is not used: the logits' (or --split) is
    ctx = load_mri_context(preproc, classifier, device=torch.device("cpu"), labelled=True)
    data, clf = ctx.preproc, ctx.model
    images = data["images"]
    subjects = [str(s) for s in data["subjects"]]
    lg = read_logits(logits).set_index("subject")
    if split is not None or "split" not in lg.columns:
        sp_path = Path(split) if split is not None else Path(logits).parent / "split.tsv"
        sp = read_split(sp_path).set_index("subject")["split"]
    else:
        sp = lg["split"]
    missing = [s for s in subjects if s not in lg.index]
    if len(missing) == len(subjects):
        raise InputError(logits, "none of the preprocessed subjects has a logit")
    logit = np.array([float(lg.loc[s, "logit"]) if s in lg.index else np.nan for s in subjects])
    split_of = [str(sp.get(s, "")) for s in subjects]
    idx = select_training_subjects(subjects, data["y"], logit, split_of, correct_only=correct_only)
    if idx.size == 0:
        raise InputError(
            logits, "no correctly classified subjects in the train split to train the simulator on"
        )
    # validation subjects: selected like the training ones (the objective's held-out subjects)
    val_idx = select_training_subjects(
        subjects, data["y"], logit, split_of, which="val", correct_only=correct_only
    )
    y_all = np.asarray(data["y"], dtype=np.float64)

    def directions(ix: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.where(y_all[ix] == 1, 1.0, -1.0).astype(np.float32))

    return _TrainingInputs(
        images,
        clf,
        idx,
        directions(idx),
        [subjects[i] for i in idx],
        val_idx,
        directions(val_idx),
        [subjects[i] for i in val_idx],
    )


def _objective_summary(history: list[dict[str, Any]], cfg: TrainConfig) -> dict[str, Any]:
    """The ``objective`` of the summary: training and validation rates per direction at the
    selected pass, which pass and why, met on which subjects."""
    sel = select_pass(history, cfg) if history else None
    e = sel["epoch"] if sel is not None else 0
    train = epoch_objective(history, e) if history else {}
    val = epoch_objective(history, e, validation=True) if has_validation(history) else None
    measured_on = objective_source(history, cfg)
    met_stats = val if measured_on == "val" else train
    note = None
    if cfg.objective_on == "val" and val is None:
        note = "no validation subjects: the objective was measured on the training subjects"
    return {
        "hinge": cfg.hinge,
        "objective": cfg.objective,
        "objective_on": cfg.objective_on,
        "measured_on": measured_on,
        "note": note,
        "met": bool(history) and objective_met(met_stats, cfg.objective or 1.0),
        "met_on_validation": None if val is None else objective_met(val, cfg.objective or 1.0),
        "epochs": int(history[-1]["epoch"]) + 1 if history else 0,
        "w_cls_final": float(history[-1].get("w_cls", cfg.w_cls)) if history else cfg.w_cls,
        "selected": None if sel is None else {**sel, "rule": SELECTION_RULE},
        # training subjects (as before): the selected pass's counts
        **{k: v for k, v in train.items() if k != "epoch"},
        "validation": None if val is None else {k: v for k, v in val.items() if k != "epoch"},
    }


def _warn_objective(objective: dict[str, Any], cfg: TrainConfig) -> None:
    """A warning when the objective was not met, with the validation and training rates."""
    if cfg.objective <= 0 or objective["met"]:
        return
    val = objective["validation"] or {}
    sel = objective["selected"] or {}
    logger.warning(
        "simulator objective not met after %d passes (kept pass %s): the simulations flip %s "
        "of the inject and %s of the remove validation subjects, %s / %s of the training "
        "subjects (target reached: %s / %s; objective %.2f on the %s subjects); the maps show "
        "less than what separates the classes: try a larger --max-epochs",
        objective["epochs"],
        sel.get("pass"),
        format_rate(val.get("flipped_inject")),
        format_rate(val.get("flipped_remove")),
        format_rate(objective.get("flipped_inject")),
        format_rate(objective.get("flipped_remove")),
        format_rate(objective.get("reached_inject")),
        format_rate(objective.get("reached_remove")),
        cfg.objective,
        "validation" if objective["measured_on"] == "val" else "training",
    )


def _training_summary(
    history: list[dict[str, float]], cfg: TrainConfig, inputs: _TrainingInputs, seconds: float
) -> dict[str, Any]:
    """The summary of a training run (objective per direction, final losses, the precision of
    its forward passes); warns when the objective was not met."""
    from neuroexplain.utils import resolve_device, resolve_precision

    device = resolve_device(cfg.device, log=False)
    precision = resolve_precision(cfg.precision, device, log=False).name  # as train_simulator's
    cond = inputs.cond
    last = history[-min(len(history), 10) :]
    objective = _objective_summary(history, cfg)
    _warn_objective(objective, cfg)
    return {
        "objective": objective,
        "n_subjects": len(inputs.train_subjects),
        "n_inject": int((cond < 0).sum()),
        "n_remove": int((cond > 0).sum()),
        "n_validation": len(inputs.val_subjects),
        "steps": len(history),
        "precision": precision,
        "seconds": round(seconds, 2),
        "final": {
            k: float(np.mean([h[k] for h in last]))
            for k in ("loss", "cls", "cycle", "smooth", "magnitude", "volume", "flipped")
            if k in last[0]
        }
        if last
        else {},
    }


def _write_simulator_outputs(
    out: Path,
    model: SimulatorNet,
    cfg: TrainConfig,
    inputs: _TrainingInputs,
    history: list[dict[str, float]],
    summary: dict[str, Any],
    classifier: str,
    classifier_sha256: str,
    prov: dict[str, Any],
) -> None:
    """Write the checkpoint, ``train_log.tsv`` and ``train_summary.json`` (no wall-clock time
    in the files: the same run gives the same bytes)."""
    import pandas as pd

    from neuroexplain.io.atomic import write_json, write_table

    save_simulator(
        out,
        model,
        train_config=cfg,
        input_shape=list(inputs.images.shape[1:]),
        extra={
            "train_subjects": inputs.train_subjects,
            "train_conditions": inputs.cond.tolist(),
            "val_subjects": inputs.val_subjects,
            "val_conditions": inputs.val_cond.tolist(),
            "classifier": classifier,
            "classifier_sha256": classifier_sha256,
            "history": history,
            # no wall-clock time in the file: the same run must give the same bytes
            "summary": {k: v for k, v in summary.items() if k != "seconds"},
            "provenance": prov,
        },
    )
    write_table(pd.DataFrame(history), out.parent / "train_log.tsv")
    write_json(
        {
            **{k: v for k, v in summary.items() if k != "seconds"},  # same run, same bytes
            "objective_definition": OBJECTIVE_DEFINITION,
            "provenance": prov,
        },
        out.parent / "train_summary.json",
    )


def _log_subjects(inputs: _TrainingInputs, cfg: TrainConfig, correct_only: bool) -> None:
    """Say how many training and validation subjects there are (a warning without any
    validation subject when the objective should be measured on them)."""
    cond = inputs.cond
    logger.info(
        "training the simulator on %d subjects (%d inject, %d remove)",
        inputs.idx.size,
        int((cond < 0).sum()),
        int((cond > 0).sum()),
    )
    vc = inputs.val_cond
    if inputs.val_idx.size:
        logger.info(
            "validation: %d subjects (%d inject, %d remove) simulated after every pass%s",
            inputs.val_idx.size,
            int((vc < 0).sum()),
            int((vc > 0).sum()),
            "; the objective is measured on them" if cfg.objective_on == "val" else "",
        )
    elif cfg.objective_on == "val":
        logger.warning(
            "no %svalidation subjects in the split: the simulator's objective is measured on "
            "the training subjects and the last pass is kept",
            "correctly classified " if correct_only else "",
        )


def run_train_simulator(
    preproc: str | os.PathLike[str],
    classifier: str | os.PathLike[str],
    logits: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    config: TrainConfig | None = None,
    net_config: SimulatorConfig | None = None,
    split: str | os.PathLike[str] | None = None,
    correct_only: bool = True,
    resume: bool = True,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train the simulator from the pipeline's files and write its checkpoint.

    Training subjects: the ``train`` split (``logits.tsv``'s ``split`` column, or ``split``),
    correctly classified by the classifier (``correct_only``). Healthy subjects are trained to
    inject, diseased ones to remove the disease effect. Validation subjects: the ``val`` split,
    selected the same way; with ``config.objective_on == "val"`` the objective is measured on
    them and the best validation pass is kept (:func:`train_simulator`); without any, on the
    training subjects (a warning, and ``note`` in the summary's ``objective``).

    Writes ``out`` (the checkpoint, :func:`save_simulator`), ``train_log.tsv`` next to it (one
    row per step; the ``val_*`` counts on the rows after which the validation subjects were
    simulated) and ``train_summary.json`` (subjects, steps, the objective: reached / flipped
    per direction on the training and the validation subjects, the kept pass and why, whether
    it was met; provenance). While training, ``<out stem>.state.pt`` holds the resumable state
    (every ``config.checkpoint_every`` steps); rerunning the same command after an
    interruption resumes from it, and it is removed once ``out`` is written.

    Returns:
        A summary: subjects, steps, seconds, final losses and the training flip rate.
    """
    from neuroexplain.provenance import provenance, sha256_file

    cfg = config or TrainConfig()
    ncfg = net_config or SimulatorConfig()
    inputs = _load_training_inputs(preproc, classifier, logits, split, correct_only)
    _log_subjects(inputs, cfg, correct_only)
    clf_sha = sha256_file(classifier)
    out = Path(out)
    state_path = out.with_name(out.name.split(".")[0] + ".state.pt")
    t0 = time.perf_counter()
    model, history = train_simulator(
        inputs.images[torch.from_numpy(inputs.idx)],
        inputs.cond,
        inputs.clf,
        config=cfg,
        net_config=ncfg,
        state_path=state_path,
        resume=resume,
        progress=progress,
        data_key={
            "subjects": inputs.train_subjects,
            "val_subjects": inputs.val_subjects,
            "classifier_sha256": clf_sha,
        },
        source=preproc,
        val_images=inputs.images[torch.from_numpy(inputs.val_idx)],
        val_conditions=inputs.val_cond,
    )
    seconds = time.perf_counter() - t0
    params = {
        "train": cfg.to_dict(),
        "net": model.config.to_dict(),
        "preproc": str(preproc),
        "classifier": str(classifier),
        "logits": str(logits),
        "correct_only": bool(correct_only),
    }
    prov = provenance(
        params, seed=cfg.seed, inputs=[preproc, classifier, logits], command="train-simulator"
    )
    summary = _training_summary(history, cfg, inputs, seconds)
    _write_simulator_outputs(
        out, model, cfg, inputs, history, summary, str(classifier), clf_sha, prov
    )
    state_path.unlink(missing_ok=True)
    logger.info("wrote %s (%d steps, %.0f s)", out, len(history), seconds)
    return summary
