"""`refdir analyze ...`: residual geometry and adversarial-suffix analysis (paper §5).

Both commands work on a finished ``refdir run`` directory: they reuse its model settings, data sets,
refusal tokens and selected direction, write ``RUN_DIR/analysis/*.json`` and add a section to the run's
``report.html``.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import typer

from refdir.cli.common import console, fail
from refdir.errors import RefdirError


@dataclass
class RunContext:
    run_dir: Path
    config: dict
    sets: dict
    refusal_ids: list[int]
    direction: object  # directions.Direction
    lm: object = None
    fmt: object = None

    def load(self, progress: bool = True) -> RunContext:
        from refdir.core.chat import ChatFormat
        from refdir.core.models import load_model

        c = self.config
        self.lm = load_model(c["model"], dtype=c.get("dtype", "auto"), device=c.get("device", "cpu"),
                             device_map=c.get("device_map"), trust_remote_code=c.get("trust_remote_code", False))
        d_model = self.lm.model.config.get_text_config().hidden_size
        if self.direction.d_model != d_model:
            raise RefdirError(f"the run's direction has size {self.direction.d_model} but the model has {d_model}")
        self.fmt = ChatFormat(self.lm.tokenizer, system=c.get("system"), template=c.get("chat_template"))
        return self


def open_run(run_dir: str | Path) -> RunContext:
    """Read what the analysis needs from a finished run directory (the model is loaded by ``.load()``)."""
    from refdir.core.directions import Direction

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RefdirError(f"run directory {run_dir} does not exist")
    need = ["config.json", "data/sets.json", "refusal_tokens/tokens.json", "selection/direction.safetensors"]
    missing = [n for n in need if not (run_dir / n).exists()]
    if missing:
        raise RefdirError(f"{run_dir} is not a finished refdir run with a selected direction "
                          f"(missing {', '.join(missing)})")
    try:
        config = json.loads((run_dir / "config.json").read_text())
        sets = json.loads((run_dir / "data" / "sets.json").read_text())
        ids = json.loads((run_dir / "refusal_tokens" / "tokens.json").read_text())["ids"]
    except (json.JSONDecodeError, KeyError) as e:
        raise RefdirError(f"{run_dir}: unreadable run files ({e})") from e
    return RunContext(run_dir, config, sets, ids, Direction.load(run_dir / "selection" / "direction"))


def _layer_ranges(layers: list[int]) -> str:
    """[3, 4, 5, 9] -> "3–5, 9"."""
    out, start = [], None
    for i, x in enumerate(layers):
        start = x if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(str(x) if start == x else f"{start}–{x}")
            start = None
    return ", ".join(out)


def _sample(items: list[str], n: int | None) -> list[str]:
    return items if not n or n >= len(items) else items[:n]


# ------------------------------------------------------------------------------------------------ geometry
def analyze_geometry_run(run_dir: str | Path, *, position: int = -1, split: str = "train", n: int | None = None,
                         threshold: float = 0.95, scatter_layers: list[int] | None = None, batch_size: int = 16,
                         progress: bool = True) -> dict:
    """Geometry of the run's harmful vs harmless prompts; writes ``analysis/geometry.json`` and a report section."""
    from refdir.analysis.geometry import geometry, plot_geometry_lines, plot_geometry_scatter
    from refdir.core.io import atomic_write_json
    from refdir.workflows.report import add_section, figure_html, table_html

    ctx = open_run(run_dir)
    if split not in ("train", "val", "test"):
        raise RefdirError(f"--split must be train, val or test, not {split!r}")
    if not 0 < threshold < 1:
        raise RefdirError("--threshold must be between 0 and 1")
    ctx.load()
    if not -ctx.fmt.n_post <= position <= -1:
        raise RefdirError(f"position {position} is not a post-instruction position (-{ctx.fmt.n_post} .. -1)")
    harmful, harmless = (_sample(ctx.sets[k][split], n) for k in ("harmful", "harmless"))
    g = geometry(ctx.lm.model, ctx.fmt, harmful, harmless, ctx.direction.vector, position=position,
                 batch_size=batch_size, progress=progress)
    L = g.n_layers
    layers = scatter_layers or sorted({0, L // 4, L // 2, ctx.direction.layer, (3 * L) // 4, L})
    bad = [x for x in layers if not 0 <= x <= L]
    if bad:
        raise RefdirError(f"scatter layers {bad} outside 0..{L}")
    summary = {"run": str(run_dir), "split": split, "n_harmful": len(harmful), "n_harmless": len(harmless),
               "direction": {"layer": ctx.direction.layer, "position": ctx.direction.position}, **g.summary(threshold)}
    s = summary["first_separating_layer"]
    head = (f"<p>{len(harmful)} harmful and {len(harmless)} harmless {split} prompts, residual at position "
            f"{position}. PCA per layer of both sets together; PC1 oriented towards the harmful mean. ")
    if s is None:
        head += (f"<b>PC1 does not separate the sets</b> (AUC ≥ {threshold}) at any layer; its best "
                 f"AUC is {summary['max_auc_pc1']:.3f} at layer {summary['max_auc_pc1_layer']}. ")
    else:
        band = summary["separating_layers"]
        head += (f"<b>PC1 separates harmful from harmless (AUC ≥ {threshold}) from layer {s}</b>: there "
                 f"cos(PC1, r̂) = {summary['cos_pc1_r_there']:.3f}, cos(PC1, diff-in-means) = "
                 f"{summary['cos_pc1_diff_there']:.3f}, PC1 explains {summary['pc1_var_there']:.1%} of the variance. "
                 f"PC1 separates at layers {_layer_ranges(band)} (shaded); ")
        st = summary["separating_layer"]
        head += (f"it keeps separating to the last layer from layer {st} on. " if st is not None else
                 "at the later layers PC1 picks up other variance and stops separating. ")
    sr = summary["first_separating_layer_r"]
    head += ("The projection on r̂ " + (f"separates from layer {sr} (at layers "
                                        f"{_layer_ranges(summary['separating_layers_r'])})" if sr is not None
                                        else "does not separate")
             + f"; the direction (red line) is from layer {ctx.direction.layer}.</p>")
    rows = [[p["layer"], f"{p['pc1_var']:.3f}", f"{p['cos_pc1_diff']:.3f}", f"{p['cos_pc1_r']:.3f}",
             f"{p['auc_pc1']:.3f}", f"{p['auc_r']:.3f}"] for p in summary["per_layer"]]
    body = (head + figure_html(plot_geometry_lines(g, ctx.direction.layer, threshold))
            + figure_html(plot_geometry_scatter(g, layers))
            + table_html(rows, ["layer", "PC1 var", "cos(PC1, diff)", "cos(PC1, r̂)", "AUC PC1", "AUC r̂"]))
    tag = "" if position == -1 else f"_pos{-position}"
    atomic_write_json(Path(run_dir) / "analysis" / f"geometry{tag}.json", summary)
    add_section(run_dir, f"analysis_1_geometry{tag}", body, f"Residual geometry at position {position} (paper §5)")
    return summary


# ------------------------------------------------------------------------------------------------ suffix
def refused_harmful(ctx: RunContext, n: int, max_new_tokens: int = 64, progress: bool = True) -> list[str]:
    """The first ``n`` harmful test prompts the unmodified model refuses (from the run's baseline evaluation
    when it exists, else generated now)."""
    from refdir.core.generation import generate
    from refdir.method.refusal_judge import judge

    prompts = ctx.sets["harmful"]["test"]
    comp_file = ctx.run_dir / "eval" / "completions.json"
    if comp_file.exists():
        d = json.loads(comp_file.read_text())
        if d.get("prompts", {}).get("harmful") == prompts:
            outs = d["completions"]["baseline/harmful"]
        else:
            outs = None
    else:
        outs = None
    if outs is None:
        outs = generate(ctx.lm.model, ctx.fmt, prompts, max_new_tokens=max_new_tokens, progress=progress,
                        desc="baseline")
    refused = [p for p, f in zip(prompts, judge(outs, ctx.config.get("judge", "broad")).flags, strict=True) if f]
    if not refused:
        raise RefdirError("the model refuses none of the run's harmful test prompts; nothing to attack")
    return refused[:n]


def analyze_suffix_run(run_dir: str | Path, *, suffixes_file: Path | None = None, search: bool = False,
                       n_prompts: int = 3, budget=None, target: str | None = None, top_k: int = 8,
                       n_harmless: int = 16, position: int = -1, max_new_tokens: int = 64, seed: int = 0,
                       progress: bool = True) -> dict:
    """Suffix analysis on a run: search suffixes (saved to ``analysis/suffixes.json``) or load them, then
    compare the four prompt groups; writes ``analysis/suffix.json`` and a report section."""
    from refdir.analysis.suffix import (
        DEFAULT_TARGET,
        GCGBudget,
        analyze_suffixes,
        gcg_search,
        load_suffixes,
        pair_suffixes,
        save_suffixes,
        suffix_report_html,
    )
    from refdir.core.io import atomic_write_json
    from refdir.workflows.report import add_section

    if search == (suffixes_file is not None):
        raise RefdirError("give exactly one of --suffixes FILE and --search")
    if n_prompts < 1 or n_harmless < 1:
        raise RefdirError("--prompts and --n-harmless must be at least 1")
    ctx = open_run(run_dir)
    sufs = load_suffixes(suffixes_file) if suffixes_file is not None else None
    budget = (budget or GCGBudget()).check()
    ctx.load()
    if not -ctx.fmt.n_post <= position <= -1:
        raise RefdirError(f"position {position} is not a post-instruction position (-{ctx.fmt.n_post} .. -1)")
    tok = ctx.lm.tokenizer
    if search:
        targets = refused_harmful(ctx, n_prompts, progress=progress)
        sufs = []
        for i, p in enumerate(targets):
            console.print(f"GCG {i + 1}/{len(targets)}: {p[:70]}")
            sufs.append(gcg_search(ctx.lm.model, ctx.fmt, p, target=target or DEFAULT_TARGET, budget=budget,
                                   progress=progress))
        save_suffixes(Path(run_dir) / "analysis" / "suffixes.json", sufs)
    else:
        from refdir.analysis.suffix import n_tokens

        for s in sufs:
            s.n_tokens = n_tokens(tok, s.text)
    universal = not any(s.prompt for s in sufs)
    instructions = refused_harmful(ctx, n_prompts, progress=progress) if universal else []
    pairs = pair_suffixes(instructions, sufs)
    harmless = _sample(ctx.sets["harmless"]["test"], n_harmless)
    a = analyze_suffixes(ctx.lm.model, ctx.fmt, pairs, harmless, ctx.direction, ctx.refusal_ids, top_k=top_k,
                         position=position, max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    summary = {"run": str(run_dir), "position": position, **a.summary()}
    atomic_write_json(Path(run_dir) / "analysis" / "suffix.json", summary)
    add_section(run_dir, "analysis_2_suffix", suffix_report_html(a), "Adversarial suffixes (paper §5)")
    return summary


# ------------------------------------------------------------------------------------------------ commands
def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``refdir`` app."""
    analyze = typer.Typer(no_args_is_help=True, help="Mechanistic analysis of a run's refusal direction (paper §5).")
    app.add_typer(analyze, name="analyze")

    @analyze.command("geometry")
    def geometry_cmd(
        run_dir: Path = typer.Argument(..., help="a finished `refdir run` directory"),
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
        except ValueError:
            fail(RefdirError(f"--layers must be comma-separated integers, not {layers!r}"))
        try:
            s = analyze_geometry_run(run_dir, position=position, split=split, n=n, threshold=threshold,
                                     scatter_layers=lay, batch_size=batch_size)
        except RefdirError as e:
            fail(e)
        sl = s["first_separating_layer"]
        if sl is None:
            console.print(f"PC1 does not separate harmful from harmless with AUC ≥ {threshold} (best "
                          f"{s['max_auc_pc1']:.3f} at layer {s['max_auc_pc1_layer']}); the projection on r̂ "
                          f"separates from layer {s['first_separating_layer_r']}")
        else:
            console.print(f"PC1 separates harmful from harmless (AUC ≥ {threshold}) from layer [bold]{sl}[/] "
                          f"(at layers {_layer_ranges(s['separating_layers'])}); cos(PC1, r̂) there "
                          f"{s['cos_pc1_r_there']:.3f}")
        console.print(f"written {run_dir / 'analysis'} and a section of {run_dir / 'report.html'}")

    @analyze.command("suffix")
    def suffix_cmd(
        run_dir: Path = typer.Argument(..., help="a finished `refdir run` directory"),
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
        from refdir.analysis.suffix import ADV, HARMFUL, RANDOM, GCGBudget

        try:
            s = analyze_suffix_run(run_dir, suffixes_file=suffixes, search=search, n_prompts=prompts,
                                   budget=GCGBudget(steps=steps, search_width=search_width, topk=topk,
                                                    n_tokens=n_tokens, seed=seed),
                                   target=target, top_k=top_heads, n_harmless=n_harmless, position=position,
                                   max_new_tokens=max_new_tokens, seed=seed)
        except RefdirError as e:
            fail(e)
        for g in (HARMFUL, ADV, RANDOM, "harmless"):
            r = s["refusal"][g]
            console.print(f"{g:30s} refusal {r['refusal']:.2f}  P(refusal token) {r['p_refusal_token']:.3f}")
        m = s["mechanism"]
        console.print(f"adversarial curve closer to harmless than harmful from layer {m['from_layer']}: "
                      f"{m['adv_closer_to_harmless']}; random curve closer to harmful: {m['random_closer_to_harmful']}")
        console.print(f"written {run_dir / 'analysis' / 'suffix.json'} and a section of "
                      f"{html.escape(str(run_dir / 'report.html'))}")
