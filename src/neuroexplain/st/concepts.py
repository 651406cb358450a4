"""Concept vectors, concept scores and concept saliency maps on spatial transcriptomics.

Brocki & Chung (2019), "Concept Saliency Maps to Visualize Relevant Features in Deep Generative
Models" (ICMLA 2019, arXiv:1910.13140):

- a **concept vector** ``v_c`` lives in the latent space of a VAE. The paper's *attribute*
  method takes the mean latent code of the inputs that show the concept minus the mean of those
  that do not; here, per morphological layer, the mean posterior mean ``mu`` of the layer's spots
  minus that of all other labelled spots (:func:`attribute_vector`). A linear-probe direction
  (logistic regression on ``mu``) is the alternative (:func:`probe_vectors`). Users may define a
  concept from a list of spots (:func:`spot_set_vector`) or of genes (:func:`gene_set_vector`).
- the **concept score** ``s_c(x) = <v_c, mu(x)>`` (:class:`ConceptScorer`).
- the **concept saliency map** ``d s_c / d x`` per spot and gene, as plain gradient,
  gradient x input, SmoothGrad or Integrated Gradients (:class:`ConceptSaliency`), computed for
  all concepts and all spots at once (one forward pass and a ``torch.func.vmap``-ed
  vector-Jacobian product over the concepts, no Python loop over spots or concepts).
- the paper's own ST experiment, **gene-as-image mode** (:func:`genemode`): every gene is an
  image of its expression over the spot grid, a convolutional VAE learns over genes, a concept is
  the set of genes whose spatial pattern correlates with a seed gene, and its saliency over
  pixels shows where in the tissue the concept lives.

The AnnData functions follow scanpy: ``fn(adata, ..., *, key_added=..., copy=False)``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from neuroexplain.errors import InputError
from neuroexplain.settings import ST_SALIENCY_METHODS
from neuroexplain.st import concept_keys as K
from neuroexplain.st.vae import (
    GeneImageVAE,
    SpotVAE,
    gene_images,
    get_counts,
    log_normalise,
    rasterise_spots,
)

__all__ = [
    "SALIENCY_METHODS",
    "Concept",
    "ConceptSaliency",
    "ConceptScorer",
    "attribute_vector",
    "concept_saliency",
    "drop_spot_gene_layers",
    "gene_set_vector",
    "genemode",
    "layer_concepts",
    "probe_vectors",
    "ranked_genes",
    "spot_gene_saliency",
    "spot_labels",
    "spot_set_vector",
]

logger = logging.getLogger(__name__)

SaliencyMethod = Literal["gradient", "grad_x_input", "smoothgrad", "ig"]
SALIENCY_METHODS: tuple[str, ...] = ST_SALIENCY_METHODS
ConceptMethod = Literal["attribute", "probe"]


# --------------------------------------------------------------------------------------------
# labels and concept vectors
# --------------------------------------------------------------------------------------------


def spot_labels(adata: Any, label_key: str, *, min_spots: int = 5) -> Any:
    """The per-spot layer label as a pandas Categorical Series (NaN = unlabelled).

    Args:
        adata: AnnData with ``.obs[label_key]``.
        label_key: obs column of the layer label.
        min_spots: fewest labelled spots a layer may have.

    Returns:
        ``pandas.Series`` (categorical, unused categories removed), index ``adata.obs_names``.

    Raises:
        InputError: the key is missing, fewer than two layers, or a layer has fewer than
            ``min_spots`` labelled spots.
    """
    import pandas as pd

    where = f"adata.obs[{label_key!r}]"
    if label_key not in adata.obs:
        raise InputError(where, f"label key not found; obs columns are {list(adata.obs.columns)}")
    lab = adata.obs[label_key]
    lab = lab.astype(object).where(lab.notna(), None)
    lab = lab.map(lambda v: None if v is None or (isinstance(v, str) and not v.strip()) else v)
    if K.LABELLED_KEY in adata.obs and adata.obs[K.LABELLED_KEY].dtype == bool:
        lab = lab.where(adata.obs[K.LABELLED_KEY].to_numpy(), None)
    lab = pd.Series(
        pd.Categorical(lab.map(lambda v: None if v is None else str(v))),
        index=adata.obs_names,
        name=label_key,
    )
    lab = lab.cat.remove_unused_categories()
    counts = lab.value_counts()
    if len(counts) < 2:
        raise InputError(where, f"expected at least 2 labelled layers, got {len(counts)}")
    small = {str(k): int(v) for k, v in counts.items() if v < min_spots}
    if small:
        raise InputError(
            where, f"too few labelled spots (expected at least {min_spots} per layer): {small}"
        )
    return lab


def attribute_vector(latent: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """The attribute concept vector: mean latent of ``positive`` minus mean of ``negative``.

    Args:
        latent: posterior means, ``(n_spots, L)``.
        positive: bool mask ``(n_spots,)`` of spots showing the concept.
        negative: bool mask ``(n_spots,)`` of the reference spots.

    Returns:
        ``(L,)`` float32.
    """
    if positive.sum() == 0 or negative.sum() == 0:
        raise InputError("concept", "a concept needs at least one spot with and one without it")
    return (latent[positive].mean(0) - latent[negative].mean(0)).astype(np.float32)


def probe_vectors(
    latent: np.ndarray, labels: np.ndarray, classes: Sequence[str], *, seed: int = 0
) -> np.ndarray:
    """Linear-probe concept vectors: logistic regression of the layer on ``mu`` (one-vs-rest).

    The latent is standardised for the fit and the coefficients mapped back, so the direction
    applies to raw ``mu`` (``s_c = <w_c, mu>``; the intercept does not change the gradient).

    Args:
        latent: ``(n, L)`` posterior means of the labelled spots.
        labels: ``(n,)`` layer of each spot.
        classes: the layer names, in output order.

    Returns:
        ``(len(classes), L)`` float32.
    """
    from sklearn.linear_model import LogisticRegression

    mean, sd = latent.mean(0), latent.std(0) + 1e-8
    z = (latent - mean) / sd
    out = np.zeros((len(classes), latent.shape[1]), dtype=np.float32)
    for i, c in enumerate(classes):
        y = (labels == c).astype(int)
        clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
        clf.fit(z, y)
        out[i] = (clf.coef_[0] / sd).astype(np.float32)
    return out


def spot_set_vector(latent: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Concept vector of a user-listed spot set: its mean latent minus that of all other spots."""
    return attribute_vector(latent, mask, ~mask)


