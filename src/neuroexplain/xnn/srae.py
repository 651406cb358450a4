"""Sparse Reconstruction Autoencoder (SRAE): a low-dimensional explanation space of a network.

Qi, Khorram & Li 2017, "Embedding Deep Networks into Visual Explanations" (arXiv:1709.05360):
an **explanation network** (XNN) embeds a layer's activations ``a`` ``(D,)`` into a few
**explanation features** ``x`` ``(k,)`` from which

- a linear head reproduces the network's prediction, ``y_hat = sum_i w_i x_i + b``
  (faithfulness: ``y_hat`` should equal the classifier logit);
- a decoder reconstructs the activations, ``a_hat = g(x)`` (the features keep the information of
  the layer, not only the logit).

Loss (per batch)::

    L = alpha_pred * MSE(y_hat, logit)
      + alpha_rec  * mean_d log(1 + q * (a_d - a_hat_d)^2)        # sparse reconstruction
      + alpha_pt   * mean_{i != j} cos^2(w_i x_i, w_j x_j)         # pull-away term
      + alpha_use  * mean_i (max(0, s0 - share_i) / s0)^2          # usage balance
                   (+ mean_{i dead} max(0, -max_b z_bi))           # dead-unit revival

The sparse reconstruction loss grows only logarithmically with large errors, so a few badly
reconstructed dimensions are tolerated (Qi et al., Eq. 3); the pull-away term (Zhao et al. 2017)
decorrelates the weighted features over the batch so each feature explains something different.
The pull-away term alone has a cheap way out: a redundant feature whose head weight goes to 0
has a zero column, cosine 0 with everything, and is never used (usage 0, all-zero maps). The
usage-balance term (:func:`usage_balance_loss`) closes it: ``share_i = mean_b |w_i x_bi| /
sum_j mean_b |w_j x_bj|`` is each feature's share of the absolute logit contributions and every
share below ``s0 = 0.25 / k`` (a quarter of the even share, 5 % for 5 features) is penalised;
a feature whose ReLU is off for the whole batch (no gradient through it) gets its largest
pre-activation ``z`` pushed above 0.
Activations and logits are standardised with training statistics kept as buffers, so the loss
weights do not depend on the scale of the layer or the logit.

Example:
    >>> srae = SRAE(in_features=64, n_features=5)
    >>> x, y_hat, a_hat = srae(torch.randn(8, 64))
    >>> tuple(x.shape), tuple(y_hat.shape), tuple(a_hat.shape)
    ((8, 5), (8,), (8, 64))
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neuroexplain.errors import InputError
from neuroexplain.settings import SRAEConfig

__all__ = [
    "SRAE",
    "SRAE_FORMAT",
    "SRAEConfig",
    "SRAELoss",
    "feature_usage",
    "load_srae",
    "pull_away_loss",
    "r2_score",
    "save_srae",
    "significant_features",
    "sparse_reconstruction_loss",
    "train_srae",
    "usage_balance_loss",
]

logger = logging.getLogger(__name__)

SRAE_FORMAT = "neuroexplain-srae/1"


# ------------------------------------------------------------------------------- the losses


def sparse_reconstruction_loss(
    a: torch.Tensor, a_hat: torch.Tensor, q: float = 1.0
) -> torch.Tensor:
    """``mean_d log(1 + q * (a_d - a_hat_d)^2)`` over every dimension and sample (Qi et al. 2017).

    Args:
        a: ``(B, D)`` targets.
        a_hat: ``(B, D)`` reconstructions.
        q: sensitivity; small ``q`` approaches ``q * MSE``, large ``q`` tolerates outliers.

    Returns:
        Scalar tensor.
    """
    return torch.log1p(float(q) * (a - a_hat).pow(2)).mean()


def pull_away_loss(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean squared off-diagonal cosine similarity of the weighted features across the batch.

    Args:
        x: ``(B, k)`` explanation features.
        w: ``(k,)`` head weights; feature ``i`` enters as the column ``w_i * x[:, i]`` ``(B,)``.
        eps: added to column norms (an all-zero column has cosine 0 with everything).

    Returns:
        Scalar ``sum_{i != j} cos(z_i, z_j)^2 / (k (k - 1))``; 0 for ``k = 1`` or orthogonal
        columns.
    """
    z = x * w.reshape(1, -1)
    k = z.shape[1]
    if k < 2:
        return z.sum() * 0.0
    zn = z / (z.norm(dim=0, keepdim=True) + eps)
    gram = zn.T @ zn
    off = gram - torch.diag(torch.diagonal(gram))
    return off.pow(2).sum() / (k * (k - 1))


