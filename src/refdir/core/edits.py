"""Parameterised edits of the residual stream: which direction, how strongly per layer and component,
and which variant — applied either as hooks or as weights, with the same result.

An :class:`Edit` holds

- the **direction**: the difference-in-means candidate at ``position`` and a *float* ``layer``; between two
  layers it is the normalised interpolation of the two adjacent candidates' unit vectors,
  ``r̂ = normalize((1 − t)·ĉ[⌊ℓ⌋] + t·ĉ[⌈ℓ⌉])`` with ``t = ℓ − ⌊ℓ⌋``. With ``direction`` set to a name other
  than ``"dim"``, r̂ is instead the candidates' optimized direction of that name (``Candidates.optimized``, e.g.
  ``"rdo"``, one vector for every layer); position and layer then only locate the harmless mean of the
  ``projected`` variant;
- per component (attention out, MLP out) a **strength kernel** over layers and a **variant**;
- whether the **embedding** is edited (strength 1, plain variant);
- optionally a **second** direction (:class:`Second`: an optimized direction by name, made orthogonal to r̂) that
  every writer and the embedding lose ``strength`` of, applied after the edit above (the run's choice adds one
  where its KL leaves room: ``refdir.workflows.search.add_second``).

Strength. A strength ``s ∈ [0, 1]`` on a component of block ``i`` means that component's output loses
``s`` times its part along r̂: as a hook ``out ← out − s·(out·r̂) r̂``; as weights ``W ← W − s·r̂ r̂ᵀ W``
(and its bias ``b ← b − s·(b·r̂) r̂``). The kernel: ``peak`` at layer ``center``, falling linearly to
``floor`` at distance ``width``, zero beyond; ``width=None`` means every layer at ``peak``.

Variants (per component):

- ``plain``: the edit above with r̂;
- ``projected``: r̂ is first made orthogonal to the harmless mean at the direction's own (interpolated)
  layer and position, ``r' = r̂ − (r̂·m̂) m̂``, renormalised;
- ``norm``: norm-preserving. Each *write vector* of an edited weight — the d_model-vector one input unit
  writes to the stream (a column ``W[:, j]`` of an ``nn.Linear`` weight ``W [d_model, n]``; the slice along the
  output axis for fused expert tensors) — is projected as in ``plain`` and then rescaled to its original
  norm. Biases are projected only. As a hook this is the same edited weight: the writer's input unit ``j``
  is multiplied by ``‖w_j‖ / ‖w_j − s(w_j·r̂)r̂‖`` and the component's output is projected, which equals
  ``W'' x + b'`` exactly (hooks need linear writers; fused 3-D experts get the weight form only).

Post-norms (Gemma 2/3/4, OLMo 2: a block writes ``norm(y) = g ⊙ ŷ``): the edit acts on ``y``, where the writers
write, along ``u = normalize(g ⊙ d)`` (:func:`refdir.core.postnorm.under_chain`: through every norm of a chain, per
module; Gemma 4 norms its MLP and experts each, then their sum), so at strength 1 the block
writes nothing along d and hooks and weights are the same linear edit (removing d after the norm is not one).

The existing full ablation is the special case :meth:`Edit.full`: strength 1 at every layer on both
components, plain, embedding on; its hooks equal :func:`refdir.core.interventions.ablate` and its weights
:func:`refdir.core.orthogonalize.orthogonalize_`, post-norm models included (all three act under the norms).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from refdir.core.architecture import Architecture, BlockParts, Writer, inspect_model
from refdir.core.directions import Candidates, unit_vector
from refdir.core.hooks import registered, remove_all
from refdir.core.orthogonalize import untie_lm_head
from refdir.core.postnorm import chain_gains, edit_exact, under_chain
from refdir.core.projection import input_scale, project_along_
from refdir.core.row_hooks import Rows, out_hook, scale_pre_hook
from refdir.errors import RefdirError

VARIANTS = ("plain", "projected", "norm")
COMPONENTS = ("attn", "mlp")
DIM = "dim"  # an edit's direction: the difference-in-means candidate


@dataclass
class Kernel:
    """Strength over layers: ``peak`` at ``center``, linear to ``floor`` at distance ``width``, 0 beyond."""

    peak: float = 1.0
    center: float = 0.0
    width: float | None = None  # None: every layer at peak
    floor: float = 0.0

    def validate(self) -> None:
        for name in ("peak", "floor"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise RefdirError(f"kernel {name} must be a strength in [0, 1], got {v!r}")
        if self.width is not None and not (self.width > 0 and math.isfinite(self.width)):
            raise RefdirError(f"kernel width must be positive (or None for every layer), got {self.width!r}")
        if not math.isfinite(self.center):
            raise RefdirError(f"kernel center must be finite, got {self.center!r}")

    def strength(self, layer: int) -> float:
        if self.width is None:
            return float(self.peak)
        d = abs(layer - self.center)
        if d > self.width:
            return 0.0
        return float(self.peak + (self.floor - self.peak) * d / self.width)

    def strengths(self, n_layers: int) -> list[float]:
        return [self.strength(i) for i in range(n_layers)]


@dataclass
class Component:
    kernel: Kernel = field(default_factory=Kernel)
    variant: str = "plain"


@dataclass
class Second:
    """A second direction: ``Candidates.optimized[direction]`` made orthogonal to the edit's r̂, removed at
    ``strength`` from every writer's output and the embedding, after the edit's own direction."""

    direction: str
    strength: float

    def validate(self) -> None:
        if not (isinstance(self.strength, (int, float)) and 0.0 < self.strength <= 1.0):
            raise RefdirError(f"the second direction's strength must lie in (0, 1], got {self.strength!r}")


@dataclass
class Edit:
    """One edit, saved with every result (``to_dict`` / ``from_dict``)."""

    position: int
    layer: float
    attn: Component = field(default_factory=Component)
    mlp: Component = field(default_factory=Component)
    embedding: bool = True
    direction: str = DIM  # "dim": the difference-in-means candidate; else a name in Candidates.optimized
    second: Second | None = None

    @classmethod
    def full(cls, position: int, layer: float, direction: str = DIM) -> Edit:
        """The plain full ablation: strength 1 everywhere, embedding included."""
        return cls(position, float(layer), Component(Kernel(1.0)), Component(Kernel(1.0)), True, direction)

    def validate(self, n_layers: int | None = None) -> None:
        for c in COMPONENTS:
            comp = getattr(self, c)
            if comp.variant not in VARIANTS:
                raise RefdirError(f"unknown variant {comp.variant!r} for {c}; choose one of {', '.join(VARIANTS)}")
            comp.kernel.validate()
        if not math.isfinite(self.layer) or self.layer < 0 or (n_layers is not None and self.layer > n_layers):
            raise RefdirError(f"direction layer {self.layer} outside 0..{n_layers}")
        if self.second is not None:
            self.second.validate()

    def strengths(self, n_layers: int) -> dict[str, list[float]]:
        return {c: getattr(self, c).kernel.strengths(n_layers) for c in COMPONENTS}

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.direction == DIM:  # edits saved before optimized directions existed read back the same
            del d["direction"]
        if self.second is None:
            del d["second"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Edit:
        try:
            comps = {c: Component(Kernel(**d[c]["kernel"]), d[c].get("variant", "plain")) for c in COMPONENTS}
            sec = d.get("second")
            e = cls(int(d["position"]), float(d["layer"]), comps["attn"], comps["mlp"], bool(d.get("embedding", True)),
                    str(d.get("direction", DIM)),
                    None if sec is None else Second(str(sec["direction"]), float(sec["strength"])))
        except (KeyError, TypeError, ValueError) as ex:
            raise RefdirError(f"not a refdir edit: {ex}") from ex
        e.validate()
        return e

    def describe(self) -> str:
        parts = [f"pos {self.position} layer {self.layer:.2f}"]
        if self.direction != DIM:
            # an optimized direction does not depend on the edit's position and layer: only the projected
            # variant reads them (the harmless mean it projects against)
            projected = any(getattr(self, c).variant == "projected" for c in COMPONENTS)
            parts = [f"{self.direction}" + (f" (harmless mean at {parts[0]})" if projected else "")]
        for c in COMPONENTS:
            k = getattr(self, c).kernel
            v = getattr(self, c).variant
            if k.width is None:
                parts.append(f"{c} {v} {k.peak:.2f} everywhere")
            else:
                parts.append(f"{c} {v} {k.peak:.2f}@{k.center:.1f}±{k.width:.1f}→{k.floor:.2f}")
        parts.append("emb" if self.embedding else "no emb")
        if self.second is not None:
            parts.append(f"+ {self.second.direction} {self.second.strength:.2f} everywhere")
        return ", ".join(parts)


# --------------------------------------------------------------------------------------------- resolution


def _unit(v: torch.Tensor) -> torch.Tensor:
    return unit_vector(v, torch.float64, "the edit's direction")


def interpolate(t: torch.Tensor, position_index: int, layer: float) -> torch.Tensor:
    """Normalised interpolation of the unit vectors of ``t[position_index, ⌊layer⌋]`` and ``⌈layer⌉``."""
    lo = int(math.floor(layer))
    hi = min(lo + 1, t.shape[1] - 1)
    w = layer - lo
    a = _unit(t[position_index, lo])
    if w == 0 or hi == lo:
        return a
    return _unit((1 - w) * a + w * _unit(t[position_index, hi]))


@dataclass
class Plan:
    """A resolved edit: unit directions (float64) and per-layer strengths."""

    r: torch.Tensor  # plain direction, used by the embedding
    directions: dict[str, torch.Tensor]  # per component: r̂ or the projected r̂
    strengths: dict[str, list[float]]
    variants: dict[str, str]
    embedding: bool
    second: tuple[torch.Tensor, float] | None = None  # (unit direction ⊥ r, strength): every writer, after the rest

    @classmethod
    def full(cls, direction: torch.Tensor, n_layers: int) -> Plan:
        r = _unit(direction)
        return cls(r, {c: r for c in COMPONENTS}, {c: [1.0] * n_layers for c in COMPONENTS},
                   {c: "plain" for c in COMPONENTS}, True)


def projected_direction(r: torch.Tensor, harmless_mean: torch.Tensor) -> torch.Tensor:
    """r̂ made orthogonal to the harmless mean, renormalised."""
    m = _unit(harmless_mean)
    return _unit(r - (r @ m) * m)


def resolve(edit: Edit, cands: Candidates) -> Plan:
    """Turn an :class:`Edit` into unit directions and strengths for a model with ``cands.n_layers`` blocks."""
    L = cands.n_layers
    edit.validate(L)
    if edit.position not in cands.positions:
        raise RefdirError(f"position {edit.position} not among the candidates' positions {cands.positions}")
    pi = cands.positions.index(edit.position)
    if edit.direction == DIM:
        r = interpolate(cands.vectors, pi, edit.layer)
    elif edit.direction in cands.optimized:
        r = _unit(cands.optimized[edit.direction])
    else:
        have = ", ".join(cands.optimized) or "none"
        raise RefdirError(f"the edit uses the optimized direction {edit.direction!r}, which these candidates lack "
                          f"(they have: {have})")
    dirs = {}
    for c in COMPONENTS:
        if getattr(edit, c).variant == "projected":
            dirs[c] = projected_direction(r, _interp_raw(cands.harmless_mean, pi, edit.layer))
        else:
            dirs[c] = r
    second = None
    if edit.second is not None:
        name = edit.second.direction
        if name not in cands.optimized:
            raise RefdirError(f"the edit's second direction {name!r} is not among the candidates' optimized ones")
        u = _unit(cands.optimized[name])
        w = u - (u @ r) * r
        if float(w.norm()) < 1e-6:
            raise RefdirError(f"the second direction {name!r} is parallel to the edit's direction")
        second = (_unit(w), float(edit.second.strength))
    return Plan(r, dirs, edit.strengths(L), {c: getattr(edit, c).variant for c in COMPONENTS}, edit.embedding,
                second)


def _interp_raw(t: torch.Tensor, pi: int, layer: float) -> torch.Tensor:
    lo = int(math.floor(layer))
    hi = min(lo + 1, t.shape[1] - 1)
    w = layer - lo
    return (1 - w) * t[pi, lo].double() + w * t[pi, hi].double()


# --------------------------------------------------------------------------------------------- shared pieces


def component_writers(bp: BlockParts, component: str) -> list[Writer]:
    return bp.component_writers(component)


# --------------------------------------------------------------------------------------------- hooks


def edit_hooks(model: nn.Module, plan: Plan | Sequence[Plan | None], arch: Architecture | None = None,
               rows: Rows | None = None) -> list:
    """Register the hooks that apply ``plan``, or several plans at once, one per batch row as ``rows`` assigns
    them (``None``: the base model for its rows); returns the handles (see :func:`hooked`, :func:`hooked_rows`)."""
    arch = arch or inspect_model(model)
    plans = [plan] if isinstance(plan, Plan) else list(plan)
    if not plans or (rows is None and len(plans) > 1) or (rows is not None and rows.n != len(plans)):
        raise RefdirError("several plans need a Rows assignment with one entry per plan")
    rows = rows or Rows(1)
    for p in plans:
        if p is not None:
            _check(p, arch)
    d = arch.d_model
    zeros = torch.zeros(d, dtype=torch.float64)

    def stack(c: str | None, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Directions [K, d] and strengths [K] of every plan at block i's component c (None: the embedding)."""
        dirs, s = [], []
        for p in plans:
            on = p is not None and (p.embedding if c is None else p.strengths[c][i] > 0)
            dirs.append((p.r if c is None else p.directions[c]) if on else zeros)
            s.append((1.0 if c is None else p.strengths[c][i]) if on else 0.0)
        return torch.stack(dirs), torch.tensor(s, dtype=torch.float64)

    # the second direction: every writer and (with the embedding edited) the embedding, after the edit itself
    seconds = [None if p is None else p.second for p in plans]
    second_r = torch.stack([zeros if x is None else x[0].to(torch.float64).cpu() for x in seconds])
    second_s = torch.tensor([0.0 if x is None else x[1] for x in seconds], dtype=torch.float64)
    second_emb = torch.tensor([0.0 if x is None or not p.embedding else x[1] for x, p in zip(seconds, plans, strict=True)],
                              dtype=torch.float64)

    handles: list = []
    try:
        if any(p is not None and p.embedding for p in plans):
            r, s = stack(None, 0)
            for _n, emb in arch.embeddings:
                handles.append(emb.register_forward_hook(out_hook(rows, r, s)))
                if (second_emb > 0).any():
                    handles.append(emb.register_forward_hook(out_hook(rows, second_r, second_emb)))
        for bp in arch.blocks:
            for c in COMPONENTS:
                rc, s = stack(c, bp.index)
                norm = [k for k, p in enumerate(plans) if p is not None and s[k] > 0 and p.variants[c] == "norm"]
                for mod in bp.modules(c):  # on what the writers write, before any post-norm (module docstring)
                    gains = chain_gains(bp, mod)
                    r, r2 = under_chain(rc, gains), under_chain(second_r, gains)
                    # hooks run in the order they were registered: the second direction after the edit
                    if (s > 0).any():
                        handles.append(mod.register_forward_hook(out_hook(rows, r, s)))
                    if (second_s > 0).any():
                        handles.append(mod.register_forward_hook(out_hook(rows, r2, second_s)))
                    if norm:
                        handles += _norm_hooks(bp.writers_of(mod), rows, r, s, norm)
    except Exception:
        remove_all(handles)
        raise
    return handles


