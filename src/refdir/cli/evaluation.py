"""`refdir eval` (compare arms) and `refdir bench` (lm-eval capability benchmarks)."""

from __future__ import annotations

from pathlib import Path

import typer

from refdir.cli.common import ModelArg, console, fail
from refdir.errors import RefdirError

ArmOpt = typer.Option(None, "--arm", help="an arm (repeatable): base | ablate:DIR | add:DIR[:coeff=C][:layer=L] | "
                                         "ckpt:MODEL; any arm may end with :name=LABEL")


def _default_arms(run: Path | None) -> list[str]:
    """Without --arm: base, and for a run dir its direction under ablation and its orthogonalized checkpoint."""
    arms = ["base"]
    if run is not None:
        d = run / "selection" / "direction"
        if d.with_suffix(".safetensors").exists():
            arms.append(f"ablate:{d}")
        if (run / "checkpoint" / "model" / "config.json").exists():
            arms.append(f"ckpt:{run / 'checkpoint' / 'model'}:name=orthogonalized")
    return arms


def _run_model(model: str, run: Path | None) -> str:
    """With --run and no model given, the run's own model."""
    if run is not None and model == "default" and (run / "config.json").exists():
        import json

        return json.loads((run / "config.json").read_text()).get("model", model)
    return model


def _out_dir(out: Path | None, run: Path | None, name: str) -> Path:
    if out is not None:
        return out
    if run is None:
        raise RefdirError("give --out DIR (or --run RUN_DIR to write into RUN_DIR/" + name + ")")
    return run / name


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``refdir`` app."""

    @app.command("eval")
    def eval_cmd(
        model: str = ModelArg,
        arm: list[str] = ArmOpt,
        out: Path = typer.Option(None, "--out", help="output directory (default RUN/evaluation with --run)"),
        run: Path = typer.Option(None, "--run", help="a refdir run dir: default arms from it, and a report section"),
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
        judge: str = typer.Option("substring", help="safety judge: substring | llamaguard:MODEL | harmbench:MODEL "
                                                   "| llm:MODEL (guard models need a download)"),
        short_safe: bool = typer.Option(False, help="llamaguard: completions under 15 words count as safe (paper)"),
        system: str = typer.Option(None),
        chat_template: str = typer.Option(None, "--chat-template"),
        dtype: str = typer.Option("auto"),
        device: str = typer.Option("cpu"),
        trust_remote_code: bool = typer.Option(False),
        batch_size: int = typer.Option(16),
        force: bool = typer.Option(False, help="overwrite an existing output directory"),
    ) -> None:
        """Compare arms side by side: CE loss (general text, instruction pairs, on-distribution), KL, refusal
        and safety; Markdown + JSON tables and plots."""
        from refdir.evaluate.evaluation import EvalConfig, markdown_tables, run_eval

        try:
            dest = _out_dir(out, run, "evaluation")
            cfg = EvalConfig(model=_run_model(model, run), arms=arm or _default_arms(run), harmful=harmful,
                             harmless=harmless, column=column, n_harmful=n_harmful, n_harmless=n_harmless,
                             text=text, n_text=n_text, text_tokens=text_tokens, pairs=pairs, n_pairs=n_pairs, max_new_tokens=max_new_tokens,
                             ondist_tokens=ondist_tokens, kl_tokens=kl_tokens, judge=judge, short_safe=short_safe,
                             system=system, chat_template=chat_template, dtype=dtype, device=device,
                             trust_remote_code=trust_remote_code, batch_size=batch_size)
            summary = run_eval(cfg, dest, force=force, run_dir=run)
        except RefdirError as e:
            fail(e)
        console.print(markdown_tables(summary))
        added = f"; report section added to {run / 'report.html'}" if run else ""
        console.print(f"written to [bold]{dest}[/]{added}")

    @app.command("bench")
    def bench_cmd(
        model: str = ModelArg,
        arm: list[str] = ArmOpt,
        tasks: str = typer.Option(None, help="comma-separated lm-eval tasks (default: mmlu, arc_challenge, gsm8k, "
                                             "truthfulqa_mc2, winogrande, tinyHellaswag)"),
        include_path: Path = typer.Option(None, help="a directory of extra lm-eval task YAML files"),
        lm_eval_tasks: bool = typer.Option(True, help="also index lm-eval's own tasks (off: only --include-path)"),
        out: Path = typer.Option(None, "--out"),
        run: Path = typer.Option(None, "--run", help="a refdir run dir: default arms from it, and a report section"),
        limit: float = typer.Option(None, help="examples per task (lm-eval --limit)"),
        num_fewshot: int = typer.Option(None),
        batch_size: int = typer.Option(8),
        chat: bool = typer.Option(False, help="apply the model's chat template to benchmark prompts"),
        dtype: str = typer.Option("auto"),
        device: str = typer.Option("cpu"),
        trust_remote_code: bool = typer.Option(False),
        force: bool = typer.Option(False),
    ) -> None:
        """Capability benchmarks through the lm-eval harness, for any arm (hooks included)."""
        from refdir.evaluate.benchmarks import BenchConfig, bench_markdown, run_bench

        try:
            dest = _out_dir(out, run, "benchmarks")
            cfg = BenchConfig(model=_run_model(model, run), arms=arm or _default_arms(run),
                              tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
                              include_path=str(include_path) if include_path else None,
                              include_defaults=lm_eval_tasks, limit=limit,
                              num_fewshot=num_fewshot, batch_size=batch_size, chat=chat, dtype=dtype,
                              device=device, trust_remote_code=trust_remote_code)
            summary = run_bench(cfg, dest, force=force, run_dir=run)
        except RefdirError as e:
            fail(e)
        console.print(bench_markdown(summary))
        console.print(f"written to [bold]{dest}[/]")
