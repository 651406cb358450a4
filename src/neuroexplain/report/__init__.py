"""Figures of the workflow report (``neuroexplain figures``)."""

from __future__ import annotations

from neuroexplain.report.figures import (
    GROUND_TRUTH,
    cut_coords,
    make_figures,
    pick_subjects,
    plot_method_maps,
    plot_region_bars,
    read_subjects,
    region_table,
)

__all__ = [
    "GROUND_TRUTH",
    "cut_coords",
    "make_figures",
    "pick_subjects",
    "plot_method_maps",
    "plot_region_bars",
    "read_subjects",
    "region_table",
]
