"""Score attribution maps against the planted ground truth of a synthetic cohort.

Shared by every explanation method (baselines, simulator, SACV, XNN): a method is just a set of
native-space NIfTI maps, one per subject, found through a path template. For each **diseased**
subject (``participants.tsv``: ``diagnosis == disease``) and each method, inside the brain
(``dseg > 0`` on the subject's native grid):

- ``ncc_abs``: normalised cross-correlation of ``|map|`` with the ground-truth ``|log J|``
  (where the planted deformation changed tissue, regardless of direction);
- ``ncc_signed``: NCC of the signed map with the signed ``log J`` (``log J > 0`` = tissue
  expanded in the diseased image);
- ``top{k}_in_regions``: fraction of the top ``k`` % brain voxels by ``|map|`` that lie in the
  planted regions (``k`` = 1, 5 by default);
- ``chance_in_regions``: the planted regions' share of the brain, i.e. the expected
  ``top{k}_in_regions`` of a map unrelated to the effect.

The planted regions are the cohort's ``*_desc-planted_mask.nii.gz`` or, with ``regions=``, the
dseg labels listed (e.g. ``[47, 48, 51, 52]``); nothing here is tied to particular labels.

Expected cohort layout (``neuroexplain make-cohort``)::

    participants.tsv                          participant_id, diagnosis, effect_magnitude
    derivatives/<dseg derivatives>/sub-X/anat/sub-X_dseg.nii.gz
    derivatives/groundtruth/sub-X/anat/sub-X_desc-disease_logjacobian.nii.gz
    derivatives/groundtruth/sub-X/anat/sub-X_desc-planted_mask.nii.gz   (optional)

Example:
    >>> df = evaluate_maps("results/cohort", {"ig": "results/saliency"},
    ...                    subjects=["sub-IXI002Guys0828"])  # doctest: +SKIP
    >>> summarize(df)  # doctest: +SKIP
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuroexplain.errors import InputError

__all__ = [
    "GROUNDTRUTH_DIR",
    "diseased_subjects",
    "evaluate_maps",
    "ground_truth_paths",
    "markdown_table",
    "ncc",
    "parse_subjects",
    "resolve_map",
    "score_map",
    "summarize",
    "topk_fraction",
    "write_evaluation",
]

logger = logging.getLogger(__name__)

GROUNDTRUTH_DIR = "groundtruth"


# ------------------------------------------------------------------------------------ metrics


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised cross-correlation (Pearson r) of two volumes inside ``mask``.

    Args:
        a: ``(X, Y, Z)`` volume.
        b: ``(X, Y, Z)`` volume on the same grid.
        mask: ``(X, Y, Z)`` bool, default everywhere.

    Returns:
        ``sum((a - mean a)(b - mean b)) / sqrt(sum (a - mean a)² sum (b - mean b)²)`` in
        ``[-1, 1]``; NaN when either volume is constant inside the mask.

    Example:
        >>> x = np.arange(8.0).reshape(2, 2, 2)
        >>> round(ncc(x, 2 * x + 1), 6)
        1.0
    """
    av = np.asarray(a, dtype=np.float64)
    bv = np.asarray(b, dtype=np.float64)
    if mask is not None:
        av, bv = av[mask], bv[mask]
    av = av.ravel() - av.mean()
    bv = bv.ravel() - bv.mean()
    den = float(np.sqrt(np.dot(av, av) * np.dot(bv, bv)))
    if den <= 0 or not np.isfinite(den):
        return float("nan")
    return float(np.dot(av, bv) / den)


def topk_fraction(
    values: np.ndarray, regions: np.ndarray, mask: np.ndarray, k_percent: float
) -> float:
    """Fraction of the top ``k_percent`` % of ``|values|`` in ``mask`` that lie in ``regions``.

    Args:
        values: ``(X, Y, Z)`` map.
        regions: ``(X, Y, Z)`` bool planted regions.
        mask: ``(X, Y, Z)`` bool brain mask (the voxels ranked).
        k_percent: percentage of mask voxels to keep (at least one voxel).

    Returns:
        A fraction in ``[0, 1]``. Ties are broken by voxel order (deterministic).
    """
    v = np.abs(np.asarray(values, dtype=np.float64)[mask])
    r = np.asarray(regions, dtype=bool)[mask]
    if v.size == 0:
        return float("nan")
    n = max(1, round(v.size * float(k_percent) / 100.0))
    # stable order so constant maps give a reproducible (arbitrary) answer
    top = np.argsort(-v, kind="stable")[:n]
    return float(r[top].mean())


