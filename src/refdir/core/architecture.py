"""Find, from the module tree alone, where a decoder writes to its residual stream.

No family names appear here. The rules:

- embedding: ``model.get_input_embeddings()``, plus any other top-level ``nn.Embedding`` of width
  ``d_model`` outside the blocks (learned position embeddings also write to the stream);
- blocks: the ``nn.ModuleList`` of ``config.num_hidden_layers`` same-class modules;
- in each block, the attention module (a child whose name mentions attention) and the MLP
  (the other child holding ``d_model``-wide linears); each one's writer is its last
  registered linear with ``d_model`` outputs (``nn.Linear``, or GPT-2's transposed ``Conv1D``), and for
  mixture-of-experts the fused 3-D expert tensors and every expert/shared-expert writer inside it;
- post-norms: a norm inside the block whose *input is the attention (or MLP) output itself*. With the model's
  weights at hand, one tiny traced forward finds them; on a skeleton built from a config alone (streaming), the
  block's ``forward`` source is read instead (:func:`refdir.core.postnorm.static_post_norms`). Then the stream is
  written by that norm's output.
- the same traced forward checks what an edit of these writers relies on, and refuses the model when it does not
  hold (:mod:`refdir.core.stream_check`): each traced block's output is a multiple of its input plus multiples of
  what its token mixers and MLPs write, and block 0's input is a multiple of what the embeddings write (one per
  token where a parameter-free norm stands between them, as in nanochat). A per-channel residual scale, a norm with
  weights on the embedding or a fixed sinusoidal position signal would leave the direction in the stream after
  every writer found here lost it.
- the final norm and ``lm_head``; ``lm_head`` is tied when it shares storage with the embedding.
"""

from __future__ import annotations

import inspect
import os
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache
from transformers.pytorch_utils import Conv1D

from refdir.core.postnorm import edit_exact, is_norm, static_post_norms
from refdir.core.stream_check import check_padding, trace_block
from refdir.errors import RefdirError

_ATTN_WORDS = ("attn", "attention")
# model -> {block index: (layout key, post-norms, input rescaled)} a trace without hooks found, for every later hook
_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Writer:
    """One parameter that writes into the residual stream, with the axis that has size d_model."""

    module: nn.Module
    name: str  # qualified parameter name in the model
    param: str  # attribute name on module ("weight", "bias", or a 3-D expert tensor)
    out_axis: int  # axis of size d_model that is the output


@dataclass
class BlockParts:
    index: int
    block: nn.Module
    attn: nn.Module | None
    mlp: nn.Module | None
    # post-norms: a writing module's child name → the norms (child names, innermost first) between its output and
    # the stream. Gemma 2/3: one per module; Gemma 4's MoE block norms its MLP's and its experts' outputs, then their
    # sum; its per-layer-input branch is normed too
    post: dict[str, list[str]] = field(default_factory=dict)
    writers: list[Writer] = field(default_factory=list)
    input_rescaled: bool = False  # block 0: its input is the embeddings' output rescaled per token (a norm between)
    # hybrid blocks: more token mixers beside ``attn`` (a mamba mixer) or more MLPs beside ``mlp`` (a shared MLP
    # beside the experts), each writing its output to the stream; they belong to the same component
    attn_extra: list[nn.Module] = field(default_factory=list)
    mlp_extra: list[nn.Module] = field(default_factory=list)

    def modules(self, component: str) -> list[nn.Module]:
        """The modules of the token-mixing (``"attn"``) or the MLP (``"mlp"``) component (none where a block has
        only the other: Nemotron-H's blocks hold one mixer each, a mamba mixer, attention, an MLP or experts)."""
        mods = [self.attn, *self.attn_extra] if component == "attn" else [self.mlp, *self.mlp_extra]
        return [m for m in mods if m is not None]

    def outs(self, component: str) -> list[nn.Module]:
        """The modules whose outputs the component adds to the stream: each module's outermost post-norm, or the
        module itself (each once: two modules may share an outer norm)."""
        out: list[nn.Module] = []
        for m in self.modules(component):
            o = (self.chain(m) or [m])[-1]
            if not any(o is x for x in out):
                out.append(o)
        return out

    def chain(self, mod: nn.Module) -> list[nn.Module]:
        """The post-norms between the output of ``mod`` (one of :meth:`modules`) and the stream, innermost first;
        empty where it writes its output itself."""
        return [getattr(self.block, n) for n in self.post.get(self.child_name(mod), [])]

    def writers_of(self, *mods: nn.Module) -> list[Writer]:
        """The writers inside ``mods``."""
        ids = {id(m) for mod in mods for m in mod.modules()}
        return [w for w in self.writers if id(w.module) in ids]

    def attention(self) -> nn.Module | None:
        """The token mixer that is attention (by its name, or its class's where the name is a generic ``mixer``),
        None in a block that mixes by a mamba mixer only."""
        return next((m for m in self.modules("attn") if any(
            w in self.child_name(m).lower() or w in type(m).__name__.lower() for w in _ATTN_WORDS)), None)

    def component_writers(self, component: str) -> list[Writer]:
        """The writers inside the token mixers (``"attn"``) or the MLPs (``"mlp"``)."""
        return self.writers_of(*self.modules(component))

    def child_name(self, mod: nn.Module) -> str:
        """The attribute name of a direct child of the block."""
        return next(n for n, c in self.block.named_children() if c is mod)


