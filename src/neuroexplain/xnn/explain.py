"""XNN explanations: explanation features of an SRAE, mapped back onto the input volume.

Qi, Khorram & Li 2017, "Embedding Deep Networks into Visual Explanations" (arXiv:1709.05360).
Each explanation feature ``x_i`` of an :class:`~neuroexplain.xnn.srae.SRAE` trained on a named
layer of a 3D classifier enters the prediction as the contribution ``c_i = w_i x_i``. Its
**visualisation** is an attribution map of ``c_i`` over the input volume, computed through the
classifier up to the layer and the SRAE encoder (Captum Integrated Gradients or
gradient x input), so the maps of the features that carry a subject's prediction show where
in the brain that evidence comes from.

Also here: the layer / pooling plumbing (:class:`LayerFeatures`), activation extraction, and
the metrics of an explanation space (faithfulness R² / RMSE / decision agreement, reconstruction
error, orthogonality, sparsity).

Example:
    >>> explainer = XNNExplainer(model, srae, layer="classifier.2")  # doctest: +SKIP
    >>> maps = explainer.attribute(x, target=0)  # feature 0: (B, 1, X, Y, Z)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from neuroexplain.concepts3d.activations import LayerHooks, get_module
from neuroexplain.settings import XNN_METHODS, XNN_POOLING
from neuroexplain.xnn.srae import SRAE, r2_score, significant_features, sparse_reconstruction_loss

__all__ = [
    "ATTRIBUTION_METHODS",
    "POOLING",
    "LayerFeatures",
    "XNNExplainer",
    "XNNFeatureModel",
    "default_layer",
    "explanation_metrics",
    "extract_activations",
    "feature_names",
]

logger = logging.getLogger(__name__)

POOLING = XNN_POOLING
ATTRIBUTION_METHODS = XNN_METHODS


def default_layer(model: nn.Module) -> str:
    """The layer whose output feeds the network's last ``nn.Linear`` (the penultimate dense
    layer's activations, e.g. ``"classifier.2"`` of the small CNN).

    Raises:
        ValueError: no ``nn.Linear`` in the model, or nothing registered before it.
    """
    names = [
        n
        for n, m in model.named_modules()
        # the linear path of a reference-fallback model reads the input, not a layer
        if isinstance(m, nn.Linear) and not n.startswith("linear_path")
    ]
    if getattr(model, "linear_path", None) is not None:
        logger.warning(
            "the classifier has a linear path on its input (classifier.reference_fallback or "
            "reference_ensemble): the "
            "part of the logit it carries is not in any layer's activations, so the explanation "
            "features can only be as faithful as the CNN path is to the logit (see R^2)"
        )
    if not names:
        raise ValueError("the model has no nn.Linear layer; give the layer explicitly")
    last = names[-1]
    parent_name, _, child = last.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    children = [n for n, _ in parent.named_children()]
    pos = children.index(child)
    if pos == 0:
        raise ValueError(f"nothing precedes {last!r} in its container; give the layer explicitly")
    prev = children[pos - 1]
    return f"{parent_name}.{prev}" if parent_name else prev


class LayerFeatures(nn.Module):
    """A classifier truncated to one named layer, as a vector per volume.

    Runs the whole network with a forward hook (so any architecture works) and returns the
    hooked layer's output, pooled and flattened, keeping the autograd graph.

    Args:
        model: the classifier.
        layer: dotted layer name.
        pool: ``"none"`` (the output must already be ``(B, D)``, e.g. a dense layer),
            ``"avg"`` / ``"max"`` (global pooling of ``(B, C, X, Y, Z)`` to ``(B, C)``),
            ``"flatten"`` (``(B, C * X * Y * Z)``) or ``"auto"`` (``none`` for 2D outputs, else
            ``avg``).

    Shapes:
        ``forward(x (B, C, X, Y, Z))`` -> ``(B, D)``.
    """

    def __init__(self, model: nn.Module, layer: str, pool: str = "auto") -> None:
        super().__init__()
        if pool not in POOLING:
            raise ValueError(f"unknown pooling {pool!r}; expected one of {POOLING}")
        get_module(model, layer)
        self.model = model
        self.layer = layer
        self.pool = pool

    def reduce(self, a: torch.Tensor) -> torch.Tensor:
        """Pool a layer output to ``(B, D)``."""
        pool = self.pool
        if pool == "auto":
            pool = "none" if a.ndim == 2 else "avg"
        if pool == "none":
            if a.ndim != 2:
                raise ValueError(
                    f"layer {self.layer!r} gives {tuple(a.shape)}; choose a pooling "
                    "(avg, max or flatten) for a spatial layer"
                )
            return a
        if pool == "flatten":
            return a.reshape(a.shape[0], -1)
        dims = tuple(range(2, a.ndim))
        if not dims:
            return a
        return a.mean(dims) if pool == "avg" else a.amax(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with LayerHooks(self.model, [self.layer], keep_graph=True) as hooks:
            self.model(x)
        return self.reduce(hooks.outputs[self.layer]).float()


class XNNFeatureModel(nn.Module):
    """Input volume -> SRAE feature contributions ``w_i x_i`` ``(B, k)`` (for Captum)."""

    def __init__(self, features: LayerFeatures, srae: SRAE, *, weighted: bool = True) -> None:
        super().__init__()
        self.features = features
        self.srae = srae
        self.weighted = weighted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        return self.srae.contributions(a) if self.weighted else self.srae.features(a)


def extract_activations(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    *,
    pool: str = "auto",
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool | None = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled activations of ``layer`` and the logits for ``images`` ``(N, C, X, Y, Z)``.

    Returns:
        ``(acts (N, D), logits (N,))`` float32 on the CPU (logit = output column 0).
    """
    from tqdm.auto import tqdm

    model.eval()
    feats = LayerFeatures(model, layer, pool)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    acts, logits = [], []
    with torch.no_grad(), LayerHooks(model, [layer]) as hooks:
        for i in tqdm(
            range(0, images.shape[0], batch_size),
            desc="activations",
            unit="batch",
            disable=None if progress is None else not progress,
            leave=False,
        ):
            out = model(images[i : i + batch_size].to(dev, torch.float32))
            acts.append(feats.reduce(hooks.outputs[layer]).float().cpu())
            logits.append(out.reshape(out.shape[0], -1)[:, 0].float().cpu())
    return torch.cat(acts), torch.cat(logits)


