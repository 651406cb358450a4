"""``neuroexplain make-cohort``: plant a disease effect with exact ground truth."""

from __future__ import annotations

from pathlib import Path

import typer

from neuroexplain.cli import app
from neuroexplain.cli._common import WorkersOption
from neuroexplain.cli._settings import settings_options
from neuroexplain.settings import CohortConfig


@app.command("make-cohort")
@settings_options(config=CohortConfig)
def make_cohort_cmd(
    config: CohortConfig,
    bids: Path = typer.Option(..., "--bids", help="Source BIDS dataset with T1w and dseg."),
    out: Path = typer.Option(..., "--out", help="Output BIDS dataset of the synthetic cohort."),
    derivatives: str = typer.Option(
        "dlmuse", "--derivatives", help="Derivatives folder with *_dseg.nii.gz."
    ),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N source subjects."),
    workers: WorkersOption = 1,
) -> None:
    """Write a BIDS cohort: deformed T1w, carried labels, exact Jacobian ground truth."""
    from neuroexplain.io.paths import check_output
    from neuroexplain.synth.cohort import make_cohort

    check_output(out, "folder")
    make_cohort(bids, out, config, derivatives=derivatives, limit=limit, workers=workers)
