"""Checks that the residual stream is what :mod:`refdir.core.architecture` found, on the same tiny traced forward.

A weight edit removes a direction from every parameter that writes to the residual stream. That removes it from the
stream only when the stream is the sum of what those parameters write. Models where it is not: a per-channel
residual scale, an attention module that adds the residual itself, a fixed sinusoidal position signal or a norm
with weights between the embedding and the first block, or a writer that is not a linear layer (attention experts
held as bare tensors). For those refdir would write a checkpoint that
does not compute the edit it measured, so they are refused with an ``error:`` line instead. Measured on the three
real models the tests use, the margins are wide: relative differences ~1e-3 in bf16 and ~3e-8 in fp32 against the
tolerances 0.05 and 1e-3 (NOTES.md).

``block`` is a :class:`refdir.core.architecture.BlockParts` (not imported: the architecture module imports this one).
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from refdir.core.hooks import output_hidden, registered
from refdir.core.postnorm import is_norm
from refdir.core.projection import project_along_
from refdir.errors import RefdirError


def trace_block(model: nn.Module, block, embeddings: list[tuple[str, nn.Embedding]]) -> bool:
    """Trace one tiny forward through ``block``: a norm whose input *is* an attention/MLP module's output, or a
    normed one, or the sum of such branches, is a post-norm of those modules (``block.post``). The same trace
    checks the stream's structure and the writers found (:func:`check_stream`, :func:`check_writers`), unless other
    hooks are open; ``embeddings``: check block 0's input against them (and record a per-token rescale). Returns
    whether the trace ran without other hooks open (what it found is then the model's own structure)."""
    seen: dict[str, torch.Tensor] = {}
    norm_io: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    hooks = []

    def grab(key):
        def hook(_m, _args, out):
            seen[key] = output_hidden(out)

        return hook

    def norm_hook(mod):
        def hook(_m, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            norm_io.append((mod, x, output_hidden(out)))

        return hook

    def block_in(_m, args, kwargs):
        seen["in"] = args[0] if args else kwargs["hidden_states"]

    # other hooks (an intervention already open) change what the trace sees: the stream is then not checked
    hooked_before = _hooks_open(model)
    for c in ("attn", "mlp"):  # the primary module as "attn" / "mlp", the extras as "attn+1", ...
        hooks += [m.register_forward_hook(grab(c if i == 0 else f"{c}+{i}")) for i, m in enumerate(block.modules(c))]
    hooks.append(block.block.register_forward_pre_hook(block_in, with_kwargs=True))
    hooks.append(block.block.register_forward_hook(grab("out")))
    hooks += [emb.register_forward_hook(grab(f"emb{i}")) for i, (_n, emb) in enumerate(embeddings)]
    for _n, child in block.block.named_children():
        if is_norm(child):
            hooks.append(child.register_forward_hook(norm_hook(child), with_kwargs=True))
    with registered(hooks):
        dev = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]], device=dev), use_cache=False)
    keys = {c: [c if i == 0 else f"{c}+{i}" for i in range(len(block.modules(c)))] for c in ("attn", "mlp")}
    names = {k: block.child_name(m) for c in keys for k, m in zip(keys[c], block.modules(c), strict=True)}
    ends = {k: seen[k] for ks in keys.values() for k in ks if k in seen}  # what each module's branch is so far
    block.post = {}
    for mod, x, y in norm_io:  # in call order, so a norm of a sum of normed branches comes after their norms
        for k in _fed_by(x, ends):
            block.post.setdefault(names[k], []).append(block.child_name(mod))
            ends[k] = y
    written: dict[str, list] = {c: [] for c in keys}  # each branch's end once (branches may share an outer norm)
    for c, ks in keys.items():
        for k in ks:
            t = ends.get(k)
            if t is not None and not any(t is o for w in written.values() for o in w):
                written[c].append(t)
    embs = [seen[f"emb{i}"] for i in range(len(embeddings)) if f"emb{i}" in seen]
    if embs and "in" in seen:  # a per-token multiple only: the paper's block-input hooks need the embeddings' too
        misfit = embedding_misfit(seen["in"], embs, per_token=False)
        block.input_rescaled = misfit is not None and misfit > STREAM_TOL.get(seen["in"].dtype, 0.05)
    if not hooked_before and block.index not in _CHECKED.setdefault(model, set()):
        check_stream(block, seen, written, embs)
        check_writers(model, block, seen)
        _CHECKED[model].add(block.index)
    return not hooked_before