def score_map(
    values: np.ndarray,
    logj: np.ndarray,
    brain: np.ndarray,
    regions: np.ndarray,
    *,
    topk: Sequence[float] = (1, 5),
) -> dict[str, float]:
    """All metrics of one map against one subject's ground truth (arrays on the same grid).

    Args:
        values: ``(X, Y, Z)`` attribution map.
        logj: ``(X, Y, Z)`` ground-truth log-Jacobian determinant of the planted effect.
        brain: ``(X, Y, Z)`` bool brain mask.
        regions: ``(X, Y, Z)`` bool planted regions.
        topk: percentages for the ``top{k}_in_regions`` metrics.

    Returns:
        ``{"ncc_abs", "ncc_signed", "top{k}_in_regions"..., "chance_in_regions"}``.
    """
    out = {
        "ncc_abs": ncc(np.abs(values), np.abs(logj), brain),
        "ncc_signed": ncc(values, logj, brain),
    }
    for k in topk:
        out[f"top{_fmt_k(k)}_in_regions"] = topk_fraction(values, regions, brain, k)
    n_brain = int(brain.sum())
    out["chance_in_regions"] = float((regions & brain).sum() / n_brain) if n_brain else float("nan")
    return out


def _fmt_k(k: float) -> str:
    return str(int(k)) if float(k).is_integer() else str(k).replace(".", "p")


# --------------------------------------------------------------------------------- the cohort


def _full_id(s: str) -> str:
    s = str(s).strip()
    return s if s.startswith("sub-") else f"sub-{s}"


def _read_participants(cohort: Path) -> Any:
    import pandas as pd

    tsv = cohort / "participants.tsv"
    if not tsv.is_file():
        raise InputError(tsv, "participants.tsv not found (is this a make-cohort output?)")
    df = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
    if "participant_id" not in df.columns:
        raise InputError(tsv, f"expected a participant_id column, got {list(df.columns)}")
    df["participant_id"] = [_full_id(s) for s in df["participant_id"]]
    return df


def diseased_subjects(
    cohort_dir: str | os.PathLike[str],
    *,
    label_column: str = "diagnosis",
    positive_class: str = "disease",
) -> list[str]:
    """Participant ids (``sub-...``) of the cohort whose ``label_column`` is ``positive_class``."""
    cohort = Path(cohort_dir)
    df = _read_participants(cohort)
    if label_column not in df.columns:
        raise InputError(
            cohort / "participants.tsv",
            f"expected a {label_column!r} column, got {list(df.columns)}",
        )
    return sorted(df.loc[df[label_column] == positive_class, "participant_id"].tolist())


def _one(pattern: str, what: str, where: Path) -> Path:
    hits = sorted(glob.glob(pattern))
    if len(hits) != 1:
        problem = "not found" if not hits else f"{len(hits)} candidates ({', '.join(hits[:3])})"
        raise InputError(where, f"{what}: {problem} for pattern {pattern}")
    return Path(hits[0])


def ground_truth_paths(
    cohort_dir: str | os.PathLike[str], subject: str, *, derivatives: str = "dlmuse"
) -> dict[str, Path | None]:
    """Paths of a subject's ground truth in a make-cohort output.

    Returns:
        ``{"logjacobian": path, "dseg": path, "mask": path or None}`` (planted mask optional).

    Raises:
        InputError: a missing log-Jacobian or dseg.
    """
    cohort = Path(cohort_dir)
    sub = _full_id(subject)
    gt = cohort / "derivatives" / GROUNDTRUTH_DIR / sub
    logj = _one(
        str(gt / "**" / f"{sub}*_desc-disease_logjacobian.nii*"),
        "ground-truth log-Jacobian",
        cohort,
    )
    dseg = _one(
        str(cohort / "derivatives" / derivatives / sub / "**" / f"{sub}*_dseg.nii*"), "dseg", cohort
    )
    masks = sorted(glob.glob(str(gt / "**" / f"{sub}*_desc-planted_mask.nii*"), recursive=True))
    return {"logjacobian": logj, "dseg": dseg, "mask": Path(masks[0]) if masks else None}


