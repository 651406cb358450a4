"""Command-line options generated from the settings dataclasses of :mod:`neuroexplain.settings`.

A command declares the settings it takes as parameters annotated with their dataclass, and
:func:`settings_options` replaces each such parameter by one option per field (name, default and
help from the field), then builds the dataclass from the parsed options before calling the
command. The defaults therefore exist once, in the dataclass.

Example:
    >>> @app.command("train-classifier")  # doctest: +SKIP
    ... @settings_options(config=ClassifierConfig)
    ... def train_classifier_cmd(preproc: ..., config: ClassifierConfig, device: DeviceOption):
    ...     train_classifier(preproc, out, config)
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import fields
from typing import Annotated, Any

import typer

from neuroexplain.errors import InputError
from neuroexplain.settings import cli_flag, field_default

__all__ = ["SETTINGS_ATTR", "settings_options"]

#: attribute of a generated command listing ``(parameter, settings class)`` pairs (for tests)
SETTINGS_ATTR = "__neuroexplain_settings__"


def _tuple_item(tp: Any) -> type | None:
    """``int`` / ``str`` for a ``tuple[int, ...]`` / ``tuple[str, ...]`` field, else ``None``."""
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[:1] in ((int,), (str,)):
        return typing.get_args(tp)[0]
    return None


def _option(cls: type, f: Any, tp: Any) -> tuple[Any, Any]:
    """``(annotation, default)`` of the generated option of field ``f``."""
    meta = f.metadata
    names = meta.get("flag") or cli_flag(cls, f.name)
    names = names if isinstance(names, tuple) else (names,)
    default = field_default(f)
    if tp is bool:
        if "/" not in names[0]:  # --name/--no-name
            names = (f"{names[0]}/--no-{names[0][2:]}", *names[1:])
        return Annotated[bool, typer.Option(*names, help=meta["help"])], default
    item = _tuple_item(tp)
    if item is not None and meta.get("multiple"):  # the option repeated, one value each
        return Annotated[list[item], typer.Option(*names, help=meta["help"])], list(default)
    if item is not None:  # a comma-separated list on the command line
        text = ",".join(str(v) for v in default)
        return Annotated[str, typer.Option(*names, help=meta["help"])], text
    return Annotated[tp, typer.Option(*names, help=meta["help"])], default


def _parse_value(cls: type, name: str, tp: Any, value: Any) -> Any:
    """The field value of an option's parsed value (lists and comma-separated text: tuples)."""
    item = _tuple_item(tp)
    if item is not None and isinstance(value, list | tuple):
        return tuple(value)
    if item is not None and isinstance(value, str):
        parts = [t for t in value.replace(" ", "").split(",") if t]
        try:
            return tuple(item(t) for t in parts)
        except ValueError as exc:
            raise InputError(
                cli_flag(cls, name), f"expected comma-separated integers, got {value!r}"
            ) from exc
    return value


def settings_options(**params: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn the settings parameters of a command into one option per dataclass field.

    Args:
        **params: ``parameter name -> settings dataclass``; each named parameter of the
            decorated function is removed from the command line and filled with an instance
            built from the generated options. A field whose name is also a parameter of the
            function (e.g. ``device`` from the shared ``DeviceOption``) is not generated: the
            function's option fills both. Fields with ``cli=False`` keep their defaults.

    Returns:
        A decorator for a typer command function (apply it below ``@app.command``).
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(func)
        local = {cls.__name__: cls for cls in params.values()}
        hints = typing.get_type_hints(func, localns=local, include_extras=True)
        own = [p for p in sig.parameters.values() if p.name not in params]
        own_names = {p.name for p in own}
        kept = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
        generated: list[inspect.Parameter] = []
        plan: dict[str, list[tuple[str, Any, bool]]] = {}
        for pname, cls in params.items():
            types = typing.get_type_hints(cls)
            plan[pname] = []
            for f in fields(cls):
                shared = f.name in own_names
                if not f.metadata.get("cli", True) and not shared:
                    continue
                plan[pname].append((f.name, types[f.name], shared))
                if not shared:
                    ann, default = _option(cls, f, types[f.name])
                    generated.append(
                        inspect.Parameter(
                            f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann
                        )
                    )
        taken = [p.name for p in generated]
        if len(set(taken)) != len(taken) or own_names & set(taken):
            raise TypeError(f"settings fields collide in {func.__name__}: {sorted(taken)}")

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            for pname, cls in params.items():
                values = {}
                for name, tp, shared in plan[pname]:
                    value = kwargs[name] if shared else kwargs.pop(name)
                    values[name] = _parse_value(cls, name, tp, value)
                kwargs[pname] = cls(**values)
            return func(**kwargs)

        params_all = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in kept] + generated
        command.__signature__ = sig.replace(parameters=params_all)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params_all}
        setattr(command, SETTINGS_ATTR, tuple(params.items()))
        return command

    return decorate
