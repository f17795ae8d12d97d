"""Pieces shared by the command modules: the console, the one error path, the model argument."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console(stderr=True)

ModelArg = typer.Argument("default", help="'default' (embedded Qwen2.5-Coder-0.5B-Instruct), a .gguf file, a model dir or a hub id")


def fail(e: Exception) -> None:
    """Print one plain error line (never re-wrapped to the terminal width) and exit with status 2."""
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)
