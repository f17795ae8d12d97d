"""``refdir search``: a Pareto search over edits (direction, per-component strength kernels, variants) with optuna.

The search prepares a run directory with ``refdir run``'s own stages (data, refusal tokens, filter, candidates),
then runs the phases of :mod:`refdir.method.search` in order:

1. the proxy objective on the run's validation split: refusal metric on harmful, first-token KL on harmless;
2. the warm start: the selection restricted to the searched layers;
3. TPE trials (multi-objective, seeded), warm-started with the selected direction at full strength;
4. refinement: front edits near each KL mark (``kl_marks``) scaled in strength to sit just under the mark;
5. confirmation by greedy generation on the confirmation prompts (the sources' test split), with calibration
   of each mark's pick to the confirmation prompts' KL;
6. the summary, tables and report section.

Everything is cached in ``OUT/search`` (the optuna journal, the selection, the confirmed arms): rerunning resumes.
A directory made with another model or config, or from data or model files that changed since, is refused.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from refdir.core import rundir as rdl
from refdir.core.architecture import inspect_model
from refdir.core.edits import DIM, VARIANTS, Edit, hook_variants
from refdir.core.fingerprint import data_sha256, model_sha256
from refdir.core.io import atomic_write_json, make_output_dir
from refdir.core.memory import trim_heap
from refdir.core.preflight import require
from refdir.core.rundir import RunDir
from refdir.core.spec import DataSpec, ModelSpec
from refdir.errors import RefdirError
from refdir.method.search import (
    Confirmation,
    Proxy,
    Space,
    default_per_mark,
    export_point,
    kl_band,
    load_reference,
    pareto_front,
    refine_front,
    write_search_report,
)
from refdir.method.search.study import (
    all_trials,
    check_study_config,
    make_objective,
    open_study,
    run_budget,
    run_trials,
    seed_study,
    select_warm_start,
    spent_seconds,
    trial_counts,
    unrun_warm_starts,
    warm_starts,
)
from refdir.method.selection import max_layer
from refdir.workflows.checks import all_prompts, check_run, no_early_leftovers, refusal_warnings
from refdir.workflows.optimize import rdo_direction
from refdir.workflows.report import write_report
from refdir.workflows.sources import CALIBRATION_PROMPTS, SECOND, Prepared, add_second, pca_source
from refdir.workflows.stages import (
    STAGE_SETTINGS,
    Loaded,
    RunConfig,
    stage_candidates,
    stage_data,
    stage_filter,
    stage_refusal_tokens,
)

__all__ = ["SearchConfig", "export_point", "load_reference", "pareto_front", "refine_front", "run_search",
           "search_run"]

# the run settings whose defaults in a search differ from `refdir run`'s
SEARCH_DATA_DEFAULTS = {"n_val": 40}  # harmless proxy prompts (first-token KL), carved from the train sources
SEARCH_RUN_DEFAULTS = {
    "screen_n": 2,  # the selection screens on 2 + 2 proxy prompts; its finalists are scored on all of them
    "top_k": 4,  # selection finalists; the best also warm-start the search
    "max_new_tokens": 100,  # tokens generated per prompt to confirm a point
    "gen_batch_size": 200,  # rows per generation batch: every confirmed arm shares one batch
    "judge": "wide",  # at least as broad as Heretic's markers; broad and paper are reported beside it
    "save_checkpoint": False,
}
# the run's settings that only its eval and checkpoint (or the paper's coefficient) read, and the generation batch
# (no result depends on it): the run's search confirms its pick by KL alone, so changing one of them redoes those
# stages and leaves the study as it is
EVAL_ONLY = (*STAGE_SETTINGS[rdl.COEFF], *STAGE_SETTINGS[rdl.EVAL], *STAGE_SETTINGS[rdl.CHECKPOINT], "gen_batch_size")


def search_run(**settings) -> RunConfig:
    """The run config of a search from flat settings (any field of ModelSpec, DataSpec or RunConfig), with the
    search's defaults where they differ from ``refdir run``'s."""
    model = {k: v for k, v in settings.items() if k in ModelSpec.model_fields}
    data = {k: v for k, v in settings.items() if k in DataSpec.model_fields}
    rest = {k: v for k, v in settings.items() if k not in model and k not in data}
    return RunConfig(model=ModelSpec(**model), data=DataSpec(**(SEARCH_DATA_DEFAULTS | data)),
                     **(SEARCH_RUN_DEFAULTS | rest))


class SearchConfig(BaseModel):
    """Everything that defines a study: the run it prepares (model, data, selection and generation settings) and
    the search's own settings. ``refdir search`` refuses a directory made with other values. Build one from flat
    settings with :meth:`of`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    run: RunConfig = Field(default_factory=search_run)
    # harmful proxy prompts (refusal metric): the first of the harmful val prompts carved alongside the harmless
    # ones (run.data.n_val). The KL estimate is the noisier of the two (a few prompts carry most of it) and decides
    # which points land under a KL budget
    n_val_harmful: int = 24
    # warm starts besides the selection's: the candidates with the strongest screened bypass, whatever their KL, at
    # full strength in the projected variant (the search scales strength; the paper's KL filter is for full strength)
    strong_starts: int = 2
    # search space
    min_layer_frac: float = 0.25
    max_strength: float = 1.0
    variants: list[str] = list(VARIANTS)
    # KL budgets the user cares about: the front is refined towards them and the best point under each is confirmed
    kl_marks: list[float] = [0.01, 0.05]

    @classmethod
    def of(cls, **settings) -> SearchConfig:
        """A config from flat settings: the search's own fields, and any field of the run (see :func:`search_run`),
        e.g. ``SearchConfig.of(model="default", n_train=128, kl_marks=[0.01])``."""
        own = {k: settings.pop(k) for k in list(settings) if k in cls.model_fields and k != "run"}
        return cls(run=search_run(**settings), **own)

    def check(self) -> None:
        """Refuse settings the search cannot run with (a RefdirError)."""
        if self.n_val_harmful < 1 or self.run.data.n_val < 1:
            raise RefdirError("the proxy needs at least one harmful and one harmless prompt")
        if not self.kl_marks or not all(0 < m < float("inf") for m in self.kl_marks):
            raise RefdirError(f"KL marks must be positive numbers, got {self.kl_marks}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise RefdirError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")


