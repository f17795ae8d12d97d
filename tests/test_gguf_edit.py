"""GGUF in → GGUF out on real weights (SmolLM2-135M-Instruct, Q4_1, tied embeddings)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from typer.testing import CliRunner

from refdir.cli.main import app
from refdir.core.cache import drop_orphan_copies
from refdir.core.directions import Direction
from refdir.core.gguf_edit import orthogonalize_gguf
from refdir.core.model_files import smollm2_gguf_path
from refdir.core.models import load_model
from refdir.errors import RefdirError


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    src = smollm2_gguf_path()
    r = torch.randn(576, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("gguf") / "out.gguf"
    summary = orthogonalize_gguf(src, r, out, progress=False)
    return src, out, r, summary


def test_gguf_edit_keeps_other_bytes_and_metadata(edited):
    src, out, r, summary = edited
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    fa = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    assert fa == fb
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(tb) == set(ta) | {"output.weight"} and summary["untied_output"]
    for name, t in ta.items():
        if name not in summary["edited"]:
            assert np.array_equal(np.asarray(t.data), np.asarray(tb[name].data)), name
            assert t.tensor_type == tb[name].tensor_type
    assert np.array_equal(np.asarray(ta["token_embd.weight"].data), np.asarray(tb["output.weight"].data))
    assert {n.split(".")[-2] for n in summary["edited"]} == {"token_embd", "attn_output", "ffn_down"}
    # the edited Q4_1 writers are widened to Q8_0 (gguf_edit.WIDEN); the embedding was Q8_0 already
    assert summary["changed_types"] == {n: "Q4_1 -> Q8_0" for n in summary["edited"] if n != "token_embd.weight"}
    assert ta["token_embd.weight"].tensor_type == tb["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_gguf_edit_removes_the_direction_up_to_quantization_noise(edited):
    src, out, r, summary = edited
    rn = (r / r.norm()).numpy()
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    for name in ("blk.5.ffn_down.weight", "token_embd.weight"):
        xa = gguf.quants.dequantize(ta[name].data, ta[name].tensor_type)
        xb = gguf.quants.dequantize(tb[name].data, tb[name].tensor_type)
        axis = 0 if name.startswith("blk") else 1
        before = np.abs(np.tensordot(rn, xa, axes=([0], [axis]))).mean()
        after = np.abs(np.tensordot(rn, xb, axes=([0], [axis]))).mean()
        assert after < 0.6 * before, (name, before, after)


def test_the_edited_gguf_computes_what_the_hooks_compute(edited):
    """The file, loaded back, against the direction ablated with hooks on the dequantized source: the same
    next-token distributions up to Q8_0's rounding. Its 4-bit writers rounded to Q4_1 again gave KL 0.25 and top-1
    agreement 0.75 here, for an edit that itself moves the model by KL 0.34."""
    from refdir.core.interventions import ablate

    src, out, r, _ = edited
    a, b = load_model(str(src), dtype="fp32"), load_model(str(out), dtype="fp32", cache=False)
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Water boils at a temperature of",
               "Once upon a time, in a small village,", "The three primary colors are", "To make a cup of tea, first"]
    with torch.no_grad():
        ids = [a.tokenizer(p, return_tensors="pt").input_ids for p in prompts]
        base = torch.stack([a.model(input_ids=i).logits[0, -1].double().log_softmax(-1) for i in ids])
        with ablate(a.model, r):
            hooks = torch.stack([a.model(input_ids=i).logits[0, -1].double().log_softmax(-1) for i in ids])
        file = torch.stack([b.model(input_ids=i).logits[0, -1].double().log_softmax(-1) for i in ids])
    kl = lambda p, q: float((p.exp() * (p - q)).sum(-1).mean())  # noqa: E731
    assert kl(base, hooks) > 0.1  # the edit moves the model
    assert kl(hooks, file) < 0.01 and bool((hooks.argmax(-1) == file.argmax(-1)).all()), kl(hooks, file)


def test_gguf_output_loads_in_transformers_with_the_original_unembedding(edited):
    src, out, _r, _ = edited
    a, b = load_model(str(src), dtype="fp32"), load_model(str(out), dtype="fp32", cache=False)
    assert torch.equal(a.model.get_output_embeddings().weight, b.model.get_output_embeddings().weight)
    assert not torch.equal(a.model.get_input_embeddings().weight, b.model.get_input_embeddings().weight)


def test_gguf_bad_inputs(tmp_path, edited):
    src = edited[0]
    with pytest.raises(RefdirError, match="embedding width is 576"):
        orthogonalize_gguf(src, torch.randn(10), tmp_path / "x.gguf", progress=False)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(RefdirError, match="could not read GGUF"):
        orthogonalize_gguf(tmp_path / "junk.gguf", torch.randn(10), tmp_path / "y.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.gguf"]
    Direction(torch.randn(576), 3, -1).save(tmp_path / "r")
    r = CliRunner().invoke(app, ["orthogonalize", str(src), str(tmp_path / "z.gguf"), "--direction", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert gguf.GGUFReader(str(tmp_path / "z.gguf")).fields["general.architecture"].contents() == "llama"


def test_gguf_with_unsupported_architecture_is_refused(tmp_path):
    # an RWKV model: it has an embedding but writes through tensors of names refdir does not know
    path = tmp_path / "ssm.gguf"
    w = gguf.GGUFWriter(str(path), arch="rwkv6")
    w.add_tensor("token_embd.weight", np.zeros((32, 16), dtype=np.float32))
    w.add_tensor("blk.0.time_mix_output.weight", np.zeros((16, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    with pytest.raises(RefdirError, match="unsupported GGUF architecture 'rwkv6'"):
        orthogonalize_gguf(path, torch.randn(16), tmp_path / "out.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ssm.gguf"]


def _write_gguf(path, tensors: dict, arch: str = "llama"):
    w = gguf.GGUFWriter(str(path), arch=arch)
    for name, x in tensors.items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return path


def test_gguf_hybrid_mixers_and_learned_positions_are_edited(tmp_path):
    """A hybrid GGUF's mamba mixers write through ``ssm_out`` beside ``attn_output`` / ``ffn_down``, and GPT-2-style
    learned positions through ``position_embd``: all of them lose the direction."""
    rng = np.random.default_rng(0)
    d = 16
    src = {"token_embd.weight": rng.standard_normal((32, d)).astype(np.float32),
           "position_embd.weight": rng.standard_normal((8, d)).astype(np.float32),
           "blk.0.attn_output.weight": rng.standard_normal((d, d)).astype(np.float32),
           "blk.0.ssm_out.weight": rng.standard_normal((d, 2 * d)).astype(np.float32),
           "blk.0.ffn_down.weight": rng.standard_normal((d, 2 * d)).astype(np.float32)}
    path = _write_gguf(tmp_path / "hybrid.gguf", src, arch="falcon-h1")
    r = torch.randn(d, generator=torch.Generator().manual_seed(1))
    summary = orthogonalize_gguf(path, r, tmp_path / "out.gguf", progress=False)
    assert set(summary["edited"]) == set(src)
    got = {t.name: np.asarray(t.data).astype(np.float64) for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors}
    u = (r / r.norm()).double().numpy()
    for name, x in src.items():
        axis = 1 if name.endswith("embd.weight") else 0  # rows of an embedding, columns of a writer [out, in]
        assert np.abs(np.moveaxis(got[name], axis, -1) @ u).max() < 1e-5, name
        assert np.abs(np.moveaxis(x.astype(np.float64), axis, -1) @ u).max() > 0.1, name


def test_a_gguf_is_converted_once_per_file_and_dtype_and_reloaded_from_the_cache(tmp_path, monkeypatch):
    """The first load of a GGUF converts it (transformers dequantizes every tensor) and keeps a safetensors copy;
    the next loads read that copy, which gives exactly what converting again gives. A file whose content changes is
    converted again; the same content under a new mtime is not; copies of deleted GGUFs are dropped; a cache that
    cannot be written is skipped."""
    import os
    import shutil
    import warnings

    import refdir.core.models as models
    from refdir.core.chat import ChatFormat

    monkeypatch.setenv("REFDIR_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m.gguf"
    shutil.copyfile(smollm2_gguf_path(), src)
    conversions = []
    convert = models._load_gguf
    monkeypatch.setattr(models, "_load_gguf", lambda *a, **k: conversions.append(1) or convert(*a, **k))

    def logits(lm):
        fmt = ChatFormat(lm.tokenizer)
        enc = fmt.encode(["How do I reverse a list in Python?", "Name three colours."])
        with torch.no_grad():
            return lm.model(**enc).logits, enc["input_ids"], fmt.render("Hi")

    first = load_model(str(src), dtype="fp32")
    assert "converted" not in first.source and len(conversions) == 1
    cached = models.gguf_cache_path(src, torch.float32)
    assert (cached / "model.safetensors").exists()
    again = load_model(str(src), dtype="fp32")
    assert again.source["converted"] == str(cached) and again.source["path"] == str(src) and len(conversions) == 1
    assert again.model_id == first.model_id == "m.gguf"
    (la, ia, ra), (lb, ib, rb) = logits(first), logits(again)
    assert torch.equal(ia, ib) and ra == rb and torch.equal(la, lb)
    assert again.model.generation_config.eos_token_id == first.model.generation_config.eos_token_id

    st = src.stat()  # the same bytes, touched: hashed once and still used
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_model(str(src), dtype="fp32").source.get("converted") and len(conversions) == 1
    with open(src, "ab") as f:  # other content (trailing bytes the GGUF reader ignores): converted again
        f.write(b"\0" * 64)
    assert "converted" not in load_model(str(src), dtype="fp32").source and len(conversions) == 2
    assert load_model(str(src), dtype="bf16").model.dtype == torch.bfloat16 and len(conversions) == 3
    assert models.gguf_cache_path(src, torch.bfloat16) != cached

    # copies of a GGUF that no longer exists are dropped when the next one is cached; nothing else is touched
    keep = models.gguf_cache_path(smollm2_gguf_path(), torch.float32)
    keep.mkdir(parents=True)  # not written by refdir: left alone whatever it holds
    bf16 = models.gguf_cache_path(src, torch.bfloat16)
    src.unlink()
    assert drop_orphan_copies(cached.parent) == sorted([cached, bf16])
    assert sorted(cached.parent.iterdir()) == [keep]

    # a full disk met while writing, as safetensors reports it (its own error type, not an OSError): skipped
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(models, "save_hf_checkpoint", lambda *a, **k: (_ for _ in ()).throw(full))
    other = tmp_path / "other.gguf"
    shutil.copyfile(smollm2_gguf_path(), other)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lm = load_model(str(other), dtype="fp32")
    assert lm.model is not None and any("could not be cached" in str(x.message) for x in w)
    assert not models.gguf_cache_path(other, torch.float32).exists()
    assert sorted(p.name for p in cached.parent.iterdir()) == [keep.name]  # no partial copy left behind


def test_the_gguf_cache_keeps_within_its_budget_evicting_the_least_recently_used(tmp_path, monkeypatch):
    """Converted copies are kept while they fit the budget (REFDIR_GGUF_CACHE_GB, and 2 GiB left free on the disk);
    a new one evicts the least recently used (a load from the cache counts as a use); one that cannot fit even in
    an empty cache is not kept and evicts nothing."""
    import shutil
    import warnings

    import refdir.core.cache as cache
    import refdir.core.models as models

    monkeypatch.setenv("REFDIR_CACHE", str(tmp_path / "cache"))
    files = {}
    for name in "abc":
        files[name] = tmp_path / f"{name}.gguf"
        shutil.copyfile(smollm2_gguf_path(), files[name])
    copy = {k: models.gguf_cache_path(f, torch.bfloat16) for k, f in files.items()}

    need = models.checkpoint_bytes(load_model(str(files["a"]), dtype="bf16").model)
    monkeypatch.setenv("REFDIR_GGUF_CACHE_GB", str(2.5 * need / 2**30))  # room for two copies, not three
    load_model(str(files["b"]), dtype="bf16")
    assert copy["a"].exists() and copy["b"].exists()
    assert load_model(str(files["a"]), dtype="bf16").source["converted"] == str(copy["a"])  # a: used last
    load_model(str(files["c"]), dtype="bf16")
    assert copy["a"].exists() and not copy["b"].exists() and copy["c"].exists()

    monkeypatch.setattr(cache, "FREE_RESERVE", shutil.disk_usage(tmp_path).free + 3 * need)  # a disk too full
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert "converted" not in load_model(str(files["b"]), dtype="bf16").source
    assert any("was not cached" in str(x.message) for x in w)
    assert copy["a"].exists() and not copy["b"].exists() and copy["c"].exists()  # nothing evicted for nothing

    monkeypatch.setattr(cache, "FREE_RESERVE", 2 << 30)
    for bad in ("lots", "-1", "nan"):  # a budget that is not a number of GiB: said, and nothing cached or evicted
        monkeypatch.setenv("REFDIR_GGUF_CACHE_GB", bad)
        with pytest.raises(RefdirError, match="REFDIR_GGUF_CACHE_GB must be a number"):
            cache.cache_limit()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert "converted" not in load_model(str(files["b"]), dtype="bf16").source
        assert any("REFDIR_GGUF_CACHE_GB must be a number" in str(x.message) for x in w)
        assert copy["a"].exists() and not copy["b"].exists() and copy["c"].exists()


def test_fast_gguf_reader_parses_what_the_library_reader_parses():
    """GGUFFile is gguf.GGUFReader over a plain array view: every field (name, types, every part) and every
    tensor (name, type, shape, offset, bytes) equal, on a real file with a 49k-token vocabulary and its merges."""
    from refdir.core.gguf_read import GGUFFile

    src = smollm2_gguf_path()
    a, b = gguf.GGUFReader(str(src)), GGUFFile(src)
    assert type(b.data) is np.ndarray and type(a.data) is np.memmap  # the fast path was taken
    assert list(a.fields) == list(b.fields)
    for k, fa in a.fields.items():
        fb = b.fields[k]
        assert fa.types == fb.types and fa.offset == fb.offset and fa.data == fb.data, k
        assert len(fa.parts) == len(fb.parts), k
        assert all(np.array_equal(x, y) for x, y in zip(fa.parts, fb.parts, strict=True)), k
    assert a.fields["tokenizer.ggml.tokens"].contents() == b.fields["tokenizer.ggml.tokens"].contents()
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in a.tensors] == \
           [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in b.tensors]
    assert all(np.array_equal(np.asarray(x.data), np.asarray(y.data)) for x, y in zip(a.tensors, b.tensors, strict=True))


def test_transformers_gguf_load_with_fast_reads_equals_the_library_reader(monkeypatch):
    """refdir's GGUF load hands transformers GGUFFile for its parses (tokenizer, config, weights); the tokenizer
    and every weight are what the library's own reader gives, and the library's class is back afterwards."""
    import refdir.core.gguf_read as gr
    from refdir.core.models import _load_gguf

    parses = []
    build = gr.GGUFFile._build_fields
    monkeypatch.setattr(gr.GGUFFile, "_build_fields", lambda self, *a: parses.append(1) or build(self, *a))
    fast_model, fast_tok = _load_gguf(smollm2_gguf_path(), torch.float32, "cpu")
    n = len(parses)
    assert n >= 2 and gguf.GGUFReader is not gr.GGUFFile  # every parse took the fast path; the name is restored
    monkeypatch.setattr(gr, "FAST_LIBRARY_READS", False)
    ref_model, ref_tok = _load_gguf(smollm2_gguf_path(), torch.float32, "cpu")
    assert len(parses) == n
    assert fast_tok.get_vocab() == ref_tok.get_vocab() and fast_tok.chat_template == ref_tok.chat_template
    a, b = fast_model.state_dict(), ref_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gguf_weights_are_asked_for_unpacked(monkeypatch):
    """Transformers 5.25 keeps some architectures' GGUF weights packed and fetches a matmul kernel from the hub
    for them; refdir edits plain weights and fetches no code, so it asks for dequantized weights on every GGUF
    load (and the 'packed is fastest in float32' warning of a bf16 load does not appear)."""
    quantizer = pytest.importorskip("transformers.quantizers.quantizer_gguf")
    from refdir.core.models import _load_gguf

    seen = []
    settle = quantizer.GgufHfQuantizer.update_dtype
    monkeypatch.setattr(quantizer.GgufHfQuantizer, "update_dtype",
                        lambda self, dtype: seen.append(self.quantization_config.dequantize) or settle(self, dtype))
    model, _ = _load_gguf(smollm2_gguf_path(), torch.bfloat16, "cpu")
    assert seen == [True]
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16
               for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_a_converted_copy_with_a_file_added_is_rebuilt(tmp_path, monkeypatch):
    """The converted-GGUF cache is refdir's own: a copy that holds a file it did not write is not intact, and is
    rebuilt on the next load (its marker lists no files, so --force's rule for output directories does not stop
    the rebuild)."""
    import shutil
    import warnings

    import refdir.core.models as models
    from refdir.core.io import foreign_files

    monkeypatch.setenv("REFDIR_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m.gguf"
    shutil.copyfile(smollm2_gguf_path(), src)
    load_model(str(src), dtype="fp32")
    cached = models.gguf_cache_path(src, torch.float32)
    (cached / "notes.txt").write_text("added")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lm = load_model(str(src), dtype="fp32")
    assert not any("could not be cached" in str(x.message) for x in w)
    assert "converted" not in lm.source and not (cached / "notes.txt").exists() and foreign_files(cached) == []
    assert load_model(str(src), dtype="fp32").source["converted"] == str(cached)
