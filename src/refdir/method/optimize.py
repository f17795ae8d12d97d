"""Optimized refusal directions (RDO) and refusal cones (Wollschläger et al., ICML 2025, arXiv 2502.17420).

The difference in means is a cheap estimate of the refusal direction. RDO starts from it and trains a unit direction
r with Adam against the properties the paper tests, on a weighted sum of three losses:

- **ablation**: with r ablated everywhere, the cross-entropy of harmful prompts' *compliant* targets;
- **addition**: with ``scale · r`` added to the input of r's layer, the cross-entropy of harmless prompts' *refusal*
  targets;
- **retain**: with r ablated, KL(base ‖ ablated) of the next-token distributions over harmless prompts followed by
  their base completions. The base distribution is kept as its top ``topk`` tokens plus one bucket for the rest, so
  the loss is the exact KL of those coarsened distributions (a lower bound of the full KL) and the cache stays small.

A **cone** is a basis of k orthonormal directions; the ablation and retain losses ablate its whole span, the
addition loss adds members sampled from the cone (non-negative combinations of the basis, normalised). k = 1 is RDO.

Only the basis gets gradients: the model is frozen (``requires_grad`` off on every parameter for the duration, then
restored) and its weights are never written. The hooks sit where :func:`refdir.core.interventions.ablate` and
:func:`~refdir.core.interventions.add` put theirs (the embeddings' output, every block input and attention / MLP
write; the input of r's layer) and compute the same projection (:func:`~refdir.core.interventions.project_out`;
under post-norms off the span the weights are edited against, :func:`refdir.core.postnorm.chain_span`),
differentiably. Speed:
logits only at the target positions, the prompts' common template prefix run once per forward pass (its KV cache
spread over the batch), short targets. Memory: one forward pass per loss, each backpropagated as soon as it is
computed, so a step holds one pass's activations. The examples, their layout and the losses are in
:mod:`refdir.method.optimize_data`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from refdir.core.architecture import Architecture, cache_kwarg, cache_of, inspect_model
from refdir.core.forward import cache_for_rows
from refdir.core.hooks import contiguous_unembedding, map_input, registered
from refdir.core.interventions import placed_hooks, project_out
from refdir.core.postnorm import chain_span
from refdir.errors import RefdirError
from refdir.method.optimize_data import Examples, TrainSet, ce_loss, kl_topk, layout, pad_stack, shared_prefix

LOSSES = ("ablation", "addition", "retain")


@dataclass
class OptimizeConfig:
    """Settings of one RDO or cone training. ``weights`` are the ablation, addition and retain loss weights (the
    paper's 1, 0.2, 1); early stopping evaluates the validation loss every ``eval_every`` steps and stops after
    ``patience`` evaluations without improvement, keeping the best basis. The defaults are ``refdir optimize``'s
    (the command and the run's RDO stage read them from here): they keep RDO on the default 0.5B model within
    minutes on a 2-core CPU (4 prompts per loss per step, 8 steps with early stopping); raise ``steps`` and
    ``batch_size`` where time allows."""

    k: int = 1
    steps: int = 8
    lr: float = 5e-3
    weights: tuple[float, float, float] = (1.0, 0.2, 1.0)
    batch_size: int = 4
    eval_every: int = 4
    patience: int = 2
    members: int = 2  # cone members sampled per step for the addition loss (k > 1)
    topk: int = 32  # base tokens kept per position for the retain loss
    seed: int = 0

    def check(self) -> OptimizeConfig:
        ints = {"k": self.k, "steps": self.steps, "batch size": self.batch_size, "eval every": self.eval_every,
                "patience": self.patience, "members": self.members, "topk": self.topk}
        bad = [n for n, v in ints.items() if v < 1]
        if bad:
            raise RefdirError(f"{bad[0]} must be at least 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise RefdirError(f"the learning rate must be a positive number, not {self.lr}")
        if len(self.weights) != 3 or any(not math.isfinite(w) or w < 0 for w in self.weights) or not any(self.weights):
            raise RefdirError(f"the loss weights must be three non-negative numbers, not all zero: {self.weights}")
        return self


def orthonormal(basis: torch.Tensor) -> torch.Tensor:
    """Rows of ``basis`` [k, d] orthonormalized in order (Gram-Schmidt via QR, signs kept), differentiably."""
    q, r = torch.linalg.qr(basis.T)
    s = torch.sign(torch.diagonal(r))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return (q * s).T


@dataclass
class _Edit:
    """What the training hooks apply on the next forward call: the span to ablate ([k, d]) and the vectors to add
    per row ([b, d]); None switches either off."""

    span: torch.Tensor | None = None
    add: torch.Tensor | None = None


def _projection(edit: _Edit):
    """:func:`refdir.core.interventions.placed_hooks`' projection for the span being trained: under post-norms, off
    the span the weights would be edited against (:func:`refdir.core.postnorm.chain_span`, differentiable)."""

    def at(gains):
        def fn(x):
            if edit.span is None:
                return x
            return project_out(x, chain_span(gains, edit.span) if gains else edit.span)

        return fn

    return at


def _shift(edit: _Edit):
    def fn(x):
        if edit.add is None:
            return x
        return x + edit.add.to(device=x.device, dtype=x.dtype)[:, None, :]

    return fn


@contextmanager
def training_hooks(model: nn.Module, edit: _Edit, layer: int, arch: Architecture | None = None) -> Iterator[None]:
    """Differentiable ablation (the embeddings' output, every block input and attention / MLP write, under
    post-norms where the writers write) and addition (input of ``layer``) hooks reading ``edit``, at the places
    :func:`refdir.core.interventions.ablate` uses (:func:`~refdir.core.interventions.placed_hooks`); removed on
    exit."""
    arch = arch or inspect_model(model)
    if not 0 <= layer < arch.n_layers:
        raise RefdirError(f"layer {layer} outside 0..{arch.n_layers - 1}")
    handles = placed_hooks(arch, _projection(edit))
    handles.append(arch.blocks[layer].block.register_forward_pre_hook(map_input(_shift(edit)), with_kwargs=True))
    with registered(handles):
        yield


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Switch ``requires_grad`` off on every parameter while open (in eval mode); restore both on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


def target_logits(model: nn.Module, rows: list[tuple[list[int], list[int]]], prefix: list[int], pad: int,
                  edit: _Edit | None = None, plans: torch.Tensor | None = None,
                  groups: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the target positions [b, T, vocab] (float32) and the targets [b, T]. The shared ``prefix`` (may be
    empty) runs once per plan: with ``plans`` [n, d] (vectors to add, one per plan) row j uses plan ``groups[j]``."""
    dev = next(model.parameters()).device
    k = len(prefix)
    lay = layout(rows, k, pad)
    extra = {}
    T = lay.targets.shape[1]
    with contiguous_unembedding(model):  # the model is frozen: see contiguous_unembedding
        if k:
            n = 1 if plans is None else plans.shape[0]
            if plans is not None:
                edit.add = plans
            cache = cache_of(model(input_ids=torch.tensor([prefix] * n, device=dev), use_cache=True, logits_to_keep=1))
            extra[cache_kwarg(model)] = cache_for_rows(cache, len(rows), None if plans is None else groups, dev)
        if plans is not None:
            edit.add = plans[torch.tensor(groups)]
        out = model(input_ids=lay.ids.to(dev), attention_mask=lay.mask.to(dev), position_ids=lay.pos.to(dev),
                    use_cache=bool(k), logits_to_keep=T + 1, **extra)
    return out.logits[:, :-1].float(), lay.targets.to(dev)


@torch.no_grad()
def add_base_topk(model: nn.Module, ex: Examples, prefix: list[int], pad: int, topk: int,
                  batch_size: int = 8) -> Examples:
    """Fill ``ex``'s base distributions (top ``topk`` log-probabilities and the rest's log-mass per target
    position), from the unedited model."""
    ex.base_ids, ex.base_logp, ex.base_rest = [], [], []
    for s in range(0, len(ex), batch_size):
        rows = ex.rows(list(range(s, min(s + batch_size, len(ex)))))
        logits, _ = target_logits(model, rows, prefix, pad)
        logp = torch.log_softmax(logits, -1)
        top, ids = logp.topk(min(topk, logp.shape[-1]), -1)
        rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
        for j, (_, t) in enumerate(rows):
            n = len(t)
            ex.base_ids.append(ids[j, :n].cpu())
            ex.base_logp.append(top[j, :n].cpu())
            ex.base_rest.append(rest[j, :n].cpu())
    return ex


@dataclass
class Optimized:
    """A trained basis [k, d] (orthonormal rows; k = 1 for RDO), its loss history and where it was best."""

    basis: torch.Tensor
    history: list[dict]
    best_step: int
    best_val: float
    stopped_early: bool


class Trainer:
    """Adam on the basis, with early stopping on the validation losses and a resumable state (:meth:`state_dict`).

    ``init`` is [d] or [k, d] (rows orthonormalized), ``layer`` the addition layer, ``scale`` the added vector's
    norm (the difference-in-means norm times the run's addition coefficient)."""

    def __init__(self, model: nn.Module, pad: int, init: torch.Tensor, layer: int, scale: float, train: TrainSet,
                 val: TrainSet, cfg: OptimizeConfig):
        self.model, self.pad, self.layer, self.scale, self.cfg = model, pad, layer, float(scale), cfg.check()
        self.train, self.val = train, val
        for name, n in {**train.sizes(), **{f"val {k}": v for k, v in val.sizes().items()}}.items():
            if n == 0:
                raise RefdirError(f"no {name} examples to train on (every target completion was empty)")
        self.arch = inspect_model(model)
        init = init.detach().float().reshape(-1, init.shape[-1])
        if init.shape[0] != cfg.k:
            raise RefdirError(f"the initial basis has {init.shape[0]} rows, not k = {cfg.k}")
        dev = next(model.parameters()).device
        self.param = nn.Parameter(orthonormal(init).to(dev))
        self.opt = torch.optim.Adam([self.param], lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.prefix = shared_prefix([train, val])
        self.edit = _Edit()
        self.step_i, self.bad_evals, self.done = 0, 0, False
        self.history: list[dict] = []
        self.best: dict = {"step": 0, "val": float("inf"), "basis": self.param.detach().clone()}

    def basis(self) -> torch.Tensor:
        return orthonormal(self.param)

    def _draw(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self.gen)[:self.cfg.batch_size].tolist()

    def losses(self, data: TrainSet, hi: list[int], ai: list[int], ri: list[int], mix: torch.Tensor,
               backward: bool = False) -> dict:
        """The losses (tensors) on the given rows, one forward pass each: harmful ``hi`` and retain ``ri`` with the
        span ablated, refusal ``ai`` with cone members added (rows spread over the members). ``mix`` [n, k] holds
        the members' non-negative weights on the basis; members stay differentiable in the basis. ``backward``:
        backpropagate each pass's weighted loss as soon as it is computed (the gradient of the total, holding one
        pass's activations at a time); the losses come back detached."""
        wa, wd, wr = self.cfg.weights
        passes = (("ablation", hi if wa else [], lambda i: ce_loss(*self._ablated(data.harmful, i))),
                  ("retain", ri if wr else [], lambda i: self._retain(data.retain, i)),
                  ("addition", ai if wd else [], lambda i: self._addition(data.refuse, i, mix)))
        out = {}
        for name, idx, loss_of in passes:
            if not idx:
                continue
            loss = loss_of(idx)
            if backward:
                self.total({name: loss}).backward()
                loss = loss.detach()
            out[name] = loss
        return out

    def _ablated(self, ex: Examples, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target logits and targets of rows ``idx`` of ``ex`` with the span ablated."""
        self.edit.span, self.edit.add = self.basis(), None
        try:
            return target_logits(self.model, ex.rows(idx), self.prefix, self.pad, self.edit)
        finally:
            self.edit.span = None

    def _retain(self, ex: Examples, idx: list[int]) -> torch.Tensor:
        """KL(base ‖ ablated) of rows ``idx`` of ``ex`` over the base model's top-k tokens (:func:`kl_topk`)."""
        logits, tgt = self._ablated(ex, idx)
        return kl_topk(logits, tgt, *(pad_stack([getattr(ex, a)[i] for i in idx], logits.shape[1], f).to(logits.device)
                                      for a, f in (("base_ids", 0), ("base_logp", 0.0), ("base_rest", 0.0))))

    def _addition(self, ex: Examples, idx: list[int], mix: torch.Tensor) -> torch.Tensor:
        """The refusal cross-entropy of rows ``idx`` of ``ex`` with cone members added (spread over the rows)."""
        q = self.basis()
        members = mix.to(q) @ q
        members = members / members.norm(dim=-1, keepdim=True)
        self.edit.span = None
        try:
            logits, tgt = target_logits(self.model, ex.rows(idx), self.prefix, self.pad, self.edit,
                                        plans=members * self.scale,
                                        groups=[j % members.shape[0] for j in range(len(idx))])
        finally:
            self.edit.add = None
        return ce_loss(logits, tgt)

    def total(self, parts: dict) -> torch.Tensor:
        return sum(w * parts[n] for n, w in zip(LOSSES, self.cfg.weights, strict=True) if w and n in parts)

    def _mix(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Weights of ``n`` cone members on the basis (|N(0, 1)|; the basis vector itself when k = 1)."""
        return torch.ones(1, 1) if self.cfg.k == 1 else torch.randn(n, self.cfg.k, generator=gen).abs()

    def step(self) -> dict:
        """One Adam step on a random batch of each loss; the parameter is re-orthonormalized after it."""
        t = self.train
        hi, ai, ri = self._draw(len(t.harmful)), self._draw(len(t.refuse)), self._draw(len(t.retain))
        mix = self._mix(self.cfg.members, self.gen)
        self.opt.zero_grad(set_to_none=True)
        parts = self.losses(t, hi, ai, ri, mix, backward=True)
        loss = self.total(parts)
        self.opt.step()
        with torch.no_grad():
            self.param.copy_(orthonormal(self.param))
        self.step_i += 1
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The losses on the whole validation set (fixed cone members), in batches, weighted by batch rows."""
        v, bs = self.val, self.cfg.batch_size
        mix = self._mix(max(self.cfg.members, 4), torch.Generator().manual_seed(self.cfg.seed + 1))
        sums: dict[str, float] = {}
        for s in range(0, max(v.sizes().values()), bs):
            idx = [list(range(s, min(s + bs, len(ex)))) for ex in (v.harmful, v.refuse, v.retain)]
            for name, x in self.losses(v, *idx, mix).items():
                sums[name] = sums.get(name, 0.0) + float(x) * len(idx[LOSSES.index(name)])
        counts = dict(zip(LOSSES, (len(v.harmful), len(v.refuse), len(v.retain)), strict=True))
        out = {k: x / counts[k] for k, x in sums.items()}
        out["loss"] = float(self.total(out))
        return out

    def run(self, on_checkpoint: Callable[[Trainer], None] | None = None, progress: bool = True) -> Optimized:
        """Train until ``steps`` or early stopping; ``on_checkpoint(self)`` after every validation (for saving).
        Resumes from wherever :meth:`load_state_dict` left the trainer."""
        with frozen(self.model), training_hooks(self.model, self.edit, self.layer, self.arch):
            if not self.history:
                self._validate(on_checkpoint)
            bar = tqdm(total=self.cfg.steps, initial=self.step_i, desc=f"optimize k={self.cfg.k}",
                       disable=not progress, leave=False)
            while not self.done and self.step_i < self.cfg.steps:
                rec = self.step()
                self.history.append({"step": self.step_i, "split": "train", **rec})
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
                if self.step_i % self.cfg.eval_every == 0 or self.step_i == self.cfg.steps:
                    self._validate(on_checkpoint)
            bar.close()
        return Optimized(self.best["basis"].cpu(), self.history, self.best["step"], self.best["val"],
                         self.done and self.step_i < self.cfg.steps)

    def _validate(self, on_checkpoint) -> None:
        rec = self.evaluate()
        self.history.append({"step": self.step_i, "split": "val", **rec})
        if rec["loss"] < self.best["val"]:
            self.best = {"step": self.step_i, "val": rec["loss"], "basis": self.basis().detach().clone()}
            self.bad_evals = 0
        else:
            self.bad_evals += 1
            self.done = self.bad_evals >= self.cfg.patience
        if on_checkpoint is not None:
            on_checkpoint(self)

    def state_dict(self) -> dict:
        """The resumable state as one flat dict of tensors (the basis, the best one, Adam's moments and step count
        as ``adam.NAME``, the batch sampler's random state) and JSON values (the step, the early-stopping counters,
        the history, the best step and loss): what :func:`refdir.core.state_file.save_state` writes, unpickled."""
        adam = self.opt.state_dict()["state"].get(0, {})  # the one parameter's; empty before the first step
        return {"param": self.param.detach().cpu().clone(), **{f"adam.{k}": v for k, v in adam.items()},
                "step": self.step_i, "bad_evals": self.bad_evals, "done": self.done, "history": self.history,
                "best_step": self.best["step"], "best_val": self.best["val"], "best_basis": self.best["basis"].cpu(),
                "rng": self.gen.get_state()}

    def load_state_dict(self, s: dict) -> Trainer:
        """Resume from :meth:`state_dict`'s dict. One that does not fit this trainer (an entry missing, a basis or
        Adam moment of another shape, a random state of another size) is a RefdirError, raised before anything
        changes."""
        _check_state(s, tuple(self.param.shape), self.gen.get_state())
        with torch.no_grad():
            self.param.copy_(s["param"].to(self.param.device))
        adam = {k.removeprefix("adam."): v for k, v in s.items() if k.startswith("adam.")}
        self.opt.load_state_dict({"state": {0: adam} if adam else {},
                                  "param_groups": self.opt.state_dict()["param_groups"]})  # lr, betas: the config
        self.step_i, self.bad_evals, self.done = int(s["step"]), int(s["bad_evals"]), bool(s["done"])
        self.history = list(s["history"])
        self.best = {"step": int(s["best_step"]), "val": float(s["best_val"]),
                     "basis": s["best_basis"].to(self.param.device)}
        self.gen.set_state(s["rng"])
        return self


def _check_state(s: dict, shape: tuple[int, ...], rng: torch.Tensor) -> None:
    """Raise a RefdirError unless ``s`` is a :meth:`Trainer.state_dict` of a basis of ``shape`` (and a random
    state like ``rng``)."""
    tensors = {"param": shape, "best_basis": shape, "rng": tuple(rng.shape),
               **{k: shape for k in s if k.startswith(("adam.exp_avg", "adam.max_exp_avg"))}}
    for name, want in tensors.items():
        t = s.get(name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            got = f"of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else "missing"
            raise RefdirError(f"the checkpoint's {name!r} is {got}, not a tensor of shape {want}")
    adam = {k for k in s if k.startswith("adam.")}
    if adam and not {"adam.step", "adam.exp_avg", "adam.exp_avg_sq"} <= adam:
        raise RefdirError("the checkpoint's Adam state is incomplete")
    if s["rng"].dtype != rng.dtype:
        raise RefdirError(f"the checkpoint's random state is {s['rng'].dtype}, not {rng.dtype}")
    bad = [k for k in ("step", "bad_evals", "done", "best_step", "best_val") if not isinstance(s.get(k), int | float)]
    if bad:
        raise RefdirError(f"the checkpoint's {bad[0]!r} is missing or not a number")
    if not isinstance(s.get("history"), list):
        raise RefdirError("the checkpoint's 'history' is missing or not a list")
