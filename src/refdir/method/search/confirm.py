"""Confirmation of the front by generation.

Arms: the base model; at each KL mark, the ``per_mark`` front points with the lowest proxy refusal under it whose
confirmed KL stays under the mark, each from a different lineage (a refined edit and its source are one), trying
up to ``3·per_mark`` points; ``max_confirm`` more front points spread along the front; the plain edit if
``confirm_plain``; ``confirm_extra`` random trials. Each arm gets greedy generation on the harmful confirmation
prompts (judged with the headline judge, with ``broad`` and the paper's substrings beside it) and first-token KL on
the harmless confirmation prompts. The rank correlation of proxy and generated refusal over the confirmed trials is
reported.

**Calibration**: the proxy's KL differs from the confirmation prompts' by up to a third either way, and the error is
mostly a property of the two prompt samples, shared by every edit. So at each mark the first point tried, once its
confirmed KL is known, is rescaled once (KL grows about as the square of the strength) to aim its confirmed KL at
``CALIBRATE_MARGIN·m``; the rescaled edit replaces the pick if its confirmed KL stays under the mark. Only the
harmless confirmation prompts' KL steers this, as it steers which points count as under the mark at all; the harmful
confirmation prompts, whose refusals are reported, are never used to choose.

Every arm is confirmed in the same batches (:func:`refdir.core.edits.hooked_rows`): first the first-token KL of the
arms (which decides the KL marks' picks), then one greedy generation over all arms' prompts, so the model's weights
are read once per decoding step for all of them. Results are cached per trial in a JSON file, so a rerun generates
nothing twice.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from refdir.core.directions import Candidates
from refdir.core.edits import Edit, hooked_rows, resolve
from refdir.core.generation import generate
from refdir.core.io import atomic_write_json
from refdir.method.refusal_judge import judge_all, refusal_settled
from refdir.method.scoring import first_token_kl, last_logits
from refdir.method.search.objective import Proxy, Space, pareto_front
from refdir.method.search.study import all_trials, run_trial, trial_rows

CALIBRATE_MARGIN = 0.92  # where a calibrated pick's confirmed KL is aimed, as a share of its mark
CALIBRATE_TOL = 0.1  # a pick already within this relative error of the aim is kept as it is


def default_per_mark(model) -> int:
    """Front points confirmed under each KL mark when not given: 2 where generation is cheap (an accelerator, or a
    16-bit compute dtype, which refdir picks only on CPUs with native bf16), else 1. Confirmation is the largest
    phase of the search, and front points with the same proxy scores near a KL budget can confirm quite different
    refusal counts, so a second pick is worth an arm's generation where that is cheap."""
    p = next(model.parameters())
    return 2 if p.device.type != "cpu" or p.dtype in (torch.bfloat16, torch.float16) else 1


def front_picks(front: list[dict], k: int) -> list[int]:
    """Front points spread evenly along the front (sorted by proxy KL), ``k`` at most, ends included."""
    n = len(front)
    picks = [round(j * (n - 1) / (k - 1)) for j in range(k)] if k > 1 and n > 1 else [0] if n and k else []
    return sorted(set(picks))


def key(r: dict | None) -> str:
    """An arm's cache key: the trial number, or "base" for the unedited model."""
    return "base" if r is None else str(r["trial"])


def lineage(r: dict) -> int:
    """The trial a row descends from: a refined or calibrated edit and its source are one lineage."""
    return r["refine_of"] if r["refine_of"] is not None else r["trial"]


