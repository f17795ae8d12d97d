"""Optimized refusal directions (RDO) and cones: wall time of the two phases and peak RSS, and the comparison with
the difference-in-means direction.

Timing (default): on a finished run of the default model, generate the targets (phase 1: targets and the base
top-k distributions) and train RDO and a k = 2 cone (phase 2: optimization), nothing cached (the targets and base
distributions go to a temporary directory, not the run's). Prints both phases per method and the peak RSS.

Comparison (``--harmful-val`` / ``--harmless-val``): full-strength ablation of the difference-in-means direction and
of the RDO direction (``--direction FILE``, e.g. the one `refdir optimize` wrote; without it, the one trained here):
refusals on the harmful prompts (greedy, ``--tokens`` new tokens, the ``wide`` judge as headline, broad and paper
beside it) and the mean first-token KL(base ‖ ablated) on the first ``--n-kl`` harmless prompts.

    python bench/bench_optimize.py RUN [--steps 8] [--batch-size 4] [--target-tokens 16] [--skip-cone]
    python bench/bench_optimize.py RUN --no-timing --direction RUN/optimize/rdo [--extra RUN/optimize/cone_k2] \\
        --harmful-val P/harmful_val.json --harmless-val P/harmless_val.json
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from benchlib import fail

from refdir.cli.optimize import parse_weights
from refdir.core.directions import Direction, load_ablation
from refdir.core.edits import Edit, Plan, hooked, resolve
from refdir.core.forward import last_logits
from refdir.core.generation import generate
from refdir.core.interventions import ablate
from refdir.core.rundir import RunDir
from refdir.errors import RefdirError
from refdir.method.optimize import OptimizeConfig, Trainer
from refdir.method.refusal_judge import judge_all
from refdir.method.scoring import first_token_kl
from refdir.workflows.optimize import (
    OptimizeSettings,
    grow,
    judged_targets,
    make_targets,
    open_context,
    train_sets,
)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timing(ctx, s: OptimizeSettings, skip_cone: bool) -> torch.Tensor:
    """Phase 1 (targets) once, phase 2 (optimization) for RDO and a k = 2 cone; returns the RDO direction."""
    t0 = time.perf_counter()
    targets = make_targets(ctx, s.target_tokens, max(s.train.batch_size, 16), progress=True)
    judged, off = judged_targets(ctx, targets)
    print(f"targets the judge reads against their label: {off}; {'dropped' if s.judge_targets else 'kept'}",
          flush=True)
    targets = judged if s.judge_targets else targets
    train, val, _ = train_sets(ctx, targets, "bench", s.config(1).topk)
    t_targets = time.perf_counter() - t0
    print(f"phase 1, targets + base distributions: {t_targets:.1f} s ({train.sizes()} train, {val.sizes()} val), "
          f"peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    d_hat = ctx.direction.unit()[None]
    rdo = None
    for k in (1,) if skip_cone else (1, 2):
        init = d_hat if k == 1 else grow(d_hat, s.train.seed + 2)
        t1 = time.perf_counter()
        tr = Trainer(ctx.model, ctx.pad, init, ctx.direction.layer, ctx.scale, train, val, s.config(k))
        res = tr.run(progress=True)
        dt = time.perf_counter() - t1
        print(f"phase 2, optimization {'RDO' if k == 1 else 'cone k=2'}: {dt:.1f} s, {tr.step_i} steps "
              f"({dt / max(tr.step_i, 1):.1f} s/step incl. validation), best val {res.best_val:.4f} at step "
              f"{res.best_step}; peak RSS {peak_rss_gib():.2f} GiB", flush=True)
        if k == 1:
            rdo = res.basis[0]
    return rdo


def compare(ctx, r_rdo: torch.Tensor, harmful: list[str], harmless: list[str], tokens: int, batch: int,
            extra: dict[str, torch.Tensor] | None = None) -> dict:
    """Refusals (of len(harmful)) and mean first-token KL for the base model, d ablated, r ablated and each of
    ``extra`` (name → a direction [d] or a subspace basis [k, d], its whole span ablated, or an edit's Plan, hooked)."""
    m, fmt = ctx.model, ctx.fmt
    base_logp = torch.log_softmax(last_logits(m, fmt, harmless, batch, shared_prefix=True).double(), -1)
    out = {}
    arms = [("base", None), ("difference-in-means", ctx.direction.vector), ("RDO", r_rdo), *(extra or {}).items()]
    for name, v in arms:
        if v is None and name != "base":
            continue
        t = time.perf_counter()
        if v is None:
            comps = generate(m, fmt, harmful, max_new_tokens=tokens, batch_size=batch, desc=name)
            kl = 0.0
        else:
            with hooked(m, v) if isinstance(v, Plan) else ablate(m, v):
                comps = generate(m, fmt, harmful, max_new_tokens=tokens, batch_size=batch, desc=name)
                kl = float(first_token_kl(base_logp, last_logits(m, fmt, harmless, batch, shared_prefix=True)).mean())
        j = judge_all(comps, "wide")
        out[name] = {"refusals_wide": j["headline"].n_refusal, "refusals_broad": j["broad"].n_refusal,
                     "refusals_paper": j["paper"].n_refusal, "degenerate": j["headline"].n_degenerate,
                     "n": len(comps), "kl": kl, "seconds": time.perf_counter() - t, "completions": comps}
        print(f"{name:22s} refusals {j['headline'].n_refusal}/{len(comps)} (wide; broad {j['broad'].n_refusal}, "
              f"paper {j['paper'].n_refusal}, degenerate {j['headline'].n_degenerate}), first-token KL {kl:.4f}",
              flush=True)
    if r_rdo is not None:
        print(f"cos(RDO, difference-in-means) = {float(ctx.direction.unit() @ torch.nn.functional.normalize(r_rdo.float(), dim=0)):.4f}")
    return out


def chosen_plan(rd: RunDir) -> Plan:
    """The chosen edit of a search run, resolved with its candidates (and its optimized direction, if it has one)."""
    edit = Edit.from_dict(json.loads((rd.path / "summary.json").read_text())["choice"]["edit"])
    return resolve(edit, rd.candidates_with_sources())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a finished `refdir run` directory of the model")
    ap.add_argument("--steps", type=int, default=OptimizeConfig.steps)
    ap.add_argument("--batch-size", type=int, default=OptimizeConfig.batch_size)
    ap.add_argument("--target-tokens", type=int, default=OptimizeSettings.target_tokens)
    ap.add_argument("--n-train", type=int, default=OptimizeSettings.n_train)
    ap.add_argument("--n-val", type=int, default=OptimizeSettings.n_val)
    ap.add_argument("--eval-every", type=int, default=OptimizeConfig.eval_every)
    ap.add_argument("--lr", type=float, default=OptimizeConfig.lr)
    ap.add_argument("--patience", type=int, default=OptimizeConfig.patience)
    ap.add_argument("--weights", default=",".join(f"{w:g}" for w in OptimizeConfig.weights),
                    help="loss weights ablation,addition,retain (the paper's 1,0.2,1), as `refdir optimize --weights`")
    ap.add_argument("--skip-cone", action="store_true")
    ap.add_argument("--judge-targets", action="store_true", help="drop the targets the judge reads off-label")
    ap.add_argument("--coeff", type=float, help="the addition coefficient of the refusal targets and the addition "
                    "loss (default: the run's, 1 for a search run)")
    ap.add_argument("--no-timing", action="store_true", help="only the comparison (needs --direction)")
    ap.add_argument("--direction", help="the RDO direction file to compare (default: the one trained here)")
    ap.add_argument("--harmful-val", help="JSON list of {instruction} records (e.g. paper_splits/harmful_val.json)")
    ap.add_argument("--harmless-val")
    ap.add_argument("--n-kl", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--gen-batch", type=int, default=20)
    ap.add_argument("--json", help="write the comparison (with completions) here")
    ap.add_argument("--chosen", action="store_true", help="also the run's chosen edit (search runs)")
    ap.add_argument("--extra", action="append", default=[],
                    help="another direction or subspace file to compare (its whole span ablated), e.g. a cone's "
                         "RUN/optimize/cone_k2; repeatable")
    a = ap.parse_args()
    try:
        weights = parse_weights(a.weights)
    except RefdirError as e:
        fail(str(e))
    train = OptimizeConfig(steps=a.steps, batch_size=a.batch_size, eval_every=a.eval_every, lr=a.lr,
                           patience=a.patience, weights=weights)
    s = OptimizeSettings(train=train, target_tokens=a.target_tokens, n_train=a.n_train, n_val=a.n_val,
                         judge_targets=a.judge_targets).check()
    ctx = open_context(a.run, s)
    if a.coeff is not None:
        ctx.coeff = a.coeff
    print(f"model dtype {next(ctx.model.parameters()).dtype}, {torch.get_num_threads()} threads; "
          f"peak RSS after load {peak_rss_gib():.2f} GiB", flush=True)
    r = Direction.load(a.direction).vector if a.direction else None
    if not a.no_timing:
        with tempfile.TemporaryDirectory() as tmp:
            ctx.rd = RunDir(tmp)  # phase 1's files go here, not into the run
            trained = timing(ctx, s, a.skip_cone)
        r = r if r is not None else trained
    if a.harmful_val and a.harmless_val:
        harmful = [x["instruction"] for x in json.loads(Path(a.harmful_val).read_text())]
        harmless = [x["instruction"] for x in json.loads(Path(a.harmless_val).read_text())][:a.n_kl]
        extra = {Path(f).name: load_ablation(f) for f in a.extra}
        if a.chosen:
            extra["run's chosen edit"] = chosen_plan(RunDir(a.run))
        res = compare(ctx, r, harmful, harmless, a.tokens, a.gen_batch, extra)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
    print(f"peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