@dataclass
class Architecture:
    model: nn.Module
    d_model: int
    n_layers: int
    embeddings: list[tuple[str, nn.Embedding]]
    blocks_path: str
    blocks: list[BlockParts]
    final_norm: nn.Module | None
    lm_head: nn.Module | None
    tied: bool
    post_norms_known: bool = True  # False: no traced forward, and the blocks' forward source could not be read

    @property
    def has_post_norms(self) -> bool:
        return any(b.post for b in self.blocks)

    @property
    def embedding_rescaled(self) -> bool:
        """Block 0 reads the embeddings' output rescaled per token (a norm between them): an edit must act on the
        embeddings' output, not on block 0's input (as :func:`refdir.core.interventions.ablate` always does)."""
        return self.blocks[0].input_rescaled

    @property
    def weight_edit_exact(self) -> bool:
        """Whether weight orthogonalization computes exactly what the ablation hooks do: every post-norm known."""
        return edit_exact(self)

    def summary(self) -> dict:
        b0 = self.blocks[0]
        return {
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "embeddings": [n for n, _ in self.embeddings],
            "blocks": self.blocks_path,
            "writers_block0": [w.name for w in b0.writers],
            "post_norms": self.has_post_norms,
            "tied_lm_head": self.tied,
        }


def _module_tree(model: nn.Module, depth: int = 4) -> str:
    lines = []
    for name, mod in model.named_modules():
        if name.count(".") < depth:
            lines.append(f"  {name or '<root>'}: {type(mod).__name__}")
    return "\n".join(lines[:80])


def _fail(model: nn.Module, what: str) -> RefdirError:
    return RefdirError(f"could not find {what} in this model's module tree:\n{_module_tree(model)}")


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    for k in ("hidden_size", "n_embd", "d_model"):
        if cfg is not None and getattr(cfg, k, None):
            return int(getattr(cfg, k))
    emb = model.get_input_embeddings()
    return int(emb.weight.shape[1])


def _find_blocks(model: nn.Module, n_layers: int | None) -> tuple[str, nn.ModuleList]:
    """The longest list of same-class modules (of ``n_layers`` when the config says); else a list of exactly
    ``n_layers`` modules of several classes (hybrid models whose attention and mamba layers are two classes).
    Between lists of equal length, the one nearest the input embedding in the module tree (a vision-language model's
    image encoder has block lists of its own)."""
    emb = model.get_input_embeddings()
    emb_path = next((n for n, m in model.named_modules() if m is emb), "").split(".")

    def near(name: str) -> int:  # dotted path components shared with the embedding's
        return len(os.path.commonprefix([name.split("."), emb_path]))

    best = mixed = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            classes = {type(m) for m in mod}
            if len(classes) != 1:
                if n_layers is not None and len(mod) == n_layers and mixed is None:
                    mixed = (name, mod)
                continue
            if n_layers is not None and len(mod) != n_layers:
                continue
            if best is None or (len(mod), near(name)) > (len(best[1]), near(best[0])):
                best = (name, mod)
    best = best or mixed
    if best is None:
        raise _fail(model, "the list of decoder blocks")
    return best


