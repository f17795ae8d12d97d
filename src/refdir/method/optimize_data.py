"""The training data of RDO and cones (:mod:`refdir.method.optimize`): examples (rendered prompt ids with target
completion ids), their batch layout after the shared template prefix, and the losses taken at the target positions
(cross-entropy; the retain loss's KL over the base model's top-k tokens plus one bucket)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from refdir.core.forward import common_prefix_len
from refdir.errors import RefdirError

IGNORE = -100  # the target id of padding: no loss
BASE = ("base_ids", "base_logp", "base_rest")  # the retain loss's base distributions, per row (see Examples)


@dataclass
class Examples:
    """Prompts (token ids of the rendered prompt) with target completions (token ids), and for the retain loss the
    base model's top-k next-token log-probabilities at each target position (``base_ids`` / ``base_logp`` [T, K],
    ``base_rest`` [T]: log-probability of every other token)."""

    prompts: list[list[int]]
    targets: list[list[int]]
    base_ids: list[torch.Tensor] = field(default_factory=list)
    base_logp: list[torch.Tensor] = field(default_factory=list)
    base_rest: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.targets):
            raise RefdirError("prompts and targets differ in number")
        keep = [i for i, t in enumerate(self.targets) if t]  # an empty completion has nothing to train on
        self.prompts = [self.prompts[i] for i in keep]
        self.targets = [list(self.targets[i]) for i in keep]

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, idx: list[int]) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, target ids) of rows ``idx``, as :func:`layout` takes them."""
        return [(self.prompts[i], self.targets[i]) for i in idx]

    def base_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The base distributions as named tensors (``NAME.base_ids.ROW`` ...), for a cache file."""
        return {f"{name}.{a}.{i}": t for a in BASE for i, t in enumerate(getattr(self, a))}

    def set_base(self, tensors: dict, name: str) -> None:
        """Take the base distributions from :meth:`base_tensors`'s dict; a RefdirError unless it holds each row's,
        one entry per target token."""
        rows = {a: [tensors.get(f"{name}.{a}.{i}") for i in range(len(self))] for a in BASE}
        for i, t in enumerate(self.targets):
            ids, logp, rest = (rows[a][i] for a in BASE)
            fits = (all(isinstance(x, torch.Tensor) for x in (ids, logp, rest)) and ids.dtype == torch.long
                    and ids.dim() == 2 and ids.shape == logp.shape and tuple(rest.shape) == (len(t),) == ids.shape[:1])
            if not fits:
                raise RefdirError(f"no base distribution of {name} row {i} fits its {len(t)} target tokens")
        self.base_ids, self.base_logp, self.base_rest = (rows[a] for a in BASE)


def targets_fit(targets, counts: dict[str, int], n_vocab: int) -> bool:
    """Whether ``targets`` (read back from a cache) holds, for each kind in ``counts``, that many completions of
    token ids in a vocabulary of ``n_vocab``."""
    return isinstance(targets, dict) and all(
        isinstance(targets.get(k), list) and len(targets[k]) == n
        and all(isinstance(t, list) and all(type(i) is int and 0 <= i < n_vocab for i in t) for t in targets[k])
        for k, n in counts.items())


@dataclass
class TrainSet:
    """The three losses' examples: harmful → compliant (ablation), harmless → refusal (addition), harmless → base
    completion with base distributions (retain)."""

    harmful: Examples
    refuse: Examples
    retain: Examples

    def sizes(self) -> dict:
        return {"harmful": len(self.harmful), "refuse": len(self.refuse), "retain": len(self.retain)}


@dataclass
class Layout:
    """A batch laid out as ``prefix + pad… + prompt tail + target + pad…``: prompt ends aligned, so the logits at
    the last ``T + 1`` columns (less the last) predict the targets. ``targets`` [b, T] holds IGNORE at padding."""

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    targets: torch.Tensor


def layout(rows: list[tuple[list[int], list[int]]], k: int, pad: int) -> Layout:
    """Lay out (prompt ids, target ids) rows after a shared ``k``-token prefix (k = 0: no prefix)."""
    tails = [p[k:] for p, _ in rows]
    P, T = max(len(t) for t in tails), max(len(t) for _, t in rows)
    b = len(rows)
    ids = torch.full((b, P + T), pad, dtype=torch.long)
    mask = torch.zeros(b, k + P + T, dtype=torch.long)
    mask[:, :k] = 1
    pos = torch.zeros(b, P + T, dtype=torch.long)
    tgt = torch.full((b, T), IGNORE, dtype=torch.long)
    for j, (tail, (_, t)) in enumerate(zip(tails, rows, strict=True)):
        s = P - len(tail)
        ids[j, s:P] = torch.tensor(tail)
        ids[j, P:P + len(t)] = torch.tensor(t)
        mask[j, k + s:k + P + len(t)] = 1
        pos[j, s:] = torch.arange(k, k + P + T - s)
        tgt[j, :len(t)] = torch.tensor(t)
    return Layout(ids, mask, pos, tgt)


def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the real target tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


def pad_stack(ts: list[torch.Tensor], T: int, fill: float) -> torch.Tensor:
    out = torch.full((len(ts), T, *ts[0].shape[1:]), fill, dtype=ts[0].dtype)
    for j, t in enumerate(ts):
        out[j, :t.shape[0]] = t
    return out


def kl_topk(logits: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor,
            rest: torch.Tensor) -> torch.Tensor:
    """Mean KL(base ‖ edited) over the real target positions, both distributions coarsened to the base's top-k
    tokens (``ids`` / ``logp`` [b, T, K]) plus one bucket for every other token (base log-mass ``rest`` [b, T])."""
    lse = torch.logsumexp(logits, -1)
    logq = logits.gather(-1, ids) - lse[..., None]
    # clamped: an empty rest bucket (k = vocab) has log-mass -inf on both sides and contributes 0
    logq_rest = (torch.logsumexp(logits.scatter(-1, ids, float("-inf")), -1) - lse).clamp(min=-80.0)
    kl = (logp.exp() * (logp - logq)).sum(-1) + rest.exp() * (rest - logq_rest)
    valid = targets != IGNORE
    return kl[valid].mean()


def shared_prefix(sets: list[TrainSet]) -> list[int]:
    """The token prefix every prompt of ``sets`` shares (each keeping one token of its own); [] if under 2."""
    rows = [p for s in sets for ex in (s.harmful, s.refuse, s.retain) for p in ex.prompts]
    k = common_prefix_len(rows) if rows else 0
    return rows[0][:k] if k >= 2 else []
