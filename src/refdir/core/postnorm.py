"""Post-norms: where a block normalizes its attention or MLP output before adding it to the residual stream
(Gemma 2/3/4, OLMo 2), and the weight edit that still removes r from the stream exactly.

A block with a post-norm writes ``n(y) = g ⊙ y / rms(y)`` (``y = W z`` the module's output), so
``n(y)·r = y·(g ⊙ r) / rms(y)``. Making ``W`` orthogonal to ``u = g ⊙ r / |g ⊙ r|`` (instead of to r) makes
``y·u = 0`` for every input, hence ``n(y)·r = 0``: the block writes nothing along r, exactly. With a ``(1 + w)``
gain, ``g = 1 + w``. For a LayerNorm, ``n(y) = g ⊙ (y − mean(y)) / std(y) + β``: then ``u`` is ``g ⊙ r`` centred
(``(y − mean(y))·v = y·(v − mean(v))``), and the bias loses its r component. The norm's scale ``1/rms(y)`` still
changes, so the edited block's output is not the normed output with r removed afterwards (the paper's ablation,
defined for pre-norm models, which no weight edit computes): the ablation hooks therefore act here too, on ``y``
(:func:`refdir.core.interventions.ablate`), and equal the weights.

Chains (Gemma 4): a module's output may pass several norms before the stream, e.g. ``n_f(n_1(y) + n_2(z))``. From
the outermost norm in, each norm's output must avoid the direction of the level above it, so the writers of ``y``
are made orthogonal to ``normalize(g_1 ⊙ normalize(g_f ⊙ r))`` (:func:`chain_basis`; :func:`under_chain` for the
hooks' per-row directions); then ``n_1(y)`` and ``n_2(z)`` write nothing along ``g_f ⊙ r``, nor does their sum,
and ``n_f``'s output nothing along r.

A subspace (orthonormal basis B [k, d], rows b_i) generalises this exactly, for any k: ``B n(y) = M y / rms(y)``
with ``M = B diag(g)`` (rows ``g ⊙ b_i``; centred for a centring norm), so ``B n(y) = 0`` for every input iff
``y ⊥ rowspace(M)``. The writers are made orthogonal to an orthonormal basis U of that row space
(:func:`gain_basis`: ``W ← (I − UᵀU) W``), and a centring norm's bias loses its span(B) part. U may have fewer
than k rows where the gain zeroes some combination of B (that combination cannot be written at all).

Two ways to find post-norms without running the model:

- :func:`static_post_norms` reads the block class's ``forward`` source (its data flow): a norm child called on a
  variable that holds the attention's (or MLP's) output, unchanged except through parameterless children such as
  dropout, is that module's post-norm. This works on a skeleton built on the meta device from a config alone, but
  finds one norm per primary module: streaming takes a traced narrow copy's chains instead
  (:func:`refdir.core.architecture.post_layouts`), and this reading only where no copy could be built.
- :func:`norm_form` tells how a norm module scales its output (RMS or centred, gain ``w`` or ``1 + w``, bias) by
  applying a copy of that one module, with synthetic parameters, to a fixed vector: no weights, no model forward.
"""

from __future__ import annotations

import ast
import copy
import inspect
import textwrap
from dataclasses import dataclass

import torch
from torch import nn

COMPONENTS = ("attn", "mlp")


# ------------------------------------------------------------------------------------ the block's data flow


def _child_call(node: ast.AST) -> str | None:
    """The child name ``X`` when ``node`` is a call ``self.X(...)`` (or ``self.X(...)[i]``)."""
    if isinstance(node, ast.Subscript):
        node = node.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"):
        return node.func.attr
    return None


def _first_input(call: ast.Call) -> str | None:
    """The variable passed as a call's first positional argument, or as ``hidden_states=``."""
    if call.args and isinstance(call.args[0], ast.Name):
        return call.args[0].id
    for kw in call.keywords:
        if kw.arg == "hidden_states" and isinstance(kw.value, ast.Name):
            return kw.value.id
    return None


def _target_names(targets: list[ast.expr]) -> tuple[str | None, list[str]]:
    """The variable that receives a call's (first) result, and every other variable assigned."""
    first, others = None, []
    for t in targets:
        elts = t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]
        for k, e in enumerate(elts):
            if isinstance(e, ast.Name):
                if first is None and k == 0:
                    first = e.id
                else:
                    others.append(e.id)
    return first, others


def _statements(func: ast.FunctionDef) -> list[ast.stmt]:
    """The simple statements of ``func`` in source order (inside if/with/for too, not in nested functions)."""
    out: list[ast.stmt] = []

    def visit(body):
        for st in body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            if isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Expr, ast.Return)):
                out.append(st)
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(st, field, []) or [])

    visit(func.body)
    return out


