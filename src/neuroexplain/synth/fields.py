"""Smooth deformation fields with exact Jacobians, their inversion, and warping.

Conventions (all arrays in voxel units of one grid):

* A displacement ``w`` is channel-first ``(3, X, Y, Z)``; component ``a`` moves along voxel axis
  ``a``. A *pull-back* field maps an output point ``x`` to the input point ``x + w(x)`` it is
  sampled from (ITK / ANTs / MONAI ``Warp`` convention).
* A Jacobian ``D`` of a displacement is ``(3, 3, X, Y, Z)`` with ``D[a, b] = dw_a / dx_b``.

The planted disease field is a sum over regions ``r`` of ``alpha_r * K^-1 grad(G_sigma * m_r)``:
the gradient of a Gaussian-smoothed (soft) region indicator ``m_r``, with ``K = diag(s^2)``
turning the voxel gradient into the physical one (so the field is isotropic in mm on
anisotropic grids). ``G_sigma * m_r`` is a finite sum of Gaussian kernels centred on the region's
voxels, an analytic function of space; its first and second derivatives *at the grid points* are
exactly the Gaussian derivative filters ``scipy.ndimage.gaussian_filter(m_r, sigma, order=...)``
(these sample the derivatives of the same normalised, truncated kernel). So the displacement and
its Jacobian on the grid are exact, with no finite differences and no interpolation.

Reference: the synthetic-atrophy experiments of Liu et al., "Simulator networks", IPMI 2021
(a smooth deformation shrinking a labelled region gives a known Jacobian ground truth).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from neuroexplain.jacobian import det3x3

__all__ = [
    "CalibrationError",
    "CarriedLabels",
    "InversionInfo",
    "PlantedField",
    "carry_labels",
    "gaussian_derivatives",
    "invert_at_points",
    "invert_displacement",
    "partial_volume",
    "plant_field",
    "random_smooth_field",
    "sample",
    "spline_sampler",
    "subvoxel_offsets",
    "warp_labels",
]

logger = logging.getLogger(__name__)

#: kernels are cut at ``TRUNCATE`` sigmas: exp(-12.5) ~ 4e-6 of the peak is dropped, and the
#: field is exactly zero beyond ``round(TRUNCATE * sigma)`` voxels from the region
TRUNCATE = 5.0


def _sigma_vox(sigma_mm: float, spacing: Sequence[float]) -> np.ndarray:
    return float(sigma_mm) / np.asarray(spacing, dtype=float)


def gaussian_derivatives(
    image: np.ndarray, sigma: Sequence[float], *, truncate: float = TRUNCATE, mode: str = "constant"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian smoothing of ``image`` and its exact first and second derivatives on the grid.

    Args:
        image: ``(X, Y, Z)`` array.
        sigma: Gaussian standard deviation per axis, in voxels.
        truncate: kernel radius in sigmas (the same for every derivative order).
        mode: boundary handling of :func:`scipy.ndimage.gaussian_filter`; ``"constant"`` makes
            the result the plain sum of kernels centred on the voxels.

    Returns:
        ``(smoothed (X, Y, Z), gradient (3, X, Y, Z), hessian (3, 3, X, Y, Z))`` in voxel units.
    """
    img = np.asarray(image, dtype=np.float64)
    kw = {"sigma": tuple(float(s) for s in sigma), "truncate": truncate, "mode": mode}
    smooth = ndi.gaussian_filter(img, order=0, **kw)
    grad = np.empty((3, *img.shape))
    hess = np.empty((3, 3, *img.shape))
    for a in range(3):
        order = [0, 0, 0]
        order[a] = 1
        grad[a] = ndi.gaussian_filter(img, order=order, **kw)
        for b in range(a, 3):
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            hess[a, b] = ndi.gaussian_filter(img, order=order, **kw)
            hess[b, a] = hess[a, b]
    return smooth, grad, hess


def sample(volume: np.ndarray, coords: np.ndarray, *, order: int = 3) -> np.ndarray:
    """Interpolate ``volume`` (X, Y, Z) at voxel coordinates ``coords`` (3, ...), edge-clamped."""
    return ndi.map_coordinates(volume, coords, order=order, mode="nearest")


