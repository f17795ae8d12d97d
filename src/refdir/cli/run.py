"""`refdir run` (the whole pipeline), `refdir extract` (candidates only), `refdir orthogonalize` (edit weights)."""

from __future__ import annotations

from pathlib import Path
from shlex import quote

import typer
from rich.table import Table

from refdir.cli.common import DIRECTION_METHOD_HELP, console, model_options
from refdir.core.direction_paths import run_of
from refdir.core.directions import edit_tensor, load_edit
from refdir.core.gguf_edit import orthogonalize_gguf
from refdir.core.io import check_replaceable
from refdir.core.orthogonalize import save_orthogonalized, stream_orthogonalize
from refdir.core.preflight import check_output
from refdir.core.rundir import CHECKPOINT, RunDir
from refdir.core.spec import DataSpec, ModelSpec
from refdir.errors import RefdirError
from refdir.method.search import load_reference
from refdir.method.uncertainty import rate_text
from refdir.workflows.checks import print_warnings
from refdir.workflows.extract import ExtractConfig, run_extract
from refdir.workflows.report import answered_kl_text, calibration_text, test_rows
from refdir.workflows.run import run_config, run_pipeline, val_prompts


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
    heldout_harmful: str = typer.Option(None, help="held-out harmful test set of another source (file, hub id): "
                                                   "the cross-source headline, never used to build or choose"),
    heldout_harmless: str = typer.Option(None, help="held-out harmless test set of another source"),
    n_heldout: int = typer.Option(100, help="the first N prompts of each held-out set"),
    column: str = typer.Option("instruction"),
    n_train: int = typer.Option(None, help="train prompts per set (default: all)"),
    n_val: int = typer.Option(None, help="validation prompts per set, for selection and the search's proxy "
                                         "(default: 40 with the search, 32 with --method paper)"),
    method: str = typer.Option("search", help="search: selection, then a Pareto search over edits within --budget "
                                              "and the point for --kl-target; paper: the paper's single direction"),
    budget: float = typer.Option(60.0, help="seconds of search trials (refinement included); rerunning with a "
                                            "bigger budget extends the search"),
    kl_target: float = typer.Option(0.05, help="first-token KL on harmless prompts the chosen edit stays under"),
    direction_method: str = typer.Option(None, help=DIRECTION_METHOD_HELP + " (default: pca with the search; "
                                         "--method paper takes none)"),
    second_direction: bool = typer.Option(True, help="with the search: add to the chosen edit, at strength 0.3, "
                                          "the selection's strongest other candidate off its harmless components "
                                          "where the KL target leaves room (fewer refusals for ~0.008 more KL "
                                          "on the default model; README)"),
    second_source: str = typer.Option("strong", help="the second direction: strong (the selection's strongest "
                                      "other candidate) or persona (embedded opinion questions answered 'As an "
                                      "AI ...' against plain harmless answers; on the default model it passed the "
                                      "KL target on held-out prompts: README)"),
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
    max_new_tokens: int = typer.Option(None, help="new tokens per harmful test prompt (default: 64 with the search, "
                                                  "128 with --method paper)"),
    gen_batch_size: int = typer.Option(None, help="rows per generation batch (default: 200 with the search, which "
                                                  "generates every arm in one batch; 40 with --method paper)"),
    judge: str = typer.Option("broad", help="refusal judge for the headline: broad, paper or wide"),
    save_checkpoint: bool = typer.Option(True),
    reference: Path = typer.Option(None, help="another tool's measured points (JSON), drawn beside the held-out "
                                              "result in the report"),
    force: bool = typer.Option(False, help="replace a directory that is not a run of this model"),
) -> None:
    """The main job: the best edit the method finds for --kl-target, its test (in-distribution and held-out), the
    edited checkpoint (and a GGUF for a GGUF input) and a report. --method paper: the paper's pipeline."""
    data = DataSpec(harmful=harmful, harmless=harmless, harmful_val=harmful_val, harmless_val=harmless_val,
                    harmful_test=harmful_test, harmless_test=harmless_test, heldout_harmful=heldout_harmful,
                    heldout_harmless=heldout_harmless, n_heldout=n_heldout, column=column, n_train=n_train,
                    n_val=val_prompts(method) if n_val is None else n_val, n_test=n_test, seed=seed)
    cfg = run_config(method, model=spec, data=data, budget=budget, kl_target=kl_target,
                     direction_method=direction_method, second_direction=second_direction,
                     second_source=second_source, filter_train=filter_train,
                     refusal_tokens=refusal_tokens.split(",") if refusal_tokens else None, batch_size=batch_size,
                     kl_max=kl_max, max_layer_frac=max_layer_frac, induce_rule=induce_rule, exhaustive=exhaustive,
                     top_k=top_k, max_new_tokens=max_new_tokens, gen_batch_size=gen_batch_size, judge=judge,
                     save_checkpoint=save_checkpoint)
    refs = load_reference(reference) if reference else None
    summary = run_pipeline(cfg, out, force=force, reference=refs)
    print_summary(summary, out)


