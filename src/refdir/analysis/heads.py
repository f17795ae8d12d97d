"""Which attention heads write the refusal direction, and where they look (the paper's Figure 6).

- :func:`head_attribution`: each attention head's direct contribution to r̂ at one position: the head's
  slice of the attention output projection's input, times that slice of the projection's weight,
  dotted with r̂ (Figure 6, top).
- :func:`attention_shares`: for chosen heads, the share of the last token's attention on the
  instruction tokens and on the suffix tokens (Figure 6, bottom).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from refdir.analysis.geometry import check_position
from refdir.core.architecture import Architecture, inspect_model, takes_position_ids
from refdir.core.chat import ChatFormat
from refdir.core.directions import unit_vector
from refdir.core.hooks import output_hidden, registered
from refdir.core.postnorm import chain_gains
from refdir.errors import RefdirError


# ------------------------------------------------------------------------------------------------ heads
def attention_output_projection(bp) -> nn.Linear:
    """The linear layer that writes a block's attention output (its last d_model-wide linear); a block whose token
    mixer is not attention (a hybrid model's mamba layer) has no heads to attribute."""
    attn = bp.attention()
    if attn is None:
        raise RefdirError(f"block {bp.index} mixes tokens without attention (a hybrid model's mamba layer): head "
                          "attribution needs attention in every block")
    for w in bp.writers:
        if w.param == "weight" and isinstance(w.module, nn.Linear) and any(w.module is m for m in attn.modules()):
            return w.module
    raise RefdirError(f"block {bp.index}: no attention output projection found")


def head_layout(model: nn.Module, proj: nn.Linear) -> tuple[int, int]:
    """(number of heads, head dim) of the attention output projection's input, from the config."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not n_heads or proj.in_features % n_heads:
        raise RefdirError(f"cannot split the attention output projection ({proj.in_features} inputs) into "
                          f"{n_heads} heads")
    head_dim = proj.in_features // n_heads
    declared = getattr(cfg, "head_dim", None)
    if declared and declared != head_dim:
        raise RefdirError(f"config head_dim {declared} does not match {proj.in_features} / {n_heads} heads")
    return n_heads, head_dim


@dataclass
class HeadAttribution:
    """Direct contribution of every head to r̂ at one position: contrib[n, layer, head]."""

    position: int
    contrib: np.ndarray  # [N, L, H]
    bias: np.ndarray  # [N, L] what no head owns: the projection's bias (and a post-norm's bias) on r̂
    through_post_norm: bool = False  # a post-norm chain of unknown form or of several norms: not exact

    def mean(self) -> np.ndarray:
        return self.contrib.mean(0)

    def top(self, k: int, up_to_layer: int | None = None) -> list[tuple[int, int]]:
        """The ``k`` (layer, head) pairs with the largest mean contribution among layers < ``up_to_layer``."""
        m = self.mean().copy()
        if up_to_layer is not None:
            m[up_to_layer:] = -np.inf
        order = np.argsort(-m, axis=None)[:k]
        return [tuple(int(i) for i in np.unravel_index(o, m.shape)) for o in order if np.isfinite(m.flat[o])]

    def total(self, up_to_layer: int) -> np.ndarray:
        """Per prompt: every head's contribution summed over the layers before ``up_to_layer``."""
        return self.contrib[:, :up_to_layer].sum((1, 2))


@dataclass
class _PostNorm:
    """An attention's lone post-norm of a known form: ``n(y) = g ⊙ (y − μ) / s + β``."""

    norm: nn.Module
    gain: torch.Tensor  # g, float64 on the CPU
    centred: bool
    bias: torch.Tensor | None  # β


def _post_norm(bp) -> _PostNorm | None:
    """The attention's post-norm, if one sits between it and the stream; None without one, or where its form is
    unknown or it is a chain of several (then the attribution reads r̂ before the norm: not exact)."""
    attn = bp.attention()
    gains = chain_gains(bp, attn) if bp.chain(attn) else None
    if not gains or len(gains) != 1:
        return None
    norm = bp.chain(attn)[0]
    bias = getattr(norm, "bias", None)
    return _PostNorm(norm, gains[0][0].double().cpu(), gains[0][1], None if bias is None else bias.detach().double().cpu())


def _read_on(post: _PostNorm | None, r_hat: torch.Tensor) -> torch.Tensor:
    """What the projection's output is read on: r̂, or under a post-norm ``g ⊙ r̂`` (centred where it centres)."""
    if post is None:
        return r_hat.double()
    v = post.gain * r_hat.double()
    return v - v.mean() if post.centred else v


def _inverse_scale(post: _PostNorm, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per row, the norm's ``1 / s``, read off its input ``y`` and output: ``|n(y) − β| / |g ⊙ (y − μ)|`` (eps
    included, as the norm computed it); 0 where the input is 0."""
    yc = y - y.mean(-1, keepdim=True) if post.centred else y
    num = (out - (post.bias if post.bias is not None else 0.0)).norm(dim=-1)
    den = (yc * post.gain).norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(den))


@torch.no_grad()
def head_attribution(model: nn.Module, fmt: ChatFormat, instructions: list[str], r: torch.Tensor, *,
                     position: int = -1, batch_size: int = 16, arch: Architecture | None = None,
                     progress: bool = True) -> HeadAttribution:
    """Each head's direct write onto r̂ at ``position``: ``z_h · (W_O[:, h] ᵀ r̂)`` where ``z_h`` is head
    h's slice of the output projection's input (captured by a forward pre-hook).

    Under a post-norm (Gemma 2/3, OLMo 2: the block writes ``n(y) = g ⊙ (y − μ) / s + β``, ``y`` the projection's
    output) the write on r̂ is ``y · v / s + β·r̂`` with ``v = g ⊙ r̂`` (centred for a centring norm), linear in the
    heads given the row's divisor ``s``: each head's part is ``z_h · (W_O[:, h] ᵀ v) / s``, with ``s`` read off the
    norm's own input and output (``|g ⊙ (y − μ)| / |n(y) − β|``), so heads and bias add up to the whole write
    exactly. (Zeroing a head would also change ``s``: this is its share of the write, not that counterfactual.)"""
    check_position(fmt, position)
    if not instructions:
        raise RefdirError("no prompts for head attribution")
    arch = arch or inspect_model(model)
    r_hat = unit_vector(r)
    if r_hat.numel() != arch.d_model:
        raise RefdirError(f"direction has size {r_hat.numel()} but the model has d = {arch.d_model}")
    projs = [attention_output_projection(bp) for bp in arch.blocks]
    n_heads, head_dim = head_layout(model, projs[0])
    posts = [_post_norm(bp) for bp in arch.blocks]
    vs = [_read_on(p, r_hat) for p in posts]
    # u_l = W_O,lᵀ v_l, split into heads: [L, H, hd]
    u = torch.stack([(p.weight.double().T.cpu() @ v).float().view(n_heads, head_dim)
                     for p, v in zip(projs, vs, strict=True)])
    b_on = torch.tensor([float(p.bias.double().cpu() @ v) if p.bias is not None else 0.0
                         for p, v in zip(projs, vs, strict=True)], dtype=torch.float64)
    beta = torch.tensor([float(p.bias @ r_hat.double()) if p is not None and p.bias is not None else 0.0
                         for p in posts], dtype=torch.float64)
    buf: dict = {}

    def pre(i):
        def hook(_m, args):
            buf[i] = args[0][:, position].detach().float().cpu()

        return hook

    def norm_io(i):
        def hook(_m, args, out):
            buf["y", i] = args[0][:, position].detach().double().cpu()
            buf["o", i] = output_hidden(out)[:, position].detach().double().cpu()

        return hook

    hooks = [p.register_forward_pre_hook(pre(i)) for i, p in enumerate(projs)]
    hooks += [p.norm.register_forward_hook(norm_io(i)) for i, p in enumerate(posts) if p is not None]
    dev = next(model.parameters()).device
    rows, biases = [], []
    with registered(hooks):
        for s in tqdm(range(0, len(instructions), batch_size), desc="head attribution", disable=not progress,
                      leave=False):
            enc = fmt.encode(instructions[s : s + batch_size], device=dev, positions=takes_position_ids(model))
            buf.clear()
            model(**enc, use_cache=False, logits_to_keep=1)
            z = torch.stack([buf[i] for i in range(len(projs))], 1).view(-1, len(projs), n_heads, head_dim)
            scale = torch.ones(z.shape[0], len(projs), dtype=torch.float64)  # 1 / s per row and layer
            for i, p in enumerate(posts):
                if p is not None:
                    scale[:, i] = _inverse_scale(p, buf["y", i], buf["o", i])
            rows.append(((z * u).sum(-1).double() * scale[..., None]).float())  # [B, L, H]
            biases.append(b_on * scale + beta)
    through = any(p is None and bp.chain(bp.attention()) for p, bp in zip(posts, arch.blocks, strict=True))
    return HeadAttribution(position, torch.cat(rows).numpy(), torch.cat(biases).numpy(), through)


# ------------------------------------------------------------------------------------------------ attention
def regions(fmt: ChatFormat, instruction: str, suffix_text: str = "", joined: str | None = None
            ) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the rendered prompt, and the token indices of the instruction and of the suffix.

    ``joined`` is the user text (instruction followed by suffix; default their plain concatenation). A token is
    assigned to the region its characters overlap most."""
    joined = joined if joined is not None else instruction + suffix_text
    if not joined.startswith(instruction):
        raise RefdirError("the user text must start with the instruction")
    text = fmt.render(joined)
    start = text.find(joined)
    if start < 0:
        raise RefdirError("the rendered prompt does not contain the user text verbatim")
    spans = {"instruction": (start, start + len(instruction)), "suffix": (start + len(instruction), start + len(joined))}
    try:
        enc = fmt.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError) as e:
        raise RefdirError("attention shares need a fast tokenizer (offset mappings)") from e
    idx: dict[str, list[int]] = {"instruction": [], "suffix": []}
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        best, best_overlap = None, 0
        for name, (s, e) in spans.items():
            ov = min(b, e) - max(a, s)
            if ov > best_overlap:
                best, best_overlap = name, ov
        if best is not None:
            idx[best].append(t)
    return list(enc["input_ids"]), idx["instruction"], idx["suffix"]


