"""Model-grid preprocessing of T1w MRI (MONAI transforms) and exact mapping back to native space.

The **model grid** is an isotropic RAS+ voxel grid of ``shape`` voxels (default 64³) with spacing
``fov_mm / max(shape)`` (default 224 mm / 64 = 3.5 mm), placed on each subject's head. Per subject:

1. load and check the T1w (and dseg) with :mod:`neuroexplain.io.nifti`;
2. ``Orientationd`` to RAS (only flips / permutations, no interpolation);
3. ``Spacingd`` to the isotropic spacing with an axis-aligned (diagonal) affine — trilinear for
   the T1w, nearest neighbour for the dseg, zeros outside the native field of view;
4. head mask: Gaussian-smoothed T1w (σ = 1 voxel) above ``fg_threshold`` × its 99th percentile
   ("robust max"), largest connected component, holes filled;
5. ``BorderPadd`` + ``SpatialCropd`` to ``shape`` centred on the head's bounding box. When the head
   is longer than the field of view along an axis (:data:`KEEP_WHEN_TOO_LONG`), left-right is
   cropped symmetrically, anterior-posterior keeps the back of the head (the face is cropped) and
   inferior-superior keeps the vertex (the neck is cropped: the head box of a T1w usually runs
   into the neck at the bottom of the image). On the 100 IXI subjects at 224 mm the head box is
   154-182 x 200-242 x 196-235 mm (R, A, S); 67 lose face / neck, none any dseg > 0 voxel;
6. intensity normalisation inside the head mask, background set to 0:
   ``"percentile"`` (default): ``clip((x - p0.5) / (p99.5 - p0.5), 0, 1)`` with percentiles of
   the head voxels; ``"zscore"``: ``(x - mean) / std`` of the head voxels; ``"none"``: unchanged.

Every spatial step is a MONAI transform on a :class:`monai.data.MetaTensor`, so the final
``model_affine`` (model voxel index -> world mm, same convention as nibabel) is exact: it is the
MetaTensor's affine after the last transform. :func:`to_native` and :func:`to_model` resample
between the model grid and a native grid through world coordinates
(native voxel -> world -> model voxel) with a single vectorised ``torch.grid_sample``.

Reference: MONAI (Cardoso et al. 2022, arXiv:2211.02701) for the transforms; the grid
conventions follow nibabel ("voxel centres at integer indices").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from neuroexplain.settings import NORM_METHODS

__all__ = [
    "KEEP_WHEN_TOO_LONG",
    "NORM_METHODS",
    "Grid",
    "Preprocessed",
    "brain_inside",
    "fit_affine",
    "head_mask",
    "label_centroids",
    "model_spacing",
    "normalize_intensity",
    "preprocess_aligned",
    "preprocess_arrays",
    "preprocess_subject",
    "resample_to_grid",
    "to_model",
    "to_native",
]

logger = logging.getLogger(__name__)

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


class _HasGrid(Protocol):
    @property
    def affine(self) -> Any: ...

    @property
    def shape(self) -> Any: ...


class Grid(NamedTuple):
    """A voxel grid: ``affine`` (4, 4) voxel index -> world mm and ``shape`` (X, Y, Z).

    Anything with ``.affine`` and ``.shape`` (a nibabel image, a :class:`Grid`) can be passed
    where a grid is expected.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]


@dataclass
class Preprocessed:
    """One subject on the model grid.

    Attributes:
        image: ``(X, Y, Z)`` float32 normalised T1w on the model grid.
        dseg: ``(X, Y, Z)`` int16 label map on the model grid, or ``None``.
        model_affine: ``(4, 4)`` float64 model voxel -> world mm (RAS+, diagonal).
        native_affine: ``(4, 4)`` float64 native voxel -> world mm (as in the NIfTI file).
        native_shape: native grid shape ``(X, Y, Z)``.
        fg_extent_mm: ``(3,)`` extent of the head bounding box along R, A, S in mm.
        crop_mm: ``(3, 2)`` mm of the head box cut off at the low / high end of each RAS axis.
        brain_kept: fraction of the native dseg > 0 voxels that are inside the model grid
            (:func:`brain_inside`; ``None`` without a dseg); 1.0 means no brain tissue was
            cropped.
    """

    image: np.ndarray
    dseg: np.ndarray | None
    model_affine: np.ndarray
    native_affine: np.ndarray
    native_shape: tuple[int, int, int]
    fg_extent_mm: np.ndarray
    crop_mm: np.ndarray
    brain_kept: float | None

    @property
    def cropped(self) -> bool:
        """Whether any part of the head bounding box lies outside the model grid."""
        return bool(np.any(self.crop_mm > 0))


