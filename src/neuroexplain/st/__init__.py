"""Spatial transcriptomics: ingest counts + coordinates + region labels into a standard AnnData.

See :mod:`neuroexplain.st._keys` for the layout every stage relies on and
:func:`neuroexplain.st.ingest.ingest_st` for the reader (imported lazily: pandas / anndata /
scanpy load only when it is used).
"""

from __future__ import annotations

from typing import Any

from neuroexplain.st._keys import (
    COUNTS_LAYER,
    DEFAULT_LABEL_KEY,
    INGEST_KEY,
    LABELLED_KEY,
    SPATIAL_KEY,
)

__all__ = [
    "COUNTS_LAYER",
    "DEFAULT_LABEL_KEY",
    "INGEST_KEY",
    "LABELLED_KEY",
    "SPATIAL_KEY",
    "ingest_st",
]


def __getattr__(name: str) -> Any:
    if name == "ingest_st":
        from neuroexplain.st.ingest import ingest_st

        return ingest_st
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
