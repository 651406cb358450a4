"""Find T1w images, dseg label maps and class labels in a BIDS dataset or a sample sheet.

BIDS layout read (https://bids-specification.readthedocs.io):

- ``participants.tsv`` with a ``participant_id`` column (and optionally a label column);
- ``sub-<label>/[ses-<label>/]anat/sub-<label>[_...]_T1w.nii[.gz]`` (exactly one per subject);
- optional ``derivatives/<name>/sub-<label>/[ses-*/]anat/sub-<label>[_...]_dseg.nii[.gz]`` with
  ``derivatives/<name>/dseg.tsv`` (``index``, ``name``).

A sample sheet (TSV, or CSV by suffix) has columns ``subject``, ``t1`` and optionally ``dseg`` and
``label``; relative paths are resolved against the sheet's folder.

Every problem is an :class:`~neuroexplain.errors.InputError` naming the file it is in.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from neuroexplain.errors import InputError
from neuroexplain.utils import case_clashes

__all__ = [
    "MISSING_LABELS",
    "Cohort",
    "SubjectRecord",
    "apply_label_groups",
    "encode_labels",
    "find_bids_subjects",
    "parse_label_groups",
    "read_dseg_names",
    "read_sample_sheet",
]

logger = logging.getLogger(__name__)

#: label values treated as missing (compared case-insensitively after stripping)
MISSING_LABELS = frozenset({"", "n/a", "na", "nan", "none", "null", "unknown", "?"})


@dataclass(frozen=True)
class SubjectRecord:
    """One subject's inputs.

    Attributes:
        subject: participant id (``sub-...`` for BIDS, as written in a sample sheet otherwise).
        t1: absolute path of the T1w image.
        dseg: absolute path of the label map on the T1w grid, or ``None``.
        label: raw class label value (``""`` when there is no label column).
        group: subjects sharing a group (e.g. the same source anatomy of a paired synthetic
            cohort, or repeated scans of one person) are kept in one split; ``""`` = its own.
    """

    subject: str
    t1: Path
    dseg: Path | None = None
    label: str = ""
    group: str = ""


@dataclass
class Cohort:
    """The subjects to ingest and where their metadata came from.

    Attributes:
        records: subjects sorted by id.
        label_source: file holding the labels (``participants.tsv`` or the sheet).
        label_column: the label column used, or ``None``.
        dseg_names: label index -> name (from ``dseg.tsv``), empty when unknown.
        inputs: metadata files read (recorded in the provenance).
    """

    records: list[SubjectRecord]
    label_source: Path
    label_column: str | None
    dseg_names: dict[int, str] = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)


def _read_table(path: Path, sep: str | None = None):
    import pandas as pd

    if not path.is_file():
        raise InputError(path, "file not found")
    if sep is None:
        sep = "," if path.name.lower().endswith((".csv", ".csv.gz")) else "\t"
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a readable table ({exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    return df.apply(lambda col: col.str.strip())


def _select(
    ids: list[str], subjects: list[str] | None, limit: int | None, source: Path, prefix: str
) -> list[str]:
    """Sort ids, keep the requested ``subjects`` (with or without ``prefix``), then ``limit``."""
    ids = sorted(ids)
    if subjects:
        known = set(ids)
        wanted = []
        for s in subjects:
            sid = s.strip()
            if sid not in known and prefix and not sid.startswith(prefix):
                sid = prefix + sid
            if sid not in known:
                raise InputError(source, f"subject {s!r} from --subjects is not listed")
            wanted.append(sid)
        ids = sorted(set(wanted))
    if limit is not None:
        if limit < 1:
            raise InputError("--limit", f"expected a positive number of subjects, got {limit}")
        ids = ids[:limit]
    if not ids:
        raise InputError(source, "expected at least one subject, got none")
    return ids


def _one_file(folder: Path, patterns: list[str], what: str, source: Path, sid: str) -> Path | None:
    hits: list[Path] = []
    for pat in patterns:
        hits = sorted(folder.glob(pat))
        if hits:
            break
    if len(hits) > 1:
        names = ", ".join(str(h.relative_to(folder)) for h in hits[:4])
        raise InputError(
            source, f"{sid} has {len(hits)} {what} images ({names}); use --sheet to pick one"
        )
    return hits[0].resolve() if hits else None


def read_dseg_names(path: Path) -> dict[int, str]:
    """``dseg.tsv`` (``index``, ``name``) -> ``{index: name}``; ``{}`` if the file is absent."""
    if not path.is_file():
        return {}
    df = _read_table(path, sep="\t")
    if not {"index", "name"} <= set(df.columns):
        raise InputError(path, f"expected columns index and name, got {list(df.columns)}")
    try:
        return {int(i): str(n) for i, n in zip(df["index"], df["name"], strict=True)}
    except ValueError as exc:
        raise InputError(path, f"expected integer label indices ({exc})") from exc


def find_bids_subjects(
    root: str | os.PathLike[str],
    *,
    derivatives: str | None = "dlmuse",
    label_column: str | None = None,
    subjects: list[str] | None = None,
    limit: int | None = None,
    group_column: str | None = None,
) -> Cohort:
    """List the subjects of a BIDS dataset with their T1w, dseg and label.

    Args:
        root: BIDS dataset root.
        derivatives: name of the ``derivatives/`` folder with ``*_dseg`` maps; ``None`` or a folder
            that does not exist means no dseg. If the folder exists, every subject needs a dseg.
        label_column: ``participants.tsv`` column with the class label, or ``None``.
        subjects: subset of participant ids (``sub-`` prefix optional).
        limit: keep only the first ``limit`` subjects (sorted by id).
        group_column: ``participants.tsv`` column grouping subjects that must share a split;
            ``None`` uses ``source_subject`` when present (``neuroexplain make-cohort`` writes
            it), else every subject is its own group.

    Returns:
        A :class:`Cohort`.

    Raises:
        InputError: missing ``participants.tsv`` / column / T1w / dseg, duplicate ids, unknown
            subjects, missing label values.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise InputError(root, "expected a BIDS dataset folder, got no such folder")
    tsv = root / "participants.tsv"
    if not tsv.is_file():
        raise InputError(tsv, "file not found (a BIDS dataset needs participants.tsv)")
    df = _read_table(tsv, sep="\t")
    if "participant_id" not in df.columns:
        raise InputError(tsv, f"expected a participant_id column, got {list(df.columns)}")
    if label_column is not None and label_column not in df.columns:
        cols = [c for c in df.columns if c != "participant_id"]
        raise InputError(tsv, f"label column {label_column!r} not found (columns: {cols})")
    ids = [v if v.startswith("sub-") else f"sub-{v}" for v in df["participant_id"]]
    dup = sorted({v for v in ids if ids.count(v) > 1})
    if dup:
        raise InputError(tsv, f"duplicate participant_id values: {', '.join(dup[:5])}")
    if any(v == "sub-" for v in ids):
        raise InputError(tsv, "empty participant_id value")
    labels = dict(zip(ids, df[label_column], strict=True)) if label_column else {}
    groups = _groups(df, ids, group_column, tsv)
    chosen = _select(ids, subjects, limit, tsv, "sub-")

    deriv_dir = root / "derivatives" / derivatives if derivatives else None
    if deriv_dir is not None and not deriv_dir.is_dir():
        logger.info("no %s folder: ingesting without dseg", deriv_dir)
        deriv_dir = None

    records = []
    missing_t1 = []
    for sid in chosen:
        t1 = _one_file(
            root / sid,
            [
                f"anat/{sid}*_T1w.nii.gz",
                f"anat/{sid}*_T1w.nii",
                f"ses-*/anat/{sid}*_T1w.nii.gz",
                f"ses-*/anat/{sid}*_T1w.nii",
            ],
            "T1w",
            tsv,
            sid,
        )
        if t1 is None:
            missing_t1.append(sid)
            continue
        dseg = None
        if deriv_dir is not None:
            dseg = _one_file(
                deriv_dir / sid,
                [
                    f"anat/{sid}*_dseg.nii.gz",
                    f"anat/{sid}*_dseg.nii",
                    f"ses-*/anat/{sid}*_dseg.nii.gz",
                    f"ses-*/anat/{sid}*_dseg.nii",
                ],
                "dseg",
                deriv_dir,
                sid,
            )
            if dseg is None:
                raise InputError(
                    deriv_dir, f"{sid} has no {sid}*_dseg.nii.gz under {deriv_dir / sid / 'anat'}"
                )
        records.append(SubjectRecord(sid, t1, dseg, labels.get(sid, ""), groups.get(sid, "")))
    if missing_t1:
        more = f" (and {len(missing_t1) - 1} more)" if len(missing_t1) > 1 else ""
        raise InputError(
            tsv,
            f"participant {missing_t1[0]} has no T1w image "
            f"(expected {root / missing_t1[0] / 'anat' / (missing_t1[0] + '_T1w.nii.gz')}){more}",
        )
    inputs = [tsv]
    names: dict[int, str] = {}
    if deriv_dir is not None:
        names = read_dseg_names(deriv_dir / "dseg.tsv")
        if names:
            inputs.append(deriv_dir / "dseg.tsv")
    return Cohort(records, tsv, label_column, names, inputs)


