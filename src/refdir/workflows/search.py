"""Pareto search over edits (direction, per-component strength kernels, variants) with optuna.

Two objectives, both from one forward pass per prompt with the edit applied as hooks (no weight copies):

- **refusal**: the mean refusal metric (refusal-token log-odds at the first answer position) on the
  harmful proxy prompts (lower is better);
- **KL**: the mean first-token KL(base ‖ edited) on the harmless proxy prompts.

The proxy prompts are the run's validation split (carved from the train sources, disjoint from the
candidates' train prompts and from the confirmation sets). Logits are taken at the last position only,
with the template's common prefix run once per batch (:func:`refdir.method.scoring.last_logits`).

The sampler is multi-objective TPE (seeded), warm-started with the selected direction at full strength
(plain, projected and norm-preserving) and the next best candidates of the selection table. The study is
stored as an optuna journal in ``OUT/search/study.log``: rerunning resumes with the trials already done.
A directory made with another model or config is refused.

Refinement (:func:`refine_front`): after the TPE trials, front edits near each KL mark (``kl_marks``, default
0.01 and 0.05) are scaled in strength so that their proxy KL sits just under the mark; each is a study trial.

Confirmation by greedy generation on the harmful confirmation prompts (judged with ``judge``, default ``wide``,
with ``broad`` and the paper's substrings beside it) and first-token KL on the harmless confirmation prompts: the
base model, the best front point under each KL mark, ``max_confirm`` more front points spread along it (1: its
low-KL end; 2: both ends), the plain full edit and ``confirm_extra`` other trials. The rank correlation of proxy
refusal and generated refusal over the confirmed trials is reported.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from tqdm.auto import tqdm

from refdir.core.architecture import inspect_model
from refdir.core.directions import Candidates
from refdir.core.edits import (
    COMPONENTS,
    VARIANTS,
    Component,
    Edit,
    Kernel,
    Plan,
    apply_weights_,
    hooked,
    hooked_rows,
    resolve,
)
from refdir.core.generation import generate
from refdir.core.io import atomic_dir, atomic_write_json, atomic_write_text
from refdir.errors import RefdirError
from refdir.method.refusal_judge import judge
from refdir.method.scoring import last_logits, refusal_metric_from_logits

console = Console(stderr=True)

SEARCH_DIR = "search"


class SearchConfig(BaseModel):
    """Everything that defines a study; ``refdir search`` refuses a directory made with other values."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "default"
    harmful: str = "embedded:harmful"  # train sources: candidates, and the proxy prompts (val) carved from them
    harmless: str = "embedded:harmless"
    harmful_test: str | None = None  # confirmation prompts (default: the sources' own test split)
    harmless_test: str | None = None
    column: str = "instruction"
    n_train: int | None = None
    filter_train: bool = True  # the paper's metric filter on the train prompts before the difference of means
    n_val: int = 40  # harmless proxy prompts (first-token KL), carved from the train sources
    # harmful proxy prompts (refusal metric): the first of the harmful val prompts carved alongside. The KL estimate is
    # the noisier of the two (a few prompts carry most of it) and decides which points land under a KL budget
    n_val_harmful: int = 24
    n_test: int | None = None  # confirmation prompts per set
    seed: int = 42
    refusal_tokens: list[str] | None = None
    system: str | None = None
    chat_template: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    trust_remote_code: bool = False
    batch_size: int = 32
    # selection (the warm start)
    kl_max: float = 0.1
    max_layer_frac: float = 0.8
    screen_n: int = 2  # the selection screens on 2 + 2 proxy prompts; its finalists are scored on all of them
    top_k: int = 4
    # warm starts besides the selection's: the candidates with the strongest screened bypass, whatever their KL, at
    # full strength in the projected variant (the search scales strength; the paper's KL filter is for full strength)
    strong_starts: int = 2
    # search space
    min_layer_frac: float = 0.25
    max_strength: float = 1.0
    variants: list[str] = list(VARIANTS)
    # KL budgets the user cares about: the front is refined towards them and the best point under each is confirmed
    kl_marks: list[float] = [0.01, 0.05]
    # confirmation
    max_new_tokens: int = 100
    gen_batch_size: int = 200  # rows per generation batch: every confirmed arm shares one batch
    # at least as broad as Heretic's markers; broad and paper are reported beside it
    judge: Literal["broad", "paper", "wide"] = "wide"

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]

    def run_config(self):
        from refdir.workflows.run import RunConfig

        return RunConfig(model=self.model, harmful=self.harmful, harmless=self.harmless,
                         harmful_test=self.harmful_test, harmless_test=self.harmless_test, column=self.column,
                         n_train=self.n_train, filter_train=self.filter_train, n_val=self.n_val,
                         n_test=self.n_test, seed=self.seed,
                         refusal_tokens=self.refusal_tokens, system=self.system, chat_template=self.chat_template,
                         dtype=self.dtype, device=self.device, trust_remote_code=self.trust_remote_code,
                         batch_size=self.batch_size, kl_max=self.kl_max, max_layer_frac=self.max_layer_frac,
                         screen_n=self.screen_n, top_k=self.top_k, max_new_tokens=self.max_new_tokens,
                         judge=self.judge, save_checkpoint=False)


