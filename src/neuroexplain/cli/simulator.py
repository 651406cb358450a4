"""``neuroexplain train-simulator`` and ``neuroexplain simulate`` (simulator-network stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroexplain.cli import app
from neuroexplain.cli._common import DeviceOption, ThreadsOption, set_threads
from neuroexplain.errors import InputError


@app.command("train-simulator")
def train_simulator_cmd(
    preproc: Annotated[Path, typer.Option("--preproc", help="preproc.pt from ingest-mri.")],
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
    epochs: Annotated[
        int, typer.Option("--epochs", help="Passes over the training subjects.")
    ] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Subjects per step.")] = 4,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 1e-3,
    experts: Annotated[
        int, typer.Option("--experts", help="Expert kernels per conditional convolution.")
    ] = 4,
    channels: Annotated[
        str, typer.Option("--channels", help="U-Net channels per level, comma-separated.")
    ] = "8,16,32,32",
    downsample: Annotated[
        int,
        typer.Option("--downsample", help="Run the U-Net at 1/N resolution (field up-sampled)."),
    ] = 2,
    margin: Annotated[float, typer.Option("--margin", help="Hinge margin on the logit.")] = 1.0,
    hinge: Annotated[
        str,
        typer.Option(
            "--hinge",
            help="flip: decision flipped by >= margin; relative: logit moves by >= margin.",
        ),
    ] = "flip",
    w_cls: Annotated[float, typer.Option("--w-cls", help="Weight of the logit hinge.")] = 1.0,
    w_cycle: Annotated[float, typer.Option("--w-cycle", help="Weight of the cycle loss.")] = 1.0,
    w_smooth: Annotated[
        float, typer.Option("--w-smooth", help="Weight of the field smoothness loss.")
    ] = 30.0,
    w_magnitude: Annotated[
        float, typer.Option("--w-magnitude", help="Weight of the mean squared displacement.")
    ] = 0.1,
    w_volume: Annotated[
        float,
        typer.Option(
            "--w-volume",
            help="Weight of the mean |log Jacobian| of the field (prefers focal volume change).",
        ),
    ] = 100.0,
    smoothness: Annotated[
        str, typer.Option("--smoothness", help="diffusion (DiffusionLoss) or bending.")
    ] = "diffusion",
    diffeomorphic: Annotated[
        bool,
        typer.Option(
            "--diffeomorphic/--no-diffeomorphic",
            help="Predict a velocity field integrated by scaling and squaring (DVF2DDF).",
        ),
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the weights and batch order.")] = 0,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps between resumable checkpoints.")
    ] = 50,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Stop after this many steps in total.")
    ] = None,
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
) -> None:
    """Train the conditional warping simulator against the frozen classifier.

    Before training, the memory of one step is estimated; a run that would not fit in the
    available memory stops with an error (NEUROEXPLAIN_MEMORY_LIMIT_MB sets the limit in MiB).
    """
    from neuroexplain.cli._common import parse_int_list, set_threads
    from neuroexplain.simulator import SimulatorConfig, TrainConfig, run_train_simulator

    set_threads(threads)
    chans = tuple(parse_int_list(channels, "--channels"))
    if len(chans) < 2 or min(chans) < 1:
        raise InputError("--channels", f"expected at least 2 positive integers, got {channels!r}")
    if experts < 1:
        raise InputError("--experts", f"expected >= 1, got {experts}")
    if downsample < 1:
        raise InputError("--downsample", f"expected >= 1, got {downsample}")
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        margin=margin,
        hinge=hinge,
        w_cls=w_cls,
        w_cycle=w_cycle,
        w_smooth=w_smooth,
        w_magnitude=w_magnitude,
        w_volume=w_volume,
        smoothness=smoothness,
        seed=seed,
        checkpoint_every=checkpoint_every,
        max_steps=max_steps,
        device=device,
    )
    ncfg = SimulatorConfig(
        channels=chans, num_experts=experts, downsample=downsample, diffeomorphic=diffeomorphic
    )
    summary = run_train_simulator(
        preproc,
        classifier,
        logits,
        out,
        config=cfg,
        net_config=ncfg,
        split=split,
        correct_only=not all_subjects,
        resume=resume,
    )
    flip = summary.get("final", {}).get("flipped", float("nan"))
    typer.echo(
        f"trained on {summary['n_subjects']} subjects, {summary['steps']} steps in "
        f"{summary['seconds']:.0f} s (final training flip rate {flip:.2f}) -> {out}"
    )


@app.command("simulate")
def simulate_cmd(
    preproc: Annotated[Path, typer.Option("--preproc", help="preproc.pt from ingest-mri.")],
    simulator: Annotated[Path, typer.Option("--simulator", help="model.pt from train-simulator.")],
    classifier: Annotated[
        Path, typer.Option("--classifier", help="model.pt from train-classifier.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder, e.g. results/simulator.")],
    subjects: Annotated[
        str, typer.Option("--subjects", help="test, val, train, all, or comma-separated ids.")
    ] = "test",
    split: Annotated[
        Path | None,
        typer.Option("--split", help="split.tsv (default: next to the classifier checkpoint)."),
    ] = None,
    regions: Annotated[
        list[str] | None,
        typer.Option(
            "--regions",
            help="Region for the tables as NAME=LABEL[,LABEL] of the dseg; repeat per region.",
        ),
    ] = None,
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
    from neuroexplain.simulator import parse_regions, run_simulate

    set_threads(threads)
    if batch_size < 1:
        raise InputError("--batch-size", f"expected >= 1, got {batch_size}")
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
    )
    fr = summary["flip_rate"]
    typer.echo(
        f"{summary['n_subjects']} subjects: flip rate inject {fr['inject']}, remove "
        f"{fr['remove']}; cycle error {summary['cycle_error']['inject_remove']:.4f} -> {out}"
    )
