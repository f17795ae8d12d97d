"""Unit-selective ablation against the stream ablation, on a finished default run (an edit family measured in
NOTES.md and not adopted).

The stream ablation removes r from what every input unit of every writer writes (each column of ``o_proj`` and
``down_proj``). Here only some units lose their part along r: those whose write along r, a_j·(r̂ᵀw_j) averaged over
the post-instruction positions, is larger on the run's filtered harmful train prompts than on its filtered harmless
ones (Δ_j). The hope: harmless prompts keep the r they get from the other units, so less first-token KL for the
same bypass. As weights this is W ← W − r̂ r̂ᵀ W diag(mask), exact; here it is a forward hook per writer. The
embedding loses r as in the run's edits. Arms:

- ``stream``: the run's pca direction removed from every block input (today's hooks);
- ``all``: every unit masked (the same edit through these hooks: a check);
- ``pos:X``: every unit with Δ_j > X;
- ``mass:F``: the fewest units, by Δ_j, that hold a fraction F of the positive Δ;
- ``rmass:F``: the same ranked by Δ_j over the unit's root mean square write on harmless prompts.

    python bench/bench_units.py RUN --harmful $P/harmful_train.json --harmless $P/harmless_train.json \\
        stream pos:0 mass:0.7 rmass:0.8

Prints refusals (wide judge, broad beside it) on the first ``--n-harmful`` harmful prompts and the mean first-token
KL on the first ``--n-harmless`` harmless ones, greedy, ``--tokens`` new tokens.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from benchlib import DevSlices, add_dev_arguments, fail

from refdir.core.architecture import inspect_model
from refdir.core.directions import Direction
from refdir.core.hooks import registered
from refdir.core.interventions import ablate, project_out
from refdir.core.rundir import RunDir


def unit_writes(model, fmt, writers: dict, wr: dict, prompts: list[str], batch: int) -> tuple[dict, dict]:
    """Per writer, the mean and mean square over prompts × post-instruction positions of each input unit's write
    along r (a_j · r̂ᵀw_j)."""
    acc = {n: [0.0, 0.0, 0] for n in writers}

    def hook_for(n):
        def hook(_mod, args):
            a = args[0][:, -fmt.n_post:, :].float() * wr[n]
            s = acc[n]
            s[0], s[1], s[2] = s[0] + a.sum((0, 1)), s[1] + (a * a).sum((0, 1)), s[2] + a.shape[0] * a.shape[1]
        return hook

    with registered([mod.register_forward_pre_hook(hook_for(n)) for n, mod in writers.items()]), torch.no_grad():
        for i in range(0, len(prompts), batch):
            model(**fmt.encode(prompts[i:i + batch]))
    return {n: s[0] / s[2] for n, s in acc.items()}, {n: s[1] / s[2] for n, s in acc.items()}


@contextlib.contextmanager
def selective(model, arch, writers: dict, wr: dict, masks: dict, r: torch.Tensor):
    """Hooks removing, per writer, the masked units' write along r̂, and r̂ from the embeddings."""

    def hook_for(v):
        def hook(_mod, args, out):
            return (out.float() - (args[0].float() @ v)[..., None] * r).to(out.dtype)
        return hook

    handles = [mod.register_forward_hook(hook_for(wr[n] * masks[n])) for n, mod in writers.items()]
    handles += [e.register_forward_hook(lambda _m, _a, out: project_out(out.float(), r).to(out.dtype))
                for _, e in arch.embeddings]
    with registered(handles):
        yield


def _number(x: str) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished `refdir run` directory (default method: it has optimize/pca)")
    ap.add_argument("arms", nargs="+")
    add_dev_arguments(ap)
    a = ap.parse_args()
    for spec in a.arms:  # every arm checked before the model loads
        kind, _, x = spec.partition(":")
        if not (kind in ("stream", "all") and not x or kind in ("pos", "mass", "rmass") and _number(x)):
            fail(f"unknown arm {spec!r}: stream, all, pos:X, mass:F or rmass:F")
    rd = RunDir(a.run)
    lm, fmt = rd.model_spec().load()
    m = lm.model
    arch = inspect_model(m)
    r = Direction.load(rd.source_path("pca")).unit().float()
    writers = {f"{b.index}.{c}.{w.name}": w.module for b in arch.blocks for c in ("attn", "mlp")
               for w in b.component_writers(c) if w.param == "weight" and w.out_axis == 0}
    wr = {n: (r.to(mod.weight.dtype) @ mod.weight).float() for n, mod in writers.items()}
    filt = rd.filtered()["train"]
    mean_h, _ = unit_writes(m, fmt, writers, wr, filt["harmful"], a.batch)
    mean_b, sq_b = unit_writes(m, fmt, writers, wr, filt["harmless"], a.batch)
    delta = {n: mean_h[n] - mean_b[n] for n in writers}
    ratio = {n: delta[n] / (sq_b[n].sqrt() + 1e-3) for n in writers}
    flat_delta = torch.cat(list(delta.values()))
    total = flat_delta.clamp_min(0).sum()
    print(f"{len(writers)} writers, {flat_delta.numel()} units; positive Δ {float(total):.2f}, "
          f"negative {float(flat_delta.clamp_max(0).sum()):.2f}")

    def by_mass(score: dict, frac: float) -> dict:
        flat = torch.cat(list(score.values()))
        order = flat.argsort(descending=True)
        k = int((flat_delta[order].clamp_min(0).cumsum(0) < frac * total).sum()) + 1
        return {n: (s >= flat[order[k - 1]]).float() for n, s in score.items()}

    dev = DevSlices(m, fmt, a)
    for spec in a.arms:
        kind, _, x = spec.partition(":")
        masks = ({n: torch.ones_like(v) for n, v in wr.items()} if kind == "all"
                 else {n: (d > float(x)).float() for n, d in delta.items()} if kind == "pos"
                 else by_mass(delta, float(x)) if kind == "mass"
                 else by_mass(ratio, float(x)) if kind == "rmass" else None)
        units = "" if masks is None else f" ({int(sum(v.sum() for v in masks.values()))} units)"
        dev.measure(ablate(m, r) if kind == "stream" else selective(m, arch, writers, wr, masks, r), spec + units)


if __name__ == "__main__":
    main()