def first_token_kl(base_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ edited) of the next-token distribution, per row (float64 softmax)."""
    logq = torch.log_softmax(logits.double(), -1)
    return (base_logp.exp() * (base_logp - logq)).sum(-1).float()


class Proxy:
    """The search objective: (mean refusal metric on harmful, mean first-token KL on harmless)."""

    def __init__(self, model, fmt, harmful: list[str], harmless: list[str], refusal_ids: list[int],
                 batch_size: int = 32):
        self.model, self.fmt, self.ids, self.bs = model, fmt, refusal_ids, batch_size
        self.arch = inspect_model(model)
        self.prompts, self.nh = harmful + harmless, len(harmful)
        base = self.base_logits = self._logits()
        self.base_metric = float(refusal_metric_from_logits(base[: self.nh], refusal_ids).mean())
        self.base_logp = torch.log_softmax(base[self.nh:].double(), -1)

    def _logits(self) -> torch.Tensor:
        return last_logits(self.model, self.fmt, self.prompts, self.bs, shared_prefix=True)

    def __call__(self, plan: Plan | None) -> tuple[float, float]:
        if plan is None:
            return self.base_metric, 0.0
        with hooked(self.model, plan, self.arch):
            lg = self._logits()
        m = float(refusal_metric_from_logits(lg[: self.nh], self.ids).mean())
        kl = float(first_token_kl(self.base_logp, lg[self.nh:]).mean())
        if not (math.isfinite(m) and math.isfinite(kl)):
            raise RefdirError("non-finite proxy scores: the model produces NaN logits under this edit")
        return m, kl


# ------------------------------------------------------------------------------------------ search space


@dataclass
class Space:
    positions: list[int]
    n_layers: int
    layer_lo: float
    layer_hi: float
    max_strength: float
    variants: list[str]

    def suggest(self, trial) -> Edit:
        pos = trial.suggest_categorical("position", self.positions)
        layer = trial.suggest_float("layer", self.layer_lo, self.layer_hi)
        comps = {}
        L = self.n_layers
        for c in COMPONENTS:
            peak = trial.suggest_float(f"{c}_peak", 0.0, self.max_strength)
            center = trial.suggest_float(f"{c}_center", 0.0, L - 1.0)
            width = trial.suggest_float(f"{c}_width", 1.0, float(L))
            floor = trial.suggest_float(f"{c}_floor", 0.0, 1.0)  # as a fraction of the peak
            variant = trial.suggest_categorical(f"{c}_variant", self.variants)
            comps[c] = Component(Kernel(peak, center, width, floor * peak), variant)
        emb = trial.suggest_categorical("embedding", [True, False])
        return Edit(pos, layer, comps["attn"], comps["mlp"], emb)

    def distributions(self) -> dict:
        """The optuna distribution of every parameter :meth:`suggest` draws (for trials added with known values)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        L = self.n_layers
        d = {"position": CategoricalDistribution(self.positions),
             "layer": FloatDistribution(self.layer_lo, self.layer_hi)}
        for c in COMPONENTS:
            d |= {f"{c}_peak": FloatDistribution(0.0, self.max_strength),
                  f"{c}_center": FloatDistribution(0.0, L - 1.0), f"{c}_width": FloatDistribution(1.0, float(L)),
                  f"{c}_floor": FloatDistribution(0.0, 1.0), f"{c}_variant": CategoricalDistribution(self.variants)}
        d["embedding"] = CategoricalDistribution([True, False])
        return d

    def full_params(self, position: int, layer: float, variant: str = "plain") -> dict:
        """Trial parameters whose edit is full strength everywhere (width L covers every layer at peak)."""
        L = self.n_layers
        p = {"position": position, "layer": float(min(max(layer, self.layer_lo), self.layer_hi)), "embedding": True}
        for c in COMPONENTS:
            p |= {f"{c}_peak": min(1.0, self.max_strength), f"{c}_center": (L - 1) / 2, f"{c}_width": float(L),
                  f"{c}_floor": 1.0, f"{c}_variant": variant}
        return p


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (both coordinates minimised), sorted by the second."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], points[i][0]))
    front, best = [], math.inf
    for i in order:
        if points[i][0] < best:
            front.append(i)
            best = points[i][0]
    return front


# ------------------------------------------------------------------------------------------ the study


def _check_dir(cfg: SearchConfig, out: Path, force: bool) -> None:
    f = out / SEARCH_DIR / "config.json"
    if not f.exists():
        return
    try:
        prev = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise RefdirError(f"corrupt study config {f}: {e}") from e
    now = cfg.model_dump()
    diff = [k for k in sorted(set(prev) | set(now)) if prev.get(k) != now.get(k)]
    if diff and not force:
        k = diff[0]
        what = "another model" if "model" in diff else "another config"
        raise RefdirError(f"{out} holds a search study made with {what} ({k}: {prev.get(k)!r} here, "
                          f"{now.get(k)!r} asked; {len(diff)} setting(s) differ); choose another --out or pass --force")
    if diff and force:
        import shutil

        shutil.rmtree(out / SEARCH_DIR)


