"""``neuroexplain check-classifier``: the quality gate before the MRI explanation stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroexplain.cli import app
from neuroexplain.errors import InputError


@app.command("check-classifier")
def check_classifier_cmd(
    metrics: Annotated[Path, typer.Option("--metrics", help="metrics.json from train-classifier.")],
    out: Annotated[
        Path,
        typer.Option("--out", help="Summary JSON, e.g. results/classifier/quality.json."),
    ],
    min_auc: Annotated[
        float,
        typer.Option(
            "--min-auc",
            help="Smallest acceptable test AUC (validation AUC without a test split); 0 = off.",
        ),
    ] = 0.7,
) -> None:
    """Fail (exit 2, nothing written) when the classifier's AUC is below --min-auc."""
    import json

    from neuroexplain.evaluate.quality import check_classifier_quality
    from neuroexplain.io.atomic import write_json
    from neuroexplain.provenance import provenance

    if not 0 <= min_auc <= 1:
        raise InputError("--min-auc", f"expected a number in [0, 1], got {min_auc}")
    if not metrics.is_file():
        raise InputError(metrics, "expected the metrics.json of train-classifier, no such file")
    try:
        data = json.loads(metrics.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(metrics, f"expected JSON, got a parse error: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(metrics, f"expected a JSON object, got {type(data).__name__}")
    summary = check_classifier_quality(data, min_auc, source=metrics)
    summary["provenance"] = provenance(
        {"min_auc": min_auc}, inputs=[metrics], command="check-classifier"
    )
    write_json(summary, out)
    gate = f">= {min_auc:g}" if min_auc > 0 else "(gate off)"
    auc = "n/a" if summary["auc"] is None else f"{summary['auc']:.3f}"
    typer.echo(f"classifier {summary['split']} AUC {auc} {gate} -> {out}")
