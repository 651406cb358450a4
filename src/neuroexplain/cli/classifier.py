"""``neuroexplain train-classifier``, ``saliency`` and ``evaluate-maps`` (MRI classifier stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroexplain.cli import app
from neuroexplain.cli._common import (
    CheckpointOption,
    DerivativesOption,
    DeviceOption,
    ManifestOption,
    PrecisionOption,
    PreprocOption,
    RegionLabelsOption,
    RegionsOption,
    SplitOption,
    SubjectsOption,
    TargetOption,
    ThreadsOption,
    parse_int_list,
    parse_maps_sources,
    parse_regions,
    set_threads,
)
from neuroexplain.cli._settings import settings_options
from neuroexplain.errors import InputError
from neuroexplain.settings import ClassifierConfig, SaliencyConfig


@app.command("train-classifier")
@settings_options(config=ClassifierConfig)
def train_classifier_cmd(
    preproc: PreprocOption,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Output folder (model.pt, metrics.json, logits.tsv, split.tsv, train_log.tsv).",
        ),
    ],
    config: ClassifierConfig,
    split: Annotated[
        Path | None,
        typer.Option("--split", help="Reuse an existing split.tsv instead of drawing one."),
    ] = None,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    precision: PrecisionOption = "fp32",
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume",
            help="Continue an interrupted run from OUT/train_state.pt (same options and data).",
        ),
    ] = True,
) -> None:
    """Train the 3D MRI classifier with a stratified subject split and early stopping."""
    from neuroexplain.classifier import ARCHITECTURES, train_classifier
    from neuroexplain.errors import NeuroexplainError
    from neuroexplain.io.atomic import output_group
    from neuroexplain.io.paths import check_output

    check_output(out, "folder")
    set_threads(threads)
    if config.arch not in ARCHITECTURES:
        raise InputError("--arch", f"expected one of {sorted(ARCHITECTURES)}, got {config.arch!r}")
    # all or nothing on a full disk (the resume state of this run too); an interruption or a
    # crash keeps OUT/train_state.pt for --resume
    with output_group(out, only_on=NeuroexplainError):
        metrics = train_classifier(preproc, out, config, split=split, resume=resume)
    test = metrics.get("test", {})
    ref = metrics["reference"].get("test", metrics["reference"]["val"])
    explained = metrics.get("explained")
    also = ""
    if explained:  # the model the explanation stages explain (classifier.explain)
        auc = explained.get("test", explained.get("val", {})).get("auc")
        also = f"; explained: {explained['model']}, AUC {auc}"
    typer.echo(
        f"test AUC {test.get('auc')}, balanced accuracy {test.get('balanced_accuracy')} "
        f"(best epoch {metrics['best_epoch']}, {metrics['train_seconds']:.0f} s, model "
        f"{metrics['model']}; linear reference AUC {ref['auc']}{also}) -> {out}"
    )


@app.command("saliency")
@settings_options(config=SaliencyConfig)
def saliency_cmd(
    preproc: PreprocOption,
    checkpoint: CheckpointOption,
    out: Annotated[Path, typer.Option("--out", help="Output folder, e.g. results/saliency.")],
    config: SaliencyConfig,
    subjects: SubjectsOption = "test",
    split: SplitOption = None,
    target: TargetOption = 0,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Baseline attribution maps of the classifier logit, written in each subject's native space."""
    from neuroexplain.attribution.saliency import run_saliency
    from neuroexplain.io.atomic import output_group
    from neuroexplain.io.paths import check_output

    check_output(out, "folder")
    set_threads(threads)
    with output_group(out):  # all or nothing
        run_saliency(
            preproc,
            checkpoint,
            out,
            config,
            subjects=subjects,
            split=split,
            target=target,
            device=device,
        )


