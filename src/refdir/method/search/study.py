"""The optuna study behind the search: its journal storage, the warm starts it is seeded with, trials run with
given parameters, and the trial rows every later phase reads.

The sampler is multi-objective TPE (seeded), warm-started with the selected direction at full strength (plain,
projected and norm-preserving) and the next best candidates of the selection table. The study is stored as an
optuna journal: rerunning resumes with the trials already done. optuna is imported inside the functions: it is an
optional dependency, needed only by the search.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import threading
import time
from dataclasses import asdict
from functools import cache
from pathlib import Path

from tqdm.auto import tqdm

from refdir.core.directions import Candidates
from refdir.core.edits import resolve
from refdir.core.io import atomic_write_json, note_written, remove_dir
from refdir.errors import RefdirError
from refdir.method.search.objective import Proxy, Space, pareto_front, set_band
from refdir.method.selection import SelectionConfig, score_candidates

STUDY_NAME = "refdir-search"


def check_study_config(config_file: Path, now: dict, force: bool, where: Path) -> None:
    """Refuse a study directory made with another config (``config_file`` holds it), unless ``force``: then the
    directory holding it is deleted so the study starts over."""
    if not config_file.exists():
        return
    try:
        prev = _flat(json.loads(config_file.read_text()))
    except json.JSONDecodeError as e:
        raise RefdirError(f"corrupt study config {config_file}: {e}") from e
    now = _flat(now)
    diff = [k for k in sorted(set(prev) | set(now)) if prev.get(k) != now.get(k)]
    if diff and not force:
        k = diff[0]
        what = ("another model" if any(d.rpartition(".")[2] == "model" for d in diff) else
                "other data or model files" if any(d.startswith("inputs.") for d in diff) else "another config")
        raise RefdirError(f"{where} holds a search study made with {what} ({k}: {prev.get(k)!r} here, "
                          f"{now.get(k)!r} asked; {len(diff)} setting(s) differ); choose another --out or pass --force")
    if diff and force:
        remove_dir(config_file.parent)  # only a directory refdir wrote (its marker) or an empty one


def _flat(d: dict, prefix: str = "") -> dict:
    """A nested config as one level, keys joined with dots (``run.model.model``)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


@cache
def import_optuna():
    """optuna, imported once on a helper thread. optuna's import keeps an ImportError (its optional redis backend)
    whose traceback holds the importing stack's frames, and every local in them, for the life of the process. On
    a thread that stack is the thread's own. Imported from the search's own stack it kept the search's proxy, and
    through it the model, alive after ``refdir run`` released the model for the GGUF export (+1.3 GiB at the
    export on the demo, bf16)."""
    box: dict = {}

    def load():
        try:
            box["module"] = importlib.import_module("optuna")
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    t = threading.Thread(target=load, name="refdir-import-optuna")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["module"]


def storage(path: Path):
    """The optuna journal storage in file ``path``."""
    import_optuna()  # first, off this stack (see there)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    note_written(path, f"{path}.lock")  # written by optuna (its lock file only while it writes): refdir's files
    return JournalStorage(JournalFileBackend(str(path)))


def open_study(path: Path, seed: int):
    """Create the two-objective study (refusal, KL; both minimised) in journal ``path``, or load it to resume."""
    optuna = import_optuna()

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a trial stopped by Ctrl-C is not news; the CLI says it
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    return optuna.create_study(study_name=STUDY_NAME, storage=storage(path), directions=["minimize", "minimize"],
                               sampler=sampler, load_if_exists=True)


def make_objective(space: Space, cands: Candidates, proxy: Proxy, band: tuple[float, float]):
    """The optuna objective: the trial's edit from ``space``, scored by ``proxy``, its KL band recorded."""

    def objective(trial):
        edit = space.suggest(trial)
        trial.set_user_attr("edit", edit.to_dict())
        m, kl = proxy(resolve(edit, cands))
        set_band(trial, kl, band)
        return m, kl

    return objective


