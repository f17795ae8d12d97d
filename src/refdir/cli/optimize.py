"""`refdir optimize RUN_DIR`: an optimized refusal direction (RDO) or a refusal cone from a finished run (the work
is done by :mod:`refdir.workflows.optimize`)."""

from __future__ import annotations

from pathlib import Path

import typer

from refdir.cli.common import console, model_overrides
from refdir.errors import RefdirError
from refdir.method.optimize import OptimizeConfig
from refdir.workflows.optimize import OptimizeSettings, optimize_run

_S = OptimizeSettings()  # the defaults: owned by OptimizeSettings and, for the training, OptimizeConfig
_T = _S.train


def parse_weights(text: str) -> tuple[float, float, float]:
    """``"1,0.2,1"`` → the ablation, addition and retain loss weights."""
    try:
        w = tuple(float(x) for x in text.split(","))
    except ValueError as e:
        raise RefdirError(f"--weights must be three comma-separated numbers (ablation,addition,retain), not {text!r}") \
            from e
    if len(w) != 3:
        raise RefdirError(f"--weights must be three comma-separated numbers (ablation,addition,retain), not {text!r}")
    return w


@model_overrides
def optimize(
    overrides: dict,
    run_dir: Path = typer.Argument(..., help="a finished `refdir run` directory"),
    method: str = typer.Option(_S.method, help="rdo (one direction) or cone (a k-dim basis; trains k = 1..K)"),
    k: int = typer.Option(_S.k, "--k", help="cone dimension K (with --method cone)"),
    steps: int = typer.Option(_T.steps, help="Adam steps at most (early stopping on the val losses may end sooner)"),
    lr: float = typer.Option(_T.lr, help="Adam learning rate"),
    weights: str = typer.Option(",".join(f"{w:g}" for w in _T.weights), help="loss weights: ablation,addition,retain (the paper's 1,0.2,1)"),
    batch_size: int = typer.Option(_T.batch_size, help="prompts per loss per step"),
    target_tokens: int = typer.Option(_S.target_tokens, help="greedy tokens per target completion"),
    n_train: int = typer.Option(_S.n_train, help="filtered train prompts of each kind used"),
    n_val: int = typer.Option(_S.n_val, help="val prompts of each kind for early stopping and the member scores"),
    eval_every: int = typer.Option(_T.eval_every, help="steps between validations (and checkpoints)"),
    patience: int = typer.Option(_T.patience, help="validations without improvement before stopping"),
    members: int = typer.Option(_T.members, help="cone members sampled per step for the addition loss"),
    samples: int = typer.Option(_S.samples, help="cone members scored per k in the cone analysis"),
    seed: int = typer.Option(_T.seed),
    independence: bool = typer.Option(_S.independence, help="RDO: measure representational independence from the "
                                                  "difference-in-means direction"),
    judge_targets: bool = typer.Option(_S.judge_targets, help="train without the compliant targets the judge reads "
                                       "as refusals (and the refusal targets it reads as compliant)"),
    out: Path = typer.Option(None, "--out", help="output file (default: RUN_DIR/optimize/rdo or cone_kK)"),
    force: bool = typer.Option(False, help="overwrite an existing --out file"),
) -> None:
    """Train an optimized refusal direction or cone (Wollschläger et al., 2025) from the run's selected direction;
    writes a direction or subspace file. Rerunning resumes from the last checkpoint."""
    train = OptimizeConfig(steps=steps, lr=lr, weights=parse_weights(weights), batch_size=batch_size,
                           eval_every=eval_every, patience=patience, members=members, seed=seed)
    s = OptimizeSettings(method=method, k=k, train=train, target_tokens=target_tokens, n_train=n_train, n_val=n_val,
                         samples=samples, independence=independence, judge_targets=judge_targets, out=out,
                         force=force)
    summ = optimize_run(run_dir, s, model=overrides)
    for rec in summ["per_k"]:
        sc = rec["scores"]
        med = sum(m["mediates"] for m in sc["members"])
        console.print(f"k={rec['k']}: best val loss {rec['best_val']:.4f} at step {rec['best_step']}; span bypass "
                      f"{sc['span_bypass']:.2f}; members mediating {med}/{len(sc['members'])}")
    if method == "cone":
        console.print(f"cone dimension: [bold]{summ['cone_dimension']}[/]")
    ind = summ.get("independence")
    if ind:
        console.print(f"independence: r⊥ changes {ind['r_change_under_d_ablation']:.1%} under d ablation, d "
                      f"{ind['d_change_under_r_ablation']:.1%} under r⊥ ablation")
    console.print(f"written {summ['out']} (targets {summ['seconds']['targets']:.0f} s, optimization "
                  f"{summ['seconds']['optimization']:.0f} s)")