def _fed_by(x: torch.Tensor, ends: dict[str, torch.Tensor]) -> list[str]:
    """The branches whose current ends a norm's input ``x`` is: one branch's (a post-norm of that module's output,
    or of its normed output), or the sum of two or three branches' (Gemma 4 norms the sum of its normed MLP and
    experts); [] for a norm of anything else (the stream: a pre-norm). Exact equality, or a sum equal up to the
    order of addition; a branch returning [tokens, d] matches a [1, tokens, d] input."""
    groups: list[tuple[list[str], torch.Tensor]] = []  # branches that share an end are one
    for k, t in ends.items():
        if t.numel() == x.numel():
            g = next((g for g in groups if g[1] is t), None)
            if g is None:
                groups.append(([k], t))
            else:
                g[0].append(k)
    for ks, t in groups:
        if t is x or torch.equal(t.reshape(x.shape), x):
            return ks
    tol = 1e-5 if x.dtype in (torch.float32, torch.float64) else 1e-2
    for n in (2, 3):
        for combo in itertools.combinations(groups, n):
            total = sum(t.reshape(x.shape).double() for _, t in combo)
            if torch.allclose(total, x.double(), rtol=tol, atol=tol * float(x.abs().max())):
                return [k for ks, _ in combo for k in ks]
    return []


