"""Steering-vector commands: `refdir caa train|sweep|generate`, `refdir jailbreak`, `refdir bias`, `refdir steer`,
`refdir convert-vector`."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer

from refdir.cli.common import console, model_options
from refdir.core.direction_paths import load_direction, run_of
from refdir.core.generation import generate
from refdir.core.interventions import ablate
from refdir.core.io import atomic_dir
from refdir.core.preflight import check_output
from refdir.core.spec import ModelSpec
from refdir.errors import RefdirError
from refdir.steering import bias as bias_study
from refdir.steering import caa
from refdir.steering import jailbreak as jailbreak_study
from refdir.steering.vectors import POSITIONS, SteeringVector
from refdir.steering.vectors import steer as steering_hooks

DirectionOpt = typer.Option(Path("runs/demo"), help="the refusal direction: a direction file, or a run directory "
                                                    "(its selected direction; by default the README's demo run)")
StudyOutOpt = typer.Option(..., "--out", help="output directory (summary.json, report.html, vectors)")
ForceOpt = typer.Option(False, help="overwrite an existing output directory")


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise RefdirError(f"expected comma-separated numbers, got {s!r}") from e


def _print_study(summary: dict, out: Path, keys: tuple[str, ...]) -> None:
    """A study's per-category numbers (rounded) and where its report is."""
    for k in keys:
        console.print(f"{k.replace('_', ' ')}: { {c: round(v, 3) for c, v in summary[k].items()} }")
    console.print(f"report: [bold]{out / 'report.html'}[/]")


def _layers(s: str | None) -> list[int] | None:
    if s is None:
        return None
    try:
        if ":" in s:
            a, b = s.split(":")
            return list(range(int(a), int(b)))
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise RefdirError(f"expected layers as A:B or a comma list, got {s!r}") from e


@model_options
def caa_train(
    spec: ModelSpec,
    out: Path = typer.Option(..., "--out", help="output directory: vector.safetensors + vector.json (+ vector.gguf)"),
    behaviour: str = typer.Option("embedded", help="embedded[:refusal|:myopic] or an A/B .jsonl/.json file"),
    gguf: bool = typer.Option(False, help="also write a llama.cpp control vector (vector.gguf)"),
    force: bool = typer.Option(False),
) -> None:
    """Train a CAA vector (every layer) on the behaviour's train split."""
    items = caa.split(caa.load_behaviour(behaviour), "train")
    check_output(out, "dir", [spec.model, behaviour])
    lm, fmt = spec.load()
    with atomic_dir(out, force=force) as tmp:
        sv = caa.train(lm.model, fmt, items, model_id=lm.model_id)
        sv.save(tmp / "vector")
        if gguf:
            sv.only([x for x in sv.layers if x >= 2]).to_gguf(tmp / "vector.gguf")
    console.print(f"CAA vector ({len(items)} pairs) written to [bold]{out / 'vector.safetensors'}[/]")


@model_options
def caa_sweep(
    spec: ModelSpec,
    out: Path = typer.Option(..., "--out", help="output directory (sweep.json, report.html, vector)"),
    behaviour: str = typer.Option("embedded"),
    vector: Path = typer.Option(None, help="a trained vector (default: train one on the train split)"),
    layers: str = typer.Option(None, help="layers to sweep, A:B or a comma list (default: L/4..3L/4)"),
    multipliers: str = typer.Option("-2,-1.5,-1,-0.5,0,0.5,1,1.5,2", help="multipliers at the best layer"),
    every_position: bool = typer.Option(False, help="steer every prompt position (default: after the instruction)"),
    force: bool = typer.Option(False),
) -> None:
    """Layer sweep (±1) and multiplier sweep of P(matching answer) on the test split, with plots."""
    items = caa.load_behaviour(behaviour)
    mults = _floats(multipliers)
    check_output(out, "dir", [spec.model, behaviour, vector])
    lm, fmt = spec.load()
    sv = SteeringVector.load(vector) if vector else None
    with atomic_dir(out, force=force) as tmp:
        if sv is None:
            sv = caa.train(lm.model, fmt, caa.split(items, "train"), model_id=lm.model_id)
        sv.check_fits(lm.model)
        sv.save(tmp / "vector")
        res = caa.sweep_report(lm.model, fmt, caa.split(items, "test"), sv, tmp, _layers(layers), mults,
                               after_instruction=not every_position)
    ms = res["multiplier_sweep"]
    console.print(f"best layer {ms['layer']}; P(matching) at multipliers {ms['multipliers']}: "
                  f"{[round(p, 3) for p in ms['p']]}; monotonic: {ms['monotonic_increasing']}")
    console.print(f"report: [bold]{out / 'report.html'}[/]")


