"""Every stage's settings and their defaults, defined once.

Each stage's options are one dataclass here; each field carries its default and a one-line help.
Everything else is derived from or checked against these classes:

- the library: the stage functions take these dataclasses (``train_classifier(..., config)``),
  so a library call without options uses these defaults;
- the command line: :func:`neuroexplain.cli._settings.settings_options` turns the fields into
  the command's options (name, default, help), so ``neuroexplain <command> --help`` lists them;
- the workflow: ``workflow/schemas/config.schema.yaml`` (section ``SECTION``, key ``config`` of
  the field's metadata, by default the field's name), ``config/config.yaml`` and the tables of
  ``config/README.md`` hold the same defaults; ``tests/test_settings.py`` fails when they drift.

The module imports nothing heavy (no torch), so ``--help`` stays instant.

Field metadata (see :func:`setting`): ``help`` (one line), ``flag`` (the CLI option, default
``--<name-with-dashes>``), ``config`` (the workflow config key in ``SECTION``; ``None`` = not a
workflow option), ``cli`` (``False`` = library-only, no command-line option).

Example:
    >>> from neuroexplain.settings import ClassifierConfig
    >>> ClassifierConfig().batch_size
    8
    >>> ClassifierConfig(lr=-1)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    neuroexplain.errors.InputError: --lr: expected a positive learning rate, got -1
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

from neuroexplain.errors import InputError

__all__ = [
    "HINGES",
    "LR_SCHEDULES",
    "SETTINGS",
    "SMOOTHNESS",
    "ClassifierConfig",
    "SimulatorConfig",
    "SimulatorTrainConfig",
    "field_default",
    "setting",
]

LR_SCHEDULES = ("constant", "cosine")
HINGES = ("relative", "flip")
SMOOTHNESS = ("bending", "diffusion")


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    config: str | bool | None = True,
    cli: bool = True,
) -> Any:
    """A dataclass field with its one-line help and where it appears outside the library.

    Args:
        default: the default (tuples for sequences, so the dataclass stays hashable-safe).
        help: one line, shown by ``--help`` and checked against nothing else.
        flag: command-line option name (default ``--<field-name-with-dashes>``).
        config: the workflow config key in the class's ``SECTION`` (``True``: the field's
            name; ``None`` / ``False``: not a workflow option).
        cli: ``False`` for a library-only field (no command-line option).
    """
    meta = {"help": help, "flag": flag, "config": config, "cli": cli}
    return field(default=default, metadata=meta)


def _check(checks: dict[str, tuple[bool, str]], cfg: Any) -> None:
    """Raise :class:`InputError` naming the option of the first failed check.

    Args:
        checks: ``field name -> (ok, what was expected)``.
        cfg: the settings instance (for the received value and the option name).
    """
    for name, (ok, expected) in checks.items():
        if not ok:
            raise InputError(cli_flag(type(cfg), name), f"{expected}, got {getattr(cfg, name)!r}")


def cli_flag(cls: type, name: str) -> str:
    """The command-line option of field ``name`` of settings class ``cls``."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def config_key(f: Any) -> str | None:
    """The workflow config key of a settings field (``None``: not a workflow option)."""
    key = f.metadata.get("config", True)
    if key is True:
        return f.name
    return key or None


