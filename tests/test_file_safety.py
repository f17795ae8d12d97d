"""File handling that does not trust its inputs: shard names and offsets from a checkpoint, non-finite
directions, --force only over directories refdir wrote, no links followed out of a source, no file
overwritten without --force, fsync before rename. Every CLI case ends in exit code 2 with one ``error:`` line,
and a snapshot of the directory around it shows that nothing was created or changed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import make_tiny, snapshot
from safetensors.torch import save_file
from typer.testing import CliRunner

from refdir.cli.main import app
from refdir.core import io as rio
from refdir.core.directions import Direction, check_direction, unit_vector
from refdir.core.gguf_edit import orthogonalize_gguf
from refdir.core.interventions import ablate, add
from refdir.core.orthogonalize import orthogonalize_, save_orthogonalized, stream_orthogonalize
from refdir.core.rundir import RunDir
from refdir.core.shards import read_exact, read_header
from refdir.errors import RefdirError
from refdir.steering.vectors import SteeringVector, steer

VOCAB = 128
runner = CliRunner()
BAD_VECTORS = {"zero": torch.zeros(64), "nan": torch.full((64,), float("nan")),
               "inf": torch.cat([torch.ones(63), torch.tensor([float("inf")])])}


# ------------------------------------------------------------------ helpers


def one_error(r, *needles: str) -> str:
    """Exit code 2, exactly one ``error:`` line holding every needle, no traceback."""
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def sharded(tmp_path: Path, name: str = "src") -> Path:
    src = tmp_path / name
    make_tiny("llama", VOCAB).save_pretrained(src, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").exists()
    return src


def direction_file(path: Path, v: torch.Tensor) -> Path:
    """A direction file written byte by byte (Direction.save refuses a bad vector, as it should)."""
    save_file({"direction": v.float().contiguous()}, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps({"format": "refdir.direction", "version": 1, "layer": 1,
                                                     "position": -1, "d_model": v.numel()}))
    return path


def tiny_gguf(path: Path, d: int = 64, blocks: int = 2, vocab: int = 16) -> Path:
    """A tiny F32 llama-architecture GGUF: an embedding and each block's attention-output and FFN-down."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, d)).astype(np.float32))
    for i in range(blocks):
        w.add_tensor(f"blk.{i}.attn_output.weight", rng.standard_normal((d, d)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rng.standard_normal((d, 2 * d)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return path


def set_index(src: Path, rename: dict[str, str]) -> None:
    """Point the index's entries for some shards at other names."""
    f = src / "model.safetensors.index.json"
    idx = json.loads(f.read_text())
    idx["weight_map"] = {k: rename.get(v, v) for k, v in idx["weight_map"].items()}
    f.write_text(json.dumps(idx))


# ------------------------------------------------------------------ shard names and offsets
def test_index_naming_a_shard_outside_the_checkpoint_is_refused(tmp_path):
    src = sharded(tmp_path)
    Direction(torch.randn(64), 1, -1).save(tmp_path / "r")
    first = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    (tmp_path / "x").mkdir()
    os.replace(src / first, tmp_path / "x" / "s.safetensors")  # where "../x/s.safetensors" leads, from src or out
    set_index(src, {first: "../x/s.safetensors"})
    before = snapshot(tmp_path)
    r = runner.invoke(app, ["orthogonalize", str(src), str(tmp_path / "out"), "--direction", str(tmp_path / "r")])
    one_error(r, "'../x/s.safetensors'", "plain .safetensors file name")
    assert snapshot(tmp_path) == before


def test_absolute_shard_name_is_refused_and_that_file_is_untouched(tmp_path):
    src = sharded(tmp_path)
    Direction(torch.randn(64), 1, -1).save(tmp_path / "r")
    first = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    victim = tmp_path / "victim.safetensors"
    os.replace(src / first, victim)
    set_index(src, {first: str(victim)})
    before = snapshot(tmp_path)
    r = runner.invoke(app, ["orthogonalize", str(src), str(tmp_path / "out"), "--direction", str(tmp_path / "r")])
    one_error(r, str(victim))
    assert snapshot(tmp_path) == before
    with pytest.raises(RefdirError, match="plain .safetensors file name"):  # the loader checks the index too
        from refdir.core.models import load_model

        load_model(str(src), dtype="fp32")


@pytest.mark.parametrize("bad", ["sub\\s.safetensors", "..", "config.json", 5])
def test_other_bad_shard_names(tmp_path, bad):
    src = sharded(tmp_path)
    first = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    set_index(src, {first: bad})
    with pytest.raises(RefdirError, match="plain .safetensors file name"):
        stream_orthogonalize(src, torch.randn(64), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_truncated_shard_is_a_clear_error_not_a_hang(tmp_path):
    src = tmp_path / "src"
    make_tiny("llama", VOCAB).save_pretrained(src)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    Direction(torch.randn(64), 1, -1).save(tmp_path / "r")
    before = snapshot(tmp_path)
    # in a child with a deadline: before the fix this looped forever
    p = subprocess.run([sys.executable, "-m", "refdir", "orthogonalize", str(src), str(tmp_path / "out"),
                        "--direction", str(tmp_path / "r")], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": "src"})
    assert p.returncode == 2, p.stdout + p.stderr
    errs = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errs) == 1 and "truncated" in errs[0] and "Traceback" not in p.stderr, p.stderr
    assert snapshot(tmp_path) == before


def test_headers_are_checked_against_the_file(tmp_path):
    f = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(2, 3)}, str(f))
    header, base = read_header(f)
    assert set(header) >= {"a", "b"} and base > 8
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")

    def with_header(h: dict) -> Path:
        hb = json.dumps(h).encode()
        hb += b" " * (-len(hb) % 8)
        g = tmp_path / "g.safetensors"
        g.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
        return g

    h = json.loads(raw[8:8 + n])
    bad_size = {**h, "a": {**h["a"], "shape": [5]}}
    with pytest.raises(RefdirError, match="needs 20 bytes"):
        read_header(with_header(bad_size))
    a0, a1 = h["a"]["data_offsets"]
    overlap = {**h, "b": {**h["b"], "data_offsets": [a0, a0 + 24]}}
    with pytest.raises(RefdirError, match="overlap|needs"):
        read_header(with_header(overlap))
    past_end = {**h, "a": {**h["a"], "data_offsets": [10 ** 6, 10 ** 6 + 16]}}
    with pytest.raises(RefdirError, match="truncated"):
        read_header(with_header(past_end))
    (tmp_path / "huge.safetensors").write_bytes((2 ** 62).to_bytes(8, "little") + b"{}")
    with pytest.raises(RefdirError, match="truncated"):
        read_header(tmp_path / "huge.safetensors")
    with pytest.raises(RefdirError, match="ended early"):  # a file that shrinks while it is read
        read_exact(io.BytesIO(b"abc"), 10, f, "a")


# ------------------------------------------------------------------ non-finite directions
@pytest.mark.parametrize("kind", sorted(BAD_VECTORS))
def test_bad_direction_refused_in_every_orthogonalize_path(tmp_path, kind):
    v = BAD_VECTORS[kind]
    model = make_tiny("llama", VOCAB)
    before_w = {k: p.clone() for k, p in model.state_dict().items()}
    with pytest.raises(RefdirError, match="NaN or infinite|zero vector"):
        orthogonalize_(model, v)
    with pytest.raises(RefdirError, match="NaN or infinite|zero vector"):
        save_orthogonalized(model, None, v, tmp_path / "mem")
    assert all(torch.equal(p, before_w[k]) for k, p in model.state_dict().items())
    src = sharded(tmp_path)
    with pytest.raises(RefdirError, match="NaN or infinite|zero vector"):
        stream_orthogonalize(src, v, tmp_path / "streamed", progress=False)
    g = tiny_gguf(tmp_path / "m.gguf")
    with pytest.raises(RefdirError, match="NaN or infinite|zero vector"):
        orthogonalize_gguf(g, v, tmp_path / "out.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "src"]
    # and from the CLI, on a direction file holding that vector: dir (streamed), in memory, GGUF
    direction_file(tmp_path / "bad", v)
    before = snapshot(tmp_path)
    for args in ([str(src), str(tmp_path / "o1")], [str(src), str(tmp_path / "o2"), "--in-memory"],
                 [str(g), str(tmp_path / "o3.gguf")]):
        r = runner.invoke(app, ["orthogonalize", *args, "--direction", str(tmp_path / "bad")])
        one_error(r, str(tmp_path / "bad"))
    assert snapshot(tmp_path) == before


def test_tiny_gguf_is_edited_with_a_good_direction(tmp_path):
    """The GGUF fixture above is a real input: a finite direction edits it, and r is gone from the writers."""
    g = tiny_gguf(tmp_path / "m.gguf")
    r = torch.randn(64, dtype=torch.float64)
    s = orthogonalize_gguf(g, r, tmp_path / "out.gguf", progress=False)
    assert len(s["edited"]) == 5
    t = {x.name: np.asarray(x.data) for x in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors}
    rn = (r / r.norm()).numpy()
    assert np.isfinite(t["blk.1.ffn_down.weight"]).all()
    assert np.abs(rn @ t["blk.1.ffn_down.weight"]).max() < 1e-5


@pytest.mark.parametrize("kind", sorted(BAD_VECTORS))
def test_bad_direction_refused_by_directions_ablation_addition_and_steering(tmp_path, kind):
    v = BAD_VECTORS[kind]
    with pytest.raises(RefdirError):
        unit_vector(v)
    if kind != "zero":
        with pytest.raises(RefdirError, match="NaN or infinite"):
            Direction(v, 1, -1)
        with pytest.raises(RefdirError, match="NaN or infinite"):
            SteeringVector({1: v})
    else:  # a zero candidate exists in memory (layer 0 at template tokens), but is never saved, loaded or used
        with pytest.raises(RefdirError, match="zero vector"):
            Direction(v, 1, -1).save(tmp_path / "d")
        with pytest.raises(RefdirError, match="zero vector"):
            Direction(v, 1, -1).unit()
        assert not list(tmp_path.iterdir())
    with pytest.raises(RefdirError):
        Direction.load(direction_file(tmp_path / "f", v))
    model = make_tiny("llama", VOCAB)
    with pytest.raises(RefdirError):
        with ablate(model, v):
            pass
    if kind != "zero":
        with pytest.raises(RefdirError, match="NaN or infinite"):
            with add(model, v, 1):
                pass
    sv = SteeringVector({1: torch.ones(64)})
    with pytest.raises(RefdirError, match="finite"):
        with steer(model, sv, coeff=float("nan")):
            pass
    assert check_direction(torch.ones(3)) is not None


# ------------------------------------------------------------------ --force
def test_force_refuses_a_directory_refdir_did_not_write(tmp_path):
    src = sharded(tmp_path)
    Direction(torch.randn(64), 1, -1).save(tmp_path / "r")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    r = runner.invoke(app, ["orthogonalize", str(src), str(mine), "--direction", str(tmp_path / "r"), "--force"])
    one_error(r, f"{mine} was not written by refdir; refusing to replace it")
    assert snapshot(tmp_path) == before
    (tmp_path / "afile").write_text("x")
    r = runner.invoke(app, ["orthogonalize", str(src), str(tmp_path / "afile"), "--direction", str(tmp_path / "r"),
                            "--force"])
    one_error(r, str(tmp_path / "afile"))  # a file is never replaced by a directory
    assert (tmp_path / "afile").read_text() == "x"
    with pytest.raises(RefdirError, match="is a file, not a directory written by refdir"):
        rio.check_replaceable(tmp_path / "afile")


def test_force_replaces_a_directory_refdir_wrote_and_an_empty_one(tmp_path):
    src = sharded(tmp_path)
    Direction(torch.randn(64), 1, -1).save(tmp_path / "r")
    out = tmp_path / "out"
    args = ["orthogonalize", str(src), str(out), "--direction", str(tmp_path / "r")]
    assert runner.invoke(app, args).exit_code == 0
    assert rio.written_by_refdir(out) and (out / rio.MARKER).exists()
    one_error(runner.invoke(app, args), "already exists")
    (out / "model.safetensors.index.json").unlink()  # a file refdir wrote, gone: nothing of the user's
    r = runner.invoke(app, [*args, "--force"])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors.index.json").exists() and rio.written_by_refdir(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["orthogonalize", str(src), str(empty), "--direction", str(tmp_path / "r"), "--force"])
    assert r.exit_code == 0, r.output
    assert (empty / "config.json").exists()


def test_force_refuses_a_refdir_directory_holding_a_users_file(tmp_path):
    """--force replaces only what refdir wrote: a file the user put into a refdir directory (at its top or in a
    subdirectory) is named and kept, and the directory is replaced once the file is moved out."""
    src = sharded(tmp_path)
    Direction(torch.randn(64), 1, -1).save(tmp_path / "r")
    out = tmp_path / "out"
    args = ["orthogonalize", str(src), str(out), "--direction", str(tmp_path / "r")]
    assert runner.invoke(app, args).exit_code == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for mine in (out / "notes.txt", out / "sub" / "mine.txt"):
        mine.parent.mkdir(exist_ok=True)
        mine.write_text("the user's")
        one_error(runner.invoke(app, [*args, "--force"]), f"holds files refdir did not write ({mine.relative_to(out)})")
        assert mine.read_text() == "the user's"
        mine.unlink()
    (out / "sub").rmdir()
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    (out / "link").symlink_to(src)  # refdir writes no links: one in its directory is the user's
    one_error(runner.invoke(app, [*args, "--force"]), "holds files refdir did not write (link)")
    (out / "link").unlink()
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


def test_run_directory_lists_what_refdir_wrote(tmp_path):
    """Files added in place to a directory refdir grows (a run's config, a stage, a nested file) are listed in
    its marker, so --force may replace it; a user's file there is refused."""
    d = tmp_path / "run"
    with RunDir.create(d, {"model": {"model": "x"}}):
        pass
    rio.atomic_write_json(d / "optimize" / "state.json", {"a": 1})  # an unmarked subdirectory's file
    with rio.atomic_dir(d / "stage") as tmp:
        rio.atomic_write_json(tmp / "inner" / "x.json", {})
    assert rio.foreign_files(d) == []
    assert json.loads((d / rio.MARKER).read_text())["files"] == ["config.json", "optimize/state.json"]
    assert json.loads((d / "stage" / rio.MARKER).read_text())["files"] == ["inner/x.json"]
    (d / "stage" / "inner" / "y.txt").write_text("mine")
    assert rio.foreign_files(d) == ["stage/inner/y.txt"]
    with pytest.raises(RefdirError, match=r"holds files refdir did not write \(stage/inner/y.txt\)"):
        RunDir.create(d, {"model": {"model": "other"}}, force=True)
    assert (d / "stage" / "inner" / "y.txt").exists()
    (d / "stage" / "inner" / "y.txt").unlink()
    RunDir.create(d, {"model": {"model": "other"}}, force=True).close()
    assert not (d / "stage").exists()


def test_force_never_replaces_home_a_link_or_the_working_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("keep")
    rio.write_marker(home)  # even a home directory that somehow carries refdir's marker
    monkeypatch.setenv("HOME", str(home))
    src = sharded(tmp_path)
    Direction(torch.randn(64), 1, -1).save(tmp_path / "r")
    before = snapshot(tmp_path)
    r = runner.invoke(app, ["orthogonalize", str(src), str(home), "--direction", str(tmp_path / "r"), "--force"])
    one_error(r, "home directory")
    (tmp_path / "link").symlink_to(home)
    before = snapshot(tmp_path)
    r = runner.invoke(app, ["orthogonalize", str(src), str(tmp_path / "link"), "--direction", str(tmp_path / "r"),
                            "--force"])
    one_error(r, "symbolic link")
    assert snapshot(tmp_path) == before
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    rio.write_marker(work)
    monkeypatch.chdir(work / "sub")
    with pytest.raises(RefdirError, match="current directory"):
        rio.check_replaceable(work)


def test_run_directory_force_refuses_a_foreign_directory(tmp_path):

    d = tmp_path / "notes"
    d.mkdir()
    (d / "a.txt").write_text("mine")
    with pytest.raises(RefdirError, match="was not written by refdir"):
        RunDir.create(d, {"model": {"model": "x"}}, force=True)
    assert (d / "a.txt").read_text() == "mine"


def test_legacy_stage_directories_still_count_as_refdir_written(tmp_path):
    """A stage directory from before the marker (it has stage.json) can still be replaced by a resumed run."""
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "stage.json").write_text(json.dumps({"key": "k", "stage": "data"}))
    with rio.atomic_dir(stage, force=True) as tmp:
        (tmp / "new.json").write_text("{}")
    assert sorted(p.name for p in stage.iterdir()) == [rio.MARKER, "new.json"]


# ------------------------------------------------------------------ links out of the source
def test_links_out_of_the_source_are_refused(tmp_path):
    src = sharded(tmp_path)
    Direction(torch.randn(64), 1, -1).save(tmp_path / "r")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    (src / "tokenizer.json").symlink_to(secret)
    before = snapshot(tmp_path)
    r = runner.invoke(app, ["orthogonalize", str(src), str(tmp_path / "out"), "--direction", str(tmp_path / "r")])
    one_error(r, "outside", "refusing to follow it")
    assert snapshot(tmp_path) == before
    # a shard that links out of the source is refused too
    (src / "tokenizer.json").unlink()
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    first = idx["weight_map"]["lm_head.weight"]
    os.replace(src / first, tmp_path / first)
    (src / first).symlink_to(tmp_path / first)
    with pytest.raises(RefdirError, match="outside"):
        stream_orthogonalize(src, torch.randn(64), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_links_inside_the_source_and_a_hub_cache_snapshot_are_followed(tmp_path):
    # the Hugging Face cache layout: snapshots/REV/* link to ../../blobs/*
    repo = tmp_path / "models--tiny"
    plain = sharded(tmp_path, "plain")
    (plain / "notes.txt").write_text("side file")
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    for f in plain.iterdir():
        os.replace(f, repo / "blobs" / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    (snap / "notes2.txt").symlink_to("notes.txt")  # a link within the snapshot
    s = stream_orthogonalize(snap, torch.randn(64), tmp_path / "out", progress=False)
    assert s["edited"]
    assert (tmp_path / "out" / "notes.txt").read_text() == "side file"
    assert (tmp_path / "out" / "notes2.txt").read_text() == "side file"
    assert not (tmp_path / "out" / "notes.txt").is_symlink()


# ------------------------------------------------------------------ files are not overwritten without --force
def test_convert_vector_refuses_an_existing_file_without_force(tmp_path):
    sv = SteeringVector({2: torch.randn(64), 3: torch.randn(64)})
    sv.save(tmp_path / "v")
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF pretend model weights")
    before = snapshot(tmp_path)
    r = runner.invoke(app, ["convert-vector", str(tmp_path / "v.safetensors"), str(model)])
    one_error(r, f"{model} already exists; pass --force")
    r = runner.invoke(app, ["convert-vector", str(tmp_path / "v.safetensors"), str(tmp_path / "v.safetensors")])
    one_error(r, "already exists")
    assert snapshot(tmp_path) == before
    r = runner.invoke(app, ["convert-vector", str(tmp_path / "v.safetensors"), str(model), "--force"])
    assert r.exit_code == 0, r.output
    assert SteeringVector.load(model).layers == [2, 3]
    with pytest.raises(RefdirError, match="already exists"):
        sv.to_gguf(model)


def test_gguf_orthogonalize_refuses_an_existing_output_file(tmp_path):
    g = tiny_gguf(tmp_path / "m.gguf")
    (tmp_path / "out.gguf").write_bytes(b"precious")
    with pytest.raises(RefdirError, match="already exists; pass --force"):
        orthogonalize_gguf(g, torch.randn(64), tmp_path / "out.gguf", progress=False)
    assert (tmp_path / "out.gguf").read_bytes() == b"precious"
    orthogonalize_gguf(g, torch.randn(64), tmp_path / "out.gguf", force=True, progress=False)
    assert gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors


# ------------------------------------------------------------------ fsync before rename
def test_files_and_directories_are_fsynced_before_they_are_renamed(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    rio.atomic_write_bytes(tmp_path / "a.bin", b"data")
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"]  # the file, the rename, the directory holding it
    assert events[0][1] == events[1][1] and events[2][1] == str(tmp_path)
    events.clear()
    with rio.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x.txt").write_text("x")
    i = [e[0] for e in events].index("replace")
    synced = {e[1] for e in events[:i] if e[0] == "fsync"}
    assert any(s.endswith("x.txt") for s in synced) and any(s.endswith(rio.MARKER) for s in synced)
    assert events[-1] == ("fsync", str(tmp_path))


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077], ids=["022", "027", "077"])
def test_outputs_get_the_mode_the_umask_gives_not_tempfiles_private_one(tmp_path, mask):
    """Files and directories refdir commits have the mode a plain open/mkdir gives under the umask, whatever the
    writer: tempfile creates 0600 / 0700, and safetensors 0.8's save_file always 0600 (it renames a temp file of its
    own over the path it is given), which would leave a checkpoint unreadable to another account."""
    from refdir.core.model_files import assemble_parts

    fmode, dmode = 0o666 & ~mask, 0o777 & ~mask
    old = os.umask(mask)
    try:
        with rio.atomic_file(tmp_path / "a.safetensors") as t:
            save_file({"x": torch.zeros(2)}, str(t))
        rio.atomic_write_json(tmp_path / "b.json", {})
        with rio.atomic_dir(tmp_path / "d") as t:
            (t / "sub").mkdir()
            save_file({"x": torch.zeros(2)}, str(t / "sub" / "m.safetensors"))
            (t / "c.txt").write_text("c")
        part = tmp_path / "part"
        part.write_bytes(b"xyz")
        import hashlib

        assemble_parts([part], tmp_path / "e.gguf", hashlib.sha256(b"xyz").hexdigest())
    finally:
        os.umask(old)
    got = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p != part}
    want = {"a.safetensors": fmode, "b.json": fmode, "d": dmode, "d/sub": dmode, "d/sub/m.safetensors": fmode,
            "d/c.txt": fmode, f"d/{rio.MARKER}": fmode, "e.gguf": fmode}
    assert got == want
