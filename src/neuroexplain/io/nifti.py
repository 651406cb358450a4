"""NIfTI input checks and map outputs that overlay their input (like fMRIPrep / hippunfold).

Every map neuroexplain writes is a float32 image on the exact grid of the image it belongs to:
the reference's affine, header, sform / qform codes, an intent, and a description of at most
80 bytes naming the method, plus an optional JSON sidecar with provenance.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from neuroexplain.errors import InputError
from neuroexplain.io.atomic import atomic_output, write_json

__all__ = [
    "check_same_grid",
    "load_labels",
    "load_map",
    "load_volume",
    "orientation_warning",
    "orientation_warnings",
    "save_displacement",
    "save_map",
    "sidecar_path",
    "warn_orientation",
]

logger = logging.getLogger(__name__)

#: sform and qform that differ by more than this (mm, or mm per voxel) disagree; float32 storage
#: of the quaternion and the 3x4 sform differ by ~1e-5 of the values for one and the same affine
AFFINE_ATOL = 1e-3

#: files whose orientation was already warned about in this process (inputs are read repeatedly)
_WARNED: set[str] = set()

_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    zlib.error,
    gzip.BadGzipFile,
    nib.filebasedimages.ImageFileError,
)


def _read(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        img = nib.load(str(path))
    except _READ_ERRORS as exc:
        raise InputError(path, f"not a readable NIfTI file ({exc})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(path, f"expected a NIfTI image, got {type(img).__name__}")
    warn_orientation(img, path)
    return img


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64)[:3] - np.asarray(b, np.float64)[:3]).max())


def orientation_warning(img: nib.Nifti1Image, path: Any) -> str | None:
    """Why the voxel-to-world affine of ``img`` is doubtful, in one line (else ``None``).

    Two cases, both legal NIfTI that tools read differently: an sform and a qform that both
    claim to be valid (codes > 0) but disagree (nibabel, and so neuroexplain, uses the sform;
    ITK-based tools such as ANTs use the qform), and no orientation code at all (sform_code =
    qform_code = 0), where only the voxel sizes are known and nibabel falls back to a default
    LAS affine centred on the volume.

    Example:
        >>> img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
        >>> img.set_sform(None, code=0)  # the qform code of a new image is 0 already
        >>> orientation_warning(img, "t1.nii.gz").split(";")[0]
        't1.nii.gz: no orientation codes (sform_code = qform_code = 0)'
    """
    hdr = img.header
    scode, qcode = int(hdr["sform_code"]), int(hdr["qform_code"])
    if scode > 0 and qcode > 0:
        sform, qform = hdr.get_sform(), hdr.get_qform()
        if not np.allclose(sform[:3], qform[:3], atol=AFFINE_ATOL, rtol=0.0):
            return (
                f"{path}: sform and qform disagree (codes {scode} and {qcode}, largest "
                f"difference {_max_diff(sform, qform):.3g} mm); using the sform, as nibabel "
                "does (ITK-based tools such as ANTs use the qform): check the orientation"
            )
    elif scode == 0 and qcode == 0:
        sizes = "x".join(f"{v:.3g}" for v in hdr.get_zooms()[:3])
        return (
            f"{path}: no orientation codes (sform_code = qform_code = 0); using a default LAS "
            f"affine from the voxel sizes ({sizes} mm, centred on the volume): orientation and "
            "position unknown, the image may be flipped"
        )
    return None


def warn_orientation(img: nib.Nifti1Image, path: Any) -> str | None:
    """Log :func:`orientation_warning` as a warning (once per file and process); return it."""
    msg = orientation_warning(img, path)
    if msg is not None and str(path) not in _WARNED:
        _WARNED.add(str(path))
        logger.warning(msg)
    return msg


def _squeeze_3d(img: nib.Nifti1Image, path: Path) -> nib.Nifti1Image:
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
        shape = img.shape
    if len(shape) != 3:
        raise InputError(path, f"expected a 3D volume, got shape {tuple(shape)}")
    if min(shape) < 2:
        raise InputError(path, f"expected a 3D volume, got a flat one of shape {tuple(shape)}")
    return img


def _data(img: nib.Nifti1Image, path: Path, dtype: Any = np.float32) -> np.ndarray:
    try:
        data = img.get_fdata(dtype=np.float64)
    except _READ_ERRORS as exc:
        raise InputError(path, f"truncated or corrupt image data ({exc})") from exc
    with np.errstate(over="ignore"):  # reported below, as one line
        out = np.asarray(data, dtype=dtype)
    if not np.isfinite(out).all() and np.isfinite(data).all():
        big = float(np.abs(data).max())
        raise InputError(
            path,
            f"intensities overflow {np.dtype(dtype).name} (largest {big:.3g}; stored "
            f"{img.get_data_dtype()} scaled by scl_slope {getattr(img.dataobj, 'slope', 1.0):g})",
        )
    return out


def orientation_warnings(paths: Any) -> list[str]:
    """Read the headers of ``paths`` and warn about doubtful orientations (see
    :func:`orientation_warning`); returns the warnings, e.g. for a stage's summary file.

    Raises:
        InputError: a missing or unreadable file.
    """
    found = []
    for path in paths:
        msg = orientation_warning(_read(Path(path)), path)
        if msg is not None:
            found.append(msg)
    return found


def load_volume(path: str | os.PathLike[str]) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load and check a 3D intensity volume (e.g. a T1w).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``(image, data)``: the nibabel image (header, affine) and its data as float32 ``(X, Y, Z)``.

    Raises:
        InputError: missing, corrupt or truncated file; not 3D (a 4D image with one volume is
            accepted); NaN / Inf values; an all-zero or constant volume; a singular affine.
    """
    p = Path(path)
    img = _squeeze_3d(_read(p), p)
    data = _data(img, p)
    if not np.isfinite(data).all():
        n = int((~np.isfinite(data)).sum())
        raise InputError(p, f"expected finite intensities, got {n} NaN/Inf voxels")
    if not np.any(data):
        raise InputError(p, "expected an image with signal, got an all-zero volume")
    if float(data.min()) == float(data.max()):
        raise InputError(
            p,
            f"expected an image with contrast, got a constant volume "
            f"(every voxel {data.flat[0]:g})",
        )
    if abs(np.linalg.det(img.affine[:3, :3])) < 1e-8:
        raise InputError(p, "expected an invertible voxel-to-world affine, got a singular one")
    return img, data