def _norm_hooks(writers: list[Writer], rows: Rows, r: torch.Tensor, s: torch.Tensor, norm: list[int]) -> list:
    """The ``norm`` variant's input rescaling (module docstring) for the plans ``norm`` on these writers."""
    handles = []
    for w in writers:
        if _is_bias(w):
            continue
        if not _norm_hookable(w):
            raise RefdirError(f"the norm-preserving variant as hooks needs linear writers; {w.name} "
                              "is a fused expert tensor (apply the edit as weights instead)")
        wt = w.module.weight.movedim(w.out_axis, 0)  # [d_model, inputs], also for GPT-2's Conv1D
        scale = torch.ones(r.shape[0], wt.shape[1], dtype=torch.float64)
        for k in norm:
            scale[k] = input_scale(wt, r[k], float(s[k]))
        handles.append(w.module.register_forward_pre_hook(scale_pre_hook(rows, scale)))
    return handles


@contextmanager
def hooked(model: nn.Module, plan: Plan, arch: Architecture | None = None) -> Iterator[None]:
    """Apply ``plan`` as hooks while the context is open (removed on exit, also on error)."""
    with registered(edit_hooks(model, plan, arch)):
        yield


@contextmanager
def hooked_rows(model: nn.Module, plans: Sequence[Plan | None], arch: Architecture | None = None) -> Iterator[Rows]:
    """Apply several plans in one forward pass, one per batch row: yields the :class:`Rows` whose
    :meth:`~Rows.use` assigns each row its plan (``None`` in ``plans``: the unedited model). Row ``b`` then computes
    exactly what ``hooked(model, plans[k])`` computes for it. Used to score or generate many edits in one batch."""
    rows = Rows(len(plans))
    with registered(edit_hooks(model, plans, arch, rows)):
        yield rows