def _storage(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def run_search(cfg: SearchConfig, out: str | Path, *, trials: int = 20, refine: int = 2, per_mark: int | None = None,
               max_confirm: int = 0, confirm_plain: bool = False, confirm_extra: int = 0, calibrate: bool = True,
               reference: str | Path | None = None, force: bool = False,
               progress: bool = True, callbacks: list | None = None) -> dict:
    """Run (or resume) the search in ``out``: ``trials`` TPE trials, then :func:`refine_front` on up to ``refine``
    front points per KL mark, then confirm the front by generation (``per_mark`` points under each KL mark, by default
    :func:`default_per_mark` of the loaded model; the
    first of them calibrated to the confirmation prompts' KL unless ``calibrate`` is off,
    ``max_confirm`` spread along the front, the plain edit with ``confirm_plain``, ``confirm_extra`` random trials;
    see :func:`_confirm`). Returns the summary (also in
    ``OUT/search/summary.json``)."""
    import optuna

    from refdir.workflows.run import Run

    out = Path(out)
    if trials < 1:
        raise RefdirError("--trials must be at least 1")
    if per_mark is not None and per_mark < 1:
        raise RefdirError("--per-mark must be at least 1")
    if cfg.n_val_harmful < 1 or cfg.n_val < 1:
        raise RefdirError("the proxy needs at least one harmful and one harmless prompt")
    if not cfg.kl_marks or not all(0 < m < float("inf") for m in cfg.kl_marks):
        raise RefdirError(f"KL marks must be positive numbers, got {cfg.kl_marks}")
    refs = load_reference(reference) if reference else []
    _check_dir(cfg, out, force)
    t0 = time.time()
    phase: dict[str, float] = {}

    def tick(name, t):
        phase[name] = round(phase.get(name, 0.0) + time.time() - t, 2)

    run = Run(cfg.run_config(), out, force=force, progress=progress)
    t = time.time()
    sets = run.stage_data()
    tick("data", t)
    t = time.time()
    ids = run.stage_refusal_tokens(sets)
    tick("refusal_tokens", t)
    t = time.time()
    filt = run.stage_filter(sets, ids)
    tick("filter", t)
    t = time.time()
    cands = run.stage_candidates(filt)
    tick("candidates", t)
    lm, fmt = run.lm, run.fmt
    if per_mark is None:
        per_mark = default_per_mark(lm.model)
    sdir = out / SEARCH_DIR
    sdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sdir / "config.json", cfg.model_dump())
    L = cands.n_layers
    max_layer = int(math.floor(cfg.max_layer_frac * L - 1e-9)) if cfg.max_layer_frac < 1 else L
    layer_lo = max(1.0, cfg.min_layer_frac * L)
    t = time.time()
    val = {"harmful": filt["val"]["harmful"][: cfg.n_val_harmful], "harmless": filt["val"]["harmless"]}
    proxy = Proxy(lm.model, fmt, val["harmful"], val["harmless"], ids, cfg.batch_size)
    tick("proxy_base", t)
    t = time.time()
    table, chosen = _selection(lm.model, fmt, cands, val, ids, cfg, int(math.ceil(layer_lo)), sdir, progress,
                               proxy.base_logits)
    tick("selection", t)
    if "load" in run.timings:
        phase["load"] = round(run.timings["load"], 2)
    bad = [v for v in cfg.variants if v not in VARIANTS]
    if bad or not cfg.variants:
        raise RefdirError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    space = Space(list(cands.positions), L, layer_lo, float(max_layer), cfg.max_strength, list(cfg.variants))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True, n_startup_trials=10)
    study = optuna.create_study(study_name="refdir-search", storage=_storage(sdir / "study.log"),
                                directions=["minimize", "minimize"], sampler=sampler, load_if_exists=True)
    band = kl_band(cfg.kl_marks)
    if not study.trials:
        # at most `trials` of them: a warm start left queued would be taken by the next trial refinement asks for
        _seed_study(study, space, _warm_starts(table, chosen, space, cfg)[:trials], table, band)

    def objective(trial):
        edit = space.suggest(trial)
        trial.set_user_attr("edit", edit.to_dict())
        m, kl = proxy(resolve(edit, cands))
        _set_band(trial, kl, band)
        return m, kl

    done = [tr for tr in study.trials
            if tr.state == optuna.trial.TrialState.COMPLETE and "refine_of" not in tr.user_attrs]
    todo = max(0, trials - len(done))
    t = time.time()
    if todo:
        bar = tqdm(total=trials, initial=len(done), desc="search", disable=not progress)

        def show(st, _tr):
            bar.update(1)
            bar.set_postfix_str(_front_postfix(st, cfg.kl_marks))

        try:
            study.optimize(objective, n_trials=todo, callbacks=[show] + list(callbacks or []))
        finally:
            bar.close()
    tick("search", t)
    t = time.time()
    n_refined = refine_front(study, objective, space, cfg.kl_marks, refine, progress) if refine > 0 else 0
    tick("refine", t)

    t = time.time()
    def scale(row: dict, a: float, attrs: dict) -> int | None:
        p = study.trials[row["trial"]].params
        q = _scaled_params(p, a, space)
        return None if q == p else _run_trial(study, objective, q, attrs).number  # None: already at full strength

    result = _confirm(run, lm, fmt, cands, study, sets, proxy, sdir, cfg, max_confirm, confirm_extra, progress,
                      per_mark, confirm_plain, scale if calibrate else None)
    tick("confirm", t)
    phase["total"] = round(time.time() - t0, 2)
    result["timings_s"] = phase
    result["new_trials"] = todo
    result["refine_trials"] = n_refined
    result["reference"] = refs
    result["selection"] = {"chosen": chosen, "n_scored": sum(1 for r in table if math.isfinite(r["bypass"]))}
    atomic_write_json(sdir / "summary.json", result)
    _write_tables(sdir, result)
    write_search_report(out, result)
    return result


def default_per_mark(model) -> int:
    """Front points confirmed under each KL mark when not given: 2 where generation is cheap (an accelerator, or a
    16-bit compute dtype, which refdir picks only on CPUs with native bf16), else 1. Confirmation is the largest phase
    of the search; near a KL budget, front points with the same proxy scores confirmed 7 and 10 refusals of 39, so a
    second pick is worth an arm's generation where that is cheap: ~21 s per arm in bf16 against ~55 s in fp32 on a
    2-core Zen 4 EPYC (39 prompts × 100 tokens), and fp32 CPUs without native bf16 are slower still."""
    p = next(model.parameters())
    return 2 if p.device.type != "cpu" or p.dtype in (torch.bfloat16, torch.float16) else 1


def _selection(model, fmt, cands: Candidates, val: dict, ids: list[int], cfg: SearchConfig, min_layer: int,
               sdir: Path, progress: bool, base_logits: torch.Tensor | None = None) -> tuple[list[dict], dict | None]:
    """The warm start: refdir's selection (:func:`refdir.method.selection.score_candidates`: screen on ``screen_n``
    prompts, ``top_k`` finalists fully scored) restricted to the searched layers; cached in the study dir.
    ``base_logits``: the unedited model's logits on the same prompts, if already computed (the proxy's)."""
    from dataclasses import asdict

    from refdir.method.selection import SelectionConfig, score_candidates

    f = sdir / "selection.json"
    if f.exists():
        d = json.loads(f.read_text())
        return d["table"], d["chosen"]
    scfg = SelectionConfig(max_layer_frac=cfg.max_layer_frac, kl_max=cfg.kl_max, min_layer=min_layer,
                           batch_size=cfg.batch_size, screen_n=cfg.screen_n, top_k=cfg.top_k)
    sel = score_candidates(model, fmt, cands, val["harmful"], val["harmless"], ids, scfg, progress=progress,
                           base_logits=base_logits)
    table = [r for r in sel.table() if r["layer"] >= min_layer]
    chosen = asdict(sel.chosen) if sel.chosen else None
    atomic_write_json(f, {"table": table, "chosen": chosen, "rule": sel.rule, "baseline": sel.baseline,
                          "filter_counts": sel.filter_counts})
    return table, chosen


