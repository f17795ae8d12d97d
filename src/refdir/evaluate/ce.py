"""Cross-entropy loss and multi-token KL of one model (or one arm) on token sequences.

Cross-entropy loss follows the paper's three definitions, each a token-weighted mean in nats:

- ``text``: general text without a chat template, truncated to a fixed number of tokens, loss on every token
  after the first;
- ``pairs``: instruction + response pairs under the chat template, loss on the response tokens only;
- ``ondist``: the base model's own greedy completions on harmless prompts, loss on the completion tokens only.

KL(base ‖ arm) on harmless prompts: at the first answer position (``kl_first``, the selection stage's KL), and
averaged over the first ``kl_tokens`` positions of the base model's greedy continuation (``kl_multi``), since the
first token alone under-reports damage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from refdir.core.chat import ChatFormat
from refdir.errors import RefdirError

CE_SETS = ("text", "pairs", "ondist")


@dataclass
class Seq:
    ids: list[int]
    start: int  # first target index: the loss covers ids[start:]


def text_seqs(tokenizer, texts: list[str], max_tokens: int = 256) -> list[Seq]:
    """Plain texts (no chat template), truncated to ``max_tokens``; the loss covers every token after the first."""
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True)["input_ids"][:max_tokens]
        if len(ids) >= 2:
            out.append(Seq(ids, 1))
    return out


def prompt_seqs(fmt: ChatFormat, prompts: list[str], targets: list[list[int]]) -> list[Seq]:
    """Chat-formatted prompt followed by target token ids (possibly empty: first position only)."""
    out = []
    for p, t in zip(prompts, targets, strict=True):
        pre = fmt.prompt_ids(p)
        out.append(Seq(pre + list(t), len(pre)))
    return out


@torch.no_grad()
def _logprobs(model, seq: Seq, n_pos: int | None = None) -> torch.Tensor:
    """log-softmax (float32) at the positions that predict ``ids[start:]`` ([max(1, T), vocab]); with no
    targets, the one position after the prompt. ``n_pos`` keeps only the first positions."""
    dev = next(model.parameters()).device
    n_t = max(1, len(seq.ids) - seq.start)
    if n_pos is not None:
        n_t = min(n_t, n_pos)
    logits = model(input_ids=torch.tensor([seq.ids], device=dev), use_cache=False).logits[0]
    return torch.log_softmax(logits[seq.start - 1: seq.start - 1 + n_t].float(), -1).cpu()


@torch.no_grad()
def cross_entropy(model, seqs: list[Seq], desc: str = "CE") -> float:
    """Token-weighted mean negative log-likelihood of the targets, in nats."""
    total, n = 0.0, 0
    for s in tqdm(seqs, desc=desc, leave=False):
        tgt = s.ids[s.start:]
        if not tgt:
            continue
        lp = _logprobs(model, s)
        total += -lp[torch.arange(len(tgt)), torch.tensor(tgt)].double().sum().item()
        n += len(tgt)
    if n == 0:
        raise RefdirError("no target tokens to compute a cross-entropy loss on")
    return total / n


@dataclass
class OnDist:
    """The on-distribution pass of one arm: CE on the base continuation and KL(base ‖ arm) along it."""

    ce: float
    kl_first: float
    kl_multi: float
    kl_per_position: list[float]
    ref: list[torch.Tensor] | None = None  # the base model's log-probs (float32), kept from the reference pass


@torch.no_grad()
def ondist_pass(model, seqs: list[Seq], kl_tokens: int, ref: list[torch.Tensor] | None = None,
                desc: str = "on-distribution") -> OnDist:
    """One forward per sequence: CE on all completion tokens, KL against ``ref`` on the first ``kl_tokens``
    positions. Without ``ref`` (the base model itself) the log-probs are returned as the reference."""
    total, n = 0.0, 0
    keep, kls = [], []
    for i, s in enumerate(tqdm(seqs, desc=desc, leave=False)):
        lp = _logprobs(model, s)
        tgt = s.ids[s.start:]
        if tgt:
            total += -lp[torch.arange(len(tgt)), torch.tensor(tgt)].double().sum().item()
            n += len(tgt)
        head = lp[:kl_tokens]
        if ref is None:
            keep.append(head)
            kls.append(torch.zeros(head.shape[0], dtype=torch.float64))
        else:
            base = ref[i]
            m = min(base.shape[0], head.shape[0])
            kls.append((base[:m].exp() * (base[:m] - head[:m])).sum(-1).double().clamp_min(0))
    ce = total / n if n else float("nan")
    first = float(torch.stack([k[0] for k in kls]).mean())
    multi = float(torch.stack([k.mean() for k in kls]).mean())
    width = max(k.shape[0] for k in kls)
    per_pos = []
    for j in range(width):
        vals = [float(k[j]) for k in kls if k.shape[0] > j]
        per_pos.append(sum(vals) / len(vals))
    return OnDist(ce, first, multi, per_pos, keep if ref is None else None)
