"""AnnData key names written and read by the concept-saliency stage (defined once, here).

The stage writes, for ``key = key_added`` (default :data:`DEFAULT_KEY`):

- ``.obsm["X_<key>"]``: posterior mean latent of each spot, spots x n_latent.
- ``.obsm["<key>_scores"]``: concept scores, spots x concepts.
- ``.varm["<key>_saliency"]`` / ``.varm["<key>_saliency_abs"]``: genes x concepts.
- ``.layers["<key>_saliency_<concept>"]``: spots x genes saliency of one concept.
- ``.obsm["<key>_genemode"]``: gene-as-image concept maps, spots x seed concepts.
- ``.var["<key>_input"]``: bool, the gene is an input of the spot VAE.
- ``.uns["<key>"]``: concept names, ranked gene tables, gene-mode details and ``params``.

The input conventions (raw counts layer, spatial coordinates, labelled flag) are the ingest
stage's, re-exported here from :mod:`neuroexplain.st._keys`.
"""

from __future__ import annotations

import re

from neuroexplain.st._keys import COUNTS_LAYER, LABELLED_KEY, SPATIAL_KEY

__all__ = [
    "COUNTS_LAYER",
    "DEFAULT_KEY",
    "LABELLED_KEY",
    "SPATIAL_KEY",
    "genemode_key",
    "input_var_key",
    "latent_key",
    "safe_name",
    "saliency_abs_key",
    "saliency_key",
    "scores_key",
    "spot_gene_layer_key",
    "spot_gene_layer_prefix",
]

DEFAULT_KEY = "concept_saliency"


def safe_name(name: str) -> str:
    """A concept name usable inside an HDF5 key (``/`` and whitespace replaced by ``_``)."""
    return re.sub(r"[\s/\\]+", "_", str(name)).strip("_") or "concept"


def latent_key(key: str) -> str:
    """``.obsm`` key of the posterior-mean latent (spots x n_latent)."""
    return f"X_{key}"


def scores_key(key: str) -> str:
    """``.obsm`` key of the concept scores (spots x concepts)."""
    return f"{key}_scores"


def saliency_key(key: str) -> str:
    """``.varm`` key of the signed, spot-aggregated saliency (genes x concepts)."""
    return f"{key}_saliency"


def saliency_abs_key(key: str) -> str:
    """``.varm`` key of the absolute, spot-aggregated saliency (genes x concepts)."""
    return f"{key}_saliency_abs"


def spot_gene_layer_prefix(key: str) -> str:
    """What every ``.layers`` key of a spots x genes saliency starts with."""
    return f"{key}_saliency_"


def spot_gene_layer_key(key: str, concept: str) -> str:
    """``.layers`` key of one concept's spots x genes saliency."""
    return f"{spot_gene_layer_prefix(key)}{safe_name(concept)}"


def genemode_key(key: str) -> str:
    """``.obsm`` key of the gene-as-image concept maps (spots x seed concepts)."""
    return f"{key}_genemode"


def input_var_key(key: str) -> str:
    """``.var`` bool column: the gene is an input feature of the spot VAE."""
    return f"{key}_input"