@model_options
def orthogonalize(
    spec: ModelSpec,
    out: Path = typer.Argument(..., help="output directory for the edited checkpoint"),
    direction: Path = typer.Option(..., "--direction", help="a direction or subspace file (.safetensors + .json) "
                                                            "from refdir; a subspace's whole span is removed"),
    in_memory: bool = typer.Option(False, help="load the whole model instead of streaming a safetensors directory"),
    force: bool = typer.Option(False),
) -> None:
    """Write a checkpoint whose residual-writing weights cannot write along the direction (or in the subspace).

    A local safetensors directory is streamed one tensor at a time (memory ≈ one shard); a .gguf
    input with a .gguf output is edited in GGUF; the embedded default and --in-memory load the model."""
    if out.exists() and not force:
        raise RefdirError(f"output directory {out} already exists; pass --force to overwrite it")
    _refuse_search_selection(direction)
    d = load_edit(direction)
    v = edit_tensor(d)
    spec.check(chat=False)  # a missing model, an unknown model type or custom code: refused before any work
    gguf_out = spec.model.endswith(".gguf") and str(out).endswith(".gguf")
    check_output(out, "file" if gguf_out else "dir", [spec.model, direction])
    if force and not gguf_out:
        check_replaceable(out)
    src = Path(spec.model)
    if gguf_out:
        summary = orthogonalize_gguf(src, v, out, force=force)
        console.print(f"edited {len(summary['edited'])} tensors into [bold]{out}[/]")
        for name, change in summary["changed_types"].items():
            console.print(f"  type changed: {name}: {change}")
        return
    if not in_memory and src.is_dir() and any(src.glob("*.safetensors")):
        summary = stream_orthogonalize(src, v, out, force=force)
        console.print(f"streamed {len(summary['edited'])} edited tensors into [bold]{out}[/]")
        return
    lm = spec.load_model()
    hidden = lm.model.config.get_text_config().hidden_size
    if d.d_model != hidden:
        raise RefdirError(f"direction has size {d.d_model} but {spec.model} has hidden size {hidden}")
    save_orthogonalized(lm.model, lm.tokenizer, v, out, force=force,
                        meta={"direction": {"layer": d.layer, "position": d.position, "file": str(direction)},
                              "source_model": lm.model_id})
    console.print(f"orthogonalized checkpoint written to [bold]{out}[/]")


