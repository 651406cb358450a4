"""Key names of the spatial-transcriptomics AnnData layout, defined once.

Every stage reads and writes these names through this module, never as string literals, so the
layout of the standard ``.h5ad`` written by :func:`neuroexplain.st.ingest.ingest_st` is documented
in one place:

- ``.layers[COUNTS_LAYER]``: raw UMI counts, sparse CSR (spots x genes).
- ``.obsm[SPATIAL_KEY]``: spot coordinates, float ``(n_spots, 2)`` (squidpy convention).
- ``.obs[<label key>]``: categorical region / layer label, NaN for unlabelled spots; the key used is
  stored in ``.uns[INGEST_KEY]["label_key"]`` (default :data:`DEFAULT_LABEL_KEY`).
- ``.obs[LABELLED_KEY]``: bool, ``True`` where the spot has a label.
- ``.uns[INGEST_KEY]``: ``{"params": provenance, "summary": ..., "label_key": ...}``.
"""

from __future__ import annotations

__all__ = [
    "COUNTS_LAYER",
    "DEFAULT_LABEL_KEY",
    "INGEST_KEY",
    "LABELLED_KEY",
    "SPATIAL_KEY",
]

COUNTS_LAYER = "counts"
SPATIAL_KEY = "spatial"
LABELLED_KEY = "labelled"
DEFAULT_LABEL_KEY = "layer"
INGEST_KEY = "neuroexplain_ingest"
