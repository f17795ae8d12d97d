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
import re

import torch
from bench_optimize import chosen_plan
from benchlib import DevSlices, add_dev_arguments, fail

from refdir.core.directions import Direction
from refdir.core.edits import hooked
from refdir.core.hooks import registered
from refdir.core.interventions import ablate
from refdir.core.rundir import RunDir


@contextlib.contextmanager
def blind(norms: list[torch.nn.Module], directions: list[tuple[torch.Tensor, float]]):
    """Hooks on ``norms`` removing each unit direction's part (at its strength) from what their readers see."""

    def hook(mod, _inp, out):
        g = mod.weight.detach().float()
        y = out.float()
        for u, s in directions:
            y = y - s * (y @ (u / g))[..., None] * (g * u)
        return y.to(out.dtype)

    with registered([n.register_forward_hook(hook) for n in norms]):
        yield


ARM = re.compile(r"\d+(-\d+)?:[01]:[amb]:[0-9.]+:[0-9.]+")


def check_arm(spec: str) -> None:
    """Refuse, before the model loads, an arm that is not ``stream``, ``chosen`` or ``FIRST[-LAST]:FINAL:PARTS:S1:S2``
    parts joined by ``+``."""
    if spec not in ("stream", "chosen") and not all(ARM.fullmatch(p) for p in spec.split("+")):
        fail(f"unknown arm {spec!r}: stream, chosen or FIRST[-LAST]:0|1:a|m|b:S1:S2 (parts joined by +)")


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
    add_dev_arguments(ap)
    a = ap.parse_args()
    for spec in a.arms:
        check_arm(spec)
    rd = RunDir(a.run)
    lm, fmt = rd.model_spec().load()
    m = lm.model
    r = Direction.load(rd.source_path("pca")).unit().float()
    r2 = Direction.load(rd.source_path("second")).vector.float()
    r2 = torch.nn.functional.normalize(r2 - (r2 @ r) * r, dim=0)
    dev = DevSlices(m, fmt, a)
    for spec in a.arms:
        dev.measure(ablate(m, r) if spec == "stream" else hooked(m, chosen_plan(rd)) if spec == "chosen"
                    else arm(spec, m, r, r2), spec)


if __name__ == "__main__":
    main()
