"""``neuroexplain tcav``, ``sacv``, ``xnn-train`` and ``xnn-explain`` (concept stage of the MRI
classifier)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroexplain.cli import app
from neuroexplain.cli._common import DeviceOption, ThreadsOption, parse_int_list, set_threads
from neuroexplain.errors import InputError

_PREPROC = typer.Option("--preproc", help="preproc.pt from ingest-mri.")
_CHECKPOINT = typer.Option("--checkpoint", help="Classifier model.pt from train-classifier.")
_SPLIT = typer.Option("--split", help="split.tsv (default: next to the checkpoint).")


def _check_classifier(value: str) -> str:
    if value not in ("logistic", "sgd"):
        raise InputError("--classifier", f"expected logistic or sgd, got {value!r}")
    return value


@app.command("tcav")
def tcav_cmd(
    preproc: Annotated[Path, _PREPROC],
    checkpoint: Annotated[Path, _CHECKPOINT],
    concepts: Annotated[
        Path, typer.Option("--concepts", help="Concept configuration (YAML/JSON).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder, e.g. results/concepts3d.")],
    layers: Annotated[
        str | None,
        typer.Option("--layers", help="Comma-separated layer names (default: features.3)."),
    ] = None,
    split: Annotated[Path | None, _SPLIT] = None,
    participants: Annotated[
        Path | None,
        typer.Option("--participants", help="participants.tsv with selector columns."),
    ] = None,
    class_split: Annotated[
        str, typer.Option("--class-split", help="Split(s) whose class subjects are tested.")
    ] = "test",
    target_class: Annotated[
        int, typer.Option("--target-class", help="Class to explain: 1 (positive) or 0.")
    ] = 1,
    target: Annotated[int, typer.Option("--target", help="Logit index of the network.")] = 0,
    n_random: Annotated[
        int | None,
        typer.Option("--n-random", help="Random sets per concept (default: config, 10)."),
    ] = None,
    random_size: Annotated[
        int | None, typer.Option("--random-size", help="Examples per random set.")
    ] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Significance level.")] = 0.01,
    min_accuracy: Annotated[
        float,
        typer.Option(
            "--min-accuracy",
            help="Mean held-out CAV accuracy a concept needs to be significant (0 = off).",
        ),
    ] = 0.6,
    classifier: Annotated[
        str, typer.Option("--classifier", help="CAV classifier: logistic or sgd.")
    ] = "logistic",
    c: Annotated[float, typer.Option("--C", help="Inverse regularisation of the CAV.")] = 1.0,
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="Held-out fraction for CAV accuracy.")
    ] = 0.33,
    cache: Annotated[
        Path | None, typer.Option("--cache", help="CAV cache file (default: OUT/cavs.pt).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Volumes per pass.")] = 8,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """TCAV scores of user-defined concepts with random-vs-random t-tests (Kim et al. 2018)."""
    from neuroexplain.concepts3d.run import run_tcav

    set_threads(threads)
    if not 0 < alpha < 1:
        raise InputError("--alpha", f"expected a value in (0, 1), got {alpha}")
    res = run_tcav(
        preproc,
        checkpoint,
        concepts,
        out,
        layers=layers,
        split=split,
        participants=participants,
        class_split=class_split,
        target_class=target_class,
        target=target,
        n_random=n_random,
        random_size=random_size,
        alpha=alpha,
        min_accuracy=min_accuracy,
        seed=seed,
        classifier=_check_classifier(classifier),
        C=c,
        test_fraction=test_fraction,
        batch_size=batch_size,
        device=device,
        cache=cache,
    )
    for r in res["results"]:
        typer.echo(
            f"{r['concept']} @ {r['layer']}: TCAV {r['tcav_score']:.2f} vs random "
            f"{r['random_score']:.2f}, p = {r['p_value']:.3g}, CAV accuracy "
            f"{r['cav_accuracy']:.2f}{' (significant)' if r['significant'] else ''}"
        )
    typer.echo(f"-> {out / 'tcav.json'}")


@app.command("sacv")
def sacv_cmd(
    preproc: Annotated[Path, _PREPROC],
    checkpoint: Annotated[Path, _CHECKPOINT],
    concepts: Annotated[
        Path, typer.Option("--concepts", help="Concept configuration (YAML/JSON).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder, e.g. results/concepts3d.")],
    concept: Annotated[
        str | None, typer.Option("--concept", help="Concept name (default: the first).")
    ] = None,
    layer: Annotated[
        str | None, typer.Option("--layer", help="Spatial layer (default: features.3).")
    ] = None,
    subjects: Annotated[
        str, typer.Option("--subjects", help="test, val, train, all, or comma-separated ids.")
    ] = "test",
    split: Annotated[Path | None, _SPLIT] = None,
    participants: Annotated[
        Path | None,
        typer.Option("--participants", help="participants.tsv with selector columns."),
    ] = None,
    target_class: Annotated[
        int, typer.Option("--target-class", help="Class whose logit is explained (1 or 0).")
    ] = 1,
    target: Annotated[int, typer.Option("--target", help="Logit index of the network.")] = 0,
    transform: Annotated[
        str,
        typer.Option(
            "--transform",
            help="Training examples: none (whole images, region positions), mask or box.",
        ),
    ] = "none",
    negatives: Annotated[
        str,
        typer.Option(
            "--negatives",
            help="Random positions: brain (dseg > 0), region (same region) or all.",
        ),
    ] = "brain",
    relevance: Annotated[
        str,
        typer.Option(
            "--relevance",
            help="Relevance map: positive (<v,a>+b/|w|, clipped at 0), signed or raw (<v,a>).",
        ),
    ] = "positive",
    min_overlap: Annotated[
        float,
        typer.Option("--min-overlap", help="Region fraction of a layer cell to count as inside."),
    ] = 0.2,
    max_samples: Annotated[
        int, typer.Option("--max-samples", help="Most training positions.")
    ] = 50000,
    classifier: Annotated[
        str, typer.Option("--classifier", help="SACV classifier: logistic or sgd.")
    ] = "logistic",
    c: Annotated[float, typer.Option("--C", help="Inverse regularisation of the SACV.")] = 1.0,
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="Held-out fraction of volumes.")
    ] = 0.33,
    desc_label: Annotated[
        str,
        typer.Option("--desc-label", help="Suffix of the desc entity (desc-sacvrelevance<X>)."),
    ] = "",
    cohort: Annotated[
        Path | None,
        typer.Option("--cohort", help="Synthetic cohort: score the maps with the harness."),
    ] = None,
    regions: Annotated[
        str | None,
        typer.Option("--regions", help="Harness regions as dseg labels (default: planted masks)."),
    ] = None,
    derivatives: Annotated[
        str, typer.Option("--derivatives", help="Cohort derivatives folder with the dseg.")
    ] = "dlmuse",
    cache: Annotated[
        Path | None, typer.Option("--cache", help="CAV cache file (default: OUT/cavs.pt).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Volumes per pass.")] = 4,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Spatial concept vector: native-space relevance / contribution maps (Wang et al. 2022)."""
    from neuroexplain.concepts3d.run import run_sacv

    set_threads(threads)
    res = run_sacv(
        preproc,
        checkpoint,
        concepts,
        out,
        concept=concept,
        layer=layer,
        split=split,
        participants=participants,
        subjects=subjects,
        target_class=target_class,
        target=target,
        transform=transform,
        negatives=negatives,
        relevance=relevance,
        min_overlap=min_overlap,
        max_samples=max_samples,
        seed=seed,
        classifier=_check_classifier(classifier),
        C=c,
        test_fraction=test_fraction,
        batch_size=batch_size,
        device=device,
        cache=cache,
        desc_label=desc_label,
        cohort=cohort,
        regions=parse_int_list(regions, "--regions") if regions else None,
        derivatives=derivatives,
    )
    typer.echo(
        f"SACV {res['concept']} @ {res['layer']}: held-out accuracy {res['sacv_accuracy']:.3f}, "
        f"{res['n_subjects']} subjects -> {out}"
    )
    for m, ev in (res.get("evaluation") or {}).items():
        typer.echo(
            f"  {m}: top5 in regions {ev.get('top5_in_regions', float('nan')):.3f}, "
            f"NCC |map| {ev.get('ncc_abs', float('nan')):.3f}"
        )


