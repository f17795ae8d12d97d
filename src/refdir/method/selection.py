"""Choosing the refusal direction among the candidates (Arditi et al., §C).

Each candidate (position, layer) gets three scores on validation prompts:

- bypass: mean refusal metric on harmful prompts under ``ablate(r)`` (lower is better);
- induce: mean refusal metric on harmless prompts under ``add(r, layer, coeff)``;
- kl: mean KL(base ‖ ablated) of the next-token distribution at the last position, harmless prompts.

Filters (configurable): layer < ``max_layer_frac`` · L, kl ≤ ``kl_max``, and the induce rule.
The winner has the lowest bypass among the survivors.

The induce rule. The paper keeps candidates with induce > 0 (addition makes refusal more likely
than not). On small models this can remove every candidate (on the embedded Qwen 0.5B the best
induce is −0.36 from a harmless baseline of −3.7). ``induce_rule="auto"`` therefore applies the
paper's rule when any candidate passes it, and otherwise the *relative* rule: addition must raise
the harmless metric by at least ``induce_rel_frac`` of the gap between the harmful and harmless
baselines. The report states which rule decided.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from refdir.core.chat import ChatFormat
from refdir.core.directions import Candidates
from refdir.core.edits import Plan, hooked_rows
from refdir.core.forward import last_logits
from refdir.core.interventions import ablate, add
from refdir.errors import RefdirError
from refdir.method.scoring import first_token_kl, refusal_metric_from_logits

# the filter label of a finalist whose induce was not scored (lazy_induce): a candidate with a lower bypass won first
UNSCORED = "induce not scored (a lower bypass passed)"


@dataclass
class SelectionConfig:
    max_layer_frac: float = 0.8
    kl_max: float = 0.1
    induce_rule: str = "auto"  # "paper" (induce > 0), "relative", or "auto"
    induce_rel_frac: float = 0.5
    induce_coeff: float = 1.0
    min_layer: int = 0
    batch_size: int = 32
    # Screening: score bypass and KL of every candidate on `screen_n` prompts of each set, then
    # fully score (all val prompts, plus induce) the `top_k` best by screened bypass among those
    # with screened KL <= screen_kl_factor * kl_max. exhaustive=True fully scores every candidate.
    exhaustive: bool = False
    screen_n: int = 8
    top_k: int = 12
    screen_kl_factor: float = 2.0
    screen_group: int = 8  # candidates screened together in one batch (one plan per row group)
    # the screen's KL only as far as the finalists need it: every candidate's bypass first, then the KL in order of
    # screened bypass until ``top_k`` pass its bound (the same finalists; False: both for every candidate at once)
    lazy_kl: bool = True
    # the finalists' induce only where it can decide the winner: in order of bypass among those under the KL limit,
    # until one passes the induce rule (the same winner and rule; the others' induce is left unscored, NaN)
    lazy_induce: bool = False
    shared_prefix: bool = True
    # the plain reference path: no shared prefix, full logits, every candidate fully scored
    exact_reference: bool = False


@dataclass
class CandidateScore:
    position: int
    layer: int
    bypass: float
    induce: float
    kl: float
    filtered: list[str] = field(default_factory=list)
    bypass_screen: float = float("nan")
    kl_screen: float = float("nan")

    @property
    def ok(self) -> bool:
        return not self.filtered


@dataclass
class Selection:
    scores: list[CandidateScore]
    chosen: CandidateScore | None
    rule: str  # which induce rule decided
    baseline: dict  # harmful/harmless mean metrics
    filter_counts: dict
    config: dict

    def table(self) -> list[dict]:
        return [asdict(s) | {"ok": s.ok} for s in self.scores]

    def diagnostic(self, k: int = 5) -> str:
        lines = [f"{n} removed by {f}" for f, n in self.filter_counts.items()]
        best = sorted((s for s in self.scores if math.isfinite(s.bypass)), key=lambda s: s.bypass)[:k]
        lines.append("best rejected candidates (by bypass): " + "; ".join(
            f"pos {s.position} layer {s.layer}: bypass {s.bypass:.2f}, induce {s.induce:.2f}, kl {s.kl:.3f} "
            f"[{', '.join(s.filtered)}]" for s in best if s.filtered))
        return "\n".join(lines)


def max_layer(n_layers: int, frac: float) -> int:
    """The largest layer index a candidate may have under the filter layer < ``frac`` · L. Layers are 0..L-1, so
    ``frac`` ≥ 1 allows them all (L-1), never L: the search interpolates between adjacent layers and must stay in
    range."""
    return int(math.floor(frac * n_layers - 1e-9)) if frac < 1 else n_layers - 1


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise RefdirError(f"non-finite {name} scores (NaN/inf): the model or the direction is broken")


@dataclass
class _Scoring:
    """What every score of one selection shares: the model, its chat format, the refusal tokens and settings."""

    model: object
    fmt: ChatFormat
    refusal_ids: list[int]
    cfg: SelectionConfig
    n_layers: int

    def logits(self, prompts: list[str]) -> torch.Tensor:
        return last_logits(self.model, self.fmt, prompts, self.cfg.batch_size, shared_prefix=self.cfg.shared_prefix,
                           full_logits=self.cfg.exact_reference)

    def bypass_kl(self, r: torch.Tensor, hv: list[str], bv: list[str], base_logp: torch.Tensor) -> tuple[float, float]:
        """Mean refusal metric on ``hv`` and mean first-token KL on ``bv`` under ``ablate(r)``."""
        with ablate(self.model, r):
            lg = self.logits(hv + bv)
        b = float(refusal_metric_from_logits(lg[: len(hv)], self.refusal_ids).mean())
        return b, float(first_token_kl(base_logp, lg[len(hv):]).mean())

    def screen_many(self, rs: list[torch.Tensor], hv: list[str], bv: list[str],
                    base_logp: torch.Tensor) -> list[tuple[float, float]]:
        """bypass on ``hv`` and KL on ``bv`` of several candidates in one batch (either prompt list may be empty,
        its score then NaN): each ablation as its plain full edit (every write and the embedding projected; the
        same residual stream as ``ablate``), one plan per row group."""
        prompts = hv + bv
        with hooked_rows(self.model, [Plan.full(r, self.n_layers) for r in rs]) as rows:
            lg = last_logits(self.model, self.fmt, prompts * len(rs), self.cfg.batch_size,
                             shared_prefix=self.cfg.shared_prefix, rows=rows,
                             groups=[k for k in range(len(rs)) for _ in prompts])
        out = []
        nan = float("nan")
        for k in range(len(rs)):
            g = lg[k * len(prompts):(k + 1) * len(prompts)]
            out.append((float(refusal_metric_from_logits(g[: len(hv)], self.refusal_ids).mean()) if hv else nan,
                        float(first_token_kl(base_logp, g[len(hv):]).mean()) if bv else nan))
        return out


@torch.no_grad()
def score_candidates(model, fmt: ChatFormat, cands: Candidates, harmful_val: list[str], harmless_val: list[str],
                     refusal_ids: list[int], cfg: SelectionConfig | None = None, progress: bool = True,
                     base_logits: torch.Tensor | None = None) -> Selection:
    """Score the candidates (see the module docstring). ``base_logits``: the unedited model's last-position logits
    on ``harmful_val + harmless_val``, if the caller has them already."""
    cfg = cfg or SelectionConfig()
    if not harmful_val or not harmless_val:
        raise RefdirError("selection needs non-empty harmful and harmless validation sets")
    L = cands.n_layers
    if cfg.exact_reference:
        cfg.exhaustive, cfg.shared_prefix = True, False
    sc = _Scoring(model, fmt, refusal_ids, cfg, L)

    if base_logits is None:
        base_logits = sc.logits(harmful_val + harmless_val)
    elif base_logits.shape[0] != len(harmful_val) + len(harmless_val):
        raise RefdirError("base logits do not match the validation prompts")
    nh = len(harmful_val)
    base_metric = refusal_metric_from_logits(base_logits, refusal_ids)
    _check_finite("baseline", base_metric)
    base_logp = torch.log_softmax(base_logits[nh:].double(), -1)
    baseline = {"harmful": float(base_metric[:nh].mean()), "harmless": float(base_metric[nh:].mean())}

    scores, live = _live_candidates(cands, cfg, max_layer(L, cfg.max_layer_frac))
    finalists = live
    if not cfg.exhaustive and len(live) > cfg.top_k:
        finalists = _screen(sc, cands, live, harmful_val, harmless_val, base_logp, progress)

    def induce(s: CandidateScore) -> None:
        with add(model, cands.get(s.position, s.layer).vector, s.layer, cfg.induce_coeff):
            s.induce = float(refusal_metric_from_logits(sc.logits(harmless_val), refusal_ids).mean())
        if not math.isfinite(s.induce):
            raise RefdirError(f"non-finite induce score at position {s.position}, layer {s.layer}")

    bar = tqdm(finalists, desc="selection" + ("" if cfg.exhaustive else " (finalists)"), disable=not progress)
    for s in bar:
        s.bypass, s.kl = sc.bypass_kl(cands.get(s.position, s.layer).vector, harmful_val, harmless_val, base_logp)
        if not (math.isfinite(s.bypass) and math.isfinite(s.kl)):
            raise RefdirError(f"non-finite scores at position {s.position}, layer {s.layer}")
        if not cfg.lazy_induce:
            induce(s)
        bar.set_postfix(best=f"{min(f.bypass for f in finalists if math.isfinite(f.bypass)):.2f}")
    if cfg.lazy_induce:
        # the winner is the lowest bypass under the KL limit that passes the induce rule; under "auto" the paper's
        # rule holds as soon as any such candidate has induce > 0, and that one is then the winner
        passes = induce_threshold(baseline, cfg) if cfg.induce_rule == "relative" else 0.0
        for s in sorted((f for f in finalists if f.kl <= cfg.kl_max), key=lambda f: f.bypass):
            induce(s)
            if s.induce > passes:
                break
    return apply_filters(scores, baseline, cfg, L)


def _live_candidates(cands: Candidates, cfg: SelectionConfig,
                     last_layer: int) -> tuple[list[CandidateScore], list[CandidateScore]]:
    """A score row for every candidate from ``cfg.min_layer`` on, and those still to be scored: zero vectors
    and layers past ``last_layer`` are filtered out before any forward pass."""
    scores: list[CandidateScore] = []
    live: list[CandidateScore] = []
    norms = cands.vectors.norm(dim=-1)
    nan = float("nan")
    for p in cands.positions:
        for layer in range(cfg.min_layer, cands.n_layers):
            r = cands.get(p, layer).vector
            if not torch.isfinite(r).all():
                raise RefdirError(f"non-finite candidate at position {p}, layer {layer}")
            if float(r.norm()) <= 1e-6 * (1 + float(norms.max())):
                # e.g. layer 0 at template tokens: every prompt has the same embedding there
                scores.append(CandidateScore(p, layer, nan, nan, nan, ["zero vector"]))
            elif layer > last_layer:
                scores.append(CandidateScore(p, layer, nan, nan, nan, ["late layer"]))
            else:
                s = CandidateScore(p, layer, nan, nan, nan)
                scores.append(s)
                live.append(s)
    return scores, live


def _screen(sc: _Scoring, cands: Candidates, live: list[CandidateScore], harmful_val: list[str],
            harmless_val: list[str], base_logp: torch.Tensor, progress: bool) -> list[CandidateScore]:
    """Screened bypass and KL of the live candidates on the first ``screen_n`` prompts of each set; the
    finalists are the ``top_k`` lowest screened bypasses among those with a screened KL under the bound (all live
    candidates where none is under it). With ``lazy_kl`` every candidate's bypass comes first and the KL is
    screened in order of bypass until ``top_k`` candidates pass the bound: the same finalists for about half the
    screen's work (the KL is then NaN for the candidates never reached; the search reads only screened bypasses)."""
    cfg = sc.cfg
    n = cfg.screen_n
    hv, bv = harmful_val[:n], harmless_val[:n]
    blogp = base_logp[: len(bv)]
    bound = cfg.screen_kl_factor * cfg.kl_max
    bar = tqdm(total=len(live), desc="selection (screen)", disable=not progress)

    def run(group: list[CandidateScore], h: list[str], b: list[str]) -> None:
        """Screen ``group`` on ``h`` (bypass) and ``b`` (KL), either possibly empty (that score left as it is)."""
        res = sc.screen_many([cands.get(s.position, s.layer).vector for s in group], h, b, blogp)
        for s, (byp, kl) in zip(group, res, strict=True):
            if h:
                s.bypass_screen = byp
            if b:
                s.kl_screen = kl
            if (h and not math.isfinite(byp)) or (b and not math.isfinite(kl)):
                raise RefdirError(f"non-finite scores at position {s.position}, layer {s.layer}")

    # lazily, the bypass rows only first: twice the candidates in a batch for the same rows
    size = 2 * cfg.screen_group if cfg.lazy_kl else cfg.screen_group
    for j in range(0, len(live), size):
        run(live[j: j + size], hv, [] if cfg.lazy_kl else bv)
        bar.update(len(live[j: j + size]))
    bar.close()
    if cfg.lazy_kl:
        by_bypass = sorted(live, key=lambda s: s.bypass_screen)
        passed = 0
        for j in range(0, len(by_bypass), cfg.screen_group):
            if passed >= cfg.top_k:
                break
            chunk = by_bypass[j: j + cfg.screen_group]
            run(chunk, [], bv)
            passed += sum(s.kl_screen <= bound for s in chunk)
    pool = [s for s in live if s.kl_screen <= bound] or live
    finalists = sorted(pool, key=lambda s: s.bypass_screen)[: cfg.top_k]
    for s in live:
        if s not in finalists:
            s.filtered.append("screened out")
    return finalists


