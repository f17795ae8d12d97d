"""The ``refdir`` command line: every command, in the order ``refdir --help`` lists them.

The commands are plain functions in the ``refdir.cli`` modules; this module is the one place that registers
them, each through :func:`refdir.cli.common.one_error_line` (an expected failure ends a command with one
``error: ...`` line and exit status 2; an unexpected one prints its traceback and says it is a bug).
"""

from __future__ import annotations

import sys

import typer

from refdir import __version__
from refdir.cli import analysis, evaluation, optimize, run, search, steering
from refdir.cli.common import OneLineUsageErrors, describe, expected_errors, one_error_line
from refdir.core.memory import tune_allocator

app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True,
                  help="The refusal direction in chat language models.")
analyze_app = typer.Typer(no_args_is_help=True, help="Mechanistic analysis of a run's refusal direction (paper §5).")
caa_app = typer.Typer(no_args_is_help=True, help="Contrastive Activation Addition: A/B steering vectors.")

COMMANDS = [  # (group, command name, function)
    (app, "extract", run.extract),
    (app, "run", run.run),
    (app, "orthogonalize", run.orthogonalize),
    (app, "eval", evaluation.eval_cmd),
    (app, "bench", evaluation.bench),
    (analyze_app, "geometry", analysis.geometry),
    (analyze_app, "suffix", analysis.suffix),
    (caa_app, "train", steering.caa_train),
    (caa_app, "sweep", steering.caa_sweep),
    (caa_app, "generate", steering.caa_generate),
    (app, "jailbreak", steering.jailbreak),
    (app, "bias", steering.bias),
    (app, "steer", steering.steer),
    (app, "convert-vector", steering.convert_vector),
    (app, "search", search.search),
    (app, "export", search.export),
    (app, "optimize", optimize.optimize),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"refdir {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print refdir's version and exit.")) -> None:
    """refdir: find, remove and add the refusal direction of a chat model."""


for _group, _name, _command in COMMANDS:
    _group.command(_name)(one_error_line(_command))
app.add_typer(analyze_app, name="analyze")
app.add_typer(caa_app, name="caa")


def main() -> None:  # pragma: no cover
    """The console script. Every command already ends through the one error path; what fails outside a command
    ends the same way (usage errors: :class:`refdir.cli.common.OneLineUsageErrors`)."""
    tune_allocator()
    try:
        app()
    except expected_errors() as e:
        typer.echo(f"error: {describe(e)}", err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
