"""Refusal objectives from last-position logits that track whether the model refuses when it generates.

Today's metric (:func:`refdir.method.scoring.refusal_metric_from_logits`) averages the log-odds of a few refusal
tokens over prompts. Two things make it a poor stand-in for generated refusal: the token set is derived from the
model's first tokens only (often just "I"), and the mean log-odds is dominated by prompts the model already
answers, whose log-odds can fall from −10 to −20 without any change in what the model generates.

This module gives

- :func:`derive_refusal_starts`: the tokens this model starts its refusals with, taken from short greedy
  completions of harmful prompts that a judge flags, minus tokens that also commonly start harmless answers
  (so "To", "Sure", "Here" from answer-then-refuse completions do not count as refusal), with the first-two-token
  prefixes recorded as evidence;
- :class:`RefusalObjective`: a named objective over a token set with its parameters, serialisable to JSON;
- :func:`objective_from_logits`: its per-prompt value from the last-position logits (one forward pass per prompt,
  so a search can afford it). Higher means more refusal for every objective, as for today's metric.

Objectives (``p`` is the summed probability of the token set at the first answer position):

- ``logodds``: ``log(p + eps) − log(1 − p + eps)``, today's formula;
- ``prob``: ``p``; its mean over prompts is a soft count of first-token refusals, bounded per prompt, so no prompt
  dominates;
- ``capped_logodds``: the log-odds clamped to ``[−cap, cap]`` (default 3, i.e. p in about [0.05, 0.95]): prompts far
  from the decision count no more than ones near it.

:func:`prompt_weights` and :func:`weighted_mean` give the per-prompt weighting towards the prompts the base model
refuses (weights from the base model's own values).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from refdir.core.chat import ChatFormat
from refdir.core.forward import last_logits
from refdir.core.generation import generate
from refdir.errors import RefdirError
from refdir.method.refusal_judge import judge

EPS = 1e-8
OBJECTIVES = ("logodds", "prob", "capped_logodds")
DEFAULT_PARAMS = {"logodds": {}, "prob": {}, "capped_logodds": {"cap": 3.0}}


@dataclass
class RefusalObjective:
    """Which objective (one of ``OBJECTIVES``), over which token ids, with which parameters."""

    name: str
    token_ids: list[int]
    params: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise RefdirError(f"unknown refusal objective {self.name!r}; choose one of {', '.join(OBJECTIVES)}")
        if not self.token_ids:
            raise RefdirError("a refusal objective needs at least one token id")
        self.token_ids = sorted({int(t) for t in self.token_ids})
        self.params = {**DEFAULT_PARAMS[self.name], **{k: float(v) for k, v in self.params.items()}}
        unknown = set(self.params) - set(DEFAULT_PARAMS[self.name])
        if unknown:
            raise RefdirError(f"objective {self.name!r} takes no parameter {', '.join(sorted(unknown))}")
        if self.name == "capped_logodds" and not self.params["cap"] > 0:
            raise RefdirError(f"capped_logodds needs cap > 0, got {self.params['cap']}")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> RefusalObjective:
        try:
            return cls(str(d["name"]), list(d["token_ids"]), dict(d.get("params", {})))
        except (KeyError, TypeError, ValueError) as ex:
            raise RefdirError(f"not a refusal objective: {ex}") from ex

    @classmethod
    def from_json(cls, text: str) -> RefusalObjective:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as ex:
            raise RefdirError(f"not a refusal objective: {ex}") from ex
        if not isinstance(d, dict):
            raise RefdirError("not a refusal objective: expected a JSON object")
        return cls.from_dict(d)


def refusal_prob(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Summed probability of ``token_ids`` per row, in float64 (logits [N, vocab])."""
    if logits.dim() != 2:
        raise RefdirError(f"expected last-position logits [N, vocab], got shape {tuple(logits.shape)}")
    if max(token_ids) >= logits.shape[-1] or min(token_ids) < 0:
        raise RefdirError(f"refusal token ids outside the vocabulary of size {logits.shape[-1]}")
    return torch.softmax(logits.to(torch.float64), dim=-1)[:, token_ids].sum(-1)


def objective_from_logits(logits: torch.Tensor, spec: RefusalObjective) -> torch.Tensor:
    """The objective per row (float32 [N]), higher = more refusal."""
    p = refusal_prob(logits, spec.token_ids)
    if spec.name == "prob":
        v = p
    else:
        v = torch.log(p + EPS) - torch.log(1 - p + EPS)
        if spec.name == "capped_logodds":
            cap = spec.params["cap"]
            v = v.clamp(-cap, cap)
    return v.to(torch.float32)


def objective(model, fmt: ChatFormat, instructions: list[str], spec: RefusalObjective, batch_size: int = 16,
              shared_prefix: bool = True) -> torch.Tensor:
    """The objective per prompt under whatever edit is hooked around the call."""
    return objective_from_logits(last_logits(model, fmt, instructions, batch_size, shared_prefix=shared_prefix), spec)