def usage_balance_loss(
    x: torch.Tensor,
    w: torch.Tensor,
    pre: torch.Tensor | None = None,
    floor: float = 0.25,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Penalty on features with a small share of the logit contributions (dead features).

    Args:
        x: ``(B, k)`` explanation features (after the ReLU).
        w: ``(k,)`` head weights.
        pre: ``(B, k)`` pre-activations of the features; when given, a feature that is zero for
            every sample of the batch adds ``max(0, -max_b pre_bi)`` (its ReLU passes no
            gradient, so the share term alone cannot revive it).
        floor: fraction of the even share ``1 / k`` below which a share is penalised (0.25: for
            5 features, shares below 5 %).
        eps: added to the total.

    Returns:
        Scalar ``mean_i (max(0, s0 - share_i) / s0)^2`` (+ the revival term), ``s0 = floor / k``;
        0 for ``k = 1`` or when every feature has at least ``s0`` of the contributions.
    """
    k = x.shape[1]
    if k < 2 or floor <= 0:
        return x.sum() * 0.0
    c = (x * w.reshape(1, -1)).abs().mean(0)
    share = c / (c.sum() + eps)
    s0 = float(floor) / k
    loss = (torch.relu(s0 - share) / s0).pow(2).mean()
    if pre is not None:
        dead = (x <= 0).all(0)
        if bool(dead.any()):
            loss = loss + torch.relu(-pre[:, dead].max(0).values).mean()
    return loss


class SRAELoss(nn.Module):
    """Weighted sum of prediction, sparse reconstruction and pull-away losses.

    Args:
        alpha_pred: weight of ``MSE(y_hat, logit)`` (standardised logit units).
        alpha_rec: weight of :func:`sparse_reconstruction_loss` (standardised activations).
        alpha_pt: weight of :func:`pull_away_loss`.
        q: sensitivity of the sparse reconstruction loss.
        alpha_use: weight of :func:`usage_balance_loss` (0: off, the loss of Qi et al.).

    Shapes:
        ``forward(x (B, k), y_hat (B,), a_hat (B, D), logit (B,), a (B, D), w (k,), pre=None)``
        -> ``(total, {"pred", "rec", "pt", "use"})``.
    """

    def __init__(
        self,
        alpha_pred: float = 1.0,
        alpha_rec: float = 0.1,
        alpha_pt: float = 0.1,
        q: float = 1.0,
        alpha_use: float = 0.0,
    ) -> None:
        super().__init__()
        self.alpha_pred, self.alpha_rec, self.alpha_pt, self.q, self.alpha_use = (
            float(alpha_pred),
            float(alpha_rec),
            float(alpha_pt),
            float(q),
            float(alpha_use),
        )

    def forward(
        self,
        x: torch.Tensor,
        y_hat: torch.Tensor,
        a_hat: torch.Tensor,
        logit: torch.Tensor,
        a: torch.Tensor,
        w: torch.Tensor,
        pre: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {
            "pred": torch.mean((y_hat - logit) ** 2),
            "rec": sparse_reconstruction_loss(a, a_hat, self.q),
            "pt": pull_away_loss(x, w),
            "use": usage_balance_loss(x, w, pre) if self.alpha_use > 0 else x.sum() * 0.0,
        }
        total = (
            self.alpha_pred * parts["pred"]
            + self.alpha_rec * parts["rec"]
            + self.alpha_pt * parts["pt"]
            + self.alpha_use * parts["use"]
        )
        return total, parts


# --------------------------------------------------------------------------------- the model


class SRAE(nn.Module):
    """Encoder -> ``k`` ReLU explanation features -> (linear logit head, decoder).

    Args:
        in_features: activation dimension ``D``.
        n_features: number of explanation features ``k``.
        hidden: width of a hidden layer in encoder and decoder (0: linear encoder / decoder).

    Buffers:
        ``a_mean``, ``a_std`` ``(D,)``; ``y_mean``, ``y_std`` scalars: training statistics used to
        standardise activations and logits (set by :meth:`set_stats`).

    Shapes:
        ``forward(a (B, D))`` -> ``(x (B, k), y_hat (B,) in logit units, a_hat (B, D)
        standardised)``.
    """

    def __init__(self, in_features: int, n_features: int = 5, hidden: int = 0) -> None:
        super().__init__()
        if in_features < 1 or n_features < 1:
            raise ValueError(f"expected positive sizes, got D={in_features}, k={n_features}")
        self.in_features, self.n_features, self.hidden = (
            int(in_features),
            int(n_features),
            int(hidden),
        )
        d, k, h = self.in_features, self.n_features, self.hidden
        if h > 0:
            self.encoder = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, k), nn.ReLU())
            self.decoder = nn.Sequential(nn.Linear(k, h), nn.ReLU(), nn.Linear(h, d))
        else:
            self.encoder = nn.Sequential(nn.Linear(d, k), nn.ReLU())
            self.decoder = nn.Sequential(nn.Linear(k, d))
        self.head = nn.Linear(k, 1)
        self.register_buffer("a_mean", torch.zeros(d))
        self.register_buffer("a_std", torch.ones(d))
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))

    def set_stats(self, acts: torch.Tensor, logits: torch.Tensor) -> None:
        """Standardisation statistics from training activations ``(N, D)`` and logits ``(N,)``."""
        sd = acts.float().std(0, unbiased=False)
        self.a_mean.copy_(acts.float().mean(0))
        self.a_std.copy_(torch.where(sd > 1e-6, sd, torch.ones_like(sd)))
        ys = float(logits.float().std(unbiased=False))
        self.y_mean.fill_(float(logits.float().mean()))
        self.y_std.fill_(ys if ys > 1e-6 else 1.0)

    def standardize(self, acts: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` raw activations -> standardised."""
        return (acts.float() - self.a_mean) / self.a_std

    @property
    def weights(self) -> torch.Tensor:
        """``(k,)`` head weights in logit units: ``y_hat = sum_i weights_i x_i + bias``."""
        return self.head.weight.reshape(-1) * self.y_std

    @property
    def bias(self) -> torch.Tensor:
        """Scalar head bias in logit units."""
        return self.head.bias.reshape(()) * self.y_std + self.y_mean

    def features(self, acts: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` raw activations -> ``(B, k)`` explanation features."""
        return self.encoder(self.standardize(acts))

    def contributions(self, acts: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` -> ``(B, k)`` logit contributions ``w_i x_i`` (logit units)."""
        return self.features(acts) * self.weights

    def forward(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.features(acts)
        y_std = self.head(x).reshape(-1)
        return x, y_std * self.y_std + self.y_mean, self.decoder(x)


# ------------------------------------------------------------------------------ training

# SRAEConfig (the options of train_srae) is defined in neuroexplain.settings and re-exported here


def r2_score(y_true: Any, y_pred: Any) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (NaN when ``y_true`` is constant)."""
    yt = np.asarray(y_true, dtype=np.float64)
    yp = np.asarray(y_pred, dtype=np.float64)
    ss_tot = float(((yt - yt.mean()) ** 2).sum())
    if ss_tot <= 0:
        return float("nan")
    return 1.0 - float(((yt - yp) ** 2).sum()) / ss_tot


def significant_features(contributions: Any, coverage: float = 0.9) -> np.ndarray:
    """The fewest features whose contributions cover ``coverage`` of the predicted logit.

    With ``c_i = w_i x_i`` and the feature part of the prediction ``f = sum_i c_i`` (the logit
    minus the head bias), features are ranked by ``c_i * sign(f)`` (largest push towards the
    prediction first) and taken until their sum reaches ``coverage * |f|``.

    Args:
        contributions: ``(N, k)`` contributions ``w_i x_i``.
        coverage: fraction in ``(0, 1]``.

    Returns:
        ``(N, k)`` bool, ``True`` for the significant features of each sample (none when
        ``f = 0``).
    """
    c = np.asarray(contributions, dtype=np.float64)
    out = np.zeros(c.shape, dtype=bool)
    for n in range(c.shape[0]):
        f = c[n].sum()
        if f == 0:
            continue
        s = c[n] * np.sign(f)
        order = np.argsort(-s, kind="stable")
        csum = np.cumsum(s[order])
        m = int(np.searchsorted(csum, coverage * abs(f) - 1e-12 * abs(f))) + 1
        out[n, order[: min(m, c.shape[1])]] = True
    return out


def _fit(
    srae: SRAE,
    acts: torch.Tensor,
    logits: torch.Tensor,
    cfg: SRAEConfig,
    alpha_pt: float,
    seed: int,
    progress: bool | None,
) -> dict[str, list[float]]:
    from tqdm.auto import tqdm

    loss_fn = SRAELoss(cfg.alpha_pred, cfg.alpha_rec, alpha_pt, cfg.q, cfg.alpha_use)
    opt = torch.optim.Adam(srae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    a = srae.standardize(acts)
    y = (logits.float() - srae.y_mean) / srae.y_std
    n = a.shape[0]
    bs = n if cfg.batch_size in (0, None) or cfg.batch_size >= n else int(cfg.batch_size)
    gen = torch.Generator().manual_seed(seed)
    hist: dict[str, list[float]] = {"total": [], "pred": [], "rec": [], "pt": [], "use": []}
    srae.train()
    for _ in tqdm(
        range(cfg.epochs),
        desc="srae",
        unit="epoch",
        disable=None if progress is None else not progress,
    ):
        perm = torch.randperm(n, generator=gen) if bs < n else torch.arange(n)
        sums = dict.fromkeys(hist, 0.0)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            pre = srae.encoder[:-1](a[idx])  # the encoder ends with the features' ReLU
            x = srae.encoder[-1](pre)
            y_hat = srae.head(x).reshape(-1)
            a_hat = srae.decoder(x)
            total, parts = loss_fn(
                x, y_hat, a_hat, y[idx], a[idx], srae.head.weight.reshape(-1), pre=pre
            )
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            frac = len(idx) / n
            sums["total"] += float(total.detach()) * frac
            for key, v in parts.items():
                sums[key] += float(v.detach()) * frac
        for key in hist:
            hist[key].append(sums[key])
    srae.eval()
    return hist


def feature_usage(srae: SRAE, acts: torch.Tensor, coverage: float = 0.9) -> np.ndarray:
    """``(k,)`` fraction of samples for which each feature is significant."""
    with torch.no_grad():
        contrib = srae.contributions(acts).numpy()
    return significant_features(contrib, coverage).mean(0)


def train_srae(
    acts: torch.Tensor,
    logits: torch.Tensor,
    config: SRAEConfig | None = None,
    *,
    progress: bool | None = None,
) -> tuple[SRAE, dict[str, Any]]:
    """Train an SRAE on layer activations and the classifier's logits (deterministic per seed).

    If fewer than ``min_features`` features carry the prediction (each significant for at least
    ``min_usage`` of the samples), training is retried up to ``max_retries`` times with the
    pull-away weight multiplied by ``retry_factor`` and the next seed; the attempt using the most
    features (then the lowest loss) is kept.

    Args:
        acts: ``(N, D)`` training activations.
        logits: ``(N,)`` classifier logits.
        config: :class:`SRAEConfig`.
        progress: progress bar (``None``: on a terminal).

    Returns:
        ``(srae, history)``; ``history`` holds per-epoch losses of the kept attempt and a list
        of ``attempts`` (alpha_pt, seed, features used, final loss).
    """
    cfg = config or SRAEConfig()
    acts = torch.as_tensor(acts).float().reshape(len(acts), -1)
    logits = torch.as_tensor(logits).float().reshape(-1)
    if acts.shape[0] != logits.shape[0] or acts.shape[0] < 2:
        raise ValueError(
            f"expected matching (N >= 2) activations and logits, got "
            f"{tuple(acts.shape)} and {tuple(logits.shape)}"
        )
    attempts: list[dict[str, Any]] = []
    best: tuple[tuple[int, float], SRAE, dict[str, list[float]]] | None = None
    alpha_pt = cfg.alpha_pt
    for attempt in range(cfg.max_retries + 1):
        seed = cfg.seed + attempt
        torch.manual_seed(seed)
        srae = SRAE(acts.shape[1], cfg.n_features, cfg.hidden)
        srae.set_stats(acts, logits)
        hist = _fit(srae, acts, logits, cfg, alpha_pt, seed, progress)
        usage = feature_usage(srae, acts, cfg.coverage)
        n_used = int((usage >= cfg.min_usage).sum())
        final = hist["total"][-1]
        attempts.append(
            {
                "attempt": attempt,
                "alpha_pt": alpha_pt,
                "seed": seed,
                "features_used": n_used,
                "usage": usage.tolist(),
                "loss": final,
                "pred_loss": hist["pred"][-1],
            }
        )
        logger.info(
            "SRAE attempt %d (alpha_pt=%g, seed=%d): %d features carry the prediction, "
            "loss %.4g (pred %.4g)",
            attempt,
            alpha_pt,
            seed,
            n_used,
            final,
            hist["pred"][-1],
        )
        rank = (min(n_used, cfg.min_features), -final)
        if best is None or rank > best[0]:
            best = (rank, copy.deepcopy(srae), hist)
        if n_used >= cfg.min_features:
            break
        alpha_pt *= cfg.retry_factor
    assert best is not None
    _, srae, hist = best
    return srae, {**hist, "attempts": attempts}


# ---------------------------------------------------------------------------- checkpoints


def save_srae(
    path: str | os.PathLike[str],
    srae: SRAE,
    *,
    config: SRAEConfig,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an SRAE checkpoint (atomically; loadable with ``torch.load(weights_only=True)``).

    Holds ``format``, ``config``, ``in_features``, ``state_dict`` and ``extra`` (layer, pooling,
    classifier checkpoint sha256, history, provenance).
    """
    import json

    import neuroexplain
    from neuroexplain.io.atomic import save_torch

    plain = json.loads(json.dumps(extra or {}, default=str))
    ckpt = {
        "format": SRAE_FORMAT,
        "version": neuroexplain.__version__,
        "config": asdict(config),
        "in_features": srae.in_features,
        "state_dict": {k: v.detach().cpu().clone() for k, v in srae.state_dict().items()},
        **plain,
    }
    save_torch(ckpt, path)  # fixed archive name: same bytes
    return Path(path)


def load_srae(path: str | os.PathLike[str]) -> tuple[SRAE, dict[str, Any]]:
    """Rebuild an SRAE from :func:`save_srae`.

    Raises:
        InputError: unreadable file or not an SRAE checkpoint.
    """
    from neuroexplain.io.checkpoint import load_checkpoint

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "SRAE checkpoint not found (run neuroexplain xnn-train first)")
    ckpt = load_checkpoint(p, SRAE_FORMAT)
    known = {f.name for f in fields(SRAEConfig)}
    cfg = SRAEConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    srae = SRAE(int(ckpt["in_features"]), cfg.n_features, cfg.hidden)
    try:
        srae.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise InputError(p, f"weights do not fit the SRAE ({str(exc).splitlines()[0]})") from exc
    srae.eval()
    return srae, ckpt
