"""3D CNN classifiers of brain MRI, built from MONAI blocks and addressable by dotted layer names.

The default network (``"small"``) is the small classifier of the simulator-network experiments:
four blocks of ``conv 3x3x3 -> BatchNorm -> ReLU -> max-pool 2``, with 16 / 32 / 64 / 16
channels, then a dense head ``flatten (1024 for a 64³ input) -> 64 -> ReLU -> n logits``.
Larger MONAI networks are available by name (``"densenet121"``, ``"resnet18"``).

Layer names are stable and short so explainers (Grad-CAM, SACV, XNN) can address them:
``features.0`` ... ``features.3`` (each block; ``features.k.conv``, ``features.k.adn``,
``features.k.pool`` inside), ``classifier.0`` (first dense layer), ``classifier.1`` (ReLU),
``classifier.2`` (dropout), ``classifier.3`` (logit layer).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import ADN
from monai.networks.layers import Conv, Pool
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "InputStandardize",
    "SmallCNN3D",
    "build_model",
    "default_target_layer",
    "get_layer",
    "layer_names",
    "load_classifier",
    "save_classifier",
]


class SmallCNN3D(nn.Module):
    """Small 3D CNN: 4 x (conv 3³ -> BatchNorm -> ReLU -> max-pool 2) then a dense head.

    Args:
        spatial_size: input volume shape ``(X, Y, Z)``; sets the flatten size of the head
            (``channels[-1] * prod(s // 2**n_blocks)``, 1024 for 64³ with the default channels).
        in_channels: image channels ``C``.
        out_channels: number of logits (1 for a binary task).
        channels: output channels of the convolution blocks.
        hidden: widths of the hidden dense layers.
        dropout: dropout probability before the logit layer.
        norm: MONAI norm name or ``(name, kwargs)`` for the ADN block.
        act: MONAI activation name or ``(name, kwargs)`` for the ADN block.
        linear_pool: when nonzero, add a :class:`LinearPath` ``linear_path`` on the input
            pooled by this factor, its logit added to the CNN's.
        linear_reference: build that path in its exact linear-reference mode.

    Shapes:
        ``forward(x)``: ``(B, C, X, Y, Z) -> (B, out_channels)`` logits.

    Example:
        >>> net = SmallCNN3D(spatial_size=(32, 32, 32))
        >>> net(torch.zeros(2, 1, 32, 32, 32)).shape
        torch.Size([2, 1])

    Reference:
        The small classifier of the simulator-network experiments (4 conv blocks, 16/32/64/16
        channels, dense 1024 -> 64 -> 1 for a 64³ input).
    """

    def __init__(
        self,
        spatial_size: Sequence[int] = (64, 64, 64),
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 16),
        hidden: Sequence[int] = (64,),
        dropout: float = 0.0,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        linear_pool: int = 0,
        linear_reference: bool = False,
    ) -> None:
        super().__init__()
        spatial = tuple(int(s) for s in spatial_size)
        if len(spatial) != 3:
            raise ValueError(f"expected a 3D spatial_size, got {spatial_size}")
        n_blocks = len(channels)
        out_spatial = list(spatial)
        for _ in range(n_blocks):
            out_spatial = [s // 2 for s in out_spatial]
        if min(out_spatial) < 1:
            raise ValueError(
                f"input shape {spatial} is too small for {n_blocks} pooling blocks "
                f"(needs at least {2**n_blocks} voxels per axis)"
            )
        self.spatial_size = spatial
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)

        conv_type: Callable = Conv[Conv.CONV, 3]
        pool_type: Callable = Pool[Pool.MAX, 3]
        blocks: list[nn.Module] = []
        c_in = in_channels
        for c_out in channels:
            blocks.append(
                nn.Sequential(
                    OrderedDict(
                        conv=conv_type(c_in, c_out, kernel_size=3, padding=1),
                        adn=ADN(ordering="NA", in_channels=c_out, norm=norm, act=act, norm_dim=3),
                        pool=pool_type(kernel_size=2, stride=2),
                    )
                )
            )
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.flatten_size = int(channels[-1] * out_spatial[0] * out_spatial[1] * out_spatial[2])

        head: list[nn.Module] = []
        width = self.flatten_size
        for h in hidden:
            head += [nn.Linear(width, h), nn.ReLU()]
            width = h
        head += [nn.Dropout(dropout), nn.Linear(width, out_channels)]
        self.classifier = nn.Sequential(*head)
        self.linear_path = (
            LinearPath(
                spatial, in_channels, out_channels, pool=linear_pool, reference=linear_reference
            )
            if linear_pool
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` images -> ``(B, out_channels)`` logits."""
        if tuple(x.shape[2:]) != self.spatial_size:
            raise ValueError(
                f"expected input of spatial shape {self.spatial_size}, got {tuple(x.shape[2:])}"
            )
        out = self.classifier(torch.flatten(self.features(x), 1))
        if self.linear_path is not None:
            out = out + self.linear_path(x)
        return out


class LinearPath(nn.Module):
    """A logistic-regression term on the input: ``Linear(flatten(avg_pool(x, pool)))``.

    Added to a CNN's logit (a "wide and deep" model), it lets the classifier use a voxel-wise
    linear signal from the first step, at the resolution of ``pool``-voxel blocks, while the
    convolutional path learns; zero-initialised, so it starts as no change.

    With ``reference=True`` it is exactly the model class of the linear reference
    (:func:`neuroexplain.evaluate.quality.fit_linear_reference`), so that
    :meth:`set_reference` can make it that fitted model: the input ``x_n`` (the model's
    standardised input) is taken back to image units, ``x = x_n / input_scale + input_mean``
    (the inverse of :class:`InputStandardize`; identity buffers when the model does not
    standardise), average-pooled by ``pool`` (``avg_pool3d`` drops a trailing remainder, as the
    reference does), standardised per feature by ``(f - feature_mean) / feature_sd``, features
    outside ``keep`` set to 0, then the linear layer. All differentiable, so gradients with
    respect to the image flow as through the CNN.

    Args:
        spatial_size: ``(X, Y, Z)`` of the input.
        in_channels: image channels ``C``.
        out_channels: logits.
        pool: average-pooling factor per axis.
        reference: the exact-reference mode above (buffers ``input_mean``, ``input_scale``
            ``(1, C, X, Y, Z)``; ``feature_mean``, ``feature_sd``, ``keep`` ``(1, n)``); saved
            in a checkpoint's ``model_kwargs`` as ``linear_reference``. Without it (checkpoints
            written before it existed) the path reads ``x_n`` directly.

    Shapes:
        ``forward(x)``: ``(B, C, X, Y, Z) -> (B, out_channels)``.
    """

    def __init__(
        self,
        spatial_size: Sequence[int],
        in_channels: int,
        out_channels: int,
        *,
        pool: int = 2,
        reference: bool = False,
    ) -> None:
        super().__init__()
        if pool < 1:
            raise ValueError(f"expected pool >= 1, got {pool}")
        self.pool = int(pool)
        self.reference = bool(reference)
        n = int(in_channels) * int(np.prod([int(s) // self.pool for s in spatial_size]))
        self.linear = nn.Linear(n, out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        # a sum over ~1e4-1e5 standardised voxels: scaled by 1 / sqrt(n) so that an optimiser
        # step of the CNN's size moves the logit by O(1), not O(sqrt(n))
        self.scale = float(n) ** -0.5
        if self.reference:
            shape = (1, int(in_channels), *(int(s) for s in spatial_size))
            self.register_buffer("input_mean", torch.zeros(shape))
            self.register_buffer("input_scale", torch.ones(shape))
            self.register_buffer("feature_mean", torch.zeros(1, n))
            self.register_buffer("feature_sd", torch.ones(1, n))
            self.register_buffer("keep", torch.ones(1, n))

    @torch.no_grad()
    def set_reference(self, ref: Any, input_norm: InputStandardize | None = None) -> LinearPath:
        """Make the path the fitted linear reference ``ref`` (a ``LinearReferenceModel``).

        ``input_norm`` is the model's input standardisation (its buffers are copied, so the path
        undoes it); ``None`` when the model feeds raw images. Requires ``reference=True`` and the
        reference's pooling factor.
        """
        if not self.reference:
            raise ValueError("set_reference needs a LinearPath built with reference=True")
        if self.linear.out_features != 1:
            raise ValueError(f"expected one logit, got {self.linear.out_features}")
        if int(ref.pool) != self.pool or len(ref.keep) != self.linear.in_features:
            raise ValueError(
                f"expected a reference pooled by {self.pool} with {self.linear.in_features} "
                f"features, got pool {ref.pool} with {len(ref.keep)}"
            )
        if input_norm is not None:
            self.input_mean.copy_(input_norm.mean)
            self.input_scale.copy_(input_norm.scale)
        else:
            self.input_mean.zero_()
            self.input_scale.fill_(1.0)

        def row(a: Any) -> torch.Tensor:
            return torch.as_tensor(np.asarray(a, dtype=np.float64)).reshape(1, -1)

        self.feature_mean.copy_(row(ref.mean))
        self.feature_sd.copy_(row(ref.sd))
        self.keep.copy_(row(ref.keep))
        self.linear.weight.copy_(row(ref.coef) / self.scale)
        self.linear.bias.fill_(float(ref.intercept) / self.scale)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference:
            x = x / self.input_scale + self.input_mean
        if self.pool > 1:
            x = F.avg_pool3d(x, self.pool)
        x = x.reshape(x.shape[0], -1)
        if self.reference:
            x = (x - self.feature_mean) / self.feature_sd * self.keep
        return self.linear(x) * self.scale


class InputStandardize(nn.Module):
    """Voxel-wise standardisation ``(x - mean) * scale`` with fixed buffers (set from data).

    Part of the model so that every consumer of a checkpoint (saliency, simulator, concept
    methods) feeds the same preprocessed images and explains the same function; gradients
    are with respect to the un-standardised image.

    Args:
        in_channels: image channels ``C``.
        spatial_size: ``(X, Y, Z)``.

    Shapes:
        ``forward(x)``: ``(B, C, X, Y, Z) -> (B, C, X, Y, Z)``.
    """

    def __init__(self, in_channels: int, spatial_size: Sequence[int]) -> None:
        super().__init__()
        shape = (1, int(in_channels), *(int(s) for s in spatial_size))
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("scale", torch.ones(shape))

    @torch.no_grad()
    def fit(self, images: torch.Tensor, eps: float = 0.05) -> InputStandardize:
        """Set ``mean`` and ``scale = 1 / (sd + eps)`` from ``images`` ``(N, C, X, Y, Z)``.

        ``eps`` (image units) keeps near-constant voxels (background) from being amplified.
        """
        x = images.double()
        self.mean.copy_(x.mean(0, keepdim=True).to(self.mean.dtype))
        sd = x.std(0, keepdim=True) if x.shape[0] > 1 else torch.zeros_like(x[:1])
        self.scale.copy_((1.0 / (sd + float(eps))).to(self.scale.dtype))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.scale


def _standardize_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a model with ``input_norm``: standardise the input first."""
    return (module.input_norm(args[0]), *args[1:])


def _small(
    spatial_size: Sequence[int], in_channels: int, out_channels: int, **kw: Any
) -> nn.Module:
    return SmallCNN3D(spatial_size, in_channels=in_channels, out_channels=out_channels, **kw)


def _densenet121(
    spatial_size: Sequence[int], in_channels: int, out_channels: int, **kw: Any
) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **kw)


def _resnet18(
    spatial_size: Sequence[int], in_channels: int, out_channels: int, **kw: Any
) -> nn.Module:
    from monai.networks.nets import resnet18

    return resnet18(spatial_dims=3, n_input_channels=in_channels, num_classes=out_channels, **kw)


#: name -> (builder, default Grad-CAM / concept layer)
ARCHITECTURES: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "small": (_small, "features.3"),
    "densenet121": (_densenet121, "features.denseblock4"),
    "resnet18": (_resnet18, "layer4"),
}


def build_model(
    arch: str = "small",
    *,
    spatial_size: Sequence[int] = (64, 64, 64),
    in_channels: int = 1,
    out_channels: int = 1,
    standardize: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a 3D classifier by name.

    The 5-D weights are stored channels-last (``torch.channels_last_3d``), which makes the
    convolutions and their gradients on CPU about 1.5x faster; activations are then
    channels-last too (use ``reshape`` / ``flatten`` on them, not ``view``).

    Args:
        arch: ``"small"`` (:class:`SmallCNN3D`), ``"densenet121"`` (MONAI ``DenseNet121``) or
            ``"resnet18"`` (MONAI ``resnet18``), all with ``spatial_dims=3``.
        spatial_size: input shape ``(X, Y, Z)`` (sets the head size of ``"small"``).
        in_channels: image channels.
        out_channels: logits (1 = binary, positive-class logit).
        standardize: add an :class:`InputStandardize` submodule ``input_norm`` (identity until
            fitted or loaded) applied to the input by a forward pre-hook; layer names of the
            network are unchanged.
        **kwargs: passed to the network constructor (e.g. ``channels``, ``dropout``).

    Returns:
        The network, mapping ``(B, in_channels, X, Y, Z)`` to ``(B, out_channels)`` logits.

    Raises:
        ValueError: an unknown ``arch``.

    Example:
        >>> build_model("small", spatial_size=(32, 32, 32)).flatten_size
        128
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    builder, _ = ARCHITECTURES[arch]
    net = builder(tuple(spatial_size), int(in_channels), int(out_channels), **kwargs)
    if standardize:
        net.add_module("input_norm", InputStandardize(in_channels, spatial_size))
        net.register_forward_pre_hook(_standardize_input)
    # channels-last (NDHWC) weights: the oneDNN CPU convolutions then run channels-last, ~1.5x
    # faster for these small-channel 3D networks; a model's function does not change
    return net.to(memory_format=torch.channels_last_3d)


def default_target_layer(arch: str) -> str:
    """The default layer for Grad-CAM / concept methods of an architecture (e.g. ``features.3``)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch][1]


def layer_names(model: nn.Module) -> list[str]:
    """All dotted submodule names of ``model`` (as ``model.named_modules()``, root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (e.g. ``"features.3"``).

    Raises:
        KeyError: no such layer; the message lists a few valid names.
    """
    modules = dict(model.named_modules())
    if name not in modules or not name:
        names = layer_names(model)
        top = [n for n in names if n.count(".") <= 1][:20]
        raise KeyError(f"no layer named {name!r}; layers include {top}")
    return modules[name]


# ---------------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = "neuroexplain-classifier/1"


def save_classifier(
    path: Any,
    model: nn.Module,
    *,
    arch: str,
    model_kwargs: dict[str, Any],
    input_shape: Sequence[int],
    config: dict[str, Any],
    epoch: int,
    seed: int,
    best_metric: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Any:
    """Write a classifier checkpoint (atomically) that :func:`load_classifier` can rebuild.

    The checkpoint is a plain dict loadable with ``torch.load(path, weights_only=True)``:
    ``format``, ``arch``, ``model_kwargs``, ``state_dict`` (CPU tensors), ``epoch``,
    ``version`` (package), ``input_shape`` ``[C, X, Y, Z]``, ``seed``, ``best_metric``
    (``{"name", "value"}``), ``layer_names``, ``config`` and anything in ``extra``
    (class names, provenance).

    Returns:
        The path written.
    """
    import neuroexplain
    from neuroexplain.io.atomic import save_torch
    from neuroexplain.io.checkpoint import to_plain

    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "model_kwargs": to_plain(model_kwargs),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "epoch": int(epoch),
        "version": neuroexplain.__version__,
        "input_shape": [int(s) for s in input_shape],
        "seed": int(seed),
        "best_metric": to_plain(best_metric),
        "layer_names": layer_names(model),
        "config": to_plain(config),
        **to_plain(extra or {}),
    }
    save_torch(ckpt, path)  # fixed archive name: same bytes
    return path


def load_classifier(
    path: Any,
    *,
    input_shape: Sequence[int] | None = None,
    arch: str | None = None,
    map_location: str | torch.device = "cpu",
    explained: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a classifier from a checkpoint written by :func:`save_classifier`.

    Args:
        path: the ``model.pt`` file.
        input_shape: the ``[C, X, Y, Z]`` of the data it will see; checked against the checkpoint.
        arch: the expected architecture, if the caller requires one.
        map_location: device for the weights.
        explained: the model the explanation stages explain: the checkpoint's ``explained``
            entry (``name``, ``model_kwargs``, ``state_dict``: the trained model when the final
            model is its ensemble with the linear reference, config ``classifier.explain``), the
            final model in a checkpoint without one. The returned checkpoint then says which
            (``"explained_model"``).

    Returns:
        ``(model, checkpoint)``: the network in eval mode and the checkpoint dict.

    Raises:
        InputError: unreadable file, not a neuroexplain classifier checkpoint, a different
            architecture or input shape than expected, or weights that do not fit the network.
    """
    from pathlib import Path

    from neuroexplain.errors import InputError
    from neuroexplain.io.checkpoint import load_checkpoint

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "checkpoint file not found")
    ckpt = load_checkpoint(p, CHECKPOINT_FORMAT, map_location=map_location)
    if arch is not None and ckpt["arch"] != arch:
        raise InputError(p, f"expected a {arch!r} classifier, got a {ckpt['arch']!r} checkpoint")
    shape = [int(s) for s in ckpt["input_shape"]]
    if input_shape is not None and [int(s) for s in input_shape] != shape:
        raise InputError(
            p,
            f"checkpoint was trained on inputs of shape {shape} (C, X, Y, Z), "
            f"got data of shape {[int(s) for s in input_shape]}",
        )
    part = ckpt
    if explained:
        alt = ckpt.get("explained")
        if alt is not None and not (isinstance(alt, dict) and "state_dict" in alt):
            raise InputError(p, "the 'explained' entry holds no model")
        part = ckpt if alt is None else alt
        ckpt["explained_model"] = "final" if alt is None else str(alt.get("name", "trained"))
    try:
        model = build_model(
            ckpt["arch"],
            spatial_size=shape[1:],
            in_channels=shape[0],
            out_channels=int(ckpt.get("out_channels", 1)),
            **part.get("model_kwargs", {}),
        )
        model.load_state_dict(part["state_dict"], strict=True)
    except (ValueError, RuntimeError, TypeError) as exc:
        msg = str(exc).splitlines()[0]
        raise InputError(p, f"weights do not fit the {ckpt['arch']!r} network ({msg})") from exc
    model.to(map_location).eval()
    return model, ckpt
