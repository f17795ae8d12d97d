"""Find, from the module tree alone, where a decoder writes to its residual stream.

No family names appear here. The rules:

- embedding: ``model.get_input_embeddings()``, plus any other top-level ``nn.Embedding`` of width
  ``d_model`` outside the blocks (learned position embeddings also write to the stream);
- blocks: the ``nn.ModuleList`` of ``config.num_hidden_layers`` same-class modules;
- in each block, the attention module (a child whose name mentions attention) and the MLP
  (the other child holding ``d_model``-wide linears); each one's writer is its last
  registered ``nn.Linear`` with ``out_features == d_model``, and for mixture-of-experts the fused
  3-D expert tensors and every expert/shared-expert writer inside it;
- post-norms: a norm inside the block whose *input is the attention (or MLP) output itself*. With the model's
  weights at hand, one tiny traced forward finds them; on a skeleton built from a config alone (streaming), the
  block's ``forward`` source is read instead (:func:`refdir.core.postnorm.static_post_norms`). Then the stream is
  written by that norm's output.
- the final norm and ``lm_head``; ``lm_head`` is tied when it shares storage with the embedding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from refdir.core.hooks import output_hidden, registered
from refdir.core.postnorm import is_norm, static_post_norms
from refdir.errors import RefdirError

_ATTN_WORDS = ("attn", "attention")


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
    attn_post_norm: nn.Module | None = None
    mlp_post_norm: nn.Module | None = None
    writers: list[Writer] = field(default_factory=list)

    def component_writers(self, component: str) -> list[Writer]:
        """The writers inside the attention (``"attn"``) or the MLP (``"mlp"``)."""
        mods = {id(m) for m in (self.attn if component == "attn" else self.mlp).modules()}
        return [w for w in self.writers if id(w.module) in mods]

    def post_norm(self, component: str) -> nn.Module | None:
        return self.attn_post_norm if component == "attn" else self.mlp_post_norm

    def child_name(self, mod: nn.Module) -> str:
        """The attribute name of a direct child of the block."""
        return next(n for n, c in self.block.named_children() if c is mod)

    @property
    def attn_out(self) -> nn.Module | None:
        """The module whose output is added to the stream for attention."""
        return self.attn_post_norm or self.attn

    @property
    def mlp_out(self) -> nn.Module | None:
        return self.mlp_post_norm or self.mlp


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
        return any(b.attn_post_norm is not None or b.mlp_post_norm is not None for b in self.blocks)

    @property
    def weight_edit_exact(self) -> bool:
        """Weight orthogonalization equals ablation exactly only without post-norms."""
        return not self.has_post_norms

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
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            classes = {type(m) for m in mod}
            if len(classes) != 1:
                continue
            if n_layers is not None and len(mod) != n_layers:
                continue
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise _fail(model, "the list of decoder blocks")
    return best


def _d_linears(mod: nn.Module, d: int) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in mod.named_modules() if isinstance(m, nn.Linear) and m.out_features == d]


def _split_block(block: nn.Module, d: int) -> tuple[str | None, nn.Module | None, str | None, nn.Module | None]:
    attn = mlp = None
    attn_name = mlp_name = None
    for name, child in block.named_children():
        if is_norm(child):
            continue
        lname = name.lower()
        has_writer = bool(_d_linears(child, d)) or any(p.dim() == 3 for p in child.parameters())
        if not has_writer:
            continue
        if attn is None and any(w in lname for w in _ATTN_WORDS) and "cross" not in lname:
            attn, attn_name = child, name
        elif mlp is None:
            mlp, mlp_name = child, name
    return attn_name, attn, mlp_name, mlp


def _module_writers(prefix: str, mod: nn.Module, d: int, mlp: bool) -> list[Writer]:
    """Writers in an attention or MLP module.

    The module's last registered d_model-out linear writes the output. In a mixture-of-experts
    MLP every expert and shared expert writes: each expert sub-MLP's last d-out linear and the
    last registered 3-D expert tensor (fused experts), whose d_model axis is its output axis.
    """
    writers: list[Writer] = []
    if not mlp:
        lins = _d_linears(mod, d)
        if not lins:
            return writers
        n, lin = lins[-1]
        writers.append(Writer(lin, f"{prefix}.{n}.weight", "weight", 0))
        if lin.bias is not None:
            writers.append(Writer(lin, f"{prefix}.{n}.bias", "bias", 0))
        return writers

    # MLP: group linears by their parent module; in each group the last d-out linear writes,
    # unless the group is a router (out_features d would not appear there anyway).
    groups: dict[str, list[tuple[str, nn.Linear]]] = {}
    for n, m in mod.named_modules():
        if isinstance(m, nn.Linear):
            parent = n.rsplit(".", 1)[0] if "." in n else ""
            groups.setdefault(parent, []).append((n, m))
    for _parent, lins in groups.items():
        douts = [(n, m) for n, m in lins if m.out_features == d]
        if not douts:
            continue
        n, lin = douts[-1]
        writers.append(Writer(lin, f"{prefix}.{n}.weight" if n else f"{prefix}.weight", "weight", 0))
        if lin.bias is not None:
            writers.append(Writer(lin, f"{prefix}.{n}.bias", "bias", 0))
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


def _detect_post_norms(model: nn.Module, block: BlockParts, blocks: nn.ModuleList) -> None:
    """Trace one tiny forward: a norm whose input *is* the attention/MLP output is a post-norm."""
    seen: dict[str, torch.Tensor] = {}
    norm_inputs: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = []

    def grab(key):
        def hook(_m, _args, out):
            seen[key] = output_hidden(out)

        return hook

    def norm_pre(mod):
        def hook(_m, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            norm_inputs.append((mod, x))

        return hook

    if block.attn is not None:
        hooks.append(block.attn.register_forward_hook(grab("attn")))
    if block.mlp is not None:
        hooks.append(block.mlp.register_forward_hook(grab("mlp")))
    for _n, child in block.block.named_children():
        if is_norm(child):
            hooks.append(child.register_forward_pre_hook(norm_pre(child), with_kwargs=True))
    with registered(hooks):
        dev = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]], device=dev), use_cache=False)
    for mod, x in norm_inputs:
        for key in ("attn", "mlp"):
            y = seen.get(key)
            if y is not None and x.shape == y.shape and (x is y or torch.equal(x, y)):
                if key == "attn":
                    block.attn_post_norm = mod
                else:
                    block.mlp_post_norm = mod


def inspect_model(model: nn.Module, trace: bool = True) -> Architecture:
    """Build the :class:`Architecture` of a Hugging Face decoder by inspecting its modules.

    ``trace=False`` skips the one-token forward that detects post-norms (for models built on
    the meta device, e.g. when streaming a checkpoint without loading it): the blocks' ``forward`` source
    is read instead."""
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
        an, attn, mn, mlp = _split_block(blk, d)
        if attn is None or mlp is None:
            raise _fail(model, f"the attention and MLP modules of block {i} ({type(blk).__name__})")
        bp = BlockParts(i, blk, attn, mlp)
        pre = f"{blocks_path}.{i}"
        bp.writers = _module_writers(f"{pre}.{an}", attn, d, mlp=False) + _module_writers(
            f"{pre}.{mn}", mlp, d, mlp=True
        )
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
    for name, child in base_mod.named_children():
        if is_norm(child) and name != blocks_path.rsplit(".", 1)[-1]:
            final_norm = child

    arch = Architecture(model, d, len(blocks), embeddings, blocks_path, parts, final_norm, lm_head, tied)
    if not trace:
        _static_post_norms(arch, _split_block(blocks[0], d))
    for bp in parts:  # post-norm structure is shared by all blocks of one class; trace block 0 only
        if not trace:
            break
        if bp.index == 0:
            _detect_post_norms(model, bp, blocks)
        else:
            bp.attn_post_norm = _same_child(bp.block, parts[0].block, parts[0].attn_post_norm)
            bp.mlp_post_norm = _same_child(bp.block, parts[0].block, parts[0].mlp_post_norm)
    return arch


def _static_post_norms(arch: Architecture, split: tuple) -> None:
    """Set every block's post-norms from the first block's ``forward`` source (no forward pass)."""
    attn_name, _, mlp_name, _ = split
    names = static_post_norms(arch.blocks[0].block, attn_name, mlp_name)
    if names is None:
        arch.post_norms_known = False
        return
    for bp in arch.blocks:
        bp.attn_post_norm = getattr(bp.block, names["attn"]) if names["attn"] else None
        bp.mlp_post_norm = getattr(bp.block, names["mlp"]) if names["mlp"] else None


def _same_child(block: nn.Module, ref_block: nn.Module, ref_child: nn.Module | None) -> nn.Module | None:
    if ref_child is None:
        return None
    for name, child in ref_block.named_children():
        if child is ref_child:
            return getattr(block, name)
    return None


# --------------------------------------------------------------------------------- KV-cache keyword
# transformers 5.24 renamed the forward keyword ``past_key_values`` to ``cache`` (and the output field likewise);
# the old name is accepted with a warning until 5.40. These read and pass the cache under whichever name the
# installed version uses.


def cache_kwarg(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache by."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_of(out) -> object | None:
    """The KV cache a forward pass returned (``None`` if it returned none)."""
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def cache_in(kwargs: dict) -> object | None:
    """The KV cache among the keyword arguments of a forward call (for hooks that read it)."""
    c = kwargs.get("cache")
    return c if c is not None else kwargs.get("past_key_values")
