"""Reader-side ablation against the stream ablation, on a finished default run (an edit family measured in NOTES.md
and not adopted).

Every refdir edit removes r from the residual stream. This bench instead leaves r in the stream and makes chosen
layers blind to it: each RMS norm's output y = g ⊙ x / rms(x) becomes y − ((y ⊘ g)·r̂)(g ⊙ r̂), which is the reading
weights W · diag(g)(I − r̂r̂ᵀ)diag(g)⁻¹ (q, k, v, gate, up), as hooks. An arm is
``FIRST:FINAL:PARTS:S1:S2``: blind layers FIRST..last (or ``A-B``), the final norm too when FINAL is 1, the
attention (``a``), MLP (``m``) or both (``b``) readers, the run's pca direction at strength S1 and its second
direction (made orthogonal to it) at S2; ``+`` joins arms. ``stream`` is today's ablation of the pca direction,
``chosen`` the run's chosen edit.

    python bench/bench_readers.py RUN --harmful P/harmful_train.json --harmless P/harmless_train.json \\
        stream chosen 12:0:b:1:0 0:0:b:1:0.3

Prints refusals (wide judge, broad beside it) on the first ``--n-harmful`` harmful prompts and the mean first-token
KL on the first ``--n-harmless`` harmless ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
from bench_optimize import chosen_plan

from refdir.core.directions import Direction
from refdir.core.edits import hooked
from refdir.core.forward import last_logits
from refdir.core.generation import generate
from refdir.core.interventions import ablate
from refdir.core.rundir import RunDir
from refdir.method.refusal_judge import judge_all
from refdir.method.scoring import first_token_kl


@contextlib.contextmanager
def blind(norms: list[torch.nn.Module], directions: list[tuple[torch.Tensor, float]]):
    """Hooks on ``norms`` removing each unit direction's part (at its strength) from what their readers see."""

    def hook(mod, _inp, out):
        g = mod.weight.detach().float()
        y = out.float()
        for u, s in directions:
            y = y - s * (y @ (u / g))[..., None] * (g * u)
        return y.to(out.dtype)

    handles = [n.register_forward_hook(hook) for n in norms]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def arm(spec: str, model, r: torch.Tensor, r2: torch.Tensor):
    """The hooks of one ``FIRST:FINAL:PARTS:S1:S2`` arm (``+`` joins several)."""
    stack = contextlib.ExitStack()
    layers = model.model.layers
    for part in spec.split("+"):
        span, final, parts, s1, s2 = part.split(":")
        lo, hi = (span.split("-") + [str(len(layers) - 1)])[:2]
        norms = [n for i in range(int(lo), int(hi) + 1) for n, p in ((layers[i].input_layernorm, "a"),
                                                                     (layers[i].post_attention_layernorm, "m"))
                 if parts in (p, "b")]
        norms += [model.model.norm] if final == "1" else []
        stack.enter_context(blind(norms, [(r, float(s1)), (r2, float(s2))]))
    return stack


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a finished `refdir run` directory (default method: it has optimize/pca and second)")
    ap.add_argument("arms", nargs="+")
    ap.add_argument("--harmful", required=True)
    ap.add_argument("--harmless", required=True)
    ap.add_argument("--n-harmful", type=int, default=160)
    ap.add_argument("--n-harmless", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    rd = RunDir(a.run)
    lm, fmt = rd.model_spec().load()
    m = lm.model
    r = Direction.load(rd.source_path("pca")).unit().float()
    r2 = Direction.load(rd.source_path("second")).vector.float()
    r2 = torch.nn.functional.normalize(r2 - (r2 @ r) * r, dim=0)
    harmful = [x["instruction"] for x in json.loads(Path(a.harmful).read_text())][:a.n_harmful]
    harmless = [x["instruction"] for x in json.loads(Path(a.harmless).read_text())][:a.n_harmless]
    base = torch.log_softmax(last_logits(m, fmt, harmless, a.batch, shared_prefix=True).double(), -1)
    for spec in a.arms:
        hooks = (ablate(m, r) if spec == "stream" else hooked(m, chosen_plan(rd)) if spec == "chosen"
                 else arm(spec, m, r, r2))
        with hooks:
            comps = generate(m, fmt, harmful, max_new_tokens=a.tokens, batch_size=a.batch, progress=False)
            kl = float(first_token_kl(base, last_logits(m, fmt, harmless, a.batch, shared_prefix=True)).mean())
        j = judge_all(comps, "wide")
        print(f"{spec:32s} refusals {j['headline'].n_refusal}/{len(comps)} (broad {j['broad'].n_refusal}), "
              f"first-token KL {kl:.4f}", flush=True)


if __name__ == "__main__":
    main()