def _groups(df, ids: list[str], column: str | None, source: Path) -> dict[str, str]:
    """Subject -> group from ``column`` (default ``source_subject`` when the table has it)."""
    if column is None:
        column = "source_subject" if "source_subject" in df.columns else None
        if column is None:
            return {}
    elif column not in df.columns:
        cols = [c for c in df.columns if c not in ("participant_id", "subject")]
        raise InputError(source, f"group column {column!r} not found (columns: {cols})")
    values = [str(v).strip() for v in df[column]]
    empty = [i for i, v in zip(ids, values, strict=True) if v.lower() in MISSING_LABELS]
    if empty:
        raise InputError(source, f"{len(empty)} subject(s) have no {column} value, e.g. {empty[0]}")
    return dict(zip(ids, values, strict=True))


def read_sample_sheet(
    path: str | os.PathLike[str],
    *,
    label_column: str | None = None,
    subjects: list[str] | None = None,
    limit: int | None = None,
    group_column: str | None = None,
) -> Cohort:
    """Read a sample sheet with columns ``subject, t1[, dseg][, label][, group]``.

    Args:
        path: TSV (or ``.csv``) file; relative image paths are resolved against its folder.
        label_column: column with the class label; defaults to ``label`` when present.
        subjects: subset of subject ids.
        limit: keep only the first ``limit`` subjects (sorted by id).
        group_column: column grouping subjects that must share a split; ``None`` uses
            ``group`` or ``source_subject`` when present.

    Returns:
        A :class:`Cohort` (``dseg_names`` is empty).

    Raises:
        InputError: missing columns or files, duplicate subjects, dseg given for only some
            subjects.
    """
    sheet = Path(path).resolve()
    df = _read_table(sheet)
    missing = [c for c in ("subject", "t1") if c not in df.columns]
    if missing:
        raise InputError(sheet, f"expected columns subject, t1 [, dseg, label], missing {missing}")
    if label_column is None and "label" in df.columns:
        label_column = "label"
    if label_column is not None and label_column not in df.columns:
        raise InputError(
            sheet, f"label column {label_column!r} not found (columns: {list(df.columns)})"
        )
    ids = list(df["subject"])
    if any(not v for v in ids):
        raise InputError(sheet, "empty subject value")
    dup = sorted({v for v in ids if ids.count(v) > 1})
    if dup:
        raise InputError(sheet, f"duplicate subject values: {', '.join(dup[:5])}")
    if group_column is None and "group" in df.columns:
        group_column = "group"
    groups = _groups(df, ids, group_column, sheet)
    chosen = set(_select(ids, subjects, limit, sheet, ""))
    rows = {r["subject"]: r for r in df.to_dict("records")}

    def resolve(value: str) -> Path:
        p = Path(value).expanduser()
        return (p if p.is_absolute() else sheet.parent / p).resolve()

    records = []
    for sid in sorted(chosen):
        row = rows[sid]
        if not row["t1"]:
            raise InputError(sheet, f"subject {sid} has an empty t1 path")
        t1 = resolve(row["t1"])
        if not t1.is_file():
            raise InputError(sheet, f"subject {sid}: T1w image {t1} not found")
        dseg = None
        if row.get("dseg"):
            dseg = resolve(row["dseg"])
            if not dseg.is_file():
                raise InputError(sheet, f"subject {sid}: dseg image {dseg} not found")
        label = row[label_column] if label_column else ""
        records.append(SubjectRecord(sid, t1, dseg, label, groups.get(sid, "")))
    with_dseg = [r.subject for r in records if r.dseg is not None]
    if with_dseg and len(with_dseg) != len(records):
        without = [r.subject for r in records if r.dseg is None]
        raise InputError(
            sheet, f"dseg given for some subjects but not for {', '.join(without[:5])}"
        )
    return Cohort(records, sheet, label_column, {}, [sheet])