class XNNExplainer:
    """Captum-style attribution of SRAE explanation features to the input volume.

    Args:
        model: the classifier.
        srae: a trained SRAE on ``layer``.
        layer: dotted layer name the SRAE was trained on.
        pool: pooling used when training (see :class:`LayerFeatures`).
        method: ``"ig"`` (Captum ``IntegratedGradients``, zero baseline) or ``"gradxinput"``
            (Captum ``InputXGradient``).
        n_steps: IG steps.
        internal_batch_size: IG batch size.
        weighted: attribute ``w_i x_i`` (signed logit contribution; default) or ``x_i``.
    """

    def __init__(
        self,
        model: nn.Module,
        srae: SRAE,
        *,
        layer: str,
        pool: str = "auto",
        method: str = "gradxinput",
        n_steps: int = 16,
        internal_batch_size: int = 8,
        weighted: bool = True,
    ) -> None:
        if method not in ATTRIBUTION_METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {ATTRIBUTION_METHODS}")
        self.model = model.eval()
        self.srae = srae.eval()
        self.forward_model = XNNFeatureModel(
            LayerFeatures(model, layer, pool), srae, weighted=weighted
        ).eval()
        self.method = method
        self.n_steps = int(n_steps)
        self.internal_batch_size = int(internal_batch_size)

    def attribute(self, inputs: torch.Tensor, target: int = 0) -> torch.Tensor:
        """Attribution of explanation feature ``target`` for each input volume.

        Args:
            inputs: ``(B, C, X, Y, Z)`` volumes.
            target: feature index ``0 .. k-1``.

        Returns:
            ``(B, C, X, Y, Z)`` float32 attributions, detached.
        """
        from captum.attr import InputXGradient, IntegratedGradients

        if inputs.ndim != 5:
            raise ValueError(f"expected inputs (B, C, X, Y, Z), got {tuple(inputs.shape)}")
        if not 0 <= int(target) < self.srae.n_features:
            raise ValueError(f"feature index {target} out of range 0..{self.srae.n_features - 1}")
        x = inputs.detach().float().clone().requires_grad_(True)
        if self.method == "ig":
            attr = IntegratedGradients(self.forward_model).attribute(
                x,
                baselines=0.0,
                target=int(target),
                n_steps=self.n_steps,
                internal_batch_size=self.internal_batch_size,
            )
        else:
            attr = InputXGradient(self.forward_model).attribute(x, target=int(target))
        return attr.detach().float()

    def attribute_all(self, inputs: torch.Tensor) -> torch.Tensor:
        """Maps of every feature: ``(B, C, X, Y, Z)`` -> ``(B, k, X, Y, Z)`` (channel 0 of C)."""
        return torch.stack(
            [self.attribute(inputs, i)[:, 0] for i in range(self.srae.n_features)], dim=1
        )