def _hooks_open(model: nn.Module) -> bool:
    """Whether any hook is registered on the model (an intervention already open changes what a trace sees)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@torch.no_grad()
def check_padding(model: nn.Module, position_ids: bool) -> None:
    """Refuse a model whose logits for a row change when its batch left-pads it: refdir batches prompts of different
    lengths, left-padded and masked (position ids from the mask where the model takes them). A token mixer that does
    not honour the attention mask (RecurrentGemma's recurrence reads the padding) would make every batched figure
    differ from the prompt alone. Two tiny forwards, once per model, not while other hooks are open."""
    if "padding" in _CHECKED.setdefault(model, set()) or _hooks_open(model):
        return
    dev = next(model.parameters()).device
    ids = torch.tensor([[5, 6, 7, 8]], device=dev)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]], device=dev)
    extra = {"position_ids": (mask.cumsum(-1) - 1).clamp_min(0)} if position_ids else {}

    def last(out) -> torch.Tensor:
        return getattr(out, "logits", out)[0, -1].double()  # a hand-built decoder may return the logits themselves

    alone = last(model(input_ids=ids, use_cache=False))
    padded = last(model(input_ids=torch.cat([torch.zeros_like(ids[:, :2]), ids], 1), attention_mask=mask,
                        use_cache=False, **extra))
    err = float((padded - alone).norm() / alone.norm().clamp_min(1e-30))
    # half precision: the default model reads 0.020 in bf16 (9.5e-6 in fp32), RecurrentGemma 0.42 in fp32
    if torch.isfinite(alone).all() and err > STREAM_TOL.get(next(model.parameters()).dtype, 0.2):
        raise RefdirError(f"refdir cannot run this architecture ({type(model).__name__}) in batches: a left-padded "
                          f"row's logits differ from the row alone (relative difference {err:.2g}), so its token "
                          "mixer reads the padding the attention mask hides")
    _CHECKED[model].add("padding")


# models (weakly held) whose blocks (and "padding") passed the checks: the structure of a loaded model does not
# change, and a run inspects its model some 30 times (the checks cost ~70 ms each on the default model in bf16)
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


STREAM_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}  # relative; half precision: 0.05 (its rounding ~0.004)


def check_stream(block, seen: dict, written: dict, embs: list) -> None:
    """Refuse a model whose residual stream is not the sum of what the writers found here write: block 0's
    output must be a multiple of its input plus multiples of what each of its token mixers and MLPs adds (``written``:
    component → outputs; scalar multipliers, as Granite's, keep a direction out), and block 0's input a multiple
    of the sum of the embeddings' outputs (Gemma scales it by √d). Least squares in float64; relative error
    against the norms involved."""
    x, y = seen.get("in"), seen.get("out")
    parts = [t for c in ("attn", "mlp") for t in written[c] if t is not None]  # a module not called writes nothing
    name = type(block.block).__name__
    if x is not None and parts and x.shape[-1] != parts[0].shape[-1]:
        raise RefdirError(
            f"refdir cannot edit this architecture: the residual stream into block {block.index} ({name}) is "
            f"{x.shape[-1]} wide and its attention and MLP write {parts[0].shape[-1]} (several parallel streams, "
            "as with hyper-connections), so a direction of the writers' width does not describe the stream")
    if x is None or y is None or any(p.numel() != y.numel() for p in parts) or x.shape != y.shape:
        return  # nothing to compare (an unusual call signature): the checkpoint's verification still runs
    parts = [p.reshape(y.shape) for p in parts]  # experts that return [tokens, d] (Gemma 4's)
    tol = STREAM_TOL.get(x.dtype, 0.05)
    cols = [t.detach().double().cpu().reshape(-1) for t in (x, *parts)]
    target = y.detach().double().cpu().reshape(-1)
    if not all(bool(torch.isfinite(t).all()) for t in (*cols, target)):
        return  # overflow or NaN weights: the commands' own checks report those with their cause
    a = torch.stack(cols, 1)
    coef = torch.linalg.lstsq(a, target.unsqueeze(1)).solution
    err = float((target - (a @ coef).squeeze(1)).norm() / sum(c.norm() for c in cols).clamp_min(1e-30))
    if err > tol:
        raise RefdirError(
            f"refdir cannot edit this architecture: block {block.index} ({name}) adds more to the residual stream "
            f"than its attention and MLP outputs (relative difference {err:.2g}): another branch writes to the "
            "stream, or the residual is scaled per channel, so a direction removed from their writers would stay "
            "in the stream")
    if embs:
        err = embedding_misfit(x, embs, per_token=True)
        if err is not None and err > tol:
            raise RefdirError(
                f"refdir cannot edit this architecture: the input of block 0 ({name}) is not a multiple of "
                f"what its embeddings write (relative difference {err:.2g}; a fixed position signal or a norm "
                "with weights in between), so a direction removed from the embeddings would stay in the stream")


def embedding_misfit(x: torch.Tensor, embs: list, per_token: bool) -> float | None:
    """How far block 0's input ``x`` is from a multiple of the sum of the embeddings' outputs (relative; None when
    the shapes differ): one multiple for every token (Gemma's √d), or ``per_token``, one multiple per token, which
    a parameter-free norm between the embedding and the first block gives (nanochat). Either keeps a direction the
    embeddings do not write out of the stream."""
    e = sum(t.detach().double().cpu() for t in embs)
    if e.shape != x.shape:
        return None
    x = x.detach().double().cpu()
    dims = (-1,) if per_token else tuple(range(x.dim()))
    c = (e * x).sum(dims, keepdim=True) / (e * e).sum(dims, keepdim=True).clamp_min(1e-30)
    return float((x - c * e).norm() / x.norm().clamp_min(1e-30))


@torch.no_grad()
def check_writers(model: nn.Module, block, seen: dict) -> None:
    """Refuse a model whose attention or MLP writes through a parameter not found here: remove from block 0's
    writers, in place, the direction each component wrote most in the trace (its output's mean), trace again, and
    require that component's output to have lost it; the weights are put back, also on error."""
    params = [getattr(w.module, w.param) for w in block.writers]
    keys = {c: [c if i == 0 else f"{c}+{i}" for i in range(len(block.modules(c)))] for c in ("attn", "mlp")}
    keys = {c: ks for c, ks in keys.items() if ks}  # a block may hold one component only (Nemotron-H)
    if any(p.is_meta for p in params) or not keys or any(c not in seen for c in keys):
        return
    first = seen[next(iter(keys))]
    d = first.shape[-1]
    if not all(bool(torch.isfinite(seen[k]).all()) for ks in keys.values() for k in ks if k in seen):
        return

    def total(got: dict, c: str) -> torch.Tensor:  # what the component's modules output together, [tokens, d]
        return sum(got[k].detach().double().cpu().reshape(-1, d) for k in keys[c] if k in seen)

    dirs = {c: total(seen, c).mean(0) for c in keys}
    dirs = {c: v / v.norm() for c, v in dirs.items() if v.norm() > 0}
    saved = [p.detach().clone() for p in params]
    after: dict[str, torch.Tensor] = {}
    try:
        for c, r in dirs.items():
            for w in block.component_writers(c):
                p = getattr(w.module, w.param)
                project_along_(p.data, 0 if p.dim() == 1 else w.out_axis, (r, 1.0, False))
        hooks = [m.register_forward_hook(lambda _m, _a, out, k=k: after.__setitem__(k, output_hidden(out)))
                 for c in dirs for k, m in zip(keys[c], block.modules(c), strict=True) if k in seen]
        with registered(hooks):
            model(input_ids=torch.tensor([[1, 2, 3]], device=params[0].device), use_cache=False)
    finally:
        for p, v in zip(params, saved, strict=True):
            p.data.copy_(v)
    tol = 0.05 if first.dtype in (torch.bfloat16, torch.float16) else 1e-3
    for c, r in dirs.items():
        before = (total(seen, c) @ r).abs().sum()
        left = float((total(after, c) @ r).abs().sum() / before.clamp_min(1e-30))
        if left > tol:
            raise RefdirError(
                f"refdir cannot edit this architecture: the {c} module of block {block.index} ({type(block.block).__name__}) "
                f"still writes {left:.0%} of a direction removed from every writer found in it "
                f"({', '.join(w.name for w in block.component_writers(c)) or 'none'}): it writes through a "
                "parameter refdir does not know")

