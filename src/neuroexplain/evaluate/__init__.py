"""Evaluation of attribution maps against the planted ground truth of a synthetic cohort, and of
the classifier they explain (a linear reference and a quality gate)."""

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
from neuroexplain.evaluate.quality import (
    bootstrap_auc,
    check_classifier_quality,
    fit_linear_reference,
    linear_reference,
    quality_table,
    write_quality_table,
)

__all__ = [
    "bootstrap_auc",
    "check_classifier_quality",
    "diseased_subjects",
    "evaluate_maps",
    "fit_linear_reference",
    "ground_truth_paths",
    "linear_reference",
    "markdown_table",
    "ncc",
    "parse_subjects",
    "quality_table",
    "resolve_map",
    "score_map",
    "summarize",
    "topk_fraction",
    "write_evaluation",
    "write_quality_table",
]