def load_map(path: str | os.PathLike[str]) -> tuple[Any, np.ndarray]:
    """Load a 3D float map (an explanation or a ground-truth map) as the evaluation reads it.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file (a 4D image with one volume is accepted).

    Returns:
        ``(image, data)``: the nibabel image (header, affine) and its data as float32 ``(X, Y, Z)``.

    Raises:
        InputError: an unreadable file, not 3D, or NaN / Inf values.
    """
    try:
        img = nib.load(str(path))
        if len(img.shape) == 4 and img.shape[3] == 1:
            img = img.slicer[..., 0]
        data = np.asarray(img.get_fdata(dtype=np.float64), dtype=np.float32)
    except Exception as exc:
        raise InputError(path, f"not a readable NIfTI file ({exc})") from exc
    if data.ndim != 3:
        raise InputError(path, f"expected a 3D map, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise InputError(
            path, f"expected finite values, got {int((~np.isfinite(data)).sum())} NaN/Inf"
        )
    return img, data


def load_labels(
    path: str | os.PathLike[str], like: nib.Nifti1Image | None = None, *, like_path: Any = None
) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load and check an integer label map (dseg), optionally on the grid of ``like``.

    Returns:
        ``(image, labels)`` with labels as int32 ``(X, Y, Z)``.

    Raises:
        InputError: unreadable, not 3D, non-integer or negative labels, or a grid (shape or
            affine) different from ``like``.
    """
    p = Path(path)
    img = _squeeze_3d(_read(p), p)
    data = _data(img, p, dtype=np.float64)
    if not np.isfinite(data).all():
        raise InputError(p, "expected integer labels, got NaN/Inf values")
    if not np.array_equal(data, np.round(data)) or data.min() < 0:
        raise InputError(
            p, "expected non-negative integer labels, got fractional or negative values"
        )
    if like is not None:
        check_same_grid(img, like, p, like_path)
    return img, data.astype(np.int32)


def check_same_grid(
    img: nib.Nifti1Image, ref: nib.Nifti1Image, path: Any, ref_path: Any = None, atol: float = 1e-3
) -> None:
    """Raise :class:`InputError` unless ``img`` and ``ref`` share shape and affine."""
    other = f" of {ref_path}" if ref_path is not None else " of its image"
    if tuple(img.shape[:3]) != tuple(ref.shape[:3]):
        raise InputError(
            path,
            f"grid mismatch: shape {tuple(img.shape[:3])} differs from "
            f"{tuple(ref.shape[:3])}{other}",
        )
    if not np.allclose(img.affine, ref.affine, atol=atol):
        raise InputError(path, f"grid mismatch: affine differs from the affine{other}")


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """``sub-01_desc-x_map.nii.gz`` -> ``sub-01_desc-x_map.json`` (BIDS sidecar)."""
    p = Path(path)
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return p.with_name(name + ".json")


def _header_like(ref: nib.Nifti1Image, dtype: Any = np.float32) -> nib.Nifti1Header:
    hdr = ref.header.copy()
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["cal_min"] = 0
    hdr["cal_max"] = 0
    return hdr


def _finish(img: nib.Nifti1Image, ref: nib.Nifti1Image, description: str) -> None:
    sform, scode = ref.get_sform(coded=True)
    qform, qcode = ref.get_qform(coded=True)
    img.set_sform(ref.affine if sform is None else sform, code=int(scode) or 1)
    img.set_qform(ref.affine if qform is None else qform, code=int(qcode) or 1)
    img.header["descrip"] = description.encode("utf-8")[:80]


def save_map(
    data: np.ndarray,
    ref: nib.Nifti1Image,
    path: str | os.PathLike[str],
    *,
    description: str,
    intent: str = "estimate",
    intent_name: str = "",
    sidecar: dict[str, Any] | None = None,
) -> Path:
    """Write a 3D map on the grid of ``ref`` as float32 NIfTI (atomically), plus a JSON sidecar.

    Args:
        data: ``(X, Y, Z)`` array on exactly the grid of ``ref``.
        ref: the image the map belongs to (its affine, header and sform / qform codes are kept).
        path: destination, BIDS-derivative style (``sub-01_desc-gradient_saliency.nii.gz``).
        description: method and meaning, truncated to the 80-byte NIfTI ``descrip`` field.
        intent: NIfTI intent code name (``"estimate"``, ``"zscore"``, ``"label"`` ...).
        intent_name: short intent name (≤ 16 bytes), e.g. ``"logjacobian"``.
        sidecar: metadata written to the ``.json`` sidecar (method, parameters, provenance).

    Returns:
        The path written.

    Example:
        >>> save_map(np.zeros(t1.shape), t1, "sub-01_desc-zero_map.nii.gz",
        ...          description="zeros")  # doctest: +SKIP
    """
    arr = np.asarray(data, dtype=np.float32)
    if arr.shape != tuple(ref.shape[:3]):
        raise ValueError(f"map shape {arr.shape} does not match reference grid {ref.shape[:3]}")
    img = nib.Nifti1Image(arr, ref.affine, _header_like(ref))
    _finish(img, ref, description)
    img.header.set_intent(intent, name=intent_name[:16])
    with atomic_output(path) as tmp:
        nib.save(img, str(tmp))
    if sidecar is not None:
        write_json({"Description": description, **sidecar}, sidecar_path(path))
    return Path(path)


def save_displacement(
    ddf: np.ndarray,
    ref: nib.Nifti1Image,
    path: str | os.PathLike[str],
    *,
    description: str,
    sidecar: dict[str, Any] | None = None,
) -> Path:
    """Write a displacement field ``(X, Y, Z, 3)`` as 5D ``(X, Y, Z, 1, 3)`` NIfTI.

    The intent is NIfTI's "displacement vector" (1006); vectors are in the units stated in the
    sidecar (neuroexplain writes millimetres in world / RAS+ axes, as ITK and ANTs expect).
    """
    arr = np.asarray(ddf, dtype=np.float32)
    if arr.shape != (*ref.shape[:3], 3):
        raise ValueError(
            f"field shape {arr.shape} does not match reference grid {ref.shape[:3]} + (3,)"
        )
    img = nib.Nifti1Image(arr[:, :, :, None, :], ref.affine, _header_like(ref))
    _finish(img, ref, description)
    img.header.set_intent(1006, name="displacement")  # NIFTI_INTENT_DISPVECT
    with atomic_output(path) as tmp:
        nib.save(img, str(tmp))
    if sidecar is not None:
        write_json({"Description": description, **sidecar}, sidecar_path(path))
    return Path(path)
