"""Every stage's settings and their defaults, defined once.

Each stage's options are one dataclass here; each field carries its default and a one-line help.
Everything else is derived from or checked against these classes:

- the library: the stage functions take these dataclasses (``train_classifier(..., config)``,
  ``run_saliency(..., config)``, ``make_cohort(..., config)``), keyword arguments replacing
  single fields (:meth:`resolve`: ``run_tcav(..., layers="features.0")``), so a library call
  without options uses these defaults;
- the command line: :func:`neuroexplain.cli._settings.settings_options` turns the fields into
  the command's options (name, default, help), so ``neuroexplain <command> --help`` lists them;
- the workflow: ``workflow/schemas/config.schema.yaml`` (section ``SECTION``, key ``config`` of
  the field's metadata, by default the field's name), ``config/config.yaml`` and the tables of
  ``config/README.md`` hold the same defaults; ``tests/test_settings.py`` fails when they drift.

The module imports nothing heavy (no torch), so ``--help`` stays instant.

Field metadata (see :func:`setting`): ``help`` (one line), ``flag`` (the CLI option, default
``--<name-with-dashes>``), ``config`` (the workflow config key in ``SECTION``; ``None`` = not a
workflow option), ``cli`` (``False`` = library-only, no command-line option), ``multiple`` (a
repeated option instead of a comma-separated list).

What a run is applied to (input files, which subjects, the explained logit, the device, worker
processes) is not a setting: those stay arguments of the functions and options of the commands
(shared ones declared once in :mod:`neuroexplain.cli._common`).

Example:
    >>> from neuroexplain.settings import ClassifierConfig
    >>> ClassifierConfig().batch_size
    8
    >>> ClassifierConfig(lr=-1)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    neuroexplain.errors.InputError: --lr: expected a positive learning rate, got -1
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

from neuroexplain.errors import InputError

__all__ = [
    "CAV_CLASSIFIERS",
    "HINGES",
    "LABEL_INTERPOLATIONS",
    "LR_SCHEDULES",
    "MAX_MAGNITUDE",
    "NORM_METHODS",
    "OBJECTIVE_SUBJECTS",
    "OCCLUSION_MODES",
    "PRECISIONS",
    "PRECISION_HELP",
    "SACV_NEGATIVES",
    "SACV_RELEVANCE",
    "SACV_TRANSFORMS",
    "SALIENCY_METHODS",
    "SETTINGS",
    "SMOOTHNESS",
    "ST_CONCEPT_METHODS",
    "ST_LIKELIHOODS",
    "ST_SALIENCY_METHODS",
    "TCAV_CORRECTIONS",
    "TCAV_TESTS",
    "XNN_METHODS",
    "XNN_POOLING",
    "ClassifierConfig",
    "CohortConfig",
    "MRIIngestConfig",
    "QualityConfig",
    "SACVConfig",
    "SRAEConfig",
    "STConceptsConfig",
    "SaliencyConfig",
    "SimulatorConfig",
    "SimulatorTrainConfig",
    "TCAVConfig",
    "XNNExplainConfig",
    "XNNTrainConfig",
    "cli_flag",
    "config_key",
    "config_value",
    "field_default",
    "setting",
]

LR_SCHEDULES = ("constant", "cosine")
#: when the final classifier is its ensemble with the linear reference
#: (``classifier.reference_ensemble``)
ENSEMBLE_RULES = ("always", "separated", "never")
#: which model the explanation stages explain (``classifier.explain``)
EXPLAINED_MODELS = ("trained", "final")
HINGES = ("relative", "flip", "target")
#: the subjects the simulator's objective is measured on: the validation split or training
OBJECTIVE_SUBJECTS = ("val", "train")
SMOOTHNESS = ("bending", "diffusion")
SALIENCY_METHODS = ("gradient", "gradxinput", "smoothgrad", "ig", "gradcam", "occlusion")
OCCLUSION_MODES = ("gaussian", "mean_patch", "mean_img")
CAV_CLASSIFIERS = ("logistic", "sgd")
#: tests of a concept's TCAV scores against the random-vs-random scores
TCAV_TESTS = ("permutation", "mannwhitney", "welch")
#: multiple-testing corrections over the concept x layer tests of one TCAV run
TCAV_CORRECTIONS = ("holm", "bonferroni", "bh", "none")
SACV_TRANSFORMS = ("mask", "box", "none")
SACV_NEGATIVES = ("brain", "region", "all")
SACV_RELEVANCE = ("positive", "signed", "raw")
XNN_POOLING = ("auto", "none", "avg", "max", "flatten")
XNN_METHODS = ("ig", "gradxinput")
ST_LIKELIHOODS = ("nb", "gaussian")
ST_CONCEPT_METHODS = ("attribute", "probe")
ST_SALIENCY_METHODS = ("gradient", "grad_x_input", "smoothgrad", "ig")
LABEL_INTERPOLATIONS = ("linear", "nearest")
NORM_METHODS = ("percentile", "zscore", "none")
#: arithmetic of the training forward passes (workflow: compute.precision; see
#: :func:`neuroexplain.utils.resolve_precision`); fp32 by default until bf16's quality is measured
PRECISIONS = ("fp32", "bf16", "auto")
PRECISION_HELP = (
    "Training forward passes: fp32, bf16 (autocast) or auto (bf16 on CPUs with AVX-512 BF16 / "
    "AMX, CUDA AMP on a GPU, else fp32)."
)
#: largest fractional volume change a planted effect may have
MAX_MAGNITUDE = 0.9


def setting(
    default: Any,
    help: str,
    *,
    flag: str | tuple[str, ...] | None = None,
    config: str | bool | None = True,
    cli: bool = True,
    multiple: bool = False,
) -> Any:
    """A dataclass field with its one-line help and where it appears outside the library.

    Args:
        default: the default (tuples for sequences, so the dataclass stays hashable-safe).
        help: one line, shown by ``--help`` and checked against nothing else.
        flag: command-line option name (default ``--<field-name-with-dashes>``); a tuple adds
            aliases (``("--n-features", "-k")``); a boolean's ``"--on/--off"`` names both
            switches (default ``--<name>/--no-<name>``).
        config: the workflow config key in the class's ``SECTION`` (``True``: the field's
            name; ``None`` / ``False``: not a workflow option; ``"key[i]"``: item ``i`` of the
            list ``key``).
        cli: ``False`` for a library-only field (no command-line option).
        multiple: a tuple of integers given by repeating the option (``--shape 64 --shape 64
            --shape 64``) instead of one comma-separated value.
    """
    meta = {"help": help, "flag": flag, "config": config, "cli": cli, "multiple": multiple}
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


def _as_tuple(value: Any, item: type = str) -> tuple[Any, ...]:
    """A tuple from a tuple, list or comma-separated string (``None`` / ``""``: empty)."""
    if value is None:
        return ()
    if isinstance(value, int | float):
        return (item(value),)
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    return tuple(item(v) for v in value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def cli_flag(cls: type, name: str) -> str:
    """The command-line option of field ``name`` of settings class ``cls`` (its main name)."""
    f = next(f for f in fields(cls) if f.name == name)
    flag = f.metadata.get("flag")
    if isinstance(flag, tuple):
        flag = flag[0]
    return flag.split("/")[0] if flag else "--" + name.replace("_", "-")


def config_key(f: Any) -> str | None:
    """The workflow config key of a settings field (``None``: not a workflow option)."""
    key = f.metadata.get("config", True)
    if key is True:
        return f.name
    return key or None


def config_value(section: dict[str, Any], key: str) -> Any:
    """The value of config ``key`` (``"name"`` or ``"name[i]"``) in a config section.

    Raises:
        KeyError: the section has no such key.
    """
    name, _, index = key.partition("[")
    value = section[name]
    return value[int(index.rstrip("]"))] if index else value


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
    #: what :meth:`resolve` calls the options in its error (default: the class name)
    OPTIONS_NAME: ClassVar[str | None] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def resolve(cls, config: Any = None, /, **overrides: Any) -> Any:
        """``config`` (default: the defaults) with the fields in ``overrides`` replaced.

        Raises:
            TypeError: an override that is not a field of the class.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown {cls.OPTIONS_NAME or cls.__name__} options {unknown}")
        if config is None and not overrides:
            return cls()
        base = {n: getattr(config, n) for n in names} if config is not None else {}
        return cls(**{**base, **overrides})


