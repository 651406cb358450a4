"""Synthetic disease cohort with an exact Jacobian ground truth (``neuroexplain make-cohort``).

From real T1w images and their label maps, a disease effect is planted in a seeded, balanced
subset of subjects (``round(fraction * N)`` exactly): a smooth, invertible deformation shrinks
the ``shrink`` regions and enlarges the ``enlarge`` regions, each by the subject's magnitude
(a fractional volume change drawn uniformly from ``magnitude_range``); with
``label_probability`` < 1, each diseased subject gets the effect in its own random subset of
those labels (a heterogeneous disease), the others kept unplanted. Every subject may also get
a mild random smooth *nuisance* deformation first, as part of its "healthy" anatomy; it is not
part of the ground truth and is recorded as a separate map.

Design (why the ground truth is exact). The deformation is defined by its *pull-back* field on
the diseased grid: the diseased image at voxel ``x`` shows the healthy anatomy at
``phi(x) = x + w(x)``, with ``w = sum_r alpha_r K^-1 grad(G_sigma * m_r)`` -- the gradient of each
region's Gaussian-smoothed indicator ``m_r`` (``K = diag(spacing^2)``). ``G_sigma * m_r`` is a
finite sum of Gaussian kernels, an analytic function; its derivatives at the grid points are
exactly Gaussian derivative filters, so ``det(I + Dw)`` is exact at every voxel of the diseased
image, with no finite differences, interpolation or inversion. The disease map
``psi = phi^-1`` (healthy -> diseased) exists because ``w`` is small and smooth (the minimum
determinant of both maps is checked and recorded). The ground truth is then

    J_gt(x) = det(D psi)(psi^-1(x)) = 1 / det(I + Dw)(x)

-- exact on the grid the classifier and every saliency method sees. (Defining ``w`` on the
healthy grid instead would need the field and its derivatives between grid points to map the
ground truth into the diseased image, i.e. interpolation.) ``alpha_r`` is calibrated per subject
and region by secant steps so that the realised volume change, the integral over the healthy
region of ``det(D psi)`` (evaluated at 2^3 points per voxel through a fixed-point inversion of
``phi``, residual < 1e-4 voxel), equals the drawn magnitude within 2e-4.

Sign convention. All maps are in the DISEASED image's space. ``J_gt`` is the volume of tissue in
the diseased image relative to its healthy original: ``log J > 0`` means tissue expanded
(enlarged ventricles), ``log J < 0`` means it shrank (hippocampal atrophy). Controls have
``J = 1`` and ``log J = 0`` exactly. The nuisance map uses the same convention (healthy relative
to source), also sampled in diseased space; the total source -> diseased log-Jacobian is the sum
of the two maps.

Images and labels. The T1w is resampled once through the composite pull-back (cubic B-spline,
clipped to the source intensity range, float32); voxels the deformation does not move are
copied, so a control without nuisance is identical to its source. Labels are carried by
one-hot-linear argmax and then the planted regions' voxel counts are matched to their
supersampled partial volumes (:func:`neuroexplain.synth.fields.carry_labels`): at 2 mm a 20 %
hippocampal shrinkage moves the boundary by ~0.3 voxel, which plain nearest-neighbour label
warping does not register at all.

Reference: the synthetic-atrophy experiments of Liu et al., "Simulator networks", IPMI 2021.

Example:
    >>> make_cohort("ixi", "cohort", shrink=[47, 48], enlarge=[51, 52], paired=False,
    ...             fraction=0.5, limit=4)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shutil
import sys
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neuroexplain.errors import InputError, NeuroexplainError
from neuroexplain.settings import CohortConfig

__all__ = ["SubjectEffect", "make_cohort", "plant_subject"]

logger = logging.getLogger(__name__)

COMMAND = "make-cohort"
GROUNDTRUTH = "groundtruth"
CONVENTION = (
    "Maps are in the space of the diseased T1w. jacobian = volume of tissue in the diseased "
    "image relative to its healthy original (det of the healthy->diseased map at the tissue's "
    "position); logjacobian > 0: expanded, < 0: shrunk; controls: exactly 1 / 0."
)


# ------------------------------------------------------------------------------- one subject
@dataclass
class SubjectEffect:
    """The planted disease of one subject (all arrays ``(X, Y, Z)`` on the source grid).

    Attributes:
        t1: deformed T1w, float32.
        labels: carried label map (source dtype).
        jacobian: ground-truth disease Jacobian in diseased space (float64; 1 for controls).
        nuisance_logjacobian: log-Jacobian of the nuisance deformation in diseased space, or
            ``None`` without nuisance.
        planted_mask: union of the affected labels in the carried label map (bool).
        ddf: ``(3, X, Y, Z)`` disease pull-back displacement in voxels (diseased -> healthy).
        stats: realised volume changes, calibration and invertibility diagnostics.
    """

    t1: np.ndarray
    labels: np.ndarray
    jacobian: np.ndarray
    nuisance_logjacobian: np.ndarray | None
    planted_mask: np.ndarray
    ddf: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


def plant_subject(
    t1: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    *,
    shrink: Sequence[int] = (47, 48),
    enlarge: Sequence[int] = (51, 52),
    magnitude: float = 0.0,
    nuisance: float = 0.0,
    nuisance_sigma: float = 12.0,
    sigma: float = 4.0,
    rng: np.random.Generator | None = None,
    label_interpolation: str = "linear",
    affected: Sequence[int] | None = None,
) -> SubjectEffect:
    """Plant the disease effect (``magnitude`` > 0) or none (control) in one subject, in memory.

    Args:
        t1: ``(X, Y, Z)`` T1w intensities.
        labels: ``(X, Y, Z)`` integer label map on the same grid.
        spacing: voxel size in mm.
        shrink: labels shrunk by ``magnitude`` (fractional volume change).
        enlarge: labels enlarged by ``magnitude``.
        magnitude: fractional volume change; 0 = control.
        nuisance: largest nuisance displacement in mm (0 = none).
        nuisance_sigma: smoothness of the nuisance field in mm.
        sigma: smoothness of the disease field in mm.
        rng: random generator for the nuisance field.
        label_interpolation: ``"linear"`` or ``"nearest"`` hard label sampling (the planted
            regions' volumes are matched to their partial volumes either way).
        affected: the labels of ``shrink`` / ``enlarge`` that get the effect (``None`` = all).
            The others keep their own field at zero; their realised volume change (what the
            neighbours' fields do to them) is still measured and reported.

    Returns:
        A :class:`SubjectEffect`.

    Raises:
        neuroexplain.synth.fields.CalibrationError: the effect or nuisance would fold.
    """
    sp = np.asarray(spacing, dtype=float)
    planted = [int(r) for r in (*shrink, *enlarge)]
    hit = set(planted) if affected is None else {int(r) for r in affected}
    if hit - set(planted):
        raise ValueError(f"affected labels {sorted(hit - set(planted))} are not in shrink/enlarge")
    rng = rng if rng is not None else np.random.default_rng(0)
    stats: dict[str, Any] = {}

    nui, masks = _plant_nuisance(
        labels, sp, planted, nuisance=nuisance, nuisance_sigma=nuisance_sigma, rng=rng, stats=stats
    )
    dis = _plant_disease(
        masks,
        t1.shape,
        sp,
        shrink=shrink,
        enlarge=enlarge,
        hit=hit,
        magnitude=magnitude,
        sigma=sigma,
        stats=stats,
    )
    stats["healthy_volume_vox"] = {r: float(m.sum()) for r, m in masks.items()}
    out_t1, out_labels = _resample_subject(t1, labels, nui, dis, planted, label_interpolation)
    counts = {r: int((out_labels == r).sum()) for r in planted}
    stats["label_volume_vox"] = counts
    stats["volume_change_labels"] = {
        r: counts[r] / stats["healthy_volume_vox"][r] - 1.0 for r in planted
    }
    return SubjectEffect(
        t1=out_t1,
        labels=out_labels,
        jacobian=dis.jacobian,
        nuisance_logjacobian=_nuisance_logjacobian(nui, dis),
        planted_mask=np.isin(out_labels, sorted(hit)),
        ddf=dis.ddf,
        stats=stats,
    )


@dataclass
class _Warp:
    """One planted deformation: its pull-back, a sampler of it off the grid, what it moves."""

    ddf: np.ndarray | None = None
    sampler: Any = None
    det: np.ndarray | None = None
    jacobian: np.ndarray | None = None
    moved: np.ndarray | None = None


def _plant_nuisance(
    labels: np.ndarray,
    sp: np.ndarray,
    planted: list[int],
    *,
    nuisance: float,
    nuisance_sigma: float,
    rng: np.random.Generator,
    stats: dict[str, Any],
) -> tuple[_Warp, dict[int, np.ndarray]]:
    """The nuisance field ``healthy(y) = source(y + u(y))`` and the healthy planted masks."""
    from neuroexplain.jacobian import det3x3
    from neuroexplain.synth import fields as F

    shape = labels.shape
    if nuisance <= 0:
        return _Warp(), {r: (labels == r).astype(np.float64) for r in planted}
    u, du = F.random_smooth_field(shape, sp, nuisance, nuisance_sigma, rng)
    for a in range(3):
        du[a, a] += 1.0
    det_n = det3x3(du)
    del du
    lo = float(det_n.min())
    stats["nuisance_min_det"] = float(1.0 / det_n.max())
    stats["nuisance_max_det"] = float(1.0 / lo)
    stats["nuisance_max_displacement_mm"] = float(nuisance)
    if lo <= 0.1 or 1.0 / det_n.max() <= 0.1:
        raise F.CalibrationError(
            f"the nuisance field would fold (min det {min(lo, 1 / det_n.max()):.3f}); "
            "lower --nuisance or increase --nuisance-sigma"
        )
    samplers = [F.spline_sampler(u[a]) for a in range(3)]

    def u_sampler(p: np.ndarray) -> np.ndarray:
        return np.stack([s(p) for s in samplers])

    healthy_coords = np.indices(shape, dtype=np.float64).reshape(3, -1) + u.reshape(3, -1)
    everywhere = np.ones(shape, dtype=bool)
    masks = {
        r: F.partial_volume(
            labels == r, lambda p: p + u_sampler(p), everywhere, healthy_coords, supersample=3
        )
        for r in planted
    }
    return _Warp(ddf=u, sampler=u_sampler, det=det_n), masks


def _plant_disease(
    masks: dict[int, np.ndarray],
    shape: tuple[int, ...],
    sp: np.ndarray,
    *,
    shrink: Sequence[int],
    enlarge: Sequence[int],
    hit: set[int],
    magnitude: float,
    sigma: float,
    stats: dict[str, Any],
) -> _Warp:
    """The disease field ``diseased(x) = healthy(x + w(x))`` (none for a control)."""
    from neuroexplain.synth import fields as F

    if not (magnitude > 0 and hit):
        stats.update(
            volume_change=dict.fromkeys(masks, 0.0),
            min_det=1.0,
            max_det=1.0,
            max_displacement_mm=0.0,
        )
        return _Warp(
            ddf=np.zeros((3, *shape)), jacobian=np.ones(shape), moved=np.zeros(shape, dtype=bool)
        )
    target = {r: -float(magnitude) for r in shrink if r in hit} | {
        r: float(magnitude) for r in enlarge if r in hit
    }
    pf = F.plant_field(masks, target, sp, sigma_mm=sigma)
    ddf, box = pf.ddf, pf.support
    stats.update(
        volume_change=pf.volume_change,
        alphas=pf.alphas,
        calibration_iterations=pf.iterations,
        inversion_iterations=pf.inversion.iterations,
        inversion_residual_vox=pf.inversion.max_residual,
        min_det=pf.min_det,
        max_det=pf.max_det,
        min_det_pullback=float(pf.det_pullback.min()),
        max_displacement_mm=pf.max_displacement_mm(sp),
    )
    w_samplers = [F.spline_sampler(ddf[a], box) for a in range(3)]

    def w_sampler(p: np.ndarray) -> np.ndarray:
        return np.stack([s(p) for s in w_samplers])

    return _Warp(ddf=ddf, sampler=w_sampler, jacobian=pf.jacobian, moved=np.any(ddf != 0, axis=0))


def _resample_subject(
    t1: np.ndarray,
    labels: np.ndarray,
    nui: _Warp,
    dis: _Warp,
    planted: list[int],
    label_interpolation: str,
) -> tuple[np.ndarray, np.ndarray]:
    """T1w and labels through the composite pull-back ``T(x) = q + u(q)``, ``q = x + w(x)``."""
    from neuroexplain.synth import fields as F

    ddf, moved, u, u_sampler, w_sampler = dis.ddf, dis.moved, nui.ddf, nui.sampler, dis.sampler
    # only where something moves
    changed = np.ones(t1.shape, dtype=bool) if u_sampler is not None else moved
    idx = np.nonzero(changed)
    q = np.stack(idx).astype(np.float64) + ddf[:, changed]
    if u_sampler is not None:  # u is exact on the grid; interpolate only where q moved off it
        coords = q + u[:, changed]
        off_grid = moved[changed]
        if off_grid.any():
            coords[:, off_grid] = q[:, off_grid] + u_sampler(q[:, off_grid])
    else:
        coords = q

    def transform(p: np.ndarray) -> np.ndarray:
        qq = p + w_sampler(p) if w_sampler is not None else p
        return qq + u_sampler(qq) if u_sampler is not None else qq

    out_t1 = np.asarray(t1, dtype=np.float32).copy()
    out_labels = np.asarray(labels).copy()
    if changed.any():
        vals = F.sample(np.asarray(t1, dtype=np.float64), coords, order=3)
        out_t1[idx] = np.clip(vals, float(t1.min()), float(t1.max()))
        carried = F.carry_labels(
            labels, transform, changed, coords, track=planted, method=label_interpolation
        )
        out_labels = carried.labels
    return out_t1, out_labels


def _nuisance_logjacobian(nui: _Warp, dis: _Warp) -> np.ndarray | None:
    """Log-Jacobian of the nuisance deformation in diseased space (``None`` without one)."""
    from neuroexplain.synth import fields as F

    if nui.det is None:
        return None
    log_det_n = np.log(nui.det)
    nlj = -log_det_n
    if dis.moved.any():
        midx = np.nonzero(dis.moved)
        qm = np.stack(midx).astype(np.float64) + dis.ddf[:, dis.moved]
        nlj[midx] = -F.sample(log_det_n, qm, order=3)
    return nlj


# ---------------------------------------------------------------------------------- validation
def _find_subjects(bids: Path, derivatives: str) -> list[tuple[str, Path, Path]]:
    if not bids.is_dir():
        raise InputError(bids, "expected a BIDS dataset folder, got no such folder")
    deriv = bids / "derivatives" / derivatives
    if not deriv.is_dir():
        raise InputError(deriv, f"expected the label derivatives folder {derivatives!r}, not found")
    subjects = []
    for sub_dir in sorted(p for p in bids.glob("sub-*") if p.is_dir()):
        sub = sub_dir.name
        t1s = sorted((sub_dir / "anat").glob(f"{sub}_*T1w.nii*"))
        if not t1s:
            continue
        if len(t1s) > 1:
            raise InputError(sub_dir / "anat", f"expected one T1w image, got {len(t1s)}")
        dsegs = sorted((deriv / sub / "anat").glob(f"{sub}_*dseg.nii*"))
        if len(dsegs) != 1:
            raise InputError(
                deriv / sub / "anat",
                f"expected one {sub}_*dseg.nii.gz label map, got {len(dsegs)}",
            )
        subjects.append((sub, t1s[0], dsegs[0]))
    if not subjects:
        raise InputError(bids, "expected sub-*/anat/sub-*_T1w.nii.gz images, found none")
    return subjects


def _check_out(out: Path, bids: Path) -> None:
    o, b = out.resolve(), bids.resolve()
    if o == b or b in o.parents:
        raise InputError(out, f"expected an output folder outside the source dataset {bids}")
    if o in b.parents:
        raise InputError(out, f"expected an output folder that does not contain {bids}")
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / "cohort.json").exists())
    ):
        raise InputError(
            out, "refusing to replace an existing folder that is not a make-cohort output"
        )


def _read_participants(bids: Path) -> dict[str, dict[str, str]]:
    path = bids / "participants.tsv"
    if not path.exists():
        return {}
    import pandas as pd

    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable TSV table ({exc})") from exc
    if "participant_id" not in df.columns:
        raise InputError(path, "expected a participant_id column")
    return {row["participant_id"]: dict(row) for _, row in df.iterrows()}


def _read_label_names(deriv: Path) -> dict[int, str]:
    path = deriv / "dseg.tsv"
    if not path.exists():
        return {}
    import pandas as pd

    try:
        df = pd.read_csv(path, sep="\t")
        return {int(i): str(n) for i, n in zip(df["index"], df["name"], strict=True)}
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(
            path, f"expected a BIDS dseg.tsv with index and name columns ({exc})"
        ) from exc


def _validate_subject(t1: Path, dseg: Path, planted: dict[int, str]) -> None:
    import nibabel as nib

    from neuroexplain.io.nifti import load_labels, warn_orientation

    if not t1.exists():
        raise InputError(t1, "file not found")
    try:
        ref = nib.load(str(t1))
    except Exception as exc:  # any reader failure is a bad input file
        raise InputError(t1, f"not a readable NIfTI file ({exc})") from exc
    warn_orientation(ref, t1)  # the cohort's images get codes: the doubt would be lost
    _, lab = load_labels(dseg, like=ref, like_path=t1)
    present = set(np.unique(lab).tolist())
    missing = [r for r in planted if r not in present]
    if missing:
        desc = ", ".join(f"{r} ({planted[r]})" for r in missing)
        raise InputError(dseg, f"planted label(s) {desc} not found in this label map")


def _subject_seed(seed: int, sub: str) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed) % (2**63), zlib.crc32(sub.encode())])


# ----------------------------------------------------------------------------------- outputs
def _save_like(data: np.ndarray, ref: Any, path: Path, dtype: Any, description: str) -> None:
    import nibabel as nib

    from neuroexplain.io.atomic import atomic_output

    hdr = ref.header.copy()
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(1.0, 0.0)
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), ref.affine, hdr)
    sform, scode = ref.get_sform(coded=True)
    qform, qcode = ref.get_qform(coded=True)
    img.set_sform(ref.affine if sform is None else sform, code=int(scode) or 1)
    img.set_qform(ref.affine if qform is None else qform, code=int(qcode) or 1)
    if description:
        img.header["descrip"] = description.encode("utf-8")[:80]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        nib.save(img, str(tmp))


def _run_subject(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: plant, write the subject's files into ``task["root"]``, return its record."""
    try:
        return _run_subject_inner(task)
    except NeuroexplainError as exc:  # InputError does not survive pickling: send it as data
        return {"error": [getattr(exc, "path", None), getattr(exc, "problem", str(exc))]}


def _run_subject_inner(task: dict[str, Any]) -> dict[str, Any]:
    from neuroexplain import __version__
    from neuroexplain.io.nifti import load_labels, load_volume, save_displacement, save_map
    from neuroexplain.provenance import provenance
    from neuroexplain.synth.fields import CalibrationError

    sub, root = task["sub"], Path(task["root"])
    t1_img, t1 = load_volume(task["t1"])
    lab_img, labels = load_labels(task["dseg"], like=t1_img, like_path=task["t1"])
    spacing = [float(z) for z in t1_img.header.get_zooms()[:3]]
    magnitude = float(task["magnitude"])
    try:
        eff = plant_subject(
            t1,
            labels,
            spacing,
            shrink=task["shrink"],
            enlarge=task["enlarge"],
            magnitude=magnitude,
            nuisance=task["nuisance"],
            nuisance_sigma=task["nuisance_sigma"],
            sigma=task["sigma"],
            # seeded by the source: both versions of a paired subject get one nuisance field
            rng=np.random.default_rng(_subject_seed(task["seed"], task.get("source", sub))),
            label_interpolation=task["label_interpolation"],
            affected=task["affected"],
        )
    except CalibrationError as exc:
        raise InputError(
            task["dseg"], f"cannot plant a {magnitude:.3f} volume change in {sub}: {exc}"
        ) from exc

    anat = root / sub / "anat"
    _save_like(eff.t1, t1_img, anat / f"{sub}_T1w.nii.gz", np.float32, "")
    dseg_out = root / "derivatives" / task["derivatives"] / sub / "anat" / f"{sub}_dseg.nii.gz"
    _save_like(eff.labels, lab_img, dseg_out, lab_img.get_data_dtype(), "carried labels")

    gt = root / "derivatives" / GROUNDTRUTH / sub / "anat"
    gt.mkdir(parents=True, exist_ok=True)
    diseased = bool(task["diseased"])
    hit = task["affected"] if task["affected"] is not None else task["shrink"] + task["enlarge"]
    base = {
        "GeneratedBy": {"Name": f"neuroexplain {COMMAND}", "Version": __version__},
        "Sources": [f"bids::{sub}/anat/{sub}_T1w.nii.gz"],
        "SpatialReference": f"bids::{sub}/anat/{sub}_T1w.nii.gz",
        "Convention": CONVENTION,
        "Diagnosis": "disease" if diseased else "control",
        "EffectMagnitude": magnitude,
        "ShrunkLabels": [r for r in task["shrink"] if r in hit] if diseased else [],
        "EnlargedLabels": [r for r in task["enlarge"] if r in hit] if diseased else [],
        "RealisedVolumeChange": {str(k): v for k, v in eff.stats["volume_change"].items()},
        "Parameters": {
            "sigma_mm": task["sigma"],
            "nuisance_mm": task["nuisance"],
            "nuisance_sigma_mm": task["nuisance_sigma"],
            "seed": task["seed"],
        },
        # seed, parameters, their hash, package version and the source files' checksums
        "Provenance": provenance(
            {k: v for k, v in task.items() if k not in ("root", "t1", "dseg")},
            seed=task["seed"],
            inputs=[task["t1"], task["dseg"]],
            command=COMMAND,
        ),
    }
    save_map(
        eff.jacobian, t1_img, gt / f"{sub}_desc-disease_jacobian.nii.gz",
        description="disease Jacobian det (diseased space); >1 expanded",
        intent_name="jacobian",
        sidecar={**base, "Units": "ratio (tissue volume diseased / healthy)"},
    )  # fmt: skip
    save_map(
        np.log(eff.jacobian), t1_img, gt / f"{sub}_desc-disease_logjacobian.nii.gz",
        description="disease log-Jacobian (diseased space); >0 expanded, <0 shrunk",
        intent_name="logjacobian",
        sidecar={**base, "Units": "log ratio"},
    )  # fmt: skip
    if eff.nuisance_logjacobian is not None:
        save_map(
            eff.nuisance_logjacobian, t1_img, gt / f"{sub}_desc-nuisance_logjacobian.nii.gz",
            description="nuisance log-Jacobian (healthy vs source, diseased space)",
            intent_name="logjacobian",
            sidecar={
                **base,
                "Units": "log ratio",
                "Note": "Not part of the ground truth; total source->diseased log-Jacobian "
                "= disease + nuisance.",
            },
        )  # fmt: skip
    save_map(
        eff.planted_mask.astype(np.float32), t1_img, gt / f"{sub}_desc-planted_mask.nii.gz",
        description="union of the planted regions (carried labels)", intent="label",
        intent_name="mask",
        sidecar={**base, "Labels": hit},
    )  # fmt: skip
    # pull-back displacement in mm along RAS+ world axes (as save_displacement documents)
    world = np.einsum("ab,b...->...a", t1_img.affine[:3, :3], eff.ddf)
    save_displacement(
        world, t1_img, gt / f"{sub}_desc-disease_xfm.nii.gz",
        description="disease pull-back displacement diseased->healthy, mm RAS",
        sidecar={
            **base,
            "Units": "mm",
            "Direction": "pull-back: the diseased T1w at world point p shows the healthy "
            "anatomy at p + d(p); d is in RAS+ world axes",
        },
    )  # fmt: skip
    stats = eff.stats
    return {
        "participant_id": sub,
        "diagnosis": "disease" if diseased else "control",
        "effect_magnitude": magnitude,
        "affected_labels": hit if diseased else [],
        **{k: _jsonable(v) for k, v in stats.items()},
    }


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    return v


def _readme(
    shrink: list[int], enlarge: list[int], names: dict[int, str], n: int, n_dis: int, paired: bool
) -> str:
    def fmt(lst: list[int]) -> str:
        return ", ".join(f"{r} ({names.get(r, '?')})" for r in lst) or "none"

    pairs = (
        "\nPaired design: sub-<source>ctl (control) and sub-<source>dis (diseased) share one "
        "source anatomy;\nkeep both in the same split (group by source_subject)."
        if paired
        else ""
    )
    return f"""Synthetic disease cohort made by `neuroexplain {COMMAND}`.

{n} subjects, {n_dis} with a planted disease effect (participants.tsv: diagnosis,
effect_magnitude, affected_labels, source_subject, realised volume change per planted
region).{pairs}
Shrunk labels: {fmt(shrink)}.
Enlarged labels: {fmt(enlarge)}.

Ground truth: derivatives/{GROUNDTRUTH}/sub-*/anat/
  *_desc-disease_jacobian.nii.gz     Jacobian determinant of the disease deformation
  *_desc-disease_logjacobian.nii.gz  its log
  *_desc-nuisance_logjacobian.nii.gz nuisance deformation (not ground truth), if any
  *_desc-planted_mask.nii.gz         planted regions in the carried label map
  *_desc-disease_xfm.nii.gz          pull-back displacement (mm, RAS+)

Sign convention: {CONVENTION}

The diseased image at voxel x shows the healthy anatomy at x + w(x); the Jacobian map is
1 / det(I + Dw(x)), computed exactly from Gaussian derivative filters (see the docstring of
neuroexplain.synth.cohort). Provenance (seed, parameters, input checksums) in cohort.json.
Source images: IXI (CC BY-SA 3.0) and DL-MUSE labels (NiChart) where applicable.
"""


# ----------------------------------------------------------------------------------- cohort
def make_cohort(
    bids: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: CohortConfig | None = None,
    *,
    derivatives: str = "dlmuse",
    limit: int | None = None,
    workers: int = 1,
    **overrides: Any,
) -> Path:
    """Write a BIDS cohort with a planted disease effect and its exact Jacobian ground truth.

    Args:
        bids: source BIDS dataset (``sub-*/anat/sub-*_T1w.nii.gz``, ``participants.tsv``).
        out: output folder (written atomically: complete, or not at all).
        config: the planted effect (:class:`~neuroexplain.settings.CohortConfig`: labels,
            pairing or fraction, magnitude range, nuisance, smoothness, label interpolation,
            label probability, seed; default: its defaults, the workflow's); keyword
            ``overrides`` replace its fields (``shrink=[47, 48], paired=False``). With
            ``paired``, every source subject gives ``sub-<id>ctl`` (control) and
            ``sub-<id>dis`` (diseased, same anatomy and nuisance field): with the anatomy
            identical across classes, a classifier must learn the disease itself rather than
            anatomical differences between the two groups; split such a cohort by
            ``source_subject`` (``neuroexplain train-classifier`` does) so that no anatomy is in
            two splits. With ``label_probability`` < 1 the disease is heterogeneous: the
            unaffected labels of a diseased subject are still measured (their
            ``volume_change`` shows what the neighbouring fields do to them) but are not in its
            planted mask.
        derivatives: name of the label derivatives folder (``derivatives/<name>/sub-*/anat/
            sub-*_dseg.nii.gz``, ``dseg.tsv``).
        limit: use only the first ``limit`` subjects (sorted by id).
        workers: worker processes (results do not depend on it).

    Returns:
        ``out``. The folder holds ``dataset_description.json``, ``README``,
        ``participants.tsv`` / ``.json`` (participant_id, diagnosis, effect_magnitude,
        affected_labels, source_subject, sex, volume_change_<label>), ``cohort.json``
        (provenance and per-subject diagnostics), ``sub-*/anat/sub-*_T1w.nii.gz``,
        ``derivatives/<derivatives>/`` (carried labels, ``dseg.tsv``) and
        ``derivatives/groundtruth/`` (maps, see README).

    Raises:
        InputError: bad option, missing / unreadable inputs, a planted label absent from a
            subject's label map, or an effect that cannot be planted without folding.
    """
    from neuroexplain.io.atomic import atomic_output, write_json
    from neuroexplain.provenance import provenance

    cfg = CohortConfig.resolve(config, **overrides)
    shrink_l, enlarge_l = list(cfg.shrink), list(cfg.enlarge)
    if limit is not None and limit < 1:
        raise InputError("--limit", f"expected at least 1 subject, got {limit}")
    if workers < 1:
        raise InputError("--workers", f"expected at least 1 worker, got {workers}")
    bids_p, out_p = Path(bids), Path(out)
    src = _load_cohort_sources(bids_p, out_p, cfg, derivatives, limit)
    plan = _plan_cohort(cfg, src.subjects)
    n, n_dis = plan.n, plan.n_dis
    params = _cohort_params(cfg, src, plan, derivatives, limit)
    mag_lo, mag_hi = cfg.magnitude_range
    logger.info(
        "planting shrink=%s enlarge=%s in %d of %d subjects%s (magnitude %.2f-%.2f, "
        "nuisance %.1f mm)",
        shrink_l, enlarge_l, n_dis, n, " (paired: a control and a diseased version of each "
        "source subject)" if cfg.paired else "", mag_lo, mag_hi, cfg.nuisance,
    )  # fmt: skip

    with atomic_output(out_p, directory=True) as tmp:
        tasks = _cohort_tasks(cfg, src, plan, tmp, derivatives)
        records = _run_all(tasks, workers)
        _write_participants(tmp, records, tasks, src, shrink_l, enlarge_l)
        _write_dataset_descriptions(tmp, src, derivatives)
        (tmp / "README").write_text(_readme(shrink_l, enlarge_l, src.names, n, n_dis, cfg.paired))
        inputs = [p for _, t1, dseg in src.subjects for p in (t1, dseg)]
        summary = _summary(records, shrink_l, enlarge_l)
        write_json(
            {
                **provenance(params, seed=cfg.seed, inputs=inputs, command=COMMAND),
                "convention": CONVENTION,
                "summary": summary,
                "subjects": records,
            },
            tmp / "cohort.json",
        )
    logger.info(
        "wrote %s: %d subjects; forward-map det in [%.3f, %.3f]",
        out_p, n, summary["min_det"], summary["max_det"],
    )  # fmt: skip
    return out_p


@dataclass
class _CohortSources:
    """The checked inputs of :func:`make_cohort`: source subjects, labels, participants."""

    bids: Path
    deriv: Path
    subjects: list[tuple[str, Path, Path]]
    names: dict[int, str]
    participants: dict[str, dict[str, str]]


@dataclass
class _CohortPlan:
    """Who gets the disease: output ids, sources, magnitudes and the labels each one gets."""

    entries: list[tuple[str, int, bool]]
    magnitudes: np.ndarray
    affected: list[list[int] | None]

    @property
    def n(self) -> int:
        return len(self.entries)

    @property
    def n_dis(self) -> int:
        return sum(dis for _, _, dis in self.entries)


def _load_cohort_sources(
    bids_p: Path, out_p: Path, cfg: CohortConfig, derivatives: str, limit: int | None
) -> _CohortSources:
    """Find and check the source subjects (every planted label in every label map)."""
    subjects = _find_subjects(bids_p, derivatives)
    if limit is not None:
        subjects = subjects[:limit]
    _check_out(out_p, bids_p)
    deriv = bids_p / "derivatives" / derivatives
    names = _read_label_names(deriv)
    participants = _read_participants(bids_p)
    planted = {r: names.get(r, "not in dseg.tsv") for r in (*cfg.shrink, *cfg.enlarge)}
    for _, t1, dseg in subjects:
        _validate_subject(t1, dseg, planted)
    return _CohortSources(bids_p, deriv, subjects, names, participants)


def _plan_cohort(cfg: CohortConfig, subjects: list[tuple[str, Path, Path]]) -> _CohortPlan:
    """The seeded, balanced assignment of the disease (paired: a control and a diseased each)."""
    n_source = len(subjects)
    seed = cfg.seed
    mag_lo, mag_hi = cfg.magnitude_range
    rng = np.random.default_rng(seed)
    if cfg.paired:  # (output id, source index, diseased) for every output subject
        entries = [(f"{sub}{tag}", i, tag == "dis") for i, (sub, _, _) in enumerate(subjects)
                   for tag in ("ctl", "dis")]  # fmt: skip
        magnitudes = rng.uniform(mag_lo, mag_hi, size=n_source)
    else:
        n_pick = math.floor(cfg.fraction * n_source + 0.5)
        picked = set(rng.permutation(n_source)[:n_pick].tolist())
        magnitudes = rng.uniform(mag_lo, mag_hi, size=n_source)
        entries = [(sub, i, i in picked) for i, (sub, _, _) in enumerate(subjects)]
    labels_all = [*cfg.shrink, *cfg.enlarge]
    affected: list[list[int] | None] = [None] * n_source
    if cfg.label_probability < 1:  # own stream: probability 1 draws nothing and changes nothing
        rng_hit = np.random.default_rng([int(seed), 1])
        for i in range(n_source):
            hit = rng_hit.random(len(labels_all)) < cfg.label_probability
            if not hit.any():
                hit[rng_hit.integers(len(labels_all))] = True
            affected[i] = [r for r, h in zip(labels_all, hit, strict=True) if h]
    return _CohortPlan(entries, magnitudes, affected)


def _cohort_params(
    cfg: CohortConfig, src: _CohortSources, plan: _CohortPlan, derivatives: str, limit: int | None
) -> dict[str, Any]:
    """The parameters of the run, for ``cohort.json``."""
    mag_lo, mag_hi = cfg.magnitude_range
    return {
        "bids": str(src.bids.resolve()),
        "derivatives": derivatives,
        "shrink": list(cfg.shrink),
        "enlarge": list(cfg.enlarge),
        "fraction": float(cfg.fraction),
        "magnitude_range": [mag_lo, mag_hi],
        "nuisance": float(cfg.nuisance),
        "nuisance_sigma": float(cfg.nuisance_sigma),
        "sigma": float(cfg.sigma),
        "limit": limit,
        "label_interpolation": cfg.label_interpolation,
        "paired": bool(cfg.paired),
        "label_probability": float(cfg.label_probability),
        "n_subjects": plan.n,
        "n_disease": plan.n_dis,
    }


def _cohort_tasks(
    cfg: CohortConfig, src: _CohortSources, plan: _CohortPlan, root: Path, derivatives: str
) -> list[dict[str, Any]]:
    """One task of :func:`_run_subject` per output subject, writing under ``root``."""
    subjects = src.subjects
    return [
        {
            "sub": sub,
            "source": subjects[i][0],
            "t1": str(subjects[i][1]),
            "dseg": str(subjects[i][2]),
            "root": str(root),
            "derivatives": derivatives,
            "shrink": list(cfg.shrink),
            "enlarge": list(cfg.enlarge),
            "diseased": dis,
            "magnitude": float(plan.magnitudes[i]) if dis else 0.0,
            "affected": plan.affected[i] if dis else None,
            "nuisance": float(cfg.nuisance),
            "nuisance_sigma": float(cfg.nuisance_sigma),
            "sigma": float(cfg.sigma),
            "seed": int(cfg.seed),
            "label_interpolation": cfg.label_interpolation,
        }
        for sub, i, dis in plan.entries
    ]


def _write_participants(
    tmp: Path,
    records: list[dict[str, Any]],
    tasks: list[dict[str, Any]],
    src: _CohortSources,
    shrink_l: list[int],
    enlarge_l: list[int],
) -> None:
    """Write ``participants.tsv`` and its ``participants.json`` column descriptions."""
    import pandas as pd

    from neuroexplain.io.atomic import write_json, write_table

    participants = src.participants
    rows = []
    for rec, task in zip(records, tasks, strict=True):
        source = task["source"]
        row = {
            "participant_id": task["sub"],
            "diagnosis": rec["diagnosis"],
            "effect_magnitude": rec["effect_magnitude"],
            "affected_labels": ",".join(str(r) for r in rec["affected_labels"]),
            "source_subject": source,
        }
        if participants.get(source, {}).get("sex"):
            row["sex"] = participants[source]["sex"]
        for r in (*shrink_l, *enlarge_l):
            row[f"volume_change_{r}"] = rec["volume_change"][str(r)]
        rows.append(row)
    table = pd.DataFrame(rows)
    write_table(table, tmp / "participants.tsv")
    columns = {
        "participant_id": {"Description": "Subject id, the same as in the source dataset."},
        "diagnosis": {
            "Description": "Planted effect.",
            "Levels": {"disease": "effect planted", "control": "no effect"},
        },
        "effect_magnitude": {
            "Description": "Requested fractional volume change of the planted regions "
            "(0 for controls)."
        },
        "affected_labels": {
            "Description": "Planted labels that got the effect (comma-separated; all of "
            "them unless --label-probability < 1; empty for controls)."
        },
        "source_subject": {
            "Description": "Subject of the source dataset (shared by the control and the "
            "diseased version of a paired cohort: split by this column)."
        },
        "sex": {"Description": "From the source participants.tsv."},
    }
    for r in (*shrink_l, *enlarge_l):
        kind = "shrunk" if r in shrink_l else "enlarged"
        columns[f"volume_change_{r}"] = {
            "Description": f"Realised fractional volume change of label {r} "
            f"({src.names.get(r, '?')}, {kind}): integral over the healthy region of the "
            "ground-truth Jacobian / healthy volume - 1."
        }
    write_json({k: v for k, v in columns.items() if k in table.columns}, tmp / "participants.json")


def _write_dataset_descriptions(tmp: Path, src: _CohortSources, derivatives: str) -> None:
    """``dataset_description.json`` of the cohort and of its two derivatives; ``dseg.tsv``."""
    from neuroexplain import __version__
    from neuroexplain.io.atomic import write_json

    bids_p, deriv = src.bids, src.deriv
    source_desc = bids_p / "dataset_description.json"
    write_json(
        {
            "Name": f"Synthetic disease cohort from {bids_p.name}",
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "GeneratedBy": [
                {
                    "Name": f"neuroexplain {COMMAND}",
                    "Version": __version__,
                    "Description": "Planted disease effect with exact Jacobian ground truth.",
                }
            ],
            "SourceDatasets": [{"URL": str(bids_p.resolve())}],
            "License": _source_field(source_desc, "License", "see source dataset"),
        },
        tmp / "dataset_description.json",
    )
    deriv_out = tmp / "derivatives" / derivatives
    deriv_out.mkdir(parents=True, exist_ok=True)
    if (deriv / "dseg.tsv").exists():
        shutil.copyfile(deriv / "dseg.tsv", deriv_out / "dseg.tsv")
    write_json(
        {
            "Name": f"{derivatives} labels carried into the synthetic cohort",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [
                {"Name": f"neuroexplain {COMMAND}", "Version": __version__},
                *_source_field(deriv / "dataset_description.json", "GeneratedBy", []),
            ],
        },
        deriv_out / "dataset_description.json",
    )
    write_json(
        {
            "Name": "Ground truth of the planted disease effect",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": f"neuroexplain {COMMAND}", "Version": __version__}],
            "Convention": CONVENTION,
        },
        tmp / "derivatives" / GROUNDTRUTH / "dataset_description.json",
    )


def _source_field(path: Path, key: str, default: Any) -> Any:
    import json

    try:
        return json.loads(path.read_text()).get(key, default)
    except (OSError, ValueError):
        return default


def _summary(records: list[dict[str, Any]], shrink: list[int], enlarge: list[int]) -> dict:
    dis = [r for r in records if r["diagnosis"] == "disease"]
    out: dict[str, Any] = {
        "n_subjects": len(records),
        "n_disease": len(dis),
        "min_det": min((r["min_det"] for r in records), default=1.0),
        "max_det": max((r["max_det"] for r in records), default=1.0),
    }
    if dis:
        for key in ("volume_change", "volume_change_labels"):
            out[key] = {
                str(lab): {
                    "min": min(r[key][str(lab)] for r in dis),
                    "max": max(r[key][str(lab)] for r in dis),
                }
                for lab in (*shrink, *enlarge)
            }
        out["max_target_error"] = max(
            abs(r["volume_change"][str(lab)] - (-1 if lab in shrink else 1) * r["effect_magnitude"])
            for r in dis
            for lab in r.get("affected_labels", (*shrink, *enlarge))
        )
        out["max_label_vs_jacobian_rel_diff"] = max(
            abs((1 + r["volume_change_labels"][str(lab)]) / (1 + r["volume_change"][str(lab)]) - 1)
            for r in dis
            for lab in (*shrink, *enlarge)
        )
        out["max_inversion_residual_vox"] = max(r.get("inversion_residual_vox", 0.0) for r in dis)
        out["max_displacement_mm"] = max(r["max_displacement_mm"] for r in dis)
    if records and "nuisance_min_det" in records[0]:
        out["nuisance_min_det"] = min(r["nuisance_min_det"] for r in records)
        out["nuisance_max_det"] = max(r["nuisance_max_det"] for r in records)
    return out


def _run_all(tasks: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """Run the subjects (in a process pool when ``workers > 1``); results in task order."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    results: list[dict[str, Any] | None] = [None] * len(tasks)
    progress = Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), disable=not sys.stderr.isatty(), transient=True,
    )  # fmt: skip

    def accept(i: int, res: dict[str, Any]) -> None:
        if "error" in res:
            path, problem = res["error"]
            raise InputError(path, problem)
        results[i] = res
        logger.debug("%s done", tasks[i]["sub"])

    with progress:
        bar = progress.add_task("make-cohort", total=len(tasks))
        if workers == 1 or len(tasks) == 1:
            for i, task in enumerate(tasks):
                accept(i, _run_subject(task))
                progress.advance(bar)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as ex:
                futures = [ex.submit(_run_subject, t) for t in tasks]
                try:
                    for i, fut in enumerate(futures):
                        accept(i, fut.result())
                        progress.advance(bar)
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    return [r for r in results if r is not None]