@dataclass
class AttentionShares:
    """Share of the last token's attention on the instruction and on the suffix, per prompt and head."""

    heads: list[tuple[int, int]]
    instruction: np.ndarray  # [N, k]
    suffix: np.ndarray  # [N, k]


def _attn_impl(model: nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


@torch.no_grad()
def attention_shares(model: nn.Module, fmt: ChatFormat, items: list[tuple[str, str]],
                     heads: list[tuple[int, int]], *, progress: bool = True) -> AttentionShares:
    """For each (instruction, user text) pair, the last token's attention weights of each chosen head summed
    over the instruction tokens and over the suffix tokens. Runs with eager attention (to get the weights)
    and restores the model's attention implementation afterwards."""
    if not heads:
        raise RefdirError("no heads given for attention shares")
    if not items:
        raise RefdirError("no prompts for attention shares")
    dev = next(model.parameters()).device
    before = _attn_impl(model)
    ins = np.zeros((len(items), len(heads)))
    suf = np.zeros((len(items), len(heads)))
    try:
        model.set_attn_implementation("eager")
        for n, (instr, joined) in enumerate(tqdm(items, desc="attention", disable=not progress, leave=False)):
            ids, ii, si = regions(fmt, instr, joined=joined)
            out = model(input_ids=torch.tensor([ids], device=dev), use_cache=False, output_attentions=True,
                        logits_to_keep=1)
            if not out.attentions or out.attentions[0] is None:
                raise RefdirError("this model returns no attention weights")
            for k, (layer, head) in enumerate(heads):
                w = out.attentions[layer][0, head, -1].float().cpu()
                ins[n, k] = float(w[ii].sum()) if ii else 0.0
                suf[n, k] = float(w[si].sum()) if si else 0.0
    finally:
        if before is not None:
            model.set_attn_implementation(before)
    return AttentionShares(list(heads), ins, suf)
