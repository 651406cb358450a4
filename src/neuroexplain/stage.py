"""Plumbing shared by the stage runners of the concept stage (TCAV, SACV, XNN).

One owner for what :mod:`neuroexplain.concepts3d.run` and :mod:`neuroexplain.xnn.run` both do
around their methods: the provenance block of their outputs and the scoring of their maps with
the evaluation harness (:mod:`neuroexplain.evaluate.harness`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["harness_means", "stage_provenance"]


def stage_provenance(
    params: dict[str, Any], seed: int | None, inputs: Sequence[Any], command: str
) -> dict[str, Any]:
    """:func:`neuroexplain.provenance.provenance` of a stage run; ``None`` inputs are skipped.

    Args:
        params: the run's parameters.
        seed: its random seed.
        inputs: input files (``None`` where an optional input, e.g. ``split.tsv``, is absent).
        command: the ``neuroexplain`` subcommand.

    Returns:
        The provenance block.
    """
    from neuroexplain.provenance import provenance

    return provenance(params, seed=seed, inputs=[str(p) for p in inputs if p], command=command)


def harness_means(
    cohort: Any,
    maps: dict[str, Any],
    subjects: list[str],
    stem: Path,
    *,
    regions: Sequence[int] | None,
    derivatives: str,
    prov: dict[str, Any],
) -> dict[str, dict[str, float]]:
    """Score maps with the evaluation harness, write its tables at ``stem``, return the means.

    Args:
        cohort: synthetic cohort (ground truth) of :func:`neuroexplain.synth.make_cohort`.
        maps: ``{method: folder or template}`` of the maps.
        subjects: the subjects scored.
        stem: output stem of :func:`~neuroexplain.evaluate.harness.write_evaluation`.
        regions: planted-region labels (``None``: the cohort's planted masks).
        derivatives: dseg derivatives folder of the cohort.
        prov: provenance block written with the tables.

    Returns:
        ``{method: {metric: mean over subjects}}``.
    """
    from neuroexplain.evaluate.harness import evaluate_maps, summarize, write_evaluation

    df = evaluate_maps(
        cohort, maps, subjects, regions=regions, derivatives=derivatives, progress=False
    )
    write_evaluation(df, stem, provenance=prov)
    table = summarize(df)
    out: dict[str, dict[str, float]] = {}
    for m in table.index:
        out[m] = {
            met: float(table.loc[m, (met, "mean")])
            for met in sorted({c[0] for c in table.columns if c[0] != "n_subjects"})
        }
    return out
