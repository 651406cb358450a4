"""The conditional warping simulator: a CondConv U-Net predicting a displacement field.

Liu, Adeli, Pohl and Zhao (IPMI 2021, "Going Beyond Saliency Maps: Training Deep Models to
Interpret Deep Models") explain a frozen classifier by training a *simulator* that deforms an
input image so that the classifier's decision moves in a requested direction ``o``:

* ``o = -1``: inject the disease effect (the positive class is "disease"),
* ``o = +1``: remove it.

The simulator only moves tissue (it warps), so its explanation is the deformation itself, read
as a Jacobian-determinant map (see :mod:`neuroexplain.simulator.maps`).

Warping convention (MONAI ``Warp``, pull-back): ``warped(x) = input(x + u(x))`` with ``u`` the
DDF ``(B, 3, H, W, D)`` in voxel units, channel ``i`` along spatial axis ``i``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import nn

from neuroexplain.settings import SimulatorConfig
from neuroexplain.simulator.condconv import CondConv3d, condition_vector

__all__ = ["SimulatorConfig", "SimulatorNet"]


class SimulatorNet(nn.Module):
    """Conditional U-Net simulator: ``forward(x, condition) -> (warped, ddf)``.

    Every convolution is a :class:`~neuroexplain.simulator.condconv.CondConv3d` routed on the
    pooled features and the direction ``o``; the last layer is initialised near zero, so an
    untrained simulator is (almost) the identity warp.

    Args:
        config: a :class:`SimulatorConfig` (or keyword arguments of one).

    Shapes:
        ``x``: ``(B, C, H, W, D)``; ``condition``: ``(B,)``, ``(B, 1)`` or a scalar in
        ``{-1, +1}``. Returns ``warped`` ``(B, C, H, W, D)`` and ``ddf`` ``(B, 3, H, W, D)`` in
        voxel units (``warped(x) = x_in(x + ddf(x))``).

    Example:
        >>> net = SimulatorNet(SimulatorConfig(channels=(4, 8, 8)))
        >>> warped, ddf = net(torch.rand(2, 1, 16, 16, 16), torch.tensor([-1.0, 1.0]))
        >>> ddf.shape
        torch.Size([2, 3, 16, 16, 16])

    Reference:
        Liu, Adeli, Pohl, Zhao. Going Beyond Saliency Maps: Training Deep Models to Interpret Deep
        Models. IPMI 2021.
    """

    def __init__(self, config: SimulatorConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        from monai.networks.blocks import DVF2DDF, Warp

        if config is None:
            config = SimulatorConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a SimulatorConfig or keyword arguments, not both")
        self.config = config
        ch = config.channels
        k = config.num_experts
        self.enc = nn.ModuleList(
            [CondConv3d(config.in_channels, ch[0], num_experts=k)]
            + [CondConv3d(ch[i - 1], ch[i], stride=2, num_experts=k) for i in range(1, len(ch))]
        )
        # decoder from level len(ch) - 2 up to level 0; its input: the level below + the skip
        self.dec = nn.ModuleList(
            [
                CondConv3d(ch[i + 1] + ch[i], ch[i], num_experts=k)
                for i in range(len(ch) - 2, -1, -1)
            ]
        )
        self.head = CondConv3d(ch[0], 3, num_experts=k).zero_init_(config.init_std)
        self.act = nn.LeakyReLU(config.negative_slope)
        with warnings.catch_warnings():  # MONAI warns that it uses torch's native grid_sample
            warnings.simplefilter("ignore")
            self.warp = Warp(mode="bilinear", padding_mode="border")
            self.integrate = (
                DVF2DDF(num_steps=config.integration_steps, mode="bilinear", padding_mode="border")
                if config.diffeomorphic
                else None
            )

    def lowres_field(self, x: torch.Tensor, condition: torch.Tensor | float) -> torch.Tensor:
        """The displacement at the U-Net's resolution, in *its* voxel units.

        Shapes:
            ``x`` ``(B, C, H, W, D)`` -> ``(B, 3, ceil(H / f), ceil(W / f), ceil(D / f))`` with
            ``f = config.downsample``. In diffeomorphic mode the velocity is integrated here, at
            low resolution (``2**integration_steps`` composition steps cost ``f**3`` less).
        """
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            c = self.config.in_channels
            raise ValueError(f"expected images (B, {c}, H, W, D), got shape {tuple(x.shape)}")
        f = self.config.downsample
        h = F.avg_pool3d(x, f, ceil_mode=True) if f > 1 else x
        feats = []
        for conv in self.enc:
            h = self.act(conv(h, condition))
            feats.append(h)
        for j, conv in enumerate(self.dec):
            skip = feats[len(self.config.channels) - 2 - j]
            h = F.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
            h = self.act(conv(torch.cat([h, skip], dim=1), condition))
        field = self.head(h, condition)
        if self.config.antisymmetric:
            o = condition_vector(condition, x.shape[0], 1, field)
            field = field * (-o).view(-1, 1, 1, 1, 1)
        if self.integrate is not None:
            field = self.integrate(field)
        return field

    @staticmethod
    def upsample_field(field: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Trilinear up-sampling of a ``(B, 3, h, w, d)`` field to ``size``, vectors rescaled to
        the new voxel units (a displacement of 1 coarse voxel is ``size / h`` fine voxels)."""
        size = tuple(int(s) for s in size)
        if tuple(field.shape[2:]) == size:
            return field
        scale = torch.tensor(
            [s / c for s, c in zip(size, field.shape[2:], strict=True)],
            dtype=field.dtype,
            device=field.device,
        ).view(1, 3, 1, 1, 1)
        return F.interpolate(field, size=size, mode="trilinear", align_corners=False) * scale

    def predict_field(self, x: torch.Tensor, condition: torch.Tensor | float) -> torch.Tensor:
        """The displacement field ``(B, 3, H, W, D)`` in voxel units of ``x`` (no warping)."""
        return self.upsample_field(self.lowres_field(x, condition), x.shape[2:])

    @overload
    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    @overload
    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | float, *, return_lowres: bool
    ) -> tuple[torch.Tensor, ...]: ...
    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | float, *, return_lowres: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Warp ``x`` towards the condition.

        Returns:
            ``(warped, ddf)``, plus the low-resolution field (:meth:`lowres_field`) when
            ``return_lowres`` (training regularises that one: it is ``downsample**3`` times
            smaller and the full-resolution field is its trilinear interpolation).
        """
        low = self.lowres_field(x, condition)
        ddf = self.upsample_field(low, x.shape[2:])
        warped = self.warp(x, ddf)
        return (warped, ddf, low) if return_lowres else (warped, ddf)