def gene_set_vector(
    latent: np.ndarray, expr: np.ndarray, *, quantile: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """Concept vector of a user-listed gene set.

    Each spot's gene-set score is the mean of the genes' z-scored log-normalised expression; the
    top ``quantile`` of spots carry the concept and the vector is the attribute difference
    between them and the remaining spots.

    Args:
        latent: ``(n_spots, L)``.
        expr: ``(n_spots, n_set_genes)`` log-normalised expression of the gene set.
        quantile: fraction of spots with the highest gene-set score that carry the concept.

    Returns:
        ``(vector (L,), positive mask (n_spots,))``.
    """
    sd = expr.std(0)
    sd[sd == 0] = 1.0
    score = ((expr - expr.mean(0)) / sd).mean(1)
    n_pos = max(1, round(quantile * len(score)))
    order = np.argsort(-score, kind="stable")
    mask = np.zeros(len(score), dtype=bool)
    mask[order[:n_pos]] = True
    return attribute_vector(latent, mask, ~mask), mask


@dataclass
class Concept:
    """A named concept: latent direction ``vector`` (L,) and the spots that carry it."""

    name: str
    vector: np.ndarray
    spots: np.ndarray  # bool (n_spots,), the spots the saliency is aggregated over
    source: str  # "layer", "spots" or "genes"
    members: list[str] = field(default_factory=list)  # listed genes / spots, if any


def layer_concepts(
    latent: np.ndarray,
    labels: Any,
    *,
    method: ConceptMethod = "attribute",
    seed: int = 0,
) -> list[Concept]:
    """One concept per layer of ``labels`` (a categorical Series, NaN = unlabelled).

    ``method="attribute"``: mean ``mu`` of the layer's spots minus mean ``mu`` of all other
    labelled spots (Brocki & Chung's attribute method). ``method="probe"``: logistic-regression
    direction of the layer against the other labelled spots.
    """
    lab = np.asarray(labels.astype(object).where(labels.notna(), None))
    labelled = np.array([v is not None for v in lab])
    classes = [str(c) for c in labels.cat.categories]
    if method == "attribute":
        vecs = [attribute_vector(latent, lab == c, labelled & (lab != c)) for c in classes]
    elif method == "probe":
        vecs = list(probe_vectors(latent[labelled], lab[labelled].astype(str), classes, seed=seed))
    else:
        raise InputError("method", f"expected 'attribute' or 'probe', got {method!r}")
    return [
        Concept(name=c, vector=v, spots=(lab == c), source="layer")
        for c, v in zip(classes, vecs, strict=True)
    ]


# --------------------------------------------------------------------------------------------
# scores and batched saliency (Captum-style)
# --------------------------------------------------------------------------------------------


class ConceptScorer(nn.Module):
    """Concept scores ``s(x) = mu(x) @ V.T`` of an encoder's posterior mean.

    Args:
        encoder: module mapping inputs ``(B, ...)`` to posterior means ``(B, L)``
            (e.g. :meth:`SpotVAE.posterior_mean`).
        vectors: concept vectors ``(C, L)``.

    Shapes: ``x (B, ...)`` -> ``(B, C)``. Use it as a Captum ``forward_func`` with
    ``target=c``.
    """

    def __init__(self, encoder: nn.Module, vectors: torch.Tensor | np.ndarray) -> None:
        super().__init__()
        self.encoder = encoder
        v = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        if v.ndim != 2:
            raise InputError("vectors", f"expected (C, L) concept vectors, got {tuple(v.shape)}")
        self.register_buffer("vectors", v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x) @ self.vectors.T


def _gauss_legendre(n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Integration points on [0, 1] and weights (Captum's ``gausslegendre``)."""
    x, w = np.polynomial.legendre.leggauss(n_steps)
    return 0.5 * (1.0 + x), 0.5 * w


class ConceptSaliency:
    """Saliency of every concept score with respect to the input, batched (Captum-style).

    ``ConceptSaliency(scorer).attribute(x)`` returns ``(T, B, ...)``: one attribution map per
    target concept, each shaped like ``inputs``. One forward pass over the (possibly noisy or
    interpolated) batch, then the vector-Jacobian products for all targets at once with
    ``torch.func.vmap``; the model must treat samples independently (eval mode, no batch norm in
    training mode). Methods:

    - ``"gradient"``: ``d s_c / d x`` (Captum ``Saliency(abs=False)``).
    - ``"grad_x_input"``: ``x * d s_c / d x`` (Captum ``InputXGradient``).
    - ``"smoothgrad"``: mean gradient over ``nt_samples`` noisy copies ``x + N(0, stdevs^2)``
      (Captum ``NoiseTunnel(Saliency(abs=False), nt_type="smoothgrad")``; the same noise layout,
      so with the same RNG state the results agree).
    - ``"ig"``: Integrated Gradients from ``baselines`` (default zeros: no expression) with
      ``n_steps`` Gauss-Legendre points (Captum ``IntegratedGradients``, ``"gausslegendre"``).

    Args:
        forward_func: module ``(B, ...) -> (B, C)``, e.g. :class:`ConceptScorer`.

    Example:
        >>> enc = nn.Linear(6, 3)
        >>> scorer = ConceptScorer(enc, torch.eye(3)[:2]).eval()
        >>> ConceptSaliency(scorer).attribute(torch.rand(5, 6)).shape
        torch.Size([2, 5, 6])
    """

    def __init__(self, forward_func: nn.Module) -> None:
        self.forward_func = forward_func

    def _grads(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Gradients of the ``targets`` outputs: ``x (B, ...)`` -> ``(T, B, ...)``."""
        from torch.func import vjp, vmap

        out, vjp_fn = vjp(self.forward_func, x)
        if out.ndim != 2:
            raise InputError("forward_func", f"expected outputs (B, C), got {tuple(out.shape)}")
        cot = torch.zeros((len(targets), *out.shape), dtype=out.dtype, device=out.device)
        cot[torch.arange(len(targets)), :, targets] = 1.0
        (g,) = vmap(vjp_fn)(cot)
        return g

    def attribute(
        self,
        inputs: torch.Tensor,
        *,
        target: int | Sequence[int] | None = None,
        method: SaliencyMethod = "gradient",
        nt_samples: int = 25,
        stdevs: float = 0.1,
        n_steps: int = 50,
        baselines: torch.Tensor | float | None = None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Attribution maps of the targets.

        Args:
            inputs: ``(B, ...)``.
            target: output index, list of indices, or ``None`` for all outputs.
            method: ``"gradient"``, ``"grad_x_input"``, ``"smoothgrad"`` or ``"ig"``.
            nt_samples: SmoothGrad noise samples per input.
            stdevs: SmoothGrad noise standard deviation, in input units.
            n_steps: Integrated-Gradients integration points.
            baselines: IG baseline (tensor shaped like ``inputs`` or one value; default 0).
            batch_size: inputs per chunk (bounds memory); ``None`` = all at once.
            generator: torch RNG for the SmoothGrad noise (``None``: the global RNG, as Captum).

        Returns:
            ``(T, B, ...)`` attributions (``T`` = number of targets), on the inputs' device.
        """
        if method not in SALIENCY_METHODS:
            raise InputError("saliency", f"expected one of {SALIENCY_METHODS}, got {method!r}")
        x = inputs.detach()
        with torch.no_grad():
            n_out = self.forward_func(x[:1]).shape[-1]
        if target is None:
            targets = torch.arange(n_out, device=x.device)
        else:
            targets = torch.as_tensor(np.atleast_1d(target), dtype=torch.long, device=x.device)
        bs = len(x) if batch_size is None else max(1, int(batch_size))
        base = None
        if method == "ig":
            base = (
                torch.zeros_like(x)
                if baselines is None
                else torch.as_tensor(baselines, dtype=x.dtype, device=x.device).expand_as(x)
            )
        chunks = []
        for start in range(0, len(x), bs):
            xc = x[start : start + bs]
            if method in ("gradient", "grad_x_input"):
                g = self._grads(xc, targets)
                if method == "grad_x_input":
                    g = g * xc
            elif method == "smoothgrad":
                size = (len(xc) * nt_samples, *xc.shape[1:])
                std = torch.full(size, float(stdevs), dtype=xc.dtype, device=xc.device)
                noise = torch.normal(0.0, std, generator=generator)
                noisy = xc.repeat_interleave(nt_samples, dim=0) + noise
                g = self._grads(noisy, targets)
                g = g.reshape(len(targets), len(xc), nt_samples, *xc.shape[1:]).mean(2)
            else:  # ig
                assert base is not None
                bc = base[start : start + bs]
                alphas, weights = _gauss_legendre(n_steps)
                scaled = torch.cat([bc + float(a) * (xc - bc) for a in alphas], dim=0)
                g = self._grads(scaled, targets)
                g = g.reshape(len(targets), n_steps, len(xc), *xc.shape[1:])
                w = torch.as_tensor(weights, dtype=g.dtype, device=g.device)
                w = w.reshape(1, n_steps, *([1] * (g.ndim - 2)))
                g = (g * w).sum(1) * (xc - bc)
            chunks.append(g.detach())
        return torch.cat(chunks, dim=1)


# --------------------------------------------------------------------------------------------
# AnnData API
# --------------------------------------------------------------------------------------------


def _h5ad_safe(obj: Any) -> Any:
    """Make a nested dict writable by anndata (lists -> arrays or JSON strings)."""
    if isinstance(obj, Mapping):
        return {str(k): _h5ad_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if all(isinstance(v, str) for v in obj):
            return np.asarray(obj, dtype=str) if obj else np.asarray([], dtype=str)
        if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in obj):
            return np.asarray(obj)
        return json.dumps(obj, default=str)
    if obj is None:
        return "None"
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _auto_batch(n_targets: int, n_features: int, expand: int, budget_mb: float = 256.0) -> int:
    per_input = n_targets * n_features * expand * 4 * 3  # grads + inputs + activations margin
    return max(1, int(budget_mb * 2**20 // max(per_input, 1)))


def concept_saliency(
    adata: Any,
    model: SpotVAE,
    *,
    label_key: str | None,
    method: ConceptMethod = "attribute",
    saliency: SaliencyMethod = "grad_x_input",
    spot_concepts: Mapping[str, Sequence[str]] | None = None,
    gene_concepts: Mapping[str, Sequence[str]] | None = None,
    gene_concept_quantile: float = 0.25,
    min_spots: int = 5,
    nt_samples: int = 25,
    noise_level: float = 0.15,
    n_steps: int = 50,
    store_spot_gene: bool = True,
    max_spot_gene_mb: float | None = None,
    seed: int = 0,
    inputs: Sequence[str | os.PathLike[str]] = (),
    key_added: str = K.DEFAULT_KEY,
    copy: bool = False,
) -> Any | None:
    """Concept vectors, scores and saliency maps of a trained :class:`SpotVAE`.

    Brocki & Chung (2019): ``s_c(x) = <v_c, mu(x)>`` and the saliency ``d s_c / d x`` with
    respect to each spot's log-normalised input expression, for every concept and every spot in
    one batched computation.

    Args:
        adata: AnnData (same ``var_names`` as the model was trained on).
        model: a trained :class:`SpotVAE`.
        label_key: ``.obs`` column of the layer label (NaN = unlabelled); one concept per layer.
            ``None``: only the user-defined concepts.
        method: ``"attribute"`` (difference of mean ``mu``) or ``"probe"`` (logistic regression).
        saliency: ``"gradient"``, ``"grad_x_input"`` (default), ``"smoothgrad"`` or ``"ig"``.
            The plain gradient (the paper's map) measures *sensitivity*: on MOB its top genes
            are largely lowly expressed genes with large encoder weights, and its top-50 overlap
            with Wilcoxon markers is ~10-16 %. Gradient x input (and IG from zero expression,
            which it approximates) weighs the sensitivity by the expression present, i.e. each
            gene's first-order contribution to the score; it recovers the layer markers
            (~78 % overlap). Hence the default.
        spot_concepts: extra concepts ``{name: [obs_names]}`` (mean ``mu`` of the listed spots
            minus that of all other spots).
        gene_concepts: extra concepts ``{name: [genes]}`` (see :func:`gene_set_vector`).
        gene_concept_quantile: fraction of spots carrying a gene-set concept.
        min_spots: fewest labelled spots per layer.
        nt_samples: SmoothGrad samples.
        noise_level: SmoothGrad noise sd as a fraction of the input's value range (the SmoothGrad
            paper's convention).
        n_steps: Integrated-Gradients steps (baseline: zero expression).
        store_spot_gene: write the per-concept spots x genes maps to ``.layers``.
        max_spot_gene_mb: skip those layers (with a warning) when they would take more than
            this many MiB (concepts x spots x all genes x 4 bytes; ``None``: no limit). The
            saliency itself is computed in blocks of spots and aggregated as it streams, so
            without the layers memory does not grow with spots x genes.
        seed: seed of the probe fit and SmoothGrad noise.
        inputs: input files to checksum into the provenance.
        key_added: prefix of all keys written.
        copy: return a modified copy instead of writing into ``adata``.

    Returns:
        ``None`` (or the copy if ``copy=True``). Writes, with ``key = key_added``:

        - ``.obsm["X_<key>"]``: posterior mean, spots x n_latent.
        - ``.obsm["<key>_scores"]``: concept scores, spots x concepts.
        - ``.varm["<key>_saliency"]``: saliency averaged over the concept's spots (signed),
          genes x concepts; 0 for genes that are not model inputs (their gradient is 0).
        - ``.varm["<key>_saliency_abs"]``: mean absolute saliency, genes x concepts.
        - ``.layers["<key>_saliency_<concept>"]``: spots x genes saliency (``store_spot_gene``
          and within ``max_spot_gene_mb``; ``.uns["<key>"]["spot_gene_layers"]`` says whether).
        - ``.var["<key>_input"]``: bool, gene is a model input.
        - ``.uns["<key>"]``: ``concepts`` (names), ``concept_source``, ``concept_vectors``
          (concepts x n_latent), ``concept_spots`` (names of the spots carrying each concept),
          ``ranked_genes`` (per concept: ``names``, ``saliency``, ``saliency_abs`` of the input
          genes sorted by signed saliency), ``concept_members`` (listed genes / spots of
          user concepts), ``input`` (count layer, ``target_sum``, method, saliency: what the
          evaluation needs), ``label_key`` and ``params`` (provenance: seed,
          config, package version).
    """
    from neuroexplain.provenance import provenance

    adata = adata.copy() if copy else adata
    if not model.is_trained:
        logger.warning("the SpotVAE has not been trained; saliency explains random weights")
    if saliency not in SALIENCY_METHODS:
        raise InputError("saliency", f"expected one of {SALIENCY_METHODS}, got {saliency!r}")
    model._validate(adata)
    latent = model.get_latent_representation(adata)

    concepts = _all_concepts(
        adata,
        model,
        latent,
        label_key=label_key,
        method=method,
        min_spots=min_spots,
        seed=seed,
        spot_concepts=spot_concepts,
        gene_concepts=gene_concepts,
        gene_concept_quantile=gene_concept_quantile,
    )
    vectors = np.stack([c.vector for c in concepts])  # (C, L)
    scores = latent @ vectors.T  # (N, C)
    store_spot_gene = store_spot_gene and _spot_gene_fits(adata, len(concepts), max_spot_gene_mb)

    key = key_added
    adata.obsm[K.latent_key(key)] = latent
    adata.obsm[K.scores_key(key)] = scores.astype(np.float32)
    ranked, stdevs = _saliency_and_store(
        adata,
        model,
        key,
        concepts,
        vectors,
        saliency=saliency,
        nt_samples=nt_samples,
        noise_level=noise_level,
        n_steps=n_steps,
        seed=seed,
        store_spot_gene=store_spot_gene,
    )
    params = {
        "label_key": label_key,
        "method": method,
        "saliency": saliency,
        "nt_samples": nt_samples,
        "noise_level": noise_level,
        "stdevs": stdevs,
        "n_steps": n_steps,
        "min_spots": min_spots,
        "gene_concept_quantile": gene_concept_quantile,
        "model": dict(model.config),
        "train": dict(model.train_params),
        "model_seed": model.seed,
    }
    _write_concepts_uns(
        adata,
        key,
        model,
        concepts,
        vectors,
        ranked,
        label_key=label_key,
        method=method,
        saliency=saliency,
        store_spot_gene=store_spot_gene,
        prov=provenance(params, seed=seed, inputs=inputs, command="st-concepts"),
    )
    logger.info("concept saliency (%s, %s) for %d concepts", method, saliency, len(concepts))
    return adata if copy else None


def _all_concepts(
    adata: Any,
    model: SpotVAE,
    latent: np.ndarray,
    *,
    label_key: str | None,
    method: ConceptMethod,
    min_spots: int,
    seed: int,
    spot_concepts: Mapping[str, Sequence[str]] | None,
    gene_concepts: Mapping[str, Sequence[str]] | None,
    gene_concept_quantile: float,
) -> list[Concept]:
    """The concepts of :func:`concept_saliency`: one per layer of ``label_key`` (if given),
    then the user-defined ones; at least one, with unique (key-safe) names."""
    concepts: list[Concept] = []
    if label_key is not None:
        labels = spot_labels(adata, label_key, min_spots=min_spots)
        concepts += layer_concepts(latent, labels, method=method, seed=seed)
    concepts += _user_concepts(
        adata, model, latent, spot_concepts, gene_concepts, gene_concept_quantile
    )
    if not concepts:
        raise InputError("concepts", "no concepts: give a label_key or user-defined concepts")
    cnames = [c.name for c in concepts]
    if len(set(map(K.safe_name, cnames))) != len(cnames):
        raise InputError("concepts", f"concept names must be unique, got {cnames}")
    return concepts


def _spot_gene_fits(adata: Any, n_concepts: int, max_spot_gene_mb: float | None) -> bool:
    """Whether the spots x genes saliency layers fit in ``max_spot_gene_mb`` (warns if not)."""
    size_mb = _spot_gene_mb(n_concepts, adata.n_obs, adata.n_vars)
    if max_spot_gene_mb is None or size_mb <= max_spot_gene_mb:
        return True
    logger.warning(
        "not storing the spots x genes saliency layers: %d concepts x %d spots x %d genes "
        "need %.0f MiB, more than max_spot_gene_mb=%s (the per-gene saliency, ranked genes "
        "and scores are computed as usual)",
        n_concepts,
        adata.n_obs,
        adata.n_vars,
        size_mb,
        max_spot_gene_mb,
    )
    return False


def _user_concepts(
    adata: Any,
    model: SpotVAE,
    latent: np.ndarray,
    spot_concepts: Mapping[str, Sequence[str]] | None,
    gene_concepts: Mapping[str, Sequence[str]] | None,
    gene_concept_quantile: float,
) -> list[Concept]:
    """The user-defined concepts: spot lists, then gene sets (checked against the AnnData)."""
    concepts: list[Concept] = []
    n_spots = adata.n_obs
    pos = {str(n): i for i, n in enumerate(adata.obs_names)}
    for cname, spots in (spot_concepts or {}).items():
        missing = [s for s in spots if s not in pos]
        if missing:
            raise InputError(f"spot concept {cname!r}", f"spots not in obs_names: {missing[:5]}")
        mask = np.zeros(n_spots, dtype=bool)
        mask[[pos[s] for s in spots]] = True
        concepts.append(
            Concept(cname, spot_set_vector(latent, mask), mask, "spots", [str(s) for s in spots])
        )
    if gene_concepts:
        var_pos = {str(g): i for i, g in enumerate(adata.var_names)}
        counts = get_counts(adata, model.config["layer"])
        for cname, genes in gene_concepts.items():
            missing = [g for g in genes if g not in var_pos]
            if missing or not genes:
                raise InputError(
                    f"gene concept {cname!r}", f"genes not in var_names: {missing[:5] or genes}"
                )
            gidx = np.asarray([var_pos[g] for g in genes])
            expr = log_normalise(counts, gidx, target_sum=model.config["target_sum"])
            vec, mask = gene_set_vector(latent, expr, quantile=gene_concept_quantile)
            concepts.append(Concept(cname, vec, mask, "genes", [str(g) for g in genes]))
    return concepts


def _spot_gene_mb(n_concepts: int, n_spots: int, n_vars: int) -> float:
    """Size of the per-concept spots x genes saliency layers (float32), in MiB."""
    return n_concepts * n_spots * n_vars * 4 / 2**20


def _saliency_batches(
    adata: Any,
    model: SpotVAE,
    vectors: np.ndarray,
    *,
    saliency: SaliencyMethod,
    nt_samples: int,
    noise_level: float,
    n_steps: int,
    seed: int,
):
    """Saliency of every concept score, one block of spots at a time.

    Yields ``(start, stop, sal)`` with ``sal`` float32 ``(C, stop - start, G)``; the input is
    densified block by block from the sparse counts (:class:`~neuroexplain.st.vae.CountBatches`)
    and the blocks are those :meth:`ConceptSaliency.attribute` would use with the same
    ``batch_size`` (same SmoothGrad noise). The first item is the SmoothGrad sd (a float).
    """
    from neuroexplain.st.vae import iter_row_batches

    data = model.batches(adata)
    n, n_genes = len(data), data.n_genes
    expand = {"smoothgrad": nt_samples, "ig": n_steps}.get(saliency, 1)
    bs = _auto_batch(len(vectors), n_genes, expand)
    # the value range of the whole input (SmoothGrad's noise scale), without densifying it
    lo, hi = np.inf, -np.inf
    for a, b in iter_row_batches(n, max(bs, 4096)):
        xb = data.normalised(np.arange(a, b))
        lo, hi = min(lo, float(xb.min())), max(hi, float(xb.max()))
    # as ``noise_level * (x.max() - x.min())`` on the float32 input tensor
    stdevs = float(noise_level * (torch.tensor(hi, dtype=torch.float32) - float(lo)))
    yield stdevs
    from neuroexplain.utils import seed_everything

    scorer = ConceptScorer(model.posterior_mean(), vectors).to(model.device).eval()
    seed_everything(seed)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    expl = ConceptSaliency(scorer)
    for a, b in iter_row_batches(n, bs):
        x = torch.from_numpy(data.normalised(np.arange(a, b))).to(model.device)
        sal = expl.attribute(
            x,
            method=saliency,
            nt_samples=nt_samples,
            stdevs=stdevs,
            n_steps=n_steps,
            batch_size=bs,
            generator=gen,
        )
        yield a, b, sal.cpu().numpy().astype(np.float32)


def _saliency_and_store(
    adata: Any,
    model: SpotVAE,
    key: str,
    concepts: list[Concept],
    vectors: np.ndarray,
    *,
    saliency: SaliencyMethod,
    nt_samples: int,
    noise_level: float,
    n_steps: int,
    seed: int,
    store_spot_gene: bool,
) -> tuple[dict[str, dict[str, np.ndarray]], float]:
    """Saliency of all concepts at all spots, aggregated while it streams; stored in ``adata``.

    Per concept, the signed and absolute saliency are summed over the concept's spots block by
    block (float32 running sums; one block gives exactly ``mean(0)`` of the full map), so only
    one block of ``(C, B, G)`` maps is in memory, never ``(C, n_spots, G)``. The spots x genes
    layers are filled block by block when ``store_spot_gene``.

    Returns:
        ``(ranked genes, SmoothGrad sd)``.
    """
    gi = model.gene_index
    n_spots, n_vars = adata.n_obs, adata.n_vars
    n_c, n_in = len(concepts), len(gi)
    sums = np.zeros((n_c, n_in), dtype=np.float32)
    sums_abs = np.zeros_like(sums)
    layers = (
        [np.zeros((n_spots, n_vars), dtype=np.float32) for _ in concepts]
        if store_spot_gene
        else None
    )
    stream = _saliency_batches(
        adata,
        model,
        vectors,
        saliency=saliency,
        nt_samples=nt_samples,
        noise_level=noise_level,
        n_steps=n_steps,
        seed=seed,
    )
    stdevs = next(stream)
    for a, b, sal in stream:  # sal (C, b - a, G)
        for j, c in enumerate(concepts):
            m = c.spots[a:b]
            if m.any():
                sums[j] += sal[j][m].sum(0)
                sums_abs[j] += np.abs(sal[j][m]).sum(0)
            if layers is not None:
                layers[j][a:b, gi] = sal[j]
    agg = np.zeros((n_vars, n_c), dtype=np.float32)
    agg_abs = np.zeros_like(agg)
    for j, c in enumerate(concepts):
        k = int(c.spots.sum())
        # numpy's ``mean``: the float32 sum divided by the count (float64 division, cast back)
        agg[gi, j] = (sums[j].astype(np.float64) / k).astype(np.float32)
        agg_abs[gi, j] = (sums_abs[j].astype(np.float64) / k).astype(np.float32)
    adata.varm[K.saliency_key(key)] = agg
    adata.varm[K.saliency_abs_key(key)] = agg_abs
    input_mask = np.zeros(n_vars, dtype=bool)
    input_mask[gi] = True
    adata.var[K.input_var_key(key)] = input_mask
    drop_spot_gene_layers(adata, key=key)
    if layers is not None:
        for c, full in zip(concepts, layers, strict=True):
            adata.layers[K.spot_gene_layer_key(key, c.name)] = full

    ranked = {}
    genes = np.asarray(model.input_genes, dtype=str)
    for j, c in enumerate(concepts):
        order = np.argsort(-agg[gi, j], kind="stable")
        ranked[K.safe_name(c.name)] = {
            "names": genes[order],
            "saliency": agg[gi, j][order],
            "saliency_abs": agg_abs[gi, j][order],
        }
    return ranked, stdevs


def _write_concepts_uns(
    adata: Any,
    key: str,
    model: SpotVAE,
    concepts: list[Concept],
    vectors: np.ndarray,
    ranked: dict[str, dict[str, np.ndarray]],
    *,
    label_key: str | None,
    method: str,
    saliency: str,
    store_spot_gene: bool,
    prov: dict[str, Any],
) -> None:
    """Write the ``.uns[key]`` block: concepts, their vectors ``(C, L)``, spots and members, ranked
    genes, provenance (an earlier gene-mode result under the key is kept)."""
    names = [str(n) for n in adata.obs_names]
    cnames = [c.name for c in concepts]
    prev = adata.uns.get(key, {})
    adata.uns[key] = _h5ad_safe(
        {
            "concepts": cnames,
            "concept_source": [c.source for c in concepts],
            "concept_keys": [K.safe_name(n) for n in cnames],
            "concept_spots": {
                K.safe_name(c.name): [names[i] for i in np.flatnonzero(c.spots)] for c in concepts
            },
            "concept_members": {K.safe_name(c.name): c.members for c in concepts if c.members},
            "ranked_genes": ranked,
            "label_key": label_key if label_key is not None else "",
            "input": {
                "layer": model.config["layer"] or "",
                "target_sum": model.config["target_sum"],
                "method": method,
                "saliency": saliency,
            },
            "params": prov,
        }
    )
    adata.uns[key]["concept_vectors"] = vectors
    adata.uns[key]["spot_gene_layers"] = bool(store_spot_gene)
    if isinstance(prev, Mapping) and "genemode" in prev:
        adata.uns[key]["genemode"] = prev["genemode"]


def ranked_genes(adata: Any, concept: str, *, key: str = K.DEFAULT_KEY, n: int | None = None):
    """The input genes ranked by a concept's signed saliency, as a DataFrame.

    Columns: ``names``, ``saliency``, ``saliency_abs``, ``rank`` (1 = most salient).
    """
    import pandas as pd

    try:
        tab = adata.uns[key]["ranked_genes"][K.safe_name(concept)]
    except KeyError as exc:
        raise InputError(f"adata.uns[{key!r}]", f"no ranked genes for concept {concept!r}") from exc
    df = pd.DataFrame({k: np.asarray(tab[k]) for k in ("names", "saliency", "saliency_abs")})
    df["rank"] = np.arange(1, len(df) + 1)
    return df if n is None else df.head(n)


def drop_spot_gene_layers(adata: Any, *, key: str = K.DEFAULT_KEY) -> None:
    """Remove every spots x genes saliency layer written under ``key`` from ``adata``."""
    prefix = K.spot_gene_layer_prefix(key)
    for name in [k for k in adata.layers.keys() if k.startswith(prefix)]:
        del adata.layers[name]


def spot_gene_saliency(adata: Any, *, key: str = K.DEFAULT_KEY) -> Any:
    """A compact AnnData (spots x model-input genes) holding the per-concept saliency layers.

    Use it to write the spots x genes maps to a separate ``.h5ad`` when they are large; the
    returned object has ``.layers["<concept>"]`` per concept, ``.obsm["spatial"]`` if present and
    ``.uns["params"]``.
    """
    import anndata as ad

    uns = adata.uns.get(key)
    if uns is None:
        raise InputError(f"adata.uns[{key!r}]", "not found; run concept_saliency first")
    mask = np.asarray(adata.var[K.input_var_key(key)], dtype=bool)
    out = ad.AnnData(obs=adata.obs[[]].copy(), var=adata.var.loc[mask, []].copy())
    for name in np.asarray(uns["concept_keys"]).astype(str):
        lk = K.spot_gene_layer_key(key, name)
        if lk not in adata.layers:
            raise InputError(f"adata.layers[{lk!r}]", "not found (store_spot_gene=False?)")
        out.layers[name] = np.asarray(adata.layers[lk])[:, mask]
    if K.SPATIAL_KEY in adata.obsm:
        out.obsm[K.SPATIAL_KEY] = np.asarray(adata.obsm[K.SPATIAL_KEY])
    out.uns["params"] = uns["params"]
    return out


# --------------------------------------------------------------------------------------------
# gene-as-image mode (the paper's own ST experiment)
# --------------------------------------------------------------------------------------------


def genemode(
    adata: Any,
    seeds: Sequence[str],
    *,
    layer: str | None = K.COUNTS_LAYER,
    n_top_genes: int | None = 500,
    genes: Sequence[str] | None = None,
    n_similar: int = 20,
    n_latent: int = 8,
    channels: Sequence[int] = (8, 16),
    saliency: SaliencyMethod = "grad_x_input",
    max_epochs: int = 40,
    batch_size: int = 64,
    lr: float = 3e-3,
    kl_warmup_epochs: int = 10,
    spacing: float | None = None,
    max_grid: int | None = 128,
    target_sum: float = 1e4,
    seed: int = 0,
    device: str = "auto",
    progress: bool | None = None,
    inputs: Sequence[str | os.PathLike[str]] = (),
    key_added: str = K.DEFAULT_KEY,
    copy: bool = False,
) -> Any | None:
    """Gene-as-image concept saliency (Brocki & Chung 2019, spatial-transcriptomics experiment).

    Each gene is a 2D image of its expression over the spot grid (array coordinates from
    ``.obsm["spatial"]`` rasterised to integers, see :func:`~neuroexplain.st.vae.rasterise_spots`;
    log-normalised, scaled to [0, 1] per gene). A small convolutional VAE
    (:class:`~neuroexplain.st.vae.GeneImageVAE`) learns over the genes. For each seed gene, the
    concept is the seed plus the ``n_similar - 1`` genes whose expression over spots correlates
    best with it; its vector is their mean posterior mean minus that of all other genes. The
    concept's saliency over pixels, averaged over its genes and read at each spot, is the
    per-spot map of where in the tissue the concept lives.

    Args:
        adata: AnnData with raw counts in ``layer`` and ``.obsm["spatial"]`` (n_spots, 2).
        seeds: seed genes, e.g. ``["Penk", "Doc2g", "Kctd12"]``.
        layer: raw-count layer (``None``: ``.X``).
        n_top_genes: highly variable genes used as images (``None``: all genes). 500 (was
            1,000) halves the image VAE's cost at every size with the seeds' peak layers
            unchanged on MOB and MOB tiled to 10,000 / 100,000 spots; the maps move less than
            with another seed (``benchmarks/results/st_genemode.md``).
        genes: explicit gene list instead of ``n_top_genes`` (seeds are always added).
        n_similar: genes per concept (including the seed).
        n_latent: latent dimensions of the image VAE.
        channels: convolution channels (one stride-2 block each).
        saliency: saliency method (see :class:`ConceptSaliency`).
        max_epochs, batch_size, lr, kl_warmup_epochs: image-VAE training.
        spacing: grid spacing of the coordinates (``None``: median nearest-neighbour distance).
        max_grid: largest side of the gene images in pixels (``None``: no limit); a finer grid
            is coarsened, spots sharing a pixel are averaged (MOB's 33 x 35 array is unchanged).
        target_sum: normalisation target.
        seed: random seed.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        progress: progress bar (``None``: when stderr is a terminal).
        inputs: input files to checksum into the provenance.
        key_added: key prefix.
        copy: return a copy.

    Returns:
        ``None`` or the copy. Writes ``.obsm["<key>_genemode"]`` (spots x seeds, the per-spot
        concept maps) and ``.uns["<key>"]["genemode"]`` with ``seeds``, ``concept_genes``
        (per seed), ``grid_shape`` and ``params`` (provenance).

    Raises:
        InputError: a seed gene is missing, or no spatial coordinates.
    """
    from neuroexplain.provenance import provenance
    from neuroexplain.utils import seed_everything

    adata = adata.copy() if copy else adata
    seeds = [str(s) for s in seeds]
    if not seeds:
        raise InputError("--genemode-seeds", "expected at least one seed gene")
    coords, expr, gene_names = _genemode_expression(
        adata, seeds, layer=layer, n_top_genes=n_top_genes, genes=genes, target_sum=target_sum
    )
    n_sim = max(1, min(int(n_similar), len(gene_names) - 1))

    rows, cols, shape = rasterise_spots(coords[:, :2], spacing=spacing, max_side=max_grid)
    images = gene_images(expr, rows, cols, shape)  # (G, 1, H, W)
    seed_everything(seed)
    vae = GeneImageVAE(images, n_latent=n_latent, channels=channels, seed=seed, device=device)
    vae.train(
        max_epochs=max_epochs,
        batch_size=batch_size,
        lr=lr,
        kl_warmup_epochs=kl_warmup_epochs,
        progress=progress,
    )
    mu = vae.get_latent_representation()  # (G, L)
    concept_genes, masks = _seed_concepts(expr, gene_names, seeds, n_sim)
    vectors = np.stack([attribute_vector(mu, m, ~m) for m in masks])  # (S, L)
    maps = _genemode_spot_maps(
        vae, images, vectors, masks, (rows, cols), adata.n_obs, saliency=saliency, seed=seed
    )
    prov = provenance(
        {
            "layer": layer,
            "n_top_genes": n_top_genes,
            "n_genes": len(gene_names),
            "n_similar": n_sim,
            "n_latent": n_latent,
            "channels": list(channels),
            "saliency": saliency,
            "max_epochs": max_epochs,
            "batch_size": batch_size,
            "lr": lr,
            "kl_warmup_epochs": kl_warmup_epochs,
            "epochs_run": len(vae.history["train"]),
            "spacing": spacing,
            "max_grid": max_grid,
            "target_sum": target_sum,
        },
        seed=seed,
        inputs=inputs,
        command="st-concepts",
    )
    _write_genemode(adata, key_added, maps, seeds, concept_genes, shape, vectors, prov)
    logger.info("gene-mode concept maps for seeds %s", seeds)
    return adata if copy else None


def _write_genemode(
    adata: Any,
    key: str,
    maps: np.ndarray,
    seeds: list[str],
    concept_genes: dict[str, list[str]],
    shape: tuple[int, int],
    vectors: np.ndarray,
    prov: dict[str, Any],
) -> None:
    """Write the gene-mode results: ``.obsm["<key>_genemode"]`` (``maps``, spots x seeds) and
    ``.uns[key]["genemode"]`` (seeds, concept genes, grid shape, concept vectors ``(S, L)``,
    provenance); the rest of ``.uns[key]`` is kept."""
    adata.obsm[K.genemode_key(key)] = maps
    uns = dict(adata.uns.get(key, {}))
    uns["genemode"] = _h5ad_safe(
        {
            "seeds": seeds,
            "concept_genes": concept_genes,
            "grid_shape": [int(shape[0]), int(shape[1])],
            "params": prov,
        }
    )
    uns["genemode"]["concept_vectors"] = vectors
    adata.uns[key] = uns


def _genemode_expression(
    adata: Any,
    seeds: list[str],
    *,
    layer: str | None,
    n_top_genes: int | None,
    genes: Sequence[str] | None,
    target_sum: float,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Checked coordinates, and the log-normalised expression of the genes used as images."""
    from neuroexplain.st.vae import select_genes

    var_pos = {str(g): i for i, g in enumerate(adata.var_names)}
    missing = [s for s in seeds if s not in var_pos]
    if missing:
        raise InputError("genemode seeds", f"seed genes not in adata.var_names: {missing}")
    if K.SPATIAL_KEY not in adata.obsm:
        raise InputError(f"adata.obsm[{K.SPATIAL_KEY!r}]", "expected spot coordinates (n, 2)")
    coords = np.asarray(adata.obsm[K.SPATIAL_KEY], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2 or not np.all(np.isfinite(coords[:, :2])):
        raise InputError(
            f"adata.obsm[{K.SPATIAL_KEY!r}]",
            f"expected finite (n, 2) coordinates, got shape {coords.shape}",
        )
    if genes is not None:
        miss = [g for g in genes if g not in var_pos]
        if miss:
            raise InputError("genes", f"genes not in adata.var_names: {miss[:5]}")
        idx = [var_pos[g] for g in genes]
    else:
        idx = list(select_genes(adata, layer=layer, n_top_genes=n_top_genes, target_sum=target_sum))
    idx = sorted(set(idx) | {var_pos[s] for s in seeds})
    gene_names = [str(adata.var_names[i]) for i in idx]
    counts = get_counts(adata, layer)
    expr = log_normalise(counts, np.asarray(idx), target_sum=target_sum)  # (N, G)
    keep = expr.max(0) > 0
    for s in seeds:
        if not keep[gene_names.index(s)]:
            raise InputError("genemode seeds", f"seed gene {s!r} is not expressed in any spot")
    expr, gene_names = expr[:, keep], [g for g, k in zip(gene_names, keep, strict=True) if k]
    return coords, expr, gene_names


def _seed_concepts(
    expr: np.ndarray, gene_names: list[str], seeds: list[str], n_sim: int
) -> tuple[dict[str, list[str]], list[np.ndarray]]:
    """Concept genes of each seed: best spatial correlation with it over spots (and masks)."""
    z = (expr - expr.mean(0)) / (expr.std(0) + 1e-8)
    corr = (z.T @ z) / len(z)  # (G, G)
    concept_genes: dict[str, list[str]] = {}
    masks = []
    for s in seeds:
        si = gene_names.index(s)
        c = corr[si].copy()
        c[si] = np.inf
        top = np.argsort(-c, kind="stable")[:n_sim]
        m = np.zeros(len(gene_names), dtype=bool)
        m[top] = True
        masks.append(m)
        concept_genes[s] = [gene_names[i] for i in top]
    return concept_genes, masks


def _genemode_spot_maps(
    vae: GeneImageVAE,
    images: np.ndarray,
    vectors: np.ndarray,
    masks: list[np.ndarray],
    pixels: tuple[np.ndarray, np.ndarray],
    n_obs: int,
    *,
    saliency: SaliencyMethod,
    seed: int,
) -> np.ndarray:
    """Per-spot concept maps: saliency over pixels, averaged over the concept's genes."""
    rows, cols = pixels
    x = torch.from_numpy(images).to(vae.device)
    scorer = ConceptScorer(vae.posterior_mean(), vectors).to(vae.device).eval()
    sel = np.flatnonzero(np.any(np.stack(masks), axis=0))  # only genes of some concept
    gen = torch.Generator(device=vae.device).manual_seed(seed)
    stdevs = 0.15 * float(x.max() - x.min())
    maps = np.zeros((n_obs, len(masks)), dtype=np.float32)
    sal = ConceptSaliency(scorer).attribute(
        x[torch.as_tensor(sel, device=x.device)],
        method=saliency,
        stdevs=stdevs,
        batch_size=256,
        generator=gen,
    )  # (S, |sel|, 1, H, W)
    sal = sal.cpu().numpy()
    for j, m in enumerate(masks):
        pix = sal[j][m[sel]].mean(0)[0]  # (H, W)
        maps[:, j] = pix[rows, cols]
    return maps
