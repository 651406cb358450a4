"""A variational autoencoder on spatial-transcriptomics spots (the model concept saliency explains).

Brocki & Chung (2019), "Concept Saliency Maps to Visualize Relevant Features in Deep Generative
Models" (ICMLA 2019, arXiv:1910.13140) explain a VAE by the gradient of a *concept score* taken on
the encoder's latent code. :class:`SpotVAE` is that VAE for spots: it encodes one spot's
expression profile (library-size normalised, ``log1p``, over highly variable genes or all genes)
into a Gaussian posterior ``q(z | x) = N(mu(x), diag(sigma^2(x)))``. The object API follows
scvi-tools::

    model = SpotVAE(adata, n_latent=16, layer="counts", n_top_genes=2000)
    model.train(max_epochs=400)
    latent = model.get_latent_representation()  # (n_spots, n_latent), posterior MEAN
    model.save("model_dir")
    model = SpotVAE.load("model_dir", adata)  # checks adata.var_names

Encoding is deterministic: everything downstream (latent, concept scores, saliency) uses the
posterior mean ``mu(x)``, never a sampled ``z``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from neuroexplain.errors import InputError
from neuroexplain.st.concept_keys import COUNTS_LAYER

__all__ = [
    "CountBatches",
    "GeneImageVAE",
    "PosteriorMean",
    "SpotVAE",
    "SpotVAEModule",
    "fit_vae",
    "gene_images",
    "get_counts",
    "iter_row_batches",
    "log_normalise",
    "rasterise_spots",
    "select_genes",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "model.pt"

#: default training spots per epoch of :meth:`SpotVAE.train` (see :func:`fit_vae`): larger data
#: sets train in rounds of this many spots (8 steps of 128), so the step budget (at most
#: ``max_epochs`` rounds, early stopping after the warm-up) does not grow with the spots. MOB
#: (236 training spots) converges in ~430 steps; a round-based budget of 640 (warm-up + patience)
#: to 1,000 steps (:data:`MAX_STEPS`) is more than that, and a data set of up to 1,137 spots
#: trains in full passes
EPOCH_SAMPLES = 1024
#: default largest held-out set of :meth:`SpotVAE.train`: the same 1,024 spots every round
#: (a paired comparison) resolve the round-to-round changes of the held-out ELBO, and checking
#: them costs at most about a third of a round
MAX_VALIDATION = 1024
#: default optimisation budget of :meth:`SpotVAE.train`: at most this many steps whatever the
#: epochs. MOB (236 training spots, 2 steps an epoch) stops early at ~430 steps and never
#: reaches it; at 10,000 spots and more the held-out ELBO still improves slowly after 2,400
#: steps (~0.5 % per 240) while the layer concepts' top genes drift away from the layers'
#: Wilcoxon markers (mean top-50 overlap at 10,000 tiled MOB spots: 0.768 after 800 steps,
#: 0.764 after 1,000, 0.720 after 2,400; ``benchmarks/results/st_budget.md``), and the
#: steps are most of the stage's time
MAX_STEPS = 1000
_FORMAT = "neuroexplain.SpotVAE/1"

Likelihood = Literal["nb", "gaussian"]


# --------------------------------------------------------------------------------------------
# preprocessing (shared with the evaluation so both see the same genes and normalisation)
# --------------------------------------------------------------------------------------------


def get_counts(adata: Any, layer: str | None = COUNTS_LAYER):
    """Return the raw count matrix (spots x genes) of ``adata`` from ``layer`` (``None``: ``.X``).

    Raises:
        InputError: the layer is missing, or the matrix holds negative or non-finite values.
    """
    import scipy.sparse as sp

    if layer is None:
        mat = adata.X
        where = "adata.X"
    else:
        if layer not in adata.layers:
            raise InputError(
                f"adata.layers[{layer!r}]",
                f"expected a raw-count layer, got layers {sorted(adata.layers.keys())}",
            )
        mat = adata.layers[layer]
        where = f"adata.layers[{layer!r}]"
    if mat is None:
        raise InputError(where, "expected a count matrix, got None")
    data = mat.data if sp.issparse(mat) else np.asarray(mat)
    if data.size and (not np.all(np.isfinite(data)) or data.min() < 0):
        raise InputError(where, "expected non-negative finite raw counts")
    return mat


def _library_sizes(counts) -> np.ndarray:
    lib = np.asarray(counts.sum(axis=1), dtype=np.float64).reshape(-1)
    return lib


def log_normalise(
    counts,
    gene_index: np.ndarray | None = None,
    *,
    target_sum: float = 1e4,
    sparse_out: bool = False,
):
    """``log1p(counts / library_size * target_sum)`` for the genes in ``gene_index``.

    The library size is the spot's total over **all** genes (as ``scanpy.pp.normalize_total``),
    so a gene subset does not change a spot's scaling.

    Args:
        counts: raw counts, dense or scipy sparse, shape ``(n_spots, n_genes)``.
        gene_index: integer positions of the genes to return (``None``: all genes).
        target_sum: counts per spot after normalisation.
        sparse_out: return a CSR matrix (sparse ``counts`` stay sparse; the same values).

    Returns:
        float32 array (CSR with ``sparse_out``), shape ``(n_spots, len(gene_index))``.
    """
    import scipy.sparse as sp

    lib = _library_sizes(counts)
    lib[lib == 0] = 1.0
    sub = counts if gene_index is None else counts[:, gene_index]
    if sparse_out:
        out = sp.csr_matrix(sub, dtype=np.float64)
        out.eliminate_zeros()
        rows = np.repeat(np.arange(out.shape[0]), np.diff(out.indptr))
        out.data = np.log1p(out.data / lib[rows] * target_sum)
        return out.astype(np.float32)
    # block by block: the float64 intermediates stay at 8,192 rows (same values as at once)
    out = np.empty(sub.shape, dtype=np.float32)
    for a, b in iter_row_batches(sub.shape[0], 8192):
        blk = sub[a:b]
        blk = blk.toarray() if sp.issparse(blk) else np.asarray(blk)
        out[a:b] = np.log1p(blk.astype(np.float64) / lib[a:b, None] * target_sum)
    return out


def iter_row_batches(n_rows: int, batch_size: int):
    """``(start, stop)`` of consecutive row blocks of at most ``batch_size`` rows."""
    step = max(1, int(batch_size))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


class CountBatches:
    """The spot VAE's training data, densified one mini-batch at a time.

    Holds the raw counts of the model's input genes as a CSR matrix (``(n_spots, G)``, only the
    selected genes, never all genes densified) and each spot's library size over **all** genes.
    :meth:`take` returns the dense tensors of a few rows: the log-normalised input (exactly the
    values of :func:`log_normalise`, computed in float64 then cast), the raw counts and
    ``lgamma(counts + 1)``. With sparse counts, the input and ``lgamma(counts + 1)`` are
    computed once per stored count (both are 0 where the count is), and a batch gathers its
    rows' stored entries once for all three (2.3x faster than three CSR row slices, the same
    values). Memory is ``O(nnz)`` for the whole data and ``O(B x G)`` per batch instead of
    three dense ``(n_spots, G)`` float32 matrices.

    Args:
        counts: raw counts, dense or scipy sparse, ``(n_spots, n_genes)``.
        gene_index: positions of the G input genes (``None``: all genes).
        target_sum: counts per spot after normalisation.

    Example:
        >>> import scipy.sparse as sp
        >>> data = CountBatches(sp.random(6, 5, density=0.5, format="csr") * 10, np.arange(3))
        >>> [tuple(t.shape) for t in data.take(np.array([0, 4]))]
        [(2, 3), (2, 3), (2, 3)]
    """

    def __init__(self, counts, gene_index: np.ndarray | None = None, *, target_sum: float = 1e4):
        import scipy.sparse as sp

        lib = _library_sizes(counts)
        lib[lib == 0] = 1.0
        self.library = lib  # float64 (n_spots,), over all genes (0 -> 1)
        gi = None if gene_index is None else np.asarray(gene_index)
        if gi is not None and np.array_equal(gi, np.arange(counts.shape[1])):
            gi = None  # every gene in order: no copy
        sub = counts if gi is None else counts[:, gi]
        # CSR of the selected genes only (a copy only for a gene subset): row slices stay sparse
        self.counts = sp.csr_matrix(sub) if sp.issparse(sub) else np.asarray(sub)
        self.target_sum = float(target_sum)
        # lgamma(counts + 1), a constant of the likelihood, once: 0 where the count is 0, so it
        # shares the counts' sparsity pattern (4 bytes per stored count, no index copy)
        self.log_factorial = None
        self._log_data: np.ndarray | None = None
        if sp.issparse(self.counts):
            if not self.counts.has_canonical_format:  # duplicates summed, as toarray() does
                self.counts = self.counts.copy()
                self.counts.sum_duplicates()
            c = self.counts
            lf = torch.lgamma(torch.from_numpy(c.data.astype(np.float32)) + 1.0).numpy()
            self.log_factorial = sp.csr_matrix((lf, c.indices, c.indptr), shape=c.shape)
            # the log-normalised input, once per stored count (log1p(0) = 0 elsewhere): the
            # operations of :func:`log_normalise` element by element, so the same values
            rows = np.repeat(np.arange(c.shape[0]), np.diff(c.indptr))
            scaled = c.data.astype(np.float64) / lib[rows] * self.target_sum
            self._log_data = np.log1p(scaled).astype(np.float32)

    def __len__(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.counts.shape[1])

    def _sparse_rows(self, idx: np.ndarray, *datas: np.ndarray) -> list[np.ndarray]:
        """Dense float32 rows ``idx`` of CSR matrices with the counts' pattern and ``datas``
        as their stored values: one gather of the stored entries for all of them."""
        c = self.counts
        starts = c.indptr[idx]
        lens = c.indptr[idx + 1] - starts
        n_genes = c.shape[1]
        # position of every stored entry of the selected rows in ``c.data``, and in the output
        pos = np.arange(int(lens.sum())) + np.repeat(starts - (np.cumsum(lens) - lens), lens)
        flat = np.repeat(np.arange(len(idx)) * n_genes, lens) + c.indices[pos]
        out = []
        for d in datas:
            dense = np.zeros(len(idx) * n_genes, dtype=np.float32)
            dense[flat] = d[pos]
            out.append(dense.reshape(len(idx), n_genes))
        return out

    def normalised(self, idx: np.ndarray) -> np.ndarray:
        """Log-normalised input of rows ``idx``: float32 ``(len(idx), G)``."""
        idx = np.asarray(idx)
        if self._log_data is not None:
            return self._sparse_rows(idx, self._log_data)[0]
        return self._log(np.asarray(self.counts[idx]), idx)

    def _log(self, raw: np.ndarray, idx: np.ndarray) -> np.ndarray:
        # the same operations in the same order as :func:`log_normalise`: identical values
        lib = self.library[idx]
        return np.log1p(raw.astype(np.float64) / lib[:, None] * self.target_sum).astype(np.float32)

    def take(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, counts, lgamma(counts + 1))`` of rows ``idx``, each float32 ``(len(idx), G)``."""
        idx = np.asarray(idx)
        if self._log_data is not None and self.log_factorial is not None:
            x, raw, lf = self._sparse_rows(
                idx, self._log_data, self.counts.data, self.log_factorial.data
            )
            return torch.from_numpy(x), torch.from_numpy(raw), torch.from_numpy(lf)
        raw = np.asarray(self.counts[idx])
        x = self._log(raw, idx)
        c = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
        return torch.from_numpy(x), c, torch.lgamma(c + 1.0)


