"""``neuroexplain tcav``, ``sacv``, ``xnn-train`` and ``xnn-explain`` (concept stage of the MRI
classifier)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroexplain.cli import app
from neuroexplain.cli._common import (
    CheckpointOption,
    CohortOption,
    DerivativesOption,
    DeviceOption,
    PreprocOption,
    RegionLabelsOption,
    SplitOption,
    SubjectsOption,
    TargetOption,
    ThreadsOption,
    parse_int_list,
    set_threads,
)
from neuroexplain.cli._settings import settings_options
from neuroexplain.settings import (
    SACVConfig,
    SRAEConfig,
    TCAVConfig,
    XNNExplainConfig,
    XNNTrainConfig,
)

#: options of both TCAV and SACV
ConceptsOption = Annotated[
    Path, typer.Option("--concepts", help="Concept configuration (YAML/JSON).")
]
ParticipantsOption = Annotated[
    Path | None,
    typer.Option("--participants", help="participants.tsv with selector columns."),
]
CacheOption = Annotated[
    Path | None, typer.Option("--cache", help="CAV cache file (default: OUT/cavs.pt).")
]
OutOption = Annotated[Path, typer.Option("--out", help="Output folder, e.g. results/concepts3d.")]


@app.command("tcav")
@settings_options(config=TCAVConfig)
def tcav_cmd(
    preproc: PreprocOption,
    checkpoint: CheckpointOption,
    concepts: ConceptsOption,
    out: OutOption,
    config: TCAVConfig,
    split: SplitOption = None,
    participants: ParticipantsOption = None,
    class_split: Annotated[
        str, typer.Option("--class-split", help="Split(s) whose class subjects are tested.")
    ] = "test",
    target_class: Annotated[
        int, typer.Option("--target-class", help="Class to explain: 1 (positive) or 0.")
    ] = 1,
    target: TargetOption = 0,
    cache: CacheOption = None,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """TCAV scores of user-defined concepts with random-vs-random t-tests (Kim et al. 2018)."""
    from neuroexplain.concepts3d.run import run_tcav
    from neuroexplain.io.atomic import output_group
    from neuroexplain.io.paths import check_output

    check_output(out, "folder")
    set_threads(threads)
    with output_group(out):  # all or nothing
        res = run_tcav(
            preproc,
            checkpoint,
            concepts,
            out,
            config,
            split=split,
            participants=participants,
            class_split=class_split,
            target_class=target_class,
            target=target,
            device=device,
            cache=cache,
        )
    for r in res["results"]:
        typer.echo(
            f"{r['concept']} @ {r['layer']}: TCAV {r['tcav_score']:.2f} vs random "
            f"{r['random_score']:.2f}"
            + (f", effect {r['effect']:.3g} (z {r['effect_z']:.2f})" if "effect" in r else "")
            + f", p = {r['p_value']:.3g}, CAV accuracy {r['cav_accuracy']:.2f}: {r['verdict']}"
        )
    typer.echo(f"-> {out / 'tcav.json'}")


@app.command("sacv")
@settings_options(config=SACVConfig)
def sacv_cmd(
    preproc: PreprocOption,
    checkpoint: CheckpointOption,
    concepts: ConceptsOption,
    out: OutOption,
    config: SACVConfig,
    concept: Annotated[
        str | None, typer.Option("--concept", help="Concept name (default: the first).")
    ] = None,
    subjects: SubjectsOption = "test",
    split: SplitOption = None,
    participants: ParticipantsOption = None,
    target_class: Annotated[
        int, typer.Option("--target-class", help="Class whose logit is explained (1 or 0).")
    ] = 1,
    target: TargetOption = 0,
    desc_label: Annotated[
        str,
        typer.Option("--desc-label", help="Suffix of the desc entity (desc-sacvrelevance<X>)."),
    ] = "",
    cohort: CohortOption = None,
    regions: RegionLabelsOption = None,
    derivatives: DerivativesOption = "dlmuse",
    cache: CacheOption = None,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Spatial concept vector: native-space relevance / contribution maps (Wang et al. 2022)."""
    from neuroexplain.concepts3d.run import run_sacv
    from neuroexplain.io.atomic import output_group
    from neuroexplain.io.paths import check_output

    check_output(out, "folder")
    set_threads(threads)
    with output_group(out):  # all or nothing
        res = run_sacv(
            preproc,
            checkpoint,
            concepts,
            out,
            config,
            concept=concept,
            split=split,
            participants=participants,
            subjects=subjects,
            target_class=target_class,
            target=target,
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
@settings_options(config=SRAEConfig, train_config=XNNTrainConfig)
def xnn_train_cmd(
    preproc: PreprocOption,
    checkpoint: CheckpointOption,
    out: Annotated[Path, typer.Option("--out", help="Output folder, e.g. results/xnn.")],
    config: SRAEConfig,
    train_config: XNNTrainConfig,
    split: SplitOption = None,
    train_split: Annotated[
        str, typer.Option("--train-split", help="Split(s) the SRAE is fitted on.")
    ] = "train",
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Train an SRAE explanation space of a classifier layer (Qi, Khorram & Li 2017)."""
    from neuroexplain.io.atomic import output_group
    from neuroexplain.io.paths import check_output
    from neuroexplain.xnn.run import run_xnn_train

    check_output(out, "folder")
    set_threads(threads)
    with output_group(out):  # all or nothing
        res = run_xnn_train(
            preproc,
            checkpoint,
            out,
            config,
            train_config=train_config,
            split=split,
            train_split=train_split,
            device=device,
        )
    for s, m in res["metrics"].items():
        typer.echo(
            f"{s}: R2 {m['r2']:.3f}, agreement {m['decision_agreement']:.3f}, "
            f"sparsity {m['sparsity']:.2f}, |cos| {m['orthogonality']:.3f}"
        )
    typer.echo(f"-> {out / 'srae.pt'}")


@app.command("xnn-explain")
@settings_options(config=XNNExplainConfig)
def xnn_explain_cmd(
    preproc: PreprocOption,
    checkpoint: CheckpointOption,
    srae: Annotated[Path, typer.Option("--srae", help="srae.pt from xnn-train.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder, e.g. results/xnn.")],
    config: XNNExplainConfig,
    subjects: SubjectsOption = "test",
    split: SplitOption = None,
    cohort: CohortOption = None,
    regions: RegionLabelsOption = None,
    derivatives: DerivativesOption = "dlmuse",
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """XNN feature maps (native space), significant features and explanation-space metrics."""
    from neuroexplain.io.atomic import output_group
    from neuroexplain.io.paths import check_output
    from neuroexplain.xnn.run import run_xnn_explain

    check_output(out, "folder")
    set_threads(threads)
    with output_group(out):  # all or nothing
        res = run_xnn_explain(
            preproc,
            checkpoint,
            srae,
            out,
            config,
            split=split,
            subjects=subjects,
            cohort=cohort,
            regions=parse_int_list(regions, "--regions") if regions else None,
            derivatives=derivatives,
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