@app.command("xnn-train")
def xnn_train_cmd(
    preproc: Annotated[Path, _PREPROC],
    checkpoint: Annotated[Path, _CHECKPOINT],
    out: Annotated[Path, typer.Option("--out", help="Output folder, e.g. results/xnn.")],
    layer: Annotated[
        str | None,
        typer.Option("--layer", help="Layer (default: the input of the last dense layer)."),
    ] = None,
    pool: Annotated[
        str,
        typer.Option("--pool", help="Pooling of spatial layers: auto, none, avg, max, flatten."),
    ] = "auto",
    split: Annotated[Path | None, _SPLIT] = None,
    train_split: Annotated[
        str, typer.Option("--train-split", help="Split(s) the SRAE is fitted on.")
    ] = "train",
    n_features: Annotated[
        int, typer.Option("--n-features", "-k", help="Explanation features k.")
    ] = 5,
    hidden: Annotated[
        int, typer.Option("--hidden", help="Hidden width of encoder/decoder (0 = linear).")
    ] = 0,
    alpha_pred: Annotated[
        float, typer.Option("--alpha-pred", help="Weight of the faithfulness loss.")
    ] = 1.0,
    alpha_rec: Annotated[
        float, typer.Option("--alpha-rec", help="Weight of the sparse reconstruction loss.")
    ] = 0.1,
    alpha_pt: Annotated[
        float, typer.Option("--alpha-pt", help="Weight of the pull-away term.")
    ] = 0.1,
    q: Annotated[float, typer.Option("--q", help="Sparse reconstruction sensitivity q.")] = 1.0,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 1e-2,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="Adam weight decay.")
    ] = 1e-4,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs.")] = 2000,
    coverage: Annotated[
        float, typer.Option("--coverage", help="Logit fraction significant features cover.")
    ] = 0.9,
    max_retries: Annotated[
        int, typer.Option("--max-retries", help="Re-weighting retries when < 2 features carry.")
    ] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Volumes per pass.")] = 8,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Train an SRAE explanation space of a classifier layer (Qi, Khorram & Li 2017)."""
    from neuroexplain.xnn.run import run_xnn_train
    from neuroexplain.xnn.srae import SRAEConfig

    set_threads(threads)
    cfg = SRAEConfig(
        n_features=n_features,
        hidden=hidden,
        alpha_pred=alpha_pred,
        alpha_rec=alpha_rec,
        alpha_pt=alpha_pt,
        q=q,
        lr=lr,
        weight_decay=weight_decay,
        epochs=epochs,
        seed=seed,
        coverage=coverage,
        max_retries=max_retries,
    )
    res = run_xnn_train(
        preproc,
        checkpoint,
        out,
        layer=layer,
        pool=pool,
        split=split,
        train_split=train_split,
        config=cfg,
        batch_size=batch_size,
        device=device,
    )
    for s, m in res["metrics"].items():
        typer.echo(
            f"{s}: R2 {m['r2']:.3f}, agreement {m['decision_agreement']:.3f}, "
            f"sparsity {m['sparsity']:.2f}, |cos| {m['orthogonality']:.3f}"
        )
    typer.echo(f"-> {out / 'srae.pt'}")