def select_warm_start(model, fmt, cands: Candidates, val: dict, ids: list[int], scfg: SelectionConfig,
                      cache_file: Path, progress: bool, base_logits=None) -> tuple[list[dict], dict | None, dict | None]:
    """The warm start: refdir's selection (:func:`refdir.method.selection.score_candidates`: screen on
    ``scfg.screen_n`` prompts, ``scfg.top_k`` finalists fully scored) on the proxy prompts ``val``, restricted to
    layers from ``scfg.min_layer``; cached in ``cache_file``. ``base_logits``: the unedited model's logits on the
    same prompts, if already computed (the proxy's). Returns the score table, the chosen candidate (or None) and
    the candidate the search leads with (:func:`lead_candidate`). The file records the lead too: it stands for the
    run's direction where the selection chose none (:meth:`refdir.core.rundir.RunDir.direction`); a file written
    before it did gets it added when its search resumes."""
    if cache_file.exists():
        d = json.loads(cache_file.read_text())
        if "lead" not in d:
            d["lead"] = lead_candidate(d["table"], d["chosen"], scfg.kl_max)
            atomic_write_json(cache_file, d)
        return d["table"], d["chosen"], d["lead"]
    sel = score_candidates(model, fmt, cands, val["harmful"], val["harmless"], ids, scfg, progress=progress,
                           base_logits=base_logits)
    table = [r for r in sel.table() if r["layer"] >= scfg.min_layer]
    chosen = asdict(sel.chosen) if sel.chosen else None
    lead = lead_candidate(table, chosen, scfg.kl_max)
    atomic_write_json(cache_file, {"table": table, "chosen": chosen, "lead": lead, "rule": sel.rule,
                                   "baseline": sel.baseline, "filter_counts": sel.filter_counts})
    return table, chosen, lead


def warm_starts(table: list[dict], chosen: dict | None, space: Space, *, kl_max: float, top_k: int,
                strong_starts: int) -> list[dict]:
    """The selected direction at full strength (each variant of ``space``; so is each optimized direction of
    ``space.directions``, trained from the selected one; the plain variant of every direction first), then the next
    best fully scored candidates (by bypass, those with KL within twice the selection's limit ``kl_max`` first;
    ``3 + top_k`` starts at most so far, 3 more per optimized direction); with no selected direction the best scored
    candidate leads. Then the ``strong_starts`` candidates with the lowest screened bypass whatever their KL, at full
    strength in the projected variant: the paper's KL filter judges full-strength plain ablation, but the search
    scales strength, and the directions that cut refusal most are the best ones to scale down."""
    out = []
    scored = _scored(table, kl_max)
    lead = lead_candidate(table, chosen, kl_max)
    if lead is not None:
        # the selected direction and each optimized direction trained from it, at full strength in every variant:
        # every direction's plain ablation first (a time budget that runs only a few still has each direction)
        for v in ("plain", "projected", "norm"):
            if v in space.variants:
                for direction in space.directions:
                    out.append(space.full_params(lead["position"], float(lead["layer"]), v, direction))
    for r in scored:
        if len(out) >= 3 * len(space.directions) + top_k:
            break
        if lead is not None and (r["position"], r["layer"]) == (lead["position"], lead["layer"]):
            continue
        if space.layer_lo <= r["layer"] <= space.layer_hi:
            out.append(space.full_params(r["position"], float(r["layer"]), "plain"))
    variant = "projected" if "projected" in space.variants else space.variants[0]
    strong = sorted((r for r in table if math.isfinite(_screened(r)) and space.layer_lo <= r["layer"] <= space.layer_hi),
                    key=_screened)
    for r in strong[:strong_starts]:
        p = space.full_params(r["position"], float(r["layer"]), variant)
        if p not in out:
            out.append(p)
    return out


def _scored(table: list[dict], kl_max: float) -> list[dict]:
    """The fully scored candidates, best first: by bypass, those with KL within twice ``kl_max`` first."""
    return sorted((r for r in table if math.isfinite(r["bypass"])), key=lambda r: (r["kl"] > 2 * kl_max, r["bypass"]))


def lead_candidate(table: list[dict], chosen: dict | None, kl_max: float) -> dict | None:
    """The candidate the search leads with (and trains optimized directions from): the selection's choice, or
    with none the best fully scored candidate (see :func:`warm_starts`); None when nothing was scored."""
    scored = _scored(table, kl_max)
    return chosen or (scored[0] if scored else None)


