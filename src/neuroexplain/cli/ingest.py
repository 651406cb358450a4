"""``neuroexplain ingest-mri`` and ``neuroexplain ingest-st``."""

from __future__ import annotations

from pathlib import Path

import typer

from neuroexplain.cli import app
from neuroexplain.cli._common import WorkersOption
from neuroexplain.cli._settings import settings_options
from neuroexplain.settings import MRIIngestConfig


@app.command("ingest-mri")
@settings_options(config=MRIIngestConfig)
def ingest_mri_cmd(
    config: MRIIngestConfig,
    out: Path = typer.Option(
        ..., "--out", help="Output folder (preproc.pt, subjects.tsv, ingest.json)."
    ),
    bids: Path | None = typer.Option(
        None, "--bids", help="BIDS dataset root (participants.tsv, sub-*/anat/*_T1w.nii.gz)."
    ),
    sheet: Path | None = typer.Option(
        None,
        "--sheet",
        help="Sample sheet TSV/CSV with columns subject, t1, dseg, label (instead of --bids).",
    ),
    derivatives: str = typer.Option(
        "dlmuse",
        "--derivatives",
        help="BIDS derivatives folder holding *_dseg.nii.gz ('' for none).",
    ),
    label_column: str | None = typer.Option(
        None, "--label-column", help="participants.tsv column with the class label."
    ),
    positive_class: str | None = typer.Option(
        None,
        "--positive-class",
        help="Value of the label column that is the positive class (binary tasks).",
    ),
    subjects: str | None = typer.Option(
        None, "--subjects", help="Comma-separated subset of participant ids."
    ),
    limit: int | None = typer.Option(
        None, "--limit", help="Only the first N subjects (sorted by id)."
    ),
    workers: WorkersOption = 1,
    group_column: str | None = typer.Option(
        None,
        "--group-column",
        help="Column of subjects that must share a split (default: source_subject if present).",
    ),
    label_groups: list[str] | None = typer.Option(
        None,
        "--label-group",
        help="Classes from a numeric label column, NAME=CONDITION (<X, <=X, >X, >=X or A..B), "
        "e.g. --label-group 'young=<40' --label-group 'old=>60'; others are left out.",
    ),
) -> None:
    """Preprocess T1w (+ dseg) to the model grid and cache tensors, keeping the native mapping.

    The defaults align subjects by their label centroids and mask the brain, which needs dseg
    label maps; without them, add --align none --mask none.
    """
    from neuroexplain.io.paths import check_output
    from neuroexplain.mri.ingest import ingest_mri

    check_output(out, "folder")
    ingest_mri(
        out,
        bids=bids,
        sheet=sheet,
        derivatives=derivatives or None,
        label_column=label_column,
        positive_class=positive_class,
        config=config,
        subjects=[s for s in (subjects or "").split(",") if s] or None,
        limit=limit,
        workers=workers,
        group_column=group_column,
        label_groups=label_groups or None,
    )


@app.command("ingest-st")
def ingest_st_cmd(
    out: Path = typer.Option(..., "--out", help="Output .h5ad."),
    counts: Path | None = typer.Option(None, "--counts", help="Counts table CSV/TSV (gz ok)."),
    spots: Path | None = typer.Option(
        None, "--spots", help="Spot table CSV/TSV: spot id, coordinates, label."
    ),
    h5ad: Path | None = typer.Option(None, "--h5ad", help="An existing .h5ad instead of tables."),
    visium: Path | None = typer.Option(
        None, "--visium", help="A 10x Visium (Space Ranger) output folder."
    ),
    orientation: str = typer.Option(
        "auto", "--orientation", help="Counts layout: auto, spots-by-genes or genes-by-spots."
    ),
    label_key: str = typer.Option(
        "layer",
        "--label-key",
        help="Spot-table column (or .obs key) with the region / layer label.",
    ),
    x_col: str = typer.Option("x", "--x-col", help="Spot-table column with x coordinates."),
    y_col: str = typer.Option("y", "--y-col", help="Spot-table column with y coordinates."),
    spot_col: str | None = typer.Option(
        None, "--spot-col", help="Spot-table column with the spot ids (default: the first column)."
    ),
    label_out_key: str | None = typer.Option(
        None, "--label-out-key", help=".obs key to store the label under (default: --label-key)."
    ),
    on_mismatch: str = typer.Option(
        "intersect",
        "--on-mismatch",
        help="Counts and spot-table ids differ: 'intersect' (warn, keep common) or 'error'.",
    ),
) -> None:
    """Read counts + spots, .h5ad or Visium into one standard .h5ad (counts, spatial, label)."""
    from neuroexplain.io.paths import check_output
    from neuroexplain.st.ingest import ingest_st

    check_output(out, "file")
    ingest_st(
        out=out,
        counts=counts,
        spots=spots,
        h5ad=h5ad,
        visium=visium,
        orientation=orientation,
        label_key=label_key,
        x_col=x_col,
        y_col=y_col,
        spot_col=spot_col,
        label_out_key=label_out_key,
        on_mismatch=on_mismatch,
    )