def _out_features(m: nn.Module) -> int | None:
    """Output width of a linear layer: ``nn.Linear`` (weight [out, in]) or ``Conv1D`` (GPT-2; weight [in, out])."""
    if isinstance(m, nn.Linear):
        return m.out_features
    return m.nf if isinstance(m, Conv1D) else None


def _d_linears(mod: nn.Module, d: int) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in mod.named_modules() if _out_features(m) == d]


def _linear_writers(name: str, lin: nn.Module) -> list[Writer]:
    """The weight (its output axis: 0 for ``nn.Linear``, 1 for ``Conv1D``) and bias of a writing linear."""
    out = [Writer(lin, f"{name}.weight", "weight", 1 if isinstance(lin, Conv1D) else 0)]
    if lin.bias is not None:
        out.append(Writer(lin, f"{name}.bias", "bias", 0))
    return out


_MIXER_WORDS = (*_ATTN_WORDS, "mamba", "mixer", "ssm", "conv", "recurrent", "temporal")  # children that mix tokens
# a child named like a mixer (Nemotron-H's "mixer") whose class *ends* in an MLP role is an MLP (a family prefix
# such as JetMoe or GraniteMoe does not count)
_MLP_CLASS_SUFFIXES = ("mlp", "moe", "experts", "feedforward", "ffn")


def _split_block(block: nn.Module, d: int) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """The block's children that write to the stream, as (token mixers, MLPs), each in registration order: a child
    named for attention or another token mixer (``_MIXER_WORDS``; cross-attention to an encoder is left out) mixes
    tokens, any other child with a ``d_model``-out linear or a 3-D expert tensor is an MLP."""
    mixers, mlps = [], []
    for name, child in block.named_children():
        if is_norm(child):
            continue
        lname = name.lower()
        if not (_d_linears(child, d) or any(p.dim() == 3 for p in child.parameters())):
            continue
        mlp_class = type(child).__name__.lower().endswith(_MLP_CLASS_SUFFIXES)
        if any(w in lname for w in _ATTN_WORDS) or (any(w in lname for w in _MIXER_WORDS) and not mlp_class):
            if "cross" in lname or "encoder" in lname:
                continue  # attention over an encoder's states: not called in a decoder-only forward
            mixers.append((name, child))
        else:
            mlps.append((name, child))
    return mixers, mlps


def _module_writers(prefix: str, mod: nn.Module, d: int, mlp: bool) -> list[Writer]:
    """Writers in an attention or MLP module.

    The module's last registered d_model-out linear writes the output. In a mixture-of-experts
    MLP every expert and shared expert writes: each expert sub-MLP's last d-out linear and the
    last registered 3-D expert tensor (fused experts), whose d_model axis is its output axis.
    """
    writers: list[Writer] = []
    if not mlp:  # a gate over the heads (AfMoE's gate_proj, d → heads·head_dim = d) comes later but writes nothing
        lins = [(n, m) for n, m in _d_linears(mod, d) if "gate" not in n.rsplit(".", 1)[-1]]
        if not lins:
            return writers
        n, lin = lins[-1]
        return _linear_writers(f"{prefix}.{n}", lin)

    # MLP: group linears by their parent module; in each group the last d-out linear writes,
    # unless the group is a router (out_features d would not appear there anyway).
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for n, m in mod.named_modules():
        if _out_features(m) is not None:
            parent = n.rsplit(".", 1)[0] if "." in n else ""
            groups.setdefault(parent, []).append((n, m))
    for _parent, lins in groups.items():  # a router's scores are not a write, even when there are d experts
        douts = [(n, m) for n, m in lins if _out_features(m) == d and not any(
            "router" in part or part == "gate" for part in n.split("."))]
        if not douts:
            continue
        n, lin = douts[-1]
        writers += _linear_writers(f"{prefix}.{n}" if n else prefix, lin)
    # fused experts: per owning module, the last registered 3-D tensor with a d-sized axis writes.
    for owner_name, owner in mod.named_modules():
        three = [(pn, p) for pn, p in owner.named_parameters(recurse=False) if p.dim() == 3]
        if not three:
            continue
        pn, p = three[-1]
        axes = [a for a in (1, 2) if p.shape[a] == d]
        if not axes:
            continue
        if len(axes) == 2:
            raise RefdirError(f"ambiguous fused expert tensor {owner_name}.{pn} of shape {tuple(p.shape)}")
        full = ".".join(x for x in (prefix, owner_name, pn) if x)
        writers.append(Writer(owner, full, pn, axes[0]))
        bias_name = pn + "_bias"
        if hasattr(owner, bias_name) and isinstance(getattr(owner, bias_name), torch.Tensor):
            writers.append(Writer(owner, full + "_bias", bias_name, 1))
    return writers