def _screened(r: dict) -> float:
    """A selection row's screened bypass, or its full one where no screening was done."""
    b = r.get("bypass_screen", math.nan)
    return b if math.isfinite(b) else r["bypass"]


def seed_study(study, space: Space, warm: list[dict], table: list[dict], band: tuple[float, float]) -> list[dict]:
    """Seed the warm starts. A plain full-strength warm start that the selection already scored in full is added
    as a finished trial with the selection's bypass and KL: those are the proxy's two objectives for the same edit
    (full ablation of the same direction, the same proxy prompts and batching), so running it again would only
    repeat the computation. The others are returned in order, to run: :func:`run_trials` queues them all,
    :func:`run_budget` runs them one at a time while they fit its time budget (on a slow machine they would
    otherwise use up the time refinement needs)."""
    import optuna

    known = {(r["position"], float(r["layer"])): (r["bypass"], r["kl"]) for r in table
             if math.isfinite(r["bypass"]) and math.isfinite(r["kl"])}
    pending = []
    for p in warm:
        key = (p["position"], p["layer"])
        if key in known and p == space.full_params(*key, "plain"):
            edit = space.suggest(optuna.trial.FixedTrial(p))
            tr = optuna.trial.create_trial(
                params=p, distributions=space.distributions(), values=list(known[key]),
                user_attrs={"warm_start": True, "from_selection": True, "edit": edit.to_dict()})
            set_band(tr, known[key][1], band)
            study.add_trial(tr)
        else:
            pending.append(p)
    return pending


def unrun_warm_starts(study, warm: list[dict]) -> list[dict]:
    """The warm starts of ``warm`` that are not in the study yet (finished, running or queued), in order: what a
    resumed or extended budgeted search still has to run of them."""
    # a queued trial holds its params in fixed_params until it runs; one the selection scored has params only
    seen = [tr.system_attrs.get("fixed_params") or tr.params for tr in all_trials(study)
            if tr.user_attrs.get("warm_start")]
    return [p for p in warm if p not in seen]


def run_trials(study, objective, trials: int, marks: list[float], progress: bool = True,
               callbacks: list | None = None, warm: list[dict] | None = None) -> int:
    """Run the trials still missing for ``trials`` searched trials in all (refined ones do not count): the warm
    starts ``warm`` first (queued, as many as are missing: a queued one left over would be taken by the next trial
    refinement asks for), then TPE; returns how many were run."""
    import optuna

    done = [tr for tr in all_trials(study)
            if tr.state == optuna.trial.TrialState.COMPLETE and "refine_of" not in tr.user_attrs]
    todo = max(0, trials - len(done))
    for p in (warm or [])[:todo]:
        study.enqueue_trial(p, user_attrs={"warm_start": True})
    if todo:
        bar = tqdm(total=trials, initial=len(done), desc="search", disable=not progress)

        def show(st, _tr):
            bar.update(1)
            bar.set_postfix_str(front_postfix(st, marks))

        try:
            study.optimize(objective, n_trials=todo, callbacks=[show] + list(callbacks or []))
        finally:
            bar.close()
    return todo


def all_trials(study) -> list:
    """The study's trials without copying them (``study.trials`` deep-copies every trial on each call: with a few
    hundred fast trials, as on a tiny model, the copies took 90% of a budgeted search's time). Read only."""
    return study.get_trials(deepcopy=False)


OVERHEAD = "budget_overhead_s"  # study user attr: budgeted time spent between trials (sampling the next, bookkeeping)


def spent_seconds(study) -> float:
    """What a time budget has used so far, also across resumed runs: the wall time of the study's finished
    searched and refined trials (calibration, part of the confirmation, is left out), from the journal's
    timestamps, plus the time :func:`run_budget` spent between them."""
    return (sum(trial_seconds(tr) for tr in all_trials(study) if not tr.user_attrs.get("calibrated"))
            + float(study.user_attrs.get(OVERHEAD, 0.0)))


def trial_seconds(tr) -> float:
    if tr.datetime_complete is None or tr.datetime_start is None:
        return 0.0
    return (tr.datetime_complete - tr.datetime_start).total_seconds()


