"""``neuroexplain check-classifier``: the quality gate before the MRI explanation stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroexplain.cli import app
from neuroexplain.cli._settings import settings_options
from neuroexplain.errors import InputError
from neuroexplain.settings import QualityConfig

#: earlier stages' warnings shown in the table (all of them are in the summary JSON)
MAX_WARNING_ROWS = 20


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
    warnings_from: Annotated[
        list[Path] | None,
        typer.Option(
            "--warnings",
            help="A JSON output of an earlier stage (e.g. ingest.json) whose 'warnings' list the "
            "table shows; repeat per file.",
        ),
    ] = None,
) -> None:
    """Fail (exit 2, nothing written) when the classifier's AUC is below --min-auc, or when the
    explained model is the linear reference itself (without --allow-linear-reference).

    When it passes, writes the summary JSON and a table of the decision (split judged, AUC with
    its 95 % interval, linear reference AUC, threshold, confusion matrix, val / test AUCs), and
    the warnings of the earlier stages (--warnings) so that the report's first page shows them.
    """

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
    data = _read_json(metrics, "the metrics.json of train-classifier")
    if not isinstance(data, dict):
        raise InputError(metrics, f"expected a JSON object, got {type(data).__name__}")
    warnings = _stage_warnings(warnings_from or [])
    min_auc = config.min_auc
    summary = check_classifier_quality(
        data, min_auc, source=metrics, allow_linear_reference=config.allow_linear_reference
    )
    gate = f">= {min_auc:g}" if min_auc > 0 else "(gate off)"
    auc = "n/a" if summary["auc"] is None else f"{summary['auc']:.3f}"
    what = f"{summary['split']} AUC {auc}"
    if min_auc > 0:
        title = f"Classifier quality gate passed: {what} >= quality.min_auc {min_auc:g}"
    else:
        title = f"Classifier quality gate off (quality.min_auc 0): {what}"
    summary["warnings"] = warnings
    rows = quality_table(data, summary)
    rows += [(f"warning ({w['source']})", w["message"]) for w in warnings[:MAX_WARNING_ROWS]]
    if len(warnings) > MAX_WARNING_ROWS:
        rest = len(warnings) - MAX_WARNING_ROWS
        rows.append(("warnings", f"{rest} more in {out.name} ('warnings')"))
    write_quality_table(rows, table, title=title)
    summary["provenance"] = provenance(
        config.to_dict(), inputs=[metrics, *(warnings_from or [])], command="check-classifier"
    )
    write_json(summary, out)  # last: the explanation stages wait for this file
    note = f" ({len(warnings)} input warning(s) in the table)" if warnings else ""
    typer.echo(f"classifier {summary['split']} AUC {auc} {gate} -> {out}, {table}{note}")


def _read_json(path: Path, what: str) -> object:
    """The parsed JSON file, or one clear :class:`InputError` (missing file, parse error)."""
    import json

    if not path.is_file():
        raise InputError(path, f"expected {what}, no such file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"expected JSON, got a parse error: {exc}") from exc


def _stage_warnings(paths: list[Path]) -> list[dict[str, str]]:
    """``{"source", "message"}`` of every entry of the ``warnings`` list of each JSON file."""
    found: list[dict[str, str]] = []
    for path in paths:
        data = _read_json(path, "a JSON output of an earlier stage")
        items = data.get("warnings") if isinstance(data, dict) else None
        for item in items if isinstance(items, list) else []:
            found.append({"source": path.name, "message": str(item)})
    return found