def field_default(f: Any) -> Any:
    """The default value of a dataclass field (``default_factory`` called)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise ValueError(f"field {f.name} has no default")


class _Settings:
    """Shared helpers of the settings dataclasses."""

    SECTION: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


# ------------------------------------------------------------------------------ classifier


@dataclass
class ClassifierConfig(_Settings):
    """Options of :func:`neuroexplain.train.train_classifier` (recorded in checkpoint and metrics).

    The defaults are the workflow's measured ones (README, "classifier").

    Attributes:
        arch: network name (see :data:`neuroexplain.models.ARCHITECTURES`).
        epochs: maximum number of epochs.
        batch_size: training batch size.
        lr: AdamW learning rate (the peak rate with ``lr_schedule="cosine"``).
        lr_schedule: ``"constant"`` or ``"cosine"``: a linear warm-up from ``lr / 10`` over the
            first epoch, then cosine decay to 0 at the last of ``epochs`` (per step).
        weight_decay: AdamW weight decay.
        dropout: dropout before the logit layer (``"small"`` only).
        seed: seed of the split, the initial weights, batch order and augmentation.
        val_fraction: fraction of subjects (per class) in the validation split.
        test_fraction: fraction of subjects (per class) in the test split.
        patience: stop after this many epochs without a better monitored value (0 = never).
        monitor: ``"loss"`` (validation loss, lower is better) or ``"auc"`` (validation AUC,
            higher is better, ties broken by the loss) selects the best epoch.
        augment: augmentation of training volumes (random shifts / affine, intensity, flips).
            Rotations interpolate (blur) and scaling changes apparent volumes, the very signal of
            atrophy-like effects; the default scaling (3 %) is smaller than the demo's effects
            and teaches indifference to global head size.
        flip: also random left-right flips (only sound for left-right symmetric effects).
        rotate_deg: maximum rotation (degrees, each axis) of the random affine.
        translate_vox: maximum translation (voxels) of the random affine.
        scale: maximum relative scaling of the random affine.
        elastic_vox: largest smooth random displacement (voxels) added to the affine.
        intensity: maximum relative intensity scaling and shift.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        channels_last: use the channels-last 3D memory layout (faster convolutions on CPU).
        standardize: standardise every voxel by the training images' voxel-wise mean and
            standard deviation (``(x - mean) / (sd + standardize_eps)``; with ``flip``, the
            flipped images count too). Stored in the model (``input_norm``), so every method
            that loads the checkpoint sees the same function of the ingested image.
        standardize_eps: added to the voxel standard deviation (image units) so that constant
            background is not amplified.
    """

    SECTION: ClassVar[str] = "classifier"

    arch: str = setting(
        "small", "Network: small (the simulator paper's CNN), densenet121 or resnet18."
    )
    epochs: int = setting(40, "Maximum number of epochs.")
    batch_size: int = setting(8, "Training batch size.")
    lr: float = setting(3e-3, "AdamW (peak) learning rate.")
    lr_schedule: str = setting(
        "constant", "constant, or cosine (1-epoch warm-up, cosine decay to 0 at --epochs)."
    )
    weight_decay: float = setting(1e-4, "AdamW weight decay.", config=None)
    dropout: float = setting(0.0, "Dropout before the logit layer (small network).")
    seed: int = setting(0, "Seed of the split, weights, batch order and augmentation.", config=None)
    val_fraction: float = setting(0.2, "Validation fraction (stratified).")
    test_fraction: float = setting(0.2, "Test fraction (stratified).")
    patience: int = setting(10, "Early stopping patience in epochs (0 = off).")
    monitor: str = setting(
        "loss", "Best epoch / early stopping on val 'loss' or 'auc'.", config=None
    )
    augment: bool = setting(True, "Random affine + intensity augmentation of training volumes.")
    flip: bool = setting(True, "Random left-right flips (only for symmetric effects).")
    rotate_deg: float = setting(0.0, "Augmentation: max rotation (degrees).", config=None)
    translate_vox: float = setting(1.0, "Augmentation: max shift (voxels).")
    scale: float = setting(0.03, "Augmentation: max scaling per axis (changes volumes!).")
    elastic_vox: float = setting(0.0, "Augmentation: largest smooth random displacement (voxels).")
    intensity: float = setting(0.0, "Augmentation: max intensity scale / shift.")
    device: str = setting("auto", "auto (CUDA when present, else CPU), cpu or cuda.", config=None)
    channels_last: bool = setting(
        True, "Channels-last 3D memory layout (faster on CPU).", config=None, cli=False
    )
    standardize: bool = setting(
        True, "Voxel-wise standardisation by the training images (stored in the model)."
    )
    standardize_eps: float = setting(
        0.05, "Added to the voxel sd before standardising (image units).", config=None
    )

    def __post_init__(self) -> None:
        both = self.val_fraction + self.test_fraction
        _check(
            {
                "epochs": (self.epochs >= 1, "expected >= 1"),
                "batch_size": (self.batch_size >= 1, "expected >= 1"),
                "lr": (self.lr > 0, "expected a positive learning rate"),
                "val_fraction": (0 < self.val_fraction < 1, "expected a fraction in (0, 1)"),
                "test_fraction": (
                    0 <= self.test_fraction < 1 and both < 1,
                    "expected a fraction in [0, 1)"
                    if not 0 <= self.test_fraction < 1
                    else f"with --val-fraction {self.val_fraction!r} the two together must be "
                    "below 1 (some subjects must be left for training)",
                ),
                "patience": (self.patience >= 0, "expected >= 0"),
                "dropout": (0 <= self.dropout < 1, "expected a probability in [0, 1)"),
                "monitor": (self.monitor in ("loss", "auc"), "expected loss or auc"),
                "lr_schedule": (
                    self.lr_schedule in LR_SCHEDULES,
                    f"expected one of {LR_SCHEDULES}",
                ),
                "standardize_eps": (self.standardize_eps > 0, "expected > 0"),
                "elastic_vox": (self.elastic_vox >= 0, "expected >= 0"),
            },
            self,
        )


# ------------------------------------------------------------------------------- simulator


@dataclass
class SimulatorTrainConfig(_Settings):
    """Options of :func:`neuroexplain.simulator.train_simulator` (recorded in the checkpoint).

    Attributes:
        epochs: passes over the training subjects.
        batch_size: subjects per step.
        lr: Adam learning rate.
        margin: hinge margin on the logit.
        hinge: ``"flip"`` (the decision flipped by at least ``margin``) or ``"relative"`` (a
            logit shift of at least ``margin``, the paper's loss); with ``"relative"``, subjects
            whose ``|l(x)|`` exceeds ``margin`` are not pushed across the decision boundary.
        w_cls: weight of the logit hinge.
        w_cycle: weight of the cycle-consistency L1 loss.
        w_smooth: weight of the smoothness loss of the fields (on the toy problem of the tests,
            weights below ~10 let the field fold, 30 does not).
        w_magnitude: weight of the mean squared displacement (voxels²): bending energy does not
            see translations, and a classifier that depends on where the head sits can be
            flipped by moving the whole head; ``0.1`` makes such shifts cost far more than the
            hinge while a local one-voxel deformation costs ~1e-3.
        w_volume: weight of the mean absolute log Jacobian determinant (a sparse prior on
            volume change): it costs a brain-wide scaling in every voxel and a focal change only
            where it happens, so the simulator prefers the focal explanation. ``0`` with
            ``smoothness="bending"`` is the paper's loss. On the demo (classifier with scale
            augmentation) 100 gave disease-map NCC 0.57 and every planted region with the right
            sign; 30 got the thalamus wrong, 400 was fainter (README).
        smoothness: ``"diffusion"`` (MONAI ``DiffusionLoss``, squared first derivatives) or
            ``"bending"`` (``BendingEnergyLoss``, the paper's).
        seed: seed of the weights and the batch order.
        checkpoint_every: steps between checkpoints (0 = only at the end).
        max_steps: stop after this many steps in total (``None``: ``epochs`` full epochs).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    SECTION: ClassVar[str] = "simulator"

    epochs: int = setting(10, "Passes over the training subjects.")
    batch_size: int = setting(4, "Subjects per step.")
    lr: float = setting(1e-3, "Adam learning rate.")
    margin: float = setting(1.0, "Hinge margin on the logit.")
    hinge: str = setting(
        "flip", "flip: decision flipped by >= margin; relative: logit moves by >= margin."
    )
    w_cls: float = setting(1.0, "Weight of the logit hinge.")
    w_cycle: float = setting(1.0, "Weight of the cycle loss.")
    w_smooth: float = setting(30.0, "Weight of the field smoothness loss.")
    w_magnitude: float = setting(0.1, "Weight of the mean squared displacement.")
    w_volume: float = setting(
        100.0, "Weight of the mean |log Jacobian| of the field (prefers focal volume change)."
    )
    smoothness: str = setting("diffusion", "diffusion (DiffusionLoss) or bending.")
    seed: int = setting(0, "Seed of the weights and batch order.", config=None)
    checkpoint_every: int = setting(50, "Steps between resumable checkpoints.", config=None)
    max_steps: int | None = setting(None, "Stop after this many steps in total.")
    device: str = setting("auto", "auto (CUDA when present, else CPU), cpu or cuda.", config=None)

    def __post_init__(self) -> None:
        _check(
            {
                "hinge": (self.hinge in HINGES, f"expected one of {HINGES}"),
                "smoothness": (self.smoothness in SMOOTHNESS, f"expected one of {SMOOTHNESS}"),
                "epochs": (int(self.epochs) >= 1, "expected >= 1"),
                "batch_size": (int(self.batch_size) >= 1, "expected >= 1"),
                "lr": (self.lr > 0, "expected a positive learning rate"),
                **{
                    n: (getattr(self, n) >= 0, "expected >= 0")
                    for n in ("margin", "w_cls", "w_cycle", "w_smooth", "w_magnitude", "w_volume")
                },
                "max_steps": (self.max_steps is None or self.max_steps >= 1, "expected >= 1"),
            },
            self,
        )

    def run_key(self) -> dict[str, Any]:
        """The options that change the trajectory (a resumed run must match them)."""
        d = self.to_dict()
        # the batch order of an epoch does not depend on the number of epochs, so a run may be
        # resumed with a longer schedule; where checkpoints go and the device do not matter
        for k in ("checkpoint_every", "device", "epochs", "max_steps"):
            d.pop(k)
        return d


@dataclass
class SimulatorConfig(_Settings):
    """Architecture of :class:`neuroexplain.simulator.SimulatorNet` (stored in checkpoints).

    Attributes:
        in_channels: image channels.
        channels: feature channels of the U-Net levels; level ``i`` works at
            ``1 / (downsample * 2**i)`` of the input resolution.
        num_experts: experts ``K`` per conditional convolution.
        downsample: the image is average-pooled by this factor before the U-Net and the field,
            predicted at that resolution, is trilinearly up-sampled back (disease deformations are
            smooth; ``2`` makes CPU training several times faster than ``1``).
        antisymmetric: multiply the head's output by ``-o``, so that at initialisation (when the
            routing barely depends on ``o``) injecting and removing are inverse deformations
            (``u(x, -1) ~ -u(x, +1)``); the conditional routing lets the two directions differ
            as training proceeds.
        diffeomorphic: the head predicts a stationary velocity field integrated by scaling and
            squaring (MONAI ``DVF2DDF``) instead of the displacement itself.
        integration_steps: scaling-and-squaring steps in diffeomorphic mode.
        init_std: standard deviation of the head's expert kernels at initialisation (near zero,
            so the initial warp is ~identity).
        negative_slope: LeakyReLU slope.
    """

    SECTION: ClassVar[str] = "simulator"

    in_channels: int = setting(1, "Image channels.", config=None, cli=False)
    channels: tuple[int, ...] = setting(
        (8, 16, 32, 32), "U-Net channels per level, comma-separated."
    )
    num_experts: int = setting(
        4, "Expert kernels per conditional convolution.", flag="--experts", config="experts"
    )
    downsample: int = setting(2, "Run the U-Net at 1/N resolution (field up-sampled).")
    antisymmetric: bool = setting(
        True, "Inject and remove start as inverse deformations.", config=None, cli=False
    )
    diffeomorphic: bool = setting(
        False, "Predict a velocity field integrated by scaling and squaring (DVF2DDF)."
    )
    integration_steps: int = setting(7, "Scaling-and-squaring steps.", config=None, cli=False)
    init_std: float = setting(1e-5, "Initial sd of the head's kernels.", config=None, cli=False)
    negative_slope: float = setting(0.2, "LeakyReLU slope.", config=None, cli=False)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        _check(
            {
                "channels": (
                    len(self.channels) >= 2 and min(self.channels) >= 1,
                    "expected at least 2 positive integers",
                ),
                "downsample": (self.downsample >= 1, "expected >= 1"),
                "num_experts": (self.num_experts >= 1, "expected >= 1"),
            },
            self,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d


#: every settings class, for the CLI, the config schema check and the docs
SETTINGS: tuple[type, ...] = (ClassifierConfig, SimulatorTrainConfig, SimulatorConfig)
