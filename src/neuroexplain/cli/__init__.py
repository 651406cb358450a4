"""The ``neuroexplain`` command: one subcommand per workflow stage.

Each stage's command lives in its own module of this package and registers itself on ``app``;
heavy imports (torch, MONAI, scanpy) happen inside the command bodies so ``--help`` is instant.
User errors (:class:`neuroexplain.errors.NeuroexplainError`) print one line and exit non-zero;
``neuroexplain --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="neuroexplain",
    help="Explain deep models of brain MRI and spatial transcriptomics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_STATE = {"debug": False}

# modules whose import registers commands on ``app`` (one per stage)
_COMMAND_MODULES = (
    "neuroexplain.cli.data",
    "neuroexplain.cli.ingest",
    "neuroexplain.cli.cohort",
    "neuroexplain.cli.classifier",
    "neuroexplain.cli.quality",
    "neuroexplain.cli.concepts3d",
    "neuroexplain.cli.simulator",
    "neuroexplain.cli.st",
    "neuroexplain.cli.report",
)


def _version_callback(value: bool) -> None:
    if value:
        from neuroexplain import __version__

        typer.echo(f"neuroexplain {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(
        False,
        "--debug",
        help="Show full tracebacks instead of one-line errors.",
        envvar="NEUROEXPLAIN_DEBUG",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """Explain deep models of brain MRI and spatial transcriptomics."""
    _STATE["debug"] = debug
    setup_logging(logging.DEBUG if verbose or debug else logging.INFO)


def setup_logging(level: int = logging.INFO) -> None:
    """Rich log handler on stderr (plain when stderr is not a terminal, e.g. Snakemake logs)."""
    from rich.console import Console
    from rich.logging import RichHandler

    console = Console(stderr=True)
    handler = RichHandler(
        console=console,
        show_path=False,
        rich_tracebacks=False,
        show_time=console.is_terminal,
        markup=False,
    )
    logging.basicConfig(level=level, format="%(name)s: %(message)s", handlers=[handler], force=True)


def _register() -> None:
    for mod in _COMMAND_MODULES:
        importlib.import_module(mod)


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a library's multi-line text joined with spaces).

    Spacing inside a line is kept: a message may quote values that differ only in whitespace.
    """
    return " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    from neuroexplain.errors import NeuroexplainError

    _register()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get(
        "NEUROEXPLAIN_DEBUG", ""
    ).lower() in {"1", "true", "yes"}
    try:
        app(args=argv, standalone_mode=False)
    except NeuroexplainError as exc:
        if debug:
            raise
        typer.echo(f"error: {_one_line(exc)}", err=True)
        return exc.exit_code
    except SystemExit as exc:  # typer.Exit inside commands
        return int(exc.code or 0)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        return 130
    except Exception as exc:  # the user sees one line; --debug shows the rest
        exit_code = getattr(exc, "exit_code", None)
        if hasattr(exc, "show") and isinstance(exit_code, int):  # click / typer usage errors
            exc.show()
            return exit_code
        if type(exc).__name__ == "Exit" and isinstance(exit_code, int):
            return exit_code
        if debug:
            raise
        typer.echo(
            f"error: unexpected {type(exc).__name__}: {_one_line(exc)} "
            "(rerun with --debug for the traceback)",
            err=True,
        )
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
