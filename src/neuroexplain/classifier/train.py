"""Train a 3D MRI classifier on the cached ``preproc.pt`` tensors, with a recorded subject split.

``train_classifier`` makes a stratified subject-level train / validation / test split (fixed
seed, written to ``split.tsv``; subjects of one ``groups`` entry of ``preproc.pt``, such as the
control and diseased version of one anatomy in a paired synthetic cohort, share a split and a
training batch), trains with class balancing (``pos_weight``), light MONAI
augmentation and early stopping on the validation loss (or AUC), keeps the best epoch, and writes:

- ``model.pt``: checkpoint (:func:`neuroexplain.classifier.save_classifier`) of the final model:
  by default (``reference_ensemble="always"``) the ensemble of the trained network and the linear
  reference as one module (:func:`ensemble_weights`, :func:`select_final`); with
  ``explain="trained"`` (default) it also holds the trained model, the one the explanation
  stages explain (``explained`` entry; ``metrics.json`` ``explained``, ``logits.tsv``
  ``explained_logit``),
- ``metrics.json``: AUC, balanced accuracy, accuracy, confusion matrix on validation and test
  (and train), plus provenance,
- ``logits.tsv``: per subject ``subject, split, y, label, logit, prob``,
- ``split.tsv``: ``subject, split, y, label``,
- ``train_log.tsv``: per epoch ``epoch, train_loss, val_loss, val_auc, val_balanced_accuracy,
  lr, seconds``.

On CPU, the same seed and config give bitwise-identical weights (single process, seeded
generators for batch order and augmentation, deterministic algorithms). CUDA runs use AMP.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuroexplain.classifier.augment import BatchAugment, build_augmenter
from neuroexplain.classifier.data import SPLITS, load_preproc_dict, make_split, read_split
from neuroexplain.classifier.metrics import binary_metrics, logit_paths, predict_logits
from neuroexplain.errors import InputError
from neuroexplain.settings import ENSEMBLE_RULES, ClassifierConfig
from neuroexplain.utils import Precision

__all__ = [
    "TrainConfig",
    "cnn_logit_share",
    "ensemble_weights",
    "lr_at",
    "select_final",
    "train_classifier",
]

logger = logging.getLogger(__name__)

#: the classifier's options (defined once in :mod:`neuroexplain.settings`)
TrainConfig = ClassifierConfig


# ----------------------------------------------------------------------------------- training


def _lr_axis(preproc: Mapping[str, Any]) -> int:
    """Model-grid axis closest to world left-right (axis 0 for RAS model grids)."""
    aff = preproc.get("model_affines")
    if aff is None:
        return 0
    a = np.asarray(aff[0] if np.ndim(aff) == 3 else aff, dtype=np.float64)
    return int(np.argmax(np.abs(a[0, :3])))


def _evaluate_loss(model: Any, x: Any, y: Any, loss_fn: Any, batch_size: int, device: Any) -> tuple:
    import torch

    logits = torch.as_tensor(predict_logits(model, x, batch_size=batch_size, device=device))
    loss = float(loss_fn(logits.float(), torch.as_tensor(y).float()).item())
    return loss, logits.numpy()


@dataclass
class _ClassifierData:
    """The preprocessed cohort of :func:`train_classifier` with its split."""

    data: dict[str, Any]
    preproc_path: Path | None
    images: Any
    y: np.ndarray
    subjects: list[str]
    labels: list[str]
    split_df: Any
    parts: dict[str, np.ndarray]


def _load_cohort(
    preproc: str | os.PathLike[str] | Mapping[str, Any],
    split: str | os.PathLike[str] | None,
    cfg: TrainConfig,
) -> _ClassifierData:
    """Load the images and draw (or read) the split; both classes must be in train and val."""
    import torch

    preproc_path = None if isinstance(preproc, Mapping) else Path(preproc)
    data = load_preproc_dict(preproc_path) if preproc_path is not None else dict(preproc)
    images = torch.as_tensor(data["images"]).float()
    y = np.asarray(data["y"], dtype=np.float32)
    subjects = [str(s) for s in data["subjects"]]
    labels = [str(v) for v in data.get("label") or ["" for _ in subjects]]
    if split is not None:
        split_df = read_split(split, subjects).set_index("subject").loc[subjects].reset_index()
        split_df["y"] = y
    else:
        split_df = make_split(
            subjects,
            y,
            val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
            groups=data.get("groups"),
        )
    split_df["label"] = labels
    parts = {s: np.flatnonzero(split_df["split"].to_numpy() == s) for s in SPLITS}
    for s in ("train", "val"):
        if len(np.unique(y[parts[s]])) < 2:
            raise InputError(
                preproc_path or "preproc",
                f"expected both classes in the {s} split, "
                f"got {len(parts[s])} subjects of one class",
            )
    return _ClassifierData(data, preproc_path, images, y, subjects, labels, split_df, parts)


def _prepare_run(
    cfg: TrainConfig, cohort: _ClassifierData, resume: bool, progress: bool | None
) -> tuple[_Run, Any, dict[str, Any]]:
    """Seed, build the network and check that a training step fits in memory.

    Returns:
        ``(run, model on its device, model_kwargs)``.
    """
    from neuroexplain.utils import (
        check_memory_fits,
        estimate_training_memory,
        resolve_device,
        resolve_precision,
        seed_everything,
    )

    data, images, parts = cohort.data, cohort.images, cohort.parts
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    in_shape = list(images.shape[1:])
    model_kwargs: dict[str, Any] = {"dropout": cfg.dropout} if cfg.arch == "small" else {}
    if cfg.standardize:
        model_kwargs["standardize"] = True
    model = _build(cfg, data, images, parts, model_kwargs)
    model = model.to(device)
    need = estimate_training_memory(model, in_shape, cfg.batch_size, precision.enabled)
    need += int(images.element_size() * images.nelement())  # the cached volumes
    check_memory_fits(
        need,
        f"training the {cfg.arch!r} classifier (batch size {cfg.batch_size}, images "
        f"{'x'.join(map(str, in_shape))}, {len(cohort.subjects)} subjects)",
        cohort.preproc_path or "--batch-size",
        device=device,
        hint="use a smaller --batch-size or ingest at a smaller --shape",
    )
    run = _Run(
        cfg=cfg,
        images=images,
        y=cohort.y,
        parts=parts,
        groups=data.get("groups"),
        lr_axis=_lr_axis(data),
        device=device,
        precision=precision,
        resume=resume,
        progress=progress,
    )
    return run, model, model_kwargs


def _train_phases(
    run: _Run,
    cohort: _ClassifierData,
    model: Any,
    model_kwargs: dict[str, Any],
    out: Path,
    reference: Mapping[str, Any],
    ref_model: Any,
) -> list[_Phase]:
    """The CNN phase, and the CNN with a linear path when the CNN stays below the reference.

    The linear path starts as the reference itself (``ref_model``, the
    :class:`~neuroexplain.evaluate.quality.LinearReferenceModel` behind ``reference``), so the
    second phase's validation AUC is never below the reference's.
    """
    cfg = run.cfg
    run_key = _run_key(cfg, cohort.images, cohort.y, cohort.split_df, cohort.subjects)
    phases = [_fit_phase(run, "cnn", model, out / STATE_FILE, run_key, model_kwargs)]
    ref_auc = reference["val"]["auc"]
    if (
        cfg.reference_fallback
        and cfg.arch == "small"
        and ref_auc is not None
        and phases[0].val_auc < ref_auc - REFERENCE_MARGIN
    ):
        logger.warning(
            "the CNN reached val AUC %.3f, below the linear reference's %.3f: training it again "
            "with a linear path that starts as the linear reference",
            phases[0].val_auc,
            ref_auc,
        )
        kwargs = {**model_kwargs, "linear_pool": ref_model.pool, "linear_reference": True}
        model = _build(cfg, cohort.data, cohort.images, cohort.parts, kwargs)
        init = _init_linear_path(model, run, reference, ref_model)
        phases.append(
            _fit_phase(
                run, "cnn+linear", model.to(run.device), out / STATE_FILE_LINEAR,
                {**run_key, "phase": "cnn+linear", "init": "linear_reference"}, kwargs,
                linear_init=init, monitor="auc",
            )
        )  # fmt: skip
    return phases


def _final_model(
    run: _Run,
    cohort: _ClassifierData,
    phases: Sequence[_Phase],
    chosen: _Phase,
    ref_model: Any,
    model_kwargs: dict[str, Any],
) -> tuple[_Phase, np.ndarray, dict[str, Any], tuple[_Phase, np.ndarray] | None]:
    """The final model (``cfg.reference_ensemble``), its logits, the decision's record and the
    explained model with its logits when it is not the final one (``cfg.explain``).

    The trained model (``chosen``: the CNN, or the CNN with a linear path) is kept, or combined
    with the linear reference as one module: the CNN with a reference-mode linear path, its
    logit layer scaled by ``w_m`` and the path set to ``w_m`` times its trained weights (if
    any) plus ``w_r`` times the reference's (:func:`ensemble_weights` of the two models' logit
    sds on the training subjects). No training; the record holds the validation and test AUC of
    the CNN alone, the trained model, the reference and the ensemble, and why the final model
    was chosen.
    """
    import dataclasses

    import torch

    cfg, images, y, parts = run.cfg, cohort.images, cohort.y, cohort.parts
    trained = chosen.model.to(memory_format=torch.contiguous_format)
    lm, l_lin = logit_paths(trained, images, batch_size=cfg.batch_size, device=run.device)
    cnn = phases[0]
    if cnn is chosen:
        lc = lm
    else:
        cnn_model = cnn.model.to(memory_format=torch.contiguous_format)
        lc = predict_logits(cnn_model, images, batch_size=cfg.batch_size, device=run.device)
    lr = ref_model.decision_function(images)
    tr, va = parts["train"], parts["val"]
    s_m, s_r = float(np.std(lm[tr])), float(np.std(lr[tr]))
    can = cfg.arch == "small" and s_m > 0 and s_r > 0
    if can:
        decision = select_final(y[va], lm[va], lr[va], rule=cfg.reference_ensemble, seed=cfg.seed)
    else:
        why = "no linear path" if cfg.arch != "small" else "constant training logits"
        decision = {"choice": "model", "rule": cfg.reference_ensemble, "reason": why}
    record: dict[str, Any] = {
        "rule": cfg.reference_ensemble,
        "choice": decision["choice"],
        "reason": decision["reason"],
        "val_difference": decision.get("difference"),
        "trained_model": chosen.name,
        "logit_sd_train": {"model": s_m, "reference": s_r},
        "cnn_logit_share": cnn_logit_share(lm[tr], None if l_lin is None else l_lin[tr]),
    }
    if l_lin is not None:
        record["logit_sd_train"]["cnn_path"] = float(np.std(lm[tr] - l_lin[tr]))
        record["logit_sd_train"]["linear_path"] = float(np.std(l_lin[tr]))

    def aucs(lg: np.ndarray) -> dict[str, float | None]:
        return {s: binary_metrics(y[parts[s]], lg[parts[s]])["auc"] for s in ("val", "test")}

    record["auc"] = {"cnn": aucs(lc), "trained": aucs(lm), "reference": aucs(lr)}
    if can:
        w_m, w_r = ensemble_weights(s_m, s_r)
        record["weights"] = {"model": w_m, "reference": w_r}
        record["auc"]["ensemble"] = aucs(w_m * lm + w_r * lr)
    record["explained"] = chosen.name  # the ensemble below: per cfg.explain
    if decision["choice"] != "ensemble":
        logger.info("final model: %s (%s)", chosen.name, decision["reason"])
        return dataclasses.replace(chosen, model=trained), lm, record, None
    kwargs = {**model_kwargs, "linear_pool": ref_model.pool, "linear_reference": True}
    ens = _ensemble_module(cfg, cohort, trained, ref_model, kwargs, w_m, w_r)
    le = predict_logits(ens, images, batch_size=cfg.batch_size, device=run.device)
    record["max_abs_logit_diff"] = float(np.max(np.abs(le - (w_m * lm + w_r * lr))))
    record["explained"] = chosen.name if cfg.explain == "trained" else "ensemble"
    logger.info(
        "final model: the ensemble of %s and the linear reference (%s; weights %.3g, %.3g)",
        chosen.name,
        decision["reason"],
        w_m,
        w_r,
    )
    final = dataclasses.replace(chosen, name="ensemble", model=ens, model_kwargs=kwargs)
    if cfg.explain == "trained":
        logger.info("explained model: %s (classifier.explain: trained)", chosen.name)
        return final, le, record, (dataclasses.replace(chosen, model=trained), lm)
    return final, le, record, None


def cnn_logit_share(logits: np.ndarray, linear: np.ndarray | None) -> float | None:
    """How much of a trained model's logit its CNN path carries, in ``[0, 1]``.

    ``sd(cnn) / (sd(cnn) + sd(linear))`` over the given subjects, with ``cnn = logits - linear``
    (:func:`neuroexplain.classifier.metrics.logit_paths`); ``1`` for a model without a linear
    path, ``None`` when both parts are constant. Near 0 the model is its voxel-wise linear path:
    Grad-CAM, TCAV / SACV, XNN and the simulator read CNN features that barely reach the logit.

    Example:
        >>> cnn_logit_share(np.array([0.0, 2.0]), np.array([0.0, 2.0]))
        0.0
        >>> cnn_logit_share(np.array([0.0, 2.0]), None)
        1.0
    """
    if linear is None:
        return 1.0
    s_c, s_l = float(np.std(logits - linear)), float(np.std(linear))
    return None if s_c + s_l == 0 else s_c / (s_c + s_l)


def _ensemble_module(
    cfg: TrainConfig,
    cohort: _ClassifierData,
    trained: Any,
    ref_model: Any,
    kwargs: dict[str, Any],
    w_m: float,
    w_r: float,
) -> Any:
    """``w_m * trained(x) + w_r * reference(x)`` as one CNN-with-linear-path module."""
    import torch

    device = next(trained.parameters()).device
    ens = _build(cfg, cohort.data, cohort.images, cohort.parts, kwargs)
    state = ens.state_dict()
    for k, v in trained.state_dict().items():
        if not k.startswith("linear_path."):
            state[k] = v.detach().cpu().clone()
    ens.load_state_dict(state)
    norm = getattr(ens, "input_norm", None)
    path = ens.linear_path
    path.set_reference(ref_model, norm)
    with torch.no_grad():
        last = ens.classifier[-1]
        last.weight.mul_(w_m)
        last.bias.mul_(w_m)
        weight, bias = path.linear.weight * w_r, path.linear.bias * w_r
        old = getattr(trained, "linear_path", None)
        if old is not None:  # a trained linear path: its term is part of the trained logit
            if not (old.reference and old.pool == path.pool):
                raise ValueError("expected the trained linear path in the reference's mode")
            for name in ("input_mean", "input_scale", "feature_mean", "feature_sd", "keep"):
                if not torch.equal(getattr(old, name).cpu(), getattr(path, name)):
                    raise ValueError(f"the trained linear path's {name} is not the reference's")
            weight = weight + w_m * old.linear.weight.detach().cpu()
            bias = bias + w_m * old.linear.bias.detach().cpu()
        path.linear.weight.copy_(weight)
        path.linear.bias.copy_(bias)
    return ens.to(device).to(memory_format=torch.contiguous_format).eval()


def _split_metrics(cohort: _ClassifierData, logits: np.ndarray, seed: int) -> dict[str, Any]:
    """:func:`binary_metrics` and the bootstrap AUC interval of every non-empty split."""
    from neuroexplain.evaluate.quality import bootstrap_auc

    y, parts = cohort.y, cohort.parts
    metrics: dict[str, Any] = {
        s: binary_metrics(y[parts[s]], logits[parts[s]]) for s in SPLITS if len(parts[s])
    }
    for s in metrics:
        ci = bootstrap_auc(y[parts[s]], logits[parts[s]], seed=seed)
        metrics[s]["auc_ci"] = None if ci is None else [float(ci[0]), float(ci[1])]
    return metrics


def _phase_summaries(phases: Sequence[_Phase]) -> list[dict[str, Any]]:
    return [
        {
            "name": ph.name,
            "val_auc": ph.val_auc,
            "best_epoch": ph.best["epoch"],
            "epochs_run": len(ph.log_rows),
            "seconds": round(ph.seconds, 2),
            "linear_init": ph.linear_init,
            "monitor": ph.monitor,
        }
        for ph in phases
    ]


def _write_classifier_outputs(
    out: Path,
    cfg: TrainConfig,
    cohort: _ClassifierData,
    chosen: _Phase,
    model: Any,
    logits: np.ndarray,
    log_rows: list[dict[str, Any]],
    metrics: dict[str, Any],
    params: dict[str, Any],
    explained: tuple[_Phase, np.ndarray] | None = None,
) -> None:
    """Write ``model.pt``, ``split.tsv``, ``logits.tsv``, ``train_log.tsv``, ``metrics.json``
    and remove the training states.

    With an ``explained`` model other than the final one, the checkpoint also holds it (key
    ``explained``, :func:`~neuroexplain.classifier.network.load_classifier`) and ``logits.tsv``
    its logits (``explained_logit``)."""
    import pandas as pd

    from neuroexplain.classifier.network import save_classifier
    from neuroexplain.io.atomic import write_json, write_table

    best, data, y, split_df = chosen.best, cohort.data, cohort.y, cohort.split_df
    logit_df = pd.DataFrame(
        {
            "subject": cohort.subjects,
            "split": split_df["split"].to_numpy(),
            "y": y.astype(int),
            "label": cohort.labels,
            "logit": logits,
            "prob": 1.0 / (1.0 + np.exp(-logits)),
        }
    )
    extra: dict[str, Any] = {}
    if explained is not None:
        phase, explained_logits = explained
        logit_df["explained_logit"] = explained_logits
        extra["explained"] = {
            "name": phase.name,
            "model_kwargs": phase.model_kwargs,
            "state_dict": {
                k: v.detach().cpu().clone() for k, v in phase.model.state_dict().items()
            },
        }
    save_classifier(
        out / "model.pt",
        model,
        arch=cfg.arch,
        model_kwargs=chosen.model_kwargs,
        input_shape=list(cohort.images.shape[1:]),
        config=params,
        epoch=best["epoch"],
        seed=cfg.seed,
        best_metric={
            "name": f"val_{chosen.monitor}",
            "value": best["loss"] if chosen.monitor == "loss" else best["auc"],
        },
        extra={
            "out_channels": 1,
            "positive_class": data.get("positive_class"),
            "provenance": metrics["provenance"],
            "metrics": {s: metrics[s] for s in SPLITS if s in metrics},
            **extra,
        },
    )
    split_out = split_df[["subject", "split", "y", "label"]].copy()
    split_out["y"] = split_out["y"].astype(int)
    write_table(split_out, out / "split.tsv")
    write_table(logit_df, out / "logits.tsv")
    write_table(pd.DataFrame(log_rows), out / "train_log.tsv")
    write_json(metrics, out / "metrics.json")
    for name in (STATE_FILE, STATE_FILE_LINEAR):
        (out / name).unlink(missing_ok=True)


def train_classifier(
    preproc: str | os.PathLike[str] | Mapping[str, Any],
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    split: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    resume: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a binary 3D classifier and write model, metrics, logits, split and log to ``out``.

    Args:
        preproc: path to ``preproc.pt`` or the loaded dict (``images`` ``(N, C, X, Y, Z)``,
            ``y`` ``(N,)`` 0/1, ``subjects``).
        out: output folder (created).
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields.
        split: an existing ``split.tsv`` to reuse instead of drawing a new split.
        progress: show a progress bar (``None``: only on a terminal).
        resume: continue from ``out/train_state.pt`` (written atomically after every epoch) when
            it was written by a run with the same options, data and split; the resumed run ends
            with the same weights as an uninterrupted one (bitwise on CPU). The state file is
            removed once the outputs are written.

    Returns:
        The ``metrics.json`` content (``{"val": ..., "test": ..., "train": ..., "best_epoch",
        "epochs_run", "seconds", "reference", "precision", ...}``): per split the
        :func:`binary_metrics` plus ``auc_ci`` (95 % stratified bootstrap interval);
        ``reference`` is the :func:`neuroexplain.evaluate.quality.linear_reference` fitted on
        the same split (does a linear model find a signal the network should?); ``model`` the
        final model (``cnn``, ``cnn+linear`` or ``ensemble`` with the reference, config
        ``reference_ensemble``) and ``final_selection`` why (:func:`select_final`, with the
        validation / test AUC of the CNN alone, the trained model, reference and ensemble);
        ``trained_is_linear_reference`` whether the trained model is the CNN with a linear
        path kept at its epoch 0, i.e. the linear reference itself (a warning is logged);
        ``cnn_logit_share`` how much of the trained model's logit its CNN path carries
        (:func:`cnn_logit_share` on the training subjects; 1 without a linear path, 0 for the
        linear reference itself; a warning below ``LOW_CNN_SHARE``);
        ``precision``
        the arithmetic of the training forward passes (``config.precision`` resolved:
        :func:`neuroexplain.utils.resolve_precision`).

    Example:
        >>> train_classifier("results/ingest/mri/preproc.pt", "results/classifier",
        ...                  epochs=30, seed=0)  # doctest: +SKIP
    """

    from neuroexplain.evaluate.quality import fit_linear_reference
    from neuroexplain.provenance import provenance

    cfg = TrainConfig.resolve(config, **overrides)
    cohort = _load_cohort(preproc, split, cfg)
    out = Path(out)
    images, y, parts = cohort.images, cohort.y, cohort.parts

    # what a linear model on the standardised voxels reaches on the same split: tells whether
    # the data hold a signal the network should find (seconds; see evaluate/quality.py); its
    # fitted model is where the linear path starts if the CNN falls short of it
    reference, ref_model = fit_linear_reference(images, y, parts, seed=cfg.seed)

    run, model, model_kwargs = _prepare_run(cfg, cohort, resume, progress)
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs and resources are checked
    phases = _train_phases(run, cohort, model, model_kwargs, out, reference, ref_model)
    # best val AUC, a tie to the first phase (the CNN); cnn+linear never ends below the reference
    chosen = max(phases, key=lambda ph: (ph.val_auc, -phases.index(ph)))
    best = chosen.best
    # the CNN with a linear path kept at its epoch 0 is the linear reference itself (its CNN
    # path's logit layer starts at zero): every explanation then explains a voxel-wise linear
    # model, whatever its AUC
    linear_only = chosen.name == "cnn+linear" and best["epoch"] == 0
    if linear_only:
        logger.warning(
            "%s: the CNN did not improve on the linear reference (val AUC %s): the trained "
            "model is the linear reference itself, and its explanations are those of a "
            "voxel-wise linear model",
            out,
            _fmt_auc(phases[0].val_auc),
        )
    log_rows = [row for ph in phases for row in ph.log_rows]
    train_seconds = sum(ph.seconds for ph in phases)
    # the final model: the trained one, or its ensemble with the reference (one module)
    chosen, logits, selection, explained = _final_model(
        run, cohort, phases, chosen, ref_model, model_kwargs
    )
    model = chosen.model
    share = selection.get("cnn_logit_share")
    if share is not None and share < LOW_CNN_SHARE and not linear_only:
        logger.warning(
            "%s: the CNN path carries %.0f %% of the trained model's logit (sd on the training "
            "subjects; the rest is its voxel-wise linear path): Grad-CAM, TCAV / SACV, XNN and "
            "the simulator read CNN features that barely reach the logit",
            out,
            100 * share,
        )
    metrics = _split_metrics(cohort, logits, cfg.seed)
    if explained is not None:  # what the quality gate judges: the model that is explained
        metrics["explained"] = {"model": explained[0].name}
        metrics["explained"].update(_split_metrics(cohort, explained[1], cfg.seed))
    metrics["reference"] = reference
    metrics["final_selection"] = selection
    params = {**asdict(cfg), "split_file": None if split is None else str(split)}
    prov = provenance(
        params,
        seed=cfg.seed,
        inputs=[cohort.preproc_path] if cohort.preproc_path else [],
        command="train-classifier",
    )
    metrics.update(
        {
            "best_epoch": best["epoch"],
            "best_val_loss": best["loss"],
            "best_val_auc": best["auc"],
            "epochs_run": len(log_rows),
            "model": chosen.name,
            "trained_is_linear_reference": linear_only,
            "cnn_logit_share": share,
            "phases": _phase_summaries(phases),
            "train_seconds": round(train_seconds, 2),
            "train_volumes_per_second": round(
                sum(len(parts["train"]) for _ in log_rows) / max(train_seconds, 1e-9), 3
            ),
            "device": str(run.device),
            "precision": run.precision.name,
            "input_shape": list(images.shape[1:]),
            "pos_weight": _pos_weight(y[parts["train"]]),
            "positive_class": cohort.data.get("positive_class"),
            "provenance": prov,
        }
    )
    logger.info(
        "best epoch %d of %d; test AUC %s, val AUC %s (linear reference: test %s, val %s; %.0f s)",
        best["epoch"],
        len(log_rows),
        _fmt_auc(metrics.get("test", {}).get("auc")),
        _fmt_auc(metrics["val"]["auc"]),
        _fmt_auc(reference.get("test", {}).get("auc")),
        _fmt_auc(reference["val"]["auc"]),
        train_seconds,
    )
    _write_classifier_outputs(
        out, cfg, cohort, chosen, model, logits, log_rows, metrics, params, explained
    )
    return metrics