@model_options
def caa_generate(
    spec: ModelSpec,
    vector: Path = typer.Option(..., help="steering vector file"),
    layer: int = typer.Option(..., help="layer to steer (input of this block)"),
    prompt: list[str] = typer.Option(..., "--prompt", help="a user message (repeatable)"),
    multipliers: str = typer.Option("-1,0,1"),
    positions: str = typer.Option("all", help="prompt, generated or all"),
    max_new_tokens: int = typer.Option(64),
) -> None:
    """Open-ended greedy generation under several multipliers."""
    sv = SteeringVector.load(vector)
    lm, fmt = spec.load()
    outs = caa.generate_steered(lm.model, fmt, list(prompt), sv, layer, _floats(multipliers), positions=positions,
                                max_new_tokens=max_new_tokens)
    for m, texts in outs.items():
        for p, t in zip(prompt, texts, strict=True):
            typer.echo(f"[×{m:g}] {p}\n  → {t}\n")


@model_options
def jailbreak(
    spec: ModelSpec,
    out: Path = StudyOutOpt,
    direction: Path = DirectionOpt,
    templates: str = typer.Option("embedded", help="embedded or a .json file of templates by class"),
    n_train: int = typer.Option(16, help="harmful instructions for the vectors"),
    n_test: int = typer.Option(6, help="harmful instructions per transfer-matrix cell"),
    layer: int = typer.Option(None, help="layer for cosines and transfer (default: the direction's)"),
    max_new_tokens: int = typer.Option(32),
    force: bool = ForceOpt,
) -> None:
    """Jailbreak vectors per template class: cosines, transfer matrix, harmfulness suppression."""
    jailbreak_study.load_templates(templates)  # fail on bad templates, or a bad direction, before loading the model
    load_direction(direction)
    check_output(out, "dir", [spec.model, direction, templates])
    lm, fmt = spec.load()
    res = jailbreak_study.study(lm, fmt, out, direction=direction, templates=templates, n_train=n_train,
                                n_test=n_test, layer=layer, max_new_tokens=max_new_tokens, force=force)
    _print_study(res["summary"], out, ("cosine_with_r", "suppression"))


@model_options
def bias(
    spec: ModelSpec,
    data: str = typer.Option("embedded", help="embedded or a StereoSet intrasentence .json/.jsonl"),
    out: Path = StudyOutOpt,
    direction: Path = DirectionOpt,
    layer: int = typer.Option(None, help="layer (default: the direction's)"),
    multipliers: str = typer.Option("-4,-2,-1,0,1,2,4"),
    force: bool = ForceOpt,
) -> None:
    """Bias vectors per StereoSet category: cosine table with r, stereotype-preference curves."""
    bias_study.load_stereoset(data)
    load_direction(direction)
    mults = _floats(multipliers)
    check_output(out, "dir", [spec.model, direction, data])
    lm, _ = spec.load()
    res = bias_study.study(lm, out, direction=direction, data=data, layer=layer, multipliers=mults, force=force)
    _print_study(res["summary"], out, ("cosine_with_r",))


