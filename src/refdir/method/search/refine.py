"""Strength refinement of the front towards each KL mark.

TPE samples the edit space sparsely; near a KL budget the front improves most cheaply by taking a front edit and
scaling its strength until its proxy KL sits just under the budget (KL grows about as the square of the strength).
"""

from __future__ import annotations

import math

from tqdm.auto import tqdm

from refdir.core.edits import COMPONENTS
from refdir.method.search.objective import Space, pareto_front
from refdir.method.search.study import all_trials, front_postfix, run_trial, spent_seconds, trial_estimate

REFINE_MARGIN = 0.9  # aim under each KL mark: the confirmation prompts' KL differs from the proxy's by a few %
REFINE_TOL = 0.1  # relative KL error at which a scaled edit counts as on target


def refinable(tr, target: float, space: Space) -> bool:
    """A refinement source for KL ``target``: within a factor 8 of it, not on it already, and scalable towards it."""
    kl0 = tr.values[1]
    if kl0 <= 0 or abs(math.log(kl0 / target)) >= math.log(8) or abs(kl0 / target - 1) <= REFINE_TOL:
        return False
    return not (kl0 < target and all(tr.params[f"{c}_peak"] >= space.max_strength for c in COMPONENTS))


def refine_front(study, objective, space: Space, marks: list[float], per_mark: int = 3,
                 progress: bool = True, budget: float | None = None) -> int:
    """Strength refinement towards each KL mark. For each mark ``m``, the (up to) ``per_mark`` front points nearest
    to ``REFINE_MARGIN·m`` in log KL (within a factor 8), leaving out those already within ``REFINE_TOL`` of it,
    those refined for this mark before and full-strength ones below it (and, where the space has optimized
    directions, the nearest such point of each direction not among them), are scaled by ``a = sqrt(0.9·m / KL)``, then
    once more by a secant step in log–log if the first try misses by more than ``REFINE_TOL``. Every scaled edit is
    a study trial (user attrs ``refine_of``, ``mark``); sources come from the searched (not refined) trials, and a
    (point, mark) pair refined before, e.g. in an interrupted run, is not redone. With a ``budget`` (seconds, see
    :func:`refdir.method.search.study.spent_seconds`) a refinement that would not fit is left out. Returns the
    number of trials added."""
    import optuna

    added = 0
    bar = tqdm(total=per_mark * len(marks) * len(space.directions), desc="refine", disable=not progress, leave=False)
    for m in marks:
        target = REFINE_MARGIN * m
        trs = [tr for tr in all_trials(study) if tr.state == optuna.trial.TrialState.COMPLETE]
        done = {(tr.user_attrs["refine_of"], tr.user_attrs["mark"]) for tr in trs if "refine_of" in tr.user_attrs}
        trs = [tr for tr in trs if "refine_of" not in tr.user_attrs]  # sources: the front of the searched trials
        front = [trs[i] for i in pareto_front([(tr.values[0], tr.values[1]) for tr in trs])]
        # a source refined before (an interrupted run) keeps its slot, so a rerun picks the same sources
        ok = sorted((tr for tr in front if (tr.number, m) in done or refinable(tr, target, space)),
                    key=lambda tr: abs(math.log(tr.values[1] / target)))
        near = ok[:per_mark]
        # with several direction sources, each one's nearest front point gets its scaling too
        for d in space.directions[1:]:
            if not any(tr.params.get("direction") == d for tr in near):
                near += [tr for tr in ok if tr.params.get("direction") == d][:1]
        for src in near:
            bar.update(1)
            if (src.number, m) in done:
                continue
            if budget is not None and spent_seconds(study) + 2 * trial_estimate(study) > budget:
                break  # a refinement is up to two trials; the time budget has no room for them
            added += _refine_one(study, objective, space, src, m, target)
            bar.set_postfix_str(front_postfix(study, marks))
    bar.close()
    return added


def _refine_one(study, objective, space: Space, src, m: float, target: float) -> int:
    """Scale trial ``src`` towards proxy KL ``target`` (mark ``m``): one square-root step, then a secant step if it
    missed. Returns the number of trials added (1 or 2)."""
    kl0 = src.values[1]
    a = math.sqrt(target / kl0)
    attrs = {"refine_of": src.number, "mark": m}
    _, kl1 = run_trial(study, objective, space.scaled_params(src.params, a), attrs).values
    if abs(kl1 / target - 1) > REFINE_TOL and kl1 > 0 and abs(math.log(a)) > 1e-3:
        slope = math.log(kl1 / kl0) / math.log(a)
        if slope > 0.2:
            a2 = math.exp(math.log(a) + math.log(target / kl1) / slope)
            run_trial(study, objective, space.scaled_params(src.params, a2), attrs)
            return 2
    return 1