class _TensorRows:
    """Rows of in-memory tensors (the gene-image VAE's data) behind :class:`CountBatches`' API."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0])

    def take(self, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        i = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return tuple(t[i] for t in self.tensors)


def select_genes(
    adata: Any,
    *,
    layer: str | None = COUNTS_LAYER,
    n_top_genes: int | None = 2000,
    target_sum: float = 1e4,
) -> np.ndarray:
    """Positions of the highly variable genes (scanpy, ``flavor="seurat"`` on log data).

    Args:
        adata: AnnData with raw counts in ``layer``.
        n_top_genes: number of genes; ``None`` or ``>= n_vars`` selects all genes.

    Returns:
        Sorted integer positions into ``adata.var_names``, shape ``(n_selected,)``.
    """
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    counts = get_counts(adata, layer)
    n_vars = counts.shape[1]
    if n_top_genes is None or n_top_genes >= n_vars:
        return np.arange(n_vars)
    if n_top_genes < 2:
        raise InputError("n_top_genes", f"expected at least 2 genes, got {n_top_genes}")
    lib = _library_sizes(counts)
    lib[lib == 0] = 1.0
    if sp.issparse(counts):
        x = sp.csr_matrix(counts, dtype=np.float32)
        x = sp.diags((target_sum / lib).astype(np.float32)) @ x
        x.data = np.log1p(x.data)
    else:
        x = np.log1p(np.asarray(counts, dtype=np.float64) / lib[:, None] * target_sum)
        x = x.astype(np.float32)
    tmp = ad.AnnData(X=x)
    tmp.var_names = np.asarray(adata.var_names).astype(str)
    n_threads = torch.get_num_threads()
    hvg = sc.pp.highly_variable_genes(
        tmp, n_top_genes=int(n_top_genes), flavor="seurat", inplace=False
    )
    # the first numba-parallel call in a process resets OpenMP's thread count, which torch
    # shares; restore the caller's (``--threads``), or training runs with another number of
    # threads (other rounding) in the first run of a process than in later ones
    torch.set_num_threads(n_threads)
    return np.flatnonzero(np.asarray(hvg["highly_variable"], dtype=bool))


# --------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------


def _mlp(n_in: int, n_hidden: int, n_layers: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [nn.Linear(n_in if i == 0 else n_hidden, n_hidden), nn.ELU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class SpotVAEModule(nn.Module):
    """MLP VAE over one spot's expression vector.

    Encoder ``x (B, G) -> (mu, logvar) (B, L)``; decoder ``z (B, L) -> (B, G)`` giving, for
    ``likelihood="nb"``, the per-gene expression *fractions* (softmax; mean counts are fraction x
    library size) with a per-gene inverse dispersion ``exp(log_theta)``, and for
    ``likelihood="gaussian"`` the mean of the log-normalised input with a per-gene variance
    ``exp(log_var)``. ELU activations keep the encoder smooth, so gradients (saliency) are not
    piecewise constant.

    Args:
        n_input: number of genes G.
        n_latent: latent dimensions L.
        n_hidden: hidden units per layer.
        n_layers: hidden layers in encoder and decoder.
        dropout: dropout rate of hidden layers (training only).
        likelihood: ``"nb"`` (negative binomial on raw counts) or ``"gaussian"`` (on log1p data).

    Example:
        >>> m = SpotVAEModule(100, n_latent=8)
        >>> mu, logvar = m.encode(torch.rand(4, 100))
        >>> tuple(mu.shape)
        (4, 8)
    """

    def __init__(
        self,
        n_input: int,
        n_latent: int = 16,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
        likelihood: Likelihood = "nb",
    ) -> None:
        super().__init__()
        if likelihood not in ("nb", "gaussian"):
            raise InputError("likelihood", f"expected 'nb' or 'gaussian', got {likelihood!r}")
        self.likelihood = likelihood
        self.encoder = _mlp(n_input, n_hidden, n_layers, dropout)
        self.mu = nn.Linear(n_hidden, n_latent)
        self.logvar = nn.Linear(n_hidden, n_latent)
        self.decoder = _mlp(n_latent, n_hidden, n_layers, dropout)
        self.out = nn.Linear(n_hidden, n_input)
        # per-gene dispersion (nb: log inverse dispersion; gaussian: log variance)
        self.log_disp = nn.Parameter(torch.zeros(n_input))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, G)`` log-normalised expression -> ``(mu, logvar)``, each ``(B, L)``."""
        h = self.encoder(x)
        return self.mu(h), self.logvar(h).clamp(-12.0, 8.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z (B, L)`` -> ``(B, G)``: gene fractions (nb) or log-expression means (gaussian)."""
        h = self.out(self.decoder(z))
        return torch.softmax(h, dim=-1) if self.likelihood == "nb" else h

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, G)`` -> ``(decoded (B, G), mu (B, L), logvar (B, L), z (B, L))``.

        ``eps`` is the reparameterisation noise (``(B, L)``); ``None`` decodes the mean.
        """
        mu, logvar = self.encode(x)
        z = mu if eps is None else mu + eps * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar, z

    def reconstruction_nll(
        self,
        decoded: torch.Tensor,
        x: torch.Tensor,
        counts: torch.Tensor,
        log_factorial: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Negative log-likelihood per spot, ``(B,)``.

        Args:
            decoded: output of :meth:`decode`, ``(B, G)``.
            x: log-normalised input, ``(B, G)`` (gaussian likelihood).
            counts: raw counts of the input genes, ``(B, G)`` (nb likelihood).
            log_factorial: ``lgamma(counts + 1)`` if precomputed (nb; a constant).
        """
        if self.likelihood == "nb":
            library = counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
            mean = decoded * library
            theta = torch.exp(self.log_disp).clamp(1e-4, 1e6)
            eps = 1e-8
            log_theta_mu = torch.log(theta + mean + eps)
            ll = (
                theta * (torch.log(theta + eps) - log_theta_mu)
                + counts * (torch.log(mean + eps) - log_theta_mu)
                + torch.lgamma(counts + theta)
                - torch.lgamma(theta)
            )
            # log(counts!) does not depend on the parameters: callers may pass it precomputed
            ll = ll - (torch.lgamma(counts + 1.0) if log_factorial is None else log_factorial)
        else:
            log_var = self.log_disp.clamp(-10.0, 10.0)
            ll = -0.5 * ((x - decoded) ** 2 / torch.exp(log_var) + log_var + math.log(2 * math.pi))
        return -ll.sum(dim=-1)


class PosteriorMean(nn.Module):
    """Wrap a VAE so that ``forward(x)`` returns the posterior mean ``mu(x)``.

    Works with any module exposing ``encode(x)`` (:class:`SpotVAEModule`) or
    ``encode_forward(x)`` (MONAI ``VarAutoEncoder``) that returns ``(mu, logvar)``.

    Shapes: ``x (B, ...)`` -> ``mu (B, L)``.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        # MONAI's VarAutoEncoder has both: ``encode`` is its conv trunk, ``encode_forward``
        # returns (mu, logvar)
        self._fn = "encode_forward" if hasattr(vae, "encode_forward") else "encode"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.vae, self._fn)(x)[0]


def _kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per sample, ``(B,)``."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


@dataclass(frozen=True)
class _FitOptions:
    """The optimisation settings of :func:`fit_vae` (see there), checked on construction."""

    max_epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    kl_warmup_epochs: int
    validation_fraction: float
    early_stopping: bool
    patience: int
    epoch_samples: int | None
    max_validation: int | None
    eval_batch_size: int
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.max_epochs < 1:
            raise InputError("max_epochs", f"expected at least 1 epoch, got {self.max_epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError("max_steps", f"expected at least 1 step, got {self.max_steps}")
        if self.epoch_samples is not None and self.epoch_samples < 1:
            raise InputError(
                "epoch_samples", f"expected at least 1 sample, got {self.epoch_samples}"
            )

    def beta(self, epoch: int) -> float:
        """KL weight of ``epoch`` (0-based): rises linearly to 1 over the warm-up epochs."""
        warmup = self.kl_warmup_epochs
        return min(1.0, (epoch + 1) / warmup) if warmup > 0 else 1.0

    def params(
        self, *, epochs_run: int, kept_epoch: int, n_validation: int, steps: int
    ) -> dict[str, Any]:
        """The ``train_params`` returned by :func:`fit_vae`: the settings and what was run."""
        return {
            "max_epochs": int(self.max_epochs),
            "batch_size": int(self.batch_size),
            "lr": float(self.lr),
            "weight_decay": float(self.weight_decay),
            "kl_warmup_epochs": int(self.kl_warmup_epochs),
            "validation_fraction": float(self.validation_fraction),
            "early_stopping": bool(self.early_stopping),
            "patience": int(self.patience),
            "epochs_run": epochs_run,
            "kept_epoch": int(kept_epoch),
            "n_validation": int(n_validation),
            "epoch_samples": None if self.epoch_samples is None else int(self.epoch_samples),
            "max_validation": None if self.max_validation is None else int(self.max_validation),
            "max_steps": None if self.max_steps is None else int(self.max_steps),
            "steps": int(steps),
        }


def _split_validation(n: int, opts: _FitOptions, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out split of :func:`fit_vae`: ``(validation rows, training rows)``, both sorted.

    A random permutation of the ``n`` samples (``numpy.random.default_rng(seed)``); its first
    ``round(validation_fraction * n)`` samples (at least 1, at most ``n - 1`` and
    ``max_validation``) are held out; none with fewer than 10 samples.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_val = 0
    if n >= 10 and opts.validation_fraction > 0:
        n_val = min(max(1, round(opts.validation_fraction * n)), n - 1)
        if opts.max_validation is not None:
            n_val = min(n_val, max(1, int(opts.max_validation)))
    return np.sort(perm[:n_val]), np.sort(perm[n_val:])


class _TrainStep:
    """Optimisation steps of :func:`fit_vae` (Adam, mixed precision on CUDA) and its held-out
    loss.

    Training batches come from a running permutation of the training rows: a fresh
    ``torch.randperm(n, generator=gen)`` is drawn when the current one is used up (every epoch
    when an epoch is a full pass; a round of ``epoch_samples`` continues the previous one), and
    each batch's reparameterisation noise is drawn from ``gen`` right after it.

    Args:
        module, nll_fn: see :func:`fit_vae`.
        data: batch source with ``len()`` and ``take(rows)``.
        opts: the settings (``lr``, ``weight_decay``, ``batch_size``, ``eval_batch_size``).
        gen: RNG of the permutations and the noise.
        n_latent: latent dimensions (size of the noise).
        device: where to train.
    """

    def __init__(
        self,
        module: nn.Module,
        nll_fn: Any,
        data: Any,
        opts: _FitOptions,
        *,
        gen: torch.Generator,
        n_latent: int,
        device: torch.device,
    ) -> None:
        from neuroexplain.utils import amp_enabled

        self.module, self.nll_fn, self.data, self.opts = module, nll_fn, data, opts
        self.gen, self.n_latent, self.device = gen, n_latent, device
        self.amp = amp_enabled(device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.opt = torch.optim.Adam(module.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = -1  # no permutation yet

    def rows(self, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The samples ``idx`` of the data, on the device."""
        return tuple(t.to(self.device) for t in self.data.take(idx))

    def epoch(self, train_idx: np.ndarray, n_steps: int, beta: float) -> float:
        """Train ``n_steps`` batches of ``train_idx`` with KL weight ``beta``; returns the mean
        loss per sample."""
        n_tr, bs = len(train_idx), self.opts.batch_size
        self.module.train()
        total, seen = 0.0, 0
        for _ in range(n_steps):
            if self.pos < 0 or self.pos >= n_tr:
                self.order, self.pos = torch.randperm(n_tr, generator=self.gen), 0
            idx = self.order[self.pos : self.pos + bs]
            self.pos += len(idx)
            batch = self.rows(train_idx[idx.numpy()])
            eps = torch.randn(len(idx), self.n_latent, generator=self.gen).to(self.device)
            with torch.autocast(device_type=self.device.type, enabled=self.amp):
                nll, mu, logvar = self.nll_fn(batch, eps)
            loss = (nll.float() + beta * _kl(mu.float(), logvar.float())).mean()
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        return total / seen

    def validation_loss(self, val_idx: np.ndarray) -> float:
        """Mean negative ELBO (mean code, full KL) of the held-out rows, in eval mode."""
        self.module.eval()
        with torch.no_grad():
            per_sample = []
            for a, b in iter_row_batches(len(val_idx), self.opts.eval_batch_size):
                nll, mu, logvar = self.nll_fn(self.rows(val_idx[a:b]), None)
                per_sample.append(nll.float() + _kl(mu.float(), logvar.float()))
            return float(torch.cat(per_sample).mean())


def _train_epochs(
    step: _TrainStep,
    opts: _FitOptions,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    *,
    progress: bool | None,
    desc: str,
) -> tuple[dict[str, list[float]], int, int]:
    """The epoch loop of :func:`fit_vae`, with early stopping; leaves the module in eval mode
    with the kept weights.

    Returns:
        ``(history, steps, kept_epoch)`` (``kept_epoch`` 1-based).
    """
    from tqdm.auto import tqdm

    module, n_val, n_tr = step.module, len(val_idx), len(train_idx)
    stop = opts.early_stopping and n_val > 0
    best, best_epoch, since_best = math.inf, 0, 0
    best_state: dict[str, torch.Tensor] | None = None
    history: dict[str, list[float]] = {"train": [], "validation": []}
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(range(opts.max_epochs), desc=desc, disable=not show, leave=False)
    per_epoch = n_tr if opts.epoch_samples is None else min(n_tr, int(opts.epoch_samples))
    steps_per_epoch, steps = -(-per_epoch // opts.batch_size), 0
    budget = math.inf if opts.max_steps is None else int(opts.max_steps)
    for epoch in bar:
        n_steps = int(min(steps_per_epoch, budget - steps))  # the last round may be shorter
        history["train"].append(step.epoch(train_idx, n_steps, opts.beta(epoch)))
        steps += n_steps
        v = step.validation_loss(val_idx) if n_val else history["train"][-1]
        history["validation"].append(v)
        bar.set_postfix(loss=f"{history['train'][-1]:.1f}", val=f"{v:.1f}")
        if v < best - 1e-6:
            best, best_epoch, since_best = v, epoch, 0
            if stop:
                best_state = copy.deepcopy(module.state_dict())
        else:
            since_best += 1
        if stop and epoch + 1 >= opts.kl_warmup_epochs and since_best >= opts.patience:
            logger.info("%s: early stopping at epoch %d (best %d)", desc, epoch + 1, best_epoch + 1)
            break
        if steps >= budget:
            logger.info("%s: step budget of %d steps spent at epoch %d", desc, steps, epoch + 1)
            break
    bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
        kept = best_epoch + 1
    else:
        kept = len(history["train"])
    module.eval()
    logger.info(
        "%s trained %d epochs, %d steps (kept epoch %d), validation loss %.3f",
        desc,
        len(history["train"]),
        steps,
        kept,
        history["validation"][kept - 1],
    )
    return history, steps, kept


def fit_vae(
    module: nn.Module,
    tensors: Any,
    nll_fn: Any,
    *,
    n_latent: int,
    seed: int,
    device: torch.device,
    max_epochs: int = 400,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-6,
    kl_warmup_epochs: int = 100,
    validation_fraction: float = 0.1,
    early_stopping: bool = True,
    patience: int = 40,
    epoch_samples: int | None = None,
    max_validation: int | None = None,
    eval_batch_size: int = 8192,
    max_steps: int | None = None,
    progress: bool | None = None,
    desc: str = "VAE",
) -> tuple[dict[str, list[float]], int, dict[str, Any]]:
    """Train a VAE: Adam, linear KL warm-up, early stopping on a held-out random split.

    **Epochs at scale.** An epoch is one pass over the training samples, or, when there are more
    than ``epoch_samples`` of them, a round of ``epoch_samples`` samples drawn without
    replacement from a running permutation (the next round continues it). ``max_epochs``,
    ``kl_warmup_epochs`` and ``patience`` count these rounds, so the optimisation budget is at
    most ``max_epochs * ceil(epoch_samples / batch_size)`` steps whatever the number of samples:
    on 100,000 spots the held-out loss is checked every few seconds instead of once per long
    pass, and training stops when it has converged rather than after a fixed number of full
    passes. With at most ``epoch_samples`` training samples (or ``None``) nothing changes: the
    same permutations, batches and noise as plain epochs.

    Args:
        module: the VAE; trained in place, left in eval mode with the best weights.
        tensors: per-sample tensors, first dimension = samples (e.g. ``(x, counts)``), or a
            batch source with ``len()`` and ``take(rows) -> tuple of tensors`` (e.g.
            :class:`CountBatches`, which densifies only the rows of one batch).
        nll_fn: ``nll_fn(batch, eps) -> (nll (B,), mu (B, L), logvar (B, L))``; ``eps`` is the
            reparameterisation noise ``(B, L)`` or ``None`` (decode the mean, for validation).
        n_latent: latent dimensions (size of ``eps``).
        seed: seeds the split, the shuffling, the noise and dropout.
        device: where to train.
        max_epochs, batch_size, lr, weight_decay: optimisation.
        kl_warmup_epochs: epochs over which the KL weight rises linearly from 0 to 1.
        validation_fraction: held-out fraction (none with fewer than 10 samples).
        early_stopping: stop after ``patience`` epochs without a better validation ELBO (only
            once the warm-up is over) and restore the best weights.
        epoch_samples: training samples per epoch at most (``None``: a full pass; see above).
        max_validation: most held-out samples (``None``: ``validation_fraction`` of all).
        eval_batch_size: held-out samples per validation forward pass (bounds memory; a
            validation set this small is evaluated in one pass, as before).
        max_steps: most optimisation steps in all (``None``: no limit besides ``max_epochs``);
            the round that reaches it is cut short, and the best epoch so far is kept as with
            early stopping.
        progress: progress bar (``None``: when stderr is a terminal).
        desc: progress-bar label.

    Returns:
        ``(history, kept_epoch, train_params)``; ``history = {"train": [...], "validation":
        [...]}`` (negative ELBO per sample; validation uses the mean code and the full KL).
    """
    from neuroexplain.utils import seed_everything

    opts = _FitOptions(
        max_epochs=max_epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        kl_warmup_epochs=kl_warmup_epochs,
        validation_fraction=validation_fraction,
        early_stopping=early_stopping,
        patience=patience,
        epoch_samples=epoch_samples,
        max_validation=max_validation,
        eval_batch_size=eval_batch_size,
        max_steps=max_steps,
    )
    data = tensors if hasattr(tensors, "take") else _TensorRows(tuple(tensors))
    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)
    val_idx, train_idx = _split_validation(len(data), opts, seed=seed)
    step = _TrainStep(module, nll_fn, data, opts, gen=gen, n_latent=n_latent, device=device)
    history, steps, kept = _train_epochs(
        step, opts, train_idx, val_idx, progress=progress, desc=desc
    )
    params = opts.params(
        epochs_run=len(history["train"]), kept_epoch=kept, n_validation=len(val_idx), steps=steps
    )
    return history, kept, params


# --------------------------------------------------------------------------------------------
# gene-as-image mode: rasterised gene images and a convolutional VAE over genes
# --------------------------------------------------------------------------------------------


def rasterise_spots(
    coords: np.ndarray, *, spacing: float | None = None, max_side: int | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Map spot coordinates to integer pixel positions on a grid.

    ``col = round((x - min x) / spacing)``, ``row = round((y - min y) / spacing)``; with
    ``spacing=None`` the median nearest-neighbour distance between spots (1 for ST array
    coordinates). Spots falling on the same pixel are reported (they share the pixel).

    Args:
        coords: ``(n_spots, 2)`` (x, y).
        spacing: grid spacing in coordinate units.
        max_side: largest grid side in pixels (``None``: no limit). A finer grid is coarsened
            (the spacing grows until the longer side fits; neighbouring spots then share and
            average a pixel), so the gene images of 100,000 cells do not grow with the tissue
            area at cell resolution.

    Returns:
        ``(rows (n,), cols (n,), (H, W))``.
    """
    from scipy.spatial import cKDTree

    c = np.asarray(coords, dtype=np.float64)[:, :2]
    if spacing is None:
        if len(c) < 2:
            spacing = 1.0
        else:
            d, _ = cKDTree(c).query(c, k=2)
            nn_d = d[:, 1][d[:, 1] > 0]
            spacing = float(np.median(nn_d)) if nn_d.size else 1.0
    if not spacing > 0:
        raise InputError("spacing", f"expected a positive grid spacing, got {spacing}")
    coarsened = False
    if max_side is not None and len(c):
        extent = float((c.max(0) - c.min(0)).max())
        if np.rint(extent / spacing) + 1 > max_side:
            spacing = extent / max(1, int(max_side) - 1)
            coarsened = True
    ij = np.rint((c - c.min(0)) / spacing).astype(int)
    cols, rows = ij[:, 0], ij[:, 1]
    shape = (int(rows.max()) + 1, int(cols.max()) + 1)
    n_unique = len({(r, q) for r, q in zip(rows.tolist(), cols.tolist(), strict=True)})
    if n_unique < len(c):
        if coarsened:
            logger.info(
                "grid coarsened to spacing %.3g (at most %d pixels a side): %d spots share a "
                "pixel with another spot",
                spacing,
                max_side,
                len(c) - n_unique,
            )
        else:
            logger.warning("%d spots share a pixel with another spot", len(c) - n_unique)
    return rows, cols, shape


def gene_images(
    expr: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    shape: tuple[int, int],
    *,
    multiple: int = 4,
) -> np.ndarray:
    """One image per gene: expression at each spot's pixel, scaled to [0, 1] per gene.

    Pixels without a spot are 0; spots sharing a pixel are averaged. The grid is zero-padded to
    a multiple of ``multiple`` (at least 8) so strided convolutions invert exactly.

    Args:
        expr: ``(n_spots, G)`` non-negative expression (e.g. log-normalised).
        rows, cols: ``(n_spots,)`` pixel positions (:func:`rasterise_spots`).
        shape: ``(H, W)`` of the grid.

    Returns:
        float32 ``(G, 1, H', W')``.
    """
    h = max(8, -(-shape[0] // multiple) * multiple)
    w = max(8, -(-shape[1] // multiple) * multiple)
    import scipy.sparse as sp

    flat = rows * w + cols
    # pixel sums as one sparse (pixels x spots) indicator product: no per-element scatter
    onehot = sp.csr_matrix(
        (np.ones(len(flat)), (flat, np.arange(len(flat)))), shape=(h * w, len(flat))
    )
    sums = np.asarray(onehot @ np.asarray(expr, dtype=np.float64))
    hits = np.bincount(flat, minlength=h * w).astype(np.float64)
    img = sums / np.maximum(hits, 1.0)[:, None]
    mx = img.max(0)
    mx[mx <= 0] = 1.0
    img = (img / mx).T.reshape(expr.shape[1], 1, h, w)
    return img.astype(np.float32)


class GeneImageVAE:
    """Convolutional VAE over gene images (Brocki & Chung 2019, ST experiment).

    MONAI ``VarAutoEncoder`` (2D, one stride-2 convolution block per entry of ``channels``,
    ELU, **no normalisation layer**); Bernoulli likelihood on pixel intensities in [0, 1]
    (binary cross entropy on the decoder logits), standard-normal prior, KL warm-up and early
    stopping on held-out genes via :func:`fit_vae`.

    MONAI's default instance norm is switched off on purpose: it makes the encoder invariant to
    each image's intensity scale, and the gradient of a scale-invariant function is orthogonal
    to its input (Euler), so pixel saliency would lose the sign of "more expression here".

    Args:
        images: ``(n_genes, 1, H, W)`` float32 in [0, 1] (:func:`gene_images`).
        n_latent: latent dimensions.
        channels: convolution channels.
        act: MONAI activation name / tuple.
        norm: MONAI normalisation (``None``: none, see above).
        seed: random seed.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Example:
        >>> vae = GeneImageVAE(np.random.rand(32, 1, 8, 8).astype("float32"), device="cpu")
        >>> vae.train(max_epochs=1, progress=False).get_latent_representation().shape
        (32, 8)
    """

    def __init__(
        self,
        images: np.ndarray,
        *,
        n_latent: int = 8,
        channels: Any = (8, 16),
        act: Any = "ELU",
        norm: Any = None,
        seed: int = 0,
        device: str = "auto",
    ) -> None:
        from monai.networks.nets import VarAutoEncoder

        from neuroexplain.utils import resolve_device, seed_everything

        if images.ndim != 4 or images.shape[1] != 1:
            raise InputError("images", f"expected (n_genes, 1, H, W), got {images.shape}")
        self.images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        self.seed = int(seed)
        self.n_latent = int(n_latent)
        self.device = resolve_device(device)
        seed_everything(self.seed)
        chans = tuple(int(c) for c in channels)
        self.module = VarAutoEncoder(
            spatial_dims=2,
            in_shape=(1, images.shape[2], images.shape[3]),
            out_channels=1,
            latent_size=self.n_latent,
            channels=chans,
            strides=(2,) * len(chans),
            act=act,
            norm=norm,
            use_sigmoid=False,
        ).to(self.device)
        self.module.eval()
        self.history: dict[str, list[float]] = {"train": [], "validation": []}
        self.train_params: dict[str, Any] = {}

    def train(self, **kwargs: Any) -> GeneImageVAE:
        """Fit the VAE; keyword arguments as :func:`fit_vae` (defaults: 40 epochs, lr 3e-3)."""
        module = self.module

        def nll(batch: tuple[torch.Tensor, ...], eps: torch.Tensor | None):
            (xb,) = batch
            mu, logvar = module.encode_forward(xb)
            logvar = logvar.clamp(-12.0, 8.0)
            z = mu if eps is None else mu + eps * torch.exp(0.5 * logvar)
            logits = module.decode_forward(z, use_sigmoid=False)
            bce = nn.functional.binary_cross_entropy_with_logits(
                logits.float(), xb, reduction="none"
            )
            return bce.flatten(1).sum(1), mu, logvar

        kwargs.setdefault("max_epochs", 40)
        kwargs.setdefault("batch_size", 64)
        kwargs.setdefault("lr", 3e-3)
        kwargs.setdefault("kl_warmup_epochs", 10)
        kwargs.setdefault("patience", 10)
        self.history, self.epoch, self.train_params = fit_vae(
            module,
            (self.images,),
            nll,
            n_latent=self.n_latent,
            seed=self.seed,
            device=self.device,
            desc="GeneImageVAE",
            **kwargs,
        )
        return self

    @torch.no_grad()
    def get_latent_representation(self, batch_size: int = 512) -> np.ndarray:
        """Posterior mean of every gene image, ``(n_genes, n_latent)``."""
        enc = self.posterior_mean()
        x = self.images
        out = [
            enc(x[i : i + batch_size].to(self.device)).cpu() for i in range(0, len(x), batch_size)
        ]
        return torch.cat(out).numpy().astype(np.float32)

    def posterior_mean(self) -> PosteriorMean:
        """``images (B, 1, H, W) -> mu (B, L)`` in eval mode."""
        self.module.eval()
        return PosteriorMean(self.module).eval()


# --------------------------------------------------------------------------------------------
# scvi-tools-like model object
# --------------------------------------------------------------------------------------------


def _check_var_names(expected: list[str], adata: Any, where: str) -> None:
    got = [str(v) for v in adata.var_names]
    if got == expected:
        return
    if len(got) != len(expected):
        problem = f"expected {len(expected)} genes as when the model was trained, got {len(got)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if a != b)
        problem = (
            f"var_names differ from the model's at position {i}: expected {expected[i]!r}, "
            f"got {got[i]!r}"
        )
    raise InputError(where, problem)


class SpotVAE:
    """Variational autoencoder over spots, scvi-tools style (Brocki & Chung 2019, Sec. III).

    **Input.** One spot's expression: raw counts from ``adata.layers[layer]`` are
    library-size normalised to ``target_sum`` and ``log1p``-transformed over the
    ``n_top_genes`` highly variable genes chosen by scanpy (``None``: all genes). Saliency is
    taken with respect to this log-normalised input.

    **Latent.** Gaussian ``q(z | x)``, ``n_latent`` dimensions (default 16), standard-normal prior.

    **Likelihood.** ``"nb"`` (default): a negative binomial on the raw counts of the input genes,
    mean = decoded gene fraction x observed library size, one inverse dispersion per gene (as
    scVI). Spatial-transcriptomics UMI counts are sparse, overdispersed and their variance grows
    with the mean; the negative binomial models exactly that and does not let a few high-count
    genes dominate the loss through the squared error of a Gaussian, and the library size enters
    the likelihood instead of being a nuisance the latent must encode. ``"gaussian"`` (per-gene
    variance on the log-normalised input) is available for non-count data (e.g. already
    normalised matrices). The encoder sees log-normalised expression in both cases, so saliency
    maps have the same units whatever the likelihood.

    **Training.** Adam, KL warm-up (the KL weight rises linearly from 0 to 1 over
    ``kl_warmup_epochs``), early stopping on the ELBO of a held-out random split of spots
    (best weights restored). Same seed -> identical weights on CPU.

    Args:
        adata: AnnData, spots x genes, raw counts in ``layer``.
        n_latent: latent dimensions.
        n_hidden: hidden units per layer.
        n_layers: hidden layers in encoder and decoder.
        dropout: dropout rate while training.
        likelihood: ``"nb"`` or ``"gaussian"`` (see above).
        layer: layer holding raw counts (``None``: ``.X``).
        n_top_genes: number of highly variable genes (``None``: all genes).
        genes: explicit list of input genes (overrides ``n_top_genes``).
        target_sum: counts per spot after normalisation.
        seed: random seed of weight initialisation, split, shuffling and noise.
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.

    Attributes:
        module: the :class:`SpotVAEModule`.
        input_genes: names of the G input genes, in the order of the model's input.
        history: ``{"train": [...], "validation": [...]}`` loss per epoch.

    Example:
        >>> model = SpotVAE(adata, n_latent=16, n_top_genes=2000)  # doctest: +SKIP
        >>> model.train(max_epochs=300)  # doctest: +SKIP
        >>> mu = model.get_latent_representation()  # (n_spots, 16)  # doctest: +SKIP
    """

    def __init__(
        self,
        adata: Any,
        *,
        n_latent: int = 16,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
        likelihood: Likelihood = "nb",
        layer: str | None = COUNTS_LAYER,
        n_top_genes: int | None = 2000,
        genes: list[str] | None = None,
        target_sum: float = 1e4,
        seed: int = 0,
        device: str = "auto",
    ) -> None:
        from neuroexplain.utils import resolve_device, seed_everything

        if n_latent < 1:
            raise InputError("n_latent", f"expected at least 1 dimension, got {n_latent}")
        if adata.n_obs < 2:
            raise InputError("adata", f"expected at least 2 spots, got {adata.n_obs}")
        self.adata = adata
        self.var_names = [str(v) for v in adata.var_names]
        if genes is not None:
            pos = {g: i for i, g in enumerate(self.var_names)}
            missing = [g for g in genes if g not in pos]
            if missing:
                raise InputError("genes", f"genes not in adata.var_names: {missing[:5]}")
            gene_index = np.asarray([pos[g] for g in genes], dtype=int)
        else:
            gene_index = select_genes(
                adata, layer=layer, n_top_genes=n_top_genes, target_sum=target_sum
            )
        self.gene_index = gene_index
        self.input_genes = [self.var_names[i] for i in gene_index]
        self.seed = int(seed)
        self.config: dict[str, Any] = {
            "n_input": len(gene_index),
            "n_latent": int(n_latent),
            "n_hidden": int(n_hidden),
            "n_layers": int(n_layers),
            "dropout": float(dropout),
            "likelihood": str(likelihood),
            "layer": layer,
            "n_top_genes": None if n_top_genes is None else int(n_top_genes),
            "target_sum": float(target_sum),
        }
        self.device = resolve_device(device)
        seed_everything(self.seed)
        self.module = SpotVAEModule(
            len(gene_index),
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout=dropout,
            likelihood=likelihood,
        ).to(self.device)
        self.module.eval()
        self.history: dict[str, list[float]] = {"train": [], "validation": []}
        self.train_params: dict[str, Any] = {}
        self.epoch = 0
        self.is_trained = False

    # ---------------------------------------------------------------- data
    def get_normalized_input(self, adata: Any | None = None) -> np.ndarray:
        """The model's input: log-normalised expression of :attr:`input_genes`.

        Returns:
            float32 array ``(n_spots, G)``.
        """
        adata = self._validate(adata)
        counts = get_counts(adata, self.config["layer"])
        return log_normalise(counts, self.gene_index, target_sum=self.config["target_sum"])

    def batches(self, adata: Any | None = None) -> CountBatches:
        """The model's input as a :class:`CountBatches` (sparse; densified per batch)."""
        adata = self._validate(adata)
        counts = get_counts(adata, self.config["layer"])
        return CountBatches(counts, self.gene_index, target_sum=self.config["target_sum"])

    def _validate(self, adata: Any | None) -> Any:
        if adata is None:
            return self.adata
        _check_var_names(self.var_names, adata, "adata.var_names")
        return adata

    # ---------------------------------------------------------------- training
    def train(
        self,
        *,
        max_epochs: int = 300,
        batch_size: int = 128,
        lr: float = 3e-3,
        weight_decay: float = 1e-6,
        kl_warmup_epochs: int = 50,
        validation_fraction: float = 0.1,
        early_stopping: bool = True,
        patience: int = 30,
        epoch_samples: int | None = EPOCH_SAMPLES,
        max_validation: int | None = MAX_VALIDATION,
        max_steps: int | None = MAX_STEPS,
        progress: bool | None = None,
    ) -> SpotVAE:
        """Fit the VAE (Adam, KL warm-up, early stopping on held-out spots).

        Args:
            max_epochs: maximum number of passes over the training spots.
            batch_size: spots per step.
            lr: Adam learning rate.
            weight_decay: Adam L2 penalty.
            kl_warmup_epochs: epochs over which the KL weight rises linearly from 0 to 1.
            validation_fraction: fraction of spots held out for early stopping (none when fewer
                than 10 spots or 0).
            early_stopping: stop when the validation ELBO has not improved for ``patience``
                epochs after the warm-up, and restore the best weights.
            patience: epochs without improvement before stopping.
            epoch_samples: training spots per epoch at most (``None``: always a full pass).
                With more training spots, an epoch is a round of this many spots and
                ``max_epochs``, ``kl_warmup_epochs`` and ``patience`` count rounds (see
                :func:`fit_vae`): the number of optimisation steps stops growing with the
                number of spots. Data sets up to this size train exactly as with full passes.
            max_validation: most held-out spots (``None``: ``validation_fraction`` of all);
                the rest train.
            max_steps: most optimisation steps in all (``None``: no limit; see
                :data:`MAX_STEPS`).
            progress: show a progress bar (``None``: when stderr is a terminal).

        Returns:
            ``self`` (trained; :attr:`history` filled).

        The counts stay sparse: each mini-batch (and each validation chunk) is densified on its
        own, over the input genes only (:class:`CountBatches`).
        """
        data = self.batches()
        module = self.module

        def nll(batch: tuple[torch.Tensor, ...], eps: torch.Tensor | None):
            xb, cb, lfb = batch
            dec, mu, logvar, _ = module(xb, eps)
            return module.reconstruction_nll(dec.float(), xb, cb, lfb), mu.float(), logvar.float()

        self.history, self.epoch, self.train_params = fit_vae(
            module,
            data,
            nll,
            n_latent=self.config["n_latent"],
            seed=self.seed,
            device=self.device,
            max_epochs=max_epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            kl_warmup_epochs=kl_warmup_epochs,
            validation_fraction=validation_fraction,
            early_stopping=early_stopping,
            patience=patience,
            epoch_samples=epoch_samples,
            max_validation=max_validation,
            max_steps=max_steps,
            progress=progress,
            desc="SpotVAE",
        )
        self.is_trained = True
        return self

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def get_latent_representation(
        self, adata: Any | None = None, *, batch_size: int = 1024
    ) -> np.ndarray:
        """Posterior mean ``mu(x)`` of every spot (deterministic, never a sampled ``z``).

        Returns:
            float32 array ``(n_spots, n_latent)``; the input is densified ``batch_size`` spots
            at a time.
        """
        data = self.batches(adata)
        enc = self.posterior_mean().eval()
        out = [
            enc(torch.from_numpy(data.normalised(np.arange(a, b))).to(self.device)).cpu()
            for a, b in iter_row_batches(len(data), batch_size)
        ]
        return torch.cat(out).numpy().astype(np.float32)

    def posterior_mean(self) -> PosteriorMean:
        """The encoder as a module ``x (B, G) -> mu (B, L)`` (eval mode), for saliency."""
        self.module.eval()
        return PosteriorMean(self.module).eval()

    # ---------------------------------------------------------------- persistence
    def save(self, dir_path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
        """Write ``<dir>/model.pt``: config, state dict, seed, epoch, version, var_names.

        Returns:
            Path of the checkpoint file.
        """
        from neuroexplain import __version__
        from neuroexplain.io.atomic import save_torch

        path = Path(dir_path) / CHECKPOINT_NAME
        if path.exists() and not overwrite:
            raise InputError(path, "exists; pass overwrite=True to replace it")
        ckpt = {
            "format": _FORMAT,
            "config": dict(self.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "seed": self.seed,
            "epoch": int(self.epoch),
            "version": __version__,
            "var_names": list(self.var_names),
            "input_genes": list(self.input_genes),
            "history": {k: [float(v) for v in vals] for k, vals in self.history.items()},
            "train_params": dict(self.train_params),
        }
        save_torch(ckpt, path)  # fixed archive name: same bytes
        return path

    @classmethod
    def load(cls, dir_path: str | os.PathLike[str], adata: Any, *, device: str = "auto") -> SpotVAE:
        """Load a model saved by :meth:`save` and attach ``adata`` (same ``var_names`` required).

        Raises:
            InputError: no checkpoint, not a SpotVAE checkpoint, or ``adata.var_names`` differ.
        """
        path = Path(dir_path)
        path = path / CHECKPOINT_NAME if path.is_dir() else path
        if not path.is_file():
            raise InputError(path, "no SpotVAE checkpoint found")
        from neuroexplain.io.checkpoint import load_torch

        ckpt = load_torch(path, what="SpotVAE checkpoint")
        if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
            raise InputError(path, f"expected a {_FORMAT} checkpoint")
        _check_var_names(list(ckpt["var_names"]), adata, f"{path}: adata.var_names")
        cfg = ckpt["config"]
        model = cls(
            adata,
            n_latent=cfg["n_latent"],
            n_hidden=cfg["n_hidden"],
            n_layers=cfg["n_layers"],
            dropout=cfg["dropout"],
            likelihood=cfg["likelihood"],
            layer=cfg["layer"],
            n_top_genes=cfg["n_top_genes"],
            genes=list(ckpt["input_genes"]),
            target_sum=cfg["target_sum"],
            seed=ckpt["seed"],
            device=device,
        )
        model.module.load_state_dict(ckpt["state_dict"])
        model.module.eval()
        model.epoch = int(ckpt["epoch"])
        model.history = {k: list(v) for k, v in ckpt.get("history", {}).items()}
        model.train_params = dict(ckpt.get("train_params", {}))
        model.is_trained = True
        return model

    def __repr__(self) -> str:
        c = self.config
        return (
            f"SpotVAE(n_input={c['n_input']}, n_latent={c['n_latent']}, "
            f"likelihood={c['likelihood']!r}, trained={self.is_trained})"
        )
