"""Evaluation of attribution maps against the planted ground truth of a synthetic cohort."""

from __future__ import annotations

from neuroexplain.evaluate.harness import (
    diseased_subjects,
    evaluate_maps,
    ground_truth_paths,
    markdown_table,
    ncc,
    parse_subjects,
    resolve_map,
    score_map,
    summarize,
    topk_fraction,
    write_evaluation,
)

__all__ = [
    "diseased_subjects",
    "evaluate_maps",
    "ground_truth_paths",
    "markdown_table",
    "ncc",
    "parse_subjects",
    "resolve_map",
    "score_map",
    "summarize",
    "topk_fraction",
    "write_evaluation",
]
