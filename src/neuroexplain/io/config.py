"""Strict YAML reading: a duplicate key or a syntax error names the file and the line.

PyYAML (and Snakemake's config reader) keep the last of two equal keys without a word, so a
config with ``mri:`` twice silently drops the first block. :class:`StrictLoader` refuses it.

This module imports only the standard library and PyYAML at the top, so the workflow can load
it by file path in a Snakemake process whose environment lacks neuroexplain.

Example:
    >>> import io
    >>> load_yaml_strict(io.StringIO("mri:\\n  a: 1\\nseed: 0\\nmri:\\n  b: 2\\n"))
    Traceback (most recent call last):
    ...
    neuroexplain.io.config.ConfigFileError: <stream>:4: duplicate key 'mri' (first on line 1)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

import yaml

__all__ = ["ConfigFileError", "StrictLoader", "load_yaml_strict", "read_yaml"]

_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigFileError(ValueError):
    """A YAML file that cannot be used: ``path``, 1-based ``line`` (or ``None``) and ``problem``.

    ``str(err)`` is ``"<path>:<line>: <problem>"``.
    """

    __module__ = "neuroexplain.io.config"  # the same name when loaded by file path

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")

    @property
    def where(self) -> str:
        """``"<path>:<line>"`` (or just the path without a line)."""
        return self.path if self.line is None else f"{self.path}:{self.line}"


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice.

    Keys are compared after construction (``yes`` and ``true`` are the same key); a key that
    comes in through a merge (``<<: *defaults``) may still be overridden explicitly.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: SafeLoader reports it below
                    continue
                if first is not None:
                    raise _DuplicateKey(
                        None,
                        None,
                        f"duplicate key {key!r} (first on line {first.start_mark.line + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def load_yaml_strict(source: str | os.PathLike[str] | IO[str]) -> Any:
    """Parse YAML (or JSON) from a path or an open text stream with :class:`StrictLoader`.

    Args:
        source: a file path, or a text stream (its ``name`` is used in messages).

    Returns:
        The parsed document (``None`` for an empty one).

    Raises:
        ConfigFileError: a duplicate key or a syntax error, with the file and 1-based line.
        FileNotFoundError / OSError: the file cannot be opened.
    """
    if isinstance(source, str | os.PathLike):
        name = str(source)
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    else:
        name = str(getattr(source, "name", "<stream>"))
        text = source.read()
    try:
        return yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass: no code runs
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else mark.line + 1
        if isinstance(exc, _DuplicateKey):
            raise ConfigFileError(name, line, str(exc.problem)) from None
        problem = " ".join(str(exc.problem or exc).split())
        context = f" ({' '.join(str(exc.context).split())})" if exc.context else ""
        raise ConfigFileError(name, line, f"YAML syntax error: {problem}{context}") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(name, None, f"YAML error: {' '.join(str(exc).split())}") from None


def read_yaml(path: str | os.PathLike[str], *, what: str = "file") -> Any:
    """:func:`load_yaml_strict` for the package: problems become one-line ``InputError``\\ s.

    Args:
        path: the YAML / JSON file.
        what: what the file is, for the "not found" message (e.g. ``"concept configuration"``).

    Raises:
        InputError: ``"<path>:<line>: duplicate key 'x' (first on line 2)"``, a syntax error with
            its line, a missing or unreadable file.
    """
    from neuroexplain.errors import InputError

    p = Path(path)
    if not p.is_file():
        raise InputError(p, f"{what} not found")
    try:
        return load_yaml_strict(p)
    except ConfigFileError as exc:
        raise InputError(exc.where, exc.problem) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(p, f"cannot read {what} ({exc})") from exc