# TPE treats edits whose proxy KL lies outside [KL_BAND[0]·smallest mark, KL_BAND[1]·largest mark] as infeasible, so that
# its few best trials (the tenth of them it models as "good") sit where the KL budgets are, not at the front's ends
KL_BAND = (0.5, 1.2)


def kl_band(marks: list[float]) -> tuple[float, float]:
    return KL_BAND[0] * min(marks), KL_BAND[1] * max(marks)


def _set_band(trial, kl: float, band: tuple[float, float]) -> None:
    """Record how far the trial's KL lies outside the band (≤ 0 inside): optuna's constraints, which TPE reads."""
    trial.set_constraint("kl_low", band[0] - kl)
    trial.set_constraint("kl_high", kl - band[1])


def _seed_study(study, space: Space, warm: list[dict], table: list[dict], band: tuple[float, float]) -> None:
    """Queue the warm starts. A plain full-strength warm start that the selection already scored in full is added
    as a finished trial with the selection's bypass and KL: those are the proxy's two objectives for the same edit
    (full ablation of the same direction, the same proxy prompts and batching), so running it again would only
    repeat the computation."""
    import optuna

    known = {(r["position"], float(r["layer"])): (r["bypass"], r["kl"]) for r in table
             if math.isfinite(r["bypass"]) and math.isfinite(r["kl"])}
    for p in warm:
        key = (p["position"], p["layer"])
        if key in known and p == space.full_params(*key, "plain"):
            edit = space.suggest(optuna.trial.FixedTrial(p))
            tr = optuna.trial.create_trial(
                params=p, distributions=space.distributions(), values=list(known[key]),
                user_attrs={"warm_start": True, "from_selection": True, "edit": edit.to_dict()})
            _set_band(tr, known[key][1], band)
            study.add_trial(tr)
        else:
            study.enqueue_trial(p, user_attrs={"warm_start": True})


def _warm_starts(table: list[dict], chosen: dict | None, space: Space, cfg: SearchConfig) -> list[dict]:
    """The selected direction at full strength (each variant), then the next best fully scored candidates
    (by bypass, those with KL within twice the selection's limit first); with no selected direction the
    best scored candidate leads. Then the ``cfg.strong_starts`` candidates with the lowest screened bypass whatever
    their KL, at full strength in the projected variant: the paper's KL filter judges full-strength plain ablation,
    but the search scales strength, and the directions that cut refusal most are the best ones to scale down. On the
    embedded model (Heretic's system prompt) these are pos −1/−2 at layer 19, screened out at KL 0.5 plain; projected,
    their full-strength proxy KL is 0.07–0.08 and scaled to KL 0.045 their proxy refusal is −4.4 against −3.6 for the
    selected pos −1 layer 16."""
    out = []
    scored = sorted((r for r in table if math.isfinite(r["bypass"])),
                    key=lambda r: (r["kl"] > 2 * cfg.kl_max, r["bypass"]))
    lead = chosen or (scored[0] if scored else None)
    if lead is not None:
        for v in ("plain", "projected", "norm"):
            if v in cfg.variants:
                out.append(space.full_params(lead["position"], float(lead["layer"]), v))
    for r in scored:
        if len(out) >= 3 + cfg.top_k:
            break
        if lead is not None and (r["position"], r["layer"]) == (lead["position"], lead["layer"]):
            continue
        if space.layer_lo <= r["layer"] <= space.layer_hi:
            out.append(space.full_params(r["position"], float(r["layer"]), "plain"))
    variant = "projected" if "projected" in cfg.variants else cfg.variants[0]

    def screened(r: dict) -> float:  # the screened bypass, or the full one where no screening was done
        b = r.get("bypass_screen", math.nan)
        return b if math.isfinite(b) else r["bypass"]

    strong = sorted((r for r in table if math.isfinite(screened(r)) and space.layer_lo <= r["layer"] <= space.layer_hi),
                    key=screened)
    for r in strong[: cfg.strong_starts]:
        p = space.full_params(r["position"], float(r["layer"]), variant)
        if p not in out:
            out.append(p)
    return out


def _front_postfix(study, marks: list[float]) -> str:
    import optuna

    pts = [(tr.values[0], tr.values[1]) for tr in study.trials if tr.state == optuna.trial.TrialState.COMPLETE]
    if not pts:
        return ""
    f = pareto_front(pts)
    parts = [f"front {len(f)}"]
    for kmax in sorted(marks):
        ok = [pts[i][0] for i in f if pts[i][1] <= kmax]
        if ok:
            parts.append(f"KL≤{kmax}: {min(ok):.2f}")
    return "  ".join(parts)


# ------------------------------------------------------------------------------------------ refinement
REFINE_MARGIN = 0.9  # aim under each KL mark: the confirmation prompts' KL differs from the proxy's by a few %
REFINE_TOL = 0.1  # relative KL error at which a scaled edit counts as on target


def _run_trial(study, objective, params: dict, attrs: dict):
    """Evaluate one given edit as a study trial; returns the finished trial."""
    import optuna

    study.enqueue_trial(params, user_attrs=attrs)
    study.optimize(objective, n_trials=1)
    tr = study.trials[-1]
    if tr.state != optuna.trial.TrialState.COMPLETE:
        raise RefdirError(f"trial {tr.number} did not complete ({tr.state.name})")
    return tr


def _scaled_params(params: dict, a: float, space: Space) -> dict:
    """The same edit with both components' peaks times ``a`` (clipped to the searched maximum); floors are stored as
    fractions of the peak, so they scale too."""
    q = dict(params)
    for c in COMPONENTS:
        q[f"{c}_peak"] = float(min(space.max_strength, max(0.0, params[f"{c}_peak"] * a)))
    return q


def _refinable(tr, target: float, space: Space) -> bool:
    """A refinement source for KL ``target``: within a factor 8 of it, not on it already, and scalable towards it."""
    kl0 = tr.values[1]
    if kl0 <= 0 or abs(math.log(kl0 / target)) >= math.log(8) or abs(kl0 / target - 1) <= REFINE_TOL:
        return False
    return not (kl0 < target and all(tr.params[f"{c}_peak"] >= space.max_strength for c in COMPONENTS))


