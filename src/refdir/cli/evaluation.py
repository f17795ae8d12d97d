"""`refdir eval` (compare arms) and `refdir bench` (lm-eval capability benchmarks)."""

from __future__ import annotations

from pathlib import Path

import typer

from refdir.cli.common import console, model_options
from refdir.core.dirlock import adding_to
from refdir.core.run_files import model_name
from refdir.core.rundir import RunDir
from refdir.core.spec import ModelSpec
from refdir.errors import RefdirError
from refdir.evaluate.benchmarks import BenchConfig, bench_markdown, run_bench
from refdir.evaluate.evaluation import EvalConfig, markdown_tables, run_eval
from refdir.workflows.report import write_report

ArmOpt = typer.Option(None, "--arm", help="an arm (repeatable): base | ablate:DIR | add:DIR[:coeff=C][:layer=L] | "
                                         "ckpt:MODEL; any arm may end with :name=LABEL")
RunOpt = typer.Option(None, "--run", help="a refdir run dir: default arms from it, and a report section")


def default_arms(run: Path | None) -> list[str]:
    """Without --arm: base, and for a run dir its direction under ablation and its checkpoint (a --method paper
    run's orthogonalized one, or a search run's chosen edit)."""
    arms = ["base"]
    if run is not None:
        rd = RunDir(run)
        d = rd.direction_path()
        paper = d.with_suffix(".safetensors").exists()
        if paper:
            arms.append(f"ablate:{d}")
        elif rd.direction() is not None:  # a run with the search keeps its selection's pick among the candidates
            arms.append(f"ablate:{rd.path}")
        if rd.has_checkpoint():  # a search run's checkpoint holds its chosen edit, not the ablation beside it
            arms.append(f"ckpt:{rd.checkpoint_model_dir()}:name={'orthogonalized' if paper else 'chosen edit'}")
    return arms


def _run_model(spec: ModelSpec, run: Path | None) -> ModelSpec:
    """With --run and no model given, the run's own model."""
    if run is not None and spec.model == "default" and RunDir(run).config_path.exists():
        return spec.model_copy(update={"model": model_name(RunDir(run).config()) or spec.model})
    return spec


def _out_dir(out: Path | None, run: Path | None, default) -> Path:
    """``out``, else the run's directory for this command's output (``default(RunDir)``)."""
    if out is not None:
        return out
    if run is None:
        raise RefdirError(f"give --out DIR (or --run RUN_DIR to write into {default(RunDir('RUN_DIR'))})")
    return default(RunDir(run))


@model_options
def eval_cmd(
    spec: ModelSpec,
    arm: list[str] = ArmOpt,
    out: Path = typer.Option(None, "--out", help="output directory (default RUN/evaluation with --run)"),
    run: Path = RunOpt,
    harmful: str = typer.Option("embedded:harmful:test", help="harmful prompts (refusal and safety)"),
    harmless: str = typer.Option("embedded:harmless:test", help="harmless prompts (on-distribution CE and KL)"),
    column: str = typer.Option("instruction"),
    n_harmful: int = typer.Option(None, help="harmful prompts used (default: all)"),
    n_harmless: int = typer.Option(32),
    text: str = typer.Option("embedded", help="general-text corpus: embedded, a txt/json/jsonl file or a hub id"),
    n_text: int = typer.Option(None),
    text_tokens: int = typer.Option(256, help="truncate each general text to this many tokens"),
    pairs: str = typer.Option("embedded", help="instruction+response pairs: embedded or a json/jsonl file"),
    n_pairs: int = typer.Option(None),
    max_new_tokens: int = typer.Option(64, help="tokens generated per harmful prompt for refusal and safety"),
    ondist_tokens: int = typer.Option(64, help="length of the base model's continuations on harmless prompts"),
    kl_tokens: int = typer.Option(32, help="positions of the continuation averaged in multi-token KL"),
    safety_judge: str = typer.Option("substring", help="safety judge: substring | llamaguard:MODEL | "
                                                       "harmbench:MODEL | llm:MODEL (guard models need a download)"),
    short_safe: bool = typer.Option(False, help="llamaguard: completions under 15 words count as safe (paper)"),
    batch_size: int = typer.Option(16),
    force: bool = typer.Option(False, help="overwrite an existing output directory"),
) -> None:
    """Compare arms side by side: CE loss (general text, instruction pairs, on-distribution), KL, refusal
    and safety; Markdown + JSON tables and plots."""
    dest = _out_dir(out, run, RunDir.evaluation_dir)
    spec = _run_model(spec, run)
    cfg = EvalConfig(model=spec.model, arms=arm or default_arms(run), harmful=harmful, harmless=harmless,
                     column=column, n_harmful=n_harmful, n_harmless=n_harmless, text=text, n_text=n_text,
                     text_tokens=text_tokens, pairs=pairs, n_pairs=n_pairs, max_new_tokens=max_new_tokens,
                     ondist_tokens=ondist_tokens, kl_tokens=kl_tokens, judge=safety_judge, short_safe=short_safe,
                     system=spec.system, chat_template=spec.chat_template, dtype=spec.dtype, device=spec.device,
                     device_map=spec.device_map, trust_remote_code=spec.trust_remote_code,
                     allow_pickle=spec.allow_pickle, batch_size=batch_size)
    with adding_to(run):
        summary = run_eval(cfg, dest, force=force, run_dir=run)
        if run is not None:
            write_report(run)
    console.print(markdown_tables(summary))
    added = f"; report section added to {RunDir(run).report_path}" if run else ""
    console.print(f"written to [bold]{dest}[/]{added}")


@model_options
def bench(
    spec: ModelSpec,
    arm: list[str] = ArmOpt,
    tasks: str = typer.Option(None, help="comma-separated lm-eval tasks (default: mmlu, arc_challenge, gsm8k, "
                                         "truthfulqa_mc2, winogrande, tinyHellaswag)"),
    include_path: Path = typer.Option(None, help="a directory of extra lm-eval task YAML files"),
    lm_eval_tasks: bool = typer.Option(True, help="also index lm-eval's own tasks (off: only --include-path)"),
    out: Path = typer.Option(None, "--out"),
    run: Path = RunOpt,
    limit: float = typer.Option(None, help="examples per task (lm-eval --limit)"),
    num_fewshot: int = typer.Option(None),
    batch_size: int = typer.Option(8),
    chat: bool = typer.Option(False, help="apply the model's chat template to benchmark prompts"),
    force: bool = typer.Option(False),
) -> None:
    """Capability benchmarks through the lm-eval harness, for any arm (hooks included)."""
    if spec.system is not None or spec.chat_template is not None:
        raise RefdirError("refdir bench formats prompts through lm-eval (see --chat); it takes no --system or "
                          "--chat-template")
    dest = _out_dir(out, run, RunDir.benchmarks_dir)
    spec = _run_model(spec, run)
    cfg = BenchConfig(model=spec.model, arms=arm or default_arms(run),
                      tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
                      include_path=str(include_path) if include_path else None, include_defaults=lm_eval_tasks,
                      limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, chat=chat, dtype=spec.dtype,
                      device=spec.device, device_map=spec.device_map, trust_remote_code=spec.trust_remote_code,
                      allow_pickle=spec.allow_pickle)
    with adding_to(run):
        summary = run_bench(cfg, dest, force=force, run_dir=run)
        if run is not None:
            write_report(run)
    console.print(bench_markdown(summary))
    console.print(f"written to [bold]{dest}[/]")
