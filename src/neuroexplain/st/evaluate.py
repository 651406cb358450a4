"""Evaluate layer concept saliency against an independent reference (scanpy Wilcoxon markers).

For each labelled layer, the genes ranked by the layer concept's aggregated saliency
(``.uns[key]["ranked_genes"]``, Brocki & Chung 2019 concept saliency on a :class:`SpotVAE`) are
compared with scanpy's ``rank_genes_groups(method="wilcoxon")`` ranking of the same layer
against all other labelled spots, on the same genes (the model's input genes) and the same
normalisation (``log1p`` of library-size-normalised counts):

- ``overlap``: fraction of the top-``n_top`` saliency genes among the top-``n_top`` Wilcoxon genes
  (on a small panel ``n_top`` is capped at a quarter of the input genes, else two lists of all
  genes would overlap completely; ``overlap_chance`` is the overlap of random lists);
- ``spearman``: Spearman correlation of saliency and Wilcoxon score over all input genes;
- known markers' rank and percentile in the saliency ranking (and in the Wilcoxon ranking); a
  marker is "in the top" when its rank is at most ``top_k = max(1, ceil(n_genes * top_percent /
  100))``, so on a targeted panel of a few dozen genes the top 1 % is the top gene, not an
  empty list;
- layer classification accuracy from concept scores, cross-validated with the concept vectors
  recomputed inside each training fold (no label leaks into the test fold), plus chance level;
- for gene-mode maps, the mean map value per layer and the layer where it peaks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from neuroexplain.errors import InputError
from neuroexplain.st import concept_keys as K
from neuroexplain.st.concepts import layer_concepts, spot_labels
from neuroexplain.st.vae import get_counts, log_normalise

__all__ = ["DEFAULT_MARKERS", "evaluate_concepts", "top_k", "wilcoxon_ranking"]

logger = logging.getLogger(__name__)

#: Known layer markers of the mouse olfactory bulb (Stahl et al. 2016 data, checked there).
DEFAULT_MARKERS: dict[str, list[str]] = {"GCL": ["Penk", "Nrgn"], "MCL": ["Doc2g", "Cdhr1"]}


#: on ``n`` input genes the compared top lists hold at most ``n // SMALL_PANEL_FRACTION`` (random
#: lists of that size overlap by at most 25 %)
SMALL_PANEL_FRACTION = 4


def top_k(n_genes: int, top_percent: float) -> int:
    """Genes in the top ``top_percent`` % of ``n_genes``: ``max(1, ceil(n * pct / 100))``.

    At least the top gene, so a marker check on a small panel (33 genes, 1 %) asks for rank 1
    instead of less than one gene (which no marker can meet).

    Example:
        >>> top_k(33, 1.0), top_k(15000, 1.0), top_k(33, 10.0)
        (1, 150, 4)
    """
    if n_genes < 1:
        return 0
    return min(n_genes, max(1, math.ceil(n_genes * float(top_percent) / 100.0 - 1e-9)))


def _uns(adata: Any, key: str) -> Mapping[str, Any]:
    uns = adata.uns.get(key)
    if not isinstance(uns, Mapping) or "ranked_genes" not in uns:
        raise InputError(
            f"adata.uns[{key!r}]", "no concept-saliency results; run `neuroexplain st-concepts`"
        )
    return uns


def _model_params(uns: Mapping[str, Any]) -> dict[str, Any]:
    inp = uns.get("input", {})
    layer = str(inp.get("layer", K.COUNTS_LAYER))
    return {
        "layer": layer or None,
        "target_sum": float(inp.get("target_sum", 1e4)),
        "method": str(inp.get("method", "attribute")),
    }


def wilcoxon_ranking(
    adata: Any,
    labels: Any,
    genes_mask: np.ndarray,
    *,
    layer: str | None,
    target_sum: float,
) -> dict[str, Any]:
    """scanpy Wilcoxon ranking of every layer vs the other labelled spots.

    Args:
        adata: AnnData with raw counts in ``layer``.
        labels: categorical Series (NaN = unlabelled), from :func:`spot_labels`.
        genes_mask: bool ``(n_vars,)``, the genes to rank (the model's input genes).
        layer: raw-count layer.
        target_sum: normalisation target (as the model's input).

    Returns:
        ``{layer: DataFrame(names, scores, ...)}`` sorted by score, descending.
    """
    import anndata as ad
    import pandas as pd
    import scanpy as sc
    import scipy.sparse as sp

    labelled = labels.notna().to_numpy()
    gi = np.flatnonzero(genes_mask)
    # sparse counts stay sparse (scanpy ranks sparse data chunk by chunk, with the same result)
    counts = get_counts(adata, layer)
    x = log_normalise(counts[labelled], gi, target_sum=target_sum, sparse_out=sp.issparse(counts))
    tmp = ad.AnnData(
        X=x,
        obs=pd.DataFrame(
            {"layer": labels[labelled].cat.remove_unused_categories()},
            index=np.asarray(adata.obs_names)[labelled],
        ),
    )
    tmp.var_names = np.asarray(adata.var_names)[gi].astype(str)
    tmp.uns["log1p"] = {"base": None}
    sc.tl.rank_genes_groups(
        tmp, "layer", method="wilcoxon", reference="rest", n_genes=len(gi), use_raw=False
    )
    return {
        str(g): sc.get.rank_genes_groups_df(tmp, group=str(g)).reset_index(drop=True)
        for g in tmp.obs["layer"].cat.categories
    }


def _cv_accuracy(
    latent: np.ndarray, labels: Any, *, method: str, folds: int, seed: int
) -> dict[str, Any]:
    """Layer accuracy from concept scores; concept vectors refit inside each training fold."""
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    labelled = labels.notna().to_numpy()
    lat = latent[labelled]
    y = labels[labelled].astype(str).to_numpy()
    n_min = int(pd.Series(y).value_counts().min())
    k = max(2, min(folds, n_min))
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    correct = np.zeros(len(y), dtype=bool)
    per_fold = []
    for tr, te in skf.split(lat, y):
        fold_labels = pd.Series(pd.Categorical(y[tr]))
        concepts = layer_concepts(lat[tr], fold_labels, method=method, seed=seed)  # type: ignore[arg-type]
        v = np.stack([c.vector for c in concepts])
        scaler = StandardScaler().fit(lat[tr] @ v.T)
        clf = LogisticRegression(max_iter=2000, random_state=seed)
        clf.fit(scaler.transform(lat[tr] @ v.T), y[tr])
        pred = clf.predict(scaler.transform(lat[te] @ v.T))
        correct[te] = pred == y[te]
        per_fold.append(float(np.mean(pred == y[te])))
    chance = float(pd.Series(y).value_counts(normalize=True).max())
    return {
        "accuracy": float(correct.mean()),
        "fold_accuracies": per_fold,
        "n_folds": k,
        "chance": chance,
        "n_spots": len(y),
    }


def _layer_overlaps(
    ranked: Mapping[str, Any], wil: Mapping[str, Any], n_top_used: int, *, key: str
) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    """Per layer: top-``n_top_used`` overlap and Spearman correlation of the concept's saliency
    ranking (``ranked``, from ``.uns[key]["ranked_genes"]``) with the Wilcoxon ranking ``wil``.

    Returns:
        ``(per-layer results, {layer: {gene: saliency rank (1-based)}})``; layers without a
        concept are skipped with a warning.
    """
    from scipy.stats import spearmanr

    layers_out: dict[str, Any] = {}
    sal_rank: dict[str, dict[str, int]] = {}
    for layer_name, wdf in wil.items():
        ck = K.safe_name(layer_name)
        if ck not in ranked:
            logger.warning("no concept for layer %s in adata.uns[%r]", layer_name, key)
            continue
        names = np.asarray(ranked[ck]["names"]).astype(str)
        sal = np.asarray(ranked[ck]["saliency"], dtype=float)
        sal_rank[layer_name] = {g: i + 1 for i, g in enumerate(names)}
        top_s = list(names[:n_top_used])
        top_w = list(wdf["names"].astype(str)[:n_top_used])
        common = [g for g in top_s if g in set(top_w)]
        wscore = dict(zip(wdf["names"].astype(str), wdf["scores"].astype(float), strict=True))
        rho = spearmanr(sal, [wscore[g] for g in names]).statistic
        layers_out[layer_name] = {
            "overlap": len(common) / float(n_top_used),
            "overlap_genes": common,
            "spearman": float(rho),
            "top_saliency": top_s,
            "top_wilcoxon": top_w,
        }
    return layers_out, sal_rank


def _marker_ranks(
    markers: Mapping[str, Sequence[str]],
    sal_rank: Mapping[str, Mapping[str, int]],
    wil: Mapping[str, Any],
    *,
    n_genes: int,
    k_top: int,
) -> dict[str, Any]:
    """Saliency rank, percentile, top-``k_top`` flag and Wilcoxon rank of each known marker
    (marker layers without a concept are skipped)."""
    markers_out: dict[str, Any] = {}
    for layer_name, genes in markers.items():
        if layer_name not in sal_rank:
            logger.info("marker layer %s not among the labels; skipped", layer_name)
            continue
        wr = {g: i + 1 for i, g in enumerate(wil[layer_name]["names"].astype(str))}
        entry = {}
        for g in genes:
            r = sal_rank[layer_name].get(g)
            entry[g] = {
                "rank": r,
                "percentile": None if r is None else 100.0 * r / n_genes,
                "in_top": bool(r is not None and r <= k_top),
                "wilcoxon_rank": wr.get(g),
                "note": "" if r is not None else "not a model input gene",
            }
        markers_out[layer_name] = entry
    return markers_out


def _genemode_by_layer(maps: np.ndarray, uns: Mapping[str, Any], labels: Any) -> dict[str, Any]:
    """Mean gene-mode map value per layer and the peak layer, per seed gene (``maps`` spots x
    seeds)."""
    seeds = [str(s) for s in np.asarray(uns["genemode"]["seeds"])]
    gm = {}
    for j, s in enumerate(seeds):
        means = {
            str(c): float(maps[(labels == c).to_numpy(), j].mean()) for c in labels.cat.categories
        }
        gm[s] = {"mean_by_layer": means, "peak_layer": max(means, key=lambda c: means[c])}
    return gm


def evaluate_concepts(
    adata: Any,
    *,
    label_key: str,
    key: str = K.DEFAULT_KEY,
    n_top: int = 50,
    markers: Mapping[str, Sequence[str]] | None = None,
    top_percent: float = 1.0,
    cv_folds: int = 5,
    min_spots: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare layer concept saliency with Wilcoxon markers; cross-validated layer accuracy.

    Args:
        adata: output of :func:`~neuroexplain.st.concepts.concept_saliency` (raw counts still in
            the model's count layer).
        label_key: ``.obs`` column of the layer label.
        key: ``key_added`` used by ``concept_saliency``.
        n_top: size of the top gene lists compared (at most a quarter of the input genes, at
            least 1: ``n_top_used``).
        markers: ``{layer: [genes]}`` known markers (default :data:`DEFAULT_MARKERS`; layers not
            in the data are skipped).
        top_percent: a marker "passes" if its saliency rank is at most
            ``top_k = max(1, ceil(n_genes * top_percent / 100))`` (:func:`top_k`).
        cv_folds: folds of the cross-validated classification (fewer if a layer is small).
        min_spots: fewest labelled spots per layer.
        seed: seed of the fold split and classifiers.

    Returns:
        A JSON-serialisable dict: ``layers`` (per layer: ``overlap``, ``overlap_genes``,
        ``spearman``, ``top_saliency``, ``top_wilcoxon``), ``mean_overlap``, ``markers``
        (per layer and gene: ``rank``, ``percentile``, ``in_top``, ``wilcoxon_rank``),
        ``classification``, ``genemode`` (if present), ``n_genes_ranked``, ``n_top_used``,
        ``overlap_chance``, ``top_k``, ``small_panel`` and ``checks``.
    """
    uns = _uns(adata, key)
    mp = _model_params(uns)
    labels = spot_labels(adata, label_key, min_spots=min_spots)
    in_col = K.input_var_key(key)
    if in_col not in adata.var:
        raise InputError(f"adata.var[{in_col!r}]", "missing; run `neuroexplain st-concepts`")
    genes_mask = np.asarray(adata.var[in_col], dtype=bool)
    n_genes = int(genes_mask.sum())
    n_top_used = max(1, min(int(n_top), n_genes // SMALL_PANEL_FRACTION or 1))
    if n_top_used < n_top:
        logger.info(
            "%d input genes: comparing top-%d lists instead of top-%d", n_genes, n_top_used, n_top
        )
    k_top = top_k(n_genes, top_percent)
    wil = wilcoxon_ranking(
        adata, labels, genes_mask, layer=mp["layer"], target_sum=mp["target_sum"]
    )
    layers_out, sal_rank = _layer_overlaps(uns["ranked_genes"], wil, n_top_used, key=key)
    if not layers_out:
        raise InputError(f"adata.uns[{key!r}]", f"no layer concepts match {label_key!r} labels")
    mean_overlap = float(np.mean([v["overlap"] for v in layers_out.values()]))

    markers = DEFAULT_MARKERS if markers is None else markers
    markers_out = _marker_ranks(markers, sal_rank, wil, n_genes=n_genes, k_top=k_top)

    latent_key = K.latent_key(key)
    if latent_key not in adata.obsm:
        raise InputError(f"adata.obsm[{latent_key!r}]", "missing; run `neuroexplain st-concepts`")
    clf = _cv_accuracy(
        np.asarray(adata.obsm[latent_key]),
        labels,
        method=mp["method"],
        folds=cv_folds,
        seed=seed,
    )

    out: dict[str, Any] = {
        "label_key": label_key,
        "key": key,
        "n_top": n_top,
        "n_top_used": n_top_used,
        "overlap_chance": n_top_used / float(n_genes),
        "n_genes_ranked": n_genes,
        "top_percent": float(top_percent),
        "top_k": k_top,
        "small_panel": n_top_used < n_top or n_genes * float(top_percent) / 100.0 < 1,
        "layers": layers_out,
        "mean_overlap": mean_overlap,
        "mean_spearman": float(np.mean([v["spearman"] for v in layers_out.values()])),
        "markers": markers_out,
        "classification": clf,
    }
    gm_key = K.genemode_key(key)
    if gm_key in adata.obsm and "genemode" in uns:
        out["genemode"] = _genemode_by_layer(np.asarray(adata.obsm[gm_key]), uns, labels)
    checks = {f"overlap_mean>={0.5}": mean_overlap >= 0.5}
    for layer_name, entry in markers_out.items():
        checks[f"{layer_name}_marker_in_top_{top_percent:g}pct"] = any(
            e["in_top"] for e in entry.values()
        )
    out["checks"] = checks
    return out
