"""``neuroexplain figures`` (report stage): PNG figures of the MRI explanation maps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroexplain.cli import app
from neuroexplain.cli._common import (
    DerivativesOption,
    ManifestOption,
    RegionsOption,
    parse_maps_sources,
    parse_regions,
)
from neuroexplain.errors import InputError


@app.command("figures")
def figures_cmd(
    subjects: Annotated[
        Path, typer.Option("--subjects", help="subjects.tsv from ingest-mri (native T1w, dseg).")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder of the map figures, e.g. results/figures/maps.")
    ],
    cohort: Annotated[
        Path | None,
        typer.Option("--cohort", help="Synthetic cohort from make-cohort: show its ground truth."),
    ] = None,
    manifest: ManifestOption = None,
    maps: Annotated[
        list[str] | None,
        typer.Option(
            "--maps",
            help="METHOD=FOLDER or METHOD=TEMPLATE with {subject} (as for evaluate-maps); "
            "repeat per method.",
        ),
    ] = None,
    logjacobian_maps: Annotated[
        str,
        typer.Option(
            "--logjacobian-maps",
            help="Comma-separated methods of --maps that are log-Jacobian maps (region bars); "
            "the --manifest methods of kind log-jacobian are added.",
        ),
    ] = "",
    split: Annotated[
        Path | None,
        typer.Option("--split", help="split.tsv from train-classifier (default: all subjects)."),
    ] = None,
    split_name: Annotated[
        str, typer.Option("--split-name", help="Split shown: test, val, train or all.")
    ] = "test",
    n_subjects: Annotated[
        int, typer.Option("--n-subjects", help="Diseased subjects shown per method.")
    ] = 3,
    regions: RegionsOption = None,
    regions_figure: Annotated[
        Path | None,
        typer.Option(
            "--regions-figure",
            help="PNG of mean log-Jacobian per region (+ .tsv beside it); default: none.",
        ),
    ] = None,
    derivatives: DerivativesOption = "dlmuse",
    threshold: Annotated[
        float,
        typer.Option("--threshold", help="Hide |map| below this fraction of the colour limit."),
    ] = 0.1,
) -> None:
    """Map overlays on the native T1w per method and region bars of the log-Jacobian."""
    from neuroexplain.io.atomic import output_group
    from neuroexplain.io.paths import check_output
    from neuroexplain.report import make_figures

    check_output(out, "folder")
    check_output(regions_figure, "file", option="--regions-figure")
    spec, kinds = parse_maps_sources(manifest, maps)
    logj = [m for m, kind in kinds.items() if kind == "log-jacobian"]
    logj += [m.strip() for m in logjacobian_maps.split(",") if m.strip() and m.strip() not in logj]
    if split_name not in ("test", "val", "train", "all"):
        raise InputError("--split-name", f"expected test, val, train or all, got {split_name!r}")
    with output_group(out):  # all or nothing
        summary = make_figures(
            subjects,
            out,
            cohort=cohort,
            maps=spec,
            logjacobian_maps=logj,
            split=split,
            split_name=split_name,
            n_subjects=n_subjects,
            regions=parse_regions(regions),
            regions_figure=regions_figure,
            derivatives=derivatives,
            threshold_fraction=threshold,
        )
    typer.echo(
        f"{len(summary['figures'])} map figures of {len(summary['subjects'])} subjects -> {out}"
        + (f", {regions_figure}" if regions_figure is not None else "")
    )