def resolve_map(
    spec: str | os.PathLike[str] | Mapping[str, Path], subject: str, method: str
) -> Path:
    """Find one subject's map for ``method`` from a manifest, a folder or a path template.

    Args:
        spec: the method's ``{subject: path}`` of a maps manifest
            (:class:`neuroexplain.stage.MapFiles`, see :func:`neuroexplain.stage.manifest_maps`);
            or a template containing ``{subject}`` (``sub-X``), ``{label}`` (``X``) and/or
            ``{method}``, optionally with glob wildcards, e.g.
            ``results/saliency/{subject}/{subject}_desc-ig_saliency.nii.gz``; or a folder laid
            out as ``<folder>/sub-X/sub-X_desc-<method>_*.nii.gz`` (BIDS derivative), where a
            folder holding a single NIfTI per subject also works.
        subject: participant id.
        method: the method name (used by the folder form and ``{method}``).

    Returns:
        The single matching file.

    Raises:
        InputError: no file or several files match.
    """
    sub = _full_id(subject)
    if isinstance(spec, Mapping):
        from neuroexplain.stage import MapFiles

        if isinstance(spec, MapFiles):
            return spec.path(sub)
        if sub not in spec:
            raise InputError(f"maps of {method!r}", f"no map listed for {sub}")
        return Path(spec[sub])
    text = str(spec)
    if "{" in text:
        pattern = text.format(subject=sub, label=sub[4:], method=method)
        return _one(pattern, f"map of {method!r} for {sub}", Path(text))
    folder = Path(text)
    if not folder.is_dir():
        raise InputError(
            folder, f"map folder of {method!r} not found (or use a {{subject}} template)"
        )
    for pat in (
        folder / sub / "**" / f"{sub}*_desc-{method}_*.nii*",
        folder / f"{sub}*_desc-{method}_*.nii*",
    ):
        hits = sorted(glob.glob(str(pat), recursive=True))
        if len(hits) == 1:
            return Path(hits[0])
        if len(hits) > 1:
            raise InputError(folder, f"{len(hits)} maps of {method!r} for {sub}: {hits[:3]}")
    hits = sorted(glob.glob(str(folder / sub / "**" / "*.nii*"), recursive=True))
    if len(hits) == 1:
        return Path(hits[0])
    raise InputError(
        folder, f"no map of {method!r} for {sub} (expected {sub}/{sub}_desc-{method}_*.nii.gz)"
    )


def parse_subjects(spec: str | Sequence[str] | None, *, split: str = "test") -> list[str] | None:
    """Subjects to evaluate from a CLI-style spec.

    Args:
        spec: ``None`` / ``"all"`` (every diseased subject); a ``split.tsv`` file (columns
            ``subject``, ``split``; rows of ``split`` are taken, in the file's order, by
            :func:`neuroexplain.stage.select_subjects`); a text file with one id per line;
            a comma-separated list; or a sequence of ids.
        split: which split(s) of a ``split.tsv`` to take (``"test"``, ``"val,test"``,
            ``"all"``).

    Returns:
        ``sub-...`` ids, or ``None`` for all.
    """
    import pandas as pd

    if spec is None:
        return None
    if not isinstance(spec, str):
        return [_full_id(s) for s in spec]
    if spec.strip().lower() == "all":
        return None
    p = Path(spec)
    if p.is_file():
        text = p.read_text().splitlines()
        header = text[0].split("\t") if text else []
        if "subject" in header and "split" in header:
            from neuroexplain.stage import SPLIT_NAMES, select_subjects

            df = pd.read_csv(p, sep="\t", dtype=str)
            ids, names = df["subject"].tolist(), [n.strip() for n in split.split(",")]
            if not (split.strip().lower() == "all" or all(n in SPLIT_NAMES for n in names)):
                raise InputError(p, f"no subjects in split {split!r}")
            rows = select_subjects(
                split, ids, df["split"].tolist(), split_source=p, among=f"the {p.name}"
            )
            return [_full_id(ids[i]) for i in rows]
        return [_full_id(line) for line in text if line.strip()]
    if spec.endswith((".tsv", ".txt", ".csv")) or os.sep in spec:
        raise InputError(spec, "subject list file not found")
    return [_full_id(s) for s in spec.split(",") if s.strip()]