def encode_labels(
    cohort: Cohort, positive_class: str | None = None
) -> tuple[np.ndarray, str | None, dict[str, int]]:
    """Binary targets from the cohort's raw labels.

    Args:
        cohort: subjects with raw ``label`` values (ignored when ``cohort.label_column`` is None).
        positive_class: the label value that becomes ``y = 1``; with exactly two classes it
            defaults to the second in sorted order. With more classes it is required
            (one-vs-rest).

    Returns:
        ``(y, positive_class, class_counts)``: ``y`` float32 ``(N,)`` of 0 / 1 (all NaN without a
        label column), the positive class (``None`` without labels), and counts per raw value.

    Raises:
        InputError: (naming the label file) missing / unknown values, values that differ only
            by case or whitespace (``disease`` / ``Disease``), fewer than two classes, a positive
            class that is not a label value, or several classes and no positive class.
    """
    n = len(cohort.records)
    src = cohort.label_source
    col = cohort.label_column
    if col is None:
        if positive_class is not None:
            raise InputError("--positive-class", "needs a label column (--label-column)")
        return np.full(n, np.nan, np.float32), None, {}
    values = [r.label for r in cohort.records]
    bad = [r.subject for r in cohort.records if r.label.strip().lower() in MISSING_LABELS]
    if bad:
        raise InputError(
            src,
            f"column {col!r} has missing/unknown values for {len(bad)} subject(s): "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} "
            "(fill them in, or leave these subjects out with --subjects)",
        )
    clashes = case_clashes(values)
    if clashes:
        group = clashes[0]
        more = f" (and {len(clashes) - 1} more such group(s))" if len(clashes) > 1 else ""
        raise InputError(
            src,
            f"column {col!r} has values that differ only by case or whitespace: "
            + " vs ".join(f"{v!r} ({values.count(v)} subject(s))" for v in group)
            + f"{more}; write each class one way (or as clearly different classes)",
        )
    classes = sorted(set(values))
    counts = {c: values.count(c) for c in classes}
    if len(classes) < 2:
        raise InputError(
            src,
            f"column {col!r} needs at least 2 classes among the {n} subjects used, got {classes}",
        )
    if positive_class is None:
        if len(classes) > 2:
            raise InputError(
                src,
                f"column {col!r} has {len(classes)} classes {classes}; "
                "choose one with --positive-class",
            )
        positive_class = classes[1]
        logger.info("positive class %r (second of %s in sorted order)", positive_class, classes)
    elif positive_class not in classes:
        raise InputError(
            src,
            f"--positive-class {positive_class!r} is not a value of column {col!r} "
            f"(values: {classes})",
        )
    elif len(classes) > 2:
        logger.warning("column %r has %d classes; %r vs rest", col, len(classes), positive_class)
    y = np.array([v == positive_class for v in values], dtype=np.float32)
    return y, positive_class, counts


