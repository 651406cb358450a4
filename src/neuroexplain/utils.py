"""Device, seeding and small shared helpers."""

from __future__ import annotations

import functools
import logging
import os
import random
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BF16_CPU_FLAGS",
    "MEMORY_LIMIT_ENV",
    "Precision",
    "amp_enabled",
    "available_memory",
    "case_clashes",
    "check_memory_fits",
    "check_region_labels",
    "cpu_flags",
    "estimate_activation_memory",
    "estimate_training_memory",
    "format_bytes",
    "release_memory",
    "resolve_device",
    "resolve_precision",
    "seed_everything",
]

logger = logging.getLogger(__name__)


def case_clashes(values: Iterable[Any]) -> list[tuple[str, ...]]:
    """Groups of distinct values that are equal once case and whitespace are ignored.

    Used to refuse label sets such as ``control / disease / Disease`` or gene names such as
    ``Penk / PENK``, where a typo would otherwise become a class (or a gene) of its own.

    Args:
        values: label values or names (anything; compared as ``str``).

    Returns:
        One sorted tuple per clash, in order of first appearance; empty when there is none.

    Example:
        >>> case_clashes(["control", "disease", "Disease", " control ", "other"])
        [(' control ', 'control'), ('Disease', 'disease')]
    """
    groups: dict[str, list[str]] = {}
    for v in values:
        text = str(v)
        group = groups.setdefault(" ".join(text.split()).casefold(), [])
        if text not in group:
            group.append(text)
    return [tuple(sorted(g)) for g in groups.values() if len(g) > 1]


def _nearest(label: int, present: set[int], n: int = 4) -> str:
    near = sorted(present, key=lambda v: (abs(v - label), v))[:n]
    return ", ".join(str(v) for v in sorted(near)) if near else "none"


def check_region_labels(
    regions: Mapping[str, Sequence[int]] | Sequence[int],
    present: Sequence[Iterable[int]],
    *,
    where: Any,
    subjects: Sequence[str] | None = None,
    option: str = "--regions",
) -> list[str]:
    """Refuse region labels that no subject has; warn about labels only some subjects lack.

    A label in none of the label maps is a typo or the wrong atlas, and would only give empty
    rows (NaN means, zero voxels); a label some subjects lack is legitimate (a structure missing
    from one segmentation) but doubtful, so it is logged as a warning and returned.

    Args:
        regions: ``{name: [label, ...]}`` or a plain list of labels.
        present: per subject, the labels of its label map (e.g. ``np.unique(dseg)``).
        where: what the label maps are (named in the error, e.g. the preproc file).
        subjects: the subjects' ids (in the warnings), in the order of ``present``.
        option: the option the regions came from (the error names it).

    Returns:
        The warnings (one line per label that some subjects lack).

    Raises:
        InputError: a label in none of the label maps.

    Example:
        >>> notes = check_region_labels({"hc": [47, 48]}, [{0, 47, 48}, {0, 47}], where="x")
        >>> notes[0].split(",")[0]
        "--regions: label 48 (region 'hc') is missing from 1 of 2 subjects' label maps (x)"
    """
    from neuroexplain.errors import InputError

    named = dict(regions) if isinstance(regions, Mapping) else {"": list(regions)}
    sets = [{int(v) for v in p} for p in present]
    ids = list(subjects) if subjects is not None else [f"#{i}" for i in range(len(sets))]
    union = set().union(*sets) - {0} if sets else set()

    def what(name: str, label: int) -> str:
        return f"label {label}" + (f" (region {name!r})" if name else "")

    absent = [(n, int(v)) for n, labs in named.items() for v in labs if int(v) not in union]
    if absent:
        listed = "; ".join(f"{what(n, v)}: nearest present {_nearest(v, union)}" for n, v in absent)
        raise InputError(
            option,
            f"{len(absent)} label(s) in none of the {len(sets)} subjects' label maps ({where}): "
            f"{listed}; check the label numbers against the atlas (dseg.tsv)",
        )
    notes = []
    for name, labs in named.items():
        for v in labs:
            lacking = [i for i, s in zip(ids, sets, strict=True) if int(v) not in s]
            if lacking:
                notes.append(
                    f"{option}: {what(name, int(v))} is missing from {len(lacking)} of {len(sets)} "
                    f"subjects' label maps ({where}), e.g. {', '.join(lacking[:3])}"
                )
                logger.warning(notes[-1])
    return notes