class Timings:
    """Wall time per phase, in seconds (rounded to 0.01 s); the heap is trimmed after each phase
    (:func:`refdir.core.memory.trim_heap`)."""

    def __init__(self):
        self.t0 = time.time()
        self.s: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t = time.time()
        yield
        self.add(name, time.time() - t)
        trim_heap()

    def add(self, name: str, seconds: float) -> None:
        self.s[name] = round(self.s.get(name, 0.0) + seconds, 2)


def prepare(cfg: RunConfig, rd: RunDir, timings: Timings, progress: bool = True,
            checked: dict | None = None) -> Prepared:
    """The data, refusal tokens, filter and candidates stages of a run in the opened ``rd`` (cached like
    ``refdir run``'s); ``checked``: the split sets :func:`check_run` read."""
    m = Loaded(cfg.model)
    with timings.phase(rdl.DATA):
        sets = stage_data(rd, cfg, checked)
    m.prompts = all_prompts(sets)  # refused on load if they do not fit the model's context
    with timings.phase(rdl.REFUSAL_TOKENS):
        ids = stage_refusal_tokens(rd, cfg, m, sets, progress=progress)
    with timings.phase(rdl.FILTER):
        filt, means = stage_filter(rd, cfg, m, sets, ids, progress=progress)
    with timings.phase(rdl.CANDIDATES):
        cands = stage_candidates(rd, cfg, m, filt, means, progress=progress)
    return Prepared(rd, m, sets, ids, filt, cands)


