"""``neuroexplain check-classifier``: the quality gate before the MRI explanation stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroexplain.cli import app
from neuroexplain.cli._settings import settings_options
from neuroexplain.errors import InputError
from neuroexplain.settings import QualityConfig


@app.command("check-classifier")
@settings_options(config=QualityConfig)
def check_classifier_cmd(
    metrics: Annotated[Path, typer.Option("--metrics", help="metrics.json from train-classifier.")],
    out: Annotated[
        Path,
        typer.Option("--out", help="Summary JSON, e.g. results/classifier/quality.json."),
    ],
    config: QualityConfig,
    table: Annotated[
        Path | None,
        typer.Option(
            "--table",
            help="Human-readable table (.html, .md or .tsv); default: OUT with suffix .html.",
        ),
    ] = None,
) -> None:
    """Fail (exit 2, nothing written) when the classifier's AUC is below --min-auc.

    When it passes, writes the summary JSON and a table of the decision (split judged, AUC with
    its 95 % interval, linear reference AUC, threshold, confusion matrix, val / test AUCs).
    """
    import json

    from neuroexplain.evaluate.quality import (
        TABLE_SUFFIXES,
        check_classifier_quality,
        quality_table,
        write_quality_table,
    )
    from neuroexplain.io.atomic import write_json
    from neuroexplain.provenance import provenance

    table = out.with_suffix(".html") if table is None else table
    if table.suffix.lower() not in TABLE_SUFFIXES:
        raise InputError("--table", f"expected a path ending in {', '.join(TABLE_SUFFIXES)}")
    if table.resolve() == out.resolve():
        raise InputError("--table", f"expected a path other than --out, got {table}")
    if not metrics.is_file():
        raise InputError(metrics, "expected the metrics.json of train-classifier, no such file")
    try:
        data = json.loads(metrics.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(metrics, f"expected JSON, got a parse error: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(metrics, f"expected a JSON object, got {type(data).__name__}")
    min_auc = config.min_auc
    summary = check_classifier_quality(data, min_auc, source=metrics)
    gate = f">= {min_auc:g}" if min_auc > 0 else "(gate off)"
    auc = "n/a" if summary["auc"] is None else f"{summary['auc']:.3f}"
    what = f"{summary['split']} AUC {auc}"
    if min_auc > 0:
        title = f"Classifier quality gate passed: {what} >= quality.min_auc {min_auc:g}"
    else:
        title = f"Classifier quality gate off (quality.min_auc 0): {what}"
    write_quality_table(quality_table(data, summary), table, title=title)
    summary["provenance"] = provenance(
        config.to_dict(), inputs=[metrics], command="check-classifier"
    )
    write_json(summary, out)  # last: the explanation stages wait for this file
    typer.echo(f"classifier {summary['split']} AUC {auc} {gate} -> {out}, {table}")