def refine_front(study, objective, space: Space, marks: list[float], per_mark: int = 3,
                 progress: bool = True) -> int:
    """Strength refinement towards each KL mark. TPE samples the edit space sparsely; near a KL budget the front
    improves most cheaply by taking a front edit and scaling its strength until its proxy KL sits just under the
    budget (KL grows about as the square of the strength). For each mark ``m``, the (up to) ``per_mark`` front points
    nearest to ``0.9·m`` in log KL (within a factor 8), leaving out those already within 10 % of it, those refined for
    this mark before and full-strength ones below it, are scaled by ``a = sqrt(0.9·m / KL)``, then once more by a
    secant step in log–log if the first try misses by more than 10 %. Every scaled edit is a study trial (user attrs
    ``refine_of``, ``mark``); sources come from the searched (not refined) trials, and a (point, mark) pair refined
    before, e.g. in an interrupted run, is not redone.
    Returns the number of trials added."""
    import optuna

    def complete():
        return [tr for tr in study.trials if tr.state == optuna.trial.TrialState.COMPLETE]

    def run(params: dict, attrs: dict) -> tuple[float, float]:
        return _run_trial(study, objective, params, attrs).values

    added = 0
    bar = tqdm(total=per_mark * len(marks), desc="refine", disable=not progress, leave=False)
    for m in marks:
        target = REFINE_MARGIN * m
        trs = complete()
        done = {(tr.user_attrs["refine_of"], tr.user_attrs["mark"]) for tr in trs if "refine_of" in tr.user_attrs}
        trs = [tr for tr in trs if "refine_of" not in tr.user_attrs]  # sources: the front of the searched trials
        front = [trs[i] for i in pareto_front([(tr.values[0], tr.values[1]) for tr in trs])]
        # a source refined before (an interrupted run) keeps its slot, so a rerun picks the same sources
        near = sorted((tr for tr in front if (tr.number, m) in done or _refinable(tr, target, space)),
                      key=lambda tr: abs(math.log(tr.values[1] / target)))[:per_mark]
        for src in near:
            bar.update(1)
            if (src.number, m) in done:
                continue
            kl0 = src.values[1]
            a = math.sqrt(target / kl0)
            attrs = {"refine_of": src.number, "mark": m}
            _, kl1 = run(_scaled_params(src.params, a, space), attrs)
            added += 1
            if abs(kl1 / target - 1) > REFINE_TOL and kl1 > 0 and abs(math.log(a)) > 1e-3:
                slope = math.log(kl1 / kl0) / math.log(a)
                if slope > 0.2:
                    a2 = math.exp(math.log(a) + math.log(target / kl1) / slope)
                    run(_scaled_params(src.params, a2, space), attrs)
                    added += 1
            bar.set_postfix_str(_front_postfix(study, marks))
    bar.close()
    return added


# ------------------------------------------------------------------------------------------ confirmation


def _trial_rows(study) -> list[dict]:
    import optuna

    rows = []
    for tr in study.trials:
        if tr.state != optuna.trial.TrialState.COMPLETE:
            continue
        rows.append({"trial": tr.number, "proxy_refusal": tr.values[0], "proxy_kl": tr.values[1],
                     "edit": tr.user_attrs["edit"], "warm_start": bool(tr.user_attrs.get("warm_start")),
                     "refine_of": tr.user_attrs.get("refine_of"), "calibrated": bool(tr.user_attrs.get("calibrated"))})
    return rows


def _front_picks(front: list[dict], k: int) -> list[int]:
    """Front points spread evenly along the front (sorted by proxy KL), ``k`` at most, ends included."""
    n = len(front)
    picks = [round(j * (n - 1) / (k - 1)) for j in range(k)] if k > 1 and n > 1 else [0] if n and k else []
    return sorted(set(picks))