# ------------------------------------------------------------------------------ classifier


@dataclass
class ClassifierConfig(_Settings):
    """Options of :func:`neuroexplain.classifier.train_classifier` (kept in checkpoint and metrics).

    The defaults are the workflow's measured ones (README, "classifier").

    Attributes:
        arch: network name (see :data:`neuroexplain.classifier.ARCHITECTURES`).
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
        precision: arithmetic of the training forward passes (:data:`PRECISIONS`): ``"fp32"``,
            ``"bf16"`` (``torch.autocast`` to bfloat16; loss and metrics stay float32) or
            ``"auto"`` (bf16 on CPUs with AVX-512 BF16 / AMX, CUDA AMP on a GPU, else fp32).
        channels_last: use the channels-last 3D memory layout (faster convolutions on CPU).
        standardize: standardise every voxel by the training images' voxel-wise mean and
            standard deviation (``(x - mean) / (sd + standardize_eps)``; with ``flip``, the
            flipped images count too). Stored in the model (``input_norm``), so every method
            that loads the checkpoint sees the same function of the ingested image.
        standardize_eps: added to the voxel standard deviation (image units) so that constant
            background is not amplified.
        reference_fallback: when the small network's best validation AUC is more than
            ``REFERENCE_MARGIN`` (0.03) below the linear reference's (an L2 logistic regression
            on the standardised voxels, same split), train it a second time with a
            :class:`~neuroexplain.classifier.network.LinearPath` (a logistic-regression term on
            the input) that starts as the linear reference itself (same features, ``C`` and
            coefficients; the CNN's logit layer starts at zero), so the second phase starts at
            the reference's validation AUC and leaves it only for a higher one; keep whichever
            model is better on validation. A CNN
            that learns the data's signal (the demo) never triggers it; one stuck at chance on
            small effects gets at least the linear signal. ``metrics.json`` records both phases.
        reference_ensemble: when the final model (small network) is the trained model combined
            with the linear reference: ``"always"``, ``"separated"`` (unless the paired bootstrap
            95 % interval of the validation AUC difference, trained model minus reference, lies
            above 0) or ``"never"``. The ensemble averages the two logits, each divided by its
            sd on the training subjects (:func:`neuroexplain.classifier.train.ensemble_weights`),
            in one module (the CNN with a linear path, no extra training). A validation split
            of a few dozen subjects, which also chose the network's epoch and the reference's
            ``C``, cannot tell the two apart reliably
            (``benchmarks/results/selection_analysis.md``).
        explain: the model the explanation stages (baseline maps, simulator, TCAV / SACV, XNN,
            region reliance) explain: ``"trained"`` (default) the trained model (the CNN, or the
            CNN with its trained linear path), also when the final model is its ensemble with
            the linear reference; ``"final"`` the final model. The ensemble predicts best, but
            its reference term is a voxel-wise logistic regression that a warp can push across
            the boundary through intensity edges anywhere in the brain: on the demo the
            simulator's disease map of the ensemble scored NCC -0.15 against the ground truth,
            that of the trained CNN 0.50 (``benchmarks/results/workflow_maps_*.md``). The
            checkpoint then holds both models; the quality gate judges the explained one.
    """

    SECTION: ClassVar[str] = "classifier"
    OPTIONS_NAME: ClassVar[str | None] = "training"  # train_classifier(**overrides)

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
    precision: str = setting("fp32", PRECISION_HELP, config=None)
    channels_last: bool = setting(
        True, "Channels-last 3D memory layout (faster on CPU).", config=None, cli=False
    )
    standardize: bool = setting(
        True, "Voxel-wise standardisation by the training images (stored in the model)."
    )
    standardize_eps: float = setting(
        0.05, "Added to the voxel sd before standardising (image units).", config=None
    )
    reference_fallback: bool = setting(
        True,
        "Small network below the linear reference's val AUC: train it again with a linear "
        "path initialised from a logistic regression; keep the better on validation.",
    )
    reference_ensemble: str = setting(
        "always",
        "Final model = trained model + linear reference ensemble: always, separated (unless "
        "validation shows the model above the reference) or never.",
    )
    explain: str = setting(
        "trained",
        "Model the explanation stages explain: trained (the network as trained, also when the "
        "final model is its ensemble with the linear reference) or final.",
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
                "precision": (self.precision in PRECISIONS, f"expected one of {PRECISIONS}"),
                "reference_ensemble": (
                    self.reference_ensemble in ENSEMBLE_RULES,
                    f"expected one of {ENSEMBLE_RULES}",
                ),
                "explain": (
                    self.explain in EXPLAINED_MODELS,
                    f"expected one of {EXPLAINED_MODELS}",
                ),
            },
            self,
        )


# --------------------------------------------------------------------------------- quality


