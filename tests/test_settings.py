"""One source of truth for every default: library, command line, config schema, config, manual.

The settings dataclasses of :mod:`neuroexplain.settings` hold the defaults. These tests fail when
a command's option, the workflow schema, ``config/config.yaml`` or the ``config/README.md``
tables say anything else.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, ClassVar

import pytest
import typer
import yaml
from typer.testing import CliRunner

from neuroexplain.cli import app
from neuroexplain.cli._settings import SETTINGS_ATTR, _parse_value, settings_options
from neuroexplain.settings import (
    SETTINGS,
    cli_flag,
    config_key,
    config_value,
    field_default,
    setting,
)

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
            types = typing.get_type_hints(cls)
            cli_default = _parse_value(cls, f.name, types[f.name], param.default)
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
        name = key.partition("[")[0]
        assert name in props, f"{cls.SECTION}.{key} ({cls.__name__}.{f.name}) is not in the schema"
        want = _norm(field_default(f))
        defaults = {name: props[name].get("default")}
        assert _norm(config_value(defaults, key)) == want, f"schema {cls.SECTION}.{key}"
        if name in config:
            assert _norm(config_value(config, key)) == want, (
                f"config/config.yaml {cls.SECTION}.{key}"
            )


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
        name = f"{cls.SECTION}.{key.partition('[')[0]}"
        assert name in rows, f"config/README.md has no row for {name}"
        value = yaml.safe_load(rows[name]) if rows[name] != "" else ""
        if rows[name] in ('""', "''"):
            value = ""
        value = config_value({name: value}, name + key[len(key.partition("[")[0]) :])
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


def test_generated_options_aliases_switches_lists_and_repeats():
    """A flag alias, a named off-switch, a comma-separated list of names, a repeated option."""

    @dataclass
    class Toy:
        SECTION: ClassVar[str] = "toy"
        k: int = setting(5, "Features.", flag=("--n-features", "-k"))
        paired: bool = setting(True, "Pairs.", flag="--paired/--unpaired")
        layers: tuple[str, ...] = setting((), "Layers.")
        shape: tuple[int, ...] = setting((4, 4, 4), "Shape.", multiple=True)

    seen = {}
    toy = typer.Typer()

    @toy.command()
    @settings_options(cfg=Toy)
    def run(cfg: Toy) -> None:
        seen["cfg"] = cfg

    args = ["-k", "3", "--unpaired", "--layers", "a.1,b.2", "--shape", "8", "--shape", "6"]
    result = CliRunner().invoke(toy, [*args, "--shape", "5"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"] == Toy(k=3, paired=False, layers=("a.1", "b.2"), shape=(8, 6, 5))
    assert CliRunner().invoke(toy, []).exit_code == 0
    assert seen["cfg"] == Toy()
    assert cli_flag(Toy, "paired") == "--paired" and cli_flag(Toy, "k") == "--n-features"


def test_library_overrides_and_bad_values_name_the_option():
    from neuroexplain.errors import InputError
    from neuroexplain.settings import CohortConfig, MRIIngestConfig, SaliencyConfig, TCAVConfig

    cfg = TCAVConfig.resolve(None, layers="features.0,features.1", alpha=0.05)
    assert cfg.layers == ("features.0", "features.1") and cfg.alpha == 0.05
    assert TCAVConfig.resolve(cfg, seed=3) == TCAVConfig(
        layers=("features.0", "features.1"), alpha=0.05, seed=3
    )
    with pytest.raises(TypeError, match="unknown TCAVConfig options"):
        TCAVConfig.resolve(None, layer="features.0")
    assert MRIIngestConfig(shape=32).shape == (32, 32, 32)
    assert CohortConfig(magnitude_min=0.1, magnitude_max=0.2).magnitude_range == (0.1, 0.2)
    for cls, kw, flag in [
        (SaliencyConfig, {"methods": "gradient,telepathy"}, "--methods"),
        (SaliencyConfig, {"occlusion_mode": "blur"}, "--occlusion-mode"),
        (TCAVConfig, {"alpha": 1.5}, "--alpha"),
        (CohortConfig, {"fraction": 1.5}, "--fraction"),
        (MRIIngestConfig, {"shape": (64, 64)}, "--shape"),
    ]:
        with pytest.raises(InputError, match=f"^{flag}: expected"):
            cls(**kw)


def test_st_library_defaults_are_the_settings():
    """st-concepts drives scanpy-style functions with their own keyword defaults: the same."""
    import inspect

    from neuroexplain.settings import STConceptsConfig
    from neuroexplain.st.concepts import concept_saliency, genemode
    from neuroexplain.st.vae import SpotVAE

    def defaults(fn):
        return {n: p.default for n, p in inspect.signature(fn).parameters.items()}

    cfg = STConceptsConfig()
    vae, train = defaults(SpotVAE.__init__), defaults(SpotVAE.train)
    cs, gm = defaults(concept_saliency), defaults(genemode)
    assert (vae["n_latent"], vae["likelihood"], vae["n_top_genes"]) == (
        cfg.n_latent,
        cfg.likelihood,
        cfg.n_top_genes,
    )
    assert train["max_epochs"] == cfg.epochs
    assert (cs["method"], cs["saliency"], cs["min_spots"]) == (
        cfg.method,
        cfg.saliency,
        cfg.min_spots,
    )
    assert (gm["n_top_genes"], gm["max_epochs"], gm["saliency"]) == (
        cfg.genemode_n_genes,
        cfg.genemode_epochs,
        cfg.saliency,
    )


def test_settings_and_help_import_nothing_heavy():
    """``neuroexplain <command> --help`` stays instant: no torch / scanpy behind the options."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from neuroexplain.cli import _register\n"
        "_register()\n"
        "heavy = [m for m in ('torch', 'scanpy', 'anndata', 'monai') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