def run_search(cfg: SearchConfig, out: str | Path, *, trials: int = 20, refine: int = 2, per_mark: int | None = None,
               max_confirm: int = 0, confirm_plain: bool = False, confirm_extra: int = 0, calibrate: bool = True,
               reference: str | Path | None = None, force: bool = False,
               progress: bool = True, callbacks: list | None = None) -> dict:
    """Run (or resume) the search in ``out``: ``trials`` TPE trials, then :func:`refine_front` on up to ``refine``
    front points per KL mark, then confirm the front by generation (``per_mark`` points under each KL mark, by
    default :func:`default_per_mark` of the loaded model; the first of them calibrated to the confirmation prompts'
    KL unless ``calibrate`` is off, ``max_confirm`` spread along the front, the plain edit with ``confirm_plain``,
    ``confirm_extra`` random trials; see :class:`Confirmation`). Returns the summary (also in the search
    directory's ``summary.json``)."""
    if trials < 1:
        raise RefdirError("--trials must be at least 1")
    if per_mark is not None and per_mark < 1:
        raise RefdirError("--per-mark must be at least 1")
    cfg.check()
    require("optuna", "scipy", extra="search")
    refs = load_reference(reference) if reference else []
    sets = check_run(cfg.run, out)
    sdir = RunDir(out).search_dir()
    record = study_record(cfg)
    # the directory's lock is taken before the study's config is checked (and, under --force, deleted)
    new = not os.path.lexists(out)
    rd = RunDir.create(out, cfg.run.model_dump(), force=force,
                       check=lambda: check_study_config(sdir / "config.json", record, force, Path(out)))
    with rd:  # held until the search ends, also on error
        timings = Timings()
        with no_early_leftovers(rd, new):
            p = prepare(cfg.run, rd, timings, progress=progress, checked=sets)
        warnings = refusal_warnings(rd)
        make_output_dir(sdir)  # with refdir's marker, so that --force may replace it later
        atomic_write_json(sdir / "config.json", record)
        confirm = (p.sets["harmful"]["test"], p.sets["harmless"]["test"])
        result = search_phases(p, cfg, sdir, timings, confirm, trials=trials, refine=refine, per_mark=per_mark,
                               max_confirm=max_confirm, confirm_plain=confirm_plain, confirm_extra=confirm_extra,
                               calibrate=calibrate, progress=progress, callbacks=callbacks)
        result["reference"] = refs
        result["warnings"] = warnings
        atomic_write_json(sdir / "summary.json", result)
        write_search_report(p.rd, result)
        write_report(p.rd.path)
        return result


