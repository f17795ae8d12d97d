"""The ``refdir`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from .errors import RefdirError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The refusal direction in chat language models.")
console = Console(stderr=True)


def _fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


@app.callback()
def _root() -> None:
    """refdir: find, remove and add the refusal direction of a chat model."""


ModelArg = typer.Argument("default", help="'default' (embedded Qwen2.5-Coder-0.5B-Instruct), a .gguf file, a model dir or a hub id")


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
    from .pipeline import ExtractConfig, run_extract

    try:
        cfg = ExtractConfig(model=model, harmful=harmful, harmless=harmless, column=column, n_train=n_train,
                            seed=seed, system=system, chat_template=chat_template, dtype=dtype, device=device,
                            device_map=device_map, batch_size=batch_size, trust_remote_code=trust_remote_code)
        path = run_extract(cfg, out, force=force)
    except RefdirError as e:
        _fail(e)
    console.print(f"candidates written to [bold]{path}[/]")


def main() -> None:  # pragma: no cover
    try:
        app()
    except RefdirError as e:
        console.print(f"[bold red]error:[/] {e}")
        sys.exit(2)
