"""Bad inputs, one table across the commands: each ends with exit status 2, exactly one ``error:`` line and no
traceback, and nothing on disk is created or changed (a snapshot of every path, size, mtime and content hash under
the test's directory, models and inputs included, before and after; a case that may write elsewhere also checks
that place).

Each case is a small function that prepares its inputs in its own directory and returns the command line (or the
command line and a clean-up). The table covers the issue's "tracebacks instead of one error line", "partial
output" and "silent damage" lists, plus duplicate-only data, prompts longer than the context, NaN activations,
fp16 overflow, bad settings, locked and corrupt run directories, custom code and pickled weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from conftest import make_tiny, make_tiny_vlm, snapshot
from safetensors.torch import save_file
from typer.testing import CliRunner

from refdir.cli.main import app
from refdir.steering.vectors import SteeringVector

ROOT = Path(__file__).resolve().parents[1]
# the settings of the finished run every run-directory case starts from (a rerun with them reuses it)
RUN_ARGS = ["--method", "paper", "--refusal-tokens", "I,As", "--n-train", "8", "--n-val", "4", "--n-test", "4", "--max-new-tokens", "4",
            "--no-filter-train", "--dtype", "fp32", "--batch-size", "8", "--kl-max", "1e9", "--induce-rule",
            "relative"]
LONG_PROMPT = " ".join(["explain"] * 400)


# ------------------------------------------------------------------------------------------------ fixtures


def _save(model, tok, d: Path, **kw) -> Path:
    model.save_pretrained(d, **kw)
    if tok is not None:
        tok.save_pretrained(d)
    return d


def _edit_config(d: Path, **changes) -> Path:
    f = d / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
    return d


def _tiny_gguf(path: Path, d: int = 16) -> Path:
    """A tiny llama-architecture GGUF with F32 tensors: an embedding and one block's residual writers."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tensor("token_embd.weight", rng.standard_normal((32, d)).astype(np.float32))
    w.add_tensor("blk.0.attn_output.weight", rng.standard_normal((d, d)).astype(np.float32))
    w.add_tensor("blk.0.ffn_down.weight", rng.standard_normal((d, 2 * d)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return path


def _direction_files(stem: Path, vector: torch.Tensor, **meta) -> Path:
    """A direction file written by hand (so that it can hold what refdir itself would refuse to write)."""
    save_file({"direction": vector.float().contiguous()}, str(stem.with_suffix(".safetensors")))
    body = {"format": "refdir.direction", "version": 1, "layer": 1, "position": -1, "model_id": "",
            "norm": "raw", "d_model": vector.numel(), "meta": {}}
    stem.with_suffix(".json").write_text(json.dumps({k: v for k, v in {**body, **meta}.items() if v is not None}))
    return stem


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tiny_tokenizer):
    """Every shared input: tiny models of several kinds, a sharded checkpoint, a GGUF, a direction, a steering
    vector and a finished run; each case also gets its own directory under ``base/cases``."""
    base = tmp_path_factory.mktemp("bad_inputs")
    m = base / "models"
    V = len(tiny_tokenizer)
    f = SimpleNamespace(base=base, cleanups=[])
    f.model = _save(make_tiny("qwen2", V), tiny_tokenizer, m / "qwen2")
    f.short = _save(make_tiny("qwen2", V, max_position_embeddings=32), tiny_tokenizer, m / "short")
    nan = make_tiny("qwen2", V)
    with torch.no_grad():
        nan.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    f.nan = _save(nan, tiny_tokenizer, m / "nan")
    huge = make_tiny("qwen2", V)
    with torch.no_grad():  # finite in fp32 (residuals ~1e8), past fp16's 65504 after one block
        for n, p in huge.named_parameters():
            if "norm" not in n:
                p.mul_(100 if "embed" in n else 300)
    f.huge = _save(huge, tiny_tokenizer, m / "huge")
    f.uncovered = _save(make_tiny("doge", V), tiny_tokenizer, m / "doge")  # a per-channel residual scale
    f.vlm = _save(make_tiny_vlm("mistral3", V), tiny_tokenizer, m / "vlm")  # its template only for the processor,
    (f.vlm / "chat_template.jinja").unlink()  # and that file broken
    (f.vlm / "chat_template.json").write_text('{"chat_template": ')
    f.sharded = _save(make_tiny("llama", V), tiny_tokenizer, m / "sharded", max_shard_size="100KB")
    assert (f.sharded / "model.safetensors.index.json").exists()
    f.gguf = _tiny_gguf(m / "tiny.gguf")
    f.direction = _direction_files(m / "r", torch.randn(64, generator=torch.Generator().manual_seed(0)))
    f.vector = SteeringVector({2: torch.randn(64), 3: torch.randn(64)}).save(m / "sv").with_suffix("")
    f.run = m / "run"
    r = CliRunner().invoke(app, ["run", str(f.model), "--out", str(f.run), *RUN_ARGS])
    assert r.exit_code == 0, r.output
    assert (f.run / "selection" / "direction.safetensors").exists()
    yield f
    for c in f.cleanups:
        c()


def _copy(src: Path, w: Path, name: str | None = None) -> Path:
    dst = w / (name or src.name)
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst)
    return dst


def _model_copy(fx, w: Path, name: str, **config) -> Path:
    return _edit_config(_copy(fx.model, w, name), **config) if config else _copy(fx.model, w, name)


# ------------------------------------------------------------------------------------------------ the table

CASES: dict[str, tuple] = {}


