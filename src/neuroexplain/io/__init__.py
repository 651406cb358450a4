"""Input / output helpers: crash-safe writes, NIfTI maps in native space, tables."""

from __future__ import annotations

from neuroexplain.io.atomic import atomic_output, save_torch, write_json, write_table

__all__ = ["atomic_output", "save_torch", "write_json", "write_table"]