def ensemble_weights(scale_model: float, scale_reference: float) -> tuple[float, float]:
    """Weights ``(w_model, w_reference)`` of the ensemble logit ``w_m l_m + w_r l_r``.

    Each model's logit is divided by its own scale (its logit sd on the training subjects), the
    two are averaged, and the average is multiplied by the geometric mean of the scales so the
    ensemble's logits stay on the models' scale: ``w_m = sqrt(s_r / s_m) / 2``,
    ``w_r = sqrt(s_m / s_r) / 2``. Scale-free: rescaling either model's logits does not change
    the ensemble's ranking (its AUC); a logit of 0 in both models stays 0.

    Example:
        >>> ensemble_weights(4.0, 1.0)
        (0.25, 1.0)
    """
    sm, sr = float(scale_model), float(scale_reference)
    if not (sm > 0 and sr > 0 and math.isfinite(sm) and math.isfinite(sr)):
        raise ValueError(f"expected positive finite logit scales, got {sm}, {sr}")
    return 0.5 * math.sqrt(sr / sm), 0.5 * math.sqrt(sm / sr)


def select_final(
    y_val: Sequence[float],
    model_val: Sequence[float],
    reference_val: Sequence[float],
    *,
    rule: str = "separated",
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Decide between the trained model alone and its ensemble with the linear reference.

    Validation information only. ``rule``:

    - ``"separated"``: the ensemble, unless the validation split tells the trained model apart
      from the reference in its favour: the paired stratified bootstrap interval
      (:func:`neuroexplain.evaluate.quality.paired_auc_difference`, ``level``) of
      ``AUC(model) - AUC(reference)`` lies above 0. On a split of a few dozen subjects the
      interval is wide, so a small validation advantage (which the model's own early stopping
      inflates) does not discard the reference;
    - ``"always"``: the ensemble;
    - ``"never"``: the model.

    Returns:
        ``{"choice": "model" | "ensemble", "rule", "reason", "val_auc_model",
        "val_auc_reference", "difference"}`` (``difference``: the bootstrap result, computed
        under every rule, ``None`` for a one-class split).
    """
    from neuroexplain.evaluate.quality import paired_auc_difference

    if rule not in FINAL_RULES:
        raise ValueError(f"unknown final-model rule {rule!r}; expected one of {FINAL_RULES}")
    auc_m = binary_metrics(y_val, model_val)["auc"]
    auc_r = binary_metrics(y_val, reference_val)["auc"]
    out: dict[str, Any] = {
        "rule": rule,
        "val_auc_model": auc_m,
        "val_auc_reference": auc_r,
    }
    diff = paired_auc_difference(y_val, model_val, reference_val, seed=seed, level=level)
    out["difference"] = diff
    if rule == "always":
        return {**out, "choice": "ensemble", "reason": "rule 'always'"}
    if rule == "never":
        return {**out, "choice": "model", "reason": "rule 'never'"}
    if diff is None:
        return {**out, "choice": "ensemble", "reason": "one class in validation: no comparison"}
    if diff["low"] > 0:
        reason = (
            f"validation separates the model from the reference: AUC difference "
            f"{diff['diff']:.3f}, {level:.0%} interval [{diff['low']:.3f}, {diff['high']:.3f}]"
        )
        return {**out, "choice": "model", "reason": reason}
    reason = (
        f"validation does not show the model above the reference: AUC difference "
        f"{diff['diff']:.3f}, {level:.0%} interval [{diff['low']:.3f}, {diff['high']:.3f}]"
    )
    return {**out, "choice": "ensemble", "reason": reason}


def _monitor_key(monitor: str, val_loss: float, auc: float) -> tuple[float, ...]:
    """Sort key of an epoch (smaller is better): validation loss, or AUC then loss."""
    if monitor == "loss":
        return (round(val_loss, 6),)
    return (-round(auc, 6), round(val_loss, 6))


def _pos_weight(y_train: np.ndarray) -> float:
    """BCE weight of the positive class: negatives / positives of the training split."""
    n_pos = float(np.sum(y_train))
    return (len(y_train) - n_pos) / max(n_pos, 1.0)


@dataclass
class _Run:
    """What every training phase of one ``train_classifier`` call shares."""

    cfg: ClassifierConfig
    images: Any
    y: np.ndarray
    parts: dict[str, np.ndarray]
    groups: Any
    lr_axis: int
    device: Any
    precision: Precision
    resume: bool
    progress: bool | None


@dataclass
class _Phase:
    """One trained model: its best validation state, log and time."""

    name: str
    model: Any
    best: dict[str, Any]
    log_rows: list[dict[str, Any]]
    seconds: float
    model_kwargs: dict[str, Any]
    linear_init: dict[str, Any] | None = None
    monitor: str = "loss"

    @property
    def val_auc(self) -> float:
        return float(self.best.get("auc", 0.5))


def _build(
    cfg: ClassifierConfig,
    data: Mapping[str, Any],
    images: Any,
    parts: Mapping[str, np.ndarray],
    model_kwargs: dict[str, Any],
) -> Any:
    """The network of ``cfg`` with its input standardisation fitted on the training images."""
    import torch

    from neuroexplain.classifier.network import build_model

    in_shape = list(images.shape[1:])
    model = build_model(
        cfg.arch, spatial_size=in_shape[1:], in_channels=in_shape[0], out_channels=1, **model_kwargs
    )
    if cfg.standardize:
        fit_on = images[parts["train"]]
        if cfg.flip:
            fit_on = torch.cat([fit_on, fit_on.flip(2 + _lr_axis(data))])
        model.input_norm.fit(fit_on, eps=cfg.standardize_eps)
    return model


def _init_linear_path(
    model: Any, run: _Run, reference: Mapping[str, Any], ref_model: Any
) -> dict[str, Any]:
    """Make ``model`` start as the linear reference fitted in this run.

    ``model.linear_path`` (built in its reference mode with the reference's pooling factor)
    takes the reference's feature mask, per-feature training mean and sd, coefficients and
    intercept, and undoes the model's input standardisation, so it computes the reference's
    decision function; the CNN path is freshly initialised with a zero logit layer. Epoch 0 of
    the phase is then the reference itself (same validation AUC, a candidate for the best
    state) and training only moves off it for a better validation AUC.

    Returns:
        ``{"C", "val_auc", "val_auc_by_C", "source", "max_abs_logit_diff"}``: the reference's
        ``C`` and validation AUCs, and the largest difference between the model's initial
        validation logits and the reference's decision function (float32 round-off).
    """
    import torch

    path = model.linear_path
    norm = getattr(model, "input_norm", None)
    path.set_reference(ref_model, norm)
    with torch.no_grad():
        # the CNN path's logit layer starts at zero: the model starts as the reference itself
        last = model.classifier[-1]
        last.weight.zero_()
        last.bias.zero_()
        x_val = run.images[run.parts["val"]].float()
        xv = x_val.to(path.linear.weight.device)
        logits = path(norm(xv) if norm is not None else xv)[:, 0].double().cpu().numpy()
    diff = float(np.max(np.abs(logits - ref_model.decision_function(x_val))))
    auc = reference["val"]["auc"]
    logger.info(
        "linear path initialised as the linear reference: C %g, val AUC %s (logits within %.2g)",
        ref_model.C,
        _fmt_auc(auc),
        diff,
    )
    return {
        "C": ref_model.C,
        "val_auc": auc,
        "val_auc_by_C": dict(reference.get("val_auc_by_C", {})),
        "source": "linear_reference",
        "max_abs_logit_diff": diff,
    }


@dataclass
class _Fit:
    """One training phase in progress: what it trains, its optimiser state and its best epoch."""

    name: str
    monitor: str
    state_path: Path
    run_key: dict[str, Any]
    model: Any
    opt: Any
    scaler: Any
    aug: BatchAugment | None
    gen: Any
    loss_fn: Any
    eval_loss_fn: Any
    mem_format: Any
    x_val: Any
    y_val: np.ndarray
    best: dict[str, Any]
    log_rows: list[dict[str, Any]]
    stale: int = 0
    start: int = 1


def _fit_setup(
    run: _Run, name: str, model: Any, state_path: Path, run_key: dict[str, Any], monitor: str
) -> _Fit:
    """Losses, optimiser, AMP scaler, augmentation and batch-order generator of a phase."""
    import torch

    cfg, y, parts, device = run.cfg, run.y, run.parts, run.device
    mem_format = torch.channels_last_3d if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=mem_format)
    pos_weight = torch.tensor([_pos_weight(y[parts["train"]])], device=device)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    eval_loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight.cpu())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = run.precision.grad_scaler()
    aug = build_augmenter(cfg, run.lr_axis, cfg.seed) if cfg.augment else None
    gen = torch.Generator().manual_seed(cfg.seed)
    return _Fit(
        name=name,
        monitor=monitor,
        state_path=state_path,
        run_key=run_key,
        model=model,
        opt=opt,
        scaler=scaler,
        aug=aug,
        gen=gen,
        loss_fn=loss_fn,
        eval_loss_fn=eval_loss_fn,
        mem_format=mem_format,
        x_val=run.images[parts["val"]],
        y_val=y[parts["val"]],
        best={"key": (float("inf"),), "loss": float("inf"), "epoch": -1},
        log_rows=[],
    )


def _validate(run: _Run, fit: _Fit) -> tuple[float, dict[str, Any], float]:
    """``(validation loss, binary_metrics, AUC or 0.5)`` of the phase's model."""
    val_loss, val_logits = _evaluate_loss(
        fit.model, fit.x_val, fit.y_val, fit.eval_loss_fn, run.cfg.batch_size, run.device
    )
    vm = binary_metrics(fit.y_val, val_logits)
    auc = vm["auc"] if vm["auc"] is not None else 0.5
    return val_loss, vm, auc


def _candidate(fit: _Fit, key: tuple[float, ...], auc: float, loss: float, epoch: int) -> dict:
    """The best-epoch record of the model as it is now (a copy of its weights on CPU)."""
    return {
        "key": key,
        "auc": auc,
        "loss": loss,
        "epoch": epoch,
        "state": copy.deepcopy({k: v.detach().cpu() for k, v in fit.model.state_dict().items()}),
    }


def _log_row(
    name: str,
    epoch: int,
    train_loss: float | None,
    val_loss: float,
    vm: Mapping[str, Any],
    lr: float | None,
    seconds: float,
) -> dict[str, Any]:
    return {
        "phase": name,
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_auc": vm["auc"],
        "val_balanced_accuracy": vm["balanced_accuracy"],
        "lr": lr,
        "seconds": seconds,
    }


def _resume_fit(run: _Run, fit: _Fit) -> None:
    """Continue from the phase's training state when it belongs to this run."""
    import torch

    if not (run.resume and fit.state_path.is_file()):
        return
    state = _load_state(fit.state_path, fit.run_key)
    if state is None:
        return
    fit.model.load_state_dict(state["model"])
    fit.opt.load_state_dict(state["optimizer"])
    if state["scaler"]:
        fit.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    fit.gen.set_state(state["rng"]["order"])
    if fit.aug is not None:
        fit.aug.gen.set_state(state["rng"]["augment"])
    fit.best = {**state["best"], "key": tuple(state["best"]["key"])}
    fit.stale = int(state["stale"])
    fit.log_rows = [dict(r) for r in state["log"]]
    fit.start = int(state["epoch"]) + 1
    logger.info(
        "resuming classifier training from %s after epoch %d", fit.state_path, fit.start - 1
    )


def _train_epoch(run: _Run, fit: _Fit, epoch: int, train_groups: list[np.ndarray] | None) -> float:
    """One pass over the training split (1-based ``epoch``); returns the mean training loss."""
    import torch

    cfg, images, y, parts, device = run.cfg, run.images, run.y, run.parts, run.device
    model, opt, scaler, aug = fit.model, fit.opt, fit.scaler, fit.aug
    model.train()
    if train_groups is None:
        order = parts["train"][torch.randperm(len(parts["train"]), generator=fit.gen).numpy()]
    else:  # whole groups in random order: a paired control and diseased share a batch
        perm = torch.randperm(len(train_groups), generator=fit.gen).numpy()
        order = np.concatenate([train_groups[j] for j in perm])
    total, count = 0.0, 0
    steps_per_epoch = -(-len(order) // cfg.batch_size)
    for i in range(0, len(order), cfg.batch_size):
        idx = order[i : i + cfg.batch_size]
        step = (epoch - 1) * steps_per_epoch + i // cfg.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, steps_per_epoch)
        xb = images[idx].to(device, non_blocking=True)
        if aug is not None:
            xb = aug(xb)
        xb = xb.contiguous(memory_format=fit.mem_format)
        yb = torch.as_tensor(y[idx], device=device)
        opt.zero_grad(set_to_none=True)
        with run.precision.autocast():  # the forward pass; the loss in float32
            logit = model(xb)[:, 0]
        loss = fit.loss_fn(logit.float(), yb)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        total += float(loss.item()) * len(idx)
        count += len(idx)
    return total / max(count, 1)


def _end_epoch(run: _Run, fit: _Fit, epoch: int, train_loss: float, t0: float, bar: Any) -> bool:
    """Validate, log, keep the best state and save the training state after ``epoch``;
    ``True`` when training stops early."""
    cfg = run.cfg
    val_loss, vm, auc = _validate(run, fit)
    seconds = time.perf_counter() - t0
    lr = fit.opt.param_groups[0]["lr"]
    fit.log_rows.append(_log_row(fit.name, epoch, train_loss, val_loss, vm, lr, round(seconds, 3)))
    key = _monitor_key(fit.monitor, val_loss, auc)
    improved = key < fit.best["key"]
    if improved:
        fit.best = _candidate(fit, key, auc, val_loss, epoch)
        fit.stale = 0
    else:
        fit.stale += 1
    bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}", auc=vm["auc"])
    logger.info(
        "epoch %d: train loss %.4f, val loss %.4f, val AUC %s%s (%.1f s)",
        epoch,
        train_loss,
        val_loss,
        "n/a" if vm["auc"] is None else f"{vm['auc']:.3f}",
        " *" if improved else "",
        seconds,
    )
    _save_state(
        fit.state_path, fit.run_key, epoch, fit.model, fit.opt, fit.scaler, fit.gen, fit.aug,
        fit.best, fit.stale, fit.log_rows,
    )  # fmt: skip
    if cfg.patience and fit.stale >= cfg.patience:
        logger.info("early stop: no better validation %s for %d epochs", fit.monitor, cfg.patience)
        return True
    return False


def _fit_phase(
    run: _Run,
    name: str,
    model: Any,
    state_path: Path,
    run_key: dict[str, Any],
    model_kwargs: dict[str, Any],
    *,
    linear_init: dict[str, Any] | None = None,
    monitor: str | None = None,
) -> _Phase:
    """Train ``model`` (early stopping, best validation state, resumable) and return the phase.

    ``monitor`` overrides ``cfg.monitor`` (the linear phase selects on validation AUC: it
    exists to reach the reference's AUC, and its epoch 0 is the reference itself). An epoch
    replaces the best one when its key is smaller: on ``"auc"``, a higher AUC, or an equal AUC
    with a lower validation loss; epoch 0 of the linear phase is replaced only by a strictly
    higher AUC (an epoch of the same AUC and a lower loss does not displace the reference).
    """
    from tqdm.auto import tqdm

    monitor = monitor or run.cfg.monitor
    cfg = run.cfg
    fit = _fit_setup(run, name, model, state_path, run_key, monitor)
    t_start = time.perf_counter()
    if linear_init is not None:  # the initial model (the reference alone) is a candidate too
        val_loss, vm, auc = _validate(run, fit)
        key = _monitor_key(monitor, val_loss, auc)
        if monitor == "auc":  # no loss tie-break against it: only a higher AUC replaces it
            key = (key[0], -math.inf)
        fit.best = _candidate(fit, key, auc, val_loss, 0)
        fit.log_rows.append(_log_row(name, 0, None, val_loss, vm, None, 0.0))
    _resume_fit(run, fit)
    disable = None if run.progress is None else not run.progress  # None: only on a terminal
    bar = tqdm(
        range(fit.start, cfg.epochs + 1),
        desc=f"train {name}",
        unit="epoch",
        disable=disable,
        initial=fit.start - 1,
        total=cfg.epochs,
    )
    stopped = cfg.patience and fit.stale >= cfg.patience
    train_groups = _train_groups(run.groups, run.parts["train"])
    for epoch in [] if stopped else bar:
        t0 = time.perf_counter()
        train_loss = _train_epoch(run, fit, epoch, train_groups)
        if _end_epoch(run, fit, epoch, train_loss, t0, bar):
            break
    bar.close()
    fit.model.load_state_dict(fit.best["state"])
    return _Phase(
        name=name,
        model=fit.model,
        best=fit.best,
        log_rows=fit.log_rows,
        seconds=time.perf_counter() - t_start,
        model_kwargs=model_kwargs,
        linear_init=linear_init,
        monitor=monitor,
    )


def _fmt_auc(auc: float | None) -> str:
    return "n/a" if auc is None else f"{auc:.3f}"


def _train_groups(groups: Sequence[str] | None, train: np.ndarray) -> list[np.ndarray] | None:
    """Training indices grouped (first-appearance order), or ``None`` when all are singletons."""
    if groups is None:
        return None
    members: dict[str, list[int]] = {}
    for i in train:
        members.setdefault(str(groups[i]), []).append(int(i))
    if len(members) == len(train):
        return None
    return [np.asarray(v) for v in members.values()]


STATE_FILE = "train_state.pt"
STATE_FILE_LINEAR = "train_state_linear.pt"
#: a CNN this far below the linear reference's validation AUC is trained again with a linear path
REFERENCE_MARGIN = 0.03
#: below this share of the trained model's logit sd carried by the CNN path (the rest by its
#: linear path), train-classifier warns that the CNN-based explanations read little of the logit
LOW_CNN_SHARE = 0.1
#: rules of :func:`select_final` (config ``classifier.reference_ensemble``)
FINAL_RULES = ENSEMBLE_RULES
STATE_FORMAT = "neuroexplain-classifier-state/1"


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate of the optimiser step ``step`` (0-based) under ``cfg.lr_schedule``.

    A pure function of the step, so a resumed run continues the same schedule.
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    warm = max(int(steps_per_epoch), 1)
    total = max(int(cfg.epochs) * warm, warm + 1)
    if step < warm:
        return cfg.lr * (0.1 + 0.9 * step / warm)
    t = min((step - warm) / max(total - warm, 1), 1.0)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))


