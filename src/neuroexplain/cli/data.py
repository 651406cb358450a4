"""``neuroexplain fetch-data``: download the public demo data (pinned, sha256-checked)."""

from __future__ import annotations

from pathlib import Path

import typer

from neuroexplain.cli import app


@app.command("fetch-data")
def fetch_data(
    dataset: str = typer.Argument(..., help="Which dataset: 'ixi' or 'mob'."),
    out: Path = typer.Option(..., "--out", help="Destination folder (e.g. resources/ixi)."),
    mirror: Path | None = typer.Option(
        None,
        "--mirror",
        help="Copy from a local mirror with the same layout instead of downloading.",
    ),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N subjects (IXI)."),
) -> None:
    """Fetch a demo dataset from its public source into OUT (no network use anywhere else)."""
    from neuroexplain.datasets import fetch
    from neuroexplain.io.paths import check_output

    check_output(out, "folder")
    fetch(dataset, out, mirror=mirror, limit=limit)
