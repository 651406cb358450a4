"""Crash-safe outputs: write to a temporary sibling, then rename into place.

A reader (or Snakemake) never sees a half-written file: either the old state or the complete new
file. If the body raises, the temporary file or folder is removed and nothing is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_output", "save_torch", "write_json", "write_table"]


def _suffixes(path: Path) -> str:
    # keep the full suffix (".nii.gz", ".h5ad") so writers that dispatch on it still work
    return "".join(path.suffixes)


@contextmanager
def atomic_output(path: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` when the block succeeds.

    Args:
        path: final destination (a file, or a folder with ``directory=True``).
        directory: create and yield a temporary folder instead of a file path.

    Yields:
        The temporary path to write to (same folder, same suffix, so it is on the same file system
        and format detection by suffix still works).

    Example:
        >>> with atomic_output("out/table.tsv") as tmp:  # doctest: +SKIP
        ...     df.to_csv(tmp, sep="\\t")
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(
            prefix=f".{final.name}.", suffix=f".tmp{_suffixes(final)}", dir=final.parent
        )
        os.close(fd)
        tmp = Path(name)
        tmp.unlink()  # writers create it themselves; an empty file would be a partial output
    try:
        yield tmp
        if directory:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        else:
            if not tmp.exists():
                raise FileNotFoundError(f"nothing was written to the temporary file for {final}")
            os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as indented, key-sorted JSON, atomically. NumPy scalars and arrays are fine."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def write_table(df: Any, path: str | os.PathLike[str], *, index: bool = False) -> Path:
    """Write a pandas DataFrame as TSV (or CSV for ``.csv``), atomically."""
    sep = "," if str(path).endswith(".csv") else "\t"
    with atomic_output(path) as tmp:
        df.to_csv(tmp, sep=sep, index=index)
    return Path(path)


def save_torch(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` atomically and reproducibly (identical objects give identical bytes).

    ``torch.save(obj, filename)`` names the zip archive's root folder after the file name, so
    saving to a random temporary name would make every checkpoint differ; writing through an
    open file object gives a fixed archive name. Load with ``torch.load(path, weights_only=True)``.
    """
    import torch

    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)