# --------------------------------------------------------------------------------------------- weights


@torch.no_grad()
def apply_weights_(model: nn.Module, plan: Plan, arch: Architecture | None = None) -> dict:
    """Edit the weights of ``model`` in place so that it computes what :func:`hooked` computes."""
    arch = arch or inspect_model(model)
    _check(plan, arch)
    if not (exact := edit_exact(arch)):
        warnings.warn("post-norms of an unknown form: a weight edit only approximates the hooks", stacklevel=2)
    edited, untied = [], False
    second = [] if plan.second is None else [(plan.second[0], plan.second[1], False)]  # after the edit itself
    if plan.embedding:
        untied = untie_lm_head(model, arch)
        for name, emb in arch.embeddings:
            project_along_(emb.weight.data, 1, (plan.r, 1.0, False), *second)
            edited.append(f"{name}.weight")
    for bp in arch.blocks:
        for c in COMPONENTS:
            s = plan.strengths[c][bp.index]
            if s <= 0 and plan.second is None:
                continue
            for mod in bp.modules(c):
                gains = chain_gains(bp, mod)  # under post-norms: the directions the hooks remove before them
                dc = under_chain(plan.directions[c], gains)
                then = [(under_chain(r2, gains), s2, False) for r2, s2, _ in second]
                for w in bp.writers_of(mod):
                    p = getattr(w.module, w.param)
                    own = [(dc, s, plan.variants[c] == "norm" and not _is_bias(w))] if s > 0 else []
                    project_along_(p.data, 0 if p.dim() == 1 else w.out_axis, *own, *then)
                    edited.append(w.name)
    return {"edited": edited, "untied_lm_head": untied, "exact": exact}


