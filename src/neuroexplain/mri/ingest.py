"""``neuroexplain ingest-mri``: BIDS / sample sheet -> model-grid tensors + the map back to native.

Outputs in ``out/`` (each written atomically, only after every subject was processed, so a failed
run leaves nothing behind):

- ``preproc.pt`` — ``torch.save`` of a dict readable with ``torch.load(..., weights_only=True)``
  (use :func:`load_preproc`):

  ============== ================================ =============================================
  key            type / shape                     meaning
  ============== ================================ =============================================
  images         float32 ``(N, 1, X, Y, Z)``      normalised T1w on the model grid
  dseg           int16 ``(N, 1, X, Y, Z)`` | None label maps on the model grid
  subjects       list[str]                        participant ids (sorted)
  y              float32 ``(N,)``                 1 = positive class, 0 = other, NaN = no label
  label          list[str]                        raw label values (``""`` without labels)
  positive_class str | None                       the label value encoded as ``y = 1``
  model_affines  float64 ``(N, 4, 4)``            model voxel -> world mm (RAS+, diagonal)
  native_affines float64 ``(N, 4, 4)``            native voxel -> world mm (the T1w's affine)
  native_shapes  int64 ``(N, 3)``                 native grid shapes
  t1_paths       list[str]                        absolute T1w paths
  dseg_paths     list[str]                        absolute dseg paths (``""`` without dseg)
  dseg_names     dict[int, str]                   dseg index -> name (``dseg.tsv``), maybe empty
  groups         list[str]                        split group of each subject (source anatomy)
  params         dict                             options, spacing and ``provenance``
  ============== ================================ =============================================

- ``subjects.tsv`` — one row per subject: ids, paths, label, native shape, head extent, cropping.
- ``ingest.json`` — provenance and a summary (subjects, class counts, shape, spacing).

Preprocessing is described in :mod:`neuroexplain.mri.preprocess`; maps computed on the model grid
go back to a subject's native T1w grid with :func:`neuroexplain.mri.preprocess.to_native`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuroexplain.errors import InputError
from neuroexplain.mri.bids import (
    Cohort,
    apply_label_groups,
    encode_labels,
    find_bids_subjects,
    parse_label_groups,
    read_sample_sheet,
)
from neuroexplain.mri.preprocess import Grid, Preprocessed, model_spacing
from neuroexplain.settings import MRIIngestConfig
from neuroexplain.utils import release_memory

__all__ = [
    "MIN_BRAIN_FILL",
    "MIN_BRAIN_KEPT",
    "PER_SUBJECT_KEYS",
    "PREPROC_KEYS",
    "brain_mask",
    "check_on_grid",
    "ingest_mri",
    "load_preproc",
    "native_grid",
]

logger = logging.getLogger(__name__)

#: keys every ``preproc.pt`` holds
PREPROC_KEYS = (
    "images",
    "dseg",
    "subjects",
    "y",
    "label",
    "positive_class",
    "model_affines",
    "native_affines",
    "native_shapes",
    "t1_paths",
    "dseg_paths",
    "dseg_names",
    "groups",
    "params",
)
#: the keys of :data:`PREPROC_KEYS` with one entry per subject, in subject order (the others
#: describe the whole cohort)
PER_SUBJECT_KEYS = (
    "images",
    "dseg",
    "subjects",
    "y",
    "label",
    "model_affines",
    "native_affines",
    "native_shapes",
    "t1_paths",
    "dseg_paths",
    "groups",
)
_AXES = ("r", "a", "s")


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _work(task: tuple[str, str | None, dict[str, Any]]) -> tuple[str, Any, Any]:
    """Preprocess one subject; user errors come back as values (InputError does not pickle)."""
    from neuroexplain.mri.preprocess import preprocess_subject

    t1, dseg, kwargs = task
    try:
        return "ok", preprocess_subject(t1, dseg, **kwargs), None
    except InputError as exc:
        return "error", exc.path, exc.problem


def _run(
    tasks: list[tuple[str, str | None, dict[str, Any]]], workers: int, progress: bool
) -> list[Preprocessed]:
    from tqdm.auto import tqdm

    bar = dict(
        total=len(tasks), desc="ingest-mri", unit="subject", disable=None if progress else True
    )
    results: list[Preprocessed] = []

    def collect(it: Iterator[tuple[str, Any, Any]]) -> None:
        for status, a, b in tqdm(it, **bar):
            if status == "error":
                raise InputError(a, b)
            results.append(a)

    if workers <= 1 or len(tasks) <= 1:
        collect(map(_work, tasks))
        return results

    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # fork (Linux) shares the already imported torch / MONAI with the workers; importing them again
    # in each spawned worker costs ~10 s of CPU. Workers run single-threaded (as DataLoader
    # workers do), which is what makes forking a process that used torch safe.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ex = ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)),
        mp_context=mp.get_context(method),
        initializer=_init_worker,
    )
    try:
        collect(ex.map(_work, tasks, chunksize=1))  # map keeps the input order
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    return results


def _cohort(
    bids: Path | None,
    sheet: Path | None,
    derivatives: str | None,
    label_column: str | None,
    subjects: Sequence[str] | None,
    limit: int | None,
    group_column: str | None,
) -> Cohort:
    if (bids is None) == (sheet is None):
        raise InputError("--bids/--sheet", "expected exactly one of --bids or --sheet")
    subs = list(subjects) if subjects else None
    common = dict(label_column=label_column, subjects=subs, limit=limit, group_column=group_column)
    if bids is not None:
        return find_bids_subjects(bids, derivatives=derivatives, **common)
    return read_sample_sheet(sheet, **common)


#: a subject fails when less than this fraction of its labelled brain lands on the model grid
MIN_BRAIN_KEPT = 0.5
#: ... or when its labelled brain covers less than this fraction of the model grid's voxels (a
#: human brain fills ~10 % of the default 180-224 mm field of view; a voxel size in the wrong
#: unit shrinks it to a voxel or two)
MIN_BRAIN_FILL = 0.005


def _voxel_mm(affine: np.ndarray) -> str:
    sizes = np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(0))
    return "x".join(f"{v:.3g}" for v in sizes)


def check_on_grid(result: Preprocessed, t1: Path, subject: str, *, reference: bool = False) -> None:
    """Refuse a subject whose image or labelled brain is (nearly) lost on the model grid.

    Args:
        result: the subject on the model grid.
        t1: its T1w file (named in the error).
        subject: its participant id.
        reference: whether it is the ``--align labels`` reference (whose grid every subject gets).

    Raises:
        InputError: less than :data:`MIN_BRAIN_KEPT` of the labelled (dseg > 0) voxels inside the
            grid, a labelled brain covering less than :data:`MIN_BRAIN_FILL` of the grid, or an
            all-zero image on the grid.
    """
    role = (
        f"{subject}, the --align labels reference (whose grid every subject gets),"
        if reference
        else subject
    )
    fix = "choose another --align-reference or fix its affine" if reference else "fix its affine"
    vox = f"voxel size {_voxel_mm(result.native_affine)} mm"
    if result.dseg is not None:
        kept = 1.0 if result.brain_kept is None else result.brain_kept
        if kept < MIN_BRAIN_KEPT:
            raise InputError(
                t1,
                f"{role} keeps only {100 * kept:.2f} % of its labelled brain (dseg > 0) on the "
                f"model grid (expected >= {100 * MIN_BRAIN_KEPT:.0f} %; {vox}); {fix} or use a "
                "larger --fov-mm",
            )
        n = int((result.dseg > 0).sum())
        fill = n / result.dseg.size
        if fill < MIN_BRAIN_FILL:
            raise InputError(
                t1,
                f"{role} has a labelled brain (dseg > 0) covering only {n} of {result.dseg.size} "
                f"model voxels ({100 * fill:.2f} %, expected >= {100 * MIN_BRAIN_FILL:.1f} %; "
                f"{vox}: is it in mm?); {fix}",
            )
    if not np.any(result.image):
        raise InputError(t1, f"{role} is all-zero on the model grid ({vox}); {fix}")


def _reference(
    recs: Sequence[Any], reference: str | None, kwargs: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Reference grid and label centroids for ``align="labels"`` (first subject by default)."""
    from neuroexplain.io.nifti import load_labels, load_volume
    from neuroexplain.mri.preprocess import label_centroids, preprocess_subject

    if recs[0].dseg is None:
        raise InputError(
            "--align",
            "alignment by labels needs dseg label maps (--derivatives; without: --align none)",
        )
    ids = [r.subject for r in recs]
    if reference is not None and reference not in ids:
        raise InputError("--align-reference", f"subject {reference!r} is not among the subjects")
    rec = recs[ids.index(reference)] if reference is not None else recs[0]
    ref = preprocess_subject(rec.t1, rec.dseg, **kwargs)  # its own RAS grid centred on its head
    check_on_grid(ref, rec.t1, rec.subject, reference=True)
    img, _ = load_volume(rec.t1)
    _, dseg = load_labels(rec.dseg, img, like_path=rec.t1)
    logger.info("aligning every subject to the grid of %s (label centroids)", rec.subject)
    return rec.subject, {
        "reference_centroids": label_centroids(dseg, img.affine),
        "reference_affine": ref.model_affine,
    }


