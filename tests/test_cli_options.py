"""The command line's shape: every command that loads a model takes the same model options (declared once, from
ModelSpec), the two kinds of judge have different option names, and bad input ends in one error line."""

from __future__ import annotations

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from refdir.cli.common import MODEL_OPTIONS, model_options, model_overrides, one_error_line
from refdir.cli.main import app
from refdir.core.spec import ModelSpec
from refdir.errors import RefdirError

MODEL_LOADING = ["extract", "run", "orthogonalize", "eval", "bench", "analyze geometry", "analyze suffix", "search",
                 "export", "caa train", "caa sweep", "caa generate", "jailbreak", "bias", "steer", "optimize"]
NO_MODEL = ["convert-vector"]
OPTION_NAMES = {"--dtype", "--device", "--device-map", "--trust-remote-code", "--allow-pickle", "--system",
                "--chat-template"}


def _command(path: str):
    cmd = get_command(app)
    for part in path.split():
        cmd = cmd.commands[part]
    return cmd


def _leaves(cmd, prefix=()):
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _leaves(sub, (*prefix, name))
    else:
        yield " ".join(prefix)


def _options(path: str) -> set[str]:
    return {o for p in _command(path).params for o in p.opts}


def test_model_options_are_modelspecs_fields():
    assert set(MODEL_OPTIONS) == set(ModelSpec.model_fields) - {"model"}
    assert {"--" + n.replace("_", "-") for n in MODEL_OPTIONS} == OPTION_NAMES


def test_every_command_is_listed_here():
    assert sorted(_leaves(get_command(app))) == sorted(MODEL_LOADING + NO_MODEL)


@pytest.mark.parametrize("path", MODEL_LOADING)
def test_model_loading_command_takes_the_model_options(path):
    assert OPTION_NAMES <= _options(path)


@pytest.mark.parametrize("path", MODEL_LOADING)
def test_help_shows_device_map(path):
    r = CliRunner().invoke(app, [*path.split(), "--help"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240"})
    assert r.exit_code == 0, r.output
    assert "--device-map" in r.output


def test_judge_names():
    assert "--safety-judge" in _options("eval") and "--judge" not in _options("eval")
    assert "--judge" in _options("run") and "--judge" not in _options("search")


def _tiny_app(command) -> typer.Typer:
    a = typer.Typer()
    a.command("x")(one_error_line(command))
    a.command("unused")(lambda: None)  # two commands, so "x" is named on the command line
    return a


def test_model_options_hand_the_command_one_spec():
    seen = {}

    @model_options
    def cmd(spec: ModelSpec, n: int = typer.Option(1)) -> None:
        seen.update(spec=spec, n=n)

    r = CliRunner().invoke(_tiny_app(cmd), ["x", "some/model", "--n", "3", "--dtype", "fp32", "--device-map", "auto",
                                            "--trust-remote-code", "--system", "be brief"])
    assert r.exit_code == 0, r.output
    assert seen == {"n": 3, "spec": ModelSpec(model="some/model", dtype="fp32", device_map="auto",
                                              trust_remote_code=True, system="be brief")}
    r = CliRunner().invoke(_tiny_app(cmd), ["x"])
    assert r.exit_code == 0 and seen["spec"] == ModelSpec()  # the defaults are ModelSpec's


def test_model_overrides_hold_only_the_options_given():
    seen = {}

    @model_overrides
    def cmd(overrides: dict, where: str = typer.Argument(...)) -> None:
        seen.update(overrides=overrides, where=where)

    r = CliRunner().invoke(_tiny_app(cmd), ["x", "runs/a", "--device", "cuda", "--no-trust-remote-code"])
    assert r.exit_code == 0, r.output
    assert seen == {"where": "runs/a", "overrides": {"device": "cuda", "trust_remote_code": False}}
    CliRunner().invoke(_tiny_app(cmd), ["x", "runs/a"])
    assert seen["overrides"] == {}


def test_a_refdir_error_is_one_line_and_exit_2():
    @model_options
    def cmd(spec: ModelSpec) -> None:
        raise RefdirError("bad input")

    r = CliRunner().invoke(_tiny_app(cmd), ["x"])
    assert r.exit_code == 2 and r.output.strip() == "error: bad input"
    r = CliRunner().invoke(_tiny_app(cmd), ["x", "--dtype", "fp5"])  # refused by ModelSpec, the same way
    assert r.exit_code == 2 and r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1


def test_version():
    """`refdir --version` prints the installed version and exits 0, without running a command."""
    from importlib.metadata import version

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output == f"refdir {version('refdir')}\n"