@model_options
def steer(
    spec: ModelSpec,
    vector: Path = typer.Option(None, help="steering vector (.safetensors, llama.cpp .gguf), refdir direction or a "
                                "run dir (its direction); without it the model as it is (e.g. RUN/checkpoint/model)"),
    coeff: float = typer.Option(1.0, help="multiplier of the vector (add mode)"),
    layer: list[int] = typer.Option(None, help="layers to steer (default: every layer of the vector)"),
    mode: str = typer.Option("add", help="add, or ablate (project the vector's direction out everywhere)"),
    positions: str = typer.Option("all", help="prompt, generated or all"),
    prompt: list[str] = typer.Option(None, "--prompt", help="user message(s), each answered on its own; without it: "
                                     "interactive chat (a message a line, /reset forgets the conversation)"),
    max_new_tokens: int = typer.Option(128),
) -> None:
    """Generate, or chat interactively, with a steering vector added (or a direction ablated); without --vector,
    with the model as it is, e.g. to try a run's edited checkpoint beside the base model."""
    if mode not in ("add", "ablate"):
        raise RefdirError(f"unknown mode {mode!r}; use add or ablate")
    if positions not in POSITIONS:
        raise RefdirError(f"unknown position mode {positions!r}; use one of {POSITIONS}")
    if vector is None and (layer or mode != "add" or coeff != 1.0 or positions != "all"):
        raise RefdirError("--layer, --mode, --coeff and --positions steer with a vector: give --vector")
    sv = None if vector is None else _vector(vector)
    spec.check()
    lm, fmt = spec.load()
    layers = list(layer) if layer else None
    if sv is not None:
        sv.check_fits(lm.model)
        for x in layers or []:
            sv[x]  # one clear error for a layer the vector lacks, before chatting

    def hooks():
        if sv is None:
            return contextlib.nullcontext()
        if mode == "ablate":
            return ablate(lm.model, sv[(layers or sv.layers)[0]])
        return steering_hooks(lm.model, sv, coeff, positions=positions, layers=layers)

    prompts = list(prompt or [])
    if prompts:  # one answer per prompt, each on its own
        with hooks():
            outs = generate(lm.model, fmt, prompts, max_new_tokens=max_new_tokens, progress=False)
        for p, t in zip(prompts, outs, strict=True):
            typer.echo(f"{p}\n  → {t}\n")
        return
    history: list[dict] = []  # the conversation so far (a plain --chat-template holds one message: no history)
    ask = "you> " if sys.stdin.isatty() else ""  # messages piped in (a line each): the answers alone
    while True:
        try:
            line = input(ask).strip()
        except EOFError:
            break
        if line in ("", "/quit", "/exit"):
            break
        if line == "/reset":
            history = []
            continue
        turn = [*history, {"role": "user", "content": line}]
        with hooks():
            answer = generate(lm.model, fmt, [turn], max_new_tokens=max_new_tokens, progress=False)[0]
        typer.echo(answer)
        if fmt.template is None:
            history = [*turn, {"role": "assistant", "content": answer}]


def _vector(path: Path) -> SteeringVector:
    """A steering vector file, a direction file, or a run directory standing for its selected direction."""
    return SteeringVector.from_direction(load_direction(path)) if run_of(path) else SteeringVector.load(path)


def convert_vector(
    src: Path = typer.Argument(..., help="steering vector: .safetensors (+ .json), refdir direction, .gguf, or a "
                                         "run dir (its selected direction)"),
    dst: Path = typer.Argument(..., help="output: .gguf (llama.cpp control vector) or .safetensors"),
    force: bool = typer.Option(False, help="overwrite an existing output file"),
) -> None:
    """Convert between refdir's safetensors format and llama.cpp control vectors."""
    if dst.suffix not in (".gguf", ".safetensors"):
        raise RefdirError(f"the output {dst} must end in .gguf (llama.cpp control vector) or .safetensors")
    sv = _vector(src)
    path = sv.to_gguf(dst, force=force) if dst.suffix == ".gguf" else sv.save(dst, force=force)
    console.print(f"written [bold]{path}[/]")