def spline_sampler(
    volume: np.ndarray, box: tuple[slice, slice, slice] | None = None, *, order: int = 3
) -> Callable[[np.ndarray], np.ndarray]:
    """A B-spline interpolator of ``volume`` (prefiltered once), called on ``(3, N)`` points.

    With ``box``, only ``volume[box]`` is interpolated (points are still full-grid voxel
    coordinates; outside the box the edge value is repeated, so use it for fields that vanish
    at the box edge). The spline interpolates: at grid points it returns the grid values.
    ``order=1`` is trilinear interpolation (8 instead of 64 taps per point).
    """
    vol = np.asarray(volume, dtype=np.float64)
    origin = np.zeros((3, 1))
    if box is not None:
        vol = vol[box]
        origin = np.array([b.start for b in box], dtype=np.float64)[:, None]
    coeffs = _spline(vol) if order == 3 else vol

    def evaluate(points: np.ndarray) -> np.ndarray:
        pts = np.asarray(points, dtype=np.float64) - origin
        if order == 3:
            return _eval_spline(coeffs, pts)
        return ndi.map_coordinates(coeffs, pts, order=order, mode="nearest")

    return evaluate


# --------------------------------------------------------------------------------------- inversion
@dataclass
class InversionInfo:
    """Convergence record of :func:`invert_displacement`."""

    iterations: int
    max_residual: float  # max |y + v(y) + w(y + v(y)) - y| in voxels
    converged: bool


def _spline(vol: np.ndarray) -> np.ndarray:
    return ndi.spline_filter(vol, order=3, mode="nearest")


