"""Testing with Concept Activation Vectors (TCAV) for 3D networks.

Kim et al. 2018, "Interpretability Beyond Feature Attribution: Quantitative Testing with Concept
Activation Vectors (TCAV)", ICML (arXiv:1711.11279):

1. a **CAV** ``v_C^l`` is the normal of a linear classifier separating the layer-``l``
   activations of concept examples from those of a random set (here: scikit-learn logistic
   regression or SGD, fixed seed, class-balanced; its accuracy is measured on held-out
   examples);
2. the **TCAV score** of a class ``k`` is the fraction of class-``k`` inputs whose directional
   derivative ``S_{C,k,l}(x) = grad_a h_k(a_l(x)) . v_C^l`` is positive (``h_k``: the class
   logit); Captum's ``magnitude`` score (positive over total ``|S|``) is reported too;
3. the **test**: the concept's scores over ``N`` CAVs (concept vs ``N`` random sets) against the
   scores of ``N`` random-vs-random CAVs, two-sided (Mann-Whitney U by default: the scores are
   bounded, often tied and all-or-nothing; or Welch's t-test, as Kim et al.), with effect sizes
   (difference of means, rank-biserial correlation, Cohen's d). The p-values of every concept x
   layer of a run are one family, corrected by Holm (default), Bonferroni or Benjamini-Hochberg
   (``p_value`` raw, ``p_adjusted`` corrected). The magnitude score gets its own p-value,
   reported beside the sign count's (informative when most derivatives share a sign: it still
   weighs how far each falls on either side);
4. the **verdict** of the default ``test="permutation"`` (:func:`permutation_test`): the
   concept's effect, the mean directional derivative along the difference of the mean
   activations of *all* concept examples and *all* random-pool examples, against random
   relabellings of those examples; Holm over concepts x layers; ``significant`` when the
   corrected p-value is below ``alpha`` over its whole Monte Carlo interval, ``inconclusive`` when
   the interval straddles ``alpha``, when no outcome could pass, or when the layer does not tell
   the concept from its pool (direction test), else ``not significant``. Why not the sign counts
   of step 3: the ``N`` CAVs of a concept share its examples, so they are nearly parallel and
   their scores are one bit repeated ``N`` times when the gradients share a sign; the
   random-vs-random CAVs all share the set ``random_0``, so the null is about one bit too, drawn
   afresh with each seed, and the verdict followed that draw (issue 23). With ``test`` =
   ``"mannwhitney"`` / ``"welch"`` the verdict of step 3 is kept:
   ``significant`` (``p_adjusted < alpha``), ``not significant``, or
   ``inconclusive`` when the test cannot answer: the CAVs do not separate concept from random
   on held-out examples (mean balanced accuracy below ``min_accuracy``, default 0.6), or the
   test has no power: even a concept scoring 1 (or 0, in the observed direction) in every run
   would not be significant after the correction (typically the random-vs-random sign counts
   are all near 1: the class's directional derivatives share a sign for nearly any direction,
   so the sign count cannot single out the concept; more random sets help). The accuracy
   condition matters: the concept set is the same in all ``N`` CAVs, so even a concept the
   layer cannot tell from random (accuracy ~0.5) gets ``N`` nearly parallel CAVs (the
   direction of its own sampling noise), hence nearly constant all-or-nothing TCAV scores and,
   often, a tiny p-value. A CAV that does not classify is not a concept direction, so its
   score is not interpreted (Kim et al. also discard inaccurate CAVs). ``p_value`` is always
   reported as is.

The API follows Captum's ``captum.concept.TCAV`` (``compute_cavs(experimental_sets)``,
``interpret(inputs, experimental_sets, target)``) but works on in-memory 3D example sets,
caches activations per example, flattens a layer's output ``(C, X, Y, Z)`` to one vector per
volume, and stores CAVs in a :class:`~neuroexplain.concepts3d.store.CAVStore` tied to the
checkpoint. (Captum's own TCAV pickles CAVs to disk with ``torch.load`` without
``weights_only`` and trains its classifier with its own SGD loop; neither fits here.)

Example:
    >>> tcav = TCAV(model, ["features.3"], seed=0)  # doctest: +SKIP
    >>> sets = [[concept, r] for r in randoms[1:]] + [[randoms[0], r] for r in randoms[1:]]
    >>> out = tcav.interpret(disease_inputs, sets, target=0)  # doctest: +SKIP
    >>> out["atrophy-random_1"]["features.3"]["sign_count"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from neuroexplain.concepts3d.activations import layer_activations, layer_gradients, resolve_layers
from neuroexplain.concepts3d.concepts import Concept, is_placeholder
from neuroexplain.concepts3d.store import CAVStore
from neuroexplain.settings import CAV_CLASSIFIERS, TCAV_CORRECTIONS, TCAV_TESTS

__all__ = [
    "CAV",
    "CLASSIFIERS",
    "TCAV",
    "VERDICTS",
    "adjust_p_values",
    "apply_correction",
    "directional_derivatives",
    "effect_sizes",
    "permutation_test",
    "summarize_experiment",
    "tcav_score",
    "tcav_significance",
    "train_cav",
]

logger = logging.getLogger(__name__)

CLASSIFIERS = CAV_CLASSIFIERS
#: values of the ``verdict`` column
VERDICTS = ("significant", "not significant", "inconclusive")


@dataclass
class CAV:
    """A concept activation vector and the linear classifier it came from.

    Attributes:
        concept: name of the concept (positive class).
        random: name of the set it was contrasted with (negative class).
        layer: dotted layer name.
        vector: ``(D,)`` unit vector pointing from random towards concept.
        weights: ``(D,)`` classifier weights in activation units (``vector`` before
            normalisation); ``decision(a) = a . weights + intercept``.
        intercept: classifier bias.
        accuracy: balanced accuracy on held-out examples (NaN when too few to hold out).
        n_train: training samples (examples, or spatial positions for SACV).
        n_test: held-out samples.
        kind: ``"tcav"`` (one vector per volume) or ``"sacv"`` (one per spatial position).
    """

    concept: str
    random: str
    layer: str
    vector: torch.Tensor
    weights: torch.Tensor
    intercept: float
    accuracy: float
    n_train: int
    n_test: int
    kind: str = "tcav"

    def decision(self, acts: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` activation vectors -> ``(N,)`` classifier decision values (logit scale)."""
        return acts.reshape(acts.shape[0], -1).float() @ self.weights + self.intercept

    def to_entry(self) -> dict[str, Any]:
        """A plain dict for :class:`~neuroexplain.concepts3d.store.CAVStore`."""
        return {
            "concept": self.concept,
            "random": self.random,
            "layer": self.layer,
            "vector": self.vector.detach().cpu().float(),
            "weights": self.weights.detach().cpu().float(),
            "intercept": float(self.intercept),
            "accuracy": float(self.accuracy),
            "n_train": int(self.n_train),
            "n_test": int(self.n_test),
            "kind": self.kind,
        }

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> CAV:
        """Inverse of :meth:`to_entry`."""
        return cls(**{k: entry[k] for k in cls.__dataclass_fields__})


