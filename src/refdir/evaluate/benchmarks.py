"""Capability benchmarks through the lm-eval harness, for any arm.

The already-loaded Hugging Face model is wrapped in lm-eval's ``HFLM`` (no second copy), and an arm's
intervention hooks (ablation or addition of a direction) stay registered around ``simple_evaluate``, so every
log-likelihood and generation the harness asks for runs through them. Checkpoint arms are loaded one at a time.

Benchmark data is downloaded from the hub on first use; offline, only tasks over local files (defined in YAML
files under ``include_path``) or datasets already in the local cache run. Missing data gives one clear error.
Needs the ``eval`` extra (``pip install 'refdir[eval]'``).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from pathlib import Path

from pydantic import BaseModel
from tqdm.auto import tqdm

from refdir.core.html import table_html, write_sections_report
from refdir.core.io import atomic_dir, atomic_write_json, atomic_write_text
from refdir.core.models import load_model
from refdir.core.rundir import RunDir
from refdir.errors import RefdirError
from refdir.evaluate.evaluation import arm_context, load_directions, parse_arm

DEFAULT_TASKS = ["mmlu", "arc_challenge", "gsm8k", "truthfulqa_mc2", "winogrande", "tinyHellaswag"]


class BenchConfig(BaseModel):
    model: str = "default"
    arms: list[str] = ["base"]
    tasks: list[str] | None = None  # default: DEFAULT_TASKS
    include_path: str | None = None
    include_defaults: bool = True  # also index lm-eval's own tasks (slow to index); off: include_path only
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    chat: bool = False
    dtype: str = "auto"
    device: str = "cpu"
    device_map: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise RefdirError("refdir bench needs the lm-eval harness: pip install 'refdir[eval]'") from e
    return lm_eval, TaskManager


def task_manager(include_path: str | Path | None = None, include_defaults: bool = True):
    """lm-eval's task index: its own tasks (unless ``include_defaults`` is off) and the YAML files under
    ``include_path``."""
    _, TaskManager = _lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise RefdirError(f"--include-path {include_path} is not a directory")
    if not include_defaults and include_path is None:
        raise RefdirError("without lm-eval's own tasks, give --include-path with task YAML files")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its index warns per unreadable YAML file
    return TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)


def check_tasks(tm, tasks: list[str]) -> None:
    """Refuse task names lm-eval does not know (before loading any model)."""
    if not tasks:
        raise RefdirError("no benchmark tasks given")
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise RefdirError(f"unknown lm-eval task(s): {', '.join(unknown)}; list the available ones with "
                          "`lm-eval ls tasks`, or define your own in a YAML file under --include-path")


def load_tasks(tm, tasks: list[str]) -> dict:
    """Build the tasks (this fetches their data), turning a failed download into one clear error."""
    try:
        return tm.load(tasks)
    except Exception as e:  # noqa: BLE001 - offline, gated or missing datasets surface as many exception types
        msg = str(e).splitlines()[0] if str(e) else ""
        raise RefdirError(f"could not get the data of lm-eval task(s) {', '.join(tasks)}: {type(e).__name__}: "
                          f"{msg[:200]} (benchmark data is downloaded from the hub on first use; offline, only "
                          "tasks over local files or cached datasets run)") from e


def harness_lm(model, tokenizer, batch_size: int = 8):
    """lm-eval's HF wrapper around an already-loaded model (hooks registered on it stay active)."""
    from lm_eval.models.huggingface import HFLM

    dev = next(model.parameters()).device
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(dev), trust_remote_code=False)


def _metrics(task_result: dict) -> dict:
    out = {}
    for k, v in task_result.items():
        if k == "alias" or "stderr" in k or not isinstance(v, (int, float)):
            continue
        out[k.split(",")[0]] = float(v)
    return out


