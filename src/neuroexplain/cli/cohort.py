"""``neuroexplain make-cohort``: plant a disease effect with exact ground truth."""

from __future__ import annotations

from pathlib import Path

import typer

from neuroexplain.cli import app
from neuroexplain.cli._common import parse_int_list


@app.command("make-cohort")
def make_cohort_cmd(
    bids: Path = typer.Option(..., "--bids", help="Source BIDS dataset with T1w and dseg."),
    out: Path = typer.Option(..., "--out", help="Output BIDS dataset of the synthetic cohort."),
    derivatives: str = typer.Option(
        "dlmuse", "--derivatives", help="Derivatives folder with *_dseg.nii.gz."
    ),
    shrink: str = typer.Option(
        "47,48", "--shrink", help="Label indices of regions to shrink (comma-separated)."
    ),
    enlarge: str = typer.Option(
        "51,52", "--enlarge", help="Label indices of regions to enlarge (comma-separated)."
    ),
    fraction: float = typer.Option(
        0.5, "--fraction", help="Fraction of subjects that get the disease effect."
    ),
    magnitude_min: float = typer.Option(
        0.15,
        "--magnitude-min",
        help="Smallest effect magnitude (fractional volume change of the planted regions).",
    ),
    magnitude_max: float = typer.Option(0.30, "--magnitude-max", help="Largest effect magnitude."),
    nuisance: float = typer.Option(
        0.0,
        "--nuisance",
        help="Amplitude (mm) of a mild random smooth deformation of every subject; 0 = off.",
    ),
    seed: int = typer.Option(
        0, "--seed", help="Random seed (which subjects, magnitudes, nuisance)."
    ),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N source subjects."),
    workers: int = typer.Option(1, "--workers", help="Parallel worker processes."),
    sigma: float = typer.Option(
        4.0,
        "--sigma",
        help="Smoothness (mm) of the disease deformation (sigma of the smoothed indicators).",
    ),
    nuisance_sigma: float = typer.Option(
        12.0, "--nuisance-sigma", help="Smoothness (mm) of the nuisance deformation."
    ),
    label_interpolation: str = typer.Option(
        "linear",
        "--label-interpolation",
        help="Hard label sampling: linear (one-hot argmax) or nearest; planted regions "
        "keep their partial volume either way.",
    ),
    label_probability: float = typer.Option(
        1.0,
        "--label-probability",
        help="Probability that each planted label is affected in a diseased subject "
        "(independently; at least one is). Below 1 the disease is heterogeneous, so a "
        "classifier has to use every planted region.",
    ),
    paired: bool = typer.Option(
        False,
        "--paired/--unpaired",
        help="Two subjects per source: sub-<id>ctl (control) and sub-<id>dis (diseased, same "
        "anatomy); --fraction is then not used.",
    ),
) -> None:
    """Write a BIDS cohort: deformed T1w, carried labels, exact Jacobian ground truth."""
    from neuroexplain.synth.cohort import make_cohort

    make_cohort(
        bids=bids,
        out=out,
        derivatives=derivatives,
        shrink=parse_int_list(shrink, "--shrink"),
        enlarge=parse_int_list(enlarge, "--enlarge"),
        fraction=fraction,
        magnitude_range=(magnitude_min, magnitude_max),
        nuisance=nuisance,
        seed=seed,
        limit=limit,
        workers=workers,
        sigma=sigma,
        nuisance_sigma=nuisance_sigma,
        label_interpolation=label_interpolation,
        paired=paired,
        label_probability=label_probability,
    )
