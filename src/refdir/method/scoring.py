"""The refusal metric and refusal tokens.

The metric is the log-odds of the summed probability of the refusal tokens at the first answer
position: ``log(p + eps) − log(1 − p + eps)``, eps = 1e-8. The refusal tokens are derived per
tokenizer: greedy-generate a few tokens on harmful prompts, keep the completions that a
refusal judge flags, and take their first tokens (the paper's hand list for Qwen is 'I', 'As').
The edit's cost is the first-token KL(base ‖ edited) on harmless prompts (:func:`first_token_kl`).
"""

from __future__ import annotations

from collections import Counter

import torch

from refdir.core.chat import ChatFormat
from refdir.core.forward import last_logits
from refdir.core.generation import generate
from refdir.errors import RefdirError
from refdir.method.refusal_judge import is_refusal, refusal_settled

EPS = 1e-8


def refusal_metric_from_logits(logits: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """Log-odds of the refusal tokens' summed probability, per row."""
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    p = probs[:, refusal_ids].sum(-1)
    m = torch.log(p + EPS) - torch.log(1 - p + EPS)
    return m.to(torch.float32)


def refusal_metric(model, fmt, instructions, refusal_ids, batch_size=16, progress=False) -> torch.Tensor:
    return refusal_metric_from_logits(last_logits(model, fmt, instructions, batch_size, progress), refusal_ids)


def tokens_from_strings(tokenizer, strings: list[str]) -> list[int]:
    """First token of each string as the model would start an answer with it."""
    ids = []
    for s in strings:
        t = tokenizer(s, add_special_tokens=False)["input_ids"]
        if not t:
            raise RefdirError(f"refusal token string {s!r} encodes to nothing")
        ids.append(t[0])
    return sorted(set(ids))


@torch.no_grad()
def derive_refusal_tokens(model, fmt: ChatFormat, harmful: list[str], *, n_prompts: int = 32,
                          max_new_tokens: int = 12, batch_size: int = 16, min_share: float = 0.1,
                          progress: bool = True) -> tuple[list[int], dict]:
    """Find the tokens this model starts its refusals with.

    Greedy-generate ``max_new_tokens`` on up to ``n_prompts`` harmful prompts, keep completions the
    substring judge flags, and take the first token of each; tokens that start at least
    ``min_share`` of the refusals are kept. Returns (ids, evidence).
    """
    prompts = harmful[:n_prompts]
    outs = generate(model, fmt, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    progress=progress, desc="refusal tokens", return_ids=True, shared_prefix=True,
                    decided=refusal_settled)  # a settled refusal has its first token and its verdict
    firsts = Counter()
    n_ref = 0
    for text, ids in outs:
        if is_refusal(text) and ids:
            n_ref += 1
            firsts[ids[0]] += 1
    if n_ref == 0:
        raise RefdirError(
            "the model refused none of the harmful prompts used to find its refusal tokens; "
            "pass them explicitly with --refusal-tokens (e.g. 'I,As')"
        )
    keep = sorted(t for t, c in firsts.items() if c >= min_share * n_ref)
    evidence = {
        "n_prompts": len(prompts), "n_refusals": n_ref,
        "first_tokens": {fmt.tokenizer.decode([t]): c for t, c in firsts.most_common()},
        "kept": [fmt.tokenizer.decode([t]) for t in keep],
    }
    return keep, evidence


# a run warns when the model refused fewer than this share of the harmful prompts its refusal tokens come from
LITTLE_REFUSAL = 0.25


def little_refusal(evidence: dict, min_share: float = LITTLE_REFUSAL) -> str | None:
    """The warning for a model that hardly refuses, read from :func:`derive_refusal_tokens`' evidence: under
    ``min_share`` of its harmful prompts refused (SmolLM2-135M-Instruct: 2 of 32), an edit has little refusal to
    remove and its refusal rates say little. None when it refused enough, or for tokens the user gave."""
    n, k = evidence.get("n_prompts"), evidence.get("n_refusals")
    if not n or k is None or k >= min_share * n:
        return None
    return (f"the model refused only {k} of {n} harmful train prompts when generating (the refusal-token probe): "
            "there is little refusal to remove, and the refusal rates below say little about the edit")


def first_token_kl(base_logp: torch.Tensor, logits: torch.Tensor, chunk: int = 16, *,
                   base_logits: bool = False) -> torch.Tensor:
    """KL(base ‖ edited) of the next-token distribution, per row: ``base_logp`` is the unedited model's
    log-softmax (float64), ``logits`` the edited model's [N, vocab]; the softmax is taken in float64, the result is
    float32. ``chunk`` rows at a time: each float64 temporary of a 150k vocabulary is 1.2 MB per row, and the
    formula makes four of them (~500 MB for 100 rows at once). ``base_logits``: ``base_logp`` holds the base
    model's logits instead, and its log-softmax is taken chunk by chunk too (the same numbers, without a whole
    [N, vocab] float64 tensor: for a base compared with one or two edits; one reused against many is better
    given as log-probabilities once)."""
    if base_logp.shape != logits.shape:
        raise ValueError(f"first_token_kl: base {tuple(base_logp.shape)} and edited {tuple(logits.shape)} differ")
    out = []
    for i in range(0, logits.shape[0], chunk):
        b = base_logp[i:i + chunk]
        if base_logits:
            b = torch.log_softmax(b.double(), -1)
        logq = torch.log_softmax(logits[i:i + chunk].double(), -1)
        out.append((b.exp() * (b - logq)).sum(-1).float())
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)
