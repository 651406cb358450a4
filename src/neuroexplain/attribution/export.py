"""Write model-grid maps as NIfTI in each subject's native space (fMRIPrep-style derivatives).

Every explanation method (the baselines here, the simulator, SACV, XNN) computes its maps on the
model grid of ``preproc.pt``; :func:`write_subject_maps` maps them back onto the subject's
original T1w grid with :func:`neuroexplain.mri.preprocess.to_native` (trilinear) and writes
``<out_dir>/sub-<label>/sub-<label>_desc-<method>_<suffix>.nii.gz`` with the T1w's affine,
header and sform / qform codes (so it overlays the T1w in any viewer without resampling), an
``estimate`` intent, a description naming the method, and a JSON sidecar.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from neuroexplain.errors import InputError

__all__ = ["map_path", "native_reference", "subject_label", "write_subject_maps"]

logger = logging.getLogger(__name__)

_BIDS_VALUE = re.compile(r"^[A-Za-z0-9]+$")


def subject_label(subject: str) -> str:
    """BIDS label of a subject id: ``"sub-01"`` or ``"01"`` -> ``"01"``."""
    s = str(subject)
    return s[4:] if s.startswith("sub-") else s


def map_path(out_dir: str | os.PathLike[str], subject: str, method: str, suffix: str) -> Path:
    """``<out_dir>/sub-<label>/sub-<label>_desc-<method>_<suffix>.nii.gz``.

    Raises:
        ValueError: ``method`` or ``suffix`` is not alphanumeric (BIDS entity values).
    """
    for name, value in (("method", method), ("suffix", suffix)):
        if not _BIDS_VALUE.match(value):
            raise ValueError(f"expected an alphanumeric {name} (BIDS), got {value!r}")
    label = subject_label(subject)
    return Path(out_dir) / f"sub-{label}" / f"sub-{label}_desc-{method}_{suffix}.nii.gz"


def native_reference(preproc: Mapping[str, Any], index: int, ref: Any = None) -> Any:
    """The native T1w image (nibabel) of subject ``index``, checked against the cached grid.

    Args:
        preproc: the ``preproc.pt`` dict (``t1_paths``, ``native_affines``, ``native_shapes``).
        index: subject index.
        ref: a nibabel image or a path to use instead of ``preproc["t1_paths"][index]``.

    Raises:
        InputError: the T1w is missing, or its grid differs from the one recorded at ingest.
    """
    import nibabel as nib

    if ref is None or isinstance(ref, str | os.PathLike):
        paths = preproc.get("t1_paths")
        path = Path(ref) if ref is not None else (Path(paths[index]) if paths else None)
        if path is None:
            raise InputError("preproc", "no t1_paths recorded; pass the native image explicitly")
        if not path.is_file():
            raise InputError(path, "native T1w of the subject not found (moved since ingest?)")
        img = nib.load(str(path))
    else:
        img, path = ref, "reference image"
    shapes = preproc.get("native_shapes")
    affines = preproc.get("native_affines")
    if shapes is not None and tuple(int(s) for s in np.asarray(shapes[index])) != tuple(
        img.shape[:3]
    ):
        raise InputError(
            path,
            f"grid mismatch: shape {tuple(img.shape[:3])} differs from the ingest record "
            f"{tuple(int(s) for s in np.asarray(shapes[index]))}",
        )
    if affines is not None and not np.allclose(
        np.asarray(affines[index], np.float64), img.affine, atol=1e-3
    ):
        raise InputError(path, "grid mismatch: affine differs from the ingest record")
    return img


def write_subject_maps(
    maps_model: Mapping[str, Any],
    preproc: Mapping[str, Any],
    index: int,
    out_dir: str | os.PathLike[str],
    *,
    stage: str = "saliency",
    suffix: str | None = None,
    sidecar: Mapping[str, Any] | None = None,
    method_sidecars: Mapping[str, Mapping[str, Any]] | None = None,
    descriptions: Mapping[str, str] | None = None,
    ref: Any = None,
    mode: str = "bilinear",
) -> dict[str, Path]:
    """Write one subject's model-grid maps as native-space NIfTI files with sidecars.

    Args:
        maps_model: ``{method: (X, Y, Z) map}`` on the model grid (arrays or tensors; a leading
            ``(1, X, Y, Z)`` or ``(1, 1, X, Y, Z)`` is squeezed).
        preproc: the ``preproc.pt`` dict (``subjects``, ``model_affines``, ``t1_paths``,
            ``native_affines``, ``native_shapes``).
        index: subject index into ``preproc``.
        out_dir: stage folder, e.g. ``results/saliency``.
        stage: stage name, recorded in the sidecar and used as the default suffix.
        suffix: BIDS suffix (default: ``stage``), e.g. ``"saliency"`` or ``"logjacobian"``.
        sidecar: metadata for every map's JSON sidecar (checkpoint hash, provenance, ...).
        method_sidecars: extra per-method metadata (``{"ig": {"Parameters": {...}}}``).
        descriptions: per-method NIfTI description (≤ 80 bytes); default
            ``"neuroexplain <stage>: <method>"``.
        ref: the native image (nibabel or path), default ``preproc["t1_paths"][index]``.
        mode: ``"bilinear"`` for continuous maps, ``"nearest"`` for label maps.

    Returns:
        ``{method: path written}``.

    Raises:
        InputError: the native T1w is missing or on another grid than at ingest.
        ValueError: a map whose shape is not the model grid, or a non-alphanumeric method name.

    Example:
        >>> write_subject_maps({"ig": attr[0, 0]}, preproc, 3, "results/saliency",
        ...                    sidecar={"Checkpoint": sha})  # doctest: +SKIP
    """
    from neuroexplain.io.nifti import save_map
    from neuroexplain.mri.preprocess import to_native

    suffix = suffix or stage
    subject = str(preproc["subjects"][index])
    model_shape = (
        tuple(int(s) for s in np.asarray(preproc["images"]).shape[2:])
        if ("images" in preproc and preproc["images"] is not None)
        else None
    )
    model_affine = np.asarray(preproc["model_affines"][index], dtype=np.float64)
    img = native_reference(preproc, index, ref)
    written: dict[str, Path] = {}
    for method, vol in maps_model.items():
        arr = np.asarray(
            vol.detach().cpu().numpy() if hasattr(vol, "detach") else vol, dtype=np.float32
        )
        while arr.ndim > 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 3 or (model_shape is not None and arr.shape != model_shape):
            raise ValueError(
                f"expected a model-grid map of shape {model_shape or '(X, Y, Z)'} for {method!r}, "
                f"got {arr.shape}"
            )
        path = map_path(out_dir, subject, method, suffix)
        native = to_native(arr, model_affine, img, mode=mode)
        meta: dict[str, Any] = {
            "Method": method,
            "Stage": stage,
            "Subject": f"sub-{subject_label(subject)}",
            "Space": "native T1w grid of the subject (RAS+ world mm via the T1w affine)",
            "SpatialReference": str(preproc["t1_paths"][index])
            if preproc.get("t1_paths")
            else None,
            "ModelGrid": {"shape": list(arr.shape), "affine": model_affine.tolist()},
            "Resampling": f"model grid -> native grid, {mode} (mri.preprocess.to_native)",
            **dict(sidecar or {}),
            **dict((method_sidecars or {}).get(method, {})),
        }
        desc = (descriptions or {}).get(method) or f"neuroexplain {stage}: {method}"
        save_map(
            native,
            img,
            path,
            description=desc,
            intent="estimate",
            intent_name=f"{method}"[:16],
            sidecar=meta,
        )
        written[method] = path
    logger.debug("wrote %d maps for %s", len(written), subject)
    return written