def _holdout(
    y: np.ndarray, groups: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Bool mask of held-out rows: a stratified ``fraction`` of the groups of each class."""
    test = np.zeros(len(y), dtype=bool)
    if fraction <= 0:
        return test
    taken: set[Any] = set()
    for cls in (1, 0):
        g = [v for v in dict.fromkeys(groups[y == cls].tolist()) if v not in taken]
        if len(g) < 3:  # keep at least two groups of each class for training
            continue
        n = max(1, round(len(g) * fraction))
        chosen = [g[i] for i in rng.choice(len(g), size=n, replace=False)]
        taken.update(chosen)
    if taken:
        test = np.isin(groups, list(taken))
    return test


def _seed_of(seed: int, *parts: str) -> int:
    h = hashlib.sha256("|".join(parts).encode()).hexdigest()
    return (int(h[:8], 16) + int(seed)) % (2**31 - 1)


def train_cav(
    pos: torch.Tensor | np.ndarray,
    neg: torch.Tensor | np.ndarray,
    *,
    pos_groups: Sequence[Any] | None = None,
    neg_groups: Sequence[Any] | None = None,
    seed: int = 0,
    test_fraction: float = 0.33,
    classifier: str = "logistic",
    C: float = 1.0,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Train a linear classifier separating ``pos`` (concept) from ``neg`` (random) vectors.

    Args:
        pos: ``(n, D)`` concept activation vectors.
        neg: ``(m, D)`` random activation vectors.
        pos_groups: one group id per row of ``pos`` (e.g. the subject of a spatial position);
            held-out rows are whole groups, so the accuracy is not inflated by near-duplicate
            neighbouring positions. Default: each row its own group.
        neg_groups: the same for ``neg``.
        seed: seed of the hold-out split, sub-sampling and the classifier.
        test_fraction: fraction of the groups of each class held out for the accuracy.
        classifier: ``"logistic"`` (L2 logistic regression, lbfgs) or ``"sgd"`` (linear SVM by
            SGD, as the TCAV reference code).
        C: inverse regularisation strength (``alpha = 1 / (C * n)`` for SGD).
        max_samples: randomly keep at most this many training rows (SACV: positions).

    Returns:
        ``{"vector": (D,) unit tensor, "weights": (D,) tensor, "intercept", "accuracy",
        "n_train", "n_test"}``. The vector points towards the concept; a zero vector is
        returned (with a warning) when the classes cannot be told apart at all.
    """
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.metrics import balanced_accuracy_score

    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}; expected one of {CLASSIFIERS}")
    xp = np.asarray(pos, dtype=np.float32).reshape(len(pos), -1)
    xn = np.asarray(neg, dtype=np.float32).reshape(len(neg), -1)
    if xp.shape[1] != xn.shape[1]:
        raise ValueError(f"concept vectors have {xp.shape[1]} dims, random ones {xn.shape[1]}")
    if len(xp) < 1 or len(xn) < 1:
        raise ValueError("expected at least one concept and one random vector")
    x = np.concatenate([xp, xn])
    y = np.concatenate([np.ones(len(xp), int), np.zeros(len(xn), int)])
    gp = np.asarray(
        [f"p{i}" for i in range(len(xp))] if pos_groups is None else [str(g) for g in pos_groups],
        dtype=object,
    )
    gn = np.asarray(
        [f"n{i}" for i in range(len(xn))] if neg_groups is None else [str(g) for g in neg_groups],
        dtype=object,
    )
    groups = np.concatenate([gp, gn])
    rng = np.random.default_rng(seed)
    test = _holdout(y, groups, test_fraction, rng)
    train_idx = np.flatnonzero(~test)
    if max_samples is not None and len(train_idx) > max_samples:
        train_idx = np.sort(rng.choice(train_idx, size=int(max_samples), replace=False))
    xt, yt = x[train_idx], y[train_idx]
    d = x.shape[1]
    if len(np.unique(yt)) < 2:
        raise ValueError("training rows of a CAV hold a single class")
    scale = float(xt.std()) or 1.0
    # Representer theorem: the L2-regularised solution lies in the span of the training rows,
    # so with fewer rows than dimensions we fit in an orthonormal basis of that span (exact,
    # and much faster for the 10^4-10^5-dimensional activations of convolutional layers).
    basis = None
    if d > len(xt):
        xs = (xt / scale).astype(np.float64)
        lam, u = np.linalg.eigh(xs @ xs.T)  # Gram matrix: cheaper than an SVD of (n, D)
        keep = lam > max(float(lam.max()), 0.0) * 1e-10
        if keep.any():
            basis = (xs.T @ (u[:, keep] / np.sqrt(lam[keep]))).T  # orthonormal rows (r, D)
    fit_x = xt / scale if basis is None else (xt / scale) @ basis.T
    if classifier == "logistic":
        # liblinear (trust-region Newton): fast and robust on the separable, rank-deficient
        # problems here; the large intercept_scaling makes its penalised bias nearly free
        clf = LogisticRegression(
            C=C,
            max_iter=2000,
            class_weight="balanced",
            random_state=seed,
            solver="liblinear",
            intercept_scaling=10.0,
        )
    else:
        clf = SGDClassifier(
            alpha=1.0 / (C * len(yt)),
            max_iter=2000,
            tol=1e-4,
            class_weight="balanced",
            random_state=seed,
        )
    clf.fit(fit_x, yt)
    coef = np.asarray(clf.coef_, dtype=np.float64).reshape(-1)
    w = (coef if basis is None else coef @ basis) / scale
    b = float(np.asarray(clf.intercept_).reshape(-1)[0])
    norm = float(np.linalg.norm(w))
    if not np.isfinite(norm) or norm == 0:
        logger.warning("CAV classifier found no direction (identical classes?): zero vector")
        vec = np.zeros(d)
    else:
        vec = w / norm
    acc = float("nan")
    if test.any() and len(np.unique(y[test])) == 2:
        pred = (x[test].astype(np.float64) @ w + b > 0).astype(int)
        acc = float(balanced_accuracy_score(y[test], pred))
    return {
        "vector": torch.from_numpy(vec.astype(np.float32)),
        "weights": torch.from_numpy(w.astype(np.float32)),
        "intercept": b,
        "accuracy": acc,
        "n_train": len(train_idx),
        "n_test": int(test.sum()),
    }


