"""Is the classifier good enough to explain? A linear reference and a quality gate.

Every MRI explanation method explains the trained classifier, so a classifier near chance makes
every map downstream meaningless. Two questions tell a failed training run from data without a
signal:

- :func:`linear_reference`: an L2 logistic regression on the standardised brain voxels, fitted on
  the classifier's own split. On aligned brains a planted or real group difference of a few
  percent in volume is often linearly separable; when this reference separates the classes and
  the CNN does not, the CNN did not learn a signal the data hold.
- :func:`bootstrap_auc`: a stratified percentile bootstrap interval of an AUC, so a test AUC of
  a few dozen subjects is read with its uncertainty.

:func:`check_classifier_quality` turns the classifier's ``metrics.json`` (with the reference and
intervals once ``train-classifier`` writes them) into a pass / fail decision: the workflow's
``classifier_quality`` rule runs it before every explanation stage (config ``quality.min_auc``,
default :class:`neuroexplain.settings.QualityConfig`). :func:`quality_table` and
:func:`write_quality_table` give the decision as the small table that opens the workflow's report.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuroexplain.errors import InputError

__all__ = [
    "DEFAULT_CS",
    "MAX_REFERENCE_VOXELS",
    "TABLE_SUFFIXES",
    "LinearReferenceModel",
    "bootstrap_auc",
    "check_classifier_quality",
    "fit_linear_reference",
    "linear_reference",
    "paired_auc_difference",
    "quality_table",
    "select_logistic",
    "write_quality_table",
]

logger = logging.getLogger(__name__)

#: inverse L2 penalties the linear reference chooses from (on validation AUC)
DEFAULT_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: formats of :func:`write_quality_table`, by file suffix
TABLE_SUFFIXES = (".html", ".md", ".tsv")
#: volumes with more voxels per channel are average-pooled by 2 per axis until they have fewer
MAX_REFERENCE_VOXELS = 100_000
_POOL_CHUNK = 16  # subjects pooled at a time (bounds the temporary copy)


# ------------------------------------------------------------------------- linear reference


def _as_array(images: Any) -> np.ndarray:
    """A float32 NumPy view (or copy) of a tensor / array ``(N, C, X, Y, Z)``."""
    if hasattr(images, "detach"):  # a torch tensor, without importing torch
        images = images.detach().cpu().float().numpy()
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 5:
        raise ValueError(f"expected images of shape (N, C, X, Y, Z), got shape {x.shape}")
    return x


def _pool_factor(spatial: Sequence[int]) -> int:
    """Smallest power of 2 that brings ``prod(spatial // factor)`` to at most the voxel limit."""
    factor = 1
    while (
        math.prod(s // factor for s in spatial) > MAX_REFERENCE_VOXELS
        and min(spatial) >= 2 * factor
    ):
        factor *= 2
    return factor


def _pool(x: np.ndarray, factor: int) -> np.ndarray:
    """Average-pool ``(n, C, X, Y, Z)`` by ``factor`` per axis (a trailing remainder is dropped)."""
    if factor == 1:
        return x
    n, c, *spatial = x.shape
    t = [s // factor for s in spatial]
    out = np.empty((n, c, *t), dtype=np.float32)
    for i in range(0, n, _POOL_CHUNK):
        block = x[i : i + _POOL_CHUNK, :, : t[0] * factor, : t[1] * factor, : t[2] * factor]
        block = block.reshape(len(block), c, t[0], factor, t[1], factor, t[2], factor)
        out[i : i + _POOL_CHUNK] = block.mean(axis=(3, 5, 7), dtype=np.float32)
    return out


def _mask_features(mask: Any, shape: Sequence[int], factor: int) -> np.ndarray:
    """A ``(C * X' * Y' * Z',)`` boolean feature mask from a ``(X, Y, Z)`` or ``(C, X, Y, Z)`` mask.

    A pooled voxel is kept when any voxel of its block is in the mask.
    """
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask) != 0
    c, *spatial = shape
    if m.shape == tuple(spatial):
        m = np.broadcast_to(m, (c, *spatial))
    if m.shape not in ((c, *spatial), (1, *spatial)):
        raise ValueError(
            f"expected a mask of shape {tuple(spatial)} or {(c, *spatial)}, got shape {m.shape}"
        )
    m = np.broadcast_to(m, (c, *spatial)).astype(np.float32)[None]
    return (_pool(m, factor)[0] > 0).reshape(-1)


def _indices(parts: Mapping[str, Any], name: str, n: int) -> np.ndarray:
    idx = np.asarray(parts.get(name, []), dtype=np.int64).reshape(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"expected {name} indices in [0, {n}), got {idx.min()}..{idx.max()}")
    return idx


@dataclass(frozen=True)
class LinearReferenceModel:
    """The fitted model of :func:`fit_linear_reference`: enough to reproduce its decision function.

    Features live on the pooled grid, flattened in ``(C, X', Y', Z')`` order (``n`` of them);
    the ones the reference did not use have ``keep`` False, ``mean`` 0, ``sd`` 1 and ``coef`` 0.

    Attributes:
        pool: average-pooling factor per axis (1 = none; a trailing remainder is dropped).
        shape: the image shape ``(C, X, Y, Z)`` it was fitted on.
        keep: ``(n,)`` bool, the features used.
        mean: ``(n,)`` float64 training mean of each feature.
        sd: ``(n,)`` float64 training sd (``ddof=0``) of each feature.
        coef: ``(n,)`` float64 coefficients of the standardised features.
        intercept: the intercept.
        C: the chosen inverse L2 penalty.
        estimator: the fitted scikit-learn model (on the kept features), for checks.
    """

    pool: int
    shape: tuple[int, ...]
    keep: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    coef: np.ndarray
    intercept: float
    C: float
    estimator: Any = None

    def features(self, images: Any) -> np.ndarray:
        """The standardised kept features ``(N, n_kept)`` float32 of images ``(N, C, X, Y, Z)``."""
        x = _as_array(images)
        if tuple(x.shape[1:]) != tuple(self.shape):
            raise ValueError(f"expected images of shape (N, *{self.shape}), got {x.shape}")
        flat = _pool(x, self.pool).reshape(len(x), -1)[:, self.keep]
        return ((flat - self.mean[self.keep]) / self.sd[self.keep]).astype(np.float32)

    def decision_function(self, images: Any) -> np.ndarray:
        """The log-odds ``(N,)`` of images ``(N, C, X, Y, Z)`` (as the fitted estimator's)."""
        return self.features(images) @ self.coef[self.keep] + self.intercept


def linear_reference(
    images: Any,
    y: Sequence[float],
    parts: Mapping[str, Sequence[int]],
    *,
    mask: Any = None,
    seed: int = 0,
    Cs: Sequence[float] = DEFAULT_CS,
) -> dict[str, Any]:
    """An L2 logistic regression on the standardised voxels, on the classifier's own split.

    The features are the voxels (of every channel) that vary over the training images — or the
    voxels of ``mask`` that do — each standardised by its training mean and sd, as the
    classifier's ``standardize`` option does. Volumes with more than
    :data:`MAX_REFERENCE_VOXELS` voxels per channel (64³ has 262,144) are first average-pooled
    by 2 per axis, repeatedly if needed (64³ → 32³), dropping a trailing odd voxel: the six fits
    then take ~4 s on 200 volumes of 64³ (two CPU cores) and ~60 MB beyond the images, and an
    effect of a few voxels still shows at the coarser grid. One model is fitted per ``C`` on the
    training subjects (liblinear's dual solver, fast when subjects are far fewer than voxels;
    classes weighted to balance, like the classifier's ``pos_weight``); the ``C`` with the best
    validation AUC is reported, ties going to the smaller ``C`` (the stronger penalty). Nothing
    is refitted on train + val, so the reported model saw exactly the classifier's training
    subjects. Deterministic for a ``seed``.

    Args:
        images: float tensor or array ``(N, C, X, Y, Z)`` (``preproc.pt``'s ``images``).
        y: labels 0/1 ``(N,)``.
        parts: ``{"train": idx, "val": idx, "test": idx}`` integer index arrays into ``images``;
            ``test`` may be empty or absent. Train and val need both classes.
        mask: optional voxels to use, ``(X, Y, Z)`` or ``(C, X, Y, Z)`` (nonzero = used), at the
            resolution of ``images``; constant voxels are dropped within it too.
        seed: random state of the solver.
        Cs: inverse L2 penalties to choose from.

    Returns:
        ``{"model": "l2_logistic_regression", "C", "n_features", "pool", "seed", "train", "val",
        "test", "val_auc_by_C", "converged_by_C", "seconds"}``: ``train`` / ``val`` / ``test`` are
        :func:`neuroexplain.classifier.metrics.binary_metrics` of the chosen model's decision
        function (log-odds, so the 0.5 threshold is 0), ``test`` only when the test split is not
        empty; ``val_auc_by_C`` maps ``f"{C:g}"`` to the validation AUC; ``pool`` is the
        pooling factor per axis (1 = none).

    Raises:
        InputError: the train or val split lacks a class, or no voxel varies.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(40, 1, 8, 8, 8)).astype(np.float32)
        >>> y = np.arange(40) % 2
        >>> x[y == 1, :, :2, :2, :2] += 2.0
        >>> ref = linear_reference(x, y, {"train": range(24), "val": range(24, 40)})
        >>> ref["val"]["auc"] > 0.9
        True
    """
    return fit_linear_reference(images, y, parts, mask=mask, seed=seed, Cs=Cs)[0]


def _check_reference_inputs(
    x: np.ndarray, y: Sequence[float], parts: Mapping[str, Sequence[int]], Cs: Sequence[float]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels ``(N,)`` int 0/1 and the split indices; both classes in train and val."""
    yy = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(yy) != len(x):
        raise ValueError(f"expected {len(x)} labels (one per image), got {len(yy)}")
    if not np.isin(yy, (0.0, 1.0)).all():
        raise ValueError(f"expected labels 0/1, got values {np.unique(yy).tolist()}")
    yy = yy.astype(np.int64)
    idx = {name: _indices(parts, name, len(x)) for name in ("train", "val", "test")}
    for name in ("train", "val"):
        if len(np.unique(yy[idx[name]])) < 2:
            raise InputError(
                None,
                f"expected both classes in the {name} split for the linear reference, "
                f"got {len(idx[name])} subjects of one class",
            )
    if not Cs:
        raise ValueError("expected at least one C, got none")
    return yy, idx


def fit_linear_reference(
    images: Any,
    y: Sequence[float],
    parts: Mapping[str, Sequence[int]],
    *,
    mask: Any = None,
    seed: int = 0,
    Cs: Sequence[float] = DEFAULT_CS,
) -> tuple[dict[str, Any], LinearReferenceModel]:
    """:func:`linear_reference` and the fitted model that gives its metrics.

    Same arguments and metrics as :func:`linear_reference`; the second item is a
    :class:`LinearReferenceModel` whose ``decision_function`` reproduces the reported logits
    (the classifier's linear path starts from it; its arrays do not belong in ``metrics.json``).
    """
    from neuroexplain.classifier.metrics import binary_metrics

    t0 = time.perf_counter()
    x = _as_array(images)
    yy, idx = _check_reference_inputs(x, y, parts, Cs)
    factor = _pool_factor(x.shape[2:])
    pooled = _pool(x, factor)
    flat = pooled.reshape(len(pooled), -1)
    train = flat[idx["train"]]
    keep = np.ptp(train, axis=0) > 0  # exact: a voxel equal in every training image is dropped
    if mask is not None:
        keep &= _mask_features(mask, x.shape[1:], factor)
    if not keep.any():
        raise InputError(None, "expected voxels that vary over the training images, got none")
    kept = train[:, keep]
    mean, sd = kept.mean(axis=0, dtype=np.float64), kept.std(axis=0, dtype=np.float64)
    features = ((flat[:, keep] - mean) / sd).astype(np.float32)
    del pooled, flat, train, kept

    x_train, y_train = features[idx["train"]], yy[idx["train"]]
    x_val, y_val = features[idx["val"]], yy[idx["val"]]
    model, best_c, by_c, converged = select_logistic(
        x_train, y_train, x_val, y_val, Cs=Cs, seed=seed
    )

    out: dict[str, Any] = {
        "model": "l2_logistic_regression",
        "C": best_c,
        "n_features": int(keep.sum()),
        "pool": factor,
        "seed": seed,
    }
    for name in ("train", "val", "test"):
        if len(idx[name]):
            part = features[idx[name]]
            out[name] = binary_metrics(yy[idx[name]], model.decision_function(part))
    out["val_auc_by_C"] = by_c
    out["converged_by_C"] = converged
    out["seconds"] = round(time.perf_counter() - t0, 3)
    logger.info(
        "linear reference (L2 logistic regression, C=%g, %d features): val AUC %s, test AUC %s "
        "(%.1f s)",
        best_c,
        out["n_features"],
        _fmt(out["val"]["auc"]),
        _fmt(out.get("test", {}).get("auc")),
        out["seconds"],
    )
    return out, _reference_model(model, x.shape[1:], factor, keep, mean, sd, best_c)


def _reference_model(
    estimator: Any,
    shape: Sequence[int],
    factor: int,
    keep: np.ndarray,
    mean: np.ndarray,
    sd: np.ndarray,
    c: float,
) -> LinearReferenceModel:
    """The fitted reference on the whole pooled grid (unused features: mean 0, sd 1, coef 0)."""
    n = len(keep)
    full_mean, full_sd, coef = np.zeros(n), np.ones(n), np.zeros(n)
    full_mean[keep], full_sd[keep] = mean, sd
    coef[keep] = np.asarray(estimator.coef_, dtype=np.float64).reshape(-1)
    return LinearReferenceModel(
        pool=int(factor),
        shape=tuple(int(s) for s in shape),
        keep=keep.copy(),
        mean=full_mean,
        sd=full_sd,
        coef=coef,
        intercept=float(np.asarray(estimator.intercept_).reshape(-1)[0]),
        C=float(c),
        estimator=estimator,
    )


def select_logistic(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
) -> tuple[Any, float, dict[str, float | None], dict[str, bool]]:
    """Fit one L2 logistic regression per ``C`` and keep the best on validation AUC.

    liblinear's dual solver (fast when subjects are far fewer than features), classes weighted
    to balance; a tie keeps the smaller ``C`` (the stronger penalty). Deterministic for a seed.

    Args:
        x_train: ``(n_train, n_features)``; y_train: ``(n_train,)`` 0/1.
        x_val: ``(n_val, n_features)``; y_val: ``(n_val,)`` 0/1.
        Cs: inverse L2 penalties to choose from.
        seed: random state of the solver.

    Returns:
        ``(model, C, val_auc_by_C, converged_by_C)``, the dicts keyed by ``f"{C:g}"``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from neuroexplain.classifier.metrics import binary_metrics

    best: tuple[float, float, Any] | None = None  # (val AUC, C, model)
    by_c: dict[str, float | None] = {}
    converged: dict[str, bool] = {}
    for c in sorted(float(v) for v in Cs):
        model = LogisticRegression(
            C=c,
            solver="liblinear",
            dual=True,
            class_weight="balanced",
            max_iter=1000,
            random_state=seed,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x_train, np.asarray(y_train).astype(int))
        converged[f"{c:g}"] = int(np.max(model.n_iter_)) < model.max_iter
        if not converged[f"{c:g}"]:  # weak penalties rarely converge; the AUC is still valid
            logger.debug("logistic regression: C=%g did not converge in %d iterations", c, 1000)
        auc = binary_metrics(y_val, model.decision_function(x_val))["auc"]
        by_c[f"{c:g}"] = auc
        score = auc if auc is not None else 0.5
        if best is None or score > best[0]:  # strict: a tie keeps the smaller C
            best = (score, c, model)
    assert best is not None
    return best[2], best[1], by_c, converged


# --------------------------------------------------------------------------------- bootstrap


def _resampled_aucs(
    pos: np.ndarray, neg: np.ndarray, draw_pos: np.ndarray, draw_neg: np.ndarray
) -> np.ndarray:
    """AUC of each resample: ``pos[draw_pos[b]]`` against ``neg[draw_neg[b]]``.

    Args:
        pos: scores of the positives ``(P,)``.
        neg: scores of the negatives, sorted ascending ``(M,)``.
        draw_pos: resampled positive indices ``(B, P)``.
        draw_neg: resampled negative indices ``(B, M)``.

    Returns:
        ``(B,)`` AUCs (ties count one half), in ``O(B (P + M))`` time and memory: for every
        positive, the resampled negatives below it are a difference of cumulative counts.
    """
    n_boot, n_pos = draw_pos.shape
    n_neg = draw_neg.shape[1]
    rows = np.arange(n_boot)[:, None]
    counts_neg = np.bincount((draw_neg + rows * n_neg).ravel(), minlength=n_boot * n_neg)
    cum = np.zeros((n_boot, n_neg + 1))
    np.cumsum(counts_neg.reshape(n_boot, n_neg), axis=1, out=cum[:, 1:])
    below = np.searchsorted(neg, pos, side="left")  # negatives strictly below each positive
    upto = np.searchsorted(neg, pos, side="right")
    wins = cum[:, below] + 0.5 * (cum[:, upto] - cum[:, below])  # (B, P)
    counts_pos = np.bincount((draw_pos + rows * n_pos).ravel(), minlength=n_boot * n_pos)
    return (counts_pos.reshape(n_boot, n_pos) * wins).sum(axis=1) / (n_pos * n_neg)


def bootstrap_auc(
    y: Sequence[float],
    scores: Sequence[float],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the ROC AUC, resampling within each class.

    Positives and negatives are resampled separately, each to its own count, so every resample
    has both classes and the class balance of the data (the usual stratified bootstrap of a
    test-set AUC).

    Args:
        y: labels 0/1 ``(N,)``.
        scores: higher = more positive ``(N,)`` (logits, probabilities, decision values).
        n_boot: number of resamples.
        seed: seed of the resampling; the same seed gives the same interval.
        level: coverage of the interval, in (0, 1).

    Returns:
        ``(low, high)``, or ``None`` when ``y`` holds one class only (no AUC).

    Example:
        >>> lo, hi = bootstrap_auc([0, 0, 0, 1, 1, 1], [0.1, 0.4, 0.35, 0.8, 0.3, 0.9])
        >>> lo <= 8 / 9 <= hi
        True
    """
    yy = np.asarray(y, dtype=np.float64).reshape(-1)
    ss = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(yy) != len(ss):
        raise ValueError(f"expected one score per label, got {len(ss)} scores for {len(yy)}")
    if not np.isin(yy, (0.0, 1.0)).all():
        raise ValueError(f"expected labels 0/1, got values {np.unique(yy).tolist()}")
    if not np.isfinite(ss).all():
        raise ValueError("expected finite scores, got NaN or infinity")
    if not 0 < level < 1:
        raise ValueError(f"expected a level in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"expected n_boot >= 1, got {n_boot}")
    pos, neg = ss[yy == 1], np.sort(ss[yy == 0])
    if not len(pos) or not len(neg):
        return None
    rng = np.random.default_rng(seed)
    draw_pos = rng.integers(0, len(pos), size=(n_boot, len(pos)))
    draw_neg = rng.integers(0, len(neg), size=(n_boot, len(neg)))
    aucs = _resampled_aucs(pos, neg, draw_pos, draw_neg)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(aucs, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_auc_difference(
    y: Sequence[float],
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any] | None:
    """Paired stratified bootstrap of ``AUC(a) - AUC(b)`` on the same subjects.

    Positives and negatives are resampled separately (as :func:`bootstrap_auc`), and each
    resample scores both models on the same subjects, so the interval accounts for their
    correlation (two models that rank the subjects alike have a narrow interval).

    Args:
        y: labels 0/1 ``(N,)``.
        scores_a: scores of model a ``(N,)``.
        scores_b: scores of model b ``(N,)``.
        n_boot: number of resamples.
        seed: seed of the resampling.
        level: coverage of the percentile interval, in (0, 1).

    Returns:
        ``{"diff", "low", "high", "level", "n_boot", "separated"}`` (``separated``: the interval
        excludes 0, i.e. the split tells the two models apart), or ``None`` when ``y`` holds
        one class only.

    Example:
        >>> y = [0, 0, 0, 1, 1, 1]
        >>> paired_auc_difference(y, [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5])["separated"]
        False
    """
    yy = np.asarray(y, dtype=np.float64).reshape(-1)
    a = np.asarray(scores_a, dtype=np.float64).reshape(-1)
    b = np.asarray(scores_b, dtype=np.float64).reshape(-1)
    if not (len(yy) == len(a) == len(b)):
        raise ValueError(f"expected one score per label, got {len(a)}, {len(b)} for {len(yy)}")
    if not np.isin(yy, (0.0, 1.0)).all():
        raise ValueError(f"expected labels 0/1, got values {np.unique(yy).tolist()}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("expected finite scores, got NaN or infinity")
    if not 0 < level < 1:
        raise ValueError(f"expected a level in (0, 1), got {level}")
    pos, neg = yy == 1, yy == 0
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if not n_pos or not n_neg:
        return None

    def wins(s: np.ndarray) -> np.ndarray:  # (P, M): 1 positive above, 1/2 tie, 0 below
        d = s[pos][:, None] - s[neg][None, :]
        return (d > 0) + 0.5 * (d == 0)

    w = wins(a) - wins(b)
    diff = float(w.mean())
    rng = np.random.default_rng(seed)
    cp = np.zeros((n_boot, n_pos))
    cn = np.zeros((n_boot, n_neg))
    rows = np.arange(n_boot)[:, None]
    np.add.at(cp, (rows, rng.integers(0, n_pos, size=(n_boot, n_pos))), 1.0)
    np.add.at(cn, (rows, rng.integers(0, n_neg, size=(n_boot, n_neg))), 1.0)
    boots = np.einsum("bp,pm,bm->b", cp, w, cn) / (n_pos * n_neg)
    alpha = (1.0 - level) / 2.0
    low, high = (float(v) for v in np.quantile(boots, [alpha, 1.0 - alpha]))
    return {
        "diff": diff,
        "low": low,
        "high": high,
        "level": level,
        "n_boot": int(n_boot),
        "separated": bool(low > 0 or high < 0),
    }


# ------------------------------------------------------------------------------ quality gate


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _auc_ci(split_metrics: Mapping[str, Any]) -> list[float] | None:
    ci = split_metrics.get("auc_ci")
    if isinstance(ci, Sequence) and len(ci) == 2 and all(v is not None for v in ci):
        return [float(ci[0]), float(ci[1])]
    return None


def check_classifier_quality(
    metrics: Mapping[str, Any],
    min_auc: float,
    *,
    source: str | os.PathLike[str] | None,
    key: str = "quality.min_auc",
    allow_linear_reference: bool = False,
) -> dict[str, Any]:
    """Stop when the classifier is too weak to be worth explaining.

    The AUC of the model the explanation stages explain is judged: ``metrics["explained"]``
    when the metrics have one (the trained model apart from a final ensemble with the linear
    reference), else the final model's; on the test split when there is one, else on the
    validation split. When it is
    below ``min_auc`` (or missing) an :class:`~neuroexplain.errors.InputError` says by how much,
    and — when ``metrics["reference"]`` holds a :func:`linear_reference` of the same split —
    whether the data hold a signal the CNN missed (reference above ``min_auc``: a training
    problem) or may hold none at this resolution (reference low too).

    Args:
        metrics: ``metrics.json`` of ``train-classifier``: per split ``{"auc": ...}`` under
            ``"val"`` / ``"test"``, optionally ``"auc_ci": [low, high]`` (a 95 % interval, as
            :func:`bootstrap_auc` gives) in each split and
            ``"reference"`` (a :func:`linear_reference` result), and ``"explained"`` (``"model"``
            and the same per-split entries) for an explained model other than the final one.
            Missing parts are skipped.
        min_auc: the smallest acceptable AUC; ``0`` (or less) turns the gate off (the
            workflow's default: :class:`neuroexplain.settings.QualityConfig`).
        source: the metrics file (named in the error).
        key: the setting named in the error.
        allow_linear_reference: pass also a model that is the linear reference itself
            (``metrics["trained_is_linear_reference"]``); otherwise, with the gate on, such a
            model stops the explanation stages whatever its AUC: they would explain a
            voxel-wise logistic regression through a CNN whose features do not reach the
            logit (:class:`neuroexplain.settings.QualityConfig`).

    Returns:
        ``{"split", "auc", "auc_ci", "reference_auc", "min_auc", "passed", "model",
        "explained_apart", "linear_reference_only"}`` (``auc_ci`` and ``reference_auc``
        ``None`` when absent; ``passed`` is ``True``, also when the gate is off; ``model`` the
        judged model's name; ``explained_apart`` whether it is not the final model;
        ``linear_reference_only`` whether the judged model is the linear reference itself).

    Raises:
        InputError: ``min_auc > 0`` and the AUC is below it or missing, or the model is the
            linear reference itself and ``allow_linear_reference`` is off; one line.

    Example:
        >>> check_classifier_quality({"val": {"auc": 0.9}}, 0.7, source="metrics.json")["passed"]
        True
    """
    # the model the explanation stages explain: the trained model when the final one is its
    # ensemble with the linear reference (metrics["explained"], config classifier.explain)
    explained = metrics.get("explained")
    judged = explained if isinstance(explained, Mapping) else metrics
    name = judged.get("model", metrics.get("model"))
    test = judged.get("test")
    split = "test" if isinstance(test, Mapping) and test.get("auc") is not None else "val"
    part = judged.get(split)
    part = part if isinstance(part, Mapping) else {}
    auc = part.get("auc")
    auc = None if auc is None else float(auc)
    ci = _auc_ci(part)
    reference = metrics.get("reference")
    ref_part = reference.get(split) if isinstance(reference, Mapping) else None
    ref_auc = ref_part.get("auc") if isinstance(ref_part, Mapping) else None
    ref_auc = None if ref_auc is None else float(ref_auc)
    summary = {
        "split": split,
        "auc": auc,
        "auc_ci": ci,
        "reference_auc": ref_auc,
        "min_auc": float(min_auc),
        "passed": True,
        "model": None if name is None else str(name),
        "explained_apart": isinstance(explained, Mapping),
        "linear_reference_only": bool(metrics.get("trained_is_linear_reference", False)),
    }
    if min_auc <= 0:
        logger.info("classifier %s AUC %s; quality gate off (%s 0)", split, _fmt(auc), key)
        return summary
    if auc is not None and auc >= min_auc:
        logger.info("classifier %s AUC %.2f >= %s %.2f", split, auc, key, min_auc)
        if summary["linear_reference_only"] and not allow_linear_reference:
            raise InputError(
                source,
                f"the explained classifier ({name}) is the linear reference itself: the CNN did "
                "not improve on it (its best epoch is the start of the cnn+linear phase, where "
                "the CNN's logit layer is zero): every map would explain a voxel-wise logistic "
                "regression, Grad-CAM, TCAV / SACV and XNN would read CNN features that do not "
                "reach the logit, and the simulator's maps of such models did not match the "
                "planted truth — try more subjects, more epochs or classifier.standardize: true "
                "(quality.allow_linear_reference: true runs the explanation stages anyway)",
            )
        return summary

    who = f"explained classifier ({name})" if isinstance(explained, Mapping) else "classifier"
    if auc is None:
        what = f"{who} {split} AUC is missing (one class only, or no {split} split)"
    else:
        interval = f" (95 % CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""
        what = f"{who} {split} AUC {auc:.2f}{interval} is below {key} {min_auc:.2f}"
    if ref_auc is None:
        why = (
            "no linear reference in the metrics to tell a training failure from data without "
            "a signal — check the labels, then try more epochs or a lower learning rate"
        )
    elif ref_auc >= min_auc:
        why = (
            f"a linear reference on the same split reaches {ref_auc:.2f}: the data hold a "
            "signal the CNN did not learn — try more epochs, a lower or scheduled learning "
            "rate (classifier.lr, classifier.lr_schedule), classifier.standardize: true or "
            "less augmentation"
        )
    else:
        why = (
            f"a linear reference on the same split reaches only {ref_auc:.2f}: the data may "
            "hold no learnable signal at this resolution — check the labels "
            "(mri.label_column, mri.positive_class), the effect size or use a finer mri.shape"
        )
    raise InputError(source, f"{what}; {why} ({key}: 0 turns this check off)")


# ------------------------------------------------------------------------------ quality table


def _fmt3(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _split_auc(part: Any) -> str:
    """``"0.850 (95 % CI 0.720-0.950)"`` of one split's metrics (the interval when recorded)."""
    if not isinstance(part, Mapping):
        return "n/a"
    ci = _auc_ci(part)
    interval = f" (95 % CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
    return _fmt3(part.get("auc")) + interval


def quality_table(
    metrics: Mapping[str, Any], summary: Mapping[str, Any], *, key: str = "quality.min_auc"
) -> list[tuple[str, str]]:
    """The quality gate's decision as ``(item, value)`` rows, for people.

    Args:
        metrics: ``metrics.json`` of ``train-classifier`` (as for
            :func:`check_classifier_quality`).
        summary: what :func:`check_classifier_quality` returned for it.
        key: the setting that holds the threshold.

    Returns:
        Rows, in order: the split judged (subjects, positives), the CNN's AUC with its 95 %
        interval, the linear reference's AUC on that split (and its ``C``), the threshold, whether
        the classifier passed, the CNN's confusion matrix and balanced accuracy on that split (at
        probability 0.5), and the validation / test AUCs of both models. Missing values read
        ``n/a``.

    Example:
        >>> m = {"val": {"auc": 0.8}, "test": {"auc": 0.9, "confusion_matrix": [[9, 1], [2, 8]]}}
        >>> rows = quality_table(m, check_classifier_quality(m, 0.7, source=None))
        >>> dict(rows)["CNN confusion matrix (test)"]
        'TN 9, FP 1 / FN 2, TP 8'
    """
    split = summary["split"]
    explained = metrics.get("explained")
    explained = explained if isinstance(explained, Mapping) else None
    part = (explained or metrics).get(split)
    part = part if isinstance(part, Mapping) else {}
    reference = metrics.get("reference")
    reference = reference if isinstance(reference, Mapping) else {}
    subjects = "n/a"
    if part.get("n") is not None:
        subjects = f"{int(part['n'])} subjects"
        if part.get("n_positive") is not None:
            subjects += f", {int(part['n_positive'])} positive"
    ref_auc = _fmt3(summary.get("reference_auc"))
    if summary.get("reference_auc") is not None and reference.get("C") is not None:
        ref_auc += f" (L2 logistic regression, C = {float(reference['C']):g})"
    min_auc = float(summary["min_auc"])
    off = min_auc <= 0
    cm = part.get("confusion_matrix")
    if isinstance(cm, Sequence) and len(cm) == 2 and all(len(row) == 2 for row in cm):
        (tn, fp), (fn, tp) = cm
        confusion = f"TN {tn}, FP {fp} / FN {fn}, TP {tp}"
    else:
        confusion = "n/a"

    def both(model: Mapping[str, Any]) -> str:
        return " / ".join(_split_auc(model.get(s)) for s in ("val", "test"))

    rows = [
        ("split judged", f"{split} ({subjects})"),
        (f"CNN AUC ({split})", _split_auc(part)),
        (f"linear reference AUC ({split})", ref_auc),
        (key, f"{min_auc:g}" + (" (gate off)" if off else "")),
        ("passed", ("yes" if summary.get("passed") else "no") + (" (gate off)" if off else "")),
        (f"CNN confusion matrix ({split})", confusion),
        (f"CNN balanced accuracy ({split})", _fmt3(part.get("balanced_accuracy"))),
        ("CNN AUC val / test", both(explained or metrics)),
        ("linear reference AUC val / test", both(reference)),
    ]
    share = metrics.get("cnn_logit_share")
    if isinstance(share, int | float) and share < 1:  # a trained model with a linear path
        rows.append(
            (
                "CNN path's share of the trained logit",
                f"{share:.2f} (sd on the training subjects; the rest is the linear path)",
            )
        )
    if explained is not None:  # the gate judged the explained model; the final one predicts
        name = f"{explained.get('model')} (classifier.explain)"
        if metrics.get("trained_is_linear_reference"):
            name += "; the CNN did not improve on the linear reference: a voxel-wise linear model"
        rows.insert(1, ("explained model", name))
        final = f"{metrics.get('model', 'final')} model AUC val / test (predictions)"
        rows.append((final, both(metrics)))
    return rows


_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px 12px; text-align: left; }}
th {{ background: #f3f3f3; }}
</style>
</head>
<body>
<h3>{title}</h3>
<table>
<thead><tr><th>item</th><th>value</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<p>{note}</p>
</body>
</html>
"""

_NOTE = (
    "AUCs with their 95 % stratified bootstrap interval. Confusion matrix at probability 0.5 "
    "(rows: true class, columns: predicted). The linear reference is an L2 logistic regression "
    "on the standardised voxels fitted on the same training subjects."
)


def write_quality_table(
    rows: Sequence[tuple[str, str]], path: str | os.PathLike[str], *, title: str
) -> Path:
    """Write ``(item, value)`` rows as a small table, atomically; the format from the suffix.

    Args:
        rows: from :func:`quality_table`.
        path: ``.html`` (a standalone page, as the Snakemake report shows it), ``.md``
            (Markdown, the title as a heading) or ``.tsv`` (``item``, ``value`` columns).
        title: one line above the table (not in the TSV).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: another suffix.
    """
    import html

    from neuroexplain.io.atomic import atomic_output

    out = Path(path)
    suffix = out.suffix.lower()
    if suffix == ".html":
        body = "\n".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows
        )
        text = _HTML.format(title=html.escape(title), rows=body, note=html.escape(_NOTE))
    elif suffix == ".md":
        lines = [f"## {title}", "", "| item | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
        text = "\n".join([*lines, "", _NOTE]) + "\n"
    elif suffix == ".tsv":
        text = "item\tvalue\n" + "".join(f"{k}\t{v}\n" for k, v in rows)
    else:
        raise ValueError(f"expected a table path ending in {', '.join(TABLE_SUFFIXES)}, got {out}")
    with atomic_output(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out
