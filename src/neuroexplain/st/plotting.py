"""PNG figures of concept saliency on spatial transcriptomics (matplotlib, Agg canvas).

Brocki & Chung (2019) concept saliency maps: spatial scatter of each concept score, a heatmap of
each layer concept's top saliency genes across layers, and the gene-as-image concept maps.
Figures are built with the object-oriented API on an Agg canvas (no pyplot, no global backend
switch, safe on headless cluster nodes) and written atomically.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from neuroexplain.errors import InputError
from neuroexplain.io.atomic import atomic_output
from neuroexplain.st import concept_keys as K

__all__ = [
    "plot_concept_scores",
    "plot_genemode",
    "plot_top_gene_heatmap",
    "save_figures",
]

logger = logging.getLogger(__name__)

#: most layer concepts (rows of ``n_genes`` genes each, one column per layer) in the top-gene
#: heatmap: its pixels grow with rows x columns, so more would make a figure of gigapixels
HEATMAP_MAX_CONCEPTS = 20


def _figure(n_panels: int, *, panel: float = 3.2, max_cols: int = 4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(max_cols, n_panels))
    nrows = int(np.ceil(n_panels / ncols))
    fig = Figure(figsize=(panel * ncols + 0.6, panel * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def _coords(adata: Any) -> np.ndarray:
    if K.SPATIAL_KEY not in adata.obsm:
        raise InputError(f"adata.obsm[{K.SPATIAL_KEY!r}]", "expected spot coordinates (n, 2)")
    return np.asarray(adata.obsm[K.SPATIAL_KEY], dtype=float)[:, :2]


def _spatial_panels(
    adata: Any, values: np.ndarray, titles: list[str], path: Path, *, suptitle: str
) -> Path:
    xy = _coords(adata)
    fig, axes = _figure(values.shape[1])
    for j, ax in enumerate(axes[: values.shape[1]]):
        v = values[:, j]
        lim = float(np.nanmax(np.abs(v))) or 1.0
        sc = ax.scatter(
            xy[:, 0], xy[:, 1], c=v, cmap="RdBu_r", vmin=-lim, vmax=lim, s=28, linewidths=0
        )
        ax.set_title(titles[j], fontsize=10)
        ax.set_aspect("equal")
        ax.invert_yaxis()  # array / image coordinates: row 0 at the top
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(sc, ax=ax, shrink=0.8)
    fig.suptitle(suptitle, fontsize=11)
    return _save(fig, path)


def plot_concept_scores(
    adata: Any, path: str | os.PathLike[str], *, key: str = K.DEFAULT_KEY
) -> Path:
    """Spatial scatter of each concept score ``s_c = <v_c, mu(x)>`` (one panel per concept)."""
    sk = K.scores_key(key)
    if sk not in adata.obsm:
        raise InputError(f"adata.obsm[{sk!r}]", "missing; run concept_saliency first")
    names = [str(n) for n in np.asarray(adata.uns[key]["concepts"])]
    return _spatial_panels(
        adata,
        np.asarray(adata.obsm[sk], dtype=float),
        [f"concept {n}" for n in names],
        Path(path),
        suptitle="Concept scores <v_c, mu(x)>",
    )


def plot_genemode(adata: Any, path: str | os.PathLike[str], *, key: str = K.DEFAULT_KEY) -> Path:
    """Spatial scatter of each gene-as-image concept map (one panel per seed gene)."""
    gk = K.genemode_key(key)
    if gk not in adata.obsm:
        raise InputError(f"adata.obsm[{gk!r}]", "missing; run genemode first")
    seeds = [str(s) for s in np.asarray(adata.uns[key]["genemode"]["seeds"])]
    return _spatial_panels(
        adata,
        np.asarray(adata.obsm[gk], dtype=float),
        [f"genes like {s}" for s in seeds],
        Path(path),
        suptitle="Gene-as-image concept saliency per spot",
    )


def plot_top_gene_heatmap(
    adata: Any,
    path: str | os.PathLike[str],
    *,
    label_key: str,
    key: str = K.DEFAULT_KEY,
    n_genes: int = 8,
    max_concepts: int = HEATMAP_MAX_CONCEPTS,
) -> Path:
    """Heatmap: each layer concept's top ``n_genes`` saliency genes x layers.

    Cells show the gene's mean log-normalised expression per layer, z-scored across layers, so a
    concept whose salient genes are that layer's markers lights up on its own column. At most
    ``max_concepts`` layer concepts (the first ones, with their layers as columns) are shown, with
    a warning when there are more: the figure's size grows with concepts x layers.
    """
    from neuroexplain.st.concepts import ranked_genes, spot_labels
    from neuroexplain.st.vae import get_counts, log_normalise

    uns = adata.uns[key]
    labels = spot_labels(adata, label_key, min_spots=1)
    layers = [str(c) for c in labels.cat.categories]
    sources = [str(s) for s in np.asarray(uns["concept_source"])]
    concepts = [
        str(c) for c, s in zip(np.asarray(uns["concepts"]), sources, strict=True) if s == "layer"
    ]
    if not concepts:
        raise InputError(f"adata.uns[{key!r}]", "no layer concepts to plot")
    if len(concepts) > max_concepts:
        logger.warning(
            "the top-gene heatmap shows the first %d of %d layer concepts (%s)",
            max_concepts,
            len(concepts),
            Path(path).name,
        )
        concepts = concepts[:max_concepts]
        shown = [c for c in layers if c in set(concepts)]
        layers = shown if len(shown) >= 2 else layers[:max_concepts]
    rows: list[tuple[str, str]] = []
    for c in concepts:
        rows += [(c, g) for g in ranked_genes(adata, c, key=key, n=n_genes)["names"]]
    pos = {str(g): i for i, g in enumerate(adata.var_names)}
    inp = uns.get("input", {})
    layer = str(inp.get("layer", K.COUNTS_LAYER)) or None
    expr = log_normalise(
        get_counts(adata, layer),
        np.asarray([pos[g] for _, g in rows]),
        target_sum=float(inp.get("target_sum", 1e4)),
    )
    lab = labels.to_numpy()
    means = np.stack([expr[lab == layer_name].mean(0) for layer_name in layers], axis=1)
    z = (means - means.mean(1, keepdims=True)) / (means.std(1, keepdims=True) + 1e-8)
    fig, axes = _figure(1, panel=max(4.0, 0.28 * len(rows)), max_cols=1)
    ax = axes[0]
    fig.set_size_inches(1.6 + 0.9 * len(layers), 1.5 + 0.22 * len(rows))
    im = ax.imshow(z, aspect="auto", cmap="RdBu_r", vmin=-2, vmax=2, interpolation="nearest")
    ax.set_xticks(range(len(layers)), layers)
    ax.set_yticks(range(len(rows)), [f"{c}: {g}" for c, g in rows], fontsize=7)
    for i in range(1, len(concepts)):
        ax.axhline(i * n_genes - 0.5, color="k", lw=0.6)
    ax.set_xlabel(f"layer ({label_key})")
    ax.set_title("Top concept-saliency genes: mean expression per layer (z)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.6)
    return _save(fig, path)


def save_figures(
    adata: Any,
    out_dir: str | os.PathLike[str],
    *,
    label_key: str | None,
    key: str = K.DEFAULT_KEY,
    n_genes: int = 8,
) -> list[Path]:
    """Write every available figure to ``out_dir``.

    Returns:
        Paths of ``<key>_scores.png``, ``<key>_top_genes.png`` (with a label key and layer
        concepts) and ``<key>_genemode.png`` (if gene-mode maps exist).
    """
    out = Path(out_dir)  # created by the first figure's (atomic) write
    paths = [plot_concept_scores(adata, out / f"{key}_scores.png", key=key)]
    sources = [str(s) for s in np.asarray(adata.uns[key].get("concept_source", []))]
    if label_key and "layer" in sources:
        paths.append(
            plot_top_gene_heatmap(
                adata, out / f"{key}_top_genes.png", label_key=label_key, key=key, n_genes=n_genes
            )
        )
    if K.genemode_key(key) in adata.obsm:
        paths.append(plot_genemode(adata, out / f"{key}_genemode.png", key=key))
    logger.info("wrote %d figures to %s", len(paths), out)
    return paths