def explanation_metrics(
    srae: SRAE, acts: torch.Tensor, logits: torch.Tensor, *, coverage: float = 0.9, q: float = 1.0
) -> dict[str, Any]:
    """Metrics of an explanation space on a set of samples.

    Args:
        srae: the trained SRAE.
        acts: ``(N, D)`` raw activations.
        logits: ``(N,)`` classifier logits.
        coverage: coverage of :func:`~neuroexplain.xnn.srae.significant_features`.
        q: sensitivity of the sparse reconstruction loss reported.

    Returns:
        ``{"n", "r2", "rmse", "decision_agreement", "reconstruction_mse",
        "reconstruction_sparse_loss", "orthogonality" (mean |cos| between weighted features,
        off-diagonal), "sparsity" (mean number of significant features), "feature_usage"
        (fraction of samples per feature), "mean_contribution" (per feature)}``.
    """
    with torch.no_grad():
        x, y_hat, a_hat = srae(acts.float())
        a = srae.standardize(acts)
        contrib = (x * srae.weights).numpy()
    yh = y_hat.numpy().astype(np.float64)
    yt = logits.numpy().astype(np.float64)
    sig = significant_features(contrib, coverage)
    z = contrib
    norms = np.linalg.norm(z, axis=0)
    k = z.shape[1]
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            if norms[i] > 0 and norms[j] > 0:
                cos.append(abs(float(z[:, i] @ z[:, j]) / (norms[i] * norms[j])))
            else:
                cos.append(0.0)
    return {
        "n": len(yt),
        "r2": r2_score(yt, yh),
        "rmse": float(np.sqrt(np.mean((yt - yh) ** 2))) if len(yt) else float("nan"),
        "decision_agreement": float(np.mean((yt > 0) == (yh > 0))) if len(yt) else float("nan"),
        "reconstruction_mse": float(((a - a_hat) ** 2).mean()),
        "reconstruction_sparse_loss": float(sparse_reconstruction_loss(a, a_hat, q)),
        "orthogonality": float(np.mean(cos)) if cos else 0.0,
        "sparsity": float(sig.sum(1).mean()) if len(sig) else float("nan"),
        "feature_usage": sig.mean(0).tolist(),
        "mean_contribution": contrib.mean(0).tolist(),
    }


def feature_names(k: int) -> list[str]:
    """BIDS ``desc`` values of the feature maps: ``xnnfeature1`` .. ``xnnfeature<k>``."""
    return [f"xnnfeature{i + 1}" for i in range(k)]