def _run_key(cfg: TrainConfig, images: Any, y: np.ndarray, split_df: Any, subjects: list) -> dict:
    """What a resumed run must share with the interrupted one (options, data, split)."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images.numpy()).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    digest.update("\n".join(subjects).encode())
    digest.update("\n".join(split_df["split"].astype(str)).encode())
    # more epochs may resume a constant-rate run; a schedule depends on them
    skip = ("epochs", "device") if cfg.lr_schedule == "constant" else ("device",)
    params = {k: v for k, v in asdict(cfg).items() if k not in skip}
    return {"params": params, "data": digest.hexdigest()}


def _save_state(
    path: Path,
    key: dict,
    epoch: int,
    model: Any,
    opt: Any,
    scaler: Any,
    gen: Any,
    aug: Any,
    best: dict,
    stale: int,
    log_rows: list,
) -> None:
    """Atomically write everything needed to continue training after ``epoch``."""
    import torch

    from neuroexplain.io.atomic import save_torch
    from neuroexplain.io.checkpoint import to_plain as _plain

    rng = {"torch": torch.get_rng_state(), "order": gen.get_state()}
    if aug is not None:
        rng["augment"] = aug.gen.get_state()
    state = {
        "format": STATE_FORMAT,
        "key": _plain(key),
        "epoch": int(epoch),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "rng": rng,
        "best": _plain(best),
        "stale": int(stale),
        "log": _plain(log_rows),
    }
    save_torch(state, path)


def _load_state(path: Path, key: dict) -> dict | None:
    """The training state at ``path`` if it belongs to this run, else ``None`` (start over)."""
    from neuroexplain.io.checkpoint import load_training_state
    from neuroexplain.io.checkpoint import to_plain as _plain

    return load_training_state(
        path, fmt=STATE_FORMAT, key=_plain(key), what="classifier training state"
    )
