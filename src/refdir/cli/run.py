"""`refdir run` (the whole pipeline), `refdir extract` (candidates only), `refdir orthogonalize` (edit weights)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from refdir.cli.common import console, model_options
from refdir.core.directions import Direction
from refdir.core.gguf_edit import orthogonalize_gguf
from refdir.core.io import check_replaceable
from refdir.core.orthogonalize import save_orthogonalized, stream_orthogonalize
from refdir.core.preflight import check_output
from refdir.core.spec import DataSpec, ModelSpec
from refdir.errors import RefdirError
from refdir.workflows.extract import ExtractConfig, run_extract
from refdir.workflows.run import RunConfig, run_pipeline


@model_options
def extract(
    spec: ModelSpec,
    out: Path = typer.Option(..., "--out", help="output directory (refused if it exists, unless --force)"),
    harmful: str = typer.Option("embedded:harmful:train", help="harmful instructions: file, hub id or "
                                                              "embedded:harmful:SPLIT"),
    harmless: str = typer.Option("embedded:harmless:train", help="harmless instructions"),
    column: str = typer.Option("instruction", help="column holding the instruction in csv/json/jsonl/parquet"),
    n_train: int = typer.Option(None, help="sample this many of each set (default: all)"),
    seed: int = typer.Option(42),
    batch_size: int = typer.Option(16),
    force: bool = typer.Option(False, help="overwrite an existing output directory"),
) -> None:
    """Cache activations and write the difference-in-means candidates."""
    cfg = ExtractConfig(model=spec, harmful=harmful, harmless=harmless, column=column, n_train=n_train, seed=seed,
                        batch_size=batch_size)
    path = run_extract(cfg, out, force=force)
    console.print(f"candidates written to [bold]{path}[/]")


@model_options
def run(
    spec: ModelSpec,
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
    filter_train: bool = typer.Option(True, help="keep harmful train prompts the model refuses (metric > 0), "
                                                 "harmless it does not"),
    refusal_tokens: str = typer.Option(None, help="comma-separated refusal token strings (default: derived from "
                                                  "the model)"),
    batch_size: int = typer.Option(32),
    kl_max: float = typer.Option(0.1),
    max_layer_frac: float = typer.Option(0.8),
    induce_rule: str = typer.Option("auto", help="paper (induce > 0), relative, or auto"),
    exhaustive: bool = typer.Option(False, help="fully score every candidate (default: screen, then score the "
                                                "top-k)"),
    top_k: int = typer.Option(12, help="finalists fully scored after screening"),
    max_new_tokens: int = typer.Option(128),
    judge: str = typer.Option("broad", help="refusal judge for the headline: broad, paper or wide"),
    save_checkpoint: bool = typer.Option(True),
    force: bool = typer.Option(False, help="replace a directory that is not a run of this model"),
) -> None:
    """The whole pipeline: data → refusal tokens → filter → candidates → selection → eval → checkpoint → report."""
    data = DataSpec(harmful=harmful, harmless=harmless, harmful_val=harmful_val, harmless_val=harmless_val,
                    harmful_test=harmful_test, harmless_test=harmless_test, column=column, n_train=n_train,
                    n_val=n_val, n_test=n_test, seed=seed)
    cfg = RunConfig(model=spec, data=data, filter_train=filter_train,
                    refusal_tokens=refusal_tokens.split(",") if refusal_tokens else None, batch_size=batch_size,
                    kl_max=kl_max, max_layer_frac=max_layer_frac, induce_rule=induce_rule, exhaustive=exhaustive,
                    top_k=top_k, max_new_tokens=max_new_tokens, judge=judge, save_checkpoint=save_checkpoint)
    summary = run_pipeline(cfg, out, force=force)
    print_summary(summary, out)


@model_options
def orthogonalize(
    spec: ModelSpec,
    out: Path = typer.Argument(..., help="output directory for the edited checkpoint"),
    direction: Path = typer.Option(..., "--direction", help="a direction file (.safetensors + .json) from refdir"),
    in_memory: bool = typer.Option(False, help="load the whole model instead of streaming a safetensors directory"),
    force: bool = typer.Option(False),
) -> None:
    """Write a checkpoint whose residual-writing weights cannot write along the direction.

    A local safetensors directory is streamed one tensor at a time (memory ≈ one shard); a .gguf
    input with a .gguf output is edited in GGUF; the embedded default and --in-memory load the model."""
    if out.exists() and not force:
        raise RefdirError(f"output directory {out} already exists; pass --force to overwrite it")
    d = Direction.load(direction)
    spec.check(chat=False)  # a missing model, an unknown model type or custom code: refused before any work
    gguf_out = spec.model.endswith(".gguf") and str(out).endswith(".gguf")
    check_output(out, "file" if gguf_out else "dir")
    if force and not gguf_out:
        check_replaceable(out)
    src = Path(spec.model)
    if gguf_out:
        summary = orthogonalize_gguf(src, d.vector, out, force=force)
        console.print(f"edited {len(summary['edited'])} tensors into [bold]{out}[/]")
        for name, change in summary["changed_types"].items():
            console.print(f"  type changed: {name}: {change}")
        return
    if not in_memory and src.is_dir() and any(src.glob("*.safetensors")):
        summary = stream_orthogonalize(src, d.vector, out, force=force)
        console.print(f"streamed {len(summary['edited'])} edited tensors into [bold]{out}[/]")
        return
    lm = spec.load_model()
    hidden = lm.model.config.get_text_config().hidden_size
    if d.d_model != hidden:
        raise RefdirError(f"direction has size {d.d_model} but {spec.model} has hidden size {hidden}")
    save_orthogonalized(lm.model, lm.tokenizer, d.vector, out, force=force,
                        meta={"direction": {"layer": d.layer, "position": d.position, "file": str(direction)},
                              "source_model": lm.model_id})
    console.print(f"orthogonalized checkpoint written to [bold]{out}[/]")


def print_summary(s: dict, out: Path) -> None:
    """The chosen direction and the refusal table of a finished run."""
    ch = s["selection"]["chosen"]
    if ch:
        console.print(f"chosen: position {ch['position']}, layer {ch['layer']}  bypass {ch['bypass']:.2f}  "
                      f"induce {ch['induce']:.2f}  KL {ch['kl']:.3f}  ({s['selection']['rule']})")
    t = Table("arm / prompts", "refusal", "paper substrings", "degenerate")
    for k, v in s["refusal"].items():
        t.add_row(k, f"{v['refusal']:.3f}", f"{v['refusal_paper']:.3f}", str(v["degenerate"]))
    if s.get("checkpoint"):
        c = s["checkpoint"]
        t.add_row("orthogonalized/harmful", f"{c['refusal']:.3f}", f"{c['refusal_paper']:.3f}", str(c["degenerate"]))
    console.print(t)
    console.print(f"report: [bold]{out / 'report.html'}[/]  ({s['timings_s']['total']:.0f} s)")
