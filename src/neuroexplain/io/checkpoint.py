"""Safe loading of ``.pt`` files (checkpoints, ``preproc.pt``) with one-line user errors.

Every torch file neuroexplain reads goes through ``torch.load(path, weights_only=True)``: only
tensors and plain containers are unpickled, so a tampered file whose pickle would run code
(``__reduce__`` payloads) is refused instead of executed. Torch's own messages for a refused or
damaged file run over many lines; :func:`describe_load_error` turns them into the one line an
:class:`~neuroexplain.errors.InputError` carries.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

from neuroexplain.errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "describe_load_error",
    "load_checkpoint",
    "load_torch",
    "load_training_state",
    "to_plain",
]

#: what ``torch.load`` raises for unreadable, truncated, foreign or refused files
LOAD_ERRORS = (
    RuntimeError,
    OSError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
)


def to_plain(obj: Any) -> Any:
    """``obj`` as the types ``torch.load(weights_only=True)`` accepts, for checkpoints and states.

    Dicts (keys as ``str``) and lists (tuples become lists) are converted item by item; tensors
    and ``None`` are kept; NumPy arrays become tensors and NumPy scalars Python numbers; ``bool``,
    ``int``, ``float`` and ``str`` (subclasses such as ``torch.__version__`` included) become the
    plain type; anything else its ``str``.

    Example:
        >>> import numpy as np
        >>> to_plain({1: (np.float32(0.5), "a", None)})
        {'1': [0.5, 'a', None]}
    """
    import numpy as np
    import torch

    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if obj is None or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    for kind in (bool, int, float, str):  # bool first: it is an int
        if isinstance(obj, kind):
            return kind(obj)
    return str(obj)


def describe_load_error(exc: BaseException) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` failed.

    Example:
        >>> describe_load_error(EOFError("Ran out of input"))
        'truncated or corrupt file (EOFError: Ran out of input)'
    """
    text = str(exc)
    unsafe = re.search(r"Unsupported (?:global|class):?\s*(?:GLOBAL\s+)?([\w.]+)", text)
    if unsafe:
        return (
            f"refused to unpickle {unsafe.group(1)} (loaded with weights_only=True, which only "
            "accepts tensors and plain data): the file was not written by neuroexplain or has "
            "been tampered with"
        )
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        return "not a file written by torch.save (no tensors or plain data could be read)"
    if "central directory" in text or "zip archive" in text or isinstance(exc, zipfile.BadZipFile):
        return f"truncated or corrupt file ({type(exc).__name__}: not a complete torch zip archive)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return f"truncated or corrupt file ({detail})"


def load_torch(
    path: str | os.PathLike[str], *, what: str = "torch file", map_location: Any = "cpu"
) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line :class:`InputError` on failure.

    Args:
        path: the ``.pt`` file.
        what: what the file should be, for the error message (e.g. ``"classifier checkpoint"``).
        map_location: device the tensors are loaded to.

    Returns:
        The unpickled object (tensors, dicts, lists, strings, numbers).

    Raises:
        InputError: the file is missing, truncated, not a torch file, or holds objects that
            ``weights_only`` loading refuses (e.g. a pickle with a code-running payload).
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise InputError(p, f"{what} not found")
    if p.stat().st_size == 0:
        raise InputError(p, f"expected a {what}, got an empty file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(p, map_location=map_location, weights_only=True)
    except LOAD_ERRORS as exc:
        raise InputError(p, f"not a readable {what}: {describe_load_error(exc)}") from exc


def load_checkpoint(
    path: str | os.PathLike[str], fmt: str, *, map_location: Any = "cpu"
) -> dict[str, Any]:
    """:func:`load_torch` of a checkpoint dict whose ``format`` must be ``fmt``.

    Args:
        path: the ``.pt`` file.
        fmt: the expected ``format`` entry (e.g. ``"neuroexplain-classifier/1"``).
        map_location: device the tensors are loaded to.

    Returns:
        The checkpoint dict.

    Raises:
        InputError: the file cannot be read (see :func:`load_torch`), or holds no dict of
            format ``fmt`` (the message names the format found).
    """
    ckpt = load_torch(path, what="torch checkpoint", map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InputError(Path(path), f"expected a {fmt} checkpoint, got {got!r}")
    return ckpt


def load_training_state(
    path: str | os.PathLike[str], *, fmt: str, key: Any, what: str = "training state"
) -> dict[str, Any] | None:
    """The resume state at ``path`` if it belongs to this run, else ``None`` (start over).

    A training command resumes only from a state file of its own ``fmt`` whose ``key`` (the
    options and data that decide the trajectory, as plain data) equals this run's; a damaged
    file, another format or another run's state is ignored with a warning.
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged state file means starting over
        logger.warning("ignoring unreadable %s %s (%s)", what, path, exc)
        return None
    if not isinstance(state, dict) or state.get("format") != fmt:
        logger.warning("ignoring %s: not a %s", path, what)
        return None
    if state.get("key") != key:
        logger.warning("ignoring %s: written by a run with other options or data", path)
        return None
    return state
