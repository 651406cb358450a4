"""Baseline attribution maps of a 3D classifier's logit, via Captum and MONAI (not re-implemented).

Methods (``method`` name -> implementation, reference):

- ``gradient``: Captum ``Saliency`` (signed by default) — Simonyan et al. 2014, arXiv:1312.6034.
- ``gradxinput``: Captum ``InputXGradient`` — Shrikumar et al. 2016, arXiv:1605.01713.
- ``smoothgrad``: Captum ``NoiseTunnel(Saliency)`` — Smilkov et al. 2017, arXiv:1706.03825.
- ``ig``: Captum ``IntegratedGradients`` (zero = background baseline) — Sundararajan et al. 2017,
  arXiv:1703.01365.
- ``gradcam``: MONAI ``GradCAM`` on a named layer, upsampled (trilinear) to the input grid, not
  rescaled — Selvaraju et al. 2017, arXiv:1610.02391.
- ``occlusion``: MONAI ``OcclusionSensitivity``; the map is ``logit(x) - logit(x occluded)``, so
  positive where hiding a region lowers the positive-class logit — Zeiler & Fergus 2014,
  arXiv:1311.2901.

All maps explain the **logit** of output ``target`` (the positive class of a binary network) and
are returned on the model grid, shaped like the input ``(B, C, X, Y, Z)`` (Grad-CAM and occlusion:
``(B, 1, X, Y, Z)``). Use :func:`neuroexplain.attribution.export.write_subject_maps` to write them
in each subject's native space.

Example:
    >>> explainer = BaselineExplainer(model, "ig", n_steps=16)  # doctest: +SKIP
    >>> attr = explainer.attribute(x, target=0)  # (B, 1, 64, 64, 64)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from neuroexplain.settings import SALIENCY_METHODS, SaliencyConfig

__all__ = [
    "DEFAULT_PARAMS",
    "METHODS",
    "BaselineExplainer",
    "attribute_baselines",
]

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = SALIENCY_METHODS

#: default parameters of every method (recorded in the sidecars): those of the default
#: :class:`~neuroexplain.settings.SaliencyConfig` (SmoothGrad noise sd = noise_level * (max - min)
#: of each input volume; occluder as MONAI: "gaussian", "mean_patch", "mean_img" or a number)
DEFAULT_PARAMS: dict[str, dict[str, Any]] = SaliencyConfig().method_params()


class _Logit(nn.Module):
    """Wrap a network so its output is ``(B, n_outputs)`` logits in float32 (no activation)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.reshape(out.shape[0], -1).float()


