"""A full disk, simulated: writes to neuroexplain's temporary output files fail with ``ENOSPC``.

:func:`fill_disk` replaces ``open`` (``builtins.open`` and ``io.open``, which pandas, gzip /
nibabel, pathlib, json and neuroexplain's own writers use) so that a file opened for writing
whose name marks it as an :func:`~neuroexplain.io.atomic.atomic_output` temporary file accepts
``room`` bytes and then raises ``OSError(ENOSPC)``, as a full file system does. Everything else
(reading inputs, pytest's own files) is untouched. :func:`mount_tmpfs` gives a real small file
system where the test runs as root and may mount one.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_REAL_OPEN = builtins.open
#: the temporary names atomic_output makes: ".<final name>.<random>.tmp<suffixes>"
_TEMP = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)*$")


class _FullFile:
    """A writable file that holds ``room`` bytes, then fails like a full disk."""

    def __init__(self, fh: Any, room: int) -> None:
        self._fh = fh
        self._room = room

    def write(self, data: Any) -> int:
        n = len(data)
        if n > self._room:
            if self._room > 0:  # a partial write first, as a real disk does
                self._fh.write(data[: self._room])
                self._fh.flush()
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= n
        return self._fh.write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._fh.close()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._fh)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def fill_disk(monkeypatch: pytest.MonkeyPatch, room: int = 64, only: str = "") -> list[str]:
    """From now on, temporary output files take ``room`` bytes and then raise ``ENOSPC``.

    Args:
        monkeypatch: pytest's, which undoes the patch after the test.
        room: bytes each temporary file accepts before the disk is "full".
        only: the disk is full only for outputs whose final name matches this regular
            expression (``""``: every output), e.g. the last output of a command.

    Returns:
        The list the names of the files that hit the full disk are appended to.
    """
    hits: list[str] = []
    pattern = re.compile(only)

    def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = _REAL_OPEN(file, mode, *args, **kwargs)
        name = os.path.basename(os.fspath(file)) if isinstance(file, str | os.PathLike) else ""
        final = name[1:].split(".tmp", 1)[0].rsplit(".", 1)[0]  # ".a.tsv.x1.tmp.tsv" -> "a.tsv"
        if any(c in mode for c in "wax+") and _TEMP.match(name) and pattern.search(final):
            hits.append(name)
            return _FullFile(fh, room)
        return fh

    monkeypatch.setattr(builtins, "open", full_open)
    monkeypatch.setattr(io, "open", full_open)
    return hits


@contextlib.contextmanager
def mount_tmpfs(where: Path, size: str = "64k") -> Iterator[Path]:
    """A real ``size`` tmpfs at ``where`` (skips the test where mounting is not allowed)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
