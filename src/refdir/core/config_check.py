"""The stream checks (:mod:`refdir.core.stream_check`) for a checkpoint that is streamed, not loaded: run on a
small random model of the same class, built from a copy of its config.

Whether a block adds a third branch or scales its residual is a property of the class and the config's structure,
not of the weights or the width, so the copy keeps :data:`STRUCTURE_LAYERS` blocks and :data:`STRUCTURE_VOCAB`
token rows and is made narrow where the config allows (a 2-block copy of a 24B model at full width was 4 GB in
fp32; narrow, a config whose first blocks are dense and the rest MoE keeps one block of each); a vision-language
config's image encoder is cut to one layer. A config that does not build narrow is
checked at full width; one that does not build cut at all is not checked (the streamed output is then as
trustworthy as before).
"""

from __future__ import annotations

import copy

import torch

from refdir.core.architecture import inspect_model, post_layouts
from refdir.core.auto_model import auto_class
from refdir.errors import RefdirError

STRUCTURE_LAYERS = 2  # blocks kept in the copy (per-layer lists in the config are cut to match)
STRUCTURE_VOCAB = 64  # token rows kept: the embedding's width, not its height, is what the checks need
# the narrow copy's widths (heads of 16: rotary sections that need the real head size make the build fail)
NARROW = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 128,
          "shared_expert_intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          # multi-head latent attention (DeepSeek-V2/V3, Kimi): its low-rank and split head sizes
          "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16}

VISION_NARROW = {"hidden_size": 32, "embed_dim": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_heads": 2,
                 "head_dim": 16, "out_hidden_size": NARROW["hidden_size"], "projection_dim": NARROW["hidden_size"]}


def _cut(config, narrow: bool):
    """A copy of ``config`` with :data:`STRUCTURE_LAYERS` blocks, :data:`STRUCTURE_VOCAB` tokens, special token ids
    0, a one-layer image encoder, and with ``narrow`` the widths of :data:`NARROW`."""
    cfg = copy.deepcopy(config)
    text = getattr(cfg, "get_text_config", lambda: cfg)()
    n = int(text.num_hidden_layers)
    k = min(n, STRUCTURE_LAYERS)
    for name, value in list(vars(text).items()):
        if isinstance(value, list | tuple) and len(value) == n:
            setattr(text, name, type(value)(value[:k]))
    text.num_hidden_layers = k
    text.vocab_size = STRUCTURE_VOCAB
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # inside the cut vocabulary (Gemma 4's forward
        if getattr(text, name, None) is not None:                   # masks with the pad id: it must be an id)
            setattr(text, name, 0)
    if narrow:
        if isinstance(getattr(text, "first_k_dense_replace", None), int):  # dense blocks first, then MoE (DeepSeek,
            text.first_k_dense_replace = min(text.first_k_dense_replace, k - 1)  # GLM): one block of each layout
        for name, value in NARROW.items():
            if isinstance(getattr(text, name, None), int):
                setattr(text, name, value)
        if isinstance(getattr(text, "qk_rope_head_dim", None), int):  # MLA configs' head_dim is the rotary part
            text.head_dim = text.qk_rope_head_dim
        if isinstance(getattr(text, "kv_lora_rank", None), int):  # MLA expands its latent to every query head
            text.num_key_value_heads = text.num_attention_heads
        rope = getattr(text, "rope_parameters", None)
        if isinstance(rope, dict):  # M-RoPE sections sum to half the head size (Qwen-VL's default fits 128; other
            sec, half = list(rope.get("mrope_section") or [16, 24, 24]), NARROW["head_dim"] // 2  # models ignore it)
            new = [max(1, round(x * half / sum(sec))) for x in sec]
            new[-1] += half - sum(new)
            text.rope_parameters = {**rope, "mrope_section": new}
    for sub in vars(cfg).values():  # an image encoder is never run by the checks: one layer of it
        if sub is not text and hasattr(sub, "to_dict") and hasattr(sub, "model_type"):
            for name in ("num_hidden_layers", "depth"):
                if isinstance(getattr(sub, name, None), int):
                    setattr(sub, name, 1)
            if getattr(sub, "deepstack_visual_indexes", None):
                sub.deepstack_visual_indexes = []
            if narrow:
                for name, value in VISION_NARROW.items():
                    if isinstance(getattr(sub, name, None), int):
                        setattr(sub, name, value)
    return cfg


@torch.no_grad()
def check_config(config) -> dict | None:
    """Raise the stream checks' :class:`RefdirError` if a model of ``config``'s class cannot be edited exactly by
    weights; else return the traced copy's post-norms per block layout (:func:`~refdir.core.architecture.post_layouts`;
    None where no copy was built or ran). Memory: a narrow copy's few blocks; where it does not build narrow (or
    refuses narrow: confirmed at full width before refusing), two blocks at full width."""
    if not getattr(getattr(config, "get_text_config", lambda: config)(), "num_hidden_layers", None):
        return None
    refused = None
    for narrow in (True, False):
        try:
            cfg = _cut(config, narrow)
            torch.manual_seed(0)
            small = auto_class(cfg).from_config(cfg, trust_remote_code=False).to(torch.float32).eval()
        except Exception:  # noqa: BLE001 - a config this cut does not build: try wider, or no check, as before
            continue
        for p in small.parameters():  # off the initial values: a residual scale of ones or a gate of zeros hides a branch
            p.mul_(1 + 0.2 * torch.randn_like(p)).add_(0.02 * torch.randn_like(p))
        try:
            return post_layouts(inspect_model(small))
        except RefdirError as e:
            if not narrow:
                raise
            refused = e
        except Exception:  # noqa: BLE001 - the narrow copy does not run: check at full width
            continue
        finally:
            del small
    if refused is not None:  # refused narrow, and the full width does not build
        raise refused
    return None