def prompt_weights(base_values: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """Weights that sum to 1, proportional to the base model's ``prob`` values (how likely it refuses each
    prompt), never below ``floor`` before normalising; uniform when the base refuses nothing."""
    w = base_values.to(torch.float64).clamp(min=0.0) + floor
    if not torch.isfinite(w).all():
        raise RefdirError("prompt weights need finite base values")
    total = w.sum()
    if total <= 0:
        return torch.full_like(w, 1.0 / max(1, w.numel()))
    return w / total


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> float:
    """Weighted mean of per-prompt values (weights from :func:`prompt_weights`)."""
    if values.shape != weights.shape:
        raise RefdirError(f"values {tuple(values.shape)} and weights {tuple(weights.shape)} differ in shape")
    return float((values.to(torch.float64) * weights.to(torch.float64)).sum() / weights.sum())


@torch.no_grad()
def derive_refusal_starts(model, fmt: ChatFormat, harmful: list[str], harmless: list[str], *,
                          n_prompts: int = 64, max_new_tokens: int = 16, judge_kind: str = "broad",
                          min_count: int = 2, max_harmless_share: float = 0.05, min_mean_prob: float = 0.02,
                          min_ratio_harmless: float = 2.0, min_ratio_answered: float = 1.5, batch_size: int = 32,
                          progress: bool = False) -> tuple[list[int], dict]:
    """The tokens this model starts refusals with, from up to ``n_prompts`` harmful and harmless prompts.

    Greedy-generate ``max_new_tokens`` on the harmful prompts and let ``judge_kind`` flag the refusals. Two routes
    keep a token, and the result is their union:

    - *greedy*: at least ``min_count`` flagged completions (or one, with fewer refusals) start with it, and it is
      the greedy first token of at most ``max_harmless_share`` of the harmless prompts;
    - *soft*: its mean first-position probability over the refused prompts is at least ``min_mean_prob`` and at
      least ``min_ratio_harmless`` times its mean over the harmless prompts and ``min_ratio_answered`` times its
      mean over the harmful prompts the model answered. Greedy decoding shows almost only "I"; this route finds
      the runner-up refusal starts ("As", "Sorry", "Unfortunately") that take over when an edit weakens "I",
      while tokens that start answers as often ("To", "Sure", "Creating") stay out.

    Returns (ids, JSON-able evidence: counts of first tokens and first two tokens of refusals, the harmless
    starts, each soft candidate's three mean probabilities)."""
    prompts = harmful[:n_prompts]
    if not prompts or not harmless:
        raise RefdirError("deriving refusal starts needs harmful and harmless prompts")
    outs = generate(model, fmt, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                    desc="refusal starts", return_ids=True, shared_prefix=True)
    flags = torch.tensor(judge([t for t, _ in outs], judge_kind).flags)
    if not flags.any():
        raise RefdirError("the model refused none of the harmful prompts used to find its refusal starts; "
                          "pass the refusal tokens explicitly")
    p_harmful = torch.softmax(last_logits(model, fmt, prompts, batch_size, shared_prefix=True).double(), -1)
    p_harmless = torch.softmax(last_logits(model, fmt, harmless[:n_prompts], batch_size, shared_prefix=True).double(),
                               -1)
    greedy, ev = _greedy_starts(outs, flags.tolist(), p_harmless.argmax(-1).tolist(), min_count, max_harmless_share)
    mean_ref = p_harmful[flags].mean(0)
    mean_ans = p_harmful[~flags].mean(0) if (~flags).any() else torch.zeros_like(mean_ref)
    mean_harmless = p_harmless.mean(0)
    soft = [int(t) for t in torch.nonzero((mean_ref >= min_mean_prob) & (mean_ref >= min_ratio_harmless * mean_harmless)
                                          & (mean_ref >= min_ratio_answered * mean_ans)).flatten()]
    keep = sorted(set(greedy) | set(soft))
    if not keep:
        raise RefdirError("every token that starts this model's refusals also starts its answers; "
                          "pass the refusal tokens explicitly")
    dec = fmt.tokenizer.decode
    top = mean_ref.topk(min(12, mean_ref.numel())).indices.tolist()
    ev |= {
        "n_prompts": len(prompts), "n_harmless": min(n_prompts, len(harmless)), "judge": judge_kind,
        "max_new_tokens": max_new_tokens,
        "first_tokens": {dec([t]): c for t, c in ev.pop("first_tokens").items()},
        "first_two_tokens": {dec(list(p)): c for p, c in ev.pop("first_two_tokens")},
        "harmless_first_tokens": {dec([t]): c for t, c in ev.pop("harmless_first_tokens").items()},
        "mean_prob": {dec([t]): {"refused": round(float(mean_ref[t]), 4), "answered": round(float(mean_ans[t]), 4),
                                 "harmless": round(float(mean_harmless[t]), 4)} for t in top},
        "greedy": [dec([t]) for t in greedy], "soft": [dec([t]) for t in soft],
        "kept": [dec([t]) for t in keep], "ids": keep,
    }
    return keep, ev


def _greedy_starts(outs: list, flags: list[bool], harmless_top: list[int], min_count: int,
                   max_harmless_share: float) -> tuple[list[int], dict]:
    """First tokens of the flagged completions that start few harmless answers; raw counts as evidence."""
    firsts, pairs = Counter(), Counter()
    for (_text, ids), refused in zip(outs, flags, strict=True):
        if refused and ids:
            firsts[ids[0]] += 1
            pairs[tuple(ids[:2])] += 1
    harmless_firsts = Counter(int(t) for t in harmless_top)
    need = min(min_count, sum(firsts.values()))
    keep = sorted(t for t, c in firsts.items()
                  if c >= need and harmless_firsts[t] <= max_harmless_share * len(harmless_top))
    ev = {"n_refusals": sum(flags), "first_tokens": dict(firsts.most_common()),
          "first_two_tokens": pairs.most_common(12), "harmless_first_tokens": dict(harmless_firsts.most_common(10))}
    return keep, ev