def _is_bias(w: Writer) -> bool:
    return getattr(w.module, w.param).dim() == 1 or w.param.endswith("_bias")


def _norm_hookable(w: Writer) -> bool:
    """Whether a hook can apply the ``norm`` variant to this writer: it rescales a linear layer's inputs, which a
    fused 3-D expert tensor (one slice per expert, chosen inside the module) does not expose."""
    return _is_bias(w) or (w.param == "weight" and w.module.weight.dim() == 2)


def hook_variants(arch: Architecture) -> tuple[str, ...]:
    """The variants :func:`edit_hooks` can apply on this model: all of :data:`VARIANTS`, less ``norm`` where a writer
    is a fused expert tensor (the search, which scores edits as hooks, draws only these)."""
    ok = all(_norm_hookable(w) for bp in arch.blocks for w in bp.writers)
    return tuple(v for v in VARIANTS if ok or v != "norm")


def _check(plan: Plan, arch: Architecture) -> None:
    if plan.r.numel() != arch.d_model:
        raise RefdirError(f"the edit's direction has size {plan.r.numel()}, the model's d_model is {arch.d_model}")
    for c in COMPONENTS:
        if len(plan.strengths[c]) != arch.n_layers:
            raise RefdirError(f"the edit has {len(plan.strengths[c])} layer strengths, the model {arch.n_layers} blocks")
