"""Provenance recorded in every checkpoint, sidecar and ``.uns[key]["params"]``."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import neuroexplain

__all__ = ["config_hash", "provenance", "sha256_file"]


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(params: dict[str, Any]) -> str:
    """A stable short hash of a JSON-serialisable parameter dict (key order does not matter)."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def provenance(
    params: dict[str, Any],
    *,
    seed: int | None = None,
    inputs: Iterable[str | os.PathLike[str]] = (),
    command: str | None = None,
) -> dict[str, Any]:
    """The provenance block every output carries.

    Args:
        params: the parameters (config subset / command options) that produced the output.
        seed: the random seed used, if any.
        inputs: input files; their sha256 checksums are recorded.
        command: the ``neuroexplain`` subcommand that wrote the output.

    Returns:
        ``{"package": ..., "version": ..., "command": ..., "seed": ..., "params": ...,
        "config_hash": ..., "inputs": {"paths": [...], "sha256": [...]}, "python": ...,
        "torch": ...}`` — only strings, numbers, lists and dicts with plain keys, so the block can
        be stored in JSON sidecars, checkpoints and AnnData ``.uns`` alike.
        Deliberately free of timestamps and host names so identical runs give identical files.
    """
    import torch

    files = [str(p) for p in inputs if Path(p).is_file()]
    return {
        "package": "neuroexplain",
        "version": neuroexplain.__version__,
        "command": command,
        "seed": seed,
        "params": params,
        "config_hash": config_hash(params),
        "inputs": {"paths": files, "sha256": [sha256_file(p) for p in files]},
        "python": platform.python_version(),
        "torch": str(torch.__version__),
    }