_CONDITION = re.compile(
    r"^\s*(?:(?P<op><=|>=|<|>)\s*(?P<x>[-+]?[0-9.]+(?:e[-+]?\d+)?)"
    r"|(?P<lo>[-+]?[0-9.]+(?:e[-+]?\d+)?)\s*\.\.\s*(?P<hi>[-+]?[0-9.]+(?:e[-+]?\d+)?))\s*$",
    re.IGNORECASE,
)


def parse_label_groups(
    specs: Sequence[str] | Mapping[str, str], *, option: str = "--label-group"
) -> dict[str, tuple[str, float, float | None]]:
    """Groups of a numeric label column, from ``NAME=CONDITION`` (or a mapping NAME -> CONDITION).

    A condition is ``<X``, ``<=X``, ``>X``, ``>=X`` or ``A..B`` (inclusive), e.g.
    ``young=<40`` and ``old=>60`` for an ``age`` column.

    Returns:
        ``{name: (operator, x, y)}`` (``y`` only for ``".."``), in the given order.

    Raises:
        InputError: (naming ``option``) a spec without ``=``, an unknown condition, a repeated
            name, or fewer than two groups.

    Example:
        >>> parse_label_groups(["young=<40", "old=>60"])
        {'young': ('<', 40.0, None), 'old': ('>', 60.0, None)}
    """
    items = list(specs.items()) if isinstance(specs, Mapping) else []
    if not isinstance(specs, Mapping):
        for spec in specs:
            name, sep, cond = str(spec).partition("=")
            if not sep or not name.strip():
                raise InputError(option, f"expected NAME=CONDITION (e.g. old='>60'), got {spec!r}")
            items.append((name, cond))
    groups: dict[str, tuple[str, float, float | None]] = {}
    for name, cond in items:
        name = str(name).strip()
        m = _CONDITION.match(str(cond))
        if m is None:
            raise InputError(
                option,
                f"group {name!r}: expected a condition <X, <=X, >X, >=X or A..B, got {cond!r}",
            )
        if name in groups:
            raise InputError(option, f"group {name!r} given twice")
        if m.group("op"):
            groups[name] = (m.group("op"), float(m.group("x")), None)
        else:
            groups[name] = ("..", float(m.group("lo")), float(m.group("hi")))
    if len(groups) < 2:
        raise InputError(option, f"expected at least two groups, got {len(groups)}")
    return groups