def evaluate(harness, tm, tasks: list[str], *, limit=None, num_fewshot=None, chat: bool = False) -> dict:
    """Run lm-eval; returns ``{"results": {task: {metric: value}}, "samples": {task: [...]}}``."""
    lm_eval, _ = _lm_eval()
    load_tasks(tm, tasks)
    res = lm_eval.simple_evaluate(model=harness, tasks=tasks,
                                  task_manager=tm, limit=limit, num_fewshot=num_fewshot, log_samples=True,
                                  apply_chat_template=chat, verbosity="ERROR", bootstrap_iters=0)
    results = {t: _metrics(r) for t, r in res["results"].items()}
    samples = {t: [{"doc_id": s["doc_id"], "target": str(s.get("target")), "resps": _plain(s["filtered_resps"])}
                   for s in ss] for t, ss in res.get("samples", {}).items()}
    return {"results": results, "samples": samples}


def _plain(x):
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, (int, float)):
        return float(x)
    return str(x)


def run_bench(cfg: BenchConfig, out: str | Path, *, force: bool = False, run_dir: str | Path | None = None) -> dict:
    """Evaluate every arm on the tasks; write ``results.json``, ``table.md`` and ``samples/ARM.json`` to ``out``
    (atomically; an existing ``out`` is refused unless ``force``)."""
    out = Path(out)
    if out.exists() and not force:
        raise RefdirError(f"output directory {out} already exists; pass --force to overwrite it")
    arms = [parse_arm(a) for a in cfg.arms]
    tasks = cfg.tasks or list(DEFAULT_TASKS)
    tm = task_manager(cfg.include_path, cfg.include_defaults)
    check_tasks(tm, tasks)
    load_tasks(tm, tasks)  # fail on missing data before any model is loaded
    t0 = time.time()
    base = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map,
                      trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    directions = load_directions(arms, base.model.config.get_text_config().hidden_size)
    rows = []
    for arm, spec in tqdm(list(zip(arms, cfg.arms, strict=True)), desc="arms"):
        ta = time.time()
        lm = None
        if arm.kind == "ckpt":
            lm = load_model(arm.target, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map,
                            trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
            model, tok = lm.model, lm.tokenizer
        else:
            model, tok = base.model, base.tokenizer
        harness = harness_lm(model, tok, cfg.batch_size)
        with arm_context(model, arm, directions.get(arm.target)):
            r = evaluate(harness, tm, tasks, limit=cfg.limit, num_fewshot=cfg.num_fewshot, chat=cfg.chat)
        rows.append({"name": arm.label, "spec": spec, **r, "seconds": time.time() - ta})
        del harness
        if lm is not None:
            del model, lm
            gc.collect()
    summary = {"config": cfg.model_dump(), "model": base.model_id, "tasks": tasks,
               "arms": [{k: v for k, v in r.items() if k != "samples"} for r in rows],
               "timings_s": {"total": time.time() - t0}}
    with atomic_dir(out, force=force) as tmp:
        atomic_write_json(tmp / "results.json", summary)
        for i, r in enumerate(rows):
            atomic_write_json(tmp / "samples" / f"{i:02d}.json", {"arm": r["name"], "samples": r["samples"]})
        atomic_write_text(tmp / "table.md", bench_markdown(summary))
    if run_dir is not None:
        head, body = bench_table(summary)
        RunDir(run_dir).add_section("bench", table_html(body, head), "Capability benchmarks (lm-eval)")
        write_sections_report(run_dir)  # only where run_dir holds no run; a run's report is its caller's to render
    return summary


def bench_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    cols = []
    for a in summary["arms"]:
        for t, ms in a["results"].items():
            for m in ms:
                if (t, m) not in cols:
                    cols.append((t, m))
    head = ["arm"] + [f"{t} {m}" for t, m in cols]
    body = []
    for a in summary["arms"]:
        vals = []
        for t, m in cols:
            v = a["results"].get(t, {}).get(m)
            vals.append("n/a" if v is None or not math.isfinite(v) else f"{v:.4f}")
        body.append([a["name"]] + vals)
    return head, body


def bench_markdown(summary: dict) -> str:
    head, body = bench_table(summary)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body]) + "\n"
