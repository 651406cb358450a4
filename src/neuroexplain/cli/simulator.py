"""``neuroexplain train-simulator`` and ``neuroexplain simulate`` (simulator-network stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroexplain.cli import app
from neuroexplain.cli._common import (
    DeviceOption,
    PrecisionOption,
    PreprocOption,
    RegionsOption,
    SplitOption,
    SubjectsOption,
    ThreadsOption,
    parse_regions,
    set_threads,
)
from neuroexplain.cli._settings import settings_options
from neuroexplain.errors import InputError
from neuroexplain.settings import SimulatorConfig, SimulatorTrainConfig


@app.command("train-simulator")
@settings_options(config=SimulatorTrainConfig, net_config=SimulatorConfig)
def train_simulator_cmd(
    preproc: PreprocOption,
    classifier: Annotated[
        Path, typer.Option("--classifier", help="model.pt from train-classifier (kept frozen).")
    ],
    logits: Annotated[
        Path,
        typer.Option("--logits", help="logits.tsv from train-classifier (split, y, logit)."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Simulator checkpoint to write, e.g. results/simulator/model.pt."
        ),
    ],
    config: SimulatorTrainConfig,
    net_config: SimulatorConfig,
    split: Annotated[
        Path | None,
        typer.Option("--split", help="split.tsv (default: the split column of --logits)."),
    ] = None,
    all_subjects: Annotated[
        bool,
        typer.Option(
            "--all-subjects/--correct-only",
            help="Train on all train-split subjects, not only the correctly classified ones.",
        ),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option("--resume/--no-resume", help="Continue an interrupted run from its state."),
    ] = True,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    precision: PrecisionOption = "fp32",
) -> None:
    """Train the conditional warping simulator against the frozen classifier.

    Before training, the memory of one step is estimated; a run that would not fit in the
    available memory stops with an error (NEUROEXPLAIN_MEMORY_LIMIT_MB sets the limit in MiB).
    """
    from neuroexplain.errors import NeuroexplainError
    from neuroexplain.io.atomic import output_group
    from neuroexplain.io.paths import check_output
    from neuroexplain.simulator import run_train_simulator
    from neuroexplain.simulator.train import format_rate

    check_output(out, "file")
    check_output(out.parent / "train_log.tsv", "file", option="--out")
    check_output(out.parent / "train_summary.json", "file", option="--out")
    set_threads(threads)
    # all or nothing on a full disk (model, train_log.tsv and this run's resume state); an
    # interruption or a crash keeps the state for --resume
    with output_group(out.parent, only_on=NeuroexplainError):
        summary = run_train_simulator(
            preproc,
            classifier,
            logits,
            out,
            config=config,
            net_config=net_config,
            split=split,
            correct_only=not all_subjects,
            resume=resume,
        )
    obj = summary.get("objective", {})
    val = obj.get("validation") or {}
    sel = obj.get("selected") or {}

    def pct(key: str, d: dict | None = None) -> str:
        return format_rate((obj if d is None else d).get(key))

    on = "validation" if obj.get("measured_on") == "val" else "training"
    held_out = (
        f"{pct('flipped_inject', val)} inject / {pct('flipped_remove', val)} remove of the "
        f"{summary.get('n_validation', 0)} validation subjects, "
        if val
        else "(no validation subjects) "
    )
    typer.echo(
        f"trained on {summary['n_subjects']} subjects, {summary['steps']} steps "
        f"({obj.get('epochs')} passes) in {summary['seconds']:.0f} s; kept pass "
        f"{sel.get('pass')}: flipped {held_out}{pct('flipped_inject')} / "
        f"{pct('flipped_remove')} of the training subjects (target reached "
        f"{pct('reached_inject')} / {pct('reached_remove')}); objective "
        f"{'met' if obj.get('met') else 'NOT met'} on the {on} subjects -> {out}"
    )


@app.command("simulate")
def simulate_cmd(
    preproc: PreprocOption,
    simulator: Annotated[Path, typer.Option("--simulator", help="model.pt from train-simulator.")],
    classifier: Annotated[
        Path, typer.Option("--classifier", help="model.pt from train-classifier.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder, e.g. results/simulator.")],
    subjects: SubjectsOption = "test",
    split: SplitOption = None,
    regions: RegionsOption = None,
    all_labels: Annotated[
        bool,
        typer.Option("--all-labels/--no-all-labels", help="Also tabulate every dseg label."),
    ] = False,
    map_direction: Annotated[
        str,
        typer.Option(
            "--map-direction",
            help="Which simulation gives each subject's disease map: auto (remove for diseased, "
            "inject for healthy subjects), label, prediction, inject or remove.",
        ),
    ] = "auto",
    images: Annotated[
        bool,
        typer.Option(
            "--images/--no-images", help="Write simulated T1w images and displacement fields."
        ),
    ] = True,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Subjects per pass.")] = 4,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Simulated images, displacement fields, Jacobian disease maps and region tables."""
    from neuroexplain.io.atomic import output_group
    from neuroexplain.io.paths import check_output
    from neuroexplain.simulator import run_simulate

    check_output(out, "folder")
    set_threads(threads)
    if batch_size < 1:
        raise InputError("--batch-size", f"expected >= 1, got {batch_size}")
    with output_group(out):  # all or nothing
        summary = run_simulate(
            preproc,
            simulator,
            classifier,
            out,
            subjects=subjects,
            split=split,
            regions=parse_regions(regions),
            all_labels=all_labels,
            map_direction=map_direction,
            write_images=images,
            batch_size=batch_size,
            device=device,
            writers=threads,
        )
    fr = summary["flip_rate"]
    typer.echo(
        f"{summary['n_subjects']} subjects: flip rate inject {fr['inject']}, remove "
        f"{fr['remove']}; cycle error {summary['cycle_error']['inject_remove']:.4f} -> {out}"
    )
    agreement = summary["gradient_agreement"]
    if agreement["ok"] is False:
        typer.echo(f"warning: {summary['warnings'][-1]}", err=True)
