"""One source of truth for every default: library, command line, config schema, config, manual.

The settings dataclasses of :mod:`neuroexplain.settings` hold the defaults. These tests fail when
a command's option, the workflow schema, ``config/config.yaml`` or the ``config/README.md``
tables say anything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, ClassVar

import pytest
import typer
import yaml
from typer.testing import CliRunner

from neuroexplain.cli import app
from neuroexplain.cli._settings import SETTINGS_ATTR, settings_options
from neuroexplain.settings import SETTINGS, cli_flag, config_key, field_default, setting

ROOT = Path(__file__).resolve().parents[1]


def _norm(value):
    """Compare tuples with YAML lists and ints with equal floats."""
    if isinstance(value, tuple | list):
        return [_norm(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    return value


def _commands():
    from neuroexplain.cli import _register

    _register()
    return typer.main.get_command(app).commands


def _generated():
    """``(command name, click command, parameter, settings class)`` of every settings command."""
    out = []
    for name, cmd in _commands().items():
        for pname, cls in getattr(cmd.callback, SETTINGS_ATTR, ()):
            out.append((name, cmd, pname, cls))
    return out


def test_every_settings_class_has_a_command():
    used = {cls for *_, cls in _generated()}
    assert set(SETTINGS) <= used, f"settings classes without a command: {set(SETTINGS) - used}"


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_cli_defaults_are_the_library_defaults(cls):
    found = [(name, cmd) for name, cmd, _, c in _generated() if c is cls]
    for name, cmd in found:
        by_flag = {opt: p for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
        for f in fields(cls):
            if not f.metadata.get("cli", True):
                continue
            flag = cli_flag(cls, f.name)
            param = by_flag.get(flag) or by_flag.get("--" + f.name.replace("_", "-"))
            assert param is not None, f"{name}: no option {flag} for {cls.__name__}.{f.name}"
            if param.name != f.name:  # a shared option (e.g. --device) fills the field
                continue
            default = field_default(f)
            cli_default = param.default
            if isinstance(default, tuple):
                cli_default = tuple(int(v) for v in str(cli_default).split(","))
            assert cli_default == default, f"{name} {flag}: CLI {cli_default!r} != {default!r}"
            assert param.help == f.metadata["help"]


def _schema_section(section):
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    return schema["properties"][section]["properties"]


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_schema_and_config_defaults_are_the_library_defaults(cls):
    props = _schema_section(cls.SECTION)
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())[cls.SECTION]
    for f in fields(cls):
        key = config_key(f)
        if key is None:
            continue
        assert key in props, f"{cls.SECTION}.{key} ({cls.__name__}.{f.name}) is not in the schema"
        want = _norm(field_default(f))
        assert _norm(props[key].get("default")) == want, f"schema {cls.SECTION}.{key}"
        if key in config:
            assert _norm(config[key]) == want, f"config/config.yaml {cls.SECTION}.{key}"


def _manual_defaults():
    """``{"section.key": value}`` from the option tables of config/README.md."""
    rows = {}
    pattern = re.compile(r"^\|\s*`([a-z_0-9]+\.[a-z_0-9]+)`\s*\|\s*`([^`]*)`\s*\|", re.M)
    for key, value in pattern.findall((ROOT / "config/README.md").read_text()):
        rows[key] = value
    return rows


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_config_manual_defaults_are_the_library_defaults(cls):
    rows = _manual_defaults()
    for f in fields(cls):
        key = config_key(f)
        if key is None:
            continue
        name = f"{cls.SECTION}.{key}"
        assert name in rows, f"config/README.md has no row for {name}"
        value = yaml.safe_load(rows[name]) if rows[name] != "" else ""
        if rows[name] in ('""', "''"):
            value = ""
        assert _norm(value) == _norm(field_default(f)), f"config/README.md {name}: {rows[name]}"


def test_generated_options_build_the_settings(tmp_path):
    """A generated command fills its dataclass from the options, shared ones included."""

    @dataclass
    class Toy:
        SECTION: ClassVar[str] = "toy"
        steps: int = setting(3, "Steps.")
        sizes: tuple[int, ...] = setting((4, 8), "Sizes.")
        fast: bool = setting(False, "Fast.")
        device: str = setting("auto", "Device.")
        hidden: float = setting(0.5, "Library only.", cli=False)

    seen = {}
    toy = typer.Typer()

    @toy.command()
    @settings_options(cfg=Toy)
    def run(
        cfg: Toy,
        device: Annotated[str, typer.Option("--device", help="shared")] = "cpu",
    ) -> None:
        seen["cfg"] = cfg
        seen["device"] = device

    result = CliRunner().invoke(toy, ["--steps", "5", "--sizes", "1,2,3", "--fast"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"] == Toy(steps=5, sizes=(1, 2, 3), fast=True, device="cpu", hidden=0.5)
    assert seen["device"] == "cpu"
    result = CliRunner().invoke(toy, [])
    assert seen["cfg"] == Toy(device="cpu")
    assert "--hidden" not in CliRunner().invoke(toy, ["--help"]).output