def inspect_model(model: nn.Module, trace: bool = True, layouts: dict | None = None) -> Architecture:
    """Build the :class:`Architecture` of a Hugging Face decoder by inspecting its modules.

    ``trace=False`` skips the one-token forward that detects post-norms (for models built on
    the meta device, e.g. when streaming a checkpoint without loading it): they are taken from ``layouts``
    (:func:`post_layouts` of a traced copy of the same class) where given, else read from the blocks' ``forward``
    source."""
    d = _hidden_size(model)
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    n_layers = getattr(cfg, "num_hidden_layers", None)
    blocks_path, blocks = _find_blocks(model, n_layers)

    emb = model.get_input_embeddings()
    if emb is None:
        raise _fail(model, "the token embedding")
    embeddings: list[tuple[str, nn.Embedding]] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and m.weight.shape[1] == d and not name.startswith(blocks_path + "."):
            embeddings.append((name, m))
    if not any(m is emb for _, m in embeddings):
        raise _fail(model, f"the token embedding of width {d}")

    parts: list[BlockParts] = []
    for i, blk in enumerate(blocks):
        mixers, mlps = _split_block(blk, d)
        if not mixers and not mlps:
            raise _fail(model, f"the attention and MLP modules of block {i} ({type(blk).__name__})")
        bp = BlockParts(i, blk, mixers[0][1] if mixers else None, mlps[0][1] if mlps else None,
                        attn_extra=[m for _, m in mixers[1:]], mlp_extra=[m for _, m in mlps[1:]])
        pre = f"{blocks_path}.{i}"
        bp.writers = [w for n, m in mixers for w in _module_writers(f"{pre}.{n}", m, d, mlp=False)] + [
            w for n, m in mlps for w in _module_writers(f"{pre}.{n}", m, d, mlp=True)]
        if not bp.writers:
            raise _fail(model, f"the residual-writing projections of block {i}")
        parts.append(bp)

    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # the same parameter, or the same storage (on the meta device every tensor has data_ptr 0: identity only)
    tied = lm_head is not None and (lm_head.weight is emb.weight or (
        not emb.weight.is_meta and lm_head.weight.data_ptr() == emb.weight.data_ptr()))
    final_norm = None
    base = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    base_mod = model.get_submodule(base) if base else model
    for name, child in base_mod.named_children():  # d_model wide (Gemma 4 also norms its narrow per-layer inputs)
        w = getattr(child, "weight", None)
        if is_norm(child) and name != blocks_path.rsplit(".", 1)[-1] and (w is None or w.shape[-1] == d):
            final_norm = child

    arch = Architecture(model, d, len(blocks), embeddings, blocks_path, parts, final_norm, lm_head, tied)
    if not trace:
        if layouts is not None and all(layout_key(bp.block) in layouts for bp in parts):
            for bp in parts:
                bp.post = {k: list(v) for k, v in layouts[layout_key(bp.block)].items()}
        else:
            mixers, mlps = _split_block(blocks[0], d)
            _static_post_norms(arch, mixers[0][0] if mixers else None, mlps[0][0] if mlps else None)
        return arch
    traced: dict[tuple, BlockParts] = {}  # one traced block per layout (hybrid models alternate mixers)
    known = _TRACED.setdefault(model, {})  # what an earlier call's trace without hooks found, by block index
    for bp in parts:
        key = layout_key(bp.block)
        if known.get(bp.index, (None,))[0] == key:
            _, post, bp.input_rescaled = known[bp.index]
        elif key in traced:  # the same child names: the same post-norms
            post = traced[key].post
        else:  # an open intervention changes what the trace sees: only a clean trace is kept
            if trace_block(model, bp, embeddings if bp.index == 0 else []):
                known[bp.index] = (key, bp.post, bp.input_rescaled)
            post = bp.post
        bp.post = {k: list(v) for k, v in post.items()}
        traced.setdefault(key, bp)
    check_padding(model, takes_position_ids(model))
    return arch


