"""Streaming orthogonalization of sharded safetensors checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from refdir.cli.main import app
from refdir.core.directions import Direction
from refdir.core.interventions import ablate
from refdir.core.orthogonalize import stream_orthogonalize
from refdir.errors import RefdirError

VOCAB = 128


@pytest.mark.parametrize("arch_name", ["llama", "gemma", "qwen2_moe", "starcoder2", "gpt2", "falcon_h1",
                                       "granitemoehybrid", "nanochat", "deepseek_v3"])
def test_streamed_checkpoint_equals_ablation(arch_name, tmp_path):
    model = make_tiny(arch_name, VOCAB)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").exists()
    r = torch.randn(64, generator=torch.Generator().manual_seed(5))
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), ablate(model, r):
        want = model(ids).logits
    summary = stream_orthogonalize(src, r, tmp_path / "out", progress=False)
    assert summary["edited"]
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        got = edited(ids).logits
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()) / 10)
    idx = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) >= set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])


def test_a_writer_stored_under_a_name_it_does_not_load_as_is_refused_before_writing(tmp_path):
    """A checkpoint whose writer tensor has a name that loads as no parameter of the model (here renamed by hand):
    a streamed edit would miss it and write a checkpoint that still writes the direction. It is refused, nothing is
    written, and ``--in-memory`` (through transformers' loader) is named."""
    from safetensors.torch import load_file, save_file

    make_tiny("llama", VOCAB).save_pretrained(tmp_path / "src")
    f = tmp_path / "src" / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.self_attn.out.weight"] = sd.pop("model.layers.1.self_attn.o_proj.weight")
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(RefdirError, match="o_proj.weight .*under a name refdir cannot map.*--in-memory"):
        stream_orthogonalize(tmp_path / "src", torch.randn(64), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch_name", ["qwen2_5_vl", "mistral3", "gemma3", "gemma4"])
def test_a_vision_language_checkpoint_streams_under_its_stored_names(arch_name, tmp_path):
    """Vision-language checkpoints store the decoder under other names than the model's (``model.layers…`` or
    ``language_model.model.layers…`` for ``model.language_model.layers…``); the streamed edit maps them as
    transformers' loader does and writes what the in-memory edit computes (Gemma 3: post-norms, tied head; Gemma 4:
    chains of post-norms, taken from a traced copy)."""
    import copy

    from conftest import make_tiny_vlm

    from refdir.core.architecture import inspect_model
    from refdir.core.auto_model import auto_class
    from refdir.core.orthogonalize import orthogonalize_

    model = make_tiny_vlm(arch_name, VOCAB)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="100KB")
    r = torch.randn(64, generator=torch.Generator().manual_seed(5))
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    in_memory = copy.deepcopy(model)
    orthogonalize_(in_memory, r)
    summary = stream_orthogonalize(src, r, tmp_path / "out", progress=False)
    writers = sum(len(bp.writers) for bp in inspect_model(model).blocks)  # o_proj and down_proj (Gemma 4: + experts'
    assert len(summary["edited"]) == writers + 1  # and the per-layer projection) of 3 blocks, the embedding
    edited = auto_class(model.config).from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        want, got, base = in_memory(ids).logits, edited(ids).logits, model(ids).logits
    assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max())) < (base - want).abs().max()


def test_unedited_tensors_are_copied_unchanged(tmp_path):
    from safetensors.torch import load_file

    model = make_tiny("llama", VOCAB)
    src = tmp_path / "src"
    model.save_pretrained(src)
    stream_orthogonalize(src, torch.randn(64), tmp_path / "out", progress=False)
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed == {k for k in a if k.endswith(("o_proj.weight", "down_proj.weight")) or "embed_tokens" in k}


def test_streaming_bad_inputs_leave_no_output(tmp_path):
    model = make_tiny("llama", VOCAB)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="100KB")
    with pytest.raises(RefdirError, match="hidden size is 64"):
        stream_orthogonalize(src, torch.randn(65), tmp_path / "out", progress=False)
    (src / "model.safetensors.index.json").unlink()
    with pytest.raises(RefdirError, match="needs its index"):
        stream_orthogonalize(src, torch.randn(64), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_orthogonalize_cli_streams_directories(tmp_path):
    model = make_tiny("qwen2", VOCAB)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="100KB")
    d = Direction(torch.randn(64), 1, -1)
    d.save(tmp_path / "r")
    r = CliRunner().invoke(app, ["orthogonalize", str(src), str(tmp_path / "out"), "--direction", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "refdir_edit.json").read_text())["mode"] == "streaming"