def directional_derivatives(grads: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``S(x) = grad_a h(a(x)) . v`` for each input: ``(N, *layer_shape)``, ``(D,)`` -> ``(N,)``."""
    return grads.reshape(grads.shape[0], -1).double() @ vector.reshape(-1).double()


def tcav_score(grads: torch.Tensor, vector: torch.Tensor) -> dict[str, float]:
    """TCAV scores of one CAV over a set of class inputs.

    Args:
        grads: ``(N, *layer_shape)`` gradients of the class logit w.r.t. the layer.
        vector: ``(D,)`` CAV.

    Returns:
        ``{"sign_count": fraction of inputs with S > 0, "magnitude": sum of positive S over
        sum |S| (Captum), "mean_derivative": mean S}``.
    """
    s = directional_derivatives(grads, vector)
    tot = float(s.abs().sum())
    return {
        "sign_count": float((s > 0).double().mean()) if len(s) else float("nan"),
        "magnitude": float(s.clamp(min=0).sum() / tot) if tot > 0 else 0.0,
        "mean_derivative": float(s.mean()) if len(s) else float("nan"),
    }


def tcav_significance(
    concept_scores: Sequence[float], random_scores: Sequence[float], test: str = "welch"
) -> float:
    """Two-sided p-value of concept vs random-vs-random TCAV scores (scipy).

    Args:
        concept_scores: one TCAV score per concept-vs-random CAV.
        random_scores: one TCAV score per random-vs-random CAV.
        test: ``"welch"`` (Welch t-test, Kim et al. 2018) or ``"mannwhitney"`` (Mann-Whitney U,
            rank-based: no normality assumption, ties handled, an outlying run cannot dominate).

    Degenerate cases (no variance in either group) give ``0.0`` for Welch when the means differ
    (Mann-Whitney gives its smallest p-value for the sample sizes) and ``1.0`` when they are
    equal. Fewer than two scores in a group: NaN.
    """
    from scipy.stats import mannwhitneyu, ttest_ind

    if test not in TCAV_TESTS:
        raise ValueError(f"unknown test {test!r}; expected one of {TCAV_TESTS}")
    a = _finite(concept_scores)
    b = _finite(random_scores)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    if np.ptp(a) < 1e-12 and np.ptp(b) < 1e-12 and abs(a.mean() - b.mean()) < 1e-12:
        return 1.0
    if test == "mannwhitney":
        return float(mannwhitneyu(a, b, alternative="two-sided", method="auto").pvalue)
    if np.ptp(a) < 1e-12 and np.ptp(b) < 1e-12:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # near-constant groups
        return float(ttest_ind(a, b, equal_var=False).pvalue)


def permutation_test(
    concept: torch.Tensor | np.ndarray,
    random: torch.Tensor | np.ndarray,
    grads: torch.Tensor | np.ndarray,
    *,
    n_permutations: int = 10000,
    seed: int = 0,
    level: float = 0.99,
    chunk: int = 4000,
) -> dict[str, Any]:
    """Permutation test of a concept's effect on the class logit (CAV of mean differences).

    The concept's vector is the difference of the mean layer activations of **all** its
    examples and **all** examples of its random pool, ``delta = mean(A) - mean(B)`` (no random
    subsets, no held-out split, no classifier: nothing in it depends on a seed). The statistic
    is the mean directional derivative of the class logit along it,
    ``T = mean_x grad_a h(a(x)) . delta``: the first-order change of the logit when a class
    input's activations move by the concept's shift (logit units). Under the null that concept
    and random examples are exchangeable at this layer, every relabelling of the ``n_A + n_B``
    examples into groups of ``n_A`` and ``n_B`` is as likely as the observed one, so the
    two-sided p-value of ``T`` among random relabellings is exact up to Monte Carlo error, for
    any network and layer: a concept that is a random draw of the pool is significant with
    probability <= alpha, also when the gradients share one sign for every input and each CAV's
    sign count is all-or-nothing (where the sign-count test against random-vs-random CAVs has
    one bit per direction). The same relabellings test whether the layer tells the concept from
    its pool at all: ``D = ||delta||`` against its permutation distribution (one-sided).

    Cheap for any number of relabellings: with ``q = X . mean_x grad`` and the Gram matrix
    ``G = X X^T`` of the stacked examples ``X``, a relabelling ``c`` (``+1/n_A``, ``-1/n_B``)
    gives ``T = q . c`` and ``D^2 = c^T G c``.

    Args:
        concept: ``(n_A, D)`` concept activation vectors (every example).
        random: ``(n_B, D)`` random-pool activation vectors (every example).
        grads: ``(N, D)`` gradients of the (signed) class logit w.r.t. the layer.
        n_permutations: Monte Carlo relabellings (``B``).
        seed: seed of the relabellings, the only randomness: it moves ``p`` within its Monte
            Carlo interval (``p_low``, ``p_high``).
        level: confidence level of the Clopper-Pearson interval of each p-value.
        chunk: relabellings per vectorised batch.

    Returns:
        ``{"statistic": T, "statistic_null_sd": sd of T over relabellings, "z": T / that sd,
        "positive_fraction": fraction of inputs whose derivative along ``delta`` is > 0,
        "cosine": cos(mean gradient, delta), "p_value": (1 + #|T_perm| >= |T|) / (B + 1),
        "p_low", "p_high": Clopper-Pearson interval of the exact permutation p-value,
        "distance": D, "p_direction", "p_direction_low", "p_direction_high": the same for D,
        "n_permutations": B, "p_min": the smallest attainable p-value (``1 / (B + 1)``, or one
        over the number of distinct relabellings when that is larger)}``.
    """
    from scipy.stats import beta

    xa = np.asarray(concept, dtype=np.float64).reshape(len(concept), -1)
    xb = np.asarray(random, dtype=np.float64).reshape(len(random), -1)
    g = np.asarray(grads, dtype=np.float64).reshape(len(grads), -1)
    if xa.shape[1] != xb.shape[1] or xa.shape[1] != g.shape[1]:
        raise ValueError("concept, random and gradient vectors must have the same length")
    na, nb = len(xa), len(xb)
    if na < 1 or nb < 1 or len(g) < 1:
        raise ValueError("expected at least one concept example, random example and input")
    x = np.concatenate([xa, xb])
    x = x - x.mean(axis=0)  # contrasts sum to zero: centring changes nothing but rounding
    gbar = g.mean(axis=0)
    q = x @ gbar
    gram = x @ x.T
    n = na + nb
    obs = np.concatenate([np.full(na, 1.0 / na), np.full(nb, -1.0 / nb)])
    delta = obs @ x
    t_obs = float(obs @ q)
    d_obs = float(np.sqrt(max(obs @ gram @ obs, 0.0)))
    rng = np.random.default_rng(seed)
    b = int(n_permutations)
    if b < 1:
        raise ValueError(f"expected n_permutations >= 1, got {b}")
    tol = 1e-9 * (abs(t_obs) + float(np.abs(q).max()) / min(na, nb) + 1e-300)
    exceed_t = exceed_d = 0
    s1 = s2 = 0.0
    done = 0
    while done < b:
        m = min(int(chunk), b - done)
        perm = rng.permuted(np.broadcast_to(np.arange(n), (m, n)), axis=1)
        c = np.where(perm < na, 1.0 / na, -1.0 / nb)
        t = c @ q
        d2 = np.einsum("bi,ij,bj->b", c, gram, c, optimize=True)
        exceed_t += int((np.abs(t) >= abs(t_obs) - tol).sum())
        exceed_d += int((d2 >= d_obs**2 * (1 - 1e-9)).sum())
        s1 += float(t.sum())
        s2 += float((t * t).sum())
        done += m
    sd = math.sqrt(max(s2 / b - (s1 / b) ** 2, 0.0))
    p_min = max(1.0 / (b + 1), 1.0 / math.comb(n, na))
    tail = (1.0 - level) / 2

    def interval(k: int) -> tuple[float, float, float]:
        p = (1 + k) / (b + 1)
        lo = float(beta.ppf(tail, k, b - k + 1)) if k > 0 else 0.0
        hi = float(beta.ppf(1 - tail, k + 1, b - k)) if k < b else 1.0
        return max(p, p_min), max(lo, p_min), min(1.0, max(hi, p_min))

    p, lo, hi = interval(exceed_t)
    pd_, pd_lo, pd_hi = interval(exceed_d)
    s = g @ delta
    gn, dn = float(np.linalg.norm(gbar)), float(np.linalg.norm(delta))
    return {
        "statistic": t_obs,
        "statistic_null_sd": sd,
        "z": t_obs / sd if sd > 0 else float("nan"),
        "positive_fraction": float((s > 0).mean()),
        "cosine": float(gbar @ delta / (gn * dn)) if gn > 0 and dn > 0 else 0.0,
        "p_value": p,
        "p_low": lo,
        "p_high": hi,
        "distance": d_obs,
        "p_direction": pd_,
        "p_direction_low": pd_lo,
        "p_direction_high": pd_hi,
        "n_permutations": b,
        "p_min": p_min,
    }


def effect_sizes(
    concept_scores: Sequence[float], random_scores: Sequence[float]
) -> dict[str, float]:
    """Effect sizes of concept vs random-vs-random TCAV scores.

    Returns:
        ``{"score_difference": mean(concept) - mean(random), "rank_biserial": P(c > r) -
        P(c < r) over all run pairs (Mann-Whitney's effect size, in [-1, 1]), "cohens_d":
        difference over the pooled sd (NaN when both groups are constant)}``.
    """
    a = _finite(concept_scores)
    b = _finite(random_scores)
    if not len(a) or not len(b):
        return {"score_difference": float("nan"), "rank_biserial": float("nan"),
                "cohens_d": float("nan")}  # fmt: skip
    diff = a[:, None] - b[None, :]
    rb = float((diff > 0).mean() - (diff < 0).mean())
    d = float("nan")
    if len(a) > 1 and len(b) > 1:
        pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (
            len(a) + len(b) - 2
        )
        if pooled > 1e-24:
            d = float((a.mean() - b.mean()) / math.sqrt(pooled))
    return {"score_difference": float(a.mean() - b.mean()), "rank_biserial": rb, "cohens_d": d}


def adjust_p_values(p_values: Sequence[float], method: str = "holm") -> np.ndarray:
    """Multiple-testing adjusted p-values (NaNs stay NaN and are not counted as tests).

    Args:
        p_values: raw p-values of the family (every concept x layer of a run).
        method: ``"holm"`` (Holm 1979, step-down Bonferroni; controls the family-wise error
            rate, never less powerful than Bonferroni), ``"bonferroni"`` (``p * m``),
            ``"bh"`` (Benjamini & Hochberg 1995; controls the false discovery rate) or
            ``"none"``.

    Returns:
        Adjusted p-values, clipped at 1, in the order of ``p_values``.
    """
    if method not in TCAV_CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}; expected one of {TCAV_CORRECTIONS}")
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    q = p[ok]
    if method == "none":
        adj = q.copy()
    elif method == "bonferroni":
        adj = q * m
    elif method == "holm":
        order = np.argsort(q, kind="stable")
        steps = np.maximum.accumulate(q[order] * (m - np.arange(m)))
        adj = np.empty(m)
        adj[order] = steps
    else:  # Benjamini-Hochberg step-up
        order = np.argsort(q, kind="stable")
        ranked = q[order] * m / np.arange(1, m + 1)
        steps = np.minimum.accumulate(ranked[::-1])[::-1]
        adj = np.empty(m)
        adj[order] = steps
    out[ok] = np.minimum(adj, 1.0)
    return out


def _finite(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    return a[np.isfinite(a)]


class TCAV:
    """Captum-style TCAV for 3D networks (see the module docstring).

    Args:
        model: network mapping ``(B, C, X, Y, Z)`` to ``(B, K)`` logits.
        layers: dotted layer names (``model.named_modules()``).
        batch_size: volumes per forward / backward pass.
        device: where to run (default: the model's device).
        seed: base seed of the CAV classifiers (each CAV derives its own from its example sets).
        classifier: ``"logistic"`` or ``"sgd"`` (:func:`train_cav`).
        C: inverse regularisation strength of the classifier.
        test_fraction: held-out fraction for the CAV accuracy.
        store: cache of CAVs tied to the checkpoint (optional).
        progress: progress bars.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str],
        *,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        seed: int = 0,
        classifier: str = "logistic",
        C: float = 1.0,
        test_fraction: float = 0.33,
        store: CAVStore | None = None,
        progress: bool | None = False,
    ) -> None:
        if classifier not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {classifier!r}; expected one of {CLASSIFIERS}")
        self.model = model.eval()
        self.layers = resolve_layers(model, layers)
        self.batch_size = int(batch_size)
        self.device = device
        self.seed = int(seed)
        self.classifier = classifier
        self.C = float(C)
        self.test_fraction = float(test_fraction)
        self.store = store
        self.progress = progress
        self._acts: dict[tuple[str, str], torch.Tensor] = {}

    # ----------------------------------------------------------------------- activations

    def activations(self, concept: Concept) -> dict[str, torch.Tensor]:
        """Flattened layer activations of a concept's examples, ``{layer: (n, D)}``.

        Activations are cached per example id, so overlapping random sets cost one pass.
        """
        self._cache_activations(concept)
        return {
            layer: torch.stack([self._acts[(layer, eid)] for eid in concept.ids])
            for layer in self.layers
        }

    def _cache_activations(self, concept: Concept) -> None:
        """Compute and cache the activations of the examples not cached yet."""
        missing = [
            i
            for i, eid in enumerate(concept.ids)
            if any((layer, eid) not in self._acts for layer in self.layers)
        ]
        if missing:
            if is_placeholder(concept.inputs):
                raise ValueError(
                    f"concept {concept.name!r} was detached from its volumes, but "
                    f"{len(missing)} of its examples have no cached activations"
                )
            acts = layer_activations(
                self.model,
                # all missing (the usual case): the volumes themselves, not a copy of them
                concept.inputs if len(missing) == len(concept) else concept.inputs[missing],
                self.layers,
                batch_size=self.batch_size,
                device=self.device,
                progress=self.progress,
            )
            for layer, a in acts.items():
                flat = a.reshape(a.shape[0], -1)
                for j, i in enumerate(missing):
                    self._acts[(layer, concept.ids[i])] = flat[j]

    def detach_inputs(self, concepts: Sequence[Concept], *, compute: bool = True) -> list[Concept]:
        """Cache the activations of ``concepts`` and return them without their volumes.

        The returned concepts keep names, ids and keys; their ``inputs`` are a zero-memory
        broadcast placeholder and masks are dropped, which is all TCAV needs once every example's
        activations are cached. Run on a configuration's concepts one at a time, this keeps
        one concept's volumes in memory instead of all of them (with random sets, ~0.5 GB per
        concept of 80 examples at 64³). ``compute=False`` skips the activations (when every CAV
        these concepts take part in is already in the store, none are needed).
        """
        out = []
        for c in concepts:
            if compute:
                self._cache_activations(c)
            shape = (len(c), *c.inputs.shape[1:])
            ghost = torch.zeros((1,) * len(shape), dtype=c.inputs.dtype).expand(shape)
            out.append(Concept(name=c.name, inputs=ghost, ids=list(c.ids), key=c.key))
        return out

    # ------------------------------------------------------------------------------ CAVs

    def _params(self) -> str:
        return f"{self.classifier}:C{self.C:g}:t{self.test_fraction:g}:s{self.seed}"

    def cav_key(self, layer: str, concept: Concept, random: Concept) -> str:
        """Cache key of the CAV of ``concept`` vs ``random`` at ``layer``."""
        return f"tcav|{layer}|{concept.key}|{random.key}|{self._params()}"

    def compute_cavs(
        self, experimental_sets: Sequence[Sequence[Concept]]
    ) -> dict[str, dict[str, CAV]]:
        """Train (or fetch from the store) one CAV per experimental set and layer.

        Args:
            experimental_sets: pairs ``[concept, random]``.

        Returns:
            ``{"<concept>-<random>": {layer: CAV}}``.
        """
        out: dict[str, dict[str, CAV]] = {}
        for pair in experimental_sets:
            if len(pair) != 2:
                raise ValueError(f"expected [concept, random] pairs, got {len(pair)} concepts")
            c, r = pair
            key = f"{c.name}-{r.name}"
            out[key] = {}
            todo = [layer for layer in self.layers if not self._cached(layer, c, r)]
            acts_c = self.activations(c) if todo else {}
            acts_r = self.activations(r) if todo else {}
            for layer in self.layers:
                ck = self.cav_key(layer, c, r)
                entry = self.store.get(ck) if self.store is not None else None
                if entry is None:
                    res = train_cav(
                        acts_c[layer],
                        acts_r[layer],
                        seed=_seed_of(self.seed, c.key, r.key, layer),
                        test_fraction=self.test_fraction,
                        classifier=self.classifier,
                        C=self.C,
                    )
                    cav = CAV(concept=c.name, random=r.name, layer=layer, kind="tcav", **res)
                    if self.store is not None:
                        self.store.put(ck, cav.to_entry())
                else:
                    cav = CAV.from_entry({**entry, "concept": c.name, "random": r.name})
                out[key][layer] = cav
        return out

    def _cached(self, layer: str, c: Concept, r: Concept) -> bool:
        return self.store is not None and self.cav_key(layer, c, r) in self.store

    # ------------------------------------------------------------------------- interpret

    def class_gradients(
        self, inputs: torch.Tensor, *, target: int = 0, sign: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Gradients of ``sign * logit_target`` w.r.t. each layer, ``{layer: (N, D)}``."""
        out = {}
        for layer in self.layers:
            _, g, _ = layer_gradients(
                self.model,
                inputs,
                layer,
                target=target,
                sign=sign,
                batch_size=self.batch_size,
                device=self.device,
                progress=self.progress,
            )
            out[layer] = g.reshape(g.shape[0], -1)
        return out

    def interpret(
        self,
        inputs: torch.Tensor,
        experimental_sets: Sequence[Sequence[Concept]],
        target: int = 0,
        *,
        sign: float = 1.0,
        grads: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, dict[str, dict[str, float]]]:
        """TCAV scores of every experimental set and layer for the class of ``target``.

        Args:
            inputs: ``(N, C, X, Y, Z)`` inputs of the class being explained.
            experimental_sets: pairs ``[concept, random]``.
            target: logit index.
            sign: ``-1`` to explain the other class of a single-logit binary network.
            grads: :meth:`class_gradients` of these inputs, when already computed.

        Returns:
            ``{"<concept>-<random>": {layer: {"sign_count", "magnitude", "mean_derivative",
            "accuracy"}}}``.
        """
        cavs = self.compute_cavs(experimental_sets)
        if grads is None:
            grads = self.class_gradients(inputs, target=target, sign=sign)
        out: dict[str, dict[str, dict[str, float]]] = {}
        for key, per_layer in cavs.items():
            out[key] = {}
            for layer, cav in per_layer.items():
                out[key][layer] = {**tcav_score(grads[layer], cav.vector), "accuracy": cav.accuracy}
        return out


def summarize_experiment(
    scores: Mapping[str, Mapping[str, Mapping[str, float]]],
    concept: str,
    randoms: Sequence[str],
    layer: str,
    *,
    alpha: float = 0.01,
    min_accuracy: float = 0.6,
    test: str = "welch",
    permutation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Concept-vs-random statistics of one concept at one layer.

    Args:
        scores: :meth:`TCAV.interpret` output holding the sets ``concept-randoms[i]`` and
            ``randoms[0]-randoms[i]`` for ``i >= 1``.
        concept: concept name.
        randoms: names of the random sets; ``randoms[0]`` is the random "concept" of the
            random-vs-random CAVs.
        layer: layer name.
        alpha: significance level (of ``p_adjusted``).
        min_accuracy: mean held-out CAV accuracy below which the concept is not a direction of
            the layer: its verdict is ``inconclusive`` and it is never significant (0 disables).
        test: ``"welch"`` or ``"mannwhitney"`` (:func:`tcav_significance`) of the sign counts
            over the random sets, or ``"permutation"``: the verdict comes from ``permutation``
            (:func:`permutation_test` of the concept's mean-difference effect) and the sign-count
            test (Mann-Whitney) is reported as ``p_value_sign_count``.
        permutation: :func:`permutation_test` output (required for ``test="permutation"``).
            Its direction test replaces the CAV-accuracy check: a concept the layer does not
            tell from its random pool (``p_direction_high >= alpha``) gets no negative verdict.

    Returns:
        Sign-count and magnitude scores (per run, mean, sd) of the concept and the random CAVs,
        accuracies, ``p_value`` (raw, sign count), ``p_value_magnitude`` (raw, magnitude
        scores; reported, not used for the verdict), effect sizes (:func:`effect_sizes`),
        ``cav_valid`` (accuracy check), ``p_best`` (the raw p-value of the most extreme
        outcome in the observed direction, a concept scoring 1, or 0, in every run: when even
        that, corrected, is not below ``alpha`` the test has no power; typically the
        random-vs-random sign counts are all near 1, the class's directional derivatives sharing
        their sign for nearly any direction), ``p_adjusted`` (= ``p_value`` for a family of one
        test; see :func:`apply_correction`), ``verdict`` (``significant`` / ``not significant`` /
        ``inconclusive``), ``verdict_reason`` and ``significant``
        (``verdict == "significant"``).
    """
    cs = [scores[f"{concept}-{r}"][layer] for r in randoms[1:]]
    rs = [scores[f"{randoms[0]}-{r}"][layer] for r in randoms[1:]]
    c_sc = [d["sign_count"] for d in cs]
    r_sc = [d["sign_count"] for d in rs]
    c_mag = [d["magnitude"] for d in cs]
    r_mag = [d["magnitude"] for d in rs]
    acc = [d["accuracy"] for d in cs]
    racc = [d["accuracy"] for d in rs]
    if test not in TCAV_TESTS:
        raise ValueError(f"unknown test {test!r}; expected one of {TCAV_TESTS}")
    score_test = "mannwhitney" if test == "permutation" else test
    p = tcav_significance(c_sc, r_sc, score_test)
    mean_acc = _mean(acc)
    valid = bool(min_accuracy <= 0 or (not math.isnan(mean_acc) and mean_acc >= min_accuracy))
    # the most extreme outcome in the observed direction: a concept scoring 1 (or 0) in every
    # run; when even that is not significant, the test cannot answer
    best = 1.0 if _mean(c_sc) >= _mean(r_sc) or math.isnan(_mean(c_sc)) else 0.0
    p_best = tcav_significance([best] * len(_finite(c_sc)), r_sc, score_test)
    perm: dict[str, Any] = {}
    if test == "permutation":
        if permutation is None:
            raise ValueError('test="permutation" needs the permutation_test result')
        pt = dict(permutation)
        perm = {
            "p_value_sign_count": p,
            "effect": pt["statistic"],
            "effect_null_sd": pt["statistic_null_sd"],
            "effect_z": pt["z"],
            "effect_positive_fraction": pt.get("positive_fraction", float("nan")),
            "effect_cosine": pt.get("cosine", float("nan")),
            "p_low": pt["p_low"],
            "p_high": pt["p_high"],
            "concept_distance": pt["distance"],
            "p_direction": pt["p_direction"],
            "p_direction_low": pt["p_direction_low"],
            "p_direction_high": pt["p_direction_high"],
            "n_permutations": pt["n_permutations"],
        }
        p, p_best = pt["p_value"], pt["p_min"]
        valid = bool(pt["p_direction_high"] < alpha)
    row = {
        "concept": concept,
        "layer": layer,
        "tcav_score": _mean(c_sc),
        "tcav_score_sd": _sd(c_sc),
        "tcav_magnitude": _mean(c_mag),
        "tcav_magnitude_sd": _sd(c_mag),
        "random_score": _mean(r_sc),
        "random_score_sd": _sd(r_sc),
        "random_magnitude": _mean(r_mag),
        "random_magnitude_sd": _sd(r_mag),
        "p_value": p,
        "p_value_magnitude": tcav_significance(c_mag, r_mag, score_test),
        "test": test,
        **perm,
        **effect_sizes(c_sc, r_sc),
        "cav_valid": valid,
        "p_best": p_best,
        "p_adjusted": p,
        "correction": "none",
        "n_tests": int(np.isfinite(p)),
        "cav_accuracy": mean_acc,
        "cav_accuracy_sd": _sd(acc),
        "random_cav_accuracy": _mean(racc),
        "min_accuracy": float(min_accuracy),
        "scores": c_sc,
        "random_scores": r_sc,
        "magnitudes": c_mag,
        "random_magnitudes": r_mag,
        "cav_accuracies": acc,
    }
    _set_verdict(row, alpha)
    return row


def apply_correction(
    rows: Sequence[dict[str, Any]], *, method: str = "holm", alpha: float = 0.01
) -> list[dict[str, Any]]:
    """Correct the p-values of the rows of one run (one family: every concept x layer).

    Sets ``p_adjusted`` (:func:`adjust_p_values`), ``correction``, ``n_tests`` (the tests with
    a finite p-value) and the verdicts of each row, in place.

    Returns:
        ``rows``.
    """
    adj = adjust_p_values([r["p_value"] for r in rows], method)
    n = int(np.isfinite(adj).sum())
    # permutation p-values: their Monte Carlo interval, corrected the same way (the correction
    # is monotone in every p-value, so the corrected interval holds the corrected exact p)
    bounds = {}
    for key in ("p_low", "p_high"):
        vals = [r.get(key, r["p_value"]) for r in rows]
        bounds[key] = adjust_p_values(vals, method)
    for i, (r, q) in enumerate(zip(rows, adj, strict=True)):
        r.update(p_adjusted=float(q), correction=method, n_tests=n)
        if "p_low" in r:
            r.update(
                p_adjusted_low=float(bounds["p_low"][i]),
                p_adjusted_high=float(bounds["p_high"][i]),
            )
        _set_verdict(r, alpha)
    return list(rows)


def _set_verdict(row: dict[str, Any], alpha: float) -> None:
    """``verdict``, ``verdict_reason`` and ``significant`` of a summary row."""
    if row.get("test") == "permutation":
        _set_permutation_verdict(row, alpha)
        return
    reasons = []
    if not row["cav_valid"]:
        acc = row["cav_accuracy"]
        reasons.append(
            "CAV accuracy unknown (too few examples to hold out)"
            if math.isnan(acc)
            else f"CAV accuracy {acc:.2f} < {row['min_accuracy']:g}: not a direction of the layer"
        )
    if math.isnan(row["p_adjusted"]):
        reasons.append("fewer than 2 runs per group")
    if reasons:
        verdict = "inconclusive"
    elif row["p_adjusted"] < alpha:
        verdict = "significant"
        reasons.append(f"p_adjusted {row['p_adjusted']:.3g} < {alpha:g}")
    else:
        # no power: even a concept at the extreme in every run would fail the corrected test
        factor = 1 if row["correction"] == "none" else max(1, row["n_tests"])
        best = min(1.0, row["p_best"] * factor)
        if not best < alpha:
            verdict = "inconclusive"
            reasons.append(
                f"random CAVs score {row['random_score']:.2f}: even a concept at "
                f"{'1' if row['score_difference'] >= 0 else '0'} in every run would give "
                f"p_adjusted {best:.3g} >= {alpha:g} (more random sets, or a layer whose "
                "derivatives do not all share a sign)"
            )
        else:
            verdict = "not significant"
            reasons.append(f"p_adjusted {row['p_adjusted']:.3g} >= {alpha:g}")
    row.update(
        verdict=verdict, verdict_reason="; ".join(reasons), significant=verdict == "significant"
    )


def _set_permutation_verdict(row: dict[str, Any], alpha: float) -> None:
    """The verdict of a permutation-test row (:func:`permutation_test`).

    ``significant``: the corrected p-value is below ``alpha`` for every p-value in its Monte
    Carlo interval (``p_adjusted_high < alpha``); ``inconclusive`` when the interval straddles
    ``alpha`` (more permutations decide), when no outcome could pass (the smallest attainable
    p-value, corrected, is not below ``alpha``), or when the layer does not tell the concept from
    its random pool (``p_direction_high >= alpha``: a "not significant" would then say nothing
    about the concept); else ``not significant``.
    """
    p_adj = row["p_adjusted"]
    lo = row.get("p_adjusted_low", row.get("p_low", p_adj))
    hi = row.get("p_adjusted_high", row.get("p_high", p_adj))
    factor = 1 if row["correction"] == "none" else max(1, row["n_tests"])
    best = min(1.0, row["p_best"] * factor)
    effect = f"effect {row['effect']:.3g} (z {row['effect_z']:.2f})"
    if math.isnan(p_adj):
        verdict, reason = "inconclusive", "no p-value"
    elif hi < alpha:
        verdict, reason = "significant", f"{effect}; p_adjusted {p_adj:.3g} < {alpha:g}"
    elif lo < alpha:
        verdict = "inconclusive"
        reason = (
            f"{effect}; p_adjusted {p_adj:.3g} within its Monte Carlo interval "
            f"[{lo:.3g}, {hi:.3g}] of {alpha:g} (more permutations)"
        )
    elif not best < alpha:
        verdict = "inconclusive"
        reason = (
            f"the smallest attainable p_adjusted is {best:.3g} >= {alpha:g} "
            "(more permutations, or more examples)"
        )
    elif not row["cav_valid"]:
        verdict = "inconclusive"
        reason = (
            f"the layer does not tell the concept from its random pool (distance "
            f"{row['concept_distance']:.3g}, p_direction {row['p_direction']:.3g}): "
            f"{effect}, p_adjusted {p_adj:.3g}"
        )
    else:
        verdict = "not significant"
        reason = f"{effect}; p_adjusted {p_adj:.3g} >= {alpha:g}"
    row.update(verdict=verdict, verdict_reason=reason, significant=verdict == "significant")


def _mean(v: Sequence[float]) -> float:
    a = np.asarray(v, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def _sd(v: Sequence[float]) -> float:
    a = np.asarray(v, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.std(ddof=1)) if a.size > 1 else float("nan")