def trial_estimate(study) -> float:
    """The time the next trial will take: the larger of the mean and the last of the timed trials (the
    selection's finalists enter with their scores and take no time)."""
    timed = [tr for tr in all_trials(study) if trial_seconds(tr) > 0 and not tr.user_attrs.get("from_selection")]
    if not timed:
        return 0.0
    return max(sum(map(trial_seconds, timed)) / len(timed), trial_seconds(timed[-1]))


def run_budget(study, objective, budget: float, reserve: int, marks: list[float], progress: bool = True,
               max_trials: int = 1000, warm: list[dict] | None = None) -> int:
    """Trials, one at a time, while the study's spent time (:func:`spent_seconds`) plus one more trial and
    ``reserve`` trials kept for refinement (at the mean trial time) fit in ``budget`` seconds: first the warm starts
    ``warm`` (in order, each queued just before it runs), then TPE. Trials already queued in the study always run
    (a queued trial left over would be taken by the next trial refinement asks for). Returns how many were run."""
    import optuna

    pending = list(warm or [])
    run = 0
    bar = tqdm(total=None, desc="search", disable=not progress, unit="trial")
    spent0, t0 = spent_seconds(study), time.monotonic()
    try:
        while run < max_trials:
            trs = all_trials(study)
            done = any(tr.state == optuna.trial.TrialState.COMPLETE for tr in trs)
            waiting = any(tr.state == optuna.trial.TrialState.WAITING for tr in trs)
            spent = spent0 + time.monotonic() - t0  # this call's wall time: its trials and what lies between them
            if done and not waiting and spent + (1 + reserve) * trial_estimate(study) > budget:
                break
            if pending and not waiting:
                study.enqueue_trial(pending.pop(0), user_attrs={"warm_start": True})
            study.optimize(objective, n_trials=1)
            run += 1
            bar.update(1)
            bar.set_postfix_str(f"{spent:.0f}/{budget:.0f} s " + front_postfix(study, marks))
    finally:
        bar.close()
        # the part of this call's wall time outside its trials is kept, so that the budget counts it on resuming
        between = spent0 + time.monotonic() - t0 - spent_seconds(study)
        study.set_user_attr(OVERHEAD, float(study.user_attrs.get(OVERHEAD, 0.0)) + max(0.0, between))
    return run


def run_trial(study, objective, params: dict, attrs: dict):
    """Evaluate one given edit as a study trial; returns the finished trial."""
    import optuna

    study.enqueue_trial(params, user_attrs=attrs)
    study.optimize(objective, n_trials=1)
    tr = all_trials(study)[-1]
    if tr.state != optuna.trial.TrialState.COMPLETE:
        raise RefdirError(f"trial {tr.number} did not complete ({tr.state.name})")
    return tr


def front_postfix(study, marks: list[float]) -> str:
    """A progress bar's note: the front's size and its best proxy refusal under each KL mark."""
    import optuna

    pts = [(tr.values[0], tr.values[1]) for tr in all_trials(study) if tr.state == optuna.trial.TrialState.COMPLETE]
    if not pts:
        return ""
    f = pareto_front(pts)
    parts = [f"front {len(f)}"]
    for kmax in sorted(marks):
        ok = [pts[i][0] for i in f if pts[i][1] <= kmax]
        if ok:
            parts.append(f"KL≤{kmax}: {min(ok):.2f}")
    return "  ".join(parts)


def trial_rows(study) -> list[dict]:
    """One row per finished trial: its number, proxy scores, edit (a copy: the trials are the storage's own) and
    how it was made."""
    import optuna

    rows = []
    for tr in all_trials(study):
        if tr.state != optuna.trial.TrialState.COMPLETE:
            continue
        rows.append({"trial": tr.number, "proxy_refusal": tr.values[0], "proxy_kl": tr.values[1],
                     "edit": copy.deepcopy(tr.user_attrs["edit"]), "warm_start": bool(tr.user_attrs.get("warm_start")),
                     "refine_of": tr.user_attrs.get("refine_of"), "calibrated": bool(tr.user_attrs.get("calibrated"))})
    return rows


def trial_counts(rows: list[dict]) -> dict:
    """How many of the trial rows were searched, refined (calibrated ones included) and calibrated."""
    return {"n_trials": sum(r["refine_of"] is None for r in rows),
            "n_refined": sum(r["refine_of"] is not None for r in rows),
            "n_calibrated": sum(r["calibrated"] for r in rows)}