def search_phases(p: Prepared, cfg: SearchConfig, sdir: Path, timings: Timings, confirm: tuple[list[str], list[str]],
                  *, trials: int = 20, budget: float | None = None, refine: int = 2, per_mark: int | None = None,
                  max_confirm: int = 0, confirm_plain: bool = False, confirm_extra: int = 0, calibrate: bool = True,
                  max_new_tokens: int | None = None, generate: bool = True, progress: bool = True,
                  callbacks: list | None = None) -> dict:
    """The search's phases on a prepared run: proxy, warm-start selection, TPE trials (``trials`` in all, or as
    many as ``budget`` seconds of trial time allow, refinement included), refinement, confirmation on
    ``confirm`` = (harmful, harmless) prompts (by KL alone with ``generate=False``). Returns the summary (not
    written)."""
    run, lm, fmt, cands = cfg.run, p.m.lm, p.m.fmt, p.cands
    if per_mark is None:
        per_mark = default_per_mark(lm.model)
    L = cands.n_layers
    layer_lo = max(1.0, cfg.min_layer_frac * L)
    with timings.phase("proxy_base"):
        val = {"harmful": p.filt["val"]["harmful"][: cfg.n_val_harmful], "harmless": p.filt["val"]["harmless"]}
        proxy = Proxy(lm.model, fmt, val["harmful"], val["harmless"], p.ids, run.batch_size)
    with timings.phase(rdl.SELECTION):
        # the warm starts read the finalists' bypass and KL, not their induce: it is scored only where it decides
        scfg = replace(run.selection_config(), min_layer=int(math.ceil(layer_lo)), lazy_induce=True)
        table, chosen, lead = select_warm_start(lm.model, fmt, cands, val, p.ids, scfg,
                                                sdir / rdl.SEARCH_SELECTION_FILE, progress, proxy.base_logits)
    if run.direction_method != "dim":
        if lead is None:
            raise RefdirError(f"--direction-method {run.direction_method}: the selection scored no candidate to "
                              "build a direction from")
        with timings.phase("optimize"):
            v = (rdo_direction(p, lead, run, progress) if run.direction_method == "rdo"
                 else pca_source(p, lead, confirm[1], progress))
            p.cands = cands = cands.with_optimized(run.direction_method, v)
    if p.m.load_s is not None:
        timings.add("load", p.m.load_s)
    hookable = hook_variants(inspect_model(p.m.lm.model))
    variants = [v for v in cfg.variants if v in hookable] or list(cfg.variants)
    space = Space(list(cands.positions), L, layer_lo, float(max_layer(L, run.max_layer_frac)), cfg.max_strength,
                  variants, (DIM, *cands.optimized))
    study = open_study(sdir / "study.log", run.data.seed)
    band = kl_band(cfg.kl_marks)
    # at most `trials` of them: a warm start left queued would be taken by the next trial refinement asks for
    warm = warm_starts(table, chosen, space, kl_max=run.kl_max, top_k=run.top_k,
                       strong_starts=cfg.strong_starts)[:trials]
    # those still to run (a resumed or extended search: the ones not in the study yet); the selection's scores
    # stand for a full edit's where its ablation hooks are the edit's (not under post-norms of an unknown form)
    known = table if proxy.arch.weight_edit_exact else []
    pending = seed_study(study, space, warm, known, band) if not all_trials(study) else unrun_warm_starts(study, warm)
    objective = make_objective(space, cands, proxy, band)
    with timings.phase("search"):
        if budget is None:
            todo = run_trials(study, objective, trials, cfg.kl_marks, progress, callbacks, warm=pending)
        else:
            # kept for refinement (up to 2 trials per source; one more source per optimized direction) and
            # calibration (1 per mark)
            reserve = (2 * (refine + len(cands.optimized)) + 1) * len(cfg.kl_marks)
            todo = run_budget(study, objective, budget, reserve, cfg.kl_marks, progress, warm=pending)
    with timings.phase("refine"):
        n_refined = refine_front(study, objective, space, cfg.kl_marks, refine, progress, budget) if refine > 0 else 0
    with timings.phase("confirm"):
        conf = Confirmation(study, space, objective, proxy, cands, confirm[0], confirm[1], sdir / "confirm.json",
                            batch_size=run.batch_size, gen_batch_size=run.gen_batch_size,
                            max_new_tokens=max_new_tokens or run.max_new_tokens, judge=run.judge, progress=progress)
        confirmed = conf.run(cfg.kl_marks, per_mark=per_mark, max_confirm=max_confirm, confirm_plain=confirm_plain,
                             confirm_extra=confirm_extra, seed=run.data.seed, calibrate=calibrate, generate=generate)
        if conf.base_logp is not None:
            p.base_logp = (tuple(confirm[1]), conf.base_logp)
    timings.s["total"] = round(time.time() - timings.t0, 2)
    return {"config": cfg.model_dump(), **trial_counts(conf.rows), "n_layers": L, "model_id": lm.model_id,
            "positions": cands.positions, **confirmed, "timings_s": timings.s, "new_trials": todo,
            "refine_trials": n_refined, "spent_s": round(spent_seconds(study), 2), "budget_s": budget,
            "selection": {"chosen": chosen, "n_scored": sum(1 for r in table if math.isfinite(r["bypass"]))}}


# ------------------------------------------------------------------------------------------ inside `refdir run`

def study_record(cfg: SearchConfig) -> dict:
    """What a study directory's ``config.json`` holds, and what resuming the study requires to be unchanged: the
    search config and the content of the files its preparation reads (the local train, val and test files, the
    local model's files; see :mod:`refdir.core.fingerprint`), so that a file edited in place starts the run's
    study over, or makes ``refdir search`` refuse the directory without ``--force``, instead of extending
    trials scored on other prompts or another model."""
    run = cfg.run
    return {**cfg.model_dump(), "inputs": {"data": data_sha256(run.data), "model": model_sha256(run.model.model)}}


def run_search_config(cfg: RunConfig) -> SearchConfig:
    """The search config of ``refdir run --method search``: the run's settings with the search's screening
    (2 + 2 prompts, 4 finalists) and one KL mark at the target. The budget is left out (a bigger one extends the
    same study), and so are the settings the search does not read (:data:`EVAL_ONLY`, the held-out sets)."""
    unread = {k: RunConfig.model_fields[k].default for k in (*EVAL_ONLY, "budget")}
    run = cfg.model_copy(update={"screen_n": SEARCH_RUN_DEFAULTS["screen_n"], "top_k": SEARCH_RUN_DEFAULTS["top_k"],
                                 "data": cfg.data.without_heldout(), **unread})
    return SearchConfig(run=run, kl_marks=[cfg.kl_target])