def _confirm(run, lm, fmt, cands, study, sets, proxy: Proxy, sdir: Path, cfg: SearchConfig, max_confirm: int,
             confirm_extra: int, progress: bool, per_mark: int = 1, confirm_plain: bool = False,
             scale=None) -> dict:
    """Generation on the confirmation prompts for: the base model; at each KL mark, the ``per_mark`` front points
    with the lowest proxy refusal under it whose confirmed KL stays under the mark, each from a different lineage (a
    refined edit and its source are one), trying up to ``3·per_mark`` points; ``max_confirm`` more front points spread
    along the front; the plain edit if ``confirm_plain``; ``confirm_extra`` random trials.

    **Calibration** (with ``scale``, a callable ``(row, a, attrs) -> trial number`` that adds the row's edit with its
    strength times ``a`` as a study trial): the proxy's KL differs from the confirmation prompts' by up to a third
    either way, and the error is mostly a property of the two prompt samples, shared by every edit. So at each mark the
    first point tried, once its confirmed KL is known, is rescaled once (KL grows about as the square of the strength)
    to aim its confirmed KL at ``CALIBRATE_MARGIN·m``; the rescaled edit replaces the pick if its confirmed KL stays under
    the mark. Only the harmless confirmation prompts' KL steers this, as it steers which points count as under the
    mark at all; the harmful confirmation prompts, whose refusals are reported, are never used to choose.

    Every arm is confirmed in the same batches (:func:`refdir.core.edits.hooked_rows`): first the first-token KL of the
    arms (which decides the KL marks' picks), then one greedy generation over all arms' prompts, so the model's
    weights are read once per decoding step for all of them."""
    rows = _trial_rows(study)
    pts = [(r["proxy_refusal"], r["proxy_kl"]) for r in rows]
    front = [rows[i] for i in pareto_front(pts)]
    plain = next((r for r in rows if r["warm_start"]), None)
    spread = [front[i] for i in _front_picks(front, max_confirm)]

    H, B = sets["harmful"]["test"], sets["harmless"]["test"]
    cache_f = sdir / "confirm.json"
    cache = json.loads(cache_f.read_text()) if cache_f.exists() else {}
    arch = proxy.arch
    base_logp = None

    def key(r: dict | None) -> str:
        return "base" if r is None else str(r["trial"])

    def plan(r: dict):
        return resolve(Edit.from_dict(r["edit"]), cands)

    def kls(arms: list[dict]) -> None:
        """First-token KL on the harmless confirmation prompts for the arms not measured yet, in one pass."""
        nonlocal base_logp
        todo = list({key(r): r for r in arms if key(r) not in cache}.values())
        if not todo:
            return
        if base_logp is None:
            base_logp = torch.log_softmax(last_logits(lm.model, fmt, B, cfg.batch_size, shared_prefix=True).double(),
                                          -1)
        with hooked_rows(lm.model, [plan(r) for r in todo], arch) as hr:
            lg = last_logits(lm.model, fmt, B * len(todo), cfg.batch_size, shared_prefix=True, rows=hr,
                             groups=[k for k in range(len(todo)) for _ in B])
        for k, r in enumerate(todo):
            kl = first_token_kl(base_logp, lg[k * len(B):(k + 1) * len(B)])
            cache[key(r)] = {"kl": float(kl.mean()), "n_kl": len(B)}
        atomic_write_json(cache_f, cache)

    def generated(arms: list[dict | None]) -> None:
        """Greedy completions of the harmful confirmation prompts for every arm not generated yet, in one batch."""
        todo = list({key(r): r for r in arms if "refusals" not in cache.get(key(r), {})}.values())
        if not todo:
            return
        plans = [None if r is None else plan(r) for r in todo]
        with hooked_rows(lm.model, plans, arch) as hr:
            outs = generate(lm.model, fmt, H * len(todo), max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.gen_batch_size, progress=progress,
                            desc=f"confirm: {len(todo)} arm{'s' * (len(todo) > 1)} × {len(H)} prompts", rows=hr,
                            groups=[k for k in range(len(todo)) for _ in H], shared_prefix=True)
        for k, r in enumerate(todo):
            o = outs[k * len(H):(k + 1) * len(H)]
            jh, jb, jp = judge(o, cfg.judge), judge(o, "broad"), judge(o, "paper")
            # the base model's KL to itself is 0 by definition; no forward pass for it
            kl = cache.get(key(r), {"kl": 0.0, "n_kl": len(B)})
            cache[key(r)] = {"refusals": jh.n_refusal, "refusals_broad": jb.n_refusal,
                             "refusals_paper": jp.n_refusal, "n": jh.n, "degenerate": jh.n_degenerate,
                             "refusal": jh.refusal, "refusal_paper": jp.refusal, **kl, "completions": o}
        atomic_write_json(cache_f, cache)

    # which arms: at each mark the per_mark front points with the lowest proxy refusal under it whose confirmed KL
    # stays under the mark, from different lineages (a refined edit and its source count as one); the spread points,
    # the plain edit if asked, random others
    def lineage(r: dict) -> int:
        return r["refine_of"] if r["refine_of"] is not None else r["trial"]

    unders = {m: sorted((r for r in front if r["proxy_kl"] <= m), key=lambda r: -r["proxy_kl"])
              for m in sorted(cfg.kl_marks)}
    others = spread + ([plain] if plain is not None and confirm_plain else [])
    picks: dict[float, list[dict]] = {m: [] for m in unders}
    seen: dict[float, int] = {m: 0 for m in unders}

    def next_tries() -> dict[float, list[dict]]:
        """Per mark, the next untried points (lineages not picked yet) to fill its per_mark picks."""
        tries: dict[float, list[dict]] = {}
        for m, u in unders.items():
            fams = {lineage(r) for r in picks[m]}
            t = []
            while len(picks[m]) + len(t) < per_mark and seen[m] < min(len(u), 3 * per_mark):
                r = u[seen[m]]
                seen[m] += 1
                if lineage(r) not in fams | {lineage(x) for x in t}:
                    t.append(r)
            if t:
                tries[m] = t
        return tries

    tries = next_tries()
    kls([r for t in tries.values() for r in t] + others)
    while tries:
        for m, t in tries.items():
            picks[m] += [r for r in t if cache[key(r)]["kl"] <= m]
        tries = next_tries()
        kls([r for t in tries.values() for r in t])
    if scale is not None:
        rows, front, picks, others = _calibrate(study, scale, cache, kls, key, lineage, unders, picks, others, front,
                                                rows, per_mark)
        plain = next((r for r in rows if r["warm_start"]), None)
    picked = [r for m in unders for r in picks[m]]
    chosen = {key(r) for r in [*picked, *others]}
    rest = [r for r in rows if key(r) not in chosen]
    random.Random(cfg.seed).shuffle(rest)
    kls(rest[:confirm_extra])
    arms = list({key(r): r for r in [None, *picked, *others, *rest[:confirm_extra]]}.values())
    generated(arms)
    base = cache["base"]
    for r in arms[1:]:
        r["confirmed"] = cache[key(r)]
    conf = [r for r in rows if "confirmed" in r]
    xs = [proxy.base_metric] + [r["proxy_refusal"] for r in conf]
    ys = [base["refusal"]] + [r["confirmed"]["refusal"] for r in conf]
    kx = [0.0] + [r["proxy_kl"] for r in conf]
    ky = [base["kl"]] + [r["confirmed"]["kl"] for r in conf]
    rho, rho_kl = _spearman(xs, ys), _spearman(kx, ky)
    n = base["n"]

    def best_at(kmax):
        ok = [r for r in conf if r["confirmed"]["kl"] <= kmax]
        if not ok:
            return None
        b = min(ok, key=lambda r: (r["confirmed"]["refusals"], r["confirmed"]["kl"]))
        return {"trial": b["trial"], "refusals": b["confirmed"]["refusals"],
                "refusals_paper": b["confirmed"]["refusals_paper"], "kl": b["confirmed"]["kl"], "n": n}

    for k, r in enumerate(front):
        r["point"] = k
    return {
        "config": cfg.model_dump(), "n_trials": sum(r["refine_of"] is None for r in rows),
        "n_refined": sum(r["refine_of"] is not None for r in rows), "n_calibrated": sum(r["calibrated"] for r in rows),
        "n_layers": cands.n_layers,
        "model_id": lm.model_id, "positions": cands.positions,
        "proxy_prompts": {"harmful": proxy.nh, "harmless": len(proxy.prompts) - proxy.nh},
        "confirm_prompts": {"harmful": len(H), "harmless": len(B), "max_new_tokens": cfg.max_new_tokens},
        "base": {"proxy_refusal": proxy.base_metric, "proxy_kl": 0.0, "confirmed": base},
        "plain": plain, "front": front, "trials": rows,
        "spearman_refusal": rho, "spearman_kl": rho_kl, "n_confirmed": len(conf) + 1,
        "best_at_kl": {f"{m:g}": best_at(m) for m in sorted(cfg.kl_marks)},
        "picks": {f"{m:g}": [r["trial"] for r in picks[m]] for m in unders},
    }


