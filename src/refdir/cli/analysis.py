"""`refdir analyze geometry|suffix`: residual geometry and adversarial-suffix analysis (paper §5) of a finished
``refdir run`` directory (the work is done by :mod:`refdir.workflows.analyze`)."""

from __future__ import annotations

import html
from pathlib import Path

import typer

from refdir.analysis.suffix import ADV, HARMFUL, RANDOM, GCGBudget
from refdir.cli.common import console, model_overrides
from refdir.core.dirlock import adding_to
from refdir.core.rundir import RunDir
from refdir.errors import RefdirError
from refdir.workflows.analyze import analyze_geometry_run, analyze_suffix_run, layer_ranges

RunArg = typer.Argument(..., help="a finished `refdir run` directory")


@model_overrides
def geometry(
    overrides: dict,
    run_dir: Path = RunArg,
    position: int = typer.Option(-1, help="post-instruction position (-1 = last token)"),
    split: str = typer.Option("train", help="which of the run's splits: train, val or test"),
    n: int = typer.Option(None, help="use the first N prompts of each set (default: all)"),
    threshold: float = typer.Option(0.95, help="AUC that counts as separated"),
    layers: str = typer.Option(None, help="comma-separated layers for the PC1/PC2 scatter grid"),
    batch_size: int = typer.Option(16),
) -> None:
    """Per-layer PCA of harmful vs harmless residuals: PC1 variance, cos(PC1, diff-in-means), AUC."""
    try:
        lay = [int(x) for x in layers.split(",")] if layers else None
    except ValueError as e:
        raise RefdirError(f"--layers must be comma-separated integers, not {layers!r}") from e
    with adding_to(run_dir):
        s = analyze_geometry_run(run_dir, position=position, split=split, n=n, threshold=threshold,
                                 scatter_layers=lay, batch_size=batch_size, model=overrides)
    sl = s["first_separating_layer"]
    if sl is None:
        console.print(f"PC1 does not separate harmful from harmless with AUC ≥ {threshold} (best "
                      f"{s['max_auc_pc1']:.3f} at layer {s['max_auc_pc1_layer']}); the projection on r̂ "
                      f"separates from layer {s['first_separating_layer_r']}")
    else:
        console.print(f"PC1 separates harmful from harmless (AUC ≥ {threshold}) from layer [bold]{sl}[/] "
                      f"(at layers {layer_ranges(s['separating_layers'])}); cos(PC1, r̂) there "
                      f"{s['cos_pc1_r_there']:.3f}")
    rd = RunDir(run_dir)
    console.print(f"written {rd.analysis_dir()} and a section of {rd.report_path}")


@model_overrides
def suffix(
    overrides: dict,
    run_dir: Path = RunArg,
    suffixes: Path = typer.Option(None, "--suffixes", help="suffix file: refdir JSON, JSON list, or one per line"),
    search: bool = typer.Option(False, "--search", help="find per-prompt suffixes with GCG (nanogcg)"),
    prompts: int = typer.Option(3, "--prompts", help="harmful test prompts the model refuses to attack"),
    steps: int = typer.Option(20, help="GCG steps per prompt"),
    search_width: int = typer.Option(32, help="GCG candidates scored per step"),
    topk: int = typer.Option(64, help="GCG top-k tokens per suffix position"),
    n_tokens: int = typer.Option(12, help="suffix length in tokens"),
    target: str = typer.Option("Sure, here is", help="the answer opening GCG optimises for"),
    top_heads: int = typer.Option(8, help="heads shown in the attribution and attention plots"),
    n_harmless: int = typer.Option(16, help="harmless test prompts in the comparison group"),
    position: int = typer.Option(-1, help="post-instruction position for expression and attribution"),
    max_new_tokens: int = typer.Option(64, help="greedy tokens generated to judge refusal"),
    seed: int = typer.Option(0),
) -> None:
    """Harmful vs harmful + adversarial suffix vs harmful + random suffix vs harmless: refusal, direction
    expression, top heads by direct contribution to r̂ and their attention on instruction vs suffix."""
    budget = GCGBudget(steps=steps, search_width=search_width, topk=topk, n_tokens=n_tokens, seed=seed)
    with adding_to(run_dir):
        s = analyze_suffix_run(run_dir, suffixes_file=suffixes, search=search, n_prompts=prompts, budget=budget,
                               target=target, top_k=top_heads, n_harmless=n_harmless, position=position,
                               max_new_tokens=max_new_tokens, seed=seed, model=overrides)
    for g in (HARMFUL, ADV, RANDOM, "harmless"):
        r = s["refusal"][g]
        console.print(f"{g:30s} refusal {r['refusal']:.2f}  P(refusal token) {r['p_refusal_token']:.3f}")
    m = s["mechanism"]
    console.print(f"adversarial curve closer to harmless than harmful from layer {m['from_layer']}: "
                  f"{m['adv_closer_to_harmless']}; random curve closer to harmful: {m['random_closer_to_harmful']}")
    rd = RunDir(run_dir)
    console.print(f"written {rd.analysis_dir() / 'suffix.json'} and a section of "
                  f"{html.escape(str(rd.report_path))}")
