"""Shared fixtures: tiny random decoders of many architectures, a tiny BPE tokenizer with a chat
template, and the real offline model (loaded once per session)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PAPER_SPLITS = SHARED / "datasets" / "paper_splits"

TINY_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2)

MAMBA_SMALL = dict(mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_chunk_size=16, mamba_n_groups=1)

# Pre-norm decoders: weight orthogonalization must equal ablation exactly.
EXACT_ARCHS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {},
    "gemma": {"head_dim": 16},
    "phi3": {},
    "granite": {},
    "starcoder2": {},
    "gpt_neox": {},
    "cohere": {},
    "olmo": {},
    "gpt2": {},  # Conv1D writers (weight [in, out]) and learned position embeddings
    "nanochat": {},  # a parameter-free norm on the embedding before block 0 (a per-token rescale)
    # hybrid blocks: mamba mixers beside (Falcon-H1) or instead of attention, a shared MLP beside the experts; small
    # mamba heads and chunks (the defaults made transformers' pure-PyTorch scan take seconds per tiny forward)
    "falcon_h1": dict(MAMBA_SMALL, mamba_d_ssm=128),
    "bamba": dict(MAMBA_SMALL, attn_layer_indices=[1], mamba_expand=2),
    "granitemoehybrid": dict(MAMBA_SMALL, layer_types=["mamba", "attention", "mamba"], mamba_expand=2),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  num_experts=4),  # attention and mamba layers are two classes
    # one mixer per block (Nemotron-H): mamba, attention, an MLP or experts (here with a shared expert)
    "nemotron_h": dict(head_dim=16, num_hidden_layers=4, mamba_num_heads=4, mamba_head_dim=32, n_groups=1,
                       ssm_state_size=16, chunk_size=16, expand=2, n_routed_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, use_mamba_kernels=False,
                       layers_block_type=["linear_attention", "full_attention", "mlp", "moe"]),
    # multi-head latent attention, a dense first block, then routed experts beside a shared one (DeepSeek-V3, Kimi K2)
    "deepseek_v3": dict(q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        head_dim=8, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
}
# Post-norm decoders: ablation hooks act on what is written (orthogonalizing the weights removes r exactly but
# computes something else); the run's edits act before the norm, the same as hooks and as weights.
POSTNORM_ARCHS = {
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "olmo2": {},
    # Arcee's AFM: post-norms; its attention's gate over the heads and its router (64 experts) have d outputs here,
    # as the gate does in the real models (heads · head_dim = d)
    "afmoe": {"head_dim": 16},
    # Gemma 4 with both of its extra branches: a MoE block (the MLP's and the experts' outputs normed each, then
    # their sum: chains of two post-norms) and the per-layer-input branch (normed before it is added)
    "gemma4_text": dict(head_dim=16, global_head_dim=16, vocab_size_per_layer_input=512,
                        hidden_size_per_layer_input=8, enable_moe_block=True, num_experts=4, top_k_experts=2,
                        moe_intermediate_size=32),
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from refdir.core.data import embedded

    corpus = embedded("harmful").instructions + embedded("harmless").instructions
    corpus += ["I'm sorry, I cannot help with that.", "Sure, here is how", "As an AI I can't"]
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="<|end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


# Vision-language checkpoints (a decoder beside an image encoder), built by the image-text-to-text auto class;
# refdir edits their text path. Per model type: text config extras (M-RoPE sections that fit head_dim 16).
_MROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}, "head_dim": 16}
VLM_ARCHS = {
    "mistral3": {"head_dim": 16},
    "llava": {"model_type": "llama"},
    "qwen2_5_vl": _MROPE,
    "qwen3_vl": _MROPE,
    "gemma3": {"head_dim": 16},
    "gemma4": "gemma4_text",  # the text config of POSTNORM_ARCHS' entry
    "idefics3": {},
    "internvl": {},
}
# Gemma 4 builds no encoders unless given their configs: a tiny image and a tiny audio encoder
VLM_TOWERS = {"gemma4": dict(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, head_dim=16),
    audio_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, output_proj_dims=64))}
_VISION_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, depth=1, num_attention_heads=2,
                     num_heads=2, image_size=28, patch_size=14, out_hidden_size=64, deepstack_visual_indexes=[0])


def make_tiny_vlm(arch: str, vocab_size: int, seed: int = 0):
    """A tiny random vision-language model of type ``arch`` (fp32): the text side as :func:`make_tiny`'s, a one-layer
    image encoder."""
    from transformers import AutoConfig

    from refdir.core.auto_model import auto_class

    extra = VLM_ARCHS[arch] if isinstance(VLM_ARCHS[arch], dict) else POSTNORM_ARCHS[VLM_ARCHS[arch]]
    text = {**TINY_COMMON, **extra, "vocab_size": vocab_size}
    cfg = AutoConfig.for_model(arch, text_config=text, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               **VLM_TOWERS.get(arch, {}))
    for k, v in _VISION_SMALL.items():
        if hasattr(cfg.vision_config, k):
            cur = getattr(cfg.vision_config, k)
            setattr(cfg.vision_config, k, type(cur)((v, v)) if isinstance(cur, list | tuple) and k.endswith("size") else v)
    torch.manual_seed(seed)
    return _random_weights(auto_class(cfg).from_config(cfg))


def make_tiny(arch: str, vocab_size: int, seed: int = 0, **overrides):
    """A tiny random decoder of architecture ``arch`` in fp32, with weights large enough that
    every component matters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {**EXACT_ARCHS, **POSTNORM_ARCHS}.get(arch, {})
    cfg = AutoConfig.for_model(arch, **{**TINY_COMMON, **extra, "vocab_size": vocab_size, **overrides})
    torch.manual_seed(seed)
    return _random_weights(AutoModelForCausalLM.from_config(cfg))


