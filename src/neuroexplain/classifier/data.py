"""The classifier's data: the cached ``preproc.pt`` tensors and the subject split.

:func:`load_preproc_dict` reads ``preproc.pt`` (``neuroexplain ingest-mri``) with the checks
training needs; :func:`make_split` makes the stratified (optionally grouped) subject-level
train / validation / test split that :func:`read_split` reads back from ``split.tsv``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuroexplain.errors import InputError

__all__ = ["SPLITS", "load_preproc_dict", "make_split", "read_split"]

SPLITS = ("train", "val", "test")


def load_preproc_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``preproc.pt`` (``neuroexplain ingest-mri``) and check the fields training needs.

    Uses :func:`neuroexplain.mri.ingest.load_preproc` when available (it validates the file),
    else ``torch.load(weights_only=True)``.

    Returns:
        The dict with ``images`` float32 ``(N, C, X, Y, Z)``, ``y`` float32 ``(N,)``,
        ``subjects`` list[str] (and the rest of the ingest fields).

    Raises:
        InputError: unreadable file, missing fields, labels other than 0 / 1, or inconsistent
            lengths.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "preprocessed tensor file not found")
    try:
        from neuroexplain.mri.ingest import load_preproc
    except ImportError:  # ingest module not installed: plain loader
        load_preproc = None
    if load_preproc is not None:
        data = dict(load_preproc(p))
    else:
        try:
            data = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(p, f"not a readable preproc.pt ({exc})") from exc
    if not isinstance(data, Mapping):
        raise InputError(p, f"expected a dict of tensors, got {type(data).__name__}")
    missing = [k for k in ("images", "y", "subjects") if k not in data]
    if missing:
        raise InputError(p, f"expected fields images, y, subjects; missing {missing}")
    images = torch.as_tensor(data["images"])
    if images.ndim != 5:
        raise InputError(p, f"expected images of shape (N, C, X, Y, Z), got {tuple(images.shape)}")
    if data["y"] is None:
        raise InputError(p, "no labels (y) in the preprocessed data; ingest with --label-column")
    y = np.asarray(torch.as_tensor(data["y"]).float().numpy(), dtype=np.float32)
    n = images.shape[0]
    if y.shape != (n,) or len(data["subjects"]) != n:
        raise InputError(
            p,
            f"expected {n} labels and subjects, "
            f"got {y.shape} labels, {len(data['subjects'])} subjects",
        )
    if np.isnan(y).any():
        raise InputError(
            p, f"{int(np.isnan(y).sum())} subjects have no label; ingest with --label-column"
        )
    if not np.isin(y, (0.0, 1.0)).all():
        raise InputError(p, f"expected binary labels 0/1, got values {np.unique(y)[:10].tolist()}")
    out = dict(data)
    out["images"] = images.float()
    out["y"] = y
    out["subjects"] = [str(s) for s in data["subjects"]]
    return out


def make_split(
    subjects: Sequence[str],
    y: Sequence[float],
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> Any:
    """Stratified subject-level train / validation / test split, optionally by groups.

    Within each class, subjects are shuffled with ``seed`` and ``round(n_class * fraction)``
    go to test and validation (at least one each when the class has >= 3 subjects). With
    ``groups`` (e.g. the source anatomy of a paired synthetic cohort), whole groups are assigned:
    groups are stratified by their class make-up (e.g. "one control + one diseased") and every
    member of a group lands in the same split, so no anatomy is seen in training and test.

    Args:
        subjects: subject ids ``(N,)``.
        y: class labels ``(N,)``.
        val_fraction: validation fraction per class.
        test_fraction: test fraction per class.
        seed: shuffling seed.
        groups: group of each subject ``(N,)``; ``None`` = every subject its own group.

    Returns:
        DataFrame ``subject, split, y`` in input order.

    Example:
        >>> df = make_split(["a", "b", "c", "d", "e", "f"], [0, 0, 0, 1, 1, 1])
        >>> df.split.tolist().count("test")
        2
    """
    import pandas as pd

    subjects = [str(s) for s in subjects]
    yy = np.asarray(y)
    if len(set(subjects)) != len(subjects):
        raise InputError("subjects", "expected unique subject ids")
    rng = np.random.default_rng(seed)
    split = np.array(["train"] * len(subjects), dtype=object)
    if groups is not None and len(set(groups)) < len(subjects):
        if len(groups) != len(subjects):
            raise InputError("groups", f"expected {len(subjects)} groups, got {len(groups)}")
        members: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(str(g), []).append(i)
        strata: dict[tuple, list[str]] = {}
        for g, idx in members.items():  # stratum = the group's sorted class make-up
            strata.setdefault(tuple(sorted(yy[idx].tolist())), []).append(g)
        for key in sorted(strata):
            gs = [strata[key][j] for j in rng.permutation(len(strata[key]))]
            n_test, n_val = _split_sizes(len(gs), val_fraction, test_fraction)
            for j, g in enumerate(gs):
                part = "test" if j < n_test else "val" if j < n_test + n_val else "train"
                split[members[g]] = part
        return pd.DataFrame({"subject": subjects, "split": split.astype(str), "y": yy})
    for cls in np.unique(yy):
        idx = np.flatnonzero(yy == cls)
        idx = idx[rng.permutation(len(idx))]
        n_test, n_val = _split_sizes(len(idx), val_fraction, test_fraction)
        split[idx[:n_test]] = "test"
        split[idx[n_test : n_test + n_val]] = "val"
    return pd.DataFrame({"subject": subjects, "split": split.astype(str), "y": yy})


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Test and validation counts of a stratum of ``n`` (at least one each from 3 up)."""
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    if n >= 3:
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_val = max(n_val, 1)
    return n_test, n_val


def read_split(path: str | os.PathLike[str], subjects: Sequence[str] | None = None) -> Any:
    """Read a ``split.tsv`` (``subject``, ``split`` columns), checking it covers ``subjects``."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "split file not found")
    df = pd.read_csv(p, sep="\t", dtype={"subject": str, "split": str})
    if not {"subject", "split"} <= set(df.columns):
        raise InputError(p, f"expected columns subject, split; got {list(df.columns)}")
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise InputError(p, f"expected splits {SPLITS}, got {bad}")
    if subjects is not None:
        missing = sorted(set(subjects) - set(df["subject"]))
        if missing:
            raise InputError(p, f"split does not list {len(missing)} subjects, e.g. {missing[:3]}")
    return df