CALIBRATE_MARGIN = 0.92  # where a calibrated pick's confirmed KL is aimed, as a share of its mark
CALIBRATE_TOL = 0.1  # a pick already within this relative error of the aim is kept as it is


def _calibrate(study, scale, cache: dict, kls, key, lineage, unders: dict, picks: dict, others: list, front: list,
               rows: list, per_mark: int):
    """See :func:`_confirm`. Returns the trial rows, the front, the picks and the other arms rebuilt from the study
    (the calibrated edits are new trials)."""
    made = {(tr.user_attrs["refine_of"], tr.user_attrs["mark"]): tr.number for tr in study.trials
            if tr.user_attrs.get("calibrated") and tr.values is not None}
    new: dict[float, int] = {}
    for m, u in unders.items():
        if not u or key(u[0]) not in cache:
            continue
        src, target = u[0], CALIBRATE_MARGIN * m
        kc = cache[key(src)]["kl"]
        if kc <= 0 or abs(kc / target - 1) <= CALIBRATE_TOL:
            continue
        k = (lineage(src), m)
        t = made[k] if k in made else scale(src, math.sqrt(target / kc),
                                             {"refine_of": lineage(src), "mark": m, "calibrated": True})
        if t is not None:
            new[m] = t
    if not new:
        return rows, front, picks, others
    rows = _trial_rows(study)
    by = {r["trial"]: r for r in rows}
    front = [rows[i] for i in pareto_front([(r["proxy_refusal"], r["proxy_kl"]) for r in rows])]
    picks = {m: [by[r["trial"]] for r in p] for m, p in picks.items()}
    others = [by[r["trial"]] for r in others]
    kls([by[t] for t in new.values()])
    for m, t in new.items():
        r = by[t]
        if cache[key(r)]["kl"] <= m:
            picks[m] = [r] + [p for p in picks[m] if lineage(p) != lineage(r)][: per_mark - 1]
    return rows, front, picks, others


