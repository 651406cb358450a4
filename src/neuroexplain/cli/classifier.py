"""``neuroexplain train-classifier``, ``saliency`` and ``evaluate-maps`` (MRI classifier stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroexplain.cli import app
from neuroexplain.cli._common import DeviceOption, ThreadsOption, parse_int_list, set_threads
from neuroexplain.cli._settings import settings_options
from neuroexplain.errors import InputError
from neuroexplain.settings import ClassifierConfig


@app.command("train-classifier")
@settings_options(config=ClassifierConfig)
def train_classifier_cmd(
    preproc: Annotated[Path, typer.Option("--preproc", help="preproc.pt from ingest-mri.")],
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
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume",
            help="Continue an interrupted run from OUT/train_state.pt (same options and data).",
        ),
    ] = True,
) -> None:
    """Train the 3D MRI classifier with a stratified subject split and early stopping."""
    from neuroexplain.models import ARCHITECTURES
    from neuroexplain.train import train_classifier

    set_threads(threads)
    if config.arch not in ARCHITECTURES:
        raise InputError("--arch", f"expected one of {sorted(ARCHITECTURES)}, got {config.arch!r}")
    metrics = train_classifier(preproc, out, config, split=split, resume=resume)
    test = metrics.get("test", {})
    typer.echo(
        f"test AUC {test.get('auc')}, balanced accuracy {test.get('balanced_accuracy')} "
        f"(best epoch {metrics['best_epoch']}, {metrics['train_seconds']:.0f} s) -> {out}"
    )


@app.command("saliency")
def saliency_cmd(
    preproc: Annotated[Path, typer.Option("--preproc", help="preproc.pt from ingest-mri.")],
    checkpoint: Annotated[
        Path, typer.Option("--checkpoint", help="model.pt from train-classifier.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder, e.g. results/saliency.")],
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            help="Comma-separated: gradient, gradxinput, smoothgrad, ig, gradcam, occlusion.",
        ),
    ] = "gradient,gradxinput,smoothgrad,ig,gradcam,occlusion",
    layer: Annotated[
        str | None,
        typer.Option("--layer", help="Grad-CAM layer (default: features.3 for the small network)."),
    ] = None,
    subjects: Annotated[
        str, typer.Option("--subjects", help="test, val, train, all, or comma-separated ids.")
    ] = "test",
    split: Annotated[
        Path | None, typer.Option("--split", help="split.tsv (default: next to the checkpoint).")
    ] = None,
    target: Annotated[
        int, typer.Option("--target", help="Logit index to explain (0 = positive class).")
    ] = 0,
    ig_steps: Annotated[
        int, typer.Option("--ig-steps", help="Integrated gradients: interpolation steps.")
    ] = 16,
    smoothgrad_samples: Annotated[
        int, typer.Option("--smoothgrad-samples", help="SmoothGrad: noisy samples.")
    ] = 10,
    smoothgrad_noise: Annotated[
        float,
        typer.Option(
            "--smoothgrad-noise", help="SmoothGrad: noise sd as a fraction of the intensity range."
        ),
    ] = 0.1,
    occlusion_mask: Annotated[
        int, typer.Option("--occlusion-mask", help="Occlusion: patch size in model voxels.")
    ] = 16,
    occlusion_overlap: Annotated[
        float, typer.Option("--occlusion-overlap", help="Occlusion: patch overlap in [0, 1).")
    ] = 0.25,
    occlusion_mode: Annotated[
        str,
        typer.Option(
            "--occlusion-mode", help="Occlusion fill: gaussian, mean_patch, mean_img or a number."
        ),
    ] = "gaussian",
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            help="Internal batch size (IG steps, SmoothGrad samples, occlusion patches).",
        ),
    ] = 8,
    seed: Annotated[int, typer.Option("--seed", help="SmoothGrad noise seed.")] = 0,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Baseline attribution maps of the classifier logit, written in each subject's native space."""
    from neuroexplain.attribution.saliency import run_saliency

    set_threads(threads)
    if not 0 <= occlusion_overlap < 1:
        raise InputError(
            "--occlusion-overlap", f"expected a value in [0, 1), got {occlusion_overlap}"
        )
    mode: str | float = occlusion_mode
    if occlusion_mode not in ("gaussian", "mean_patch", "mean_img"):
        try:
            mode = float(occlusion_mode)
        except ValueError as exc:
            raise InputError(
                "--occlusion-mode",
                f"expected gaussian, mean_patch, mean_img or a number, got {occlusion_mode!r}",
            ) from exc
    params = {
        "smoothgrad": {
            "nt_samples": smoothgrad_samples,
            "noise_level": smoothgrad_noise,
            "batch_size": batch_size,
            "seed": seed,
        },
        "ig": {"n_steps": ig_steps, "batch_size": batch_size},
        "occlusion": {
            "mask_size": occlusion_mask,
            "overlap": occlusion_overlap,
            "mode": mode,
            "batch_size": batch_size,
        },
    }
    run_saliency(
        preproc,
        checkpoint,
        out,
        methods=[m for m in methods.replace(" ", "").split(",") if m],
        subjects=subjects,
        split=split,
        layer=layer,
        target=target,
        params=params,
        device=device,
    )