def layout_key(block: nn.Module) -> tuple:
    """A block's layout: its children's names and classes (hybrid models alternate two or more), and its parameters'
    names (GPT-NeoX-Japanese's last block alone has an attention bias added outside its output projection)."""
    return (tuple((n, type(c).__name__) for n, c in block.named_children()),
            tuple(n for n, _ in block.named_parameters()))


def post_layouts(arch: Architecture) -> dict[tuple, dict[str, list[str]]]:
    """Every block layout's post-norms, by child names: what a skeleton of the same class takes from a traced copy
    (:func:`inspect_model`'s ``layouts``)."""
    return {layout_key(bp.block): bp.post for bp in arch.blocks}


def _static_post_norms(arch: Architecture, attn_name: str | None, mlp_name: str | None) -> None:
    """Set every block's post-norms from the first block's ``forward`` source (no forward pass; one post-norm per
    primary module at most: a traced copy's layouts are preferred)."""
    names, b0 = static_post_norms(arch.blocks[0].block, attn_name, mlp_name), arch.blocks[0]
    if names is None or (any(names.values()) and (b0.attn_extra or b0.mlp_extra)):  # more branches than it reads
        arch.post_norms_known = False
        return
    for bp in arch.blocks:
        bp.post = {n: [names[c]] for c, n in (("attn", attn_name), ("mlp", mlp_name)) if names[c]}


# --------------------------------------------------------------------------------- KV-cache keyword
# transformers 5.24 renamed the forward keyword ``past_key_values`` to ``cache`` (the output field too; the old name
# warns until 5.40): these read and pass the cache under the installed version's name.


def cache_kwarg(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache by."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


_ATTENTION_ONLY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attention_only(model: nn.Module) -> bool:
    """Whether every token mixer is attention, so that a prefix's KV cache can be copied across a batch (a mamba
    mixer's state cache cannot: hybrid models take the plain path): by the module tree, and by the cache layers
    transformers builds from the config (Qwen3.5's and Qwen3-Next's ``linear_attn`` holds a recurrent state, not
    keys and values). Cached per model."""
    if model not in _ATTENTION_ONLY:
        arch = inspect_model(model, trace=False)  # no forward pass: callers may have row hooks open
        try:
            layers = DynamicCache(config=model.config).layers
        except Exception:  # noqa: BLE001 - a config the cache cannot read: the module tree decides
            layers = []
        _ATTENTION_ONLY[model] = all(m is bp.attention() for bp in arch.blocks for m in bp.modules("attn")) and all(
            type(c).__name__ in ("DynamicLayer", "DynamicSlidingWindowLayer") for c in layers)
    return _ATTENTION_ONLY[model]


def takes_position_ids(model: nn.Module) -> bool:
    """Whether ``model.forward`` accepts ``position_ids`` (ALiBi models such as BLOOM do not)."""
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_of(out) -> object | None:
    """The KV cache a forward pass returned (``None`` if it returned none)."""
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def cache_in(kwargs: dict) -> object | None:
    """The KV cache among the keyword arguments of a forward call (for hooks that read it)."""
    c = kwargs.get("cache")
    return c if c is not None else kwargs.get("past_key_values")