def case(name: str, subprocess: bool = False):
    """Register a case: ``fn(w, fx)`` prepares inputs in ``w`` and returns the command line, or (command line,
    clean-up); ``subprocess``: run it as a child process with a timeout (a case that could hang)."""

    def deco(fn):
        CASES[name] = (fn, subprocess)
        return fn

    return deco


# Cases that are just a command line.
SIMPLE = [
    ("run: a model path that does not exist (no config.json or data/ left behind)",
     lambda w, fx: ["run", str(w / "typo"), "--out", str(w / "r"), *RUN_ARGS]),
    ("run: --dtype fp64",
     lambda w, fx: ["run", str(fx.model), "--out", str(w / "r"), *RUN_ARGS, "--dtype", "fp64"]),
    ("run: --judge oracle",
     lambda w, fx: ["run", str(fx.model), "--out", str(w / "r"), *RUN_ARGS, "--judge", "oracle"]),
    ("run: --induce-rule that does not exist",
     lambda w, fx: ["run", str(fx.model), "--out", str(w / "r"), *RUN_ARGS, "--induce-rule", "sometimes"]),
    ("run: --n-val 0",
     lambda w, fx: ["run", str(fx.model), "--out", str(w / "r"), *RUN_ARGS, "--n-val", "0"]),
    ("run: a hub id that is not in the offline cache",
     lambda w, fx: ["run", "refdir-tests/no-such-model", "--out", str(w / "r"), *RUN_ARGS]),
    ("run: a model whose residual is scaled per channel (no weight edit removes a direction)",
     lambda w, fx: ["run", str(fx.uncovered), "--out", str(w / "r"), *RUN_ARGS]),
    ("orthogonalize (streamed): the same per-channel residual scale",
     lambda w, fx: ["orthogonalize", str(fx.uncovered), str(w / "o"), "--direction", str(fx.direction)]),
    ("run: a vision-language checkpoint whose processor chat template is not JSON",
     lambda w, fx: ["run", str(fx.vlm), "--out", str(w / "r"), *RUN_ARGS]),
    ("extract: --harmful names a file that does not exist",
     lambda w, fx: ["extract", str(fx.model), "--out", str(w / "x"), "--harmful", str(w / "harmfull.json")]),
    ("extract: NaN activations (a model with NaN weights)",
     lambda w, fx: ["extract", str(fx.nan), "--out", str(w / "x"), "--n-train", "4", "--dtype", "fp32"]),
    ("extract: fp16 overflow (huge weights, --dtype fp16)",
     lambda w, fx: ["extract", str(fx.huge), "--out", str(w / "x"), "--n-train", "4", "--dtype", "fp16"]),
    ("run: an option value that does not parse (click's usage error)",
     lambda w, fx: ["run", str(fx.model), "--out", str(w / "r"), *RUN_ARGS, "--budget", "soon"]),
    ("run: an option that does not exist",
     lambda w, fx: ["run", str(fx.model), "--out", str(w / "r"), *RUN_ARGS, "--kl-targt", "0.05"]),
    ("analyze geometry: the run directory argument missing",
     lambda w, fx: ["analyze", "geometry"]),
    ("a command that does not exist",
     lambda w, fx: ["orthogonalise", str(fx.model), str(w / "o")]),
    ("extract: --n-train 0",
     lambda w, fx: ["extract", str(fx.model), "--out", str(w / "x"), "--n-train", "0"]),
    ("extract: --device that does not exist",
     lambda w, fx: ["extract", str(fx.model), "--out", str(w / "x"), "--device", "toaster"]),
    ("extract: --chat-template without {instruction}",
     lambda w, fx: ["extract", str(fx.model), "--out", str(w / "x"), "--chat-template", "no placeholder here"]),
    ("search: --variants that do not exist",
     lambda w, fx: ["search", str(fx.model), "--out", str(w / "s"), "--variants", "plain,sideways"]),
    ("search: --kl-marks that are not numbers",
     lambda w, fx: ["search", str(fx.model), "--out", str(w / "s"), "--kl-marks", "low,high"]),
    ("search: a model path that does not exist",
     lambda w, fx: ["search", str(w / "typo"), "--out", str(w / "s"), "--trials", "1"]),
    ("search: --trials 0",
     lambda w, fx: ["search", str(fx.model), "--out", str(w / "s"), "--trials", "0"]),
    ("search: --seed -1 (outside numpy's seed range)",
     lambda w, fx: ["search", str(fx.model), "--out", str(w / "s"), "--seed", "-1"]),
    ("run: --kl-target inf",
     lambda w, fx: ["run", str(fx.model), "--out", str(w / "r"), *RUN_ARGS, "--kl-target", "inf"]),
    ("run: --kl-max nan",
     lambda w, fx: ["run", str(fx.model), "--out", str(w / "r"), *RUN_ARGS, "--kl-max", "nan"]),
    ("run: --seed 2**32",
     lambda w, fx: ["run", str(fx.model), "--out", str(w / "r"), *RUN_ARGS, "--seed", str(2**32)]),
    ("export: a run directory without a search",
     lambda w, fx: ["export", str(fx.run), str(w / "out"), "--point", "0"]),
    ("eval: an arm of an unknown kind",
     lambda w, fx: ["eval", str(fx.model), "--arm", "base", "--arm", "sideways:x", "--out", str(w / "e")]),
    ("eval: an ablation arm whose direction file does not exist",
     lambda w, fx: ["eval", str(fx.model), "--arm", f"ablate:{w / 'nothing'}", "--out", str(w / "e")]),
    ("eval: --run that does not exist",
     lambda w, fx: ["eval", str(fx.model), "--run", str(w / "no-run"), "--out", str(w / "e")]),
    ("eval: --batch-size 0",
     lambda w, fx: ["eval", str(fx.model), "--batch-size", "0", "--out", str(w / "e")]),
    ("eval: an unknown --safety-judge",
     lambda w, fx: ["eval", str(fx.model), "--safety-judge", "oracle", "--out", str(w / "e")]),
    ("steer: --mode that does not exist",
     lambda w, fx: ["steer", str(fx.model), "--vector", str(fx.vector), "--mode", "amplify", "--prompt", "hi"]),
    ("steer: --vector a directory that is not a run",
     lambda w, fx: ["steer", str(fx.model), "--vector", str(w), "--prompt", "hi"]),
    ("jailbreak: --direction that does not exist",
     lambda w, fx: ["jailbreak", str(fx.model), "--out", str(w / "jb"), "--direction", str(w / "nothing")]),
    ("bias: --direction a directory that is not a run",
     lambda w, fx: ["bias", str(fx.model), "--out", str(w / "b"), "--direction", str(w)]),
    ("convert-vector: an output that is neither .gguf nor .safetensors",
     lambda w, fx: ["convert-vector", str(fx.vector), str(w / "out.txt")]),
]
for _name, _fn in SIMPLE:
    CASES[_name] = (_fn, False)


