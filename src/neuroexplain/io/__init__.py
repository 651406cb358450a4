"""Input / output helpers: crash-safe writes, NIfTI maps in native space, tables."""

from __future__ import annotations

from neuroexplain.io.atomic import (
    atomic_output,
    output_group,
    save_torch,
    write_h5ad,
    write_json,
    write_table,
)
from neuroexplain.io.paths import check_output

__all__ = [
    "atomic_output",
    "check_output",
    "output_group",
    "save_torch",
    "write_h5ad",
    "write_json",
    "write_table",
]
