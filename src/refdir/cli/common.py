"""Pieces shared by the command modules: the console, the one error path, and the model options.

Every command that loads a model takes the same model options, declared once here from
:class:`refdir.core.spec.ModelSpec`: ``@model_options`` gives a command the model argument and the options and
hands it one ``spec: ModelSpec``; ``@model_overrides`` gives a command that reloads a recorded model (a run's or a
search's) the same options, defaulting to the recorded values, and hands it the ones given as ``overrides: dict``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import typer
from rich.console import Console

from refdir.core.spec import ModelSpec
from refdir.errors import RefdirError

console = Console(stderr=True)

ModelArg = typer.Argument("default", help="'default' (embedded Qwen2.5-Coder-0.5B-Instruct), a .gguf file, a model "
                                          "dir or a hub id")

# the model options (ModelSpec's fields besides the model itself): type and help; defaults come from ModelSpec
MODEL_OPTIONS: dict[str, tuple[Any, str]] = {
    "dtype": (str, "auto (bf16 where the hardware runs it natively, else fp32), fp32, bf16, fp16"),
    "device": (str, "torch device: cpu, cuda, cuda:1, mps"),
    "device_map": (str | None, "accelerate device_map (auto, balanced, or a JSON map), to split a model across "
                               "devices"),
    "trust_remote_code": (bool, "allow model repos to run their own code"),
    "system": (str | None, "system prompt"),
    "chat_template": (str | None, "template string with {instruction}, for models without a chat template"),
}


def fail(e: Exception) -> None:
    """Print one plain error line (never re-wrapped to the terminal width) and exit with status 2."""
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def one_error_line(command):
    """Wrap a command so that a RefdirError ends it through :func:`fail` (one ``error: ...`` line, exit 2)."""

    @functools.wraps(command)
    def wrapper(**kwargs):
        try:
            return command(**kwargs)
        except RefdirError as e:
            fail(e)

    return wrapper


def _with_options(command, target: str, options: list[inspect.Parameter], build):
    """``command`` with ``options`` added to its typer parameters; the values given for them are turned into one
    value by ``build`` and passed as ``target``."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != target]
    params = [p for p in options if p.kind == p.POSITIONAL_OR_KEYWORD] + own + \
        [p for p in options if p.kind == p.KEYWORD_ONLY]
    names = [p.name for p in options]

    @functools.wraps(command)
    def wrapper(**kwargs):
        given = {n: kwargs.pop(n) for n in names}
        return command(**kwargs, **{target: build(given)})

    wrapper.__signature__ = inspect.Signature([p.replace(kind=p.POSITIONAL_OR_KEYWORD) for p in params])
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def _option(name: str, typ, default, help_: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=typ,
                             default=typer.Option(default, help=help_))


def model_options(command):
    """Give ``command`` the model argument (first) and the model options; it receives them as ``spec``."""
    fields = ModelSpec.model_fields
    options = [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str, default=ModelArg)]
    options += [_option(n, typ, fields[n].default, h) for n, (typ, h) in MODEL_OPTIONS.items()]
    return _with_options(command, "spec", options, lambda given: ModelSpec(**given))


def model_overrides(command):
    """Give ``command``, which reloads a recorded model, the model options with no default; it receives the ones
    given (not None) as ``overrides``, to replace the recorded settings."""
    options = [_option(n, typ | None, None, f"{h} (default: as recorded)") for n, (typ, h) in MODEL_OPTIONS.items()]
    return _with_options(command, "overrides", options,
                         lambda given: {k: v for k, v in given.items() if v is not None})