# Orthogonalize with a bad direction: (case, the direction's vector, source model, output name).
BAD_DIRECTIONS = [
    ("orthogonalize (streamed): a direction of the wrong size",
     lambda: torch.randn(65), "sharded", "out"),
    ("orthogonalize (streamed): a NaN direction",
     lambda: torch.full((64,), float("nan")), "sharded", "out"),
    ("orthogonalize (GGUF): a zero direction",
     lambda: torch.zeros(16), "gguf", "out.gguf"),
    ("orthogonalize (GGUF): a NaN direction",
     lambda: torch.full((16,), float("nan")), "gguf", "out.gguf"),
]


def _orthogonalize_with(vector, source: str, out: str):
    def fn(w, fx):
        r = _direction_files(w / "r", vector())
        return ["orthogonalize", str(getattr(fx, source)), str(w / out), "--direction", str(r)]

    return fn


for _name, _vector, _source, _out in BAD_DIRECTIONS:
    CASES[_name] = (_orthogonalize_with(_vector, _source, _out), False)


@case("orthogonalize: direction metadata without 'layer'")
def _(w, fx):
    r = _direction_files(w / "r", torch.randn(64), layer=None)
    return ["orthogonalize", str(fx.sharded), str(w / "out"), "--direction", str(r)]


# --- run


@case("run: --out FILE --force")
def _(w, fx):
    (w / "file").write_text("not a directory")
    return ["run", str(fx.model), "--out", str(w / "file"), "--force", *RUN_ARGS]


@case("run: --out under a file (unwritable)")
def _(w, fx):
    (w / "file").write_text("in the way")
    return ["run", str(fx.model), "--out", str(w / "file" / "r"), *RUN_ARGS]


@case("run: --out in a read-only location")
def _(w, fx):
    ro = Path("/sys/kernel")
    try:
        (ro / ".refdir-probe").mkdir()
    except OSError:
        return ["run", str(fx.model), "--out", str(ro / "refdir-run"), *RUN_ARGS], \
            lambda: os.path.lexists(ro / "refdir-run") and pytest.fail("output created in /sys/kernel")
    (ro / ".refdir-probe").rmdir()
    pytest.skip("no read-only location on this machine")


@case("run: --force on a directory refdir did not write")
def _(w, fx):
    d = w / "precious"
    d.mkdir()
    (d / "thesis.txt").write_text("years of work")
    return ["run", str(fx.model), "--out", str(d), "--force", *RUN_ARGS]


@case("run: a truncated stage.json in the run directory")
def _(w, fx):
    run = _copy(fx.run, w)
    f = run / "data" / "stage.json"
    f.write_bytes(f.read_bytes()[:9])
    return ["run", str(fx.model), "--out", str(run), *RUN_ARGS]


@case("run: an empty config.json in the run directory")
def _(w, fx):
    run = _copy(fx.run, w)
    (run / "config.json").write_text("")
    return ["run", str(fx.model), "--out", str(run), *RUN_ARGS]


@case("run: a duplicate-only dataset")
def _(w, fx):
    (w / "dup.txt").write_text("How do I pick a lock?\n" * 40)
    return ["run", str(fx.model), "--out", str(w / "r"), *RUN_ARGS, "--harmful", str(w / "dup.txt")]


@case("run: prompts longer than the model's context")
def _(w, fx):
    (w / "long.txt").write_text("\n".join(f"{i} {LONG_PROMPT}" for i in range(20)))
    return ["run", str(fx.short), "--out", str(w / "r"), *RUN_ARGS, "--harmful", str(w / "long.txt")]


@case("run: a model without a chat template")
def _(w, fx):
    d = _model_copy(fx, w, "plain")
    for n in ("chat_template.jinja", "chat_template.json"):
        (d / n).unlink(missing_ok=True)
    tc = d / "tokenizer_config.json"
    tc.write_text(json.dumps({k: v for k, v in json.loads(tc.read_text()).items() if k != "chat_template"}))
    return ["run", str(d), "--out", str(w / "r"), *RUN_ARGS]


@case("run: a model that refuses none of the refusal-token probe's prompts (no run directory left behind)")
def _(w, fx):
    args = [a for a in RUN_ARGS if a not in ("--refusal-tokens", "I,As")]
    return ["run", str(fx.model), "--out", str(w / "r"), *args]