@dataclass
class QualityConfig(_Settings):
    """Options of the classifier's quality gate (``neuroexplain check-classifier``).

    See :func:`neuroexplain.evaluate.quality.check_classifier_quality`.

    Attributes:
        min_auc: smallest acceptable AUC of the classifier on the test split (the validation
            split without a test split); ``0`` turns the gate off (both of its checks).
        allow_linear_reference: let the explanation stages run also when the explained model
            is the linear reference itself (``metrics.json`` ``trained_is_linear_reference``:
            the CNN with a linear path kept at its epoch 0, whose CNN path's logit layer is
            still zero). Off by default: such a model is a voxel-wise logistic regression, so
            Grad-CAM, TCAV / SACV and XNN read CNN features that do not reach the logit, and
            the simulator's disease maps of cnn+linear models kept at epoch 0 and 2 scored NCC
            -0.06 and -0.04 against the ground truth
            (``benchmarks/results/robustness_el2_cohorts.md``).
    """

    SECTION: ClassVar[str] = "quality"

    min_auc: float = setting(
        0.7, "Smallest acceptable test AUC (validation AUC without a test split); 0 = off."
    )
    allow_linear_reference: bool = setting(
        False,
        "Run the explanation stages also when the explained model is the linear reference "
        "itself (the CNN did not improve on it).",
    )

    def __post_init__(self) -> None:
        _check(
            {
                "min_auc": (
                    isinstance(self.min_auc, int | float)
                    and math.isfinite(self.min_auc)
                    and 0 <= self.min_auc <= 1,
                    "expected a number in [0, 1]",
                )
            },
            self,
        )


# ------------------------------------------------------------------------------- simulator


