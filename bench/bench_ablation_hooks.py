"""Do the ablation hooks compute what the orthogonalized checkpoint computes, on a real model?

`refdir run --method paper` selects and evaluates its direction with :func:`refdir.core.interventions.ablate`, then
ships :func:`refdir.core.orthogonalize.orthogonalize_`'s weights; `refdir eval ablate:` and the analyses use the
hooks too. On pre-norm models the two are one edit. On post-norm models (Gemma 2/3/4, OLMo 2) they are one edit
only if the hooks act where the weights act, under the norm (2026-12-07); this prints, for difference-in-means
directions at a few layers and a random direction, the first-token KL of each from the base model and from each
other, and their top-1 agreement, on embedded harmless val prompts.

The directions are difference-in-means of the last prompt token's residual between embedded harmful and harmless
train prompts. A base model without a chat template (Gemma 3 270M) takes ``--template``.

    python bench/bench_ablation_hooks.py                       # Gemma 3 270M (post-norms), fp32
    python bench/bench_ablation_hooks.py default --layers 6,12,18
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from benchlib import fail

from refdir.core.activations import residuals
from refdir.core.chat import ChatFormat
from refdir.core.data import embedded
from refdir.core.forward import last_logits
from refdir.core.interventions import ablate
from refdir.core.models import load_model
from refdir.core.orthogonalize import orthogonalize_
from refdir.errors import RefdirError
from refdir.method.scoring import first_token_kl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="a model spec (default: the Gemma 3 270M GGUF)")
    ap.add_argument("--layers", default="4,8,11,14", help="candidate layers, comma-separated")
    ap.add_argument("--n", type=int, default=32, help="prompts per mean (harmful, harmless) and test prompts")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--template", default="Question: {instruction}\nAnswer:",
                    help="for a tokenizer without a chat template")
    a = ap.parse_args()
    try:
        layers = [int(x) for x in a.layers.split(",")]
    except ValueError:
        fail(f"--layers takes comma-separated integers, not {a.layers!r}")
    if a.n < 2:
        fail("--n must be at least 2")
    try:
        if a.model is None:
            from refdir.core.model_files import gemma3_gguf_path

            a.model = str(gemma3_gguf_path())
        lm = load_model(a.model, dtype=a.dtype)
        tok = lm.tokenizer
        fmt = ChatFormat(tok, template=None if getattr(tok, "chat_template", None) else a.template)
    except RefdirError as e:
        fail(str(e))
    model, n_layers = lm.model, lm.model.config.num_hidden_layers
    if any(not 0 <= x <= n_layers for x in layers):
        fail(f"layers must lie in 0..{n_layers}")
    harmful = embedded("harmful", "train").instructions[: a.n]
    harmless = embedded("harmless", "train").instructions[: a.n]
    test = embedded("harmless", "val").instructions[: a.n]
    mh, _ = residuals(model, fmt, harmful, n_pos=1, progress=False)
    mb, _ = residuals(model, fmt, harmless, n_pos=1, progress=False)
    base = torch.log_softmax(last_logits(model, fmt, test).double(), -1)
    d = model.config.hidden_size
    dirs = [(f"layer {x}", (mh - mb)[0, x].float()) for x in layers]
    dirs.append(("random (seed 0)", torch.randn(d, generator=torch.Generator().manual_seed(0))))
    print(f"{a.model} ({a.dtype}), {len(test)} harmless val prompts")
    print(f"{'direction':<16} {'KL base→hooks':>14} {'KL base→weights':>16} {'KL weights→hooks':>17} {'top-1':>6} {'s':>6}")
    for name, r in dirs:
        t0 = time.time()
        with ablate(model, r):
            hooked = last_logits(model, fmt, test)
        edited = copy.deepcopy(model)
        orthogonalize_(edited, r)
        weights = last_logits(edited, fmt, test)
        del edited
        kh = float(first_token_kl(base, hooked).mean())
        kw = float(first_token_kl(base, weights).mean())
        kwh = float(first_token_kl(torch.log_softmax(weights.double(), -1), hooked).mean())
        agree = float((hooked.argmax(-1) == weights.argmax(-1)).float().mean())
        print(f"{name:<16} {kh:>14.4f} {kw:>16.4f} {kwh:>17.2e} {agree:>6.2f} {time.time() - t0:>6.1f}")


if __name__ == "__main__":
    main()