@app.command("evaluate-maps")
def evaluate_maps_cmd(
    cohort: Annotated[
        Path, typer.Option("--cohort", help="Synthetic cohort from make-cohort (ground truth).")
    ],
    out: Annotated[
        Path,
        typer.Option("--out", help="Output stem: writes OUT.json, OUT.md and OUT_subjects.tsv."),
    ],
    manifest: ManifestOption = None,
    maps: Annotated[
        list[str] | None,
        typer.Option(
            "--maps",
            help="METHOD=FOLDER or METHOD=TEMPLATE with {subject} (sub-X), {label} (X), "
            "{method}; repeat per method (after the --manifest methods).",
        ),
    ] = None,
    subjects: Annotated[
        str,
        typer.Option(
            "--subjects",
            help="all, a split.tsv (its --split-name rows), a file of ids, or comma-separated ids.",
        ),
    ] = "all",
    split_name: Annotated[
        str, typer.Option("--split-name", help="Which split of a split.tsv to evaluate.")
    ] = "test",
    regions: RegionLabelsOption = None,
    topk: Annotated[
        str, typer.Option("--topk", help="Top-k percentages for the in-region fractions.")
    ] = "1,5",
    label_column: Annotated[
        str, typer.Option("--label-column", help="participants.tsv column with the diagnosis.")
    ] = "diagnosis",
    positive_class: Annotated[
        str, typer.Option("--positive-class", help="Diagnosis value of diseased subjects.")
    ] = "disease",
    derivatives: DerivativesOption = "dlmuse",
) -> None:
    """Score attribution maps against the planted ground truth (NCC, top-k % in regions).

    The methods come from the stages' maps manifests (--manifest) and/or --maps.
    """
    from neuroexplain.evaluate import (
        evaluate_maps,
        markdown_table,
        parse_subjects,
        write_evaluation,
    )
    from neuroexplain.io.atomic import output_group
    from neuroexplain.io.paths import check_outputs
    from neuroexplain.provenance import provenance

    stem = out.with_suffix("") if out.suffix in (".json", ".md", ".tsv") else out
    names = (".json", ".md", "_subjects.tsv")
    check_outputs((stem.with_name(stem.name + n), "file", "--out") for n in names)
    spec, _ = parse_maps_sources(manifest, maps)
    try:
        ks = [float(k) for k in topk.split(",") if k.strip()]
    except ValueError as exc:
        raise InputError("--topk", f"expected comma-separated percentages, got {topk!r}") from exc
    if not ks or any(not 0 < k <= 100 for k in ks):
        raise InputError("--topk", f"expected percentages in (0, 100], got {topk!r}")
    region_list = parse_int_list(regions, "--regions") if regions else None
    subs = parse_subjects(subjects, split=split_name)
    df = evaluate_maps(
        cohort,
        spec,
        subs,
        regions=region_list,
        topk=ks,
        label_column=label_column,
        positive_class=positive_class,
        derivatives=derivatives,
    )
    params = {
        "cohort": str(cohort),
        "manifests": [str(m) for m in manifest or []],
        "maps": {m: str(v) for m, v in spec.items()},
        "subjects": subjects,
        "split_name": split_name,
        "regions": region_list,
        "topk": ks,
        "label_column": label_column,
        "positive_class": positive_class,
        "derivatives": derivatives,
    }
    with output_group():  # all three files or none
        write_evaluation(df, out, provenance=provenance(params, command="evaluate-maps"))
    typer.echo(markdown_table(df), nl=False)


@app.command("region-reliance")
def region_reliance_cmd(
    preproc: PreprocOption,
    checkpoint: CheckpointOption,
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Output stem: writes <stem>.tsv, <stem>_summary.tsv and <stem>.json."
        ),
    ],
    regions: RegionsOption = None,
    subjects: SubjectsOption = "test",
    split: SplitOption = None,
    dilate: Annotated[
        int, typer.Option("--dilate", help="Dilation of each region mask in model voxels.")
    ] = 2,
    target: TargetOption = 0,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """How much of the classifier's decision each region carries (paired cohorts).

    For each control/diseased pair of one anatomy, the diseased region is put into the control
    (and the control's into the diseased image); the logit change over the pair's logit gap is
    the region's share of the decision.
    """
    from neuroexplain.evaluate.reliance import run_region_reliance
    from neuroexplain.io.atomic import output_group
    from neuroexplain.io.paths import check_outputs

    stem = out.with_suffix("") if out.suffix in (".json", ".tsv") else out
    names = (".tsv", "_summary.tsv", ".json")
    check_outputs((stem.with_name(stem.name + n), "file", "--out") for n in names)
    set_threads(threads)
    with output_group():  # all or nothing
        run_region_reliance(
            preproc,
            checkpoint,
            out,
            parse_regions(regions),
            subjects=subjects,
            split=split,
            dilate=dilate,
            target=target,
            device=device,
        )