def induce_threshold(baseline: dict, cfg: SelectionConfig) -> float:
    """The relative induce rule's threshold: the harmless baseline raised by ``induce_rel_frac`` of the gap
    between the harmful and harmless baselines."""
    return baseline["harmless"] + cfg.induce_rel_frac * max(baseline["harmful"] - baseline["harmless"], 0.0)


def apply_filters(scores: list[CandidateScore], baseline: dict, cfg: SelectionConfig, n_layers: int) -> Selection:
    """Apply the filters and pick the winner; never crashes, never picks silently."""
    rel_threshold = induce_threshold(baseline, cfg)
    paper_ok = [s for s in scores if s.induce > 0]
    if cfg.induce_rule == "paper":
        rule = "paper: induce > 0"
    elif cfg.induce_rule == "relative":
        rule = f"relative: induce > {rel_threshold:.2f}"
    elif cfg.induce_rule == "auto":
        kl_ok_paper = [s for s in paper_ok if s.kl <= cfg.kl_max]
        rule = "paper: induce > 0" if kl_ok_paper else f"relative: induce > {rel_threshold:.2f}"
    else:
        raise RefdirError(f"unknown induce rule {cfg.induce_rule!r}")
    threshold = 0.0 if rule.startswith("paper") else rel_threshold
    counts = {"late layer": 0, f"kl > {cfg.kl_max}": 0, f"induce <= {threshold:.2f}": 0}
    pre = ("zero vector", "late layer", "screened out")
    counts.update({k: 0 for k in pre})
    for s in scores:
        if s.filtered and s.filtered[0] in pre:
            counts[s.filtered[0]] += 1
            continue
        s.filtered = []
        if not s.kl <= cfg.kl_max:
            s.filtered.append(f"kl > {cfg.kl_max}")
        if math.isnan(s.induce):
            if s.kl <= cfg.kl_max:  # lazy_induce: a lower bypass passed first
                s.filtered.append(UNSCORED)
        elif not s.induce > threshold:
            s.filtered.append(f"induce <= {threshold:.2f}")
        for f in s.filtered:
            counts[f] = counts.get(f, 0) + 1
    ok = [s for s in scores if s.ok]
    chosen = min(ok, key=lambda s: s.bypass) if ok else None
    return Selection(scores, chosen, rule, baseline, counts, asdict(cfg) | {"n_layers": n_layers})
