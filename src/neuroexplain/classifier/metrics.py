"""Classifier metrics: binary metrics at the logit-0 threshold and the logits of a model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["binary_metrics", "logit_paths", "predict_logits"]


def binary_metrics(y: Sequence[float], logits: Sequence[float]) -> dict[str, Any]:
    """Binary classification metrics at the logit-0 (probability 0.5) threshold.

    Args:
        y: true labels 0/1 ``(N,)``.
        logits: positive-class logits ``(N,)``.

    Returns:
        ``{"n", "n_positive", "auc", "balanced_accuracy", "accuracy", "confusion_matrix"}`` with the
        confusion matrix as ``[[tn, fp], [fn, tp]]``; ``auc`` is ``None`` when only one class is
        present.
    """
    from sklearn.metrics import confusion_matrix, roc_auc_score

    yt = np.asarray(y, dtype=int)
    lg = np.asarray(logits, dtype=np.float64)
    pred = (lg > 0).astype(int)
    cm = confusion_matrix(yt, pred, labels=[0, 1])
    tn, fp, fn, tp = (int(v) for v in cm.ravel())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    both = [v for v in (sens, spec) if not np.isnan(v)]
    auc = float(roc_auc_score(yt, lg)) if len(np.unique(yt)) == 2 else None
    return {
        "n": len(yt),
        "n_positive": int(yt.sum()),
        "auc": auc,
        "balanced_accuracy": float(np.mean(both)) if both else None,
        "accuracy": float((pred == yt).mean()) if len(yt) else None,
        "sensitivity": None if np.isnan(sens) else float(sens),
        "specificity": None if np.isnan(spec) else float(spec),
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def predict_logits(
    model: Any, images: Any, *, batch_size: int = 8, device: Any = "cpu"
) -> np.ndarray:
    """Positive-class logits of ``model`` (eval mode, no grad) for ``images`` ``(N, C, X, Y, Z)``.

    Returns:
        ``(N,)`` float64 logits (first output column).
    """
    import torch

    from neuroexplain.utils import amp_enabled

    model.eval()
    dev = torch.device(device)
    out = []
    with torch.no_grad(), torch.autocast(dev.type, enabled=amp_enabled(dev)):
        for i in range(0, images.shape[0], batch_size):
            xb = torch.as_tensor(images[i : i + batch_size]).to(dev, torch.float32)
            out.append(model(xb)[:, 0].float().cpu())
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def logit_paths(
    model: Any, images: Any, *, batch_size: int = 8, device: Any = "cpu"
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`predict_logits` and the part of each logit that the model's linear path adds.

    For a network with a :class:`~neuroexplain.classifier.network.LinearPath` (``linear_path``)
    the logit is the CNN path's plus the linear path's; the second is read by a forward hook
    during the same pass (the logits are those of :func:`predict_logits`).

    Returns:
        ``(logits (N,), linear (N,) or None)``: ``None`` for a model without a linear path;
        the CNN path's part is ``logits - linear``.
    """
    import torch

    path = getattr(model, "linear_path", None)
    if path is None:
        return predict_logits(model, images, batch_size=batch_size, device=device), None
    parts: list[torch.Tensor] = []
    hook = path.register_forward_hook(
        lambda _m, _i, out: parts.append(out[:, 0].detach().float().cpu())
    )
    try:
        logits = predict_logits(model, images, batch_size=batch_size, device=device)
    finally:
        hook.remove()
    linear = torch.cat(parts).double().numpy() if parts else np.zeros(0)
    return logits, linear
