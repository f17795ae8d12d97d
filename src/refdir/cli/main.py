"""The ``refdir`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from refdir.cli import analysis as cli_analysis
from refdir.cli import evaluation as cli_evaluation
from refdir.cli import search as cli_search
from refdir.cli import steering as cli_steering
from refdir.cli.common import ModelArg, console
from refdir.cli.common import fail as _fail
from refdir.errors import RefdirError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The refusal direction in chat language models.")


@app.callback()
def _root() -> None:
    """refdir: find, remove and add the refusal direction of a chat model."""



@app.command()
def extract(
    model: str = ModelArg,
    out: Path = typer.Option(..., "--out", help="output directory (refused if it exists, unless --force)"),
    harmful: str = typer.Option("embedded:harmful:train", help="harmful instructions: file, hub id or embedded:harmful:SPLIT"),
    harmless: str = typer.Option("embedded:harmless:train", help="harmless instructions"),
    column: str = typer.Option("instruction", help="column holding the instruction in csv/json/jsonl/parquet"),
    n_train: int = typer.Option(None, help="sample this many of each set (default: all)"),
    seed: int = typer.Option(42),
    system: str = typer.Option(None, help="system prompt"),
    chat_template: str = typer.Option(None, "--chat-template", help="template string with {instruction}, for models without one"),
    dtype: str = typer.Option("auto", help="auto (bf16 where the hardware runs it natively, else fp32), fp32, bf16, fp16"),
    device: str = typer.Option("cpu"),
    device_map: str = typer.Option(None, help="accelerate device_map, e.g. auto"),
    batch_size: int = typer.Option(16),
    trust_remote_code: bool = typer.Option(False, help="allow model repos to run their own code"),
    force: bool = typer.Option(False, help="overwrite an existing output directory"),
) -> None:
    """Cache activations and write the difference-in-means candidates."""
    from refdir.workflows.extract import ExtractConfig, run_extract

    try:
        cfg = ExtractConfig(model=model, harmful=harmful, harmless=harmless, column=column, n_train=n_train,
                            seed=seed, system=system, chat_template=chat_template, dtype=dtype, device=device,
                            device_map=device_map, batch_size=batch_size, trust_remote_code=trust_remote_code)
        path = run_extract(cfg, out, force=force)
    except RefdirError as e:
        _fail(e)
    console.print(f"candidates written to [bold]{path}[/]")


@app.command()
def run(
    model: str = ModelArg,
    out: Path = typer.Option(..., "--out", help="run directory; rerunning resumes finished stages"),
    harmful: str = typer.Option("embedded:harmful", help="harmful instructions (file, hub id, or embedded:harmful)"),
    harmless: str = typer.Option("embedded:harmless", help="harmless instructions"),
    harmful_val: str = typer.Option(None, help="separate harmful validation set (default: carved from --harmful)"),
    harmless_val: str = typer.Option(None),
    harmful_test: str = typer.Option(None, help="separate harmful test set (e.g. embedded:harmful:test)"),
    harmless_test: str = typer.Option(None),
    column: str = typer.Option("instruction"),
    n_train: int = typer.Option(None, help="train prompts per set (default: all)"),
    n_val: int = typer.Option(32, help="validation prompts per set, for selection"),
    n_test: int = typer.Option(None, help="test prompts per set (default: all of the test split)"),
    seed: int = typer.Option(42),
    filter_train: bool = typer.Option(True, help="keep harmful train prompts the model refuses (metric > 0), harmless it does not"),
    refusal_tokens: str = typer.Option(None, help="comma-separated refusal token strings (default: derived from the model)"),
    system: str = typer.Option(None, help="system prompt"),
    chat_template: str = typer.Option(None, "--chat-template", help="template string with {instruction}"),
    dtype: str = typer.Option("auto"),
    device: str = typer.Option("cpu"),
    device_map: str = typer.Option(None),
    trust_remote_code: bool = typer.Option(False),
    batch_size: int = typer.Option(32),
    kl_max: float = typer.Option(0.1),
    max_layer_frac: float = typer.Option(0.8),
    induce_rule: str = typer.Option("auto", help="paper (induce > 0), relative, or auto"),
    exhaustive: bool = typer.Option(False, help="fully score every candidate (default: screen, then score the top-k)"),
    top_k: int = typer.Option(12, help="finalists fully scored after screening"),
    max_new_tokens: int = typer.Option(128),
    judge: str = typer.Option("broad", help="refusal judge for the headline: broad, paper or wide"),
    save_checkpoint: bool = typer.Option(True),
    force: bool = typer.Option(False, help="replace a directory that is not a run of this model"),
) -> None:
    """The whole pipeline: data → refusal tokens → filter → candidates → selection → eval → checkpoint → report."""
    from refdir.workflows.run import RunConfig, run_pipeline

    try:
        cfg = RunConfig(model=model, harmful=harmful, harmless=harmless, harmful_val=harmful_val,
                        harmless_val=harmless_val, harmful_test=harmful_test, harmless_test=harmless_test,
                        column=column, n_train=n_train,
                        n_val=n_val, n_test=n_test, seed=seed, filter_train=filter_train,
                        refusal_tokens=refusal_tokens.split(",") if refusal_tokens else None, system=system,
                        chat_template=chat_template, dtype=dtype, device=device, device_map=device_map,
                        trust_remote_code=trust_remote_code, batch_size=batch_size, kl_max=kl_max,
                        max_layer_frac=max_layer_frac, induce_rule=induce_rule,
                        exhaustive=exhaustive, top_k=top_k, max_new_tokens=max_new_tokens,
                        judge=judge, save_checkpoint=save_checkpoint)
        summary = run_pipeline(cfg, out, force=force)
    except RefdirError as e:
        _fail(e)
    _print_summary(summary, out)


@app.command()
def orthogonalize(
    model: str = ModelArg,
    out: Path = typer.Argument(..., help="output directory for the edited checkpoint"),
    direction: Path = typer.Option(..., "--direction", help="a direction file (.safetensors + .json) from refdir"),
    dtype: str = typer.Option("auto"),
    device: str = typer.Option("cpu"),
    trust_remote_code: bool = typer.Option(False),
    in_memory: bool = typer.Option(False, help="load the whole model instead of streaming a safetensors directory"),
    force: bool = typer.Option(False),
) -> None:
    """Write a checkpoint whose residual-writing weights cannot write along the direction.

    A local safetensors directory is streamed one tensor at a time (memory ≈ one shard); a .gguf
    input with a .gguf output is edited in GGUF; the embedded default and --in-memory load the model."""
    from refdir.core.directions import Direction
    from refdir.core.models import load_model
    from refdir.core.orthogonalize import save_orthogonalized, stream_orthogonalize

    try:
        if out.exists() and not force:
            raise RefdirError(f"output directory {out} already exists; pass --force to overwrite it")
        d = Direction.load(direction)
        src = Path(model)
        if model.endswith(".gguf") and str(out).endswith(".gguf"):
            from refdir.core.gguf_edit import orthogonalize_gguf

            summary = orthogonalize_gguf(src, d.vector, out, force=force)
            console.print(f"edited {len(summary['edited'])} tensors into [bold]{out}[/]")
            for name, change in summary["changed_types"].items():
                console.print(f"  type changed: {name}: {change}")
            return
        if not in_memory and src.is_dir() and any(src.glob("*.safetensors")):
            summary = stream_orthogonalize(src, d.vector, out, force=force)
            console.print(f"streamed {len(summary['edited'])} edited tensors into [bold]{out}[/]")
            return
        lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        if d.d_model != lm.model.config.get_text_config().hidden_size:
            raise RefdirError(f"direction has size {d.d_model} but {model} has hidden size "
                              f"{lm.model.config.get_text_config().hidden_size}")
        save_orthogonalized(lm.model, lm.tokenizer, d.vector, out, force=force,
                            meta={"direction": {"layer": d.layer, "position": d.position, "file": str(direction)},
                                  "source_model": lm.model_id})
    except RefdirError as e:
        _fail(e)
    console.print(f"orthogonalized checkpoint written to [bold]{out}[/]")


def _print_summary(s: dict, out: Path) -> None:
    from rich.table import Table

    ch = s["selection"]["chosen"]
    if ch:
        console.print(f"chosen: position {ch['position']}, layer {ch['layer']}  bypass {ch['bypass']:.2f}  "
                      f"induce {ch['induce']:.2f}  KL {ch['kl']:.3f}  ({s['selection']['rule']})")
    t = Table("arm / prompts", "refusal", "paper substrings", "degenerate")
    for k, v in s["refusal"].items():
        t.add_row(k, f"{v['refusal']:.3f}", f"{v['refusal_paper']:.3f}", str(v["degenerate"]))
    if s.get("checkpoint"):
        c = s["checkpoint"]
        t.add_row("checkpoint/harmful", f"{c['refusal']:.3f}", f"{c['refusal_paper']:.3f}", str(c["degenerate"]))
    console.print(t)
    console.print(f"report: [bold]{out / 'report.html'}[/]  ({s['timings_s']['total']:.0f} s)")


for _mod in (cli_evaluation, cli_analysis, cli_steering, cli_search):
    _mod.register(app)


def main() -> None:  # pragma: no cover
    try:
        app()
    except RefdirError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