def _spearman(x: list[float], y: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(y)) < 2 or len(set(x)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def load_reference(path: str | Path) -> list[dict]:
    """Reference points to draw beside the front: a JSON list of ``{"label", "refusals", "kl"}`` (optional "n")."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise TypeError("not a list of objects")
        pts = [{"label": str(d.get("label", "")), "refusals": float(d["refusals"]), "kl": float(d["kl"]),
                "n": d.get("n")} for d in data]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise RefdirError(f"reference file {p}: expected a JSON list of {{label, refusals, kl}} ({e})") from e
    return pts


# ------------------------------------------------------------------------------------------ outputs


def _write_tables(sdir: Path, res: dict) -> None:
    def slim(r):
        c = r.get("confirmed") or {}
        e = Edit.from_dict(r["edit"])
        return {"point": r.get("point", ""), "trial": r["trial"], "proxy_refusal": round(r["proxy_refusal"], 4),
                "proxy_kl": round(r["proxy_kl"], 5), "refusals": c.get("refusals", ""),
                "refusals_paper": c.get("refusals_paper", ""), "n": c.get("n", ""),
                "kl": round(c["kl"], 5) if c else "", "edit": e.describe()}

    front = [slim(r) for r in res["front"]]
    atomic_write_json(sdir / "front.json", {"points": [
        {k: v for k, v in r.items()} | {"confirmed": {k: v for k, v in (r.get("confirmed") or {}).items()
                                                      if k != "completions"} or None}
        for r in res["front"]], "base": {k: v for k, v in res["base"]["confirmed"].items() if k != "completions"}})
    cols = list(front[0]) if front else []
    atomic_write_text(sdir / "front.csv", ",".join(cols) + "\n" + "".join(
        ",".join(f'"{r[k]}"' if k == "edit" else str(r[k]) for k in cols) + "\n" for r in front))
    trows = [slim(r) for r in res["trials"]]
    atomic_write_text(sdir / "trials.csv", ",".join(cols) + "\n" + "".join(
        ",".join(f'"{r[k]}"' if k == "edit" else str(r[k]) for k in cols) + "\n" for r in trows))


def plot_front(res: dict):
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.6))
    tr = res["trials"]
    a1.scatter([max(r["proxy_kl"], 1e-5) for r in tr], [r["proxy_refusal"] for r in tr], s=12, c="0.7",
               label="trials")
    fr = res["front"]
    a1.plot([max(r["proxy_kl"], 1e-5) for r in fr], [r["proxy_refusal"] for r in fr], "o-", c="C3", ms=4,
            drawstyle="steps-post", label="Pareto front")
    if res.get("plain"):
        a1.plot([res["plain"]["proxy_kl"]], [res["plain"]["proxy_refusal"]], "*", c="k", ms=12,
                label="plain edit (selected direction, full strength)")
    a1.axhline(res["base"]["proxy_refusal"], ls=":", c="k", lw=1, label="base model")
    a1.set_xscale("log")
    a1.set_xlabel("proxy first-token KL (harmless proxy prompts)")
    a1.set_ylabel("proxy refusal metric (harmful proxy prompts)")
    a1.set_title(f"search: {len(tr)} trials")
    a1.legend(fontsize=7)

    n = res["base"]["confirmed"]["n"]
    conf = [r for r in tr if "confirmed" in r]
    cf = [r for r in fr if "confirmed" in r]
    a2.scatter([max(r["confirmed"]["kl"], 1e-5) for r in conf], [r["confirmed"]["refusals"] for r in conf], s=14,
               c="0.6", label="confirmed trials")
    a2.plot([max(r["confirmed"]["kl"], 1e-5) for r in cf], [r["confirmed"]["refusals"] for r in cf], "o", c="C3",
            ms=6, label="front points, confirmed")
    for r in cf:
        a2.annotate(str(r["point"]), (max(r["confirmed"]["kl"], 1e-5), r["confirmed"]["refusals"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if res.get("plain") and "confirmed" in res["plain"]:
        p = res["plain"]["confirmed"]
        a2.plot([p["kl"]], [p["refusals"]], "*", c="k", ms=12, label="plain edit")
    a2.axhline(res["base"]["confirmed"]["refusals"], ls=":", c="k", lw=1, label="base model")
    for ref in res.get("reference") or []:
        rn = ref.get("n") or n
        a2.plot([max(ref["kl"], 1e-5)], [ref["refusals"] * n / rn], "^", c="C0", ms=7)
        a2.annotate(ref["label"], (max(ref["kl"], 1e-5), ref["refusals"] * n / rn), fontsize=7, color="C0",
                    xytext=(3, -9), textcoords="offset points")
    a2.set_xscale("log")
    a2.set_xlabel(f"first-token KL, {res['confirm_prompts']['harmless']} harmless confirmation prompts")
    a2.set_ylabel(f"refusals of {n} ({res['config']['judge']} judge, "
                  f"{res['confirm_prompts']['max_new_tokens']} generated tokens)")
    a2.set_title("confirmed by generation")
    a2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_search_report(out: Path, res: dict) -> None:
    from refdir.workflows.report import add_section, figure_html, table_html

    rows = []
    for r in res["front"]:
        c = r.get("confirmed")
        rows.append([r["point"], r["trial"], f"{r['proxy_refusal']:.2f}", f"{r['proxy_kl']:.4f}",
                     f"{c['refusals']}/{c['n']}" if c else "", f"{c['refusals_paper']}/{c['n']}" if c else "",
                     f"{c['kl']:.4f}" if c else "", Edit.from_dict(r["edit"]).describe()])
    b = res["base"]["confirmed"]
    rho = res["spearman_refusal"]
    jname = res["config"]["judge"]
    best = "; ".join(f"KL ≤ {m}: " + (f"{v['refusals']}/{v['n']} refusals at KL {v['kl']:.4f} (trial {v['trial']})"
                                      if v else "none confirmed") for m, v in res.get("best_at_kl", {}).items())
    ch = (res.get("selection") or {}).get("chosen")
    pe = (res.get("plain") or {}).get("edit")
    plain_txt = ("" if pe is None else
                 f"The plain edit (★) is position {pe['position']}, layer {pe['layer']:g} at full strength: "
                 + ("the selected direction. " if ch else "no candidate passed the selection filters, so it is the "
                    "finalist with the lowest bypass. "))
    ref_txt = (" Reference points come from the file given with <code>--reference</code>; they may have been "
               "measured with another judge or precision." if res.get("reference") else "")
    txt = (f"<p>{res['n_trials']} TPE trials and {res.get('n_refined', 0)} refinement trials; proxy: refusal metric "
           f"on {res['proxy_prompts']['harmful']} harmful and "
           f"first-token KL on {res['proxy_prompts']['harmless']} harmless proxy prompts. Confirmation: "
           f"{res['confirm_prompts']['max_new_tokens']} greedy tokens on {b['n']} harmful prompts ({jname} judge; "
           f"paper substrings beside it), first-token KL on {res['confirm_prompts']['harmless']} harmless prompts. "
           f"Base model: {b['refusals']}/{b['n']} refusals. Best confirmed point under each KL mark: {best}. "
           f"Rank correlation (Spearman) of proxy refusal vs generated "
           f"refusal over {res['n_confirmed']} confirmed points: "
           f"{'n/a' if rho is None else f'{rho:.2f}'}. {plain_txt}Export a point: "
           f"<code>refdir export DIR OUT --point K</code>.{ref_txt}</p>")
    body = txt + figure_html(plot_front(res)) + table_html(
        rows, ["point", "trial", "proxy refusal", "proxy KL", f"refusals ({jname})", "refusals (paper)", "KL", "edit"])
    add_section(out, "search", body, "Pareto search over edits")


# ------------------------------------------------------------------------------------------ export


def export_point(search_dir: str | Path, point: int, out: str | Path, *, force: bool = False,
                 dtype: str | None = None) -> Path:
    """Write front point ``point`` of a finished search as an edited HF checkpoint (weights, not hooks)."""
    from refdir.core.models import load_model, save_hf_checkpoint

    sd = Path(search_dir)
    f = sd / SEARCH_DIR / "front.json"
    cf = sd / SEARCH_DIR / "config.json"
    if not f.exists() or not cf.exists():
        raise RefdirError(f"{sd} holds no finished search (expected {f})")
    if Path(out).exists() and not force:
        raise RefdirError(f"output directory {out} already exists; pass --force to overwrite it")
    pts = json.loads(f.read_text())["points"]
    if not 0 <= point < len(pts):
        raise RefdirError(f"point {point} is not on the front (points 0..{len(pts) - 1})")
    cfg = SearchConfig(**json.loads(cf.read_text()))
    p = pts[point]
    edit = Edit.from_dict(p["edit"])
    cands = Candidates.load(sd / "candidates")
    lm = load_model(cfg.model, dtype=dtype or cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    summary = apply_weights_(lm.model, resolve(edit, cands))
    with atomic_dir(out, force=force) as tmp:
        save_hf_checkpoint(lm.model, lm.tokenizer, tmp)
        atomic_write_json(tmp / "refdir_edit.json", {
            "kind": "edit", "edit": edit.to_dict(), "describe": edit.describe(), "point": point,
            "trial": p["trial"], "proxy": {"refusal": p["proxy_refusal"], "kl": p["proxy_kl"]},
            "confirmed": p.get("confirmed"), "source_model": lm.model_id, **summary})
    return Path(out)