def static_post_norms(block: nn.Module, attn_name: str | None, mlp_name: str | None) -> dict[str, str | None] | None:
    """``{"attn": child name or None, "mlp": ...}``: the post-norms of ``block``, read from its class's
    ``forward`` source. None when the source cannot be read or does not call every module named (a block may have
    one component only: None for the other)."""
    try:
        src = textwrap.dedent(inspect.getsource(inspect.unwrap(type(block).forward)))
        func = ast.parse(src).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    children = dict(block.named_children())
    norms = {n for n, c in children.items() if is_norm(c)}
    passthrough = {n for n, c in children.items() if n not in norms and not any(True for _ in c.parameters())}
    label = {n: c for c, n in (("attn", attn_name), ("mlp", mlp_name)) if n is not None}
    origin: dict[str, str] = {}  # variable -> the module whose output it holds, unchanged
    found: dict[str, str | None] = {"attn": None, "mlp": None}
    called: set[str] = set()
    for st in _statements(func):
        value = getattr(st, "value", None)
        for node in ast.walk(value) if value is not None else ():
            child = _child_call(node)
            if child in label:
                called.add(label[child])
            if child in norms and isinstance(node, ast.Call):
                src_var = _first_input(node)
                if src_var in origin:
                    found[origin[src_var]] = child
        if not isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            continue
        targets = st.targets if isinstance(st, ast.Assign) else [st.target]
        first, others = _target_names(targets)
        child = _child_call(value) if value is not None and not isinstance(st, ast.AugAssign) else None
        new = label.get(child)
        if new is None and child in passthrough and isinstance(value, ast.Call):
            new = origin.get(_first_input(value))
        for name in [first, *others]:
            origin.pop(name, None)
        if first is not None and new is not None:
            origin[first] = new
    if called != set(label.values()):
        return None
    return found


def is_norm(mod: nn.Module) -> bool:
    """A normalization module: an nn.LayerNorm, or any class whose name says norm (RMSNorm variants)."""
    return isinstance(mod, nn.LayerNorm) or "norm" in type(mod).__name__.lower()


# ------------------------------------------------------------------------------------ how a norm scales


@dataclass(frozen=True)
class NormForm:
    """How a norm module maps ``y`` to its output: ``(offset + weight) ⊙ ŷ (+ bias)``, where ``ŷ`` is ``y``
    divided by its RMS, or (``centred``) ``y`` minus its mean divided by its standard deviation."""

    centred: bool
    offset: float  # 0 (gain = weight) or 1 (gain = 1 + weight, as in Gemma)
    has_bias: bool


def norm_form(norm: nn.Module) -> NormForm | None:
    """The :class:`NormForm` of ``norm``, found by applying a CPU copy of it, with synthetic parameters, to a
    fixed vector (works for modules on the meta device too). None when it is not of that form."""
    params = dict(norm.named_parameters(recurse=False))
    if "weight" not in params or set(params) - {"weight", "bias"} or params["weight"].dim() != 1:
        return None
    with torch.device("cpu"):  # also when called inside a meta-device context
        return _probe(norm, "bias" in params)


def _probe(norm: nn.Module, has_bias: bool) -> NormForm | None:
    d = norm.weight.numel()
    probe = copy.deepcopy(norm).to_empty(device="cpu").to(torch.float64)
    x = torch.linspace(-1.0, 2.0, d, dtype=torch.float64).unsqueeze(0) ** 3 + 0.5
    w = torch.linspace(0.5, 1.5, d, dtype=torch.float64)

    def run(weight: torch.Tensor, bias: float = 0.0) -> torch.Tensor:
        with torch.no_grad():
            probe.weight.copy_(weight)
            if has_bias:
                probe.bias.fill_(bias)
            return probe(x.clone()).to(torch.float64).squeeze(0)

    offset = 0.0 if run(torch.zeros(d)).abs().max() < 1e-12 else 1.0
    y_unit = run(torch.full((d,), 1.0 - offset))
    for centred in (False, True):
        ref = x.squeeze(0) - (x.mean() if centred else 0.0)
        ref = ref / ref.norm()
        if torch.allclose(y_unit / y_unit.norm(), ref, atol=1e-6):
            break
    else:
        return None
    if not torch.allclose(run(w - offset), y_unit * w, rtol=1e-6, atol=1e-9):
        return None  # not an elementwise gain
    if has_bias and not torch.allclose(run(torch.full((d,), 1.0 - offset), 0.25), y_unit + 0.25, atol=1e-9):
        return None
    return NormForm(centred, offset, has_bias)


def gain_direction(r: torch.Tensor, gain: torch.Tensor, centred: bool) -> torch.Tensor | None:
    """The unit vector a writer under a post-norm must be orthogonal to: ``gain ⊙ r`` (centred for a centring
    norm), normalized; float64. None when it vanishes (then that block cannot write along r at all)."""
    u = gain.to(torch.float64) * r.to(torch.float64)
    if centred:
        u = u - u.mean()
    n = u.norm()
    if not torch.isfinite(n) or n <= 1e-12 * gain.to(torch.float64).norm() * r.to(torch.float64).norm():
        return None
    return u / n