def _in_group(value: float, cond: tuple[str, float, float | None]) -> bool:
    op, x, y = cond
    if op == "<":
        return value < x
    if op == "<=":
        return value <= x
    if op == ">":
        return value > x
    if op == ">=":
        return value >= x
    return x <= value <= float(y)  # ".."


def apply_label_groups(
    cohort: Cohort, groups: Mapping[str, tuple[str, float, float | None]]
) -> Cohort:
    """Label each subject by the group its numeric label falls in; leave out the others.

    Subjects with a missing value (:data:`MISSING_LABELS`) or in no group are left out (counted
    in one log line); a value in two groups, or a value that is not a number, is an error.

    Raises:
        InputError: (naming the label file) no label column, a non-numeric value, overlapping
            groups.
    """
    src, col = cohort.label_source, cohort.label_column
    if col is None:
        raise InputError("--label-group", "needs a label column (--label-column)")
    kept: list[SubjectRecord] = []
    counts = dict.fromkeys(groups, 0)
    missing = outside = 0
    for r in cohort.records:
        raw = str(r.label).strip()
        if raw.lower() in MISSING_LABELS:
            missing += 1
            continue
        try:
            value = float(raw)
        except ValueError:
            raise InputError(
                src, f"column {col!r}: {r.subject} has {raw!r}, not a number (--label-group)"
            ) from None
        hits = [name for name, cond in groups.items() if _in_group(value, cond)]
        if len(hits) > 1:
            raise InputError(
                "--label-group", f"{r.subject}'s {col} {value:g} is in groups {hits}: overlap"
            )
        if not hits:
            outside += 1
            continue
        counts[hits[0]] += 1
        kept.append(replace(r, label=hits[0]))
    logger.info(
        "label groups of %r: %s; left out %d subject(s) in no group and %d with no value",
        col,
        ", ".join(f"{k} {v}" for k, v in counts.items()),
        outside,
        missing,
    )
    return replace(cohort, records=kept)
