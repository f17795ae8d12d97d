"""`refdir analyze` workflows (paper §5) on a finished ``refdir run`` directory.

Both analyses reuse the run's model settings, data sets, refusal tokens and selected direction, write their
summary into the run's analysis directory, add a section to the run's report and re-render it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from refdir.analysis.geometry import geometry
from refdir.analysis.plots import plot_geometry_lines, plot_geometry_scatter
from refdir.analysis.suffix import (
    DEFAULT_TARGET,
    GCGBudget,
    analyze_suffixes,
    gcg_search,
    load_suffixes,
    n_tokens,
    pair_suffixes,
    save_suffixes,
    suffix_report_html,
)
from refdir.core.directions import Direction
from refdir.core.generation import generate
from refdir.core.html import figure_html, table_html
from refdir.core.io import atomic_write_json
from refdir.core.preflight import require
from refdir.core.rundir import RunDir
from refdir.core.spec import ModelSpec
from refdir.errors import RefdirError
from refdir.method.refusal_judge import judge
from refdir.workflows.checks import run_fits_model
from refdir.workflows.report import add_section


@dataclass
class RunContext:
    """What the analyses read from a finished run; :meth:`load` loads its model (with ``spec``) and checks the
    direction's size and the refusal token ids against it."""

    rd: RunDir
    spec: ModelSpec
    sets: dict
    refusal_ids: list[int]
    direction: Direction
    judge: str  # the run's refusal judge
    lm: object = field(default=None, repr=False)
    fmt: object = field(default=None, repr=False)

    def load(self) -> RunContext:
        self.lm = self.spec.load_model()
        self.refusal_ids = run_fits_model(self.rd, self.direction, self.lm.model)
        self.fmt = self.spec.chat(self.lm.tokenizer)
        return self

    def check_position(self, position: int) -> None:
        if not -self.fmt.n_post <= position <= -1:
            raise RefdirError(f"position {position} is not a post-instruction position (-{self.fmt.n_post} .. -1)")


def open_run(run_dir: str | Path, model: dict | None = None) -> RunContext:
    """Read what the analysis needs from a finished run directory (the model is loaded by ``.load()``).
    ``model`` holds model settings that replace the run's own (e.g. another device)."""
    rd = RunDir.open_finished(run_dir)
    spec = rd.model_spec(model)
    spec.check()  # the run's model must still load as recorded: refused before any work
    return RunContext(rd, spec, rd.sets(), rd.refusal_ids(), rd.direction(), rd.config().get("judge", "broad"))


def layer_ranges(layers: list[int]) -> str:
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
                         model: dict | None = None, progress: bool = True) -> dict:
    """Geometry of the run's harmful vs harmless prompts; writes ``geometry.json`` into the run's analysis
    directory and a report section."""
    require("sklearn", extra="analysis")
    ctx = open_run(run_dir, model)
    if split not in ("train", "val", "test"):
        raise RefdirError(f"--split must be train, val or test, not {split!r}")
    if not 0 < threshold < 1:
        raise RefdirError("--threshold must be between 0 and 1")
    ctx.load()
    ctx.check_position(position)
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
    head = (f"<p>{len(harmful)} harmful and {len(harmless)} harmless {split} prompts, residual at position "
            f"{position}. PCA per layer of both sets together; PC1 oriented towards the harmful mean. "
            + _geometry_text(summary, threshold, ctx.direction.layer) + "</p>")
    rows = [[p["layer"], f"{p['pc1_var']:.3f}", f"{p['cos_pc1_diff']:.3f}", f"{p['cos_pc1_r']:.3f}",
             f"{p['auc_pc1']:.3f}", f"{p['auc_r']:.3f}"] for p in summary["per_layer"]]
    body = (head + figure_html(plot_geometry_lines(g, ctx.direction.layer, threshold))
            + figure_html(plot_geometry_scatter(g, layers))
            + table_html(rows, ["layer", "PC1 var", "cos(PC1, diff)", "cos(PC1, r̂)", "AUC PC1", "AUC r̂"]))
    tag = "" if position == -1 else f"_pos{-position}"
    atomic_write_json(ctx.rd.analysis_dir() / f"geometry{tag}.json", summary)
    add_section(ctx.rd.path, f"analysis_1_geometry{tag}", body, f"Residual geometry at position {position} (paper §5)")
    return summary


