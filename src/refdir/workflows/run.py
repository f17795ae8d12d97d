"""``refdir run``: the staged pipeline from a model to a selected direction, an evaluation, an
orthogonalized checkpoint and a report.

Stages (one directory each under the run dir, see :mod:`refdir.core.rundir`; the functions are in
:mod:`refdir.workflows.stages`):

    --method search (default):
    data → refusal_tokens → filter → candidates → search (selection, trials, refinement, choice) → eval → checkpoint
    --method paper:
    data → refusal_tokens → filter → candidates → selection → coeff → eval → checkpoint

A stage's key hashes the part of the config it depends on, the content of the files it reads (data files,
the local model's files) and its upstream keys; rerunning the same command skips stages whose key matches and
recomputes the rest. The run holds the directory's lock from start to end: a second refdir process writing it
is refused, and the temp files of a killed run are removed when the next one starts.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from refdir.core import rundir as rdl
from refdir.core.fingerprint import files_sha256, versions
from refdir.core.memory import peak_rss_mib, trim_heap
from refdir.core.rundir import RunDir
from refdir.core.spec import DataSpec
from refdir.errors import RefdirError
from refdir.method.selection import Selection
from refdir.workflows.checks import (
    all_prompts,
    check_run,
    choice_warnings,
    no_early_leftovers,
    refusal_warnings,
)
from refdir.workflows.finish import stage_edit_checkpoint, stage_test
from refdir.workflows.report import write_report
from refdir.workflows.search import Prepared, Timings, stage_search
from refdir.workflows.stages import (
    Loaded,
    RunConfig,
    console,
    stage_candidates,
    stage_checkpoint,
    stage_coeff,
    stage_data,
    stage_eval,
    stage_filter,
    stage_refusal_tokens,
    stage_selection,
)

__all__ = ["RunConfig", "run_config", "run_pipeline", "val_prompts"]


def val_prompts(method: str) -> int:
    """How many val prompts of each kind ``refdir run`` takes by default: 40 with the search (its proxy), 32 with
    ``--method paper`` (the paper's selection)."""
    return 40 if method == "search" else 32


def run_config(method: str = "search", **given) -> RunConfig:
    """A :class:`RunConfig` with ``refdir run``'s defaults for the settings that depend on the method, where
    ``given`` leaves them out (or gives None): with the search the pca direction source, the second direction, 64
    new tokens on harmful prompts, generation batches of 200 and :func:`val_prompts` val prompts; with
    ``method="paper"`` the paper's difference in means, no second direction, 128 tokens and batches of 40. The
    command line builds its config here, so ``run_pipeline(run_config(model=ModelSpec(model="default")), out)``
    runs what ``refdir run default --out OUT`` runs."""
    search = method == "search"
    cfg = {"direction_method": "pca" if search else "dim", "second_direction": search,
           "max_new_tokens": 64 if search else 128, "gen_batch_size": 200 if search else 40}
    cfg |= {k: v for k, v in given.items() if v is not None}
    cfg["second_direction"] = bool(cfg["second_direction"]) and search  # the paper's pipeline has none
    if "data" not in cfg:
        cfg["data"] = DataSpec(n_val=val_prompts(method))
    return RunConfig(method=method, **cfg)


def run_pipeline(cfg: RunConfig, out: str | Path, force: bool = False, progress: bool = True,
                 reference: list[dict] | None = None) -> dict:
    """Run (or resume) every stage in ``out``; write summary.json, manifest.json and report.html. Returns the
    summary. ``force`` replaces a directory that is not a run of this model. The directory is locked against
    other refdir processes until the run ends (also on error). Everything that can be checked is checked before
    the directory is created or touched (:func:`refdir.workflows.checks.check_run`); a directory this call created
    is removed again when a failure stops it before the refusal-token stage is done. ``reference``: another
    tool's measured points (:func:`refdir.method.search.load_reference`), drawn beside the held-out result."""
    sets = check_run(cfg, out)
    new = not os.path.lexists(out)
    rd = RunDir.create(out, cfg.model_dump(), force=force)
    with no_early_leftovers(rd, new), rd:
        return run_stages(rd, cfg, progress, sets, reference)


def run_stages(rd: RunDir, cfg: RunConfig, progress: bool = True, checked: dict | None = None,
               reference: list[dict] | None = None) -> dict:
    """Every stage of a run in the opened (and locked) ``rd``, then the summary, manifest and report. ``checked``:
    the split sets :func:`check_run` read (else the data stage splits them)."""
    m = Loaded(cfg.model)  # loaded by the first stage that needs it
    t0 = time.time()
    times: dict[str, float] = {}
    rss: dict[str, float] = {}  # the process's peak RSS (MiB) at the end of each stage: it grows where it peaked

    def timed(name, fn, *a, **kw):
        t = time.time()
        r = fn(*a, **kw)
        times[name] = round(time.time() - t, 2)
        rss[name] = peak_rss_mib()
        trim_heap()  # what the stage freed goes back to the OS before the next one allocates
        return r

    # 1. harmful/harmless train, val and test prompts
    sets = timed(rdl.DATA, stage_data, rd, cfg, checked)
    m.prompts = all_prompts(sets)  # refused on load if they do not fit the model's context
    # 2. the tokens the model starts its refusals with
    ids = timed(rdl.REFUSAL_TOKENS, stage_refusal_tokens, rd, cfg, m, sets, progress=progress)
    warnings = refusal_warnings(rd)
    # 3. keep the prompts the model already treats as harmful / harmless (and the train residual means)
    filt, means = timed(rdl.FILTER, stage_filter, rd, cfg, m, sets, ids, progress=progress)
    # 4. difference-in-means candidates, every post-instruction position and layer
    cands = timed(rdl.CANDIDATES, stage_candidates, rd, cfg, m, filt, means, progress=progress)
    if cfg.method == "search":
        p = Prepared(rd, m, sets, ids, filt, cands)
        # 5. selection (the plain direction), then the Pareto search within the budget, and the point for the target
        tm = Timings()
        res = timed(rdl.SEARCH, stage_search, p, cfg, tm, progress=progress)
        times.update({f"search.{k}": v for k, v in tm.s.items() if k in SEARCH_PHASES})
        # 6. the chosen edit, the plain direction and the base model on the test (and held-out) prompts
        cands = p.cands  # with the optimized direction, if the search trained one
        test = timed(rdl.EVAL, stage_test, rd, cfg, m, sets, cands, res["choice"], res["plain"], progress=progress)
        # 7. the chosen edit in the weights (in place), saved as HF (and GGUF), checked against the hooks by logits
        ckpt = timed(rdl.CHECKPOINT, stage_edit_checkpoint, rd, cfg, m, sets, cands, res["choice"], progress=progress)
        warnings += choice_warnings(res["choice"], ckpt)
        summary = search_summary(rd, cfg, sets, res, test, ckpt, finish_times(times, t0, m))
        summary["reference"] = reference or []
    else:
        summary = paper_stages(rd, cfg, m, sets, ids, filt, cands, timed, progress)
        summary["timings_s"] = finish_times(times, t0, m)
    summary["warnings"] = warnings
    summary["peak_rss_mib"] = rss
    summary["reused"] = [k for k in times if k in (*rdl.STAGES, rdl.SEARCH) and k not in rd.written]
    summary["computed_s"] = computed_times(rd, times, summary["reused"])
    rd.write_summary(summary)
    rd.write_manifest(run_manifest(rd, cfg, m, sets))
    write_report(rd.path)
    return summary


def finish_times(times: dict, t0: float, m: Loaded) -> dict:
    times["total"] = round(time.time() - t0, 2)
    if m.load_s is not None:
        times["load"] = round(m.load_s, 2)
    return times


def computed_times(rd: RunDir, times: dict, reused: list[str]) -> dict:
    """Per stage (and search phase), the seconds it took when it was computed: this invocation's for the stages
    it wrote, and for the ones it ``reused`` the time the summary of the invocation that computed them recorded
    (left out where none did), so that a rerun's report still says where the time of the run went."""
    try:
        prev = (rd.summary() or {}).get("computed_s")
    except RefdirError:  # an unreadable summary is rewritten below; only its timings are lost
        prev = None
    prev = prev if isinstance(prev, dict) else {}
    out = {k: v for k, v in times.items() if k not in ("total", "load") and k.split(".")[0] not in reused}
    out.update({k: v for k, v in prev.items() if k.split(".")[0] in reused and isinstance(v, (int, float))})
    return out


def paper_stages(rd: RunDir, cfg: RunConfig, m: Loaded, sets: dict, ids: list[int], filt: dict, cands, timed,
                 progress: bool) -> dict:
    """The paper's stages after the candidates: selection, coefficient, evaluation and the orthogonalized
    checkpoint; returns the summary (without timings)."""
    # 5. score the candidates on val and pick the direction
    sel, direction = timed(rdl.SELECTION, stage_selection, rd, cfg, m, filt, cands, ids, progress=progress)
    # 6. the addition coefficient
    if direction is None:
        console.print("[bold yellow]every candidate was filtered out:[/]\n" + sel.diagnostic())
        coeff = stage_coeff(rd, cfg, m, filt, None, ids)  # only keys the stage: the eval's key chains on it
    else:
        coeff = timed(rdl.COEFF, stage_coeff, rd, cfg, m, filt, direction, ids)
    # 7. generate and judge on the test prompts: baseline, ablation, addition
    scores = timed(rdl.EVAL, stage_eval, rd, cfg, m, sets, direction, coeff["coeff"] if coeff else None, ids,
                   progress=progress)
    # 8. the orthogonalized checkpoint, reloaded and judged
    ckpt = timed(rdl.CHECKPOINT, stage_checkpoint, rd, cfg, m, sets, direction, progress=progress)

    return run_summary(rd, cfg, sets, sel, coeff, scores, ckpt, {})


JUDGED = ("refusal", "refusal_broad", "refusal_paper", "degenerate", "n")
SEARCH_PHASES = ("proxy_base", "selection", "optimize", "search", "refine", "confirm", "second")


def search_summary(rd: RunDir, cfg: RunConfig, sets: dict, res: dict, test: dict, ckpt: dict | None,
                   timings: dict) -> dict:
    """summary.json of a run with the search: the chosen point, the plain direction, and the test table."""
    return {
        "model": cfg.model.model,
        "method": "search",
        "refusal_tokens": rd.refusal_tokens()["tokens"],
        "filter": rd.filter_info(),
        "selection": {"chosen": res["selection"]["chosen"], "n_scored": res["selection"]["n_scored"]},
        "search": {"budget_s": res["budget_s"], "spent_s": res["spent_s"], "n_trials": res["n_trials"],
                   "n_front": len(res["front"]), "kl_target": cfg.kl_target,
                   "spearman_refusal": res.get("spearman_refusal")},
        "choice": res["choice"],
        "test": {"scores": {k: {kk: v[kk] for kk in JUDGED} for k, v in test["scores"].items()}, "kl": test["kl"],
                 "kl_answered": test.get("kl_answered", {}), "relation": test["relation"], "max_new_tokens": test["max_new_tokens"],
                 "harmless_tokens": test.get("harmless_tokens"), "still_refused": test.get("still_refused"),
                 "stop_settled": test.get("stop_settled", False)},
        "checkpoint": ckpt,
        "judge": cfg.judge,
        "n_test": {k: {"harmful": len(sets["harmful"].get(k, [])), "harmless": len(sets["harmless"].get(k, []))}
                   for k in ("test", "heldout")},
        "timings_s": timings,
    }


def run_summary(rd: RunDir, cfg: RunConfig, sets: dict, sel: Selection, coeff: dict | None, scores: dict,
                ckpt: dict | None, timings: dict) -> dict:
    """summary.json: the headline numbers of a run."""
    return {
        "model": cfg.model.model,
        "refusal_tokens": rd.refusal_tokens()["tokens"],
        "filter": rd.filter_info(),
        "selection": {
            "chosen": asdict(sel.chosen) if sel.chosen else None,
            "rule": sel.rule, "baseline": sel.baseline, "filter_counts": sel.filter_counts,
            "n_layers": sel.config["n_layers"],
        },
        "addition_coeff": coeff,
        "refusal": {k: {kk: v[kk] for kk in JUDGED} for k, v in scores.items()},
        "checkpoint": {k: ckpt[k] for k in (*JUDGED, "path")} if ckpt else None,
        "judge": cfg.judge,
        "n_test": {"harmful": len(sets["harmful"]["test"]), "harmless": len(sets["harmless"]["test"])},
        "timings_s": timings,
    }


def run_manifest(rd: RunDir, cfg: RunConfig, m: Loaded, sets: dict) -> dict:
    """manifest.json: versions, config, the model's source and file hashes, data hashes and stage keys. A fully
    cached rerun (model not loaded) keeps the model part of the previous manifest; without one (a run killed just
    before it wrote its manifest) the model is loaded for its source, so that the manifest is the same."""
    prev = rd.manifest()
    p = None
    if not m.loaded and prev is not None:
        src, files = prev.get("model", {}), prev.get("model_files_sha256", {})
    else:
        src = dict(m.lm.source)
        files = {}
        p = src.get("path")
    if p and Path(p).is_dir():
        files = {Path(k).name: v for k, v in files_sha256(sorted(Path(p).glob("*.safetensors"))).items()}
    elif p and Path(p).is_file():
        files = {Path(k).name: v for k, v in files_sha256([p]).items()}
    data_hash = {f"{k}/{s}": hashlib.sha256("\n".join(v[s]).encode()).hexdigest()
                 for k, v in sets.items() for s in ("train", "val", "test")}
    return {"versions": versions(), "seed": cfg.data.seed, "config": cfg.model_dump(),
            "model": src, "model_files_sha256": files, "data_sha256": data_hash,
            "stage_keys": rd.keys, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cwd": os.getcwd()}  # where a relative model path was found (run_files.located)