@app.command("evaluate-maps")
def evaluate_maps_cmd(
    cohort: Annotated[
        Path, typer.Option("--cohort", help="Synthetic cohort from make-cohort (ground truth).")
    ],
    maps: Annotated[
        list[str],
        typer.Option(
            "--maps",
            help="METHOD=FOLDER or METHOD=TEMPLATE with {subject} (sub-X), {label} (X), "
            "{method}; repeat per method.",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", help="Output stem: writes OUT.json, OUT.md and OUT_subjects.tsv."),
    ],
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
    regions: Annotated[
        str | None,
        typer.Option(
            "--regions",
            help="Planted regions as dseg labels, e.g. 47,48,51,52 "
            "(default: the cohort's planted masks).",
        ),
    ] = None,
    topk: Annotated[
        str, typer.Option("--topk", help="Top-k percentages for the in-region fractions.")
    ] = "1,5",
    label_column: Annotated[
        str, typer.Option("--label-column", help="participants.tsv column with the diagnosis.")
    ] = "diagnosis",
    positive_class: Annotated[
        str, typer.Option("--positive-class", help="Diagnosis value of diseased subjects.")
    ] = "disease",
    derivatives: Annotated[
        str, typer.Option("--derivatives", help="Cohort derivatives folder with the dseg.")
    ] = "dlmuse",
) -> None:
    """Score attribution maps against the planted ground truth (NCC, top-k % in regions)."""
    from neuroexplain.evaluate import (
        evaluate_maps,
        markdown_table,
        parse_subjects,
        write_evaluation,
    )
    from neuroexplain.provenance import provenance

    spec: dict[str, str] = {}
    for item in maps:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError("--maps", f"expected METHOD=PATH, got {item!r}")
        if name in spec:
            raise InputError("--maps", f"method {name!r} given twice")
        spec[name] = path
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
        "maps": spec,
        "subjects": subjects,
        "split_name": split_name,
        "regions": region_list,
        "topk": ks,
        "label_column": label_column,
        "positive_class": positive_class,
        "derivatives": derivatives,
    }
    write_evaluation(df, out, provenance=provenance(params, command="evaluate-maps"))
    typer.echo(markdown_table(df), nl=False)


@app.command("region-reliance")
def region_reliance_cmd(
    preproc: Annotated[Path, typer.Option("--preproc", help="preproc.pt from ingest-mri.")],
    checkpoint: Annotated[
        Path, typer.Option("--checkpoint", help="model.pt from train-classifier.")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Output stem: writes <stem>.tsv, <stem>_summary.tsv and <stem>.json."
        ),
    ],
    regions: Annotated[
        list[str] | None,
        typer.Option(
            "--regions", help="Region as NAME=LABEL[,LABEL] of the dseg; repeat per region."
        ),
    ] = None,
    subjects: Annotated[
        str, typer.Option("--subjects", help="test, val, train, all, or comma-separated ids.")
    ] = "test",
    split: Annotated[
        Path | None, typer.Option("--split", help="split.tsv (default: next to the checkpoint).")
    ] = None,
    dilate: Annotated[
        int, typer.Option("--dilate", help="Dilation of each region mask in model voxels.")
    ] = 2,
    target: Annotated[int, typer.Option("--target", help="Logit index (0 = positive class).")] = 0,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """How much of the classifier's decision each region carries (paired cohorts).

    For each control/diseased pair of one anatomy, the diseased region is put into the control
    (and the control's into the diseased image); the logit change over the pair's logit gap is
    the region's share of the decision.
    """
    from neuroexplain.evaluate.reliance import run_region_reliance
    from neuroexplain.simulator import parse_regions

    set_threads(threads)
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