def ingest_mri(
    out: str | os.PathLike[str],
    bids: str | os.PathLike[str] | None = None,
    sheet: str | os.PathLike[str] | None = None,
    derivatives: str | None = "dlmuse",
    label_column: str | None = None,
    positive_class: str | None = None,
    config: MRIIngestConfig | None = None,
    *,
    subjects: Sequence[str] | None = None,
    limit: int | None = None,
    workers: int = 1,
    group_column: str | None = None,
    label_groups: Sequence[str] | Mapping[str, str] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Preprocess T1w images (and dseg maps) to the model grid and cache them in ``out/``.

    Args:
        out: output folder (``preproc.pt``, ``subjects.tsv``, ``ingest.json``).
        bids: BIDS dataset root (exclusive with ``sheet``).
        sheet: sample sheet with columns ``subject, t1[, dseg][, label]``.
        derivatives: BIDS derivatives folder with ``*_dseg`` maps (``None``: no dseg).
        label_column: label column of ``participants.tsv`` / the sheet (sheet default ``label``).
        positive_class: label value encoded as ``y = 1`` (default: second of two sorted values).
        config: the model grid and the preprocessing
            (:class:`~neuroexplain.settings.MRIIngestConfig`: shape, field of view, intensity
            normalisation, head-mask threshold, alignment and brain mask; default: its
            defaults, the workflow's, which align by labels and mask the brain and therefore
            need dseg maps); keyword ``overrides`` replace its fields
            (``shape=(96, 96, 96), align="none", mask="none"``). ``model_affines`` map each
            subject's model grid to its own native space exactly, aligned or not.
        subjects: subset of participant ids.
        limit: only the first ``limit`` subjects (sorted by id).
        workers: parallel worker processes (results do not depend on it).
        group_column: ``participants.tsv`` / sheet column of split groups (default:
            ``source_subject`` when present); stored as ``groups``.
        label_groups: classes from a numeric label column, ``NAME=CONDITION`` (or a mapping),
            e.g. ``["young=<40", "old=>60"]`` on ``age``
            (:func:`~neuroexplain.mri.bids.parse_label_groups`); subjects in no group, or with
            no value, are left out.
        progress: show a progress bar (only on a terminal).

    Returns:
        The summary written to ``ingest.json``.

    Raises:
        InputError: any bad input (naming the file); nothing is written then.

    Example:
        >>> ingest_mri("results/ingest", bids="../shared/data/ixi", limit=4)  # doctest: +SKIP
        >>> ingest_mri("results/plain", sheet="sheet.tsv", align="none", mask="none",
        ...            fov_mm=224)  # doctest: +SKIP
    """
    import pandas as pd

    from neuroexplain.io.atomic import output_group, save_torch, write_json, write_table
    from neuroexplain.provenance import provenance

    cfg = MRIIngestConfig.resolve(config, **overrides)
    if workers < 1:
        raise InputError("--workers", f"expected >= 1, got {workers}")
    spacing = model_spacing(cfg.shape, cfg.fov_mm)
    bids_p = Path(bids).resolve() if bids is not None else None
    sheet_p = Path(sheet).resolve() if sheet is not None else None
    ing = _load_and_preprocess(
        cfg,
        spacing,
        bids_p,
        sheet_p,
        derivatives,
        label_column,
        positive_class,
        subjects=subjects,
        limit=limit,
        workers=workers,
        group_column=group_column,
        label_groups=label_groups,
        progress=progress,
    )
    fit = _check_head_fit(ing, cfg.shape)

    # ---- assemble --------------------------------------------------------------------------
    options = {
        "bids": str(bids_p) if bids_p else None,
        "sheet": str(sheet_p) if sheet_p else None,
        "derivatives": derivatives if ing.has_dseg else None,
        "label_column": ing.cohort.label_column,
        "positive_class": ing.positive,
        "label_groups": (
            {k: " ".join(str(v) for v in c if v is not None) for k, c in ing.groups.items()}
            if ing.groups
            else None
        ),
        "shape": list(cfg.shape),
        "fov_mm": float(cfg.fov_mm),
        "spacing_mm": ing.spacing,
        "subjects": list(subjects) if subjects else None,
        "limit": limit,
        "workers": int(workers),
        "norm": cfg.norm,
        "fg_threshold": float(cfg.fg_threshold),
        "align": cfg.align,
        "align_reference": ing.reference_id,
        "mask": cfg.mask,
        "mask_margin_mm": float(cfg.mask_margin_mm),
    }
    recs = ing.recs
    inputs = [*ing.cohort.inputs, *(r.t1 for r in recs), *(r.dseg for r in recs if r.dseg)]
    prov = provenance(options, inputs=inputs, command="ingest-mri")
    data = _preproc_data(ing, cfg, options, prov)
    rows = _subject_rows(ing)
    summary = _ingest_summary(ing, cfg, prov, fit)

    out_dir = Path(out)
    with output_group(out_dir):  # all three or none (e.g. on a full disk)
        save_torch(data, out_dir / "preproc.pt")  # the big one first
        write_table(pd.DataFrame(rows), out_dir / "subjects.tsv")
        write_json(summary, out_dir / "ingest.json")
    logger.info("wrote %s (%d subjects)", out_dir / "preproc.pt", len(recs))
    return summary


@dataclass
class _Ingested:
    """What :func:`ingest_mri` has read and preprocessed, before it assembles its outputs."""

    cohort: Cohort
    y: np.ndarray
    positive: str | None
    counts: Any
    has_dseg: bool
    spacing: float
    results: list[Preprocessed]
    doubtful: list[str]
    reference_id: str | None
    groups: dict[str, tuple[str, float, float | None]] | None = None

    @property
    def recs(self) -> list[Any]:
        return self.cohort.records


def _load_and_preprocess(
    cfg: MRIIngestConfig,
    spacing: float,
    bids_p: Path | None,
    sheet_p: Path | None,
    derivatives: str | None,
    label_column: str | None,
    positive_class: str | None,
    *,
    subjects: Sequence[str] | None,
    limit: int | None,
    workers: int,
    group_column: str | None,
    label_groups: Sequence[str] | Mapping[str, str] | None,
    progress: bool,
) -> _Ingested:
    """Read the cohort and its labels (or label groups), check them, preprocess every subject."""
    from neuroexplain.io.nifti import orientation_warnings

    shape = cfg.shape
    cohort = _cohort(bids_p, sheet_p, derivatives, label_column, subjects, limit, group_column)
    groups = parse_label_groups(label_groups) if label_groups else None
    if groups:
        cohort = apply_label_groups(cohort, groups)
    y, positive, counts = encode_labels(cohort, positive_class)
    recs = cohort.records
    has_dseg = recs[0].dseg is not None
    if cfg.mask == "brain" and not has_dseg:
        raise InputError(
            "--mask", "a brain mask needs dseg label maps (--derivatives; without: --mask none)"
        )
    logger.info(
        "ingesting %d subject(s) to %s voxels of %.3g mm (dseg: %s, workers: %d)",
        len(recs),
        "x".join(map(str, shape)),
        spacing,
        "yes" if has_dseg else "no",
        workers,
    )

    kwargs: dict[str, Any] = dict(
        shape=shape, fov_mm=float(cfg.fov_mm), norm=cfg.norm, fg_threshold=float(cfg.fg_threshold)
    )
    # doubtful orientations (sform / qform that disagree, no codes): one warning per file, here
    # in the main process so that ingest.json lists them (worker processes stay quiet on them)
    doubtful = orientation_warnings([p for r in recs for p in (r.t1, r.dseg) if p is not None])
    reference_id = None
    if cfg.align == "labels":
        reference_id, kwargs["reference"] = _reference(recs, cfg.align_reference, kwargs)
    tasks = [(str(r.t1), str(r.dseg) if r.dseg else None, kwargs) for r in recs]
    results = _run(tasks, workers, progress)
    for rec, r in zip(recs, results, strict=True):
        check_on_grid(r, rec.t1, rec.subject)
    return _Ingested(
        cohort, y, positive, counts, has_dseg, spacing, results, doubtful, reference_id, groups
    )


def _check_head_fit(ing: _Ingested, shape: Sequence[int]) -> tuple[np.ndarray, list, list]:
    """Log the head's extent and warn of cropped heads and lost brain: extents, cropped, cut."""
    recs, results, spacing = ing.recs, ing.results, ing.spacing
    extents = np.stack([r.fg_extent_mm for r in results])
    cropped = [rec.subject for rec, r in zip(recs, results, strict=True) if r.cropped]
    logger.info(
        "head bounding box (R, A, S) in mm: min %s, max %s; model field of view %s mm",
        np.round(extents.min(0), 1).tolist(),
        np.round(extents.max(0), 1).tolist(),
        [round(spacing * s, 1) for s in shape],
    )
    if cropped:
        worst = np.stack([r.crop_mm.sum(1) for r in results]).max(0)
        # with a dseg we know whether brain tissue was lost (warned below); without, warn here
        log = logger.info if ing.has_dseg else logger.warning
        log(
            "%d subject(s) have a head larger than the field of view and were cropped "
            "(at most %s mm along R, A, S; face and neck go first), e.g. %s",
            len(cropped),
            np.round(worst, 1).tolist(),
            ", ".join(cropped[:3]),
        )
    brain_cut = [
        (rec.subject, r.brain_kept)
        for rec, r in zip(recs, results, strict=True)
        if r.brain_kept is not None and r.brain_kept < 1.0
    ]
    if brain_cut:
        logger.warning(
            "%d subject(s) lose labelled (dseg > 0) voxels outside the model grid, worst %s "
            "keeps %.2f%%; consider a larger --fov-mm",
            len(brain_cut),
            min(brain_cut, key=lambda t: t[1])[0],
            100 * min(b for _, b in brain_cut),
        )
    return extents, cropped, brain_cut


def _preproc_data(
    ing: _Ingested, cfg: MRIIngestConfig, options: dict[str, Any], prov: dict[str, Any]
) -> dict[str, Any]:
    """The ``preproc.pt`` content: images (brain-masked), labels, grids, paths, parameters.

    Each subject's arrays are copied into the stacked tensors one at a time and then released
    from ``ing.results`` (set to ``None``), so that assembling ``N`` subjects needs about one copy
    of the data (``preproc.pt``'s size), not the stack plus every subject's arrays plus a
    whole-cohort mask (three times as much: ~4.5 GB for 1,000 subjects at 64³).
    """
    import torch

    recs, results = ing.recs, ing.results
    n, shape = len(results), tuple(results[0].image.shape)
    images = torch.empty((n, 1, *shape), dtype=torch.float32)
    dseg = torch.empty((n, 1, *shape), dtype=torch.int16) if ing.has_dseg else None
    margin_vox = cfg.mask_margin_mm / ing.spacing
    for i, r in enumerate(results):
        img = torch.from_numpy(np.asarray(r.image, dtype=np.float32))
        if dseg is not None:
            dseg[i, 0] = torch.from_numpy(np.asarray(r.dseg, dtype=np.int16))
        if cfg.mask == "brain":  # the same mask as on the whole stack: the ball is 3D
            img = img * torch.from_numpy(brain_mask(dseg[i, 0].numpy() > 0, margin_vox))
        images[i, 0] = img
        r.image, r.dseg = None, None  # released as copied (the rest of the record is kept)
        if i % 16 == 15:
            # glibc keeps the freed arrays in its heap: hand them back as the stack fills, so
            # that the peak is one copy of the data, not two (1,000 subjects: 1.5 GB less)
            release_memory()
    release_memory()
    return {
        "images": images,
        "dseg": dseg,
        "subjects": [r.subject for r in recs],
        "y": torch.from_numpy(ing.y.astype(np.float32)),
        "label": [r.label for r in recs],
        "positive_class": ing.positive,
        "model_affines": torch.from_numpy(np.stack([r.model_affine for r in results])),
        "native_affines": torch.from_numpy(np.stack([r.native_affine for r in results])),
        "native_shapes": torch.tensor([list(r.native_shape) for r in results], dtype=torch.int64),
        "t1_paths": [str(r.t1) for r in recs],
        "dseg_paths": [str(r.dseg) if r.dseg else "" for r in recs],
        "dseg_names": dict(ing.cohort.dseg_names),
        "groups": [r.group or r.subject for r in recs],
        # plain JSON types only: torch.load(weights_only=True) rejects e.g. torch's TorchVersion
        "params": json.loads(json.dumps({**options, "provenance": prov}, default=str)),
    }


def _subject_rows(ing: _Ingested) -> list[dict[str, Any]]:
    """The ``subjects.tsv`` rows: paths, label, group, head extent and cropping."""
    rows = []
    for rec, r, yi in zip(ing.recs, ing.results, ing.y, strict=True):
        row: dict[str, Any] = {
            "participant_id": rec.subject,
            "t1": str(rec.t1),
            "dseg": str(rec.dseg) if rec.dseg else "",
            "label": rec.label,
            "group": rec.group or rec.subject,
            "y": "" if np.isnan(yi) else int(yi),
            "native_shape": "x".join(map(str, r.native_shape)),
        }
        for a, ax in enumerate(_AXES):
            row[f"fg_extent_{ax}_mm"] = round(float(r.fg_extent_mm[a]), 2)
        for a, ax in enumerate(_AXES):
            row[f"crop_{ax}_mm"] = round(float(r.crop_mm[a].sum()), 2)
        row["cropped"] = r.cropped
        row["brain_kept"] = "" if r.brain_kept is None else round(r.brain_kept, 6)
        rows.append(row)
    return rows


def _ingest_summary(
    ing: _Ingested,
    cfg: MRIIngestConfig,
    prov: dict[str, Any],
    fit: tuple[np.ndarray, list, list],
) -> dict[str, Any]:
    """The ``ingest.json`` content."""
    extents, cropped, brain_cut = fit
    shape, spacing, y = cfg.shape, ing.spacing, ing.y
    return {
        "provenance": prov,
        "n_subjects": len(ing.recs),
        "label_column": ing.cohort.label_column,
        "positive_class": ing.positive,
        "class_counts": ing.counts,
        "n_positive": int(np.nansum(y)) if ing.positive is not None else None,
        "shape": list(shape),
        "spacing_mm": spacing,
        "fov_mm": [spacing * s for s in shape],
        "dseg": ing.has_dseg,
        "norm": cfg.norm,
        "fg_extent_mm": {
            "min": extents.min(0).tolist(),
            "median": np.median(extents, 0).tolist(),
            "max": extents.max(0).tolist(),
        },
        "n_cropped": len(cropped),
        "n_brain_cropped": len(brain_cut),
        "outputs": ["preproc.pt", "subjects.tsv", "ingest.json"],
        "warnings": ing.doubtful,
    }


def brain_mask(labelled: np.ndarray, margin_vox: float) -> np.ndarray:
    """``labelled`` (bool, any leading axes then ``X, Y, Z``) dilated by a ball of ``margin_vox``.

    Returns:
        float32 array of the same shape, 1 inside the dilated mask, 0 outside.

    Example:
        >>> m = np.zeros((1, 9, 9, 9), bool); m[0, 4, 4, 4] = True
        >>> int(brain_mask(m, 2.0).sum())
        33
    """
    from scipy import ndimage

    r = int(np.floor(margin_vox))
    grid = np.indices((2 * r + 1,) * 3) - r
    ball = (grid**2).sum(0) <= margin_vox**2
    ball = ball.reshape((1,) * (labelled.ndim - 3) + ball.shape)
    return ndimage.binary_dilation(labelled, structure=ball).astype(np.float32)


def load_preproc(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check a ``preproc.pt`` written by :func:`ingest_mri` (``weights_only=True``).

    Args:
        path: the ``preproc.pt`` file (or the ingest output folder holding it).

    Returns:
        The dict described in this module's docstring (tensors on CPU).

    Raises:
        InputError: missing, unreadable or truncated file, or missing keys / inconsistent shapes.

    Example:
        >>> pre = load_preproc("results/ingest/preproc.pt")  # doctest: +SKIP
        >>> pre["images"].shape  # doctest: +SKIP
        torch.Size([100, 1, 64, 64, 64])
    """
    import torch

    from neuroexplain.io.checkpoint import load_torch

    p = Path(path)
    if p.is_dir():
        p = p / "preproc.pt"
    if not p.is_file():
        raise InputError(p, "file not found (run neuroexplain ingest-mri first)")
    data = load_torch(p, what="preproc.pt")
    if not isinstance(data, dict):
        raise InputError(p, f"expected a dict written by ingest-mri, got {type(data).__name__}")
    if "groups" not in data and isinstance(data.get("subjects"), list):
        data["groups"] = list(data["subjects"])  # written before groups existed: one per subject
    missing = [k for k in PREPROC_KEYS if k not in data]
    if missing:
        raise InputError(p, f"expected a preproc.pt from ingest-mri, missing keys {missing}")
    images = data["images"]
    if not (isinstance(images, torch.Tensor) and images.ndim == 5 and images.shape[1] == 1):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(p, f"expected images of shape (N, 1, X, Y, Z), got {got}")
    n = images.shape[0]
    expect = {
        "model_affines": (n, 4, 4),
        "native_affines": (n, 4, 4),
        "native_shapes": (n, 3),
        "y": (n,),
    }
    for key, shp in expect.items():
        v = data[key]
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != shp:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise InputError(p, f"expected {key} of shape {shp}, got {got}")
    if data["dseg"] is not None and tuple(data["dseg"].shape) != tuple(images.shape):
        raise InputError(
            p, f"expected dseg of shape {tuple(images.shape)}, got {tuple(data['dseg'].shape)}"
        )
    for key in ("subjects", "label", "t1_paths", "dseg_paths", "groups"):
        if len(data[key]) != n:
            raise InputError(p, f"expected {n} entries in {key}, got {len(data[key])}")
    return data


def native_grid(preproc: dict[str, Any], index: int) -> Grid:
    """The native grid of subject ``index`` (for :func:`~neuroexplain.mri.preprocess.to_native`).

    Returns:
        ``Grid(affine (4, 4) float64, shape (X, Y, Z))`` — the same grid as the subject's T1w file,
        without reading it.
    """
    affine = np.asarray(preproc["native_affines"][index], dtype=np.float64)
    shape = tuple(int(s) for s in np.asarray(preproc["native_shapes"][index]))
    return Grid(affine, shape)