def gain_basis(basis: torch.Tensor, gain: torch.Tensor, centred: bool) -> torch.Tensor | None:
    """The subspace counterpart of :func:`gain_direction`: an orthonormal basis U [m, d] (m ≤ k; float64) of the
    span of the rows ``gain ⊙ b_i`` of the orthonormal basis ``basis`` [k, d] (each centred for a centring norm),
    which the writers under a post-norm are made orthogonal to, so that the norm's output has no component in
    span(basis), exactly. Directions whose singular value is at most ``1e-12 · |gain|`` are dropped (the norm
    cannot write along them); None when all are (nothing to remove). A 1-D ``basis`` is :func:`gain_direction`."""
    if basis.dim() == 1:
        return gain_direction(basis, gain, centred)
    g = gain.to(torch.float64)
    m = basis.to(torch.float64) * g
    if centred:
        m = m - m.mean(dim=1, keepdim=True)
    _, sv, vh = torch.linalg.svd(m, full_matrices=False)
    keep = torch.isfinite(sv) & (sv > 1e-12 * g.norm())
    if not bool(keep.any()):
        return None
    return vh[keep].contiguous()


def norm_gain(norm: nn.Module, form: NormForm) -> torch.Tensor:
    """The elementwise gain of ``norm`` (``offset + weight``), float64."""
    return form.offset + norm.weight.detach().to(torch.float64)


def under_post_norm(d: torch.Tensor, post: tuple[torch.Tensor, bool] | None) -> torch.Tensor:
    """The direction(s) ``d`` [d] or [K, d] as the writers under a post-norm of gain ``post`` (one of :func:`chain_gains`)
    remove them: ``gain ⊙ d`` normalized (:func:`gain_direction`; float64, a zero row where the norm cannot write
    along it); ``d`` itself without a post-norm."""
    if post is None:
        return d
    gain, centred = post
    rows = d.reshape(-1, d.shape[-1]).to(torch.float64)
    out = torch.zeros_like(rows)
    for k, v in enumerate(rows):
        if float(v.norm()) > 0:
            u = gain_direction(v, gain.to(v.device), centred)
            out[k] = 0.0 if u is None else u
    return out.reshape(d.shape)


def known_chain(forms: list[NormForm | None]) -> bool:
    """Whether a weight edit under these post-norms (innermost first) is exact: every form known, and a bias only on
    a lone norm (a bias inside a chain of several adds to the sum what no writer's edit removes)."""
    return all(f is not None and not (f.has_bias and len(forms) > 1) for f in forms)


def chain_gains(bp, mod: nn.Module) -> list[tuple[torch.Tensor, bool]] | None:
    """(gain, centred) of each post-norm between ``mod``'s output and the stream in block ``bp`` (an
    architecture's ``BlockParts``, not imported here: that module imports this one), innermost first; [] without
    one; None where :func:`known_chain` fails."""
    chain = bp.chain(mod)
    forms = [norm_form(n) for n in chain]
    return [(norm_gain(n, f), f.centred) for n, f in zip(chain, forms, strict=True)] if known_chain(forms) else None


def chain_basis(gains: list[tuple[torch.Tensor, bool]], r: torch.Tensor) -> torch.Tensor | None:
    """What writers under post-norms of these gains (:func:`chain_gains`) are made orthogonal to, for a direction
    or an orthonormal basis r: from the outermost norm in, the span of each gain ⊙ the rows so far
    (:func:`gain_basis`); None when that vanishes (nothing to remove)."""
    u = r
    for gain, centred in reversed(gains):
        u = gain_basis(u, gain.to(u.device), centred)
        if u is None:
            return None
    return u


def chain_span(gains: list[tuple[torch.Tensor, bool]], span: torch.Tensor) -> torch.Tensor:
    """:func:`chain_basis` for a span being trained ([k, d], gradients kept): the rows of ``span`` times each gain
    from the outermost norm in (centred where the norm centres) span the same subspace, orthonormalized here by QR.
    (:func:`chain_basis` also drops directions a gain annihilates, which a trained span under real gains has not.)"""
    m = span
    for gain, centred in reversed(gains):
        m = m * gain.to(m)
        if centred:
            m = m - m.mean(-1, keepdim=True)
    return torch.linalg.qr(m.T)[0].T


def under_chain(d: torch.Tensor, gains: list[tuple[torch.Tensor, bool]] | None) -> torch.Tensor:
    """The direction(s) ``d`` [d] or [K, d] as the writers under a chain of post-norms (:func:`chain_gains`) remove
    them: from the outermost norm in, each norm's ``gain ⊙ d`` normalized (:func:`under_post_norm`); ``d`` itself
    without post-norms (or of an unknown form: approximate)."""
    for g in reversed(gains or []):
        d = under_post_norm(d, g)
    return d


def edit_exact(arch) -> bool:
    """Whether a parameterised edit's weights compute what its hooks compute (:mod:`refdir.core.edits`): every
    post-norm found, and of a known form."""
    return arch.post_norms_known and all(
        chain_gains(bp, m) is not None for bp in arch.blocks for c in COMPONENTS for m in bp.modules(c))