@torch.no_grad()
def _random_weights(model):
    """``model`` in fp32 with weights large enough that every component matters (norm gains near 1)."""
    model = model.to(torch.float32).eval()
    for name, p in model.named_parameters():
        if "norm" in name or "ln" in name.split(".")[-2:][0]:
            p.normal_(1.0, 0.1)
        else:
            p.normal_(0.0, 0.15)
    return model


@torch.no_grad()
def uneven_post_norms(model, seed: int = 0):
    """``model`` with every post-norm's gain spread as a real Gemma 3 checkpoint's are (its 270M model: the largest
    gain of a norm 52–1657, medians 0.3–337): log-normal, e^N(1, 1.5), so a few channels are amplified a
    hundredfold. With :func:`_random_weights`' gains near 1 the weight edit under a post-norm and an orthogonal
    projection after it nearly coincide; with these they do not (NOTES.md, thirtieth session)."""
    from refdir.core.architecture import inspect_model
    from refdir.core.postnorm import norm_form

    g = torch.Generator().manual_seed(seed)
    for bp in inspect_model(model).blocks:
        for norm in {id(n): n for names in bp.post.values() for n in (getattr(bp.block, x) for x in names)}.values():
            gain = torch.exp(1.0 + 1.5 * torch.randn(norm.weight.shape, generator=g))
            norm.weight.copy_(gain - norm_form(norm).offset)
    return model


@pytest.fixture()
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """Factory: save a tiny random model of an architecture with the tiny tokenizer; return its dir."""

    def make(arch: str):
        d = tmp_path / f"tiny-{arch}"
        make_tiny(arch, len(tiny_tokenizer)).save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        return d

    return make


@pytest.fixture(scope="session")
def real_model():
    """The embedded Qwen2.5-Coder-0.5B-Instruct, in the dtype refdir picks for this CPU."""
    from refdir.core.models import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def paper_splits():
    import json

    if not PAPER_SPLITS.exists():
        pytest.skip("../shared/datasets/paper_splits not present")
    return {n: [r["instruction"] for r in json.loads((PAPER_SPLITS / f"{n}.json").read_text())]
            for n in ("harmful_train", "harmful_val", "harmless_train", "harmless_val")}


def snapshot(root: Path) -> dict:
    """Every path under ``root`` (links not followed): kind, and for files size, mtime and sha256."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(d) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                st = p.stat()
                out[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def last_position_states(out) -> torch.Tensor:
    """[L + 1, d]: the hidden states transformers returned (``output_hidden_states=True``) for a batch of one, at
    its last position; a reference computed without refdir. Entry l < L is the residual entering block l, what
    refdir's residuals call layer l; the last entry has the final norm applied, so tests compare entries 0..L-1."""
    return torch.stack(out.hidden_states)[:, 0, -1]


def max_cos(model, r: torch.Tensor, ids: torch.Tensor | None = None) -> float:
    """max |cos(x, r)| over every block input and the final norm's input (the stream after the last block), on
    ``ids`` [b, t] or a fixed batch of 4 rows of 12 token ids below 128; the first row left-padded by 4."""
    from refdir.core.architecture import inspect_model

    arch = inspect_model(model, trace=False)
    seen: list[torch.Tensor] = []

    def grab(_m, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())

    mods = [bp.block for bp in arch.blocks] + ([arch.final_norm] if arch.final_norm is not None else [])
    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in mods]
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(1)) if ids is None else ids
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(mods)
    rh = (r / r.norm()).to(torch.float64)
    return max(float(((x.double() @ rh) / x.double().norm(dim=-1)).abs().max()) for x in seen)


def probe_found_little_refusal(run_dir: Path) -> None:
    """Rewrite a finished run's refusal-token evidence as a model that refused 2 of 32 harmful prompts leaves it
    (a tiny random model never refuses, and then the probe stops the run instead), so that the next, resumed
    command reads it."""
    f = run_dir / "refusal_tokens" / "tokens.json"
    rec = json.loads(f.read_text())
    rec["evidence"] = {"n_prompts": 32, "n_refusals": 2, "first_tokens": {"I": 2}, "kept": ["I"], "source": "derived"}
    f.write_text(json.dumps(rec))
    restamp(f.parent)


def restamp(stage_dir: Path) -> None:
    """Record a stage's files at their present sizes in its ``stage.json``, as the stage would have written them
    (a stage whose files changed size since is otherwise done again)."""
    st = stage_dir / "stage.json"
    rec = json.loads(st.read_text())
    rec["files"] = {n: (stage_dir / n).stat().st_size for n in rec.get("files", {})}
    st.write_text(json.dumps(rec))
