"""Layer activations and their gradients, addressed by dotted layer names.

Layers are named as in ``model.named_modules()`` (``"features.3"``, ``"classifier.0"``), the
convention of MONAI's ``GradCAM(nn_module, target_layers="features.3")`` and Captum's layer
methods. Forward hooks capture a layer's **output**; extraction is batched, runs in eval mode and
returns CPU float32 tensors, so the concept methods (TCAV, SACV, XNN) can work on whole cohorts
of 3D volumes without keeping the network's graph around.

Example:
    >>> net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.ReLU())
    >>> acts = layer_activations(net, torch.zeros(3, 1, 8, 8, 8), ["1"])
    >>> tuple(acts["1"].shape)
    (3, 4, 6, 6, 6)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "LayerHooks",
    "get_module",
    "layer_activations",
    "layer_gradients",
    "logit_fn",
    "resolve_layers",
]

logger = logging.getLogger(__name__)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule of ``model`` called ``name`` in ``model.named_modules()``.

    Raises:
        ValueError: no such layer; the message lists the valid top-level names.
    """
    modules = dict(model.named_modules())
    if not name or name not in modules:
        names = [n for n in modules if n]
        top = [n for n in names if n.count(".") <= 1][:30]
        raise ValueError(f"no layer named {name!r} in the model; layers include {top}")
    return modules[name]


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """Check layer names (a comma-separated string or a sequence); return them as a list."""
    names = [s.strip() for s in layers.split(",")] if isinstance(layers, str) else list(layers)
    names = [n for n in names if n]
    if not names:
        raise ValueError("expected at least one layer name")
    for n in names:
        get_module(model, n)
    return names


class LayerHooks:
    """Context manager capturing the outputs of named layers during forward passes.

    Args:
        model: the network.
        layers: dotted layer names.
        keep_graph: keep the captured tensors attached to the autograd graph (for gradients with
            respect to them); otherwise they are detached.
        leaf: replace each layer's output by a detached copy that requires gradients (a leaf of
            the graph, captured as well): gradients with respect to it are the same as with
            ``keep_graph``, but when neither the inputs nor the parameters before the layer
            require gradients, nothing before the layer is kept for a backward pass.

    Attributes:
        outputs: ``{layer: tensor}`` from the most recent forward pass.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
        >>> with LayerHooks(net, ["0"]) as hooks:
        ...     _ = net(torch.ones(1, 3))
        >>> tuple(hooks.outputs["0"].shape)
        (1, 2)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        *,
        keep_graph: bool = False,
        leaf: bool = False,
    ) -> None:
        self.model = model
        self.layers = list(layers)
        self.keep_graph = keep_graph
        self.leaf = leaf
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable[..., Any]:
        def fn(_module: nn.Module, _inp: Any, out: Any) -> Any:
            first = out[0] if isinstance(out, tuple | list) else out
            if self.leaf:
                leaf = first.detach().requires_grad_(True)
                self.outputs[name] = leaf
                if isinstance(out, tuple | list):
                    return type(out)([leaf, *out[1:]])
                return leaf
            self.outputs[name] = first if self.keep_graph else first.detach()
            return None

        return fn

    def __enter__(self) -> LayerHooks:
        for name in self.layers:
            self._handles.append(
                get_module(self.model, name).register_forward_hook(self._hook(name))
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _batches(inputs: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, inputs.shape[0], batch_size):
        yield inputs[i : i + batch_size]


def _progress(total: int, desc: str, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="vol", disable=True if enabled is False else None, leave=False
    )


def layer_activations(
    model: nn.Module,
    inputs: torch.Tensor,
    layers: str | Sequence[str],
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool | None = False,
) -> dict[str, torch.Tensor]:
    """Outputs of named layers for a set of inputs, in batches, without gradients.

    Args:
        model: network mapping ``(B, C, X, Y, Z)`` volumes to logits; put in eval mode.
        inputs: ``(N, C, X, Y, Z)`` volumes (any device; moved batch by batch).
        layers: dotted layer names (or one comma-separated string).
        batch_size: volumes per forward pass.
        device: where to run; default the model's device.
        progress: show a progress bar (``None``: on a terminal only).

    Returns:
        ``{layer: (N, *layer_output_shape)}`` float32 CPU tensors, e.g. ``(N, C', X', Y', Z')``
        for a convolution block or ``(N, D)`` for a dense layer.
    """
    names = resolve_layers(model, layers)
    model.eval()
    dev = torch.device(device) if device is not None else _model_device(model)
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    bar = _progress(int(inputs.shape[0]), "activations", progress)
    with torch.no_grad(), LayerHooks(model, names) as hooks:
        for xb in _batches(inputs, batch_size):
            model(xb.to(dev, torch.float32))
            for n in names:
                chunks[n].append(hooks.outputs[n].float().cpu())
            bar.update(int(xb.shape[0]))
    bar.close()
    return {n: torch.cat(c) if c else torch.zeros(0) for n, c in chunks.items()}


def logit_fn(target: int = 0, sign: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """``out -> sign * out[:, target]``: the scalar per volume whose gradient is explained.

    ``sign = -1`` explains the negative class of a binary (single-logit) network.
    """

    def fn(out: torch.Tensor) -> torch.Tensor:
        return float(sign) * out.reshape(out.shape[0], -1)[:, int(target)].float()

    return fn


def layer_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    *,
    target: int = 0,
    sign: float = 1.0,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool | None = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations of a layer and the gradient of a class logit with respect to them.

    The gradient is ``d (sign * logit_target) / d a`` for each volume separately (the network is
    in eval mode, so volumes in a batch do not interact and the gradient of the batch sum is the
    per-volume gradient).

    Args:
        model: network mapping ``(B, C, X, Y, Z)`` to ``(B, K)`` logits.
        inputs: ``(N, C, X, Y, Z)`` volumes.
        layer: dotted layer name.
        target: logit index (0 = positive-class logit of a binary network).
        sign: ``+1`` for the class of that logit, ``-1`` for the other class of a binary net.
        batch_size: volumes per pass.
        device: where to run; default the model's device.
        progress: show a progress bar.

    Returns:
        ``(activations, gradients, logits)``: activations and gradients shaped like the layer
        output ``(N, *layer_shape)`` and the explained logits ``(N,)`` (times ``sign``), float32
        on the CPU.
    """
    get_module(model, layer)
    model.eval()
    dev = torch.device(device) if device is not None else _model_device(model)
    f = logit_fn(target, sign)
    acts, grads, logits = [], [], []
    bar = _progress(int(inputs.shape[0]), "gradients", progress)
    # the graph starts at the layer (a leaf there, no parameter gradients): the layers before
    # it keep nothing for backward, so a batch costs its activations after the layer, not the
    # whole network's (several 100 MB per batch of 3D volumes); the gradient is the same
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.enable_grad(), LayerHooks(model, [layer], leaf=True) as hooks:
            for xb in _batches(inputs, batch_size):
                out = f(model(xb.to(dev, torch.float32)))
                a = hooks.outputs[layer]
                (g,) = torch.autograd.grad(out.sum(), a)
                acts.append(a.detach().float().cpu())
                grads.append(g.detach().float().cpu())
                logits.append(out.detach().float().cpu())
                bar.update(int(xb.shape[0]))
    finally:
        for p in trainable:
            p.requires_grad_(True)
    bar.close()
    if not acts:
        empty = torch.zeros(0)
        return empty, empty, empty
    return torch.cat(acts), torch.cat(grads), torch.cat(logits)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