def model_spacing(shape: tuple[int, int, int], fov_mm: float) -> float:
    """Isotropic model-grid spacing in mm: ``fov_mm / max(shape)`` (224 / 64 = 3.5)."""
    if fov_mm <= 0:
        raise ValueError(f"expected fov_mm > 0, got {fov_mm}")
    return float(fov_mm) / float(max(shape))


def head_mask(volume: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Binary head mask of a T1w volume.

    Args:
        volume: ``(X, Y, Z)`` intensities (any scale, background near 0).
        threshold: fraction of the robust maximum (99th percentile) above which the
            Gaussian-smoothed (σ = 1 voxel) volume is foreground.

    Returns:
        ``(X, Y, Z)`` bool: the largest connected foreground component with its holes filled.
    """
    from scipy import ndimage as ndi

    x = np.asarray(volume, dtype=np.float32)
    robust_max = float(np.percentile(x, 99))
    if robust_max <= 0:
        robust_max = float(x.max())
    smooth = ndi.gaussian_filter(x, sigma=1.0)
    mask = smooth > threshold * robust_max
    labels, n = ndi.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    return ndi.binary_fill_holes(mask)


def normalize_intensity(
    volume: np.ndarray, mask: np.ndarray, method: str = "percentile"
) -> np.ndarray:
    """Normalise intensities inside ``mask``; background (outside the mask) becomes 0.

    Args:
        volume: ``(X, Y, Z)`` intensities.
        mask: ``(X, Y, Z)`` bool head mask.
        method: ``"percentile"``: ``clip((x - p0.5) / (p99.5 - p0.5), 0, 1)`` with the percentiles
            of the masked voxels; ``"zscore"``: ``(x - mean) / std`` of the masked voxels;
            ``"none"``: unchanged (and the background is kept too).

    Returns:
        ``(X, Y, Z)`` float32.
    """
    if method not in NORM_METHODS:
        raise ValueError(f"expected norm in {NORM_METHODS}, got {method!r}")
    x = np.asarray(volume, dtype=np.float64)
    if method == "none":
        return x.astype(np.float32)
    vals = x[mask]
    if vals.size < 2:
        return np.zeros(x.shape, np.float32)
    if method == "percentile":
        lo, hi = np.percentile(vals, [0.5, 99.5])
        out = np.clip((x - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    else:
        out = (x - vals.mean()) / max(float(vals.std()), 1e-12)
    out[~mask] = 0.0
    return out.astype(np.float32)


#: which end of the head box to keep when the head is longer than the model field of view, per
#: RAS axis: centre left-right, keep the back of the head (crop the face), keep the vertex (crop
#: the neck).
KEEP_WHEN_TOO_LONG = ("centre", "low", "high")


def _window(lo: int, hi: int, size: int, keep: str) -> int:
    """Start of a ``size`` window on a box ``[lo, hi]`` (inclusive): centred if the box fits."""
    length = hi - lo + 1
    if length <= size or keep == "centre":
        return lo + (length - size) // 2 if length > size else lo - (size - length) // 2
    return hi + 1 - size if keep == "high" else lo


def label_centroids(dseg: np.ndarray, affine: np.ndarray) -> dict[int, np.ndarray]:
    """World (mm) centroid of every label > 0 of a label map: ``{label: (3,)}``."""
    from scipy import ndimage

    labels = np.unique(dseg)
    labels = labels[labels > 0]
    if labels.size == 0:
        return {}
    vox = np.asarray(ndimage.center_of_mass(np.ones(dseg.shape), dseg, labels), dtype=np.float64)
    world = vox @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return {int(k): w for k, w in zip(labels.tolist(), world, strict=True)}


def fit_affine(
    moving: dict[int, np.ndarray], fixed: dict[int, np.ndarray], *, min_points: int = 12
) -> np.ndarray:
    """Least-squares 12-parameter affine mapping ``moving`` points onto ``fixed`` ones.

    Args:
        moving: ``{label: (3,)}`` world points of the subject.
        fixed: ``{label: (3,)}`` world points of the reference.
        min_points: fewest common labels accepted.

    Returns:
        ``(4, 4)`` affine ``A`` with ``fixed ≈ A @ moving`` (subject world -> reference world).

    Raises:
        ValueError: fewer than ``min_points`` common labels, or a degenerate (flat) point set.
    """
    common = sorted(set(moving) & set(fixed))
    if len(common) < min_points:
        raise ValueError(
            f"expected >= {min_points} labels shared with the reference, got {len(common)}"
        )
    p = np.array([moving[k] for k in common])
    q = np.array([fixed[k] for k in common])
    ph = np.c_[p, np.ones(len(p))]
    m, _, rank, _ = np.linalg.lstsq(ph, q, rcond=None)
    if rank < 4:
        raise ValueError("the label centroids are degenerate (coplanar); cannot fit an affine")
    a = np.eye(4)
    a[:3, :] = m.T
    return a


def brain_inside(
    dseg: np.ndarray,
    native_affine: np.ndarray,
    model_affine: np.ndarray,
    shape: tuple[int, int, int],
) -> float:
    """Fraction of the labelled (``dseg > 0``) native voxels whose centre falls on the model grid.

    Geometric, so it does not depend on the resampling: each native voxel centre goes to world
    and then to a model voxel index, and counts as kept when it is within half a voxel of the grid.

    Args:
        dseg: ``(X, Y, Z)`` native label map.
        native_affine: ``(4, 4)`` native voxel -> world.
        model_affine: ``(4, 4)`` model voxel -> world.
        shape: model grid shape ``(X', Y', Z')``.

    Returns:
        A fraction in ``[0, 1]`` (1.0 when there is no labelled voxel).

    Example:
        >>> d = np.zeros((4, 4, 4), int); d[1:3, 1:3, 1:3] = 1
        >>> brain_inside(d, np.eye(4), np.eye(4), (2, 4, 4))
        0.5
    """
    idx = np.argwhere(np.asarray(dseg) > 0)
    if idx.size == 0:
        return 1.0
    m = np.linalg.inv(np.asarray(model_affine, np.float64)) @ np.asarray(native_affine, np.float64)
    v = idx @ m[:3, :3].T + m[:3, 3]
    hi = np.asarray(shape, np.float64) - 0.5
    return float(np.all((v >= -0.5) & (v <= hi), axis=1).mean())


def preprocess_aligned(
    t1: np.ndarray,
    affine: np.ndarray,
    dseg: np.ndarray,
    *,
    reference_centroids: dict[int, np.ndarray],
    reference_affine: np.ndarray,
    shape: tuple[int, int, int] = (64, 64, 64),
    norm: str = "percentile",
    fg_threshold: float = 0.1,
) -> Preprocessed:
    """Resample a subject onto a fixed reference grid after a label-centroid affine alignment.

    The affine ``A`` (subject world -> reference world) is fitted by least squares between the
    world centroids of the labels the subject shares with the reference (DL-MUSE has ~140), the
    way a template registration removes position, orientation and head size. The model grid is
    the reference's grid (``reference_affine``: model voxel -> reference world); the subject's
    ``model_affine`` (model voxel -> *subject* world) is ``inv(A) @ reference_affine``, so
    :func:`to_native` maps every model-grid map back to the subject's native grid exactly.

    Args:
        t1, affine, dseg: native T1w ``(X, Y, Z)``, its voxel -> world affine, its labels.
        reference_centroids: ``{label: (3,)}`` world centroids of the reference subject.
        reference_affine: ``(4, 4)`` model voxel -> reference world affine.
        shape, norm, fg_threshold: as :func:`preprocess_arrays`.

    Returns:
        A :class:`Preprocessed` on the reference grid.
    """
    native_affine = np.asarray(affine, dtype=np.float64)
    a = fit_affine(label_centroids(dseg, native_affine), reference_centroids)
    model_affine = np.linalg.inv(a) @ np.asarray(reference_affine, dtype=np.float64)
    shape = tuple(int(v) for v in shape)
    t1m = resample_to_grid(np.asarray(t1, np.float32), native_affine, model_affine, shape)
    dm = resample_to_grid(
        np.asarray(dseg).astype(np.int16), native_affine, model_affine, shape, mode="nearest"
    )
    mask = head_mask(t1m, fg_threshold)
    if not mask.any():
        mask = np.ones_like(mask)
    idx = np.argwhere(mask)
    spacing = np.sqrt((model_affine[:3, :3] ** 2).sum(0))
    return Preprocessed(
        image=np.ascontiguousarray(normalize_intensity(t1m, mask, norm), dtype=np.float32),
        dseg=dm.astype(np.int16),
        model_affine=model_affine,
        native_affine=native_affine,
        native_shape=tuple(int(v) for v in np.shape(t1)[:3]),
        fg_extent_mm=(idx.max(0) - idx.min(0) + 1).astype(np.float64) * spacing,
        crop_mm=np.zeros((3, 2)),
        brain_kept=brain_inside(dseg, native_affine, model_affine, shape),
    )


def preprocess_arrays(
    t1: np.ndarray,
    affine: np.ndarray,
    dseg: np.ndarray | None = None,
    *,
    shape: tuple[int, int, int] = (64, 64, 64),
    fov_mm: float = 224.0,
    norm: str = "percentile",
    fg_threshold: float = 0.1,
) -> Preprocessed:
    """Bring one T1w (and its dseg) from its native grid to the model grid.

    Args:
        t1: ``(X, Y, Z)`` native T1w intensities.
        affine: ``(4, 4)`` native voxel -> world (RAS+ mm) affine of ``t1`` (and ``dseg``).
        dseg: ``(X, Y, Z)`` integer labels on the same grid, or ``None``.
        shape: model grid shape.
        fov_mm: extent of the longest model axis in mm (spacing = ``fov_mm / max(shape)``).
        norm: intensity normalisation, one of :data:`NORM_METHODS`.
        fg_threshold: head-mask threshold as a fraction of the robust maximum.

    Returns:
        A :class:`Preprocessed` with ``image`` ``(*shape)`` float32, ``dseg`` ``(*shape)`` int16.

    Example:
        >>> out = preprocess_arrays(np.ones((20, 20, 20)), np.eye(4), shape=(8, 8, 8), fov_mm=32)
        >>> out.image.shape, out.model_affine[0, 0]
        ((8, 8, 8), 4.0)
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import BorderPadd, Orientationd, Spacingd, SpatialCropd

    shape = tuple(int(s) for s in shape)
    spacing = model_spacing(shape, fov_mm)
    native_affine = np.asarray(affine, dtype=np.float64)
    aff_t = torch.as_tensor(native_affine, dtype=torch.float64)
    data: dict[str, Any] = {
        "t1": MetaTensor(torch.as_tensor(np.asarray(t1, np.float32))[None], affine=aff_t.clone())
    }
    keys = ["t1"]
    modes = ["bilinear"]
    if dseg is not None:
        data["dseg"] = MetaTensor(
            torch.as_tensor(np.asarray(dseg, np.float32))[None], affine=aff_t.clone()
        )
        keys.append("dseg")
        modes.append("nearest")

    data = Orientationd(keys, axcodes="RAS", labels=_RAS_LABELS)(data)
    data = Spacingd(
        keys,
        pixdim=(spacing,) * 3,
        diagonal=True,
        mode=modes,
        padding_mode="zeros",
        dtype=np.float32,
    )(data)

    spaced = data["t1"][0].numpy()
    mask = head_mask(spaced, fg_threshold)
    if not mask.any():  # degenerate (e.g. constant) image: keep the whole field of view
        mask = np.ones_like(mask)
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0)
    grid_size = np.array(spaced.shape)
    starts = np.array(
        [_window(int(lo[a]), int(hi[a]), shape[a], KEEP_WHEN_TOO_LONG[a]) for a in range(3)]
    )
    ends = starts + np.array(shape)
    crop_mm = np.stack([np.maximum(starts - lo, 0), np.maximum(hi + 1 - ends, 0)], 1) * spacing
    fg_extent_mm = (hi - lo + 1).astype(np.float64) * spacing

    data["mask"] = MetaTensor(
        torch.as_tensor(mask[None].astype(np.float32)), affine=data["t1"].affine.clone()
    )
    all_keys = [*keys, "mask"]
    pad_lo = np.maximum(-starts, 0)
    pad_hi = np.maximum(ends - grid_size, 0)
    if np.any(pad_lo) or np.any(pad_hi):
        border = [int(v) for pair in zip(pad_lo, pad_hi, strict=True) for v in pair]
        data = BorderPadd(all_keys, spatial_border=border, mode="constant")(data)
    roi_start = starts + pad_lo
    data = SpatialCropd(
        all_keys, roi_start=roi_start.tolist(), roi_end=(roi_start + np.array(shape)).tolist()
    )(data)

    model_affine = data["t1"].affine.numpy().astype(np.float64)
    image = normalize_intensity(data["t1"][0].numpy(), data["mask"][0].numpy() > 0.5, norm)
    dseg_out = None
    brain_kept = None
    if dseg is not None:
        d = data["dseg"][0].numpy()
        dseg_out = np.rint(d).astype(np.int16)
        brain_kept = brain_inside(dseg, native_affine, model_affine, shape)
    return Preprocessed(
        image=np.ascontiguousarray(image, dtype=np.float32),
        dseg=dseg_out,
        model_affine=model_affine,
        native_affine=native_affine,
        native_shape=tuple(int(s) for s in np.shape(t1)[:3]),
        fg_extent_mm=fg_extent_mm,
        crop_mm=crop_mm.astype(np.float64),
        brain_kept=brain_kept,
    )


def preprocess_subject(
    t1_path: str | os.PathLike[str],
    dseg_path: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Preprocessed:
    """Load (with checks) and preprocess one subject; see :func:`preprocess_arrays` for ``kwargs``.

    With ``reference={"reference_centroids": ..., "reference_affine": ...}`` in ``kwargs`` the
    subject is aligned to the reference grid instead (:func:`preprocess_aligned`).

    Raises:
        InputError: unreadable / truncated / non-3D / NaN T1w; dseg not integer or on another grid;
            labels that do not fit int16.
    """
    from neuroexplain.errors import InputError
    from neuroexplain.io.nifti import load_labels, load_volume

    img, t1 = load_volume(t1_path)
    dseg = None
    if dseg_path is not None:
        _, dseg = load_labels(dseg_path, img, like_path=t1_path)
        if dseg.max() > np.iinfo(np.int16).max:
            raise InputError(dseg_path, f"expected labels <= 32767 (int16), got {dseg.max()}")
    reference = kwargs.pop("reference", None)
    if reference is not None:
        if dseg is None:
            raise InputError(t1_path, "alignment to a reference needs a dseg label map")
        kwargs.pop("fov_mm", None)
        try:
            return preprocess_aligned(t1, img.affine, dseg, **reference, **kwargs)
        except ValueError as exc:
            raise InputError(dseg_path, f"cannot align to the reference: {exc}") from exc
    return preprocess_arrays(t1, img.affine, dseg, **kwargs)


def _grid_of(obj: _HasGrid | tuple[np.ndarray, Any]) -> tuple[np.ndarray, tuple[int, int, int]]:
    if isinstance(obj, tuple) and not isinstance(obj, Grid):
        affine, shape = obj
    else:
        affine, shape = obj.affine, obj.shape
    return np.asarray(affine, dtype=np.float64), tuple(int(s) for s in tuple(shape)[:3])


def resample_to_grid(
    volume: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    *,
    mode: str = "bilinear",
) -> np.ndarray:
    """Resample a volume from one voxel grid to another through world coordinates.

    Each destination voxel centre ``v`` is mapped to ``inv(src_affine) @ dst_affine @ v`` and the
    source is sampled there (trilinear or nearest neighbour); points outside the source grid
    (beyond its outermost voxel centres) get 0. Exact for any pair of affines: a volume that is a
    linear function of world coordinates is reproduced exactly inside the source grid.

    Args:
        volume: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` on the source grid.
        src_affine: ``(4, 4)`` source voxel -> world.
        dst_affine: ``(4, 4)`` destination voxel -> world.
        dst_shape: destination grid shape ``(X', Y', Z')``.
        mode: ``"bilinear"`` (trilinear; returns float32) or ``"nearest"`` (keeps an integer or
            bool dtype, e.g. for label maps).

    Returns:
        ``(X', Y', Z')`` or ``(C, X', Y', Z')`` on the destination grid.
    """
    import torch
    import torch.nn.functional as F

    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"expected mode 'bilinear' or 'nearest', got {mode!r}")
    vol = np.asarray(volume)
    if vol.ndim not in (3, 4):
        raise ValueError(f"expected a (X, Y, Z) or (C, X, Y, Z) volume, got shape {vol.shape}")
    channels_first = vol.ndim == 4
    src = vol if channels_first else vol[None]
    src_shape = np.array(src.shape[1:])
    if np.any(src_shape < 2):
        raise ValueError(f"expected at least 2 voxels along every source axis, got {vol.shape}")
    dst_shape = tuple(int(s) for s in dst_shape)

    # dst voxel -> src voxel, then both in grid_sample's normalised coordinates
    # (align_corners=True: index i of an axis of n voxels <-> u = 2 i / (n - 1) - 1)
    m = np.linalg.inv(np.asarray(src_affine, np.float64)) @ np.asarray(dst_affine, np.float64)
    half_dst = (np.array(dst_shape, np.float64) - 1.0) / 2.0
    s = 2.0 / (src_shape - 1.0)
    lin = (s[:, None] * m[:3, :3]) * half_dst[None, :]
    off = s * (m[:3, :3] @ half_dst + m[:3, 3]) - 1.0
    # affine_grid / grid_sample order the coordinates (x, y, z) = (k, j, i): reverse the axes
    theta = np.concatenate([lin[::-1, ::-1], off[::-1, None]], axis=1)

    work_dtype = torch.float64 if vol.dtype == np.float64 else torch.float32
    inp = torch.as_tensor(np.ascontiguousarray(src)).to(work_dtype)[None]
    grid = F.affine_grid(
        torch.as_tensor(theta.copy(), dtype=work_dtype)[None],
        [1, inp.shape[1], *dst_shape],
        align_corners=True,
    )
    out = F.grid_sample(inp, grid, mode=mode, padding_mode="zeros", align_corners=True)[0]
    res = out.numpy()
    if mode == "nearest" and (np.issubdtype(vol.dtype, np.integer) or vol.dtype == bool):
        res = np.rint(res).astype(vol.dtype)
    elif mode == "bilinear":
        res = res.astype(np.float32, copy=False)
    return res if channels_first else res[0]


def to_native(
    volume_model: np.ndarray,
    model_affine: np.ndarray,
    native_img: _HasGrid | tuple[np.ndarray, Any],
    *,
    mode: str = "bilinear",
) -> np.ndarray:
    """Map a model-grid volume (e.g. an attribution map) onto a subject's native grid.

    Args:
        volume_model: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` on the model grid.
        model_affine: ``(4, 4)`` model voxel -> world, e.g. ``preproc["model_affines"][i]``.
        native_img: the native image (nibabel) or a :class:`Grid` / ``(affine, shape)`` of it,
            e.g. ``Grid(preproc["native_affines"][i], preproc["native_shapes"][i])``.
        mode: ``"bilinear"`` for continuous maps (float32 out), ``"nearest"`` for labels.

    Returns:
        ``native_shape`` or ``(C, *native_shape)`` array; 0 outside the model grid's field of view.
        Ready for :func:`neuroexplain.io.nifti.save_map` with the native image as reference.

    Example:
        >>> img = nib.load(pre["t1_paths"][0])  # doctest: +SKIP
        >>> native = to_native(attr[0, 0], pre["model_affines"][0], img)  # doctest: +SKIP
    """
    affine, shape = _grid_of(native_img)
    return resample_to_grid(
        volume_model, np.asarray(model_affine, np.float64), affine, shape, mode=mode
    )


def to_model(
    volume_native: np.ndarray,
    native_img: _HasGrid | tuple[np.ndarray, Any],
    model_affine: np.ndarray,
    model_shape: tuple[int, int, int],
    *,
    mode: str = "bilinear",
) -> np.ndarray:
    """Map a native-grid volume (e.g. a planted deformation mask) onto the model grid.

    Purely spatial (no intensity normalisation): the inverse direction of :func:`to_native`.

    Args:
        volume_native: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` on the native grid.
        native_img: nibabel image, :class:`Grid` or ``(affine, shape)`` of the native grid.
        model_affine: ``(4, 4)`` model voxel -> world.
        model_shape: model grid shape, e.g. ``preproc["images"].shape[2:]``.
        mode: ``"bilinear"`` or ``"nearest"``.

    Returns:
        ``model_shape`` or ``(C, *model_shape)`` array; 0 outside the native field of view.
    """
    affine, _ = _grid_of(native_img)
    return resample_to_grid(
        volume_native, affine, np.asarray(model_affine, np.float64), tuple(model_shape), mode=mode
    )
