"""Output-path checks, done once per command before any work.

A command's output must be a regular file or a folder, as the command expects. An existing path
of another kind (a folder where a file goes, a file where a folder goes, a device, a pipe, a
socket) is refused with one line instead of being renamed over (``os.replace`` onto
``/dev/null`` run as root would replace the device node) or failing half-way with an unclear
``NotADirectoryError``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from neuroexplain.errors import InputError

__all__ = ["check_output", "check_outputs", "describe_path", "existing_kind"]

OutputKind = Literal["file", "folder"]


def existing_kind(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is on disk (following symlinks): ``"file"`` (regular), ``"folder"``,
    ``"character device"``, ``"block device"``, ``"named pipe"``, ``"socket"``, ``"special
    file"``, or ``None`` when nothing is there (a dangling symlink counts as nothing)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    for test, name in (
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "named pipe"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def describe_path(path: str | os.PathLike[str]) -> str:
    """``"an existing folder"``, ``"an existing character device"``, ... or ``"nothing"``."""
    kind = existing_kind(path)
    return "nothing" if kind is None else f"an existing {kind}"


def check_output(
    path: str | os.PathLike[str] | None, kind: OutputKind, *, option: str = "--out"
) -> Path | None:
    """Refuse an output ``path`` that exists and is not a regular file / folder as expected.

    Also refuses a path whose nearest existing parent is not a folder (``out.tsv/x.json`` with
    ``out.tsv`` a file) or is not writable. Call it at the start of a command, before any work.

    Args:
        path: the output (``None``: nothing to check, returned as is).
        kind: ``"file"`` (replaced if it is a regular file) or ``"folder"`` (created or reused).
        option: the command-line option naming the output, for the message.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        InputError: naming the path and the option, e.g. ``/dev/full: expected a regular file
            to write (--out), got an existing character device; refusing to replace it``.

    Example:
        >>> check_output("results/st.h5ad", "file")  # doctest: +SKIP
        PosixPath('results/st.h5ad')
    """
    if path is None:
        return None
    p = Path(path)
    found = existing_kind(p)
    if found is not None:
        if kind == "file" and found != "file":
            raise InputError(
                p,
                f"expected a regular file to write ({option}), got an existing {found}; "
                "refusing to replace it",
            )
        if kind == "folder" and found != "folder":
            raise InputError(
                p,
                f"expected a folder to write in ({option}), got an existing {found}; "
                "refusing to replace it",
            )
        target = p if found == "folder" else p.parent
        if not os.access(target, os.W_OK | os.X_OK):
            raise InputError(p, f"cannot write the output ({option}): no permission in {target}")
        return p
    parent = p.absolute().parent
    while existing_kind(parent) is None and parent != parent.parent:
        parent = parent.parent
    found = existing_kind(parent)
    if found != "folder":
        raise InputError(
            p, f"cannot create the output ({option}): {parent} is an existing {found}, not a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(p, f"cannot create the output ({option}): no permission in {parent}")
    return p


def check_outputs(outputs: Iterable[tuple[str | os.PathLike[str] | None, OutputKind, str]]) -> None:
    """:func:`check_output` on each ``(path, kind, option)``; ``None`` paths are skipped."""
    for path, kind, option in outputs:
        check_output(path, kind, option=option)
