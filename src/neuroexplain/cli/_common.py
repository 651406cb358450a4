"""Shared option parsing for the subcommands."""

from __future__ import annotations

from typing import Annotated

import typer

from neuroexplain.errors import InputError

__all__ = ["DeviceOption", "ThreadsOption", "parse_int_list", "parse_shape", "set_threads"]

#: ``--device`` of every command that runs a network
DeviceOption = Annotated[
    str, typer.Option("--device", help="auto (CUDA when present, else CPU), cpu or cuda.")
]
#: ``--threads`` of every command that runs torch on the CPU
ThreadsOption = Annotated[
    int | None, typer.Option("--threads", help="CPU threads for torch (default: torch's choice).")
]


def parse_shape(values: list[int] | None, option: str = "--shape") -> tuple[int, int, int]:
    """Validate a 3-int shape option (``--shape 64 64 64`` or one value for a cube)."""
    vals = list(values or [])
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or any(v < 8 for v in vals):
        raise InputError(option, f"expected 1 or 3 integers >= 8, got {vals}")
    return (vals[0], vals[1], vals[2])


def parse_int_list(text: str, option: str) -> list[int]:
    """``"47,48"`` -> ``[47, 48]`` with a clear error naming the option."""
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as exc:
        raise InputError(option, f"expected comma-separated integers, got {text!r}") from exc
    return out


def set_threads(threads: int | None) -> None:
    """Apply a ``--threads`` option to torch (``None`` keeps torch's default)."""
    if threads is not None:
        if threads < 1:
            raise InputError("--threads", f"expected a positive number, got {threads}")
        import torch

        torch.set_num_threads(threads)