def read_back(rd: RunDir, cfg: RunConfig, budget: float) -> dict | None:
    """The run's finished search, when it was run with at least ``budget`` and every file it wrote that later
    stages and commands read is still there (the front, the selection, the direction sources its choice uses):
    else None, and the search stage runs again (resuming its study)."""
    f = rd.search_dir() / "summary.json"
    if not f.exists():
        return None
    prev = json.loads(f.read_text())
    if prev.get("budget_s") is None or prev["budget_s"] < budget or "choice" not in prev:
        return None
    names = [cfg.direction_method] if cfg.direction_method in rdl.SOURCES else []
    if (prev["choice"].get("second") or {}).get("added"):
        names.append(SECOND)
    need = [rd.search_dir() / "front.json", rd.search_dir() / rdl.SEARCH_SELECTION_FILE]
    return prev if all(p.exists() for p in need + [rd.source_path(n) for n in names]) else None


def stage_search(p: Prepared, cfg: RunConfig, timings: Timings, progress: bool = True) -> dict:
    """The search as a stage of ``refdir run``: resumes the study in the run's search directory (a study made with
    other settings is started over), spends what is left of ``cfg.budget`` on trials, refines towards the KL
    target and chooses the point. Choosing reads only prompts that are not test prompts: the proxy on the val
    split and the calibration KL on harmless train prompts. A finished search with at least this budget is read
    back without loading the model. Returns the search summary with ``choice``."""
    scfg = run_search_config(cfg)
    record = study_record(scfg)
    sdir = p.rd.search_dir()
    check_study_config(sdir / "config.json", record, True, p.rd.path)
    prev = read_back(p.rd, cfg, cfg.budget)
    if prev is not None:
        for name in (cfg.direction_method, SECOND) if cfg.second_direction else (cfg.direction_method,):
            v = p.rd.source(name)
            if v is not None:  # the eval and checkpoint stages resolve the chosen edit with it
                p.cands = p.cands.with_optimized(name, v)
        return prev
    make_output_dir(sdir)
    atomic_write_json(sdir / "config.json", record)
    f = sdir / "summary.json"
    harmless = p.sets["harmless"]["train"][:CALIBRATION_PROMPTS]
    # one pick under the target: choosing between picks by generation on 24 val prompts was noise (NOTES.md); with
    # one pick, generating it would change nothing chosen, so it is confirmed (calibrated) by KL alone and judged by
    # generation once, on the test prompts, in the eval stage
    res = search_phases(p, scfg, sdir, timings, ([], harmless), budget=cfg.budget, per_mark=1, generate=False,
                        progress=progress)
    res["choice"] = choose(res, cfg.kl_target)
    res["candidates_key"] = p.rd.keys.get(rdl.CANDIDATES)  # what the search searched (run_files.check_chain)
    if cfg.second_direction:
        with timings.phase("second"):
            res["choice"] = add_second(p, res["choice"], sdir, harmless, cfg.kl_target, cfg.batch_size,
                                       progress, cfg.second_source)
    p.pca_acts = p.base_logp = None  # the fits and the calibration are done: the eval needs the memory (~100 MB)
    atomic_write_json(f, res)
    p.rd.written.add(rdl.SEARCH)
    write_search_report(p.rd, res)
    return res


def choose(res: dict, target: float) -> dict:
    """The run's point: the pick whose calibration KL is under ``target`` (the one with the fewest val refusals if
    there are several); when none is, the front point with the lowest proxy KL (``met`` false)."""
    best = res["best_at_kl"].get(f"{target:g}")
    rows = {r["trial"]: r for r in res["trials"]}
    if best is not None:
        row, why = rows[best["trial"]], "the lowest proxy refusal with calibrated KL under the target"
    else:
        row, why = min(res["front"], key=lambda r: r["proxy_kl"]), "no point under the target: the lowest-KL one"
    return {"trial": row["trial"], "edit": row["edit"], "describe": Edit.from_dict(row["edit"]).describe(),
            "proxy_refusal": row["proxy_refusal"], "proxy_kl": row["proxy_kl"],
            "val": {k: v for k, v in (row.get("confirmed") or {}).items() if k != "completions"} or None,
            "reason": why, "met": best is not None, "kl_target": target}
