"""Options shared by several subcommands (declared once, used as annotations) and their parsing.

A command takes a shared option as ``preproc: PreprocOption`` (required) or
``split: SplitOption = None`` (with its default); the settings of a stage come from
:mod:`neuroexplain.settings` through :func:`neuroexplain.cli._settings.settings_options`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from neuroexplain.errors import InputError
from neuroexplain.settings import PRECISION_HELP

__all__ = [
    "CheckpointOption",
    "CohortOption",
    "DerivativesOption",
    "DeviceOption",
    "ManifestOption",
    "PrecisionOption",
    "PreprocOption",
    "RegionLabelsOption",
    "RegionsOption",
    "SplitOption",
    "SubjectsOption",
    "TargetOption",
    "ThreadsOption",
    "WorkersOption",
    "parse_int_list",
    "parse_maps",
    "parse_maps_sources",
    "parse_named_lists",
    "parse_regions",
    "set_threads",
]

#: ``--device`` of every command that runs a network
DeviceOption = Annotated[
    str, typer.Option("--device", help="auto (CUDA when present, else CPU), cpu or cuda.")
]
#: ``--precision`` of the training commands (fills their settings' ``precision`` field)
PrecisionOption = Annotated[str, typer.Option("--precision", help=PRECISION_HELP)]
#: ``--threads`` of every command that runs torch on the CPU
ThreadsOption = Annotated[
    int | None, typer.Option("--threads", help="CPU threads for torch (default: torch's choice).")
]
#: ``--preproc`` of every command that reads the ingested MRI
PreprocOption = Annotated[Path, typer.Option("--preproc", help="preproc.pt from ingest-mri.")]
#: ``--checkpoint`` of the commands that explain the classifier
CheckpointOption = Annotated[
    Path, typer.Option("--checkpoint", help="Classifier model.pt from train-classifier.")
]
#: ``--split`` of the commands that select subjects by the classifier's split
SplitOption = Annotated[
    Path | None,
    typer.Option("--split", help="split.tsv (default: next to the classifier checkpoint)."),
]
#: ``--subjects`` of the commands that write per-subject maps or tables
SubjectsOption = Annotated[
    str, typer.Option("--subjects", help="test, val, train, all, or comma-separated ids.")
]
#: ``--target`` of the commands that explain one logit
TargetOption = Annotated[
    int, typer.Option("--target", help="Logit index to explain (0 = positive class).")
]
#: ``--cohort`` of the commands that score their maps with the evaluation harness
CohortOption = Annotated[
    Path | None,
    typer.Option("--cohort", help="Synthetic cohort: score the maps with the harness."),
]
#: ``--regions`` (dseg labels) of the harness
RegionLabelsOption = Annotated[
    str | None,
    typer.Option(
        "--regions",
        help="Harness regions as dseg labels, e.g. 47,48,51,52 (default: the planted masks).",
    ),
]
#: ``--regions`` (named label groups) of the commands that tabulate or plot regions
RegionsOption = Annotated[
    list[str] | None,
    typer.Option("--regions", help="Region as NAME=LABEL[,LABEL] of the dseg; repeat per region."),
]
#: ``--workers`` of the commands that process subjects in parallel processes
WorkersOption = Annotated[int, typer.Option("--workers", help="Parallel worker processes.")]
#: ``--manifest`` of the commands that read the maps of the MRI stages
ManifestOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--manifest",
        help="Maps manifest of a stage (e.g. results/saliency/maps.json, or its folder): its "
        "primary methods and files; repeat per stage.",
    ),
]
#: ``--derivatives`` of the commands that read a cohort's label maps
DerivativesOption = Annotated[
    str, typer.Option("--derivatives", help="Cohort derivatives folder with the dseg.")
]


def parse_int_list(text: str, option: str) -> list[int]:
    """``"47,48"`` -> ``[47, 48]`` with a clear error naming the option."""
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as exc:
        raise InputError(option, f"expected comma-separated integers, got {text!r}") from exc
    return out


def parse_maps(items: Sequence[str] | None) -> dict[str, str]:
    """``--maps`` options ``["ig=results/saliency", ...]`` -> ``{"ig": "results/saliency"}``.

    Raises:
        InputError: an item that is not ``METHOD=PATH``, or a method given twice.
    """
    spec: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError("--maps", f"expected METHOD=PATH, got {item!r}")
        if name in spec:
            raise InputError("--maps", f"method {name!r} given twice")
        spec[name] = path
    return spec


def parse_maps_sources(
    manifests: Sequence[str | Path] | None, items: Sequence[str] | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The methods of ``--manifest`` files (in order) followed by those of ``--maps`` items.

    Returns:
        ``({method: MapFiles or PATH}, {method: kind})`` (kinds of the manifests' methods).

    Raises:
        InputError: a bad manifest or ``--maps`` item, or a method given twice.
    """
    from neuroexplain.stage import manifest_maps

    spec: dict[str, Any]
    spec, kinds = manifest_maps(manifests)
    for name, path in parse_maps(items).items():
        if name in spec:
            raise InputError("--maps", f"method {name!r} is also in {spec[name]}")
        spec[name] = path
    return spec, kinds


def parse_named_lists(
    text: str, option: str, *, name: str = "NAME", item: str = "ITEM", allow_empty: bool = False
) -> dict[str, list[str]]:
    """``"a:G1,G2;b:G3"`` -> ``{"a": ["G1", "G2"], "b": ["G3"]}`` (``""``: none).

    Args:
        text: the option's value.
        option: the option, for the error message (e.g. ``"--gene-concepts"``).
        name: what a name is, for the error message (``NAME:ITEM,ITEM;...``).
        item: what an item is, for the error message.
        allow_empty: accept an empty name or an empty list (``"a:"`` -> ``{"a": []}``).

    Raises:
        InputError: a part without ``:``, or (unless ``allow_empty``) an empty name or list.
    """
    expected = f"expected {name}:{item},{item};..."
    out: dict[str, list[str]] = {}
    for part in [p for p in text.split(";") if p.strip()]:
        if ":" not in part:
            raise InputError(option, f"{expected}, got {part!r}")
        key, items = part.split(":", 1)
        vals = [v.strip() for v in items.split(",") if v.strip()]
        if not allow_empty and (not key.strip() or not vals):
            raise InputError(option, f"{expected}, got {part!r}")
        out[key.strip()] = vals
    return out


def parse_regions(specs: Sequence[str] | None) -> dict[str, list[int]]:
    """``["hippocampus=47,48", "lateral_ventricles=51,52"]`` -> ``{name: [labels]}``.

    Raises:
        InputError: a spec without ``=``, an empty or repeated name, or non-integer labels.
    """
    out: dict[str, list[int]] = {}
    for spec in specs or []:
        name, sep, labels = str(spec).partition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError("--regions", f"expected NAME=LABEL[,LABEL...], got {spec!r}")
        if name in out:
            raise InputError("--regions", f"region {name!r} given twice")
        try:
            ids = [int(t) for t in labels.replace(" ", "").split(",") if t]
        except ValueError as exc:
            raise InputError("--regions", f"expected integer labels in {spec!r}") from exc
        if not ids:
            raise InputError("--regions", f"no labels given for region {name!r}")
        out[name] = ids
    return out


def set_threads(threads: int | None) -> None:
    """Apply a ``--threads`` option to torch (``None`` keeps torch's default)."""
    if threads is not None:
        if threads < 1:
            raise InputError("--threads", f"expected a positive number, got {threads}")
        import torch

        torch.set_num_threads(threads)