class BaselineExplainer:
    """Captum-style explainer for the baseline methods: construct with the model, then attribute.

    Args:
        model: network mapping ``(B, C, X, Y, Z)`` to ``(B, K)`` logits (set to eval mode).
        method: one of :data:`METHODS`.
        layer: dotted layer name for ``gradcam`` (e.g. ``"features.3"``), from
            ``model.named_modules()``.
        **params: method parameters overriding :data:`DEFAULT_PARAMS`.

    Example:
        >>> net = build_model("small", spatial_size=(16, 16, 16)).eval()  # doctest: +SKIP
        >>> cam = BaselineExplainer(net, "gradcam", layer="features.2")  # doctest: +SKIP
        >>> cam.attribute(x).shape  # doctest: +SKIP
        torch.Size([1, 1, 16, 16, 16])
    """

    def __init__(
        self, model: nn.Module, method: str, *, layer: str | None = None, **params: Any
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown attribution method {method!r}; expected one of {METHODS}")
        unknown = sorted(set(params) - set(DEFAULT_PARAMS[method]))
        if unknown:
            raise ValueError(
                f"unknown parameters {unknown} for {method!r}; "
                f"expected {sorted(DEFAULT_PARAMS[method])}"
            )
        self.model = model.eval()
        self.method = method
        self.params: dict[str, Any] = {**DEFAULT_PARAMS[method], **params}
        if method == "gradcam":
            layer = layer or self.params.get("layer")
            if not layer:
                raise ValueError("gradcam needs a layer name, e.g. layer='features.3'")
            names = {n for n, _ in model.named_modules() if n}
            if layer not in names:
                top = sorted(n for n in names if n.count(".") <= 1)[:20]
                raise ValueError(f"no layer named {layer!r} in the model; layers include {top}")
            self.params["layer"] = layer

    # ------------------------------------------------------------------------------- methods

    def attribute(self, inputs: torch.Tensor, target: int = 0) -> torch.Tensor:
        """Attribution of logit ``target`` for each input volume.

        Args:
            inputs: ``(B, C, X, Y, Z)`` images on the model grid (same device as the model).
            target: output index (0 = the positive-class logit of a binary network).

        Returns:
            ``(B, C, X, Y, Z)`` attributions (``(B, 1, X, Y, Z)`` for Grad-CAM and occlusion),
            float32, detached, on the input's device.
        """
        if inputs.ndim != 5:
            raise ValueError(f"expected inputs of shape (B, C, X, Y, Z), got {tuple(inputs.shape)}")
        x = inputs.detach().float()
        fn = getattr(self, f"_{self.method}")
        return fn(x, int(target)).detach().float()

    def _forward(self) -> nn.Module:
        return _Logit(self.model).eval()

    def _gradient(self, x: torch.Tensor, target: int) -> torch.Tensor:
        from captum.attr import Saliency

        return Saliency(self._forward()).attribute(
            x.clone().requires_grad_(True), target=target, abs=bool(self.params["abs"])
        )

    def _gradxinput(self, x: torch.Tensor, target: int) -> torch.Tensor:
        from captum.attr import InputXGradient

        return InputXGradient(self._forward()).attribute(
            x.clone().requires_grad_(True), target=target
        )

    def _smoothgrad(self, x: torch.Tensor, target: int) -> torch.Tensor:
        from captum.attr import NoiseTunnel, Saliency

        p = self.params
        nt = NoiseTunnel(Saliency(self._forward()))
        outs = []
        # seeded noise, without disturbing the caller's global RNG state
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(int(p["seed"]))
            for xi in x.split(1):
                sd = float(p["noise_level"]) * float(xi.max() - xi.min())
                outs.append(
                    nt.attribute(
                        xi.clone().requires_grad_(True),
                        nt_type="smoothgrad",
                        nt_samples=int(p["nt_samples"]),
                        nt_samples_batch_size=int(p["batch_size"]),
                        stdevs=max(sd, 1e-8),
                        target=target,
                        abs=False,
                    )
                )
        return torch.cat(outs)

    def _ig(self, x: torch.Tensor, target: int) -> torch.Tensor:
        from captum.attr import IntegratedGradients

        p = self.params
        return IntegratedGradients(self._forward()).attribute(
            x.clone().requires_grad_(True),
            baselines=float(p["baseline"]),
            target=target,
            n_steps=int(p["n_steps"]),
            internal_batch_size=int(p["batch_size"]),
        )

    def _gradcam(self, x: torch.Tensor, target: int) -> torch.Tensor:
        from monai.visualize import GradCAM

        # MONAI registers hooks on the module it is given: work on a copy so the caller's
        # model stays hook-free
        net = copy.deepcopy(self.model).eval()
        cam = GradCAM(nn_module=net, target_layers=self.params["layer"], postprocessing=_identity)
        try:
            with torch.enable_grad():
                out = cam(x.clone(), class_idx=target)
            return torch.as_tensor(out).detach().float()
        finally:
            # MONAI keeps the layer's activations, gradients and score, whose autograd graph
            # holds its hooks, which hold it: a cycle through the graph that Python's garbage
            # collector cannot see, leaking the model copy and the graph on every call
            hooked = cam.nn_module
            hooked.activations.clear()
            hooked.gradients.clear()
            hooked.score = None

    def _occlusion(self, x: torch.Tensor, target: int) -> torch.Tensor:
        from monai.visualize import OcclusionSensitivity

        p = self.params
        mode = p["mode"]
        if not isinstance(mode, str):
            mode = float(mode)
        mask = [min(int(p["mask_size"]), s) for s in x.shape[2:]]
        occ = OcclusionSensitivity(
            self._forward(),
            mask_size=mask,
            n_batch=int(p["batch_size"]),
            verbose=False,
            mode=mode,
            overlap=float(p["overlap"]),
            activate=False,
        )
        outs = []
        fwd = self._forward()
        with torch.no_grad(), warnings.catch_warnings():
            # MONAI 1.6 indexes with lists, which torch >= 2.9 warns about once per patch
            warnings.filterwarnings(
                "ignore", message="Using a non-tuple sequence", category=UserWarning
            )
            for xi in x.split(1):
                base = fwd(xi)[0, target]
                occ_map, _ = occ(
                    xi
                )  # (1, K, X, Y, Z): logits with the patch around each voxel hidden
                occ_t = torch.as_tensor(occ_map).as_subclass(torch.Tensor)
                outs.append(base - occ_t[:, target : target + 1])
        return torch.cat(outs).float()


def _identity(x: Any) -> Any:
    return x


def attribute_baselines(
    model: nn.Module,
    inputs: torch.Tensor,
    methods: Iterable[str] = METHODS,
    *,
    target: int = 0,
    layer: str | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, torch.Tensor]:
    """Run several baseline methods on the same inputs.

    Args:
        model: the classifier.
        inputs: ``(B, C, X, Y, Z)`` model-grid images.
        methods: names from :data:`METHODS`.
        target: logit index to explain.
        layer: Grad-CAM layer name.
        params: per-method parameter overrides, ``{"ig": {"n_steps": 32}}``.

    Returns:
        ``{method: (B, C', X, Y, Z) attribution}`` on the model grid.
    """
    params = params or {}
    out = {}
    for m in methods:
        p = dict(params.get(m, {}))
        lay = (p.pop("layer", None) or layer) if m == "gradcam" else None
        explainer = BaselineExplainer(model, m, layer=lay, **p)
        out[m] = explainer.attribute(inputs, target=target)
    return out