@app.command("xnn-explain")
def xnn_explain_cmd(
    preproc: Annotated[Path, _PREPROC],
    checkpoint: Annotated[Path, _CHECKPOINT],
    srae: Annotated[Path, typer.Option("--srae", help="srae.pt from xnn-train.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder, e.g. results/xnn.")],
    subjects: Annotated[
        str, typer.Option("--subjects", help="test, val, train, all, or comma-separated ids.")
    ] = "test",
    split: Annotated[Path | None, _SPLIT] = None,
    method: Annotated[
        str, typer.Option("--method", help="Feature attribution: ig or gradxinput.")
    ] = "gradxinput",
    ig_steps: Annotated[int, typer.Option("--ig-steps", help="IG interpolation steps.")] = 16,
    coverage: Annotated[
        float | None,
        typer.Option("--coverage", help="Logit fraction significant features cover."),
    ] = None,
    cohort: Annotated[
        Path | None,
        typer.Option("--cohort", help="Synthetic cohort: score the maps with the harness."),
    ] = None,
    regions: Annotated[
        str | None,
        typer.Option("--regions", help="Harness regions as dseg labels (default: planted masks)."),
    ] = None,
    derivatives: Annotated[
        str, typer.Option("--derivatives", help="Cohort derivatives folder with the dseg.")
    ] = "dlmuse",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Volumes per pass.")] = 8,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """XNN feature maps (native space), significant features and explanation-space metrics."""
    from neuroexplain.xnn.run import run_xnn_explain

    set_threads(threads)
    if method not in ("ig", "gradxinput"):
        raise InputError("--method", f"expected ig or gradxinput, got {method!r}")
    res = run_xnn_explain(
        preproc,
        checkpoint,
        srae,
        out,
        split=split,
        subjects=subjects,
        method=method,
        n_steps=ig_steps,
        internal_batch_size=batch_size,
        coverage=coverage,
        cohort=cohort,
        regions=parse_int_list(regions, "--regions") if regions else None,
        derivatives=derivatives,
        batch_size=batch_size,
        device=device,
    )
    for s, m in res["metrics"].items():
        typer.echo(
            f"{s}: R2 {m['r2']:.3f}, RMSE {m['rmse']:.3f}, agreement "
            f"{m['decision_agreement']:.3f}, sparsity {m['sparsity']:.2f}"
        )
    if "best_feature" in res:
        b = res["best_feature"]
        typer.echo(f"best feature {b['feature']}: top5 in regions {b['top5_in_regions']:.3f}")
    typer.echo(f"-> {out / 'xnn_metrics.json'}")
