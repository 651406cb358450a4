"""Training augmentation of the classifier: light, batched, seeded random affine / elastic
warps, left-right flips and intensity changes (:class:`BatchAugment`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from neuroexplain.settings import ClassifierConfig

__all__ = ["BatchAugment", "build_augmenter"]


class BatchAugment:
    """Light, batched training augmentation (one random draw per volume, seeded).

    Random affine about the volume centre (rotation up to ``rotate_deg`` per axis, scaling
    ``1 ± scale``, translation up to ``translate_vox`` voxels) resampled with MONAI's
    ``AffineTransform`` (trilinear, zero padding), applied with probability ``prob`` (without
    rotation and scaling, translations are whole voxels, which resample exactly); optional
    left-right flips (probability 0.5) along ``flip_axis``; intensity scaling ``1 ± intensity``
    and shift ``± intensity`` of the foreground (``> 0``; each with probability 0.5). With
    ``elastic_vox > 0``, a smooth random displacement is added to the affine's sampling grid
    (one resampling): normal coefficients on an ``elastic_grid``-point lattice per axis,
    up-sampled trilinearly and scaled so that the largest displacement of the volume is
    ``u * elastic_vox`` voxels, ``u ~ U(0, 1)`` (same probability ``prob``). Batched, so
    augmentation costs a fraction of a training step on CPU.

    Args:
        rotate_deg: maximum absolute rotation angle in degrees, per axis.
        translate_vox: maximum absolute translation in voxels, per axis.
        scale: maximum relative scaling, per axis.
        intensity: maximum relative intensity scaling and absolute shift.
        flip_axis: spatial axis (0, 1, 2) of left-right flips, ``None`` for no flips.
        elastic_vox: largest smooth random displacement in voxels (0 = none).
        elastic_grid: lattice points per axis of the random displacement (its smoothness).
        prob: probability of the random affine per volume.
        seed: seed of the generator (same seed -> same augmentations).

    Shapes:
        ``__call__(x)``: ``(B, C, X, Y, Z) -> (B, C, X, Y, Z)``.
    """

    def __init__(
        self,
        *,
        rotate_deg: float = 0.0,
        translate_vox: float = 2.0,
        scale: float = 0.0,
        intensity: float = 0.1,
        flip_axis: int | None = None,
        elastic_vox: float = 0.0,
        elastic_grid: int = 6,
        prob: float = 0.8,
        seed: int = 0,
    ) -> None:
        import torch
        from monai.networks.layers import AffineTransform

        self.rotate = float(np.deg2rad(rotate_deg))
        self.translate = float(translate_vox)
        self.scale = float(scale)
        self.intensity = float(intensity)
        self.flip_axis = flip_axis
        self.elastic = float(elastic_vox)
        self.elastic_grid = max(int(elastic_grid), 2)
        self.prob = float(prob)
        self.gen = torch.Generator().manual_seed(int(seed))
        # theta on normalised (align_corners) coordinates in torch's (z, y, x) order: exact
        # whole-voxel shifts and rotations about the volume centre in voxel units
        self.warp = AffineTransform(
            normalized=True,
            reverse_indexing=False,
            align_corners=True,
            mode="bilinear",
            padding_mode="zeros",
        )

    def _uniform(self, *shape: int, bound: float) -> Any:
        import torch

        return (torch.rand(*shape, generator=self.gen, dtype=torch.float64) * 2 - 1) * bound

    def _thetas(self, b: int, spatial: Sequence[int]) -> Any:
        """``(B, 3, 4)`` pull affines on normalised coordinates (torch's reversed axis order).

        In centred voxel coordinates the pull map is ``in = R S out + t``; with
        ``D = diag((n - 1) / 2)`` (``align_corners``) it is ``D^-1 R S D`` and ``D^-1 t`` on
        normalised coordinates, then the axes are reversed for ``affine_grid``.
        """
        import torch

        ang = self._uniform(b, 3, bound=self.rotate)
        scl = 1.0 + self._uniform(b, 3, bound=self.scale)
        trans = self._uniform(b, 3, bound=self.translate)
        use = torch.rand(b, generator=self.gen, dtype=torch.float64) < self.prob
        c, s = torch.cos(ang), torch.sin(ang)
        one, zero = torch.ones(b, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)
        rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1)
        ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1)
        rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1)
        rot = rx.view(b, 3, 3) @ ry.view(b, 3, 3) @ rz.view(b, 3, 3)
        lin = rot * scl[:, None, :]
        if self.rotate == 0 and self.scale == 0:
            trans = torch.round(trans)  # whole-voxel shifts resample exactly (no blur)
        lin[~use] = torch.eye(3, dtype=torch.float64)
        trans[~use] = 0.0
        half = torch.tensor([(n - 1) / 2 for n in spatial], dtype=torch.float64)
        lin_n = lin * half[None, None, :] / half[None, :, None]
        trans_n = trans / half[None, :]
        rev = [2, 1, 0]
        theta = torch.zeros(b, 3, 4, dtype=torch.float64)
        theta[:, :, :3] = lin_n[:, rev][:, :, rev]
        theta[:, :, 3] = trans_n[:, rev]
        return theta

    def __call__(self, x: Any) -> Any:
        import torch

        b = x.shape[0]
        theta = self._thetas(b, x.shape[2:])
        flip = torch.rand(b, generator=self.gen) < 0.5
        gain = 1.0 + self._uniform(b, bound=self.intensity).float()
        gain[torch.rand(b, generator=self.gen) >= 0.5] = 1.0
        shift = self._uniform(b, bound=self.intensity).float()
        shift[torch.rand(b, generator=self.gen) >= 0.5] = 0.0
        if self.elastic > 0:
            out = self._elastic_warp(x.float(), theta)
        else:
            out = self.warp(x.float(), theta.to(x.device, torch.float32))
        if self.flip_axis is not None and flip.any():
            dim = 2 + int(self.flip_axis)
            out = torch.where(flip.view(b, 1, 1, 1, 1).to(x.device), out.flip(dim), out)
        if self.intensity > 0:
            view = (b,) + (1,) * (x.ndim - 1)
            # background (0 after preprocessing) stays 0
            fg = (out > 0).to(out.dtype)
            out = out * gain.view(view).to(x.device) + shift.view(view).to(x.device) * fg
        return out

    def random_displacement(self, b: int, spatial: Sequence[int]) -> Any:
        """``(B, 3, X, Y, Z)`` smooth random displacements in voxels (see the class notes)."""
        import torch
        import torch.nn.functional as F

        g = self.elastic_grid
        coarse = torch.randn(b, 3, g, g, g, generator=self.gen, dtype=torch.float64)
        # the peak of a trilinear up-sampling is the peak of the lattice
        peak = coarse.abs().amax(dim=(1, 2, 3, 4)).clamp_min(1e-12)
        amp = torch.rand(b, generator=self.gen, dtype=torch.float64) * self.elastic
        amp[torch.rand(b, generator=self.gen, dtype=torch.float64) >= self.prob] = 0.0
        coarse = (coarse * (amp / peak).view(b, 1, 1, 1, 1)).float()
        return F.interpolate(coarse, size=tuple(spatial), mode="trilinear", align_corners=True)

    def _elastic_warp(self, x: Any, theta: Any) -> Any:
        """Resample ``x`` once on the affine grid plus a random displacement (trilinear)."""
        import torch
        import torch.nn.functional as F

        b, spatial = x.shape[0], x.shape[2:]
        grid = F.affine_grid(theta, [b, 1, *spatial], align_corners=True)  # (B, X, Y, Z, 3)
        disp = self.random_displacement(b, spatial)
        half = torch.tensor([(n - 1) / 2 for n in spatial], dtype=torch.float32)
        disp_n = (disp / half.view(1, 3, 1, 1, 1)).permute(0, 2, 3, 4, 1)[..., [2, 1, 0]]
        grid = (grid.float() + disp_n).to(x.device)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def build_augmenter(cfg: ClassifierConfig, lr_axis: int, seed: int) -> BatchAugment:
    """The :class:`BatchAugment` of the training options ``cfg`` (flips along ``lr_axis``)."""
    return BatchAugment(
        rotate_deg=cfg.rotate_deg,
        translate_vox=cfg.translate_vox,
        scale=cfg.scale,
        intensity=cfg.intensity,
        flip_axis=lr_axis if cfg.flip else None,
        elastic_vox=cfg.elastic_vox,
        seed=seed,
    )