@dataclass
class SimulatorTrainConfig(_Settings):
    """Options of :func:`neuroexplain.simulator.train_simulator` (recorded in the checkpoint).

    Attributes:
        epochs: passes over the training subjects at least; training goes on, up to
            ``max_epochs``, while the objective is not met.
        max_epochs: passes at most (``objective`` unmet by then: a warning and
            ``objective_met: false`` in the checkpoint's summary).
        objective: fraction of the training subjects of *each* direction whose decision the
            simulation must flip in a pass for training to stop after ``epochs`` passes (``0``:
            exactly ``epochs`` passes). The target hinge keeps asking for the other class's
            median logit throughout; how many reach it is reported, not required (half of the
            other class itself lies beyond its median).
        objective_on: which subjects the objective is measured on. ``"val"`` (default): after
            every pass the simulator (eval mode, no gradient) warps the classifier split's
            validation subjects (labelled, correctly classified like the training subjects),
            training stops once the simulations flip ``objective`` of both directions there,
            and the pass with the best validation flip rate is kept, not the last one (on IXI
            age the training subjects were all flipped while 47 % of the test subjects were).
            Without validation subjects the training subjects are used (said in the log and
            the summary). ``"train"``: the training subjects of the pass, the last pass kept
            (the behaviour before; validation rates are still reported).
        w_cls_growth: after ``epochs`` passes, ``w_cls`` is multiplied by this factor at the end
            of every pass that leaves the objective unmet (at most ``10 * w_cls``): the hinge
            gains weight over the regularisers until the simulator does what it is asked
            (``1``: a fixed weight).
        batch_size: subjects per step.
        lr: Adam learning rate.
        margin: hinge margin on the logit (``"flip"``, ``"relative"``); with ``"target"``, the
            least distance past the decision boundary that the target keeps.
        hinge: ``"flip"`` (the default; measured on the demo: NCC 0.53 against 0.43 for
            ``"target"``, README) or ``"target"`` (the simulated logit must reach the other class's
            typical logit, the median logit of the training subjects of that class, and at least
            ``margin`` past the boundary; the hinge is divided by half the distance between the
            two medians, so its weight does not depend on the classifier's logit scale),
            ``"flip"`` (the decision flipped by at least ``margin``: the smallest change that
            crosses the boundary, a map of where the classifier is most sensitive) or
            ``"relative"`` (a logit shift of at least ``margin``, the paper's loss); with
            ``"relative"``, subjects whose ``|l(x)|`` exceeds ``margin`` are not pushed across
            the decision boundary.
        w_cls: weight of the logit hinge (initial weight with ``w_cls_growth``).
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
        precision: arithmetic of the forward passes of training (see
            :attr:`ClassifierConfig.precision`); the losses stay float32.
    """

    SECTION: ClassVar[str] = "simulator"

    epochs: int = setting(10, "Passes at least (more, up to max_epochs, until the objective).")
    max_epochs: int = setting(40, "Passes at most while the objective is not met.")
    objective: float = setting(
        0.95, "Fraction of each direction's subjects whose decision must flip (0 = off)."
    )
    objective_on: str = setting(
        "val",
        "val: objective on the validation subjects, best validation pass kept; train: on the "
        "training subjects, last pass kept.",
    )
    w_cls_growth: float = setting(
        1.5, "After epochs, w_cls grows by this factor per pass with the objective unmet."
    )
    batch_size: int = setting(4, "Subjects per step.")
    lr: float = setting(1e-3, "Adam learning rate.")
    margin: float = setting(1.0, "Hinge margin on the logit (least distance past the boundary).")
    hinge: str = setting(
        "flip",
        "target: other class's median logit; flip: decision flipped by >= margin; "
        "relative: logit moves by >= margin.",
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
    precision: str = setting("fp32", PRECISION_HELP, config=None)

    def __post_init__(self) -> None:
        _check(
            {
                "hinge": (self.hinge in HINGES, f"expected one of {HINGES}"),
                "smoothness": (self.smoothness in SMOOTHNESS, f"expected one of {SMOOTHNESS}"),
                "epochs": (int(self.epochs) >= 1, "expected >= 1"),
                "max_epochs": (int(self.max_epochs) >= 1, "expected >= 1"),
                "objective": (0 <= self.objective <= 1, "expected a fraction in [0, 1]"),
                "objective_on": (
                    self.objective_on in OBJECTIVE_SUBJECTS,
                    f"expected one of {OBJECTIVE_SUBJECTS}",
                ),
                "w_cls_growth": (self.w_cls_growth >= 1, "expected >= 1"),
                "batch_size": (int(self.batch_size) >= 1, "expected >= 1"),
                "lr": (self.lr > 0, "expected a positive learning rate"),
                **{
                    n: (getattr(self, n) >= 0, "expected >= 0")
                    for n in ("margin", "w_cls", "w_cycle", "w_smooth", "w_magnitude", "w_volume")
                },
                "max_steps": (self.max_steps is None or self.max_steps >= 1, "expected >= 1"),
                "precision": (self.precision in PRECISIONS, f"expected one of {PRECISIONS}"),
            },
            self,
        )

    def run_key(self) -> dict[str, Any]:
        """The options that change the trajectory (a resumed run must match them)."""
        d = self.to_dict()
        # the batch order of an epoch does not depend on the number of epochs, so a run may be
        # resumed with a longer schedule; where checkpoints go and the device do not matter
        for k in ("checkpoint_every", "device", "epochs", "max_epochs", "max_steps"):
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


# -------------------------------------------------------------------------------- saliency


@dataclass
class SaliencyConfig(_Settings):
    """Options of :func:`neuroexplain.attribution.saliency.run_saliency` (recorded in sidecars).

    The per-method parameters of :class:`neuroexplain.attribution.BaselineExplainer`
    (:data:`neuroexplain.attribution.DEFAULT_PARAMS`) are :meth:`method_params` of the defaults.

    Attributes:
        methods: names from :data:`SALIENCY_METHODS`.
        layer: Grad-CAM layer, a dotted name from ``model.named_modules()`` (``""``: the
            architecture's, ``features.3`` of the small network).
        ig_steps: Integrated Gradients interpolation steps.
        smoothgrad_samples: SmoothGrad noisy samples per subject.
        smoothgrad_noise: SmoothGrad noise sd as a fraction of each volume's intensity range
            (Smilkov et al.: 10-20 %).
        occlusion_mask: occlusion patch size in model voxels.
        occlusion_overlap: occlusion patch overlap in ``[0, 1)``.
        occlusion_mode: occluder as MONAI: ``"gaussian"``, ``"mean_patch"``, ``"mean_img"`` or a
            constant fill value.
        batch_size: internal batch size (IG steps, SmoothGrad samples, occlusion patches).
        seed: SmoothGrad noise seed.
    """

    SECTION: ClassVar[str] = "saliency"

    methods: tuple[str, ...] = setting(
        SALIENCY_METHODS,
        "Comma-separated: gradient, gradxinput, smoothgrad, ig, gradcam, occlusion.",
    )
    layer: str = setting(
        "", "Grad-CAM layer, a dotted name (default: features.3 for the small network)."
    )
    ig_steps: int = setting(16, "Integrated gradients: interpolation steps.")
    smoothgrad_samples: int = setting(10, "SmoothGrad: noisy samples.")
    smoothgrad_noise: float = setting(
        0.1, "SmoothGrad: noise sd as a fraction of the intensity range.", config=None
    )
    occlusion_mask: int = setting(16, "Occlusion: patch size in model voxels.")
    occlusion_overlap: float = setting(0.25, "Occlusion: patch overlap in [0, 1).")
    occlusion_mode: str = setting(
        "gaussian", "Occlusion fill: gaussian, mean_patch, mean_img or a number.", config=None
    )
    batch_size: int = setting(
        8, "Internal batch size (IG steps, SmoothGrad samples, occlusion patches).", config=None
    )
    seed: int = setting(0, "SmoothGrad noise seed.", config=None)

    def __post_init__(self) -> None:
        self.methods = _as_tuple(self.methods)
        self.layer = self.layer or ""
        self.occlusion_mode = str(self.occlusion_mode)
        bad = [m for m in self.methods if m not in SALIENCY_METHODS]
        _check(
            {
                "methods": (
                    bool(self.methods) and not bad,
                    f"expected methods from {list(SALIENCY_METHODS)} (unknown: {bad})",
                ),
                **{
                    n: (getattr(self, n) >= 1, "expected >= 1")
                    for n in ("ig_steps", "smoothgrad_samples", "occlusion_mask", "batch_size")
                },
                "smoothgrad_noise": (self.smoothgrad_noise >= 0, "expected >= 0"),
                "occlusion_overlap": (
                    0 <= self.occlusion_overlap < 1,
                    "expected a value in [0, 1)",
                ),
                "occlusion_mode": (
                    self.occlusion_mode in OCCLUSION_MODES or _is_number(self.occlusion_mode),
                    "expected gaussian, mean_patch, mean_img or a number",
                ),
            },
            self,
        )

    def method_params(self) -> dict[str, dict[str, Any]]:
        """``{method: parameters}`` of :class:`~neuroexplain.attribution.BaselineExplainer`."""
        mode = self.occlusion_mode
        return {
            "gradient": {"abs": False},
            "gradxinput": {},
            "smoothgrad": {
                "nt_samples": self.smoothgrad_samples,
                "noise_level": self.smoothgrad_noise,
                "batch_size": self.batch_size,
                "seed": self.seed,
            },
            "ig": {"n_steps": self.ig_steps, "baseline": 0.0, "batch_size": self.batch_size},
            "gradcam": {"layer": self.layer or None},
            "occlusion": {
                "mask_size": self.occlusion_mask,
                "overlap": self.occlusion_overlap,
                "mode": mode if mode in OCCLUSION_MODES else float(mode),
                "batch_size": self.batch_size,
            },
        }


# ------------------------------------------------------------------------------ concepts3d


@dataclass
class _CAVSettings(_Settings):
    """The linear classifier of a concept vector (shared by TCAV and SACV)."""

    classifier: str = setting("logistic", "CAV classifier: logistic or sgd.", config=None)
    C: float = setting(1.0, "Inverse regularisation of the CAV classifier.", config=None)
    test_fraction: float = setting(
        0.33, "Held-out fraction of volumes for the CAV accuracy.", config=None
    )
    seed: int = setting(0, "Seed of the random sets and CAV classifiers.", config=None)

    def _cav_checks(self) -> dict[str, tuple[bool, str]]:
        return {
            "classifier": (self.classifier in CAV_CLASSIFIERS, "expected logistic or sgd"),
            "C": (self.C > 0, "expected > 0"),
            "test_fraction": (0 <= self.test_fraction < 1, "expected a fraction in [0, 1)"),
            "batch_size": (getattr(self, "batch_size", 1) >= 1, "expected >= 1"),
        }


@dataclass
class TCAVConfig(_CAVSettings):
    """Options of :func:`neuroexplain.concepts3d.run.run_tcav` (Kim et al. 2018).

    Attributes:
        layers: dotted layer names (``()``: the architecture's concept layer).
        n_random: random sets per concept (``None``: ``n_random`` of the concept file, 50 by
            default).
        random_size: examples per random set (``None``: the concept file's, else
            ``min(concept, pool // 3)``).
        alpha: significance level of the (corrected) two-sided test against random-vs-random
            scores.
        test: the test behind the verdict. ``"permutation"`` (default): the concept's
            mean-difference effect on the class logit (all concept examples vs the whole random
            pool) against random relabellings of those examples, exact under exchangeability and
            free of random sets (:func:`neuroexplain.concepts3d.tcav.permutation_test`); the
            sign counts are tested and reported beside it. ``"mannwhitney"`` (two-sided
            Mann-Whitney U) or ``"welch"`` (two-sided Welch t-test, as Kim et al. 2018) of the
            sign counts over the random sets against random-vs-random sign counts: these treat
            the ``n_random`` CAVs of one concept as independent, which they are not (they share
            the concept's examples), so their verdict depends on the random sets drawn.
        n_permutations: relabellings of the permutation test.
        correction: multiple-testing correction over the concept x layer tests of the run:
            ``"holm"`` (Holm-Bonferroni, family-wise error), ``"bonferroni"``, ``"bh"``
            (Benjamini-Hochberg, false discovery rate) or ``"none"``.
        min_accuracy: (``mannwhitney`` / ``welch``) mean held-out CAV accuracy a concept needs
            for a verdict; below it the verdict is ``inconclusive`` (0 disables; the permutation
            test's own check is its direction test; see
            :func:`neuroexplain.concepts3d.tcav.summarize_experiment`).
        batch_size: volumes per forward / backward pass.
        classifier: ``"logistic"`` or ``"sgd"``.
        C: inverse regularisation strength of the CAV classifier.
        test_fraction: held-out fraction for the CAV accuracy.
        seed: seed of the random sets and CAV classifiers.
    """

    SECTION: ClassVar[str] = "concepts3d"

    layers: tuple[str, ...] = setting(
        (),
        "Comma-separated layer names (default: the concept layer, features.3).",
        config="tcav_layers",
    )
    n_random: int | None = setting(
        None, "Random sets per concept (default: the concept file's, else 50)."
    )
    random_size: int | None = setting(None, "Examples per random set.", config=None)
    alpha: float = setting(0.01, "Significance level (after the correction).")
    test: str = setting(
        "permutation",
        "Test behind the verdict: permutation (the concept's mean-difference effect on the logit "
        "against relabellings of concept and pool examples), or mannwhitney / welch (sign counts "
        "vs random-vs-random CAVs).",
        config=None,
    )
    n_permutations: int = setting(
        10000, "Relabellings of the permutation test (its Monte Carlo error).", config=None
    )
    correction: str = setting(
        "holm", "Multiple-testing correction over concepts x layers: holm, bonferroni, bh, none."
    )
    min_accuracy: float = setting(
        0.6, "Mean held-out CAV accuracy a concept needs for a verdict (0 = off)."
    )
    batch_size: int = setting(8, "Volumes per pass.", config=None)

    def __post_init__(self) -> None:
        self.layers = _as_tuple(self.layers)
        _check(
            {
                **self._cav_checks(),
                "n_random": (self.n_random is None or self.n_random >= 2, "expected >= 2"),
                "random_size": (
                    self.random_size is None or self.random_size >= 1,
                    "expected >= 1",
                ),
                "alpha": (0 < self.alpha < 1, "expected a value in (0, 1)"),
                "test": (self.test in TCAV_TESTS, f"expected one of {', '.join(TCAV_TESTS)}"),
                "n_permutations": (self.n_permutations >= 1, "expected >= 1"),
                "correction": (
                    self.correction in TCAV_CORRECTIONS,
                    f"expected one of {', '.join(TCAV_CORRECTIONS)}",
                ),
                "min_accuracy": (0 <= self.min_accuracy <= 1, "expected a value in [0, 1]"),
            },
            self,
        )


@dataclass
class SACVConfig(_CAVSettings):
    """Options of :func:`neuroexplain.concepts3d.run.run_sacv` (Wang et al. 2022).

    Attributes:
        layer: spatial layer (``""``: the architecture's concept layer).
        transform: training examples: ``"none"`` (whole images, positions restricted to the
            concept's region), ``"mask"`` or ``"box"`` (as TCAV).
        negatives: positions the SACV is contrasted with: ``"brain"`` (every position inside
            ``dseg > 0``), ``"region"`` (the concept's region in random subjects) or ``"all"``.
        relevance: relevance map: ``"positive"`` (distance from the SACV boundary along ``v``,
            negative part dropped), ``"signed"`` or ``"raw"`` (``<v, a(p)>``).
        min_overlap: region fraction of a layer cell for its position to count as inside.
        max_samples: most training positions.
        batch_size: volumes per pass.
        classifier: ``"logistic"`` or ``"sgd"``.
        C: inverse regularisation strength.
        test_fraction: held-out fraction of volumes for the accuracy.
        seed: seed of the random positions and the classifier.
    """

    SECTION: ClassVar[str] = "concepts3d"

    layer: str = setting(
        "", "Spatial layer (default: the concept layer, features.3).", config="sacv_layer"
    )
    transform: str = setting(
        "none",
        "Training examples: none (whole images, region positions), mask or box.",
        config="sacv_transform",
    )
    negatives: str = setting(
        "brain",
        "Random positions: brain (dseg > 0), region (same region) or all.",
        config="sacv_negatives",
    )
    relevance: str = setting(
        "positive",
        "Relevance map: positive (<v,a>+b/|w|, clipped at 0), signed or raw (<v,a>).",
        config="sacv_relevance",
    )
    min_overlap: float = setting(
        0.2, "Region fraction of a layer cell to count as inside.", config=None
    )
    max_samples: int = setting(50000, "Most training positions.", config=None)
    batch_size: int = setting(4, "Volumes per pass.", config=None)

    def __post_init__(self) -> None:
        self.layer = self.layer or ""
        _check(
            {
                **self._cav_checks(),
                "transform": (
                    self.transform in SACV_TRANSFORMS,
                    f"expected one of {SACV_TRANSFORMS}",
                ),
                "negatives": (
                    self.negatives in SACV_NEGATIVES,
                    f"expected one of {SACV_NEGATIVES}",
                ),
                "relevance": (
                    self.relevance in SACV_RELEVANCE,
                    f"expected one of {SACV_RELEVANCE}",
                ),
                "min_overlap": (0 <= self.min_overlap <= 1, "expected a fraction in [0, 1]"),
                "max_samples": (self.max_samples >= 2, "expected >= 2"),
            },
            self,
        )


# ------------------------------------------------------------------------------------- xnn


@dataclass
class SRAEConfig(_Settings):
    """Options of :func:`neuroexplain.xnn.srae.train_srae` (recorded in the SRAE checkpoint).

    Attributes:
        n_features: explanation features ``k``.
        hidden: hidden width of encoder / decoder (0 = linear).
        alpha_pred: weight of the faithfulness loss.
        alpha_rec: weight of the sparse reconstruction loss.
        alpha_pt: weight of the pull-away term.
        alpha_use: weight of the usage-balance term (features with less than a quarter of the
            even share of the logit contributions are penalised, dead ReLUs revived; 0 = off, as Qi
            et al., whose pull-away term lets redundant features drop out with a zero weight).
        q: sensitivity of the sparse reconstruction loss.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        epochs: training epochs.
        batch_size: samples per step (0 = full batch).
        seed: seed of the initial weights and batch order.
        coverage: fraction of the predicted logit the significant features must cover.
        min_features: retry (re-weighted) when fewer features than this carry the prediction.
        min_usage: a feature "carries the prediction" when significant for at least this
            fraction of the training samples.
        max_retries: re-weighting attempts (each multiplies ``alpha_pt`` by ``retry_factor`` and
            uses the next seed).
        retry_factor: multiplier of ``alpha_pt`` per retry.
    """

    SECTION: ClassVar[str] = "xnn"

    n_features: int = setting(5, "Explanation features k.", flag=("--n-features", "-k"))
    hidden: int = setting(0, "Hidden width of encoder/decoder (0 = linear).")
    alpha_pred: float = setting(1.0, "Weight of the faithfulness loss.", config=None)
    alpha_rec: float = setting(0.1, "Weight of the sparse reconstruction loss.", config=None)
    alpha_pt: float = setting(0.1, "Weight of the pull-away term.", config=None)
    alpha_use: float = setting(
        0.3, "Weight of the usage-balance term (0 = off: dead features possible).", config=None
    )
    q: float = setting(1.0, "Sparse reconstruction sensitivity q.", config=None)
    lr: float = setting(1e-2, "Adam learning rate.")
    weight_decay: float = setting(1e-4, "Adam weight decay.", config=None)
    epochs: int = setting(2000, "Training epochs.")
    batch_size: int = setting(0, "SRAE samples per step (0 = full batch).", config=None, cli=False)
    seed: int = setting(0, "Random seed.", config=None)
    coverage: float = setting(0.9, "Logit fraction significant features cover.")
    min_features: int = setting(
        2, "Fewest features that must carry the prediction.", config=None, cli=False
    )
    min_usage: float = setting(
        0.05, "Sample fraction a feature must be significant for.", config=None, cli=False
    )
    max_retries: int = setting(3, "Re-weighting retries when < 2 features carry.", config=None)
    retry_factor: float = setting(10.0, "Multiplier of alpha_pt per retry.", config=None, cli=False)

    def __post_init__(self) -> None:
        _check(
            {
                "n_features": (self.n_features >= 1, "expected >= 1"),
                "hidden": (self.hidden >= 0, "expected >= 0"),
                "alpha_pred": (self.alpha_pred >= 0, "expected >= 0"),
                "alpha_rec": (self.alpha_rec >= 0, "expected >= 0"),
                "alpha_pt": (self.alpha_pt >= 0, "expected >= 0"),
                "q": (self.q > 0, "expected > 0"),
                "lr": (self.lr > 0, "expected a positive learning rate"),
                "epochs": (self.epochs >= 1, "expected >= 1"),
                "batch_size": (self.batch_size >= 0, "expected >= 0"),
                "coverage": (0 < self.coverage <= 1, "expected a fraction in (0, 1]"),
                "max_retries": (self.max_retries >= 0, "expected >= 0"),
            },
            self,
        )


@dataclass
class XNNTrainConfig(_Settings):
    """Options of :func:`neuroexplain.xnn.run.run_xnn_train` besides the SRAE's.

    Attributes:
        layer: explained layer (``""``: the input of the last dense layer).
        pool: pooling of a spatial layer's activations (:data:`XNN_POOLING`).
        batch_size: volumes per forward pass for the activations.
    """

    SECTION: ClassVar[str] = "xnn"

    layer: str = setting("", "Layer (default: the input of the last dense layer).")
    pool: str = setting("auto", "Pooling of spatial layers: auto, none, avg, max, flatten.")
    batch_size: int = setting(8, "Volumes per pass.", config=None)

    def __post_init__(self) -> None:
        self.layer = self.layer or ""
        _check(
            {
                "pool": (self.pool in XNN_POOLING, f"expected one of {XNN_POOLING}"),
                "batch_size": (self.batch_size >= 1, "expected >= 1"),
            },
            self,
        )


@dataclass
class XNNExplainConfig(_Settings):
    """Options of :func:`neuroexplain.xnn.run.run_xnn_explain`.

    Attributes:
        method: feature attribution of the maps, ``"gradxinput"`` or ``"ig"``.
        ig_steps: Integrated Gradients interpolation steps.
        coverage: fraction of the logit the significant features cover (``None``: the SRAE's).
        batch_size: volumes per forward pass (and the IG internal batch size).
    """

    SECTION: ClassVar[str] = "xnn"

    method: str = setting("gradxinput", "Feature attribution: ig or gradxinput.")
    ig_steps: int = setting(16, "IG interpolation steps.")
    coverage: float | None = setting(
        None, "Logit fraction significant features cover (default: the SRAE's).", config=None
    )
    batch_size: int = setting(8, "Volumes per pass.", config=None)

    def __post_init__(self) -> None:
        _check(
            {
                "method": (self.method in XNN_METHODS, "expected ig or gradxinput"),
                "ig_steps": (self.ig_steps >= 1, "expected >= 1"),
                "coverage": (
                    self.coverage is None or 0 < self.coverage <= 1,
                    "expected a fraction in (0, 1]",
                ),
                "batch_size": (self.batch_size >= 1, "expected >= 1"),
            },
            self,
        )


# ---------------------------------------------------------------------------- st_concepts


@dataclass
class STConceptsConfig(_Settings):
    """Options of ``neuroexplain st-concepts`` (spot VAE, concept saliency, gene-as-image mode).

    The library functions it drives take the same defaults: :class:`neuroexplain.st.SpotVAE`
    (``n_latent``, ``likelihood``, ``n_top_genes``; ``SpotVAE.train(max_epochs=epochs,
    max_steps=max_steps)``),
    :func:`neuroexplain.st.concept_saliency` (``method``, ``saliency``, ``min_spots``) and
    :func:`neuroexplain.st.genemode` (``n_top_genes=genemode_n_genes``,
    ``max_epochs=genemode_epochs``).

    Attributes:
        n_latent: latent dimensions of the spot VAE.
        n_top_genes: highly variable genes used as model input (0 = all genes).
        likelihood: ``"nb"`` (raw counts) or ``"gaussian"`` (log1p).
        method: concept vectors: ``"attribute"`` (difference of mean latents) or ``"probe"``.
        saliency: saliency variant of the concept score w.r.t. the genes.
        epochs: maximum training epochs of the spot VAE (early stopping on held-out spots).
        max_steps: most optimisation steps of the spot VAE (0 = no limit; see
            :data:`neuroexplain.st.vae.MAX_STEPS`, the library's default).
        genemode_epochs: maximum epochs of the gene-image VAE.
        genemode_n_genes: highly variable genes used as images (0 = all).
        min_spots: fewest labelled spots a layer may have.
        max_concepts: most concepts (one per layer of the label column, plus gene and spot
            concepts) a run may compute; each keeps a spots x genes saliency layer in memory and
            in the output, so a label column of hundreds of categories (a cluster id, a barcode)
            is refused rather than run out of memory.
        spot_gene_max_mb: largest size in MiB of the spots x genes saliency layers kept in the
            output (concepts x spots x genes x 4 bytes); beyond it they are skipped with a
            warning (0 = no limit). ``--spot-gene-out`` always writes them.
        seed: random seed (same seed -> identical outputs on CPU).
    """

    SECTION: ClassVar[str] = "st_concepts"

    n_latent: int = setting(16, "Latent dimensions of the spot VAE.")
    n_top_genes: int = setting(2000, "Highly variable genes as model input (0 = all genes).")
    likelihood: str = setting("nb", "Spot-VAE likelihood: nb (raw counts) or gaussian (log1p).")
    method: str = setting(
        "attribute",
        "Concept vectors: attribute (mean-latent difference) or probe (logistic regression).",
    )
    saliency: str = setting("grad_x_input", "gradient, grad_x_input, smoothgrad or ig.")
    epochs: int = setting(
        300, "Maximum training epochs of the spot VAE (early stopping on held-out spots)."
    )
    max_steps: int = setting(
        1000,
        "Most optimisation steps of the spot VAE, whatever the epochs (0 = no limit); bounds "
        "the training time on large data sets.",
    )
    genemode_epochs: int = setting(40, "Maximum epochs of the gene-image VAE.")
    genemode_n_genes: int = setting(
        500, "Highly variable genes used as images (0 = all).", config=None
    )
    min_spots: int = setting(5, "Fewest labelled spots a layer may have.", config=None)
    max_concepts: int = setting(
        50,
        "Most concepts (layers + gene and spot concepts) a run may compute; each keeps a "
        "spots x genes saliency layer.",
    )
    spot_gene_max_mb: int = setting(
        2048,
        "Largest size (MiB) of the spots x genes saliency layers kept in --out; larger ones are "
        "skipped with a warning (0 = no limit; --spot-gene-out always writes them).",
        config=None,
    )
    seed: int = setting(0, "Random seed (same seed -> identical outputs on CPU).", config=None)

    def __post_init__(self) -> None:
        _check(
            {
                "n_latent": (self.n_latent >= 1, "expected >= 1"),
                "n_top_genes": (self.n_top_genes >= 0, "expected >= 0"),
                "spot_gene_max_mb": (self.spot_gene_max_mb >= 0, "expected >= 0"),
                "likelihood": (self.likelihood in ST_LIKELIHOODS, "expected nb or gaussian"),
                "method": (self.method in ST_CONCEPT_METHODS, "expected attribute or probe"),
                "saliency": (
                    self.saliency in ST_SALIENCY_METHODS,
                    f"expected one of {ST_SALIENCY_METHODS}",
                ),
                "epochs": (self.epochs >= 1, "expected >= 1"),
                "max_steps": (self.max_steps >= 0, "expected >= 0"),
                "genemode_epochs": (self.genemode_epochs >= 1, "expected >= 1"),
                "genemode_n_genes": (self.genemode_n_genes >= 0, "expected >= 0"),
                "min_spots": (self.min_spots >= 1, "expected >= 1"),
                "max_concepts": (self.max_concepts >= 2, "expected >= 2"),
            },
            self,
        )


# ---------------------------------------------------------------------------------- cohort


@dataclass
class CohortConfig(_Settings):
    """The planted effect of :func:`neuroexplain.synth.make_cohort` (recorded in cohort.json).

    Attributes:
        shrink: label indices shrunk by the effect (DL-MUSE hippocampus, thalamus, putamen).
        enlarge: label indices enlarged by the effect (DL-MUSE lateral ventricles).
        paired: two subjects per source subject, ``sub-<id>ctl`` (control) and ``sub-<id>dis``
            (diseased, same anatomy and nuisance field), instead of planting the effect in a
            ``fraction`` of them (``fraction`` is then not used).
        fraction: fraction of subjects with the effect (``floor(fraction * N + 0.5)`` of them,
            chosen by ``seed``; only without ``paired``).
        magnitude_min: smallest per-subject fractional volume change of the planted regions.
        magnitude_max: largest one (each diseased subject draws one uniformly).
        nuisance: largest nuisance displacement in mm, applied to every subject (0 = none).
        label_probability: probability that each planted label is affected in a diseased
            subject, independently of the others (at least one always is; 1 = all of them).
        sigma: smoothness of the disease field in mm.
        nuisance_sigma: smoothness of the nuisance field in mm.
        label_interpolation: ``"linear"`` (one-hot argmax) or ``"nearest"``.
        seed: random seed (which subjects, magnitudes, nuisance fields).
    """

    SECTION: ClassVar[str] = "cohort"

    shrink: tuple[int, ...] = setting(
        (47, 48, 59, 60, 57, 58), "Label indices of regions to shrink (comma-separated)."
    )
    enlarge: tuple[int, ...] = setting(
        (51, 52), "Label indices of regions to enlarge (comma-separated)."
    )
    paired: bool = setting(
        True,
        "Two subjects per source: sub-<id>ctl (control) and sub-<id>dis (diseased, same "
        "anatomy); --fraction is then not used.",
        flag="--paired/--unpaired",
    )
    fraction: float = setting(
        0.5, "Fraction of subjects that get the disease effect (only with --unpaired)."
    )
    magnitude_min: float = setting(
        0.30,
        "Smallest effect magnitude (fractional volume change of the planted regions).",
        config="magnitude[0]",
    )
    magnitude_max: float = setting(0.40, "Largest effect magnitude.", config="magnitude[1]")
    nuisance: float = setting(
        0.0, "Amplitude (mm) of a mild random smooth deformation of every subject; 0 = off."
    )
    label_probability: float = setting(
        1.0,
        "Probability that each planted label is affected in a diseased subject "
        "(independently; at least one is). Below 1 the disease is heterogeneous, so a "
        "classifier has to use every planted region.",
    )
    sigma: float = setting(
        4.0,
        "Smoothness (mm) of the disease deformation (sigma of the smoothed indicators).",
        config=None,
    )
    nuisance_sigma: float = setting(
        12.0, "Smoothness (mm) of the nuisance deformation.", config=None
    )
    label_interpolation: str = setting(
        "linear",
        "Hard label sampling: linear (one-hot argmax) or nearest; planted regions "
        "keep their partial volume either way.",
        config=None,
    )
    seed: int = setting(0, "Random seed (which subjects, magnitudes, nuisance).", config=None)

    def __post_init__(self) -> None:
        self.shrink = _as_tuple(self.shrink, int)
        self.enlarge = _as_tuple(self.enlarge, int)
        shrink, enlarge = list(self.shrink), list(self.enlarge)
        for name, lst in (("shrink", shrink), ("enlarge", enlarge)):
            dup = sorted({r for r in lst if lst.count(r) > 1})
            _check(
                {
                    name: (
                        all(r >= 1 for r in lst),
                        "expected label indices >= 1 (0 is background)",
                    )
                },
                self,
            )
            if dup:
                raise InputError(
                    cli_flag(type(self), name),
                    f"expected each label once, got {dup} more than once",
                )
        both = sorted(set(shrink) & set(enlarge))
        if both:
            raise InputError("--shrink/--enlarge", f"labels {both} are both shrunk and enlarged")
        fraction = self.fraction
        _check(
            {
                "fraction": (
                    isinstance(fraction, int | float)
                    and math.isfinite(fraction)
                    and 0 <= fraction <= 1,
                    "expected a fraction in [0, 1]",
                )
            },
            self,
        )
        if fraction > 0 and not (shrink or enlarge):
            raise InputError(
                "--shrink/--enlarge", "expected at least one label to shrink or enlarge"
            )
        lo, hi = float(self.magnitude_min), float(self.magnitude_max)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi < MAX_MAGNITUDE):
            raise InputError(
                "--magnitude-min/--magnitude-max",
                f"expected 0 <= min <= max < {MAX_MAGNITUDE}, got min={lo}, max={hi}",
            )
        finite = math.isfinite
        _check(
            {
                "label_probability": (
                    finite(self.label_probability) and 0 < self.label_probability <= 1,
                    "expected a probability in (0, 1]",
                ),
                "nuisance": (
                    finite(self.nuisance) and self.nuisance >= 0,
                    "expected an amplitude >= 0 mm",
                ),
                "sigma": (finite(self.sigma) and self.sigma > 0, "expected a smoothing > 0 mm"),
                "nuisance_sigma": (
                    finite(self.nuisance_sigma) and self.nuisance_sigma > 0,
                    "expected a smoothing > 0 mm",
                ),
                "label_interpolation": (
                    self.label_interpolation in LABEL_INTERPOLATIONS,
                    "expected 'linear' or 'nearest'",
                ),
            },
            self,
        )

    @property
    def magnitude_range(self) -> tuple[float, float]:
        """``(magnitude_min, magnitude_max)``."""
        return (float(self.magnitude_min), float(self.magnitude_max))