def _eval_spline(coeffs: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return ndi.map_coordinates(coeffs, coords, order=3, mode="nearest", prefilter=False)


def _invert_at(
    coeffs: Sequence[np.ndarray],
    y: np.ndarray,
    tol: float,
    max_iter: int,
    z0: np.ndarray | None = None,
) -> tuple[np.ndarray, InversionInfo]:
    """Solve ``z + w(z) = y`` for points ``y`` (3, N) by fixed-point iteration ``z <- y - w(z)``.

    ``w`` is given by its cubic-spline coefficients (one array per component); ``z0`` is an
    optional starting guess (default ``y``). The iteration is a contraction where ``|Dw| < 1``;
    it stops when the residual ``|z + w(z) - y|`` is below ``tol`` voxels at every point.
    """
    z = y.copy() if z0 is None else z0.copy()
    res = np.inf
    for it in range(max_iter + 1):
        wz = np.stack([_eval_spline(c, z) for c in coeffs])
        r = z + wz - y
        res = float(np.sqrt((r * r).sum(axis=0)).max()) if r.size else 0.0
        if res < tol or it == max_iter:
            break
        z = y - wz
    return z, InversionInfo(iterations=it, max_residual=res, converged=res < tol)


def invert_displacement(
    ddf: np.ndarray, *, tol: float = 1e-4, max_iter: int = 200
) -> tuple[np.ndarray, InversionInfo]:
    """Inverse of the transform ``x -> x + w(x)`` as a displacement ``v``: ``y -> y + v(y)``.

    Solves ``v(y) = -w(y + v(y))`` by fixed-point iteration with ``w`` interpolated by cubic
    B-splines, to a residual below ``tol`` voxels. Only the bounding box where ``w`` is non-zero
    (dilated by ``max |w|``) is iterated; elsewhere ``v = 0`` exactly.

    Args:
        ddf: ``(3, X, Y, Z)`` displacement in voxels.
        tol: largest allowed residual ``|z + w(z) - y|`` in voxels.
        max_iter: iteration cap.

    Returns:
        ``(inverse (3, X, Y, Z), info)``; check ``info.converged``.
    """
    w = np.asarray(ddf, dtype=np.float64)
    if w.ndim != 4 or w.shape[0] != 3:
        raise ValueError(f"expected a displacement of shape (3, X, Y, Z), got {w.shape}")
    inv = np.zeros_like(w)
    nz = np.any(w != 0, axis=0)
    if not nz.any():
        return inv, InversionInfo(iterations=0, max_residual=0.0, converged=True)
    pad = int(np.ceil(np.abs(w).max())) + 2
    box = _bbox(nz, pad)
    coeffs = [_spline(w[a][box]) for a in range(3)]
    shape = tuple(s.stop - s.start for s in box)
    y = np.indices(shape, dtype=np.float64).reshape(3, -1)
    z, info = _invert_at(coeffs, y, tol, max_iter)
    inv[(slice(None), *box)] = (z - y).reshape(3, *shape)
    return inv, info


def invert_at_points(
    ddf: np.ndarray, points: np.ndarray, *, tol: float = 1e-4, max_iter: int = 200
) -> tuple[np.ndarray, InversionInfo]:
    """Inverse of ``x -> x + w(x)`` at given points: ``z`` with ``z + w(z) = y`` for each ``y``.

    Args:
        ddf: ``(3, X, Y, Z)`` displacement ``w`` in voxels (cubic-spline interpolated).
        points: ``(3, N)`` voxel coordinates ``y``.
        tol: largest allowed residual ``|z + w(z) - y|`` in voxels.
        max_iter: iteration cap.

    Returns:
        ``(z (3, N), info)``.
    """
    w = np.asarray(ddf, dtype=np.float64)
    coeffs = [_spline(w[a]) for a in range(3)]
    return _invert_at(coeffs, np.asarray(points, dtype=np.float64), tol, max_iter)


def _bbox(mask: np.ndarray, pad: int) -> tuple[slice, slice, slice]:
    idx = np.nonzero(mask)
    return tuple(  # type: ignore[return-value]
        slice(max(int(i.min()) - pad, 0), min(int(i.max()) + 1 + pad, n))
        for i, n in zip(idx, mask.shape, strict=True)
    )


# ----------------------------------------------------------------------------------- warping labels
def _corner_labels(lab: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(8, N)`` of the 8 voxels around each point ``(3, N)``, and the fractional parts."""
    f = np.floor(pts)
    t = pts - f
    f = f.astype(np.intp)
    labs = []
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                idx = tuple(
                    np.clip(f[a] + d, 0, lab.shape[a] - 1) for a, d in enumerate((dx, dy, dz))
                )
                labs.append(lab[idx])
    return np.stack(labs), t


def _corner_scores(corner_labels: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per corner, the summed trilinear weight of that corner's label (its interpolated one-hot
    value) ``(8, N)``."""
    weights = []
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                wgt = np.ones(t.shape[1])
                for a, d in enumerate((dx, dy, dz)):
                    wgt *= t[a] if d else 1.0 - t[a]
                weights.append(wgt)
    scores = np.zeros((8, t.shape[1]))
    for j in range(8):
        scores += np.where(corner_labels == corner_labels[j], weights[j], 0.0)
    return scores


def _corners(lab: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Corner labels ``(8, N)`` and their scores ``(8, N)`` (see :func:`_corner_scores`)."""
    corner_labels, t = _corner_labels(lab, pts)
    return corner_labels, _corner_scores(corner_labels, t)


def _pick(corner_labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per point, the corner label with the largest score (first corner on ties) and the score."""
    best = np.argmax(scores, axis=0)
    cols = np.arange(scores.shape[1])
    return corner_labels[best, cols], scores[best, cols]


def _linear_argmax(lab: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """One-hot-linear argmax labels at ``pts`` (3, N); scores only where the corners differ."""
    corner_labels, t = _corner_labels(lab, pts)
    out = corner_labels[0].copy()
    mixed = np.nonzero(np.any(corner_labels != corner_labels[0], axis=0))[0]
    if mixed.size:
        best, _ = _pick(
            corner_labels[:, mixed], _corner_scores(corner_labels[:, mixed], t[:, mixed])
        )
        out[mixed] = best
    return out


def warp_labels(labels: np.ndarray, coords: np.ndarray, *, method: str = "linear") -> np.ndarray:
    """Carry a label map to new positions.

    Args:
        labels: ``(X, Y, Z)`` integer label map.
        coords: ``(3, ...)`` voxel coordinates to sample at.
        method: ``"nearest"`` (nearest neighbour) or ``"linear"``: the label whose one-hot map,
            trilinearly interpolated, is largest (the argmax over the 8 surrounding voxels of
            the summed trilinear weights per label; the first corner wins ties).

    Returns:
        Labels at ``coords``, shape ``coords.shape[1:]``, dtype of ``labels``.
    """
    lab = np.asarray(labels)
    pts = np.asarray(coords, dtype=np.float64)
    if method == "nearest":
        return ndi.map_coordinates(lab, pts, order=0, mode="nearest", output=lab.dtype)
    if method != "linear":
        raise ValueError(f"expected method 'nearest' or 'linear', got {method!r}")
    best = _linear_argmax(lab, pts.reshape(3, -1))
    return best.reshape(pts.shape[1:]).astype(lab.dtype, copy=False)


@dataclass
class CarriedLabels:
    """Result of :func:`carry_labels`.

    Attributes:
        labels: ``(X, Y, Z)`` label map in the output space.
        partial_volume: per tracked label, ``(X, Y, Z)`` fraction of each output voxel whose
            pre-image lies in the source region (supersampled).
        volume: per tracked label, the partial-volume total (voxels).
        count: per tracked label, the voxel count of ``labels``.
    """

    labels: np.ndarray
    partial_volume: dict[int, np.ndarray]
    volume: dict[int, float]
    count: dict[int, int]


def partial_volume(
    region: np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray],
    changed: np.ndarray,
    coords: np.ndarray,
    *,
    supersample: int = 3,
    margin: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """Fraction of each output voxel whose pre-image lies in ``region`` (a union of voxel cubes).

    Args:
        region: ``(X, Y, Z)`` bool mask in source space.
        transform: maps output voxel coordinates ``(3, N)`` to source voxel coordinates.
        changed: ``(X, Y, Z)`` bool, voxels where the transform is not the identity (elsewhere
            the result is the mask itself).
        coords: ``(3, n_changed)`` ``transform`` at the changed voxels (``np.nonzero`` order).
        supersample: points per voxel and axis (``supersample^3`` membership tests per voxel,
            one uniformly jittered point per sub-cell: an unbiased estimate).
        margin: only voxels whose centre maps within ``margin`` voxels (Chebyshev) of the
            region's boundary are supersampled; the others are 0 or 1. ``margin=1`` is exact
            when the transform's Jacobian has max-row-sum norm < 2 (e.g. ``|D u| < 1``).
        seed: seed of the jitter (the result is deterministic).

    Returns:
        ``(X, Y, Z)`` float64 in [0, 1].
    """
    mask = np.asarray(region, dtype=bool)
    idx = np.nonzero(changed)
    out = mask.astype(np.float64)
    if not mask.any() or not idx[0].size:
        out[idx] = 0.0
        return out
    # erosion / dilation on the region's bounding box only
    crop = _bbox(mask, margin + 1)
    start = np.array([c.start for c in crop])[:, None]
    stop = np.array([c.stop for c in crop])[:, None]
    struct = ndi.generate_binary_structure(3, 3)
    core = ndi.binary_erosion(mask[crop], struct, iterations=margin, border_value=1)
    near = ndi.binary_dilation(mask[crop], struct, iterations=margin)
    nearest = np.stack(
        [np.clip(np.rint(coords[a]).astype(np.intp), 0, mask.shape[a] - 1) for a in range(3)]
    )
    inside = np.nonzero(np.all((nearest >= start) & (nearest < stop), axis=0))[0]
    local = tuple(nearest[:, inside] - start)
    pv = np.zeros(idx[0].size)
    is_core = core[local]
    pv[inside] = is_core
    mixed = inside[near[local] & ~is_core]
    if mixed.size:
        # stratified jittered sampling: one uniform point per sub-cell. A fixed sub-lattice
        # would be biased here (the region's faces sit at half-integers and move by a fraction
        # of a voxel, so they do not fall uniformly between lattice points).
        offsets = subvoxel_offsets(supersample)
        grid_pts = np.stack([i[mixed] for i in idx]).astype(np.float64)
        jitter = np.random.default_rng(seed).uniform(
            -0.5 / supersample, 0.5 / supersample, size=(3, grid_pts.shape[1], offsets.shape[1])
        )
        src = transform((grid_pts[:, :, None] + offsets[:, None, :] + jitter).reshape(3, -1))
        src_idx = tuple(
            np.clip(np.rint(src[a]).astype(np.intp), 0, mask.shape[a] - 1) for a in range(3)
        )
        pv[mixed] = mask[src_idx].reshape(-1, offsets.shape[1]).mean(axis=1)
    out[idx] = pv
    return out


def carry_labels(
    labels: np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray],
    changed: np.ndarray,
    coords: np.ndarray,
    *,
    track: Sequence[int] = (),
    supersample: int = 3,
    method: str = "linear",
    margin: int = 1,
) -> CarriedLabels:
    """Carry a label map through a pull-back transform, preserving tracked regions' volumes.

    A hard label map on a grid cannot follow sub-voxel boundary motion: a 2 mm hippocampus
    shrunk by 20 % moves its boundary by ~0.3 voxel on average, which neither nearest-neighbour
    nor one-hot-linear sampling registers. So for each tracked label the partial volume of its
    pre-image is integrated per output voxel (``supersample^3`` points, nearest-neighbour
    membership in the source voxel cubes), and the hard map (``method``) is then corrected at
    the voxels where the transform moves anything: the tracked region loses its voxels of
    lowest partial volume (to the best other, untracked label around) or gains the untracked
    voxels of highest partial volume, until its voxel count equals its rounded partial volume.

    Args:
        labels: ``(X, Y, Z)`` source label map.
        transform: maps output voxel coordinates ``(3, N)`` to source voxel coordinates.
        changed: ``(X, Y, Z)`` bool, voxels where the transform is not the identity.
        coords: ``(3, n_changed)`` ``transform`` at the changed voxels (in ``np.nonzero`` order).
        track: labels whose volume is preserved.
        supersample: partial-volume points per voxel and axis.
        method: hard sampling, as in :func:`warp_labels`.
        margin: see :func:`partial_volume`.

    Returns:
        A :class:`CarriedLabels`.
    """
    lab = np.asarray(labels)
    out = lab.copy()
    idx = np.nonzero(changed)
    hard = warp_labels(lab, coords, method=method)
    tracked = [int(r) for r in track]
    pv_maps = {
        r: partial_volume(
            lab == r, transform, changed, coords, supersample=supersample, margin=margin
        )
        for r in tracked
    }
    volumes = {r: float(pv.sum()) for r, pv in pv_maps.items()}
    counts: dict[int, int] = {}
    # volume-preserving correction of the tracked labels, at changed voxels only
    for r in tracked:
        pv = pv_maps[r][idx]
        n_now = int((lab[~changed] == r).sum() + (hard == r).sum())
        n_goal = round(volumes[r])
        if n_now > n_goal:
            cand = np.nonzero(hard == r)[0]
            # the best other, untracked label around each candidate (0 score: none around)
            corner_labels, scores = _corners(lab, coords[:, cand])
            untracked = ~np.isin(corner_labels, tracked)
            other_lab, other_score = _pick(corner_labels, np.where(untracked, scores, -1.0))
            ok = other_score > 0
            cand, other_lab = cand[ok], other_lab[ok]
            order = np.argsort(pv[cand], kind="stable")[: n_now - n_goal]
            hard[cand[order]] = other_lab[order]
        elif n_now < n_goal:
            cand = np.nonzero(~np.isin(hard, tracked) & (pv > 0))[0]
            gain = cand[np.argsort(-pv[cand], kind="stable")[: n_goal - n_now]]
            hard[gain] = r
    out[idx] = hard
    for r in tracked:
        counts[r] = int((out == r).sum())
        if counts[r] != round(volumes[r]):
            logger.warning(
                "label %d: %d voxels after carrying, partial volume %.1f (not enough candidates)",
                r,
                counts[r],
                volumes[r],
            )
    return CarriedLabels(labels=out, partial_volume=pv_maps, volume=volumes, count=counts)


# ------------------------------------------------------------------------------------ nuisance
def random_smooth_field(
    shape: Sequence[int],
    spacing: Sequence[float],
    amplitude_mm: float,
    sigma_mm: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """A random smooth displacement (Gaussian-smoothed white noise) and its exact Jacobian.

    Args:
        shape: grid ``(X, Y, Z)``.
        spacing: voxel size in mm.
        amplitude_mm: the largest displacement length in mm (the field is scaled to it).
        sigma_mm: smoothing in mm (larger = smoother, smaller Jacobian deviations).
        rng: random generator.

    Returns:
        ``(ddf (3, X, Y, Z), jac (3, 3, X, Y, Z))`` in voxel units, ``jac[a, b] = d ddf_a / dx_b``
        computed with Gaussian derivative filters (exact on the grid; kernels cut at 4 sigma,
        reflecting boundaries).
    """
    sp = np.asarray(spacing, dtype=float)
    sig = _sigma_vox(sigma_mm, sp)
    noise = rng.standard_normal((3, *shape))
    kw = {"sigma": tuple(sig), "truncate": 4.0, "mode": "reflect"}
    f = np.stack([ndi.gaussian_filter(noise[a], **kw) for a in range(3)])  # "mm"
    norm = float(np.sqrt((f * f).sum(axis=0)).max())
    scale = amplitude_mm / norm if norm > 0 else 0.0
    ddf = f * (scale / sp)[:, None, None, None]
    jac = np.empty((3, 3, *shape))
    for a in range(3):
        for b in range(3):
            order = [0, 0, 0]
            order[b] = 1
            jac[a, b] = ndi.gaussian_filter(noise[a], order=order, **kw) * (scale / sp[a])
    return ddf, jac


# ------------------------------------------------------------------------------- planted disease
def subvoxel_offsets(k: int) -> np.ndarray:
    """``(3, k^3)`` offsets of a regular ``k x k x k`` sampling of a voxel around its centre."""
    o = (np.arange(k) + 0.5) / k - 0.5
    return np.stack(np.meshgrid(o, o, o, indexing="ij")).reshape(3, -1)


@dataclass
class PlantedField:
    """A calibrated disease deformation (see :func:`plant_field`).

    Attributes:
        ddf: ``(3, X, Y, Z)`` pull-back displacement in voxels: the diseased image at ``x`` shows
            the healthy anatomy at ``x + ddf(x)``. Exactly zero outside the field's support.
        det_pullback: ``(X, Y, Z)`` exact ``det(I + D ddf)`` on the grid.
        jacobian: ``(X, Y, Z)`` ground truth ``1 / det_pullback``: the volume of tissue in the
            diseased image relative to the healthy one (> 1 expanded, < 1 shrunk).
        alphas: per region, the calibrated field strength (> 0 enlarges, < 0 shrinks).
        target: per region, the requested fractional volume change.
        volume_change: per region, the realised ``integral m_r det(D psi) / integral m_r - 1``.
        healthy_volume: per region, ``integral m_r`` in voxels.
        iterations: secant iterations of the calibration.
        inversion: convergence of the last point inversion.
        support: bounding box (slices) outside which ``ddf`` is zero.
    """

    ddf: np.ndarray
    det_pullback: np.ndarray
    jacobian: np.ndarray
    alphas: dict[int, float]
    target: dict[int, float]
    volume_change: dict[int, float]
    healthy_volume: dict[int, float]
    iterations: int
    inversion: InversionInfo
    support: tuple[slice, slice, slice]

    @property
    def min_det(self) -> float:
        """Smallest determinant of the forward (healthy -> diseased) map, on the diseased grid."""
        return float(self.jacobian.min())

    @property
    def max_det(self) -> float:
        """Largest determinant of the forward map, on the diseased grid."""
        return float(self.jacobian.max())

    def max_displacement_mm(self, spacing: Sequence[float]) -> float:
        """Largest displacement length in mm."""
        mm = self.ddf * np.asarray(spacing, dtype=float)[:, None, None, None]
        return float(np.sqrt((mm**2).sum(axis=0)).max())


class CalibrationError(RuntimeError):
    """The requested volume change could not be planted (too strong, or no convergence)."""


@dataclass
class _RegionBasis:
    """Per region, its field per unit ``alpha`` on its box and its integration points.

    ``grads[r]`` is ``K^-1 grad(G_sigma * m_r)`` (voxel-unit displacement per unit alpha) and
    ``hessians[r]`` its derivative, both on the region's box ``local[r]`` within the common
    box ``box`` (shape ``bshape``); ``all_pts`` are the ``npts`` sub-voxel points of every
    region's voxels (relative to the box, split per region at ``splits``), ``weights[r]`` the
    indicator at its voxels, ``vol_h[r]`` its healthy volume and ``lin[r]`` the first-order
    volume change per unit alpha.
    """

    labels: list[int]
    planted: list[int]
    grads: dict[int, np.ndarray]
    hessians: dict[int, np.ndarray]
    weights: dict[int, np.ndarray]
    vol_h: dict[int, float]
    lin: dict[int, float]
    local: dict[int, tuple[slice, ...]]
    box: tuple[slice, ...]
    bshape: tuple[int, ...]
    all_pts: np.ndarray
    splits: np.ndarray
    npts: int


def _region_basis(
    masks: Mapping[int, np.ndarray],
    planted: list[int],
    sp: np.ndarray,
    sigma_mm: float,
    supersample: int,
) -> _RegionBasis:
    """The fields per unit alpha and the integration points of every region of ``masks``."""
    labels = list(masks)
    sig = _sigma_vox(sigma_mm, sp)
    radius = max(int(TRUNCATE * s + 0.5) for s in sig)
    kinv = (1.0 / sp**2)[:, None, None, None]
    boxes, grads, hessians, weights, points, vol_h, lin = {}, {}, {}, {}, {}, {}, {}
    for r in labels:
        m_full = np.asarray(masks[r], dtype=np.float64)
        if not (m_full > 0).any():
            raise ValueError(f"region {r} is empty")
        boxes[r] = _bbox(m_full > 0, radius + 2)
        m = m_full[boxes[r]]
        _, g, h = gaussian_derivatives(m, sig)
        grads[r] = g * kinv  # K^-1 grad: voxel-unit displacement per unit alpha
        hessians[r] = h * kinv[:, None]  # its derivative d/dx_b (rows scaled by 1/s_a^2)
        sel = m > 0
        weights[r] = m[sel]
        vol_h[r] = float(weights[r].sum())
        tr = hessians[r][0, 0] + hessians[r][1, 1] + hessians[r][2, 2]
        # first order: det(I + a Dw) ~ 1 + a tr(Dw), so J ~ 1 - a tr(Dw)
        lin[r] = float(-(weights[r] * tr[sel]).sum() / vol_h[r])
        points[r] = (
            np.stack(np.nonzero(sel)).astype(np.float64)
            + np.array([b.start for b in boxes[r]], dtype=np.float64)[:, None]
        )
    box = tuple(
        slice(min(boxes[r][a].start for r in labels), max(boxes[r][a].stop for r in labels))
        for a in range(3)
    )
    origin = np.array([b.start for b in box], dtype=np.float64)
    local = {
        r: tuple(
            slice(b.start - o.start, b.stop - o.start) for b, o in zip(boxes[r], box, strict=True)
        )
        for r in labels
    }
    bshape = tuple(b.stop - b.start for b in box)
    offsets = subvoxel_offsets(supersample)
    npts = offsets.shape[1]
    all_pts = (
        np.concatenate(
            [(points[r][:, :, None] + offsets[:, None, :]).reshape(3, -1) for r in labels], axis=1
        )
        - origin[:, None]
    )
    splits = np.cumsum([points[r].shape[1] * npts for r in labels])[:-1]
    return _RegionBasis(
        labels, planted, grads, hessians, weights, vol_h, lin, local, box, bshape, all_pts,
        splits, npts,
    )  # fmt: skip


def _field_evaluator(basis: _RegionBasis, min_det: float) -> Callable[[Mapping[int, float]], Any]:
    """``evaluate(alphas) -> (w, det_pullback, volume change per region, inversion info)``.

    The change and info are ``None`` when the field would fold (``det < min_det``).
    """
    b = basis
    state: dict[str, np.ndarray] = {}

    def evaluate(alphas: Mapping[int, float]):
        w = np.zeros((3, *b.bshape))
        dw = np.zeros((3, 3, *b.bshape))
        for r in b.planted:
            w[(slice(None), *b.local[r])] += alphas[r] * b.grads[r]
            dw[(slice(None), slice(None), *b.local[r])] += alphas[r] * b.hessians[r]
        for a in range(3):
            dw[a, a] += 1.0
        det_pb = det3x3(dw)
        if det_pb.min() <= min_det or (1.0 / det_pb).min() <= min_det:
            return w, det_pb, None, None
        coeffs = [_spline(w[a]) for a in range(3)]
        # warm start from the previous solution (the fields differ by a small step in alpha)
        z, info = _invert_at(coeffs, b.all_pts, tol=1e-4, max_iter=200, z0=state.get("z"))
        if info.converged:
            state["z"] = z
        jac_at = _eval_spline(_spline(1.0 / det_pb), z)
        change = {}
        for r, jr in zip(b.labels, np.split(jac_at, b.splits), strict=True):
            per_voxel = jr.reshape(-1, b.npts).mean(axis=1)
            change[r] = float((b.weights[r] * per_voxel).sum() / b.vol_h[r] - 1.0)
        return w, det_pb, change, info

    return evaluate


def _calibrate(
    evaluate: Callable[[Mapping[int, float]], Any],
    basis: _RegionBasis,
    target: Mapping[int, float],
    *,
    tol: float,
    max_iter: int,
) -> tuple[Any, dict[int, float], int]:
    """Secant iterations on the alphas until every volume change is within ``tol``.

    Returns:
        ``(last evaluation, alphas, iterations)``.
    """
    planted, lin = basis.planted, basis.lin
    a_prev = dict.fromkeys(planted, 0.0)
    f_prev = {r: -float(target[r]) for r in planted}
    a_cur = {r: float(target[r]) / lin[r] if lin[r] != 0 else 0.0 for r in planted}
    change: dict[int, float] | None = None
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - reported below
        w, det_pb, change, info = evaluate(a_cur)
        if change is None or not info.converged:
            # overshoot into (nearly) folding territory: step back towards the last good point
            a_cur = {r: 0.5 * (a_cur[r] + a_prev[r]) for r in planted}
            continue
        f_cur = {r: change[r] - float(target[r]) for r in planted}
        if max(abs(v) for v in f_cur.values()) < tol:
            break
        a_new = {}
        for r in planted:
            denom = f_cur[r] - f_prev[r]
            a_new[r] = a_cur[r] - f_cur[r] * (a_cur[r] - a_prev[r]) / denom if denom else a_cur[r]
        a_prev, f_prev, a_cur = a_cur, f_cur, a_new
    else:
        raise CalibrationError(
            f"could not plant volume changes {dict(target)} in {max_iter} iterations "
            f"(last: {change}); the field folds or does not converge -- lower the magnitude "
            "or increase sigma"
        )
    return (w, det_pb, change, info), a_cur, it


def plant_field(
    masks: Mapping[int, np.ndarray],
    target: Mapping[int, float],
    spacing: Sequence[float],
    *,
    sigma_mm: float = 4.0,
    supersample: int = 2,
    tol: float = 2e-4,
    max_iter: int = 30,
    min_det: float = 0.1,
) -> PlantedField:
    """Calibrate a smooth invertible field changing each region's volume by ``target[r]``.

    The pull-back field is ``w = sum_r alpha_r K^-1 grad(G_sigma * m_r)`` (``K = diag(s^2)``);
    its grid Jacobian is exact (Gaussian derivative filters). ``psi``, the healthy -> diseased
    map, is the inverse of ``x -> x + w(x)``. The realised volume change of region ``r`` is
    ``integral m_r(y) det(D psi)(y) dy / integral m_r - 1``, integrated over ``supersample^3``
    points per voxel, with ``det(D psi)(y) = 1 / det(I + Dw)(psi(y))`` and ``psi(y)`` found by
    fixed-point inversion (cubic-spline interpolation of ``w`` and of the determinant between
    grid points). ``alpha_r`` is found by secant iterations, all regions together, each on its
    own residual, until every realised change is within ``tol`` of its target. Regions of
    ``masks`` missing from ``target`` are not planted (``alpha_r = 0``); their realised volume
    change (from the other regions' fields) is reported all the same.

    Args:
        masks: per label, the region's (soft) indicator ``(X, Y, Z)`` in [0, 1] in healthy space.
        target: per planted label, the fractional volume change (``-0.2`` shrinks by 20 %).
        spacing: voxel size in mm.
        sigma_mm: smoothing of the indicators (mm): larger gives smoother, wider effects.
        supersample: integration points per voxel and axis.
        tol: tolerance on the volume change (absolute, as a fraction).
        max_iter: secant iterations.
        min_det: smallest allowed ``det`` of the forward and backward maps (no folding).

    Returns:
        A :class:`PlantedField`.

    Raises:
        CalibrationError: no convergence, or the field would fold (``det < min_det``).

    Example:
        >>> d = np.linalg.norm(np.indices((24, 24, 24)) - 11.5, axis=0)
        >>> pf = plant_field({1: (d < 5).astype(float)}, {1: -0.2}, (2.0, 2.0, 2.0))
        >>> round(pf.volume_change[1], 3), bool(pf.jacobian[12, 12, 12] < 1)
        (-0.2, True)
    """
    labels = list(masks)
    planted = [r for r in labels if r in target]
    if not planted:
        raise ValueError("expected at least one region to plant")
    if set(target) - set(labels):
        raise ValueError(f"targets without a mask: {sorted(set(target) - set(labels))}")
    sp = np.asarray(spacing, dtype=float)
    shape = np.asarray(next(iter(masks.values()))).shape
    basis = _region_basis(masks, planted, sp, sigma_mm, supersample)
    evaluate = _field_evaluator(basis, min_det)
    (w, det_pb, change, info), a_cur, it = _calibrate(
        evaluate, basis, target, tol=tol, max_iter=max_iter
    )
    box = basis.box
    ddf = np.zeros((3, *shape))
    ddf[(slice(None), *box)] = w
    det_full = np.ones(shape)
    det_full[box] = det_pb
    jac_full = np.ones(shape)
    jac_full[box] = 1.0 / det_pb
    return PlantedField(
        ddf=ddf,
        det_pullback=det_full,
        jacobian=jac_full,
        alphas={r: float(a) for r, a in a_cur.items()},
        target={r: float(target[r]) for r in planted},
        volume_change=change,
        healthy_volume=basis.vol_h,
        iterations=it,
        inversion=info,
        support=box,
    )