# --------------------------------------------------------------------------------- evaluation


def evaluate_maps(
    cohort_dir: str | os.PathLike[str],
    maps: Mapping[str, str | os.PathLike[str] | Mapping[str, Path]],
    subjects: Sequence[str] | None = None,
    *,
    regions: Sequence[int] | None = None,
    topk: Sequence[float] = (1, 5),
    label_column: str = "diagnosis",
    positive_class: str = "disease",
    derivatives: str = "dlmuse",
    progress: bool | None = None,
) -> Any:
    """Score every method's maps on the diseased subjects of a synthetic cohort.

    Args:
        cohort_dir: ``neuroexplain make-cohort`` output (BIDS with ground-truth derivatives).
        maps: ``{method: folder, path template or manifest files}`` (see :func:`resolve_map`).
        subjects: ids to evaluate (e.g. the test split); only diseased ones are scored. ``None``:
            all diseased subjects.
        regions: dseg label indices of the planted regions; ``None``: the cohort's planted masks.
        topk: percentages for ``top{k}_in_regions``.
        label_column: participants.tsv column with the diagnosis.
        positive_class: diagnosis value of diseased subjects.
        derivatives: derivatives folder with the (carried) dseg label maps.
        progress: show a progress bar (``None``: only on a terminal).

    Returns:
        Per-subject DataFrame with columns ``method, subject, effect_magnitude, ncc_abs,
        ncc_signed, top{k}_in_regions..., chance_in_regions, map``.

    Raises:
        InputError: no diseased subject to score, missing ground truth or maps, or a map that is
            not on the subject's native grid.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from neuroexplain.io.nifti import check_same_grid, load_labels, load_map
    from neuroexplain.utils import check_region_labels

    cohort = Path(cohort_dir)
    if not maps:
        raise InputError("--maps", "expected at least one METHOD=PATH or a --manifest")
    part = _read_participants(cohort)
    diseased = set(
        diseased_subjects(cohort, label_column=label_column, positive_class=positive_class)
    )
    known = set(part["participant_id"])
    if subjects is None:
        chosen = sorted(diseased)
    else:
        ids = [_full_id(s) for s in subjects]
        unknown = [s for s in ids if s not in known]
        if unknown:
            raise InputError(
                cohort / "participants.tsv",
                f"{len(unknown)} requested subjects not in the cohort, e.g. {unknown[:3]}",
            )
        chosen = [s for s in ids if s in diseased]
    if not chosen:
        raise InputError(
            cohort / "participants.tsv",
            f"no {positive_class!r} subjects among the {len(subjects or [])} requested",
        )
    magnitude = dict(
        zip(part["participant_id"], part.get("effect_magnitude", [""] * len(part)), strict=True)
    )
    rows: list[dict[str, Any]] = []
    present: list[np.ndarray] = []  # each subject's labels, for the --regions check
    disable = None if progress is None else not progress
    for sub in tqdm(chosen, desc="evaluate", unit="subject", disable=disable):
        gt = ground_truth_paths(cohort, sub, derivatives=derivatives)
        gt_img, logj = load_map(gt["logjacobian"])
        _, dseg = load_labels(gt["dseg"], gt_img, like_path=gt["logjacobian"])
        brain = dseg > 0
        if regions is not None:
            present.append(np.unique(dseg))
            planted = np.isin(dseg, np.asarray(list(regions), dtype=np.int64))
        elif gt["mask"] is not None:
            m_img, m = load_map(gt["mask"])
            check_same_grid(m_img, gt_img, gt["mask"], gt["logjacobian"])
            planted = m > 0.5
        else:
            raise InputError(
                gt["logjacobian"].parent,
                "no planted mask in the cohort; give the region labels (--regions)",
            )
        if not (planted & brain).any():
            raise InputError(gt["dseg"], "the planted regions are empty inside the brain mask")
        for method, spec in maps.items():
            path = resolve_map(spec, sub, method)
            img, values = load_map(path)
            check_same_grid(img, gt_img, path, gt["logjacobian"])
            scores = score_map(values, logj, brain, planted, topk=topk)
            mag = magnitude.get(sub, "")
            rows.append(
                {
                    "method": method,
                    "subject": sub,
                    "effect_magnitude": float(mag) if mag not in ("", None) else np.nan,
                    **scores,
                    "map": str(path),
                }
            )
    if regions is not None:  # a label no subject has is a typo (its region would be smaller)
        check_region_labels(
            list(regions), present, where=f"{derivatives} dseg of {cohort}", subjects=chosen
        )
    return pd.DataFrame(rows)


def summarize(per_subject: Any) -> Any:
    """Method × metric table of mean and sd over subjects.

    Args:
        per_subject: the DataFrame of :func:`evaluate_maps`.

    Returns:
        DataFrame indexed by method with columns ``(metric, "mean" | "sd")`` and ``n_subjects``,
        methods in their input order.
    """
    metrics = _metric_columns(per_subject)
    order = list(dict.fromkeys(per_subject["method"]))
    g = per_subject.groupby("method", sort=False)[metrics]
    table = g.agg(["mean", "std"]).rename(columns={"std": "sd"}, level=1).reindex(order)
    table["n_subjects"] = (
        per_subject.groupby("method", sort=False)["subject"].nunique().reindex(order)
    )
    return table


def _metric_columns(df: Any) -> list[str]:
    skip = {"method", "subject", "effect_magnitude", "map"}
    return [c for c in df.columns if c not in skip]


def write_evaluation(
    per_subject: Any, out: str | os.PathLike[str], *, provenance: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write the evaluation: ``<out>.json``, ``<out>.md`` (method × metric, mean ± sd) and
    ``<out>_subjects.tsv`` (one row per method and subject), atomically.

    Args:
        per_subject: DataFrame of :func:`evaluate_maps`.
        out: output stem, e.g. ``results/evaluation/table`` (a ``.json`` / ``.md`` suffix is
            dropped).
        provenance: recorded in the JSON.

    Returns:
        ``{"json": path, "markdown": path, "tsv": path}``.
    """
    from neuroexplain.io.atomic import atomic_output, write_json, write_table

    stem = Path(out)
    if stem.suffix in (".json", ".md", ".tsv"):
        stem = stem.with_suffix("")
    table = summarize(per_subject)
    metrics = _metric_columns(per_subject)
    methods: dict[str, Any] = {}
    for m in table.index:
        methods[m] = {
            met: {"mean": _num(table.loc[m, (met, "mean")]), "sd": _num(table.loc[m, (met, "sd")])}
            for met in metrics
        }
        methods[m]["n_subjects"] = int(np.asarray(table.loc[m, "n_subjects"]).ravel()[0])
    summary = {
        "metrics": metrics,
        "methods": methods,
        "subjects": sorted(set(per_subject["subject"])),
        "definitions": {
            "ncc_abs": "NCC of |map| with ground-truth |log J| inside the brain (dseg > 0)",
            "ncc_signed": "NCC of the signed map with the signed ground-truth log J in the brain",
            "top{k}_in_regions": "fraction of the top-k % brain voxels by |map| in planted regions",
            "chance_in_regions": "planted regions' share of the brain (top-k of a random map)",
        },
        "provenance": dict(provenance or {}),
    }
    paths = {
        "json": write_json(summary, stem.with_suffix(".json")),
        "tsv": write_table(per_subject, stem.parent / f"{stem.name}_subjects.tsv"),
    }
    md = stem.with_suffix(".md")
    with atomic_output(md) as tmp:
        tmp.write_text(markdown_table(per_subject))
    paths["markdown"] = md
    return paths


def _num(v: Any) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v


def markdown_table(per_subject: Any, digits: int = 3) -> str:
    """Method × metric Markdown table, cells ``mean ± sd`` (n subjects in the last column)."""
    table = summarize(per_subject)
    metrics = _metric_columns(per_subject)
    lines = [
        "| method | " + " | ".join(metrics) + " | n |",
        "|---|" + "---:|" * (len(metrics) + 1),
    ]
    for m in table.index:
        cells = []
        for met in metrics:
            mean, sd = table.loc[m, (met, "mean")], table.loc[m, (met, "sd")]
            sd_txt = "n/a" if np.isnan(sd) else f"{sd:.{digits}f}"
            cells.append("n/a" if np.isnan(mean) else f"{mean:.{digits}f} ± {sd_txt}")
        n = int(np.asarray(table.loc[m, "n_subjects"]).ravel()[0])
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines) + "\n"
