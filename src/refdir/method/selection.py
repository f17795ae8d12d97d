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
        """bypass and KL of several candidates in one batch: each ablation as its plain full edit (every write
        and the embedding projected; the same residual stream as ``ablate``), one plan per row group."""
        prompts = hv + bv
        with hooked_rows(self.model, [Plan.full(r, self.n_layers) for r in rs]) as rows:
            lg = last_logits(self.model, self.fmt, prompts * len(rs), self.cfg.batch_size,
                             shared_prefix=self.cfg.shared_prefix, rows=rows,
                             groups=[k for k in range(len(rs)) for _ in prompts])
        out = []
        for k in range(len(rs)):
            g = lg[k * len(prompts):(k + 1) * len(prompts)]
            out.append((float(refusal_metric_from_logits(g[: len(hv)], self.refusal_ids).mean()),
                        float(first_token_kl(base_logp, g[len(hv):]).mean())))
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
    bar = tqdm(finalists, desc="selection" + ("" if cfg.exhaustive else " (finalists)"), disable=not progress)
    for s in bar:
        r = cands.get(s.position, s.layer).vector
        s.bypass, s.kl = sc.bypass_kl(r, harmful_val, harmless_val, base_logp)
        with add(model, r, s.layer, cfg.induce_coeff):
            s.induce = float(refusal_metric_from_logits(sc.logits(harmless_val), refusal_ids).mean())
        if not all(math.isfinite(x) for x in (s.bypass, s.kl, s.induce)):
            raise RefdirError(f"non-finite scores at position {s.position}, layer {s.layer}")
        bar.set_postfix(best=f"{min(f.bypass for f in finalists if math.isfinite(f.bypass)):.2f}")
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
    """Screened bypass and KL of every live candidate on the first ``screen_n`` prompts of each set; the
    finalists are the ``top_k`` lowest screened bypasses among those with a screened KL under the bound."""
    cfg = sc.cfg
    n = cfg.screen_n
    hv, bv = harmful_val[:n], harmless_val[:n]
    blogp = base_logp[: len(bv)]
    bar = tqdm(total=len(live), desc="selection (screen)", disable=not progress)
    for j in range(0, len(live), cfg.screen_group):
        group = live[j : j + cfg.screen_group]
        res = sc.screen_many([cands.get(s.position, s.layer).vector for s in group], hv, bv, blogp)
        for s, (b, k) in zip(group, res, strict=True):
            s.bypass_screen, s.kl_screen = b, k
            if not (math.isfinite(b) and math.isfinite(k)):
                raise RefdirError(f"non-finite scores at position {s.position}, layer {s.layer}")
        bar.update(len(group))
    bar.close()
    pool = [s for s in live if s.kl_screen <= cfg.screen_kl_factor * cfg.kl_max] or live
    finalists = sorted(pool, key=lambda s: s.bypass_screen)[: cfg.top_k]
    for s in live:
        if s not in finalists:
            s.filtered.append("screened out")
    return finalists


def apply_filters(scores: list[CandidateScore], baseline: dict, cfg: SelectionConfig, n_layers: int) -> Selection:
    """Apply the filters and pick the winner; never crashes, never picks silently."""
    gap = baseline["harmful"] - baseline["harmless"]
    rel_threshold = baseline["harmless"] + cfg.induce_rel_frac * max(gap, 0.0)
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
        if not s.induce > threshold:
            s.filtered.append(f"induce <= {threshold:.2f}")
        for f in s.filtered:
            counts[f] += 1
    ok = [s for s in scores if s.ok]
    chosen = min(ok, key=lambda s: s.bypass) if ok else None
    return Selection(scores, chosen, rule, baseline, counts, asdict(cfg) | {"n_layers": n_layers})