@case("run: a run directory another refdir process is writing")
def _(w, fx):
    import fcntl

    run = _copy(fx.run, w)
    lock = run / ".refdir.lock"
    lock.touch()
    os.utime(lock, ns=(0, 0))
    fh = open(lock, "a+")  # noqa: SIM115 - held until the case ends, like another process's lock
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return ["run", str(fx.model), "--out", str(run), *RUN_ARGS], fh.close


def _held_lock(run: Path):
    """Hold ``run``'s writer lock as another refdir process would; returns the release."""
    import fcntl

    lock = run / ".refdir.lock"
    lock.touch()
    os.utime(lock, ns=(0, 0))
    fh = open(lock, "a+")  # noqa: SIM115 - held until the case ends, like another process's lock
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fh.close


@case("eval: --run a directory another refdir process is writing")
def _(w, fx):
    run = _copy(fx.run, w)
    return ["eval", "--run", str(run), "--n-harmful", "2", "--n-harmless", "2"], _held_lock(run)


@case("analyze geometry: a run directory another refdir process is writing")
def _(w, fx):
    run = _copy(fx.run, w)
    return ["analyze", "geometry", str(run), "--n", "2"], _held_lock(run)


@case("run: the run's own checkpoint as the model of a run into it, --force (the output holds the input)")
def _(w, fx):
    run = _copy(fx.run, w)
    return ["run", str(run / "checkpoint" / "model"), "--out", str(run), "--force", *RUN_ARGS]


@case("eval: --out the run directory given as --run, --force")
def _(w, fx):
    run = _copy(fx.run, w)
    return ["eval", "--run", str(run), "--out", str(run), "--force"]


@case("orthogonalize: the run holding the model and direction as the output, --force")
def _(w, fx):
    run = _copy(fx.run, w)
    return ["orthogonalize", str(run / "checkpoint" / "model"), str(run), "--direction",
            str(run / "selection" / "direction"), "--force"]


@case("run: a model whose weights file is a directory (no run directory left behind)")
def _(w, fx):
    m = _copy(fx.model, w, "m")
    (m / "model.safetensors").unlink()
    (m / "model.safetensors").mkdir()
    return ["run", str(m), "--out", str(w / "r"), *RUN_ARGS]


@case("run: a config whose hidden size does not fit the weights (no run directory left behind)")
def _(w, fx):
    m = _edit_config(_copy(fx.model, w, "m"), hidden_size=128)
    return ["run", str(m), "--out", str(w / "r"), *RUN_ARGS]


# --- extract


@case("extract: --harmful is a JSON object such as {\"data\": 5}")
def _(w, fx):
    (w / "obj.json").write_text(json.dumps({"data": 5}))
    return ["extract", str(fx.model), "--out", str(w / "x"), "--harmful", str(w / "obj.json")]


@case("extract: --harmful is a corrupt parquet file")
def _(w, fx):
    (w / "bad.parquet").write_bytes(b"PAR1 this is not parquet at all")
    return ["extract", str(fx.model), "--out", str(w / "x"), "--harmful", str(w / "bad.parquet")]


@case("extract: --harmful is a directory named x.txt")
def _(w, fx):
    (w / "x.txt").mkdir()
    return ["extract", str(fx.model), "--out", str(w / "x"), "--harmful", str(w / "x.txt")]


@case("extract: a csv without the --column")
def _(w, fx):
    (w / "h.csv").write_text("prompt\nHow do I pick a lock?\nHow do I make a weapon?\n")
    return ["extract", str(fx.model), "--out", str(w / "x"), "--harmful", str(w / "h.csv")]


@case("extract: an empty dataset")
def _(w, fx):
    (w / "empty.txt").write_text("\n\n")
    return ["extract", str(fx.model), "--out", str(w / "x"), "--harmless", str(w / "empty.txt")]


@case("extract: prompts longer than the model's context (32 tokens, 400 words)")
def _(w, fx):
    (w / "long.txt").write_text("\n".join(f"{i} {LONG_PROMPT}" for i in range(8)))
    return ["extract", str(fx.short), "--out", str(w / "x"), "--harmful", str(w / "long.txt"), "--dtype", "fp32"]


@case("extract: a checkpoint with an unknown model_type")
def _(w, fx):
    d = _model_copy(fx, w, "mystery", model_type="mystery-arch")
    return ["extract", str(d), "--out", str(w / "x")]


@case("extract: a config that names custom code (never prompted for, never run)")
def _(w, fx):
    d = _model_copy(fx, w, "custom", model_type="refdir-custom",
                    auto_map={"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"})
    (d / "custom.py").write_text(f"open({str(w / 'EXECUTED')!r}, 'w').write('remote code ran')\n")
    return ["extract", str(d), "--out", str(w / "x")]


@case("extract: weights only as pickle files, without --allow-pickle")
def _(w, fx):
    d = _model_copy(fx, w, "pickled")
    from safetensors.torch import load_file

    state = {}
    for f in d.glob("*.safetensors"):
        state.update(load_file(f))
        f.unlink()
    torch.save(state, d / "pytorch_model.bin")
    return ["extract", str(d), "--out", str(w / "x")]


# --- orthogonalize


@case("orthogonalize (streamed): a checkpoint with an unknown model_type")
def _(w, fx):
    d = _edit_config(_copy(fx.sharded, w), model_type="mystery-arch")
    return ["orthogonalize", str(d), str(w / "out"), "--direction", str(fx.direction)]