def _geometry_text(summary: dict, threshold: float, direction_layer: int) -> str:
    """The report's sentences on where PC1 and the projection on r̂ separate the sets."""
    s = summary["first_separating_layer"]
    if s is None:
        text = (f"<b>PC1 does not separate the sets</b> (AUC ≥ {threshold}) at any layer; its best "
                f"AUC is {summary['max_auc_pc1']:.3f} at layer {summary['max_auc_pc1_layer']}. ")
    else:
        band = summary["separating_layers"]
        text = (f"<b>PC1 separates harmful from harmless (AUC ≥ {threshold}) from layer {s}</b>: there "
                f"cos(PC1, r̂) = {summary['cos_pc1_r_there']:.3f}, cos(PC1, diff-in-means) = "
                f"{summary['cos_pc1_diff_there']:.3f}, PC1 explains {summary['pc1_var_there']:.1%} of the variance. "
                f"PC1 separates at layers {layer_ranges(band)} (shaded); ")
        st = summary["separating_layer"]
        text += (f"it keeps separating to the last layer from layer {st} on. " if st is not None else
                 "at the later layers PC1 picks up other variance and stops separating. ")
    sr = summary["first_separating_layer_r"]
    text += ("The projection on r̂ " + (f"separates from layer {sr} (at layers "
                                        f"{layer_ranges(summary['separating_layers_r'])})" if sr is not None
                                        else "does not separate")
             + f"; the direction (red line) is from layer {direction_layer}.")
    return text


# ------------------------------------------------------------------------------------------------ suffix
def refused_harmful(ctx: RunContext, n: int, max_new_tokens: int = 64, progress: bool = True) -> list[str]:
    """The first ``n`` harmful test prompts the unmodified model refuses (from the run's baseline evaluation
    when it exists, else generated now)."""
    prompts = ctx.sets["harmful"]["test"]
    comp = ctx.rd.completions()
    outs = None
    if comp is not None and comp.get("prompts", {}).get("harmful") == prompts:
        outs = comp["completions"]["baseline/harmful"]
    if outs is None:
        outs = generate(ctx.lm.model, ctx.fmt, prompts, max_new_tokens=max_new_tokens, progress=progress,
                        desc="baseline")
    refused = [p for p, f in zip(prompts, judge(outs, ctx.judge).flags, strict=True) if f]
    if not refused:
        raise RefdirError("the model refuses none of the run's harmful test prompts; nothing to attack")
    return refused[:n]


def analyze_suffix_run(run_dir: str | Path, *, suffixes_file: Path | None = None, search: bool = False,
                       n_prompts: int = 3, budget: GCGBudget | None = None, target: str | None = None,
                       top_k: int = 8, n_harmless: int = 16, position: int = -1, max_new_tokens: int = 64,
                       seed: int = 0, model: dict | None = None, progress: bool = True) -> dict:
    """Suffix analysis on a run: search suffixes (saved to ``suffixes.json`` in the run's analysis directory) or
    load them, then compare the four prompt groups; writes ``suffix.json`` there and a report section."""
    if search == (suffixes_file is not None):
        raise RefdirError("give exactly one of --suffixes FILE and --search")
    if n_prompts < 1 or n_harmless < 1:
        raise RefdirError("--prompts and --n-harmless must be at least 1")
    ctx = open_run(run_dir, model)
    sufs = load_suffixes(suffixes_file) if suffixes_file is not None else None
    budget = (budget or GCGBudget()).check()
    ctx.load()
    ctx.check_position(position)
    if search:
        targets = refused_harmful(ctx, n_prompts, progress=progress)
        sufs = []
        for i, p in enumerate(targets):
            print(f"GCG {i + 1}/{len(targets)}: {p[:70]}", file=sys.stderr, flush=True)
            sufs.append(gcg_search(ctx.lm.model, ctx.fmt, p, target=target or DEFAULT_TARGET, budget=budget,
                                   progress=progress))
        save_suffixes(ctx.rd.analysis_dir() / "suffixes.json", sufs)
    else:
        for s in sufs:
            s.n_tokens = n_tokens(ctx.lm.tokenizer, s.text)
    universal = not any(s.prompt for s in sufs)
    instructions = refused_harmful(ctx, n_prompts, progress=progress) if universal else []
    pairs = pair_suffixes(instructions, sufs)
    harmless = _sample(ctx.sets["harmless"]["test"], n_harmless)
    a = analyze_suffixes(ctx.lm.model, ctx.fmt, pairs, harmless, ctx.direction, ctx.refusal_ids, top_k=top_k,
                         position=position, max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    summary = {"run": str(run_dir), "position": position, **a.summary()}
    atomic_write_json(ctx.rd.analysis_dir() / "suffix.json", summary)
    add_section(ctx.rd.path, "analysis_2_suffix", suffix_report_html(a), "Adversarial suffixes (paper §5)")
    return summary