def resolve_device(device: str = "auto", *, log: bool = True):
    """Resolve ``"auto"`` once: CUDA if available (e.g. a Slurm job with ``--gpus``), else CPU.

    Returns:
        A ``torch.device`` (logged unless ``log`` is false).
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if log:
        logger.info("using device %s", dev)
    return dev


def amp_enabled(device) -> bool:
    """Mixed precision only on CUDA; CPU runs stay in float32 (and bitwise reproducible)."""
    return getattr(device, "type", str(device)) == "cuda"


#: ``/proc/cpuinfo`` flags of CPUs with native bfloat16 matrix arithmetic (AVX-512 BF16, AMX)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str | os.PathLike[str] = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (the first ``flags`` line of ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@dataclass(frozen=True)
class Precision:
    """The arithmetic of the training forward passes (losses and metrics stay float32).

    Attributes:
        name: ``"fp32"`` (no autocast), ``"bf16"`` (``torch.autocast`` to bfloat16, CPU or
            CUDA) or ``"fp16"`` (CUDA automatic mixed precision with a gradient scaler).
        device_type: ``"cpu"`` or ``"cuda"``.
        requested: the setting it was resolved from (``fp32``, ``bf16`` or ``auto``).
    """

    name: str
    device_type: str
    requested: str

    @property
    def enabled(self) -> bool:
        """Forward passes run under ``torch.autocast``."""
        return self.name != "fp32"

    def autocast(self) -> Any:
        """The autocast context of a forward pass (a no-op for ``fp32``)."""
        import torch

        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype, enabled=self.enabled)

    def grad_scaler(self) -> Any:
        """A ``torch.amp.GradScaler``, enabled only for ``fp16`` (bfloat16 needs none)."""
        import torch

        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def resolve_precision(
    precision: str, device: Any, *, flags: Iterable[str] | None = None, log: bool = True
) -> Precision:
    """The :class:`Precision` of setting ``precision`` on ``device``.

    ``fp32`` and ``bf16`` are taken as they are (bfloat16 on a CPU without native support is
    emulated: correct but slow, and logged as a warning); ``auto`` is CUDA's mixed precision
    (``fp16``) on a GPU, ``bf16`` on a CPU with one of :data:`BF16_CPU_FLAGS`, else ``fp32``.

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"``.
        device: a ``torch.device`` or its name.
        flags: the CPU flags (default: :func:`cpu_flags`; tests pass their own).
        log: log the result (and the warning of emulated bfloat16).

    Raises:
        InputError: another ``precision``.

    Example:
        >>> resolve_precision("auto", "cpu", flags={"avx512f", "amx_bf16"}).name
        'bf16'
        >>> resolve_precision("auto", "cpu", flags={"avx512f"}).name
        'fp32'
    """
    from neuroexplain.errors import InputError
    from neuroexplain.settings import PRECISIONS

    if precision not in PRECISIONS:
        expected = ", ".join(PRECISIONS)
        raise InputError("--precision", f"expected one of {expected}, got {precision!r}")
    device_type = getattr(device, "type", str(device)).split(":")[0]
    flags = cpu_flags() if flags is None else flags
    native = device_type == "cuda" or bool(set(BF16_CPU_FLAGS) & set(flags))
    if precision == "auto":
        name = "fp16" if device_type == "cuda" else ("bf16" if native else "fp32")
    else:
        name = precision
    if log and name == "bf16" and not native:
        logger.warning(
            "bf16 on a CPU without %s: emulated, expect slower training than fp32",
            " / ".join(BF16_CPU_FLAGS),
        )
    if log:
        logger.info("precision %s (requested %s) on %s", name, precision, device_type)
    return Precision(name=name, device_type=device_type, requested=precision)


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (via MONAI's ``set_determinism``) for reproducible runs.

    On CPU, the same seed and config give bitwise-identical outputs; deterministic algorithms are
    requested from torch (``warn_only`` so CUDA ops without a deterministic kernel still run).
    """
    import torch
    from monai.utils import set_determinism

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - libraries still draw from the global RNG
    torch.manual_seed(seed)
    set_determinism(seed=seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


# ------------------------------------------------------------------------------ resource limits

#: environment variable that overrides the memory available to a run (in MiB), e.g. for tests
MEMORY_LIMIT_ENV = "NEUROEXPLAIN_MEMORY_LIMIT_MB"


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` on another C library / platform."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others: no malloc_trim
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_memory(*, collect: bool = False) -> None:
    """Hand the memory freed so far back to the operating system (glibc's ``malloc_trim``).

    A loop that allocates and frees many large, differently sized tensors (per-subject
    activations and gradients of a 3D network) leaves glibc's heap fragmented: freed blocks
    stay in the process, and its resident memory grows with every iteration although the
    live data does not. Called between iterations (after the last reference to the iteration's
    tensors is dropped), this keeps the peak at one iteration's working set. Does nothing on a C
    library without ``malloc_trim``; changes no result.

    Args:
        collect: collect reference cycles first (``gc.collect``), so that tensors held only by
            a cycle (hooks, autograd closures) are freed too.
    """
    if collect:
        import gc

        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'`` (binary units)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - unreachable


def available_memory(device: Any = None) -> tuple[int | None, str]:
    """Bytes of memory a run may still use, and where the number comes from.

    Order: the ``NEUROEXPLAIN_MEMORY_LIMIT_MB`` environment variable (overrides everything);
    free CUDA memory for a CUDA ``device``; ``psutil.virtual_memory().available`` if psutil is
    installed; ``MemAvailable`` of ``/proc/meminfo``. ``(None, reason)`` when none is known.

    Raises:
        InputError: the environment variable is not a positive number.
    """
    from neuroexplain.errors import InputError

    env = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if env:
        try:
            mb = float(env)
        except ValueError:
            mb = -1.0
        if not mb > 0:
            raise InputError(MEMORY_LIMIT_ENV, f"expected a positive number of MiB, got {env!r}")
        return int(mb * 2**20), f"{MEMORY_LIMIT_ENV}={env}"
    if getattr(device, "type", str(device or "")) == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free), "free CUDA memory"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available system memory"
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return None, "unknown"


def _parameter_memory(model: Any, optimizer_states: int) -> int:
    """Weights and buffers, plus gradients and optimiser state of the trainable parameters."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return int(weights + trainable * (1 + optimizer_states))


def estimate_activation_memory(
    model: Any,
    input_shape: Sequence[int],
    batch_size: int,
    amp: bool = False,
    *,
    forward: Callable[[Any, Any], Any] | None = None,
) -> int:
    """Activation memory of one training step, measured by a forward pass on a batch of 1.

    During a forward pass with gradients, a ``saved_tensors_hooks`` pack hook adds up the bytes
    of every tensor autograd keeps for the backward pass (distinct storages, parameters
    excluded), and forward hooks record the largest output of any layer. The estimate is
    ``batch_size * (saved + 2 * largest)``: what backward needs, plus one transient output and
    its gradient. The model runs in eval mode for the measurement (BatchNorm running statistics
    are not touched) and is put back in its previous mode.

    Args:
        model: the network ``(B, *input_shape) -> ...``.
        input_shape: one sample's shape, e.g. ``(C, X, Y, Z)``.
        batch_size: samples per training step.
        amp: measure under ``torch.autocast`` (half-precision activations, as on CUDA with AMP).
        forward: ``forward(model, x)`` for models that take more than the image (default
            ``model(x)``).

    Returns:
        Bytes.
    """
    import torch

    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    x = torch.zeros((1, *[int(s) for s in input_shape]), device=device, requires_grad=True)
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: set[int] = set()
    saved = [0]
    largest = [x.numel() * x.element_size()]

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            ptr, nbytes = id(t), t.numel() * t.element_size()
        if ptr not in seen and ptr not in param_ptrs:
            seen.add(ptr)
            saved[0] += nbytes
        return t

    def on_output(_module: Any, _inputs: Any, output: Any) -> None:
        outs = output if isinstance(output, tuple | list) else (output,)
        for o in outs:
            if isinstance(o, torch.Tensor):
                largest[0] = max(largest[0], o.numel() * o.element_size())

    handles = [m.register_forward_hook(on_output) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        with (
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast(device.type, enabled=amp),
        ):
            out = forward(model, x) if forward is not None else model(x)
        del out
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(batch_size) * int(saved[0] + 2 * largest[0])


def estimate_training_memory(
    model: Any,
    input_shape: Sequence[int],
    batch_size: int,
    amp: bool = False,
    *,
    optimizer_states: int = 2,
    forward: Callable[[Any, Any], Any] | None = None,
) -> int:
    """Memory (bytes) one training step of ``model`` needs: weights, gradients, optimiser state
    and activations.

    ``weights + buffers + (1 + optimizer_states) * trainable parameters`` (a gradient and, for
    Adam / AdamW, two moment tensors per parameter) plus :func:`estimate_activation_memory`.
    Frozen parameters (``requires_grad=False``) count only once. The input batch itself and
    the allocator's overhead are not included.

    Args:
        model: the network.
        input_shape: one sample's shape ``(C, X, Y, Z)``.
        batch_size: samples per step.
        amp: activations in half precision (CUDA mixed precision).
        optimizer_states: state tensors per parameter (2 for Adam, 1 for SGD with momentum).
        forward: ``forward(model, x)`` when the model takes more than the image.

    Returns:
        Bytes.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(10, 1)
        >>> estimate_training_memory(net, (10,), batch_size=4) > 4 * 11 * 4
        True
    """
    acts = estimate_activation_memory(model, input_shape, batch_size, amp, forward=forward)
    return _parameter_memory(model, optimizer_states) + acts


def check_memory_fits(
    required_bytes: int,
    what: str,
    path: str | os.PathLike[str] | None,
    *,
    device: Any = None,
    hint: str = "use a smaller --batch-size or input shape",
) -> None:
    """Raise an :class:`~neuroexplain.errors.InputError` if ``required_bytes`` do not fit.

    The available memory comes from :func:`available_memory` (``NEUROEXPLAIN_MEMORY_LIMIT_MB``
    overrides it); when it cannot be determined the check passes.

    Args:
        required_bytes: estimated need, e.g. from :func:`estimate_training_memory`.
        what: what needs it, e.g. ``"training the simulator (batch size 4, 1x64x64x64)"``.
        path: the file or option the error is reported against (e.g. the ``preproc.pt``).
        device: the device the run uses (CUDA: free GPU memory is compared).
        hint: how to need less.

    Raises:
        InputError: ``"<path>: <what> needs about 3.1 GiB of memory, but only 1.0 GiB is
            available (<source>); <hint>"``.
    """
    from neuroexplain.errors import InputError

    available, source = available_memory(device)
    logger.debug(
        "%s needs about %s (%s: %s)",
        what,
        format_bytes(required_bytes),
        source,
        "unknown" if available is None else format_bytes(available),
    )
    if available is not None and required_bytes > available:
        raise InputError(
            path,
            f"{what} needs about {format_bytes(required_bytes)} of memory, but only "
            f"{format_bytes(available)} is available ({source}); {hint}",
        )