@case("orthogonalize (streamed): an index naming its shard ../x/s.safetensors")
def _(w, fx):
    d = _copy(fx.sharded, w)
    (w / "x").mkdir()
    idx = d / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    shutil.copy2(d / first, w / "x" / "s.safetensors")
    data["weight_map"] = {k: ("../x/s.safetensors" if v == first else v) for k, v in data["weight_map"].items()}
    idx.write_text(json.dumps(data))
    return ["orthogonalize", str(d), str(w / "out"), "--direction", str(fx.direction)]


@case("orthogonalize (streamed): an index naming its shard by an absolute path")
def _(w, fx):
    d = _copy(fx.sharded, w)
    idx = d / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    victim = w / "victim.safetensors"
    shutil.copy2(d / first, victim)
    data["weight_map"] = {k: (str(victim) if v == first else v) for k, v in data["weight_map"].items()}
    idx.write_text(json.dumps(data))
    return ["orthogonalize", str(d), str(w / "out"), "--direction", str(fx.direction)]


@case("orthogonalize (streamed): a shard cut short by 100 bytes", subprocess=True)
def _(w, fx):
    d = _copy(fx.sharded, w)
    shard = sorted(d.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return ["orthogonalize", str(d), str(w / "out"), "--direction", str(fx.direction)]


@case("orthogonalize: a tokenizer file linking out of the source directory")
def _(w, fx):
    d = _copy(fx.sharded, w)
    secret = w / "secret.txt"
    secret.write_text("not part of any model")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").symlink_to(secret)
    return ["orthogonalize", str(d), str(w / "out"), "--direction", str(fx.direction)]


@case("orthogonalize (in memory): a direction of the wrong size")
def _(w, fx):
    r = _direction_files(w / "r", torch.randn(65))
    return ["orthogonalize", str(fx.model), str(w / "out"), "--direction", str(r), "--in-memory"]


@case("orthogonalize (GGUF): a file that is not GGUF")
def _(w, fx):
    (w / "junk.gguf").write_bytes(b"not a gguf file at all")
    r = _direction_files(w / "r", torch.randn(16))
    return ["orthogonalize", str(w / "junk.gguf"), str(w / "out.gguf"), "--direction", str(r)]


# --- search and export


@case("export: a corrupt front.json")
def _(w, fx):
    run = _copy(fx.run, w)
    (run / "search").mkdir()
    (run / "search" / "front.json").write_text('{"points": [')
    (run / "search" / "config.json").write_text(json.dumps({"run": {"model": {"model": str(fx.model)}}}))
    return ["export", str(run), str(w / "out"), "--point", "0"]


@case("export: a point that is not on the front")
def _(w, fx):
    run = _copy(fx.run, w)
    (run / "search").mkdir()
    (run / "search" / "front.json").write_text(json.dumps({"points": [{"edit": {}, "trial": 0}]}))
    (run / "search" / "config.json").write_text(json.dumps({"run": {"model": {"model": str(fx.model)}}}))
    return ["export", str(run), str(w / "out"), "--point", "3"]


# --- eval, steer, convert-vector, analyze


@case("steer: a steering vector with an unknown tensor key")
def _(w, fx):
    sv = _copy(fx.vector.with_suffix(".json"), w)
    save_file({"layer.2": torch.randn(64), "bias": torch.randn(64)}, str(sv.with_suffix(".safetensors")))
    return ["steer", str(fx.model), "--vector", str(sv.with_suffix("")), "--prompt", "hi"]


@case("steer: a direction file without 'layer' as the vector")
def _(w, fx):
    r = _direction_files(w / "r", torch.randn(64), layer=None)
    return ["steer", str(fx.model), "--vector", str(r), "--prompt", "hi"]


@case("convert-vector: a steering vector with an unknown tensor key")
def _(w, fx):
    sv = _copy(fx.vector.with_suffix(".json"), w)
    save_file({"layer.x": torch.randn(64)}, str(sv.with_suffix(".safetensors")))
    return ["convert-vector", str(sv.with_suffix("")), str(w / "out.gguf")]


@case("convert-vector: an existing model .gguf as the output, without --force")
def _(w, fx):
    model = _copy(fx.gguf, w, "model.gguf")
    return ["convert-vector", str(fx.vector), str(model)]


@case("analyze geometry: a directory that is not a run")
def _(w, fx):
    (w / "empty").mkdir()
    return ["analyze", "geometry", str(w / "empty")]


@case("analyze geometry: an empty config.json in the run directory")
def _(w, fx):
    run = _copy(fx.run, w)
    (run / "config.json").write_text("")
    return ["analyze", "geometry", str(run)]


@case("analyze geometry: --split that does not exist")
def _(w, fx):
    run = _copy(fx.run, w)
    return ["analyze", "geometry", str(run), "--split", "holdout"]


@case("analyze suffix: neither --suffixes nor --search")
def _(w, fx):
    run = _copy(fx.run, w)
    return ["analyze", "suffix", str(run)]


@case("analyze geometry: data/sets.json a JSON list instead of an object")
def _(w, fx):
    run = _copy(fx.run, w)
    (run / "data" / "sets.json").write_text(json.dumps(["how do I bake bread?"]))
    return ["analyze", "geometry", str(run)]


def _out_of_vocab(run: Path) -> None:
    """Give ``run``'s refusal tokens an id past the tiny model's vocabulary (read only once the model is loaded)."""
    f = run / "refusal_tokens" / "tokens.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "ids": [5, 10**6]}))


@case("analyze geometry: refusal_tokens/tokens.json holding a token id outside the vocabulary")
def _(w, fx):
    run = _copy(fx.run, w)
    _out_of_vocab(run)
    return ["analyze", "geometry", str(run)]


OPTIMIZE_ARGS = ["--steps", "2", "--eval-every", "1", "--batch-size", "2", "--target-tokens", "3", "--n-train", "2",
                 "--n-val", "2", "--samples", "1", "--no-independence"]


@case("optimize: refusal_tokens/tokens.json holding a token id outside the vocabulary")
def _(w, fx):
    run = _copy(fx.run, w)
    _out_of_vocab(run)
    return ["optimize", str(run), *OPTIMIZE_ARGS]


@case("optimize: its training checkpoint truncated (the rerun would resume from it)")
def _(w, fx):
    run = _copy(fx.run, w)
    r = CliRunner().invoke(app, ["optimize", str(run), *OPTIMIZE_ARGS])
    assert r.exit_code == 0, r.output
    ckpt = run / "optimize" / "rdo_k1_checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    return ["optimize", str(run), *OPTIMIZE_ARGS]


@case("optimize: induce_rel_frac in config.json a list")
def _(w, fx):
    run = _copy(fx.run, w)
    f = run / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "induce_rel_frac": [0.5]}))
    return ["optimize", str(run), *OPTIMIZE_ARGS]