def _refuse_search_selection(direction: Path) -> None:
    """A run with the search (the default) named as the direction, as ``RUN/selection/direction`` (which it keeps
    no file at) or as the run dir: say what the run has instead of "expected … .safetensors"."""
    rd = run_of(direction)
    if rd is None or not (rd.search_dir() / "front.json").exists():
        return
    main = [rd.source_path(n) for n in ("pca", "rdo") if rd.source_path(n).exists()]
    raise RefdirError(
        f"{rd.path} is a run with the search: its chosen edit (strengths per layer and component, a second "
        f"direction) is no single direction file, and the run wrote it as {rd.path / CHECKPOINT}; "
        + (f"--direction {main[0].with_suffix('')} removes the direction it searched fully; " if main else "")
        + f"refdir export {quote(str(rd.path))} OUT --point chosen writes that edit again (another --dtype, or OUT.gguf "
        "for a GGUF model), --point K a point of its front")


def print_summary(s: dict, out: Path) -> None:
    """The chosen edit and the refusal table of a finished run."""
    if s.get("method") == "search":
        print_search_summary(s, out)
    else:
        ch = s["selection"]["chosen"]
        if ch:
            console.print(f"chosen: position {ch['position']}, layer {ch['layer']}  bypass {ch['bypass']:.2f}  "
                          f"induce {ch['induce']:.2f}  KL {ch['kl']:.3f}  ({s['selection']['rule']})")
        t = Table("arm / prompts", "refusal", "paper substrings", "degenerate")
        for k, v in s["refusal"].items():
            t.add_row(k, rate_text(v["refusal"], v["n"]), f"{v['refusal_paper']:.3f}", str(v["degenerate"]))
        if s.get("checkpoint"):
            c = s["checkpoint"]
            t.add_row("orthogonalized/harmful", rate_text(c["refusal"], c["n"]), f"{c['refusal_paper']:.3f}",
                      str(c["degenerate"]))
        console.print(t)
        if s.get("checkpoint"):
            ck = RunDir(out).checkpoint_model_dir()
            console.print(f"checkpoint: {ck}  (try it: refdir steer {quote(str(ck))})", markup=False, soft_wrap=True)
    print_warnings(s.get("warnings", []))
    console.print(f"report: [bold]{out / 'report.html'}[/]  ({s['timings_s']['total']:.0f} s)")


def print_search_summary(s: dict, out: Path) -> None:
    c = s["choice"]
    console.print(f"chosen: {c['describe']}  (trial {c['trial']}; {c['reason']}{calibration_text(c)})")
    console.print(f"search: {s['search']['n_trials']} trials in {s['search']['spent_s']:.0f} of "
                  f"{s['search']['budget_s']:.0f} s")
    t = Table("set", "arm", "harmful refusal", "harmless refusal", "first-token KL")
    for name, arm, h, b, k in test_rows(s["test"]):
        t.add_row(name, arm, rate_text(h["refusal"], h["n"]), rate_text(b["refusal"], b["n"]) if b else "",
                  f"{k:.4f}" if k is not None else "")
    console.print(t)
    for name, rel in s["test"]["relation"].items():
        console.print(f"  {name}: {rel}")
    answered = answered_kl_text(s["test"])
    if answered:
        console.print(f"  {answered}", markup=False)
    left = s["test"].get("still_refused")
    if left and left["n"]:
        phrases = ", ".join(f"{m!r} {n}" for m, n in left["by_phrase"].items())
        console.print(f"  still refused by the chosen edit ({left['set']}): {left['n']}, by the {s['judge']} judge's "
                      f"phrase: {phrases} (the report lists them)", markup=False)
    ck = s.get("checkpoint")
    if ck:
        v, rd = ck["verified"], RunDir(out)
        console.print(f"checkpoint: {rd.checkpoint_model_dir()}  (weights vs hooks: KL {v['kl_hooks_weights']:.2e}, "
                      f"top-1 agree {v['top1_agree']:.2f})" + (f"; GGUF {rd.checkpoint_gguf()}" if ck.get("gguf") else ""),
                      markup=False)
        console.print(f"  try it: refdir steer {quote(str(rd.checkpoint_model_dir()))}  (a prompt a line; the base "
                      "model: refdir steer MODEL)", markup=False, soft_wrap=True)