class Confirmation:
    """The confirmation phase of one search (see the module docstring). :meth:`run` chooses the arms, measures
    them and returns the summary fields; the cache of measured arms lives in ``cache_file``."""

    def __init__(self, study, space: Space, objective, proxy: Proxy, cands: Candidates, harmful: list[str],
                 harmless: list[str], cache_file: Path, *, batch_size: int, gen_batch_size: int, max_new_tokens: int,
                 judge: str, progress: bool = True):
        # the search: calibration adds trials to the study, made by the objective from the space's parameters
        self.study, self.space, self.objective = study, space, objective
        self.proxy, self.model, self.fmt, self.cands = proxy, proxy.model, proxy.fmt, cands
        self.harmful, self.harmless = harmful, harmless  # the confirmation prompts
        self.cache_file = cache_file
        self.cache: dict = json.loads(cache_file.read_text()) if cache_file.exists() else {}
        self.batch_size, self.gen_batch_size, self.max_new_tokens = batch_size, gen_batch_size, max_new_tokens
        self.judge, self.progress = judge, progress
        self.base_logp: torch.Tensor | None = None
        # the arms' choice, set by choose()
        self.per_mark = 1
        self.rows: list[dict] = []
        self.front: list[dict] = []
        self.plain: dict | None = None
        self.unders: dict[float, list[dict]] = {}
        self.picks: dict[float, list[dict]] = {}
        self.seen: dict[float, int] = {}
        self.others: list[dict] = []

    def run(self, marks: list[float], *, per_mark: int = 1, max_confirm: int = 0, confirm_plain: bool = False,
            confirm_extra: int = 0, seed: int = 42, calibrate: bool = True, generate: bool = True) -> dict:
        """Choose the arms, calibrate the marks' picks (unless ``calibrate`` is off), confirm every arm and return
        the summary's confirmation fields; the trial rows (``self.rows``) carry each arm's result as
        ``confirmed``. ``generate=False`` confirms by KL alone (no completions, no refusal counts): for a caller
        that takes one pick per mark, where generation would change nothing it chooses."""
        self.choose(marks, per_mark, max_confirm, confirm_plain)
        if calibrate:
            self.calibrate()
        picked = [r for m in self.unders for r in self.picks[m]]
        chosen = {key(r) for r in [*picked, *self.others]}
        rest = [r for r in self.rows if key(r) not in chosen]
        random.Random(seed).shuffle(rest)
        self.kls(rest[:confirm_extra])
        arms = list({key(r): r for r in [None, *picked, *self.others, *rest[:confirm_extra]]}.values())
        if generate:
            self.generated(arms)
        for r in arms[1:]:
            r["confirmed"] = self.cache[key(r)]
        return self.summary(marks)

    # ------------------------------------------------------------------ measuring arms
    def plan(self, r: dict):
        return resolve(Edit.from_dict(r["edit"]), self.cands)

    def kls(self, arms: list[dict]) -> None:
        """First-token KL on the harmless confirmation prompts for the arms not measured yet, in one pass."""
        todo = list({key(r): r for r in arms if key(r) not in self.cache}.values())
        if not todo:
            return
        B = self.harmless
        if self.base_logp is None:
            base = last_logits(self.model, self.fmt, B, self.batch_size, shared_prefix=True)
            self.base_logp = torch.log_softmax(base.double(), -1)
        with hooked_rows(self.model, [self.plan(r) for r in todo], self.proxy.arch) as hr:
            lg = last_logits(self.model, self.fmt, B * len(todo), self.batch_size, shared_prefix=True, rows=hr,
                             groups=[k for k in range(len(todo)) for _ in B])
        for k, r in enumerate(todo):
            kl = first_token_kl(self.base_logp, lg[k * len(B):(k + 1) * len(B)])
            self.cache[key(r)] = {"kl": float(kl.mean()), "n_kl": len(B)}
        atomic_write_json(self.cache_file, self.cache)

    def generated(self, arms: list[dict | None]) -> None:
        """Greedy completions of the harmful confirmation prompts for every arm not generated yet, in one batch."""
        todo = list({key(r): r for r in arms if "refusals" not in self.cache.get(key(r), {})}.values())
        if not todo:
            return
        H = self.harmful
        plans = [None if r is None else self.plan(r) for r in todo]
        with hooked_rows(self.model, plans, self.proxy.arch) as hr:
            outs = generate(self.model, self.fmt, H * len(todo), max_new_tokens=self.max_new_tokens,
                            batch_size=self.gen_batch_size, progress=self.progress,
                            desc=f"confirm: {len(todo)} arm{'s' * (len(todo) > 1)} × {len(H)} prompts", rows=hr,
                            groups=[k for k in range(len(todo)) for _ in H], shared_prefix=True,
                            decided=refusal_settled)  # a refusal's verdict settled: the row stops there
        for k, r in enumerate(todo):
            o = outs[k * len(H):(k + 1) * len(H)]
            j = judge_all(o, self.judge)
            jh = j["headline"]
            # the base model's KL to itself is 0 by definition; no forward pass for it
            kl = self.cache.get(key(r), {"kl": 0.0, "n_kl": len(self.harmless)})
            self.cache[key(r)] = {"refusals": jh.n_refusal, "refusals_broad": j["broad"].n_refusal,
                                  "refusals_paper": j["paper"].n_refusal, "n": jh.n, "degenerate": jh.n_degenerate,
                                  "refusal": jh.refusal, "refusal_paper": j["paper"].refusal, **kl, "completions": o}
        atomic_write_json(self.cache_file, self.cache)

    # ------------------------------------------------------------------ choosing arms
    def choose(self, marks: list[float], per_mark: int, max_confirm: int, confirm_plain: bool) -> None:
        """Pick, at each mark, the ``per_mark`` front points with the lowest proxy refusal under it whose confirmed
        KL stays under the mark (from different lineages); the spread points and the plain edit if asked are the
        other arms."""
        self.per_mark = per_mark
        self.rows = trial_rows(self.study)
        self.front = [self.rows[i] for i in pareto_front([(r["proxy_refusal"], r["proxy_kl"]) for r in self.rows])]
        self.plain = next((r for r in self.rows if r["warm_start"]), None)
        spread = [self.front[i] for i in front_picks(self.front, max_confirm)]
        self.unders = {m: sorted((r for r in self.front if r["proxy_kl"] <= m), key=lambda r: -r["proxy_kl"])
                       for m in sorted(marks)}
        self.others = spread + ([self.plain] if self.plain is not None and confirm_plain else [])
        self.picks = {m: [] for m in self.unders}
        self.seen = {m: 0 for m in self.unders}
        tries = self.next_tries()
        self.kls([r for t in tries.values() for r in t] + self.others)
        while tries:
            for m, t in tries.items():
                self.picks[m] += [r for r in t if self.cache[key(r)]["kl"] <= m]
            tries = self.next_tries()
            self.kls([r for t in tries.values() for r in t])

    def next_tries(self) -> dict[float, list[dict]]:
        """Per mark, the next untried points (lineages not picked yet) to fill its per_mark picks."""
        tries: dict[float, list[dict]] = {}
        for m, u in self.unders.items():
            fams = {lineage(r) for r in self.picks[m]}
            t = []
            while len(self.picks[m]) + len(t) < self.per_mark and self.seen[m] < min(len(u), 3 * self.per_mark):
                r = u[self.seen[m]]
                self.seen[m] += 1
                if lineage(r) not in fams | {lineage(x) for x in t}:
                    t.append(r)
            if t:
                tries[m] = t
        return tries

    def calibrate(self) -> None:
        """Rescale each mark's first tried point once towards ``CALIBRATE_MARGIN·m`` of confirmed KL (a new study
        trial, made once: a rerun finds it in the study); the rescaled edit leads the mark's picks if its confirmed
        KL stays under the mark. The rows, front, picks and other arms are then rebuilt from the study."""
        made = {(tr.user_attrs["refine_of"], tr.user_attrs["mark"]): tr.number for tr in all_trials(self.study)
                if tr.user_attrs.get("calibrated") and tr.values is not None}
        new: dict[float, int] = {}
        for m, u in self.unders.items():
            if not u or key(u[0]) not in self.cache:
                continue
            src, target = u[0], CALIBRATE_MARGIN * m
            kc = self.cache[key(src)]["kl"]
            if kc <= 0 or abs(kc / target - 1) <= CALIBRATE_TOL:
                continue
            k = (lineage(src), m)
            t = made[k] if k in made else self.scaled_trial(src, math.sqrt(target / kc),
                                                            {"refine_of": lineage(src), "mark": m, "calibrated": True})
            if t is not None:
                new[m] = t
        if not new:
            return
        self.rows = trial_rows(self.study)
        by = {r["trial"]: r for r in self.rows}
        self.front = [self.rows[i] for i in pareto_front([(r["proxy_refusal"], r["proxy_kl"]) for r in self.rows])]
        self.picks = {m: [by[r["trial"]] for r in p] for m, p in self.picks.items()}
        self.others = [by[r["trial"]] for r in self.others]
        self.plain = next((r for r in self.rows if r["warm_start"]), None)
        self.kls([by[t] for t in new.values()])
        for m, t in new.items():
            r = by[t]
            if self.cache[key(r)]["kl"] <= m:
                self.picks[m] = [r] + [p for p in self.picks[m] if lineage(p) != lineage(r)][: self.per_mark - 1]

    def scaled_trial(self, row: dict, a: float, attrs: dict) -> int | None:
        """Add ``row``'s edit with its strength times ``a`` as a study trial with user attrs ``attrs``; returns its
        number, or None when the scaled edit is the same (already at full strength)."""
        p = all_trials(self.study)[row["trial"]].params
        q = self.space.scaled_params(p, a)
        return None if q == p else run_trial(self.study, self.objective, q, attrs).number

    # ------------------------------------------------------------------ results
    def best_at(self, kmax: float) -> dict | None:
        """The confirmed trial with the fewest refusals (then the lowest KL) among those with confirmed KL ≤ kmax."""
        ok = [r for r in self.rows if "confirmed" in r and r["confirmed"]["kl"] <= kmax]
        if not ok:
            return None
        b = min(ok, key=lambda r: (r["confirmed"].get("refusals", 0), r["confirmed"]["kl"]))
        return {"trial": b["trial"], "refusals": b["confirmed"].get("refusals"),
                "refusals_paper": b["confirmed"].get("refusals_paper"), "kl": b["confirmed"]["kl"],
                "n": self.base()["n"]}

    def base(self) -> dict:
        """The base model's confirmation (KL 0 by definition; refusals only where it was generated)."""
        return self.cache.get("base") or {"kl": 0.0, "n_kl": len(self.harmless), "n": None}

    def summary(self, marks: list[float]) -> dict:
        """The summary's confirmation fields, in the summary's order; numbers the front points."""
        base = self.base()
        conf = [r for r in self.rows if "confirmed" in r]
        gen = [r for r in conf if "refusal" in r["confirmed"]] if "refusal" in base else []
        xs = [self.proxy.base_metric] + [r["proxy_refusal"] for r in gen]
        ys = [base.get("refusal")] + [r["confirmed"]["refusal"] for r in gen]
        kx = [0.0] + [r["proxy_kl"] for r in conf]
        ky = [base["kl"]] + [r["confirmed"]["kl"] for r in conf]
        for k, r in enumerate(self.front):
            r["point"] = k
        return {
            "proxy_prompts": {"harmful": self.proxy.nh, "harmless": len(self.proxy.prompts) - self.proxy.nh},
            "confirm_prompts": {"harmful": len(self.harmful) if "refusal" in base else 0,
                                "harmless": len(self.harmless), "max_new_tokens": self.max_new_tokens},
            "base": {"proxy_refusal": self.proxy.base_metric, "proxy_kl": 0.0, "confirmed": base},
            "plain": self.plain, "front": self.front, "trials": self.rows,
            "spearman_refusal": _spearman(xs, ys), "spearman_kl": _spearman(kx, ky), "n_confirmed": len(conf) + 1,
            "best_at_kl": {f"{m:g}": self.best_at(m) for m in sorted(marks)},
            "picks": {f"{m:g}": [r["trial"] for r in self.picks[m]] for m in self.unders},
        }


def _spearman(x: list[float], y: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(y)) < 2 or len(set(x)) < 2:
        return None
    return float(spearmanr(x, y).statistic)
