"""Pieces shared by the command modules: the console, the one error path, and the model options.

Every command that loads a model takes the same model options, declared once here from
:class:`refdir.core.spec.ModelSpec`: ``@model_options`` gives a command the model argument and the options and
hands it one ``spec: ModelSpec``; ``@model_overrides`` gives a command that reloads a recorded model (a run's or a
search's) the same options, defaulting to the recorded values, and hands it the ones given as ``overrides: dict``.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import traceback
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from refdir.core.spec import ModelSpec
from refdir.errors import RefdirError

console = Console(stderr=True)

# click's exception classes as typer raises them: recent typer carries its own copy of click, whose classes are not
# click's (older versions raise click's own). Where click has no NoArgsIsHelpError (before 8.2) nothing raises it.
click_errors = sys.modules[typer.BadParameter.__module__]
_NO_ARGS_IS_HELP = getattr(click_errors, "NoArgsIsHelpError", ())

ModelArg = typer.Argument("default", help="'default' (embedded Qwen2.5-Coder-0.5B-Instruct), a .gguf file, a model "
                                          "dir or a hub id")

# the model options (ModelSpec's fields besides the model itself): type and help; defaults come from ModelSpec
MODEL_OPTIONS: dict[str, tuple[Any, str]] = {
    "dtype": (str, "auto (bf16 where the hardware runs it natively, else fp32), fp32, bf16, fp16"),
    "device": (str, "torch device: cpu, cuda, cuda:1, mps"),
    "device_map": (str | None, "accelerate device_map (auto, balanced, or a JSON map), to split a model across "
                               "devices"),
    "trust_remote_code": (bool, "allow model repos to run their own code"),
    "allow_pickle": (bool, "load pickled weights (.bin/.pt: unpickling can run code) from a model that has no "
                           "safetensors"),
    "system": (str | None, "system prompt"),
    "chat_template": (str | None, "template string with {instruction}, for models without a chat template"),
}

# `run` and `search` take the same direction sources (RunConfig.direction_method)
DIRECTION_METHOD_HELP = ("the search's directions: dim (difference-in-means candidates), rdo (also an optimized "
                         "direction trained from the selected one, as refdir optimize does; adds minutes) or pca (also "
                         "the selected one off the top principal components of harmless activations; seconds)")


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input or an unusable file, not a bug in refdir: RefdirError, OSError
    (missing, unreadable or unwritable paths), ValueError (pydantic's ValidationError, JSONDecodeError,
    UnicodeDecodeError, pyarrow's ArrowInvalid and gguf's parse errors are ValueErrors), KeyError (a file without
    a field refdir needs), a missing optional package (ModuleNotFoundError), safetensors' SafetensorError and
    pyarrow's ArrowException."""
    kinds: list[type[BaseException]] = [RefdirError, OSError, ValueError, KeyError, ModuleNotFoundError]
    try:
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a base dependency
        pass
    try:
        import pyarrow

        kinds.append(pyarrow.ArrowException)
    except ImportError:  # pyarrow comes with refdir[hub]
        pass
    return tuple(kinds)


def describe(e: BaseException) -> str:
    """One line saying what went wrong: a RefdirError's own message; for the other expected errors, the message
    of the library that raised it, made readable (pydantic: ``field: problem``; KeyError: the missing key)."""
    from pydantic import ValidationError

    if isinstance(e, RefdirError):
        return str(e)
    if isinstance(e, ValidationError):
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ())) or e.title
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            parts.append(f"{where}: {err['msg']}{got}")
        msg = "invalid settings: " + "; ".join(parts)
    elif isinstance(e, json.JSONDecodeError):
        msg = f"invalid JSON: {e}"
    elif isinstance(e, ModuleNotFoundError):
        msg = (f"the Python package {e.name!r} is not installed; install the refdir extra this command needs "
               "(refdir[search], refdir[analysis], refdir[eval], refdir[hub] or refdir[attack])")
    elif isinstance(e, KeyError):
        msg = f"missing key {e.args[0]!r}" if e.args else "missing key"
    elif isinstance(e, OSError) and e.filename is not None:
        msg = f"{e.strerror or type(e).__name__}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    else:
        msg = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) or not str(e) else str(e)
    return " ".join(msg.split("\n")).strip()


def _close_progress_bars() -> None:
    """Close the progress bars an error interrupted, so that what follows starts on a line of its own."""
    from tqdm.std import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass


def fail(e: BaseException) -> None:
    """Print one plain error line (never re-wrapped to the terminal width) and exit with status 2."""
    _close_progress_bars()
    if os.environ.get("REFDIR_DEBUG"):
        traceback.print_exception(e)
    typer.echo(f"error: {describe(e)}", err=True)
    raise typer.Exit(2)


def interrupted() -> None:
    """Ctrl-C: one line, exit status 130. Every write is atomic, so nothing half-written is left; a run, a search
    and an optimization keep what they finished and the same command goes on from there."""
    _close_progress_bars()
    typer.echo("interrupted: nothing half-written is left; rerunning a run, search or optimize resumes it", err=True)
    raise typer.Exit(130)


def bug(e: BaseException) -> None:
    """An unexpected exception: its traceback, a line saying it is a bug in refdir, exit status 1."""
    _close_progress_bars()
    traceback.print_exception(e)
    typer.echo(f"refdir stopped on an unexpected {type(e).__name__}: this is a bug in refdir; please report it "
               "with the traceback above", err=True)
    raise typer.Exit(1)


class OneLineUsageErrors(TyperGroup):
    """The command group whose usage errors (an unknown option, an option value that does not parse, a missing
    argument) end like every other bad input: one ``error: ...`` line naming the command's ``--help``, exit status
    2, in place of click's usage box. ``refdir`` or a group given no command still prints its help."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP:
            return super().main(args, prog_name, complete_var, standalone_mode=True, **extra)
        except click_errors.UsageError as e:
            where = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            typer.echo(f"error: {' '.join(e.format_message().split())}{where}", err=True)
            raise SystemExit(2) from None
        except click_errors.ClickException as e:
            typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            raise SystemExit(e.exit_code) from None
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            raise SystemExit(1) from None
        raise SystemExit(rv if isinstance(rv, int) else 0)


def one_error_line(command):
    """Wrap a command in the one error path: an expected failure (:func:`expected_errors`) ends it with one
    ``error: ...`` line and exit status 2, with no traceback; any other exception prints its traceback and says
    it is a bug (exit status 1). typer's own exits and usage errors pass through (the group says usage errors)."""

    @functools.wraps(command)
    def wrapper(**kwargs):
        try:
            return command(**kwargs)
        except (typer.Exit, typer.Abort, click_errors.ClickException):
            raise
        except KeyboardInterrupt:
            interrupted()
        except expected_errors() as e:
            if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "refdir":
                bug(e)  # refdir's own module missing: a broken install or a bug, not bad input
            fail(e)
        except Exception as e:  # noqa: BLE001 - the one place that reports bugs
            bug(e)

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
