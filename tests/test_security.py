"""What a model, a run directory or a cache can make refdir do: run no model code and unpickle nothing unless the
user asks on the command line (or in the Python call), never because a file says so; and trust no cached file
whose content changed."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from safetensors.torch import load_file, save_file

from refdir.core.cache import CONVERTED_RECORD, cached_dir_intact, check_record, file_record, write_dir_record
from refdir.core.directions import Direction
from refdir.core.models import load_config, load_model
from refdir.core.orthogonalize import stream_orthogonalize
from refdir.core.rundir import RunDir
from refdir.core.spec import UNSAFE_FIELDS, ModelSpec
from refdir.errors import RefdirError

SRC = Path(__file__).resolve().parents[1] / "src" / "refdir"
VOCAB = 128


@pytest.fixture()
def tiny_dir(tmp_path, tiny_tokenizer):
    d = tmp_path / "tiny"
    make_tiny("llama", len(tiny_tokenizer)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


# ------------------------------------------------------------------------------------------ custom code


def _custom_code_dir(root: Path, model_type: str = "mystery_lm") -> tuple[Path, Path]:
    """A model directory whose config names its own code (auto_map), code that leaves a file if it ever runs."""
    d, ran = root / "custom", root / "CODE_RAN"
    d.mkdir()
    save_file(load_file_from_tiny(), str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"model_type": model_type, "architectures": ["MysteryForCausalLM"], "hidden_size": 64,
           "num_hidden_layers": 3, "vocab_size": VOCAB,
           "auto_map": {"AutoConfig": "configuration_mystery.MysteryConfig",
                        "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"}}
    (d / "config.json").write_text(json.dumps(cfg))
    code = f"open({str(ran)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n"
    (d / "configuration_mystery.py").write_text(code + "class MysteryConfig(PretrainedConfig):\n"
                                                f"    model_type = {model_type!r}\n")
    (d / "modeling_mystery.py").write_text(code)
    return d, ran


def load_file_from_tiny() -> dict:
    return {k: v.contiguous() for k, v in make_tiny("llama", VOCAB).state_dict().items()}


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``refdir ARGS`` in a subprocess with stdin closed (a [y/N] prompt would fail or hang there)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", "from refdir.cli import main; main()", *args], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


def test_custom_code_model_is_refused_with_one_clear_error_and_no_prompt(tmp_path):
    src, ran = _custom_code_dir(tmp_path)
    Direction(torch.randn(64), 1, -1).save(tmp_path / "r")
    for args in (["orthogonalize", str(src), "out", "--direction", "r"], ["extract", str(src), "--out", "out"]):
        res = _cli(args, tmp_path)
        out = res.stdout + res.stderr
        assert res.returncode == 2, out
        assert "[y/N]" not in out and "Traceback" not in out, out
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "--trust-remote-code" in errors[0], out
        assert not (tmp_path / "out").exists()
    assert not ran.exists(), "the model's code ran"


def test_library_calls_refuse_custom_code_too(tmp_path):
    src, ran = _custom_code_dir(tmp_path)
    for call in (lambda: load_config(src), lambda: load_model(src, dtype="fp32"),
                 lambda: stream_orthogonalize(src, torch.randn(64), tmp_path / "out", progress=False)):
        with pytest.raises(RefdirError, match="--trust-remote-code"):
            call()
    assert not ran.exists() and not (tmp_path / "out").exists()


def test_a_known_model_type_with_an_auto_map_loads_without_running_its_code(tmp_path, tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"}
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    (tiny_dir / "modeling_mystery.py").write_text(f"open({str(tmp_path / 'CODE_RAN')!r}, 'w').write('ran')\n")
    lm = load_model(tiny_dir, dtype="fp32")
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert not (tmp_path / "CODE_RAN").exists()


def test_every_transformers_load_passes_trust_remote_code_explicitly():
    """Statically: every from_pretrained / from_config call and lm-eval's HFLM in src/ names trust_remote_code, and
    every model weight load names use_safetensors (or reads a GGUF)."""
    missing, unsafe = [], []
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            kws = {k.arg for k in node.keywords}
            where = f"{f.relative_to(SRC)}:{node.lineno}"
            if fn in ("from_pretrained", "from_config", "HFLM") and "trust_remote_code" not in kws:
                missing.append(where)
            owner = ast.unparse(node.func.value) if isinstance(node.func, ast.Attribute) else ""
            if fn == "from_pretrained" and owner.startswith("AutoModel") and not kws & {"use_safetensors", "gguf_file"}:
                unsafe.append(where)
    assert not missing, f"calls without trust_remote_code: {missing}"
    assert not unsafe, f"weight loads that could unpickle: {unsafe}"


# ------------------------------------------------------------------------------------------ never from a file


def test_unsafe_settings_are_never_read_back_from_a_run_directory(tmp_path):
    rd = tmp_path / "run"
    rd.mkdir()
    recorded = {"model": "some/model", "dtype": "fp32", "trust_remote_code": True, "allow_pickle": True}
    (rd / "config.json").write_text(json.dumps({"model": recorded}))
    spec = RunDir(rd).model_spec()
    assert spec.model == "some/model" and spec.dtype == "fp32"
    assert not spec.trust_remote_code and not spec.allow_pickle
    given = RunDir(rd).model_spec({"trust_remote_code": True})  # from the command line: honoured
    assert given.trust_remote_code and not given.allow_pickle
    (rd / "config.json").write_text(json.dumps(recorded))  # an older flat config
    assert not RunDir(rd).model_spec().trust_remote_code
    assert set(UNSAFE_FIELDS) == {"trust_remote_code", "allow_pickle"}
    assert ModelSpec.from_record(recorded, {"allow_pickle": True}).allow_pickle


def test_no_model_spec_is_built_from_a_file_except_through_from_record():
    """Statically: the modules that read run or search directories build their ModelSpec with from_record."""
    for rel in ("core/rundir.py", "workflows/analyze.py", "method/search/export.py"):
        tree = ast.parse((SRC / rel).read_text())
        direct = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
                  and isinstance(n.func, ast.Name) and n.func.id == "ModelSpec"]
        assert not direct, f"{rel} builds a ModelSpec directly at lines {direct}"


# ------------------------------------------------------------------------------------------ pickles


def _pickle_only(d: Path) -> None:
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")


def test_pickle_only_weights_are_refused_unless_allowed(tiny_dir, tmp_path):
    _pickle_only(tiny_dir)
    with pytest.raises(RefdirError, match="--allow-pickle"):
        load_model(tiny_dir, dtype="fp32")
    with pytest.raises(RefdirError, match="--allow-pickle"):
        ModelSpec(model=str(tiny_dir), dtype="fp32").load_model()
    lm = ModelSpec(model=str(tiny_dir), dtype="fp32", allow_pickle=True).load_model()
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    res = _cli(["extract", str(tiny_dir), "--out", "out"], tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 2 and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--allow-pickle" in errors[0], out
    assert not (tmp_path / "out").exists()


def test_safetensors_are_used_even_beside_pickles(tiny_dir):
    (tiny_dir / "pytorch_model.bin").write_bytes(b"not a pickle: loading it would fail")
    lm = load_model(tiny_dir, dtype="fp32")
    assert type(lm.model).__name__ == "LlamaForCausalLM"


# ------------------------------------------------------------------------------------------ cached files


def test_cache_record_is_cheap_when_unchanged_and_catches_changed_content(tiny_dir):
    write_dir_record(tiny_dir, source="test")
    assert cached_dir_intact(tiny_dir)
    w = tiny_dir / "model.safetensors"
    # touched, same content: the sha256 is recomputed once, the record takes the new mtime
    before = json.loads((tiny_dir / CONVERTED_RECORD).read_text())["files"]["model.safetensors"]
    os.utime(w, ns=(before["mtime_ns"] + 10**9, before["mtime_ns"] + 10**9))
    assert cached_dir_intact(tiny_dir)
    after = json.loads((tiny_dir / CONVERTED_RECORD).read_text())["files"]["model.safetensors"]
    assert after["mtime_ns"] == before["mtime_ns"] + 10**9 and after["sha256"] == before["sha256"]
    # same size, one byte changed: the size alone would not tell, the new mtime makes the sha256 catch it
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    assert not cached_dir_intact(tiny_dir)
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    assert cached_dir_intact(tiny_dir)
    # a file cut short, an added file, a removed file, an old marker without a record: all not intact
    w.write_bytes(bytes(data[:-100]))
    assert not cached_dir_intact(tiny_dir)
    w.write_bytes(bytes(data))
    (tiny_dir / "extra.py").write_text("print('hi')\n")
    assert not cached_dir_intact(tiny_dir)
    (tiny_dir / "extra.py").unlink()
    assert cached_dir_intact(tiny_dir)
    (tiny_dir / "generation_config.json").unlink()
    assert not cached_dir_intact(tiny_dir)
    (tiny_dir / CONVERTED_RECORD).write_text(json.dumps({"source": "x", "sha256": "y"}))
    assert not cached_dir_intact(tiny_dir)


def test_check_record_of_one_file(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"x" * 1000)
    rec = file_record(f)
    assert check_record(f, rec) == rec
    f.write_bytes(b"y" * 1000)
    assert check_record(f, rec) is None
    f.write_bytes(b"x" * 999)
    assert check_record(f, rec) is None
    f.unlink()
    assert check_record(f, rec) is None