# ------------------------------------------------------------------------------------- mri


@dataclass
class MRIIngestConfig(_Settings):
    """Preprocessing of :func:`neuroexplain.mri.ingest_mri` (recorded in ingest.json).

    The defaults are the workflow's: a 180 mm field of view (every IXI brain fits), subjects
    affinely aligned by their label centroids and the head outside the dilated brain zeroed;
    both need dseg label maps (``align="none"``, ``mask="none"`` without them).

    Attributes:
        shape: model grid shape ``(X, Y, Z)`` (one value: a cube).
        fov_mm: extent of the longest model axis in mm; spacing ``fov_mm / max(shape)``.
        norm: intensity normalisation inside the head mask (:data:`NORM_METHODS`).
        fg_threshold: head-mask threshold as a fraction of the robust maximum intensity.
        align: ``"labels"`` (every subject affinely aligned to one reference subject's grid by
            least squares between label centroids; needs dseg maps) or ``"none"`` (each subject
            on its own RAS grid centred on its head).
        align_reference: participant id of the reference (``None``: the first subject).
        mask: ``"brain"`` (zero every voxel farther than ``mask_margin_mm`` from the labelled
            brain, dseg > 0; needs dseg maps) or ``"none"``.
        mask_margin_mm: dilation of the brain mask in mm.
    """

    SECTION: ClassVar[str] = "mri"

    shape: tuple[int, ...] = setting(
        (64, 64, 64),
        "Model grid shape, e.g. --shape 64 --shape 64 --shape 64 (or once for a cube).",
        multiple=True,
    )
    fov_mm: float = setting(
        180.0, "Field of view of the model grid in mm (isotropic spacing = fov / shape)."
    )
    norm: str = setting(
        "percentile",
        "Normalisation inside the head mask: percentile (0.5-99.5% -> 0-1), zscore or none.",
    )
    fg_threshold: float = setting(
        0.1, "Head mask threshold as a fraction of the robust max (99th percentile) intensity."
    )
    align: str = setting(
        "labels",
        "labels: affine-align every subject to a reference (label centroids; needs dseg), or none.",
    )
    align_reference: str | None = setting(
        None, "Reference subject of --align labels (default: first).", config=None
    )
    mask: str = setting(
        "brain",
        "brain: zero voxels farther than --mask-margin-mm from the dseg > 0 brain; or none.",
    )
    mask_margin_mm: float = setting(5.0, "Dilation (mm) of the brain mask of --mask brain.")

    def __post_init__(self) -> None:
        shape = _as_tuple(self.shape, int)
        self.shape = shape * 3 if len(shape) == 1 else shape
        _check(
            {
                "shape": (
                    len(self.shape) == 3 and min(self.shape) >= 8,
                    "expected 1 or 3 integers >= 8",
                ),
                "fov_mm": (self.fov_mm > 0, "expected a positive field of view"),
                "norm": (self.norm in NORM_METHODS, f"expected one of {', '.join(NORM_METHODS)}"),
                "fg_threshold": (0 < self.fg_threshold < 1, "expected a fraction in (0, 1)"),
                "align": (self.align in ("none", "labels"), "expected none or labels"),
                "mask": (self.mask in ("none", "brain"), "expected none or brain"),
                "mask_margin_mm": (
                    math.isfinite(self.mask_margin_mm) and self.mask_margin_mm >= 0,
                    "expected a margin >= 0 mm",
                ),
            },
            self,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


#: every settings class, for the CLI, the config schema check and the docs
SETTINGS: tuple[type, ...] = (
    ClassifierConfig,
    QualityConfig,
    SimulatorTrainConfig,
    SimulatorConfig,
    SaliencyConfig,
    TCAVConfig,
    SACVConfig,
    SRAEConfig,
    XNNTrainConfig,
    XNNExplainConfig,
    STConceptsConfig,
    CohortConfig,
    MRIIngestConfig,
)