# ------------------------------------------------------------------------------------------------ the test


def _invoke(argv: list[str], as_subprocess: bool) -> tuple[int, str]:
    if not as_subprocess:
        r = CliRunner().invoke(app, argv, env={"COLUMNS": "200"})
        return r.exit_code, r.output
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        p = subprocess.run([sys.executable, "-m", "refdir", *argv], capture_output=True, text=True,
                           timeout=120, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the command did not end within 120 s")
    return p.returncode, p.stdout + p.stderr


# What each case's error line must say: the cause, so that an unrelated early error cannot pass for it.
NEEDLES: dict[str, str] = {
    "run: a model path that does not exist (no config.json or data/ left behind)": "does not exist",
    "run: --dtype fp64": "unknown dtype 'fp64'",
    "run: --judge oracle": "judge",
    "run: --induce-rule that does not exist": "induce_rule",
    "run: --n-val 0": "n_val",
    "run: a hub id that is not in the offline cache": "refdir-tests/no-such-model",
    "run: a model whose residual is scaled per channel (no weight edit removes a direction)": "cannot edit this architecture",
    "orthogonalize (streamed): the same per-channel residual scale": "cannot edit this architecture",
    "run: a vision-language checkpoint whose processor chat template is not JSON": "chat_template.json is not a JSON object",
    "extract: --harmful names a file that does not exist": "no such file",
    "extract: NaN activations (a model with NaN weights)": "not finite",
    "extract: fp16 overflow (huge weights, --dtype fp16)": "overflow",
    "run: an option value that does not parse (click's usage error)": "--budget",
    "run: an option that does not exist": "No such option: --kl-targt",
    "analyze geometry: the run directory argument missing": "Missing argument",
    "a command that does not exist": "No such command 'orthogonalise'",
    "extract: --n-train 0": "n_train",
    "extract: --device that does not exist": "unknown device 'toaster'",
    "extract: --chat-template without {instruction}": "{instruction}",
    "search: --variants that do not exist": "unknown variant",
    "search: --kl-marks that are not numbers": "--kl-marks",
    "search: a model path that does not exist": "does not exist",
    "search: --trials 0": "--trials",
    "search: --seed -1 (outside numpy's seed range)": "seed",
    "run: --kl-target inf": "kl_target",
    "run: --kl-max nan": "kl_max",
    "run: --seed 2**32": "seed",
    "eval: --run a directory another refdir process is writing": "in use by another refdir process",
    "analyze geometry: a run directory another refdir process is writing": "in use by another refdir process",
    "run: the run's own checkpoint as the model of a run into it, --force (the output holds the input)":
        "which this command reads",
    "eval: --out the run directory given as --run, --force": "which this command reads",
    "orthogonalize: the run holding the model and direction as the output, --force": "which this command reads",
    "run: a model whose weights file is a directory (no run directory left behind)": "Is a directory",
    "run: a config whose hidden size does not fit the weights (no run directory left behind)":
        "do not fit its config",
    "export: a run directory without a search": "holds no finished search",
    "eval: an arm of an unknown kind": "unknown kind 'sideways'",
    "eval: an ablation arm whose direction file does not exist": "nothing.safetensors",
    "eval: --run that does not exist": "does not exist",
    "eval: --batch-size 0": "batch_size",
    "eval: an unknown --safety-judge": "unknown judge 'oracle'",
    "steer: --mode that does not exist": "unknown mode 'amplify'",
    "steer: --vector a directory that is not a run": "is not a finished refdir run",
    "jailbreak: --direction that does not exist": "nothing.safetensors",
    "bias: --direction a directory that is not a run": "is not a finished refdir run",
    "convert-vector: an output that is neither .gguf nor .safetensors": "must end in .gguf",
    "orthogonalize (streamed): a direction of the wrong size": "size 65",
    "orthogonalize (streamed): a NaN direction": "NaN",
    "orthogonalize (GGUF): a zero direction": "zero vector",
    "orthogonalize (GGUF): a NaN direction": "NaN",
    "orthogonalize: direction metadata without 'layer'": "no 'layer'",
    "run: --out FILE --force": "is not a directory",
    "run: --out under a file (unwritable)": "is a file, not a directory",
    "run: --out in a read-only location": "read-only",
    "run: --force on a directory refdir did not write": "was not written by refdir",
    "run: a truncated stage.json in the run directory": "stage.json is corrupt",
    "run: an empty config.json in the run directory": "corrupt run file",
    "run: a duplicate-only dataset": "copies of one instruction",
    "run: prompts longer than the model's context": "do not fit the model's context",
    "run: a model without a chat template": "no chat template",
    "run: a model that refuses none of the refusal-token probe's prompts (no run directory left behind)": "refused none",
    "run: a run directory another refdir process is writing": "in use by another refdir process",
    'extract: --harmful is a JSON object such as {"data": 5}': "expected a JSON list",
    "extract: --harmful is a corrupt parquet file": "as parquet",
    "extract: --harmful is a directory named x.txt": "is a directory",
    "extract: a csv without the --column": "no column 'instruction'",
    "extract: an empty dataset": "empty dataset",
    "extract: prompts longer than the model's context (32 tokens, 400 words)": "do not fit the model's context",
    "extract: a checkpoint with an unknown model_type": "mystery-arch",
    "extract: a config that names custom code (never prompted for, never run)": "--trust-remote-code",
    "extract: weights only as pickle files, without --allow-pickle": "--allow-pickle",
    "orthogonalize (streamed): a checkpoint with an unknown model_type": "mystery-arch",
    "orthogonalize (streamed): an index naming its shard ../x/s.safetensors": "a shard must be a plain .safetensors file name",
    "orthogonalize (streamed): an index naming its shard by an absolute path": "a shard must be a plain .safetensors file name",
    "orthogonalize (streamed): a shard cut short by 100 bytes": "truncated or corrupt",
    "orthogonalize: a tokenizer file linking out of the source directory": "links to",
    "orthogonalize (in memory): a direction of the wrong size": "size 65",
    "orthogonalize (GGUF): a file that is not GGUF": "not a readable GGUF file",
    "export: a corrupt front.json": "corrupt search file",
    "export: a point that is not on the front": "not on the front",
    "steer: a steering vector with an unknown tensor key": "unexpected tensor 'bias'",
    "steer: a direction file without 'layer' as the vector": "no 'layer'",
    "convert-vector: a steering vector with an unknown tensor key": "unexpected tensor 'layer.x'",
    "convert-vector: an existing model .gguf as the output, without --force": "--force",
    "analyze geometry: a directory that is not a run": "is not a finished refdir run",
    "analyze geometry: an empty config.json in the run directory": "corrupt run file",
    "analyze geometry: --split that does not exist": "--split",
    "analyze suffix: neither --suffixes nor --search": "--suffixes",
    "analyze geometry: data/sets.json a JSON list instead of an object": "sets.json: not a JSON object",
    "analyze geometry: refusal_tokens/tokens.json holding a token id outside the vocabulary":
        "token id 1000000 is outside the model's vocabulary",
    "optimize: refusal_tokens/tokens.json holding a token id outside the vocabulary":
        "token id 1000000 is outside the model's vocabulary",
    "optimize: its training checkpoint truncated (the rerun would resume from it)": "corrupt optimize checkpoint",
    "optimize: induce_rel_frac in config.json a list": "induce_rel_frac is [0.5], not a number",
}


def test_table_is_large_enough():
    assert len(CASES) >= 30
    assert set(NEEDLES) == set(CASES)  # every case says what its error line must name


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_and_changes_nothing(name, fx):
    setup, as_subprocess = CASES[name]
    w = fx.base / "cases" / name.split(":")[0].replace(" ", "_") / str(list(CASES).index(name))
    w.mkdir(parents=True)
    got = setup(w, fx)
    argv, after = got if isinstance(got, tuple) else (got, None)
    before = snapshot(fx.base)
    try:
        code, output = _invoke(argv, as_subprocess)
    finally:
        if after is not None:
            after()
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in output, output
    assert NEEDLES[name] in errors[0], (NEEDLES[name], errors[0])
    changed = snapshot(fx.base)
    assert changed == before, {k: (before.get(k), changed.get(k)) for k in set(before) | set(changed)
                               if before.get(k) != changed.get(k)}


def test_prompts_are_checked_against_the_context_when_the_model_loads(fx):
    """Where the tokenizer cannot be loaded alone (GGUF, the embedded model), the check runs right after the model
    is loaded, before any forward pass."""
    from refdir.core.spec import ModelSpec
    from refdir.errors import RefdirError
    from refdir.workflows.stages import Loaded

    m = Loaded(ModelSpec(model=str(fx.short), dtype="fp32"), prompts=["hello", LONG_PROMPT])
    with pytest.raises(RefdirError, match="1 of 2 prompts do not fit the model's context of 32 tokens"):
        m.lm  # noqa: B018
    assert Loaded(ModelSpec(model=str(fx.short), dtype="fp32"), prompts=["hello"]).lm is not None


def test_an_unexpected_error_prints_its_traceback_and_says_it_is_a_bug():
    import typer

    from refdir.cli.common import one_error_line

    def broken() -> None:
        raise ZeroDivisionError("a bug")

    a = typer.Typer()
    a.command("x")(one_error_line(broken))
    a.command("y")(lambda: None)
    r = CliRunner().invoke(a, ["x"])
    assert r.exit_code == 1 and "Traceback" in r.output and "ZeroDivisionError: a bug" in r.output
    assert "bug in refdir" in r.output.splitlines()[-1]


def test_typer_exits_and_usage_errors_pass_through_the_error_path():
    """A command that ends itself (typer.Exit) is not a bug; typer's usage errors reach the group, which says them
    in one line; a group given no command prints its help."""
    import typer

    from refdir.cli.common import OneLineUsageErrors, one_error_line

    def done(n: int = 0) -> None:
        raise typer.Exit(n)

    a = typer.Typer(cls=OneLineUsageErrors, no_args_is_help=True)
    a.command("x")(one_error_line(done))
    a.command("y")(lambda: None)
    assert CliRunner().invoke(a, ["x", "--n", "3"]).exit_code == 3
    r = CliRunner().invoke(a, ["x", "--n", "three"])
    assert r.exit_code == 2 and r.output.startswith("error: Invalid value for '--n'") and len(r.output.splitlines()) == 1
    assert "Usage:" in CliRunner().invoke(a, []).output


def test_an_unreachable_hub_is_refused_at_once(monkeypatch):
    """Online (no HF_HUB_OFFLINE) but the hub's host name does not resolve: one refusal before any hub request
    (huggingface_hub would retry each five times); behind a proxy the name is not looked up here."""
    import socket

    import transformers

    from refdir.core import preflight

    def no_dns(*_a, **_k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def no_request(*_a, **_k):
        raise AssertionError("the hub was asked")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for v in preflight.PROXY_VARIABLES:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_request)
    from refdir.errors import RefdirError

    with pytest.raises(RefdirError, match=r"the hub \(huggingface.co\) cannot be reached: Name or service"):
        preflight.check_model("refdir-tests/no-such-model", trust_remote_code=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    with pytest.raises(AssertionError, match="the hub was asked"):
        preflight.check_model("refdir-tests/no-such-model", trust_remote_code=False)


def _raise_json():
    json.loads("{")


def _raise_safetensors(tmp):
    from safetensors.torch import load_file

    (tmp / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{junk!!}")
    load_file(str(tmp / "junk.safetensors"))


def _raise_arrow(tmp):
    import pyarrow.parquet as pq

    (tmp / "junk.parquet").write_bytes(b"junk")
    pq.read_table(tmp / "junk.parquet")


def _raise_gguf(tmp):
    (tmp / "junk.gguf").write_bytes(b"junk")
    gguf.GGUFReader(str(tmp / "junk.gguf"))


def _raise_pydantic():
    from refdir.workflows.stages import RunConfig

    RunConfig(judge="oracle")


@pytest.mark.parametrize("raise_it", [
    lambda tmp: _raise_json(), lambda tmp: {}["layer"], lambda tmp: open(tmp), _raise_safetensors, _raise_arrow,
    _raise_gguf, lambda tmp: _raise_pydantic(), lambda tmp: open(tmp / "missing.txt"),
], ids=["JSONDecodeError", "KeyError", "IsADirectoryError", "SafetensorError", "ArrowInvalid", "gguf", "pydantic",
        "FileNotFoundError"])
def test_library_errors_that_reach_the_cli_are_one_line(raise_it, tmp_path):
    """The safety net behind the messages refdir writes itself: an expected library error that was not turned
    into a RefdirError at its source still ends in one readable ``error:`` line and exit status 2."""
    import typer

    from refdir.cli.common import one_error_line

    def cmd() -> None:
        raise_it(tmp_path)

    a = typer.Typer()
    a.command("x")(one_error_line(cmd))
    a.command("y")(lambda: None)
    r = CliRunner().invoke(a, ["x"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output
    assert len(lines[0]) > len("error: ") + 5


# One wrong shape per run file the analyses and optimize read: (file, its content, the reader, what the error says).
WRONG_SHAPES = [
    ("data/sets.json", ["a prompt"], "sets", "not a JSON object"),
    ("data/sets.json", {"harmful": {"train": ["a"], "val": [], "test": []}}, "sets", "'harmless' is missing"),
    ("data/sets.json", {k: {"train": "a", "val": [], "test": []} for k in ("harmful", "harmless")}, "sets",
     "harmful.train is missing or not a list of prompts"),
    ("filter/filtered.json", {"train": [], "val": {}}, "filtered", "'train' is missing or not a JSON object"),
    ("refusal_tokens/tokens.json", {"ids": []}, "refusal_ids", "'ids' is missing or not a non-empty list"),
    ("refusal_tokens/tokens.json", {"ids": ["I"]}, "refusal_ids", "'ids' is missing or not a non-empty list"),
    ("coeff/coeff.json", {"coeff": "2"}, "coeff", "'coeff' is not a number"),
    ("eval/completions.json", {"completions": {"baseline/harmful": [1]}}, "completions", "'completions' is missing"),
    ("search/selection.json", {"chosen": {"position": -1}}, "direction", "no integer position and layer"),
]


@pytest.mark.parametrize("file, body, read, needle", WRONG_SHAPES, ids=[f"{w[0]}-{i}" for i, w in
                                                                       enumerate(WRONG_SHAPES)])
def test_a_run_file_of_the_wrong_shape_is_one_error_naming_it(tmp_path, file, body, read, needle):
    """Each reader of :class:`refdir.core.rundir.RunDir` checks the shape of what it hands out
    (:mod:`refdir.core.run_files`): one RefdirError naming the file, not a TypeError in whoever reads it."""
    from refdir.core.rundir import RunDir
    from refdir.errors import RefdirError

    f = tmp_path / file
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps(body))
    (tmp_path / "candidates").mkdir()
    (tmp_path / "candidates" / "candidates.safetensors").touch()  # what makes search/selection.json the lead's
    with pytest.raises(RefdirError) as e:
        getattr(RunDir(tmp_path), read)()
    assert str(e.value).startswith(f"corrupt run file {f}: ") and needle in str(e.value), str(e.value)
    if read == "refusal_ids":
        f.write_text(json.dumps({"ids": [3, 200]}))
        assert RunDir(tmp_path).refusal_ids() == [3, 200]
        with pytest.raises(RefdirError, match="token id 200 is outside the model's vocabulary of 128 tokens"):
            RunDir(tmp_path).refusal_ids(128)
