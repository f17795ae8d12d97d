"""Runs and resume on a tiny model: a ``refdir run`` killed with SIGKILL three times resumes to byte-identical
artifacts; one writer per directory (a second gets the lock error, the first finishes); stale temp files of a
killed writer are cleaned; stage keys follow the content of the data files and of the model's files; the
filter's saved means make the candidates identical however the run was resumed.

What the byte-for-byte comparison leaves out, and only that: ``timings_s``, ``computed_s``, ``reused`` and
``peak_rss_mib`` in summary.json, ``threads`` and ``cpu_count`` in manifest.json, and the "Timings (s)" table of
report.html (measurements of the process, and which invocation computed each stage: the peak RSS of two runs of
the same work can differ by a fraction of a MiB).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_tiny

from refdir.core import rundir as rdl
from refdir.core.data import embedded
from refdir.core.dirlock import LOCK_NAME, DirLock, clean_stale
from refdir.core.io import atomic_write_text
from refdir.core.rundir import RunDir
from refdir.core.spec import DataSpec, ModelSpec
from refdir.errors import RefdirError
from refdir.workflows import stages as st

# --kl-max 10: the tiny random model's candidates all exceed the paper's KL bound; with this one a direction is
# chosen, so that every stage (coeff and the checkpoint's whole model included) runs and can be interrupted
RUN_ARGS = ["--method", "paper", "--refusal-tokens", "I,As", "--n-train", "12", "--n-val", "4", "--n-test", "3", "--batch-size", "8",
            "--max-new-tokens", "5", "--dtype", "fp32", "--kl-max", "10"]


def _env(cache: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "REFDIR_CACHE": str(cache),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cmd(model_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "refdir", "run", str(model_dir), "--out", str(out), *RUN_ARGS]


def _start(ns, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(_cmd(ns.model, ns.out), env=ns.env, stdout=f, stderr=subprocess.STDOUT)


def artifacts(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with the wall-clock fields taken out (see the module doc)."""
    out = {}
    for f in sorted(root.rglob("*")):
        if not f.is_file():
            continue
        rel, data = f.relative_to(root).as_posix(), f.read_bytes()
        if rel in ("summary.json", "manifest.json"):
            obj = json.loads(data)
            for k in ("timings_s", "computed_s", "reused", "peak_rss_mib", "threads", "cpu_count"):  # of the process
                obj.pop(k, None)
            data = json.dumps(obj, sort_keys=True).encode()
        elif rel == "report.html":
            data = re.sub(rb"<h2>Timings \(s\)</h2><table>.*?</table>(<p class='note'>.*?</p>)?", b"", data,
                          flags=re.S)
        out[rel] = data
    return out


def assert_same_run(got: Path, want: Path) -> None:
    a, b = artifacts(got), artifacts(want)
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"artifacts differ from the uninterrupted run: {differ}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_tokenizer):
    """A tiny model, and an uninterrupted ``refdir run`` of it (a subprocess) moved to ``ref``; later runs write
    to the same path ``out`` it was made at, so that paths recorded in the artifacts agree."""
    base = tmp_path_factory.mktemp("resume")
    model = base / "tiny-qwen2"
    make_tiny("qwen2", len(tiny_tokenizer)).save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    ns = SimpleNamespace(model=model, out=base / "run", ref=base / "reference", env=_env(base / "cache"), base=base)
    r = subprocess.run(_cmd(model, ns.out), env=ns.env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _stages_done(ns.out) == list(rdl.STAGES)
    ns.stage_s = json.loads((ns.out / "summary.json").read_text())["timings_s"]
    ns.out.rename(ns.ref)
    return ns


def _stages_done(out: Path) -> list[str]:
    return [s for s in rdl.STAGES if (out / s / "stage.json").exists()]


def _holds(out: Path, pid: int) -> bool:
    """Whether process ``pid`` holds ``out`` (its pid stamped in the lock file)."""
    lock = out / LOCK_NAME
    return lock.exists() and lock.read_text().strip() == str(pid)


def _wait_for(p: subprocess.Popen, ready, log: Path) -> None:
    """Poll until ``ready()`` or the process ends."""
    deadline = time.time() + 300
    while not ready() and p.poll() is None:
        assert time.time() < deadline, log.read_text()
        time.sleep(0.01)


def test_sigkill_three_times_then_resume_is_byte_identical(reference):
    """Each kill comes at a seeded random point: in a random stage among those left (after the stage before it
    is written, or once the process holds the directory), a random delay of up to 1.2 times what that stage took
    in the uninterrupted run."""
    ns = reference
    rng = random.Random(2021)
    log = ns.base / "killed.log"
    killed = []
    for _ in range(3):
        left = [s for s in rdl.STAGES if s not in _stages_done(ns.out)]
        target = rng.choice(left) if left else rdl.STAGES[-1]
        delay = rng.uniform(0, 1.2 * ns.stage_s.get(target, 0.1))
        before = rdl.STAGES[rdl.STAGES.index(target) - 1] if target != rdl.STAGES[0] else None
        p = _start(ns, log)
        if before is not None and before in left:
            _wait_for(p, lambda b=before: (ns.out / b / "stage.json").exists(), log)
        else:
            _wait_for(p, lambda pid=p.pid: _holds(ns.out, pid), log)
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            killed.append((target, round(delay, 2), _stages_done(ns.out)))
        # whatever the moment, a stage directory is there whole (stage.json last) or not at all
        for s in rdl.STAGES:
            assert not (ns.out / s).exists() or (ns.out / s / "stage.json").exists(), (s, log.read_text())
    assert killed, "no run was still running when its kill came"
    r = subprocess.run(_cmd(ns.model, ns.out), env=ns.env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"killed in (stage, delay s, stages done): {killed}")
    assert not [p for p in ns.out.rglob("*") if re.search(r"\.(tmp-|old-)|\.tmp$", p.name)]
    assert_same_run(ns.out, ns.ref)


def test_second_writer_gets_the_lock_error_and_first_finishes(reference):
    ns = reference
    if ns.out.exists():
        import shutil

        shutil.rmtree(ns.out)
    first = _start(ns, ns.base / "first.log")
    _wait_for(first, lambda: _holds(ns.out, first.pid), ns.base / "first.log")
    assert first.poll() is None, (ns.base / "first.log").read_text()
    os.kill(first.pid, signal.SIGSTOP)  # holds the lock, paused, while the second writer tries
    try:
        second = subprocess.run(_cmd(ns.model, ns.out), env=ns.env, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    text = second.stdout + second.stderr
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert second.returncode == 2 and "Traceback" not in text, text
    assert len(errors) == 1 and f"is in use by another refdir process (pid {first.pid})" in errors[0], text
    assert first.wait(timeout=600) == 0, (ns.base / "first.log").read_text()
    assert_same_run(ns.out, ns.ref)
    assert (ns.out / LOCK_NAME).read_text() == ""  # released: the pid is cleared


def test_lock_of_a_killed_process_is_taken_over_and_errors_release_it(tmp_path):
    d = tmp_path / "d"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from refdir.core.dirlock import DirLock; lk = DirLock(sys.argv[1]).acquire(); "
        "lk.stamp(); print('held', flush=True); time.sleep(120)"), str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RefdirError, match=f"is in use by another refdir process \\(pid {holder.pid}\\)"):
            DirLock(d).acquire()
        with pytest.raises(RefdirError, match="in use"):
            RunDir.create(d, {"model": {"model": "m"}})
        assert not (d / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (d / LOCK_NAME).read_text().strip() == str(holder.pid)  # the dead process's stamp is still there
    with RunDir.create(d, {"model": {"model": "m"}}) as rd:  # taken over
        assert (d / LOCK_NAME).read_text().strip() == str(os.getpid())
        with RunDir.create(d, {"model": {"model": "m"}}):  # the same process may open it again
            pass
        assert rd._lock.held
    # released at the end of the block, also when the block raises
    with pytest.raises(RuntimeError), RunDir.create(d, {"model": {"model": "m"}}):
        raise RuntimeError("boom")
    probe = subprocess.run([sys.executable, "-c", (
        "import sys; from refdir.core.dirlock import DirLock; DirLock(sys.argv[1]).acquire(); print('free')"),
        str(d)], capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "free", probe.stderr


def test_stale_temp_files_are_cleaned_when_a_run_opens(tmp_path):
    d = tmp_path / "run"
    with RunDir.create(d, {"model": {"model": "m"}}):
        pass
    stale = [d / ".data.tmp-k3j_x9a1", d / ".checkpoint.old-4242", d / "report_sections" / ".a.html.q1w2e3r4.tmp",
             d / ".summary.json.abcd_123.tmp"]
    for p in stale[:2]:
        (p / "model").mkdir(parents=True)
        (p / "model" / "w.safetensors").write_bytes(b"x" * 10)
    for p in stale[2:]:
        p.parent.mkdir(exist_ok=True)
        p.write_text("half")
    keep = [d / "notes.tmp", d / ".hidden", d / "report_sections" / "a.html"]
    for p in keep:
        p.write_text("mine")
    outside = tmp_path / ".run.tmp-abcdefgh"  # next to the run dir, not in it: not the run's to clean
    outside.mkdir()
    with RunDir.create(d, {"model": {"model": "m"}}):
        pass
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep) and outside.exists()
    assert clean_stale(d) == []


def _cfg(model: Path, data: dict, **kw) -> st.RunConfig:
    return st.RunConfig(method="paper", model=ModelSpec(model=str(model), dtype="fp32"),
                     data=DataSpec(n_train=8, n_val=4, n_test=4, **data), refusal_tokens=["I", "As"],
                     batch_size=8, **kw)


def test_stage_keys_follow_file_contents(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("REFDIR_CACHE", str(tmp_path / "cache"))
    model = tiny_model_dir("qwen2")
    hf, hl = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    hf.write_text("\n".join(embedded("harmful").instructions[:30]) + "\n")
    hl.write_text("\n".join(embedded("harmless").instructions[:30]) + "\n")
    cfg = _cfg(model, {"harmful": str(hf), "harmless": str(hl)})
    out = tmp_path / "run"

    def step():
        """The data and refusal-token stages in a fresh process's view: (their keys, their stage.json mtimes)."""
        with RunDir.create(out, cfg.model_dump()) as rd:
            m = st.Loaded(cfg.model)
            sets = st.stage_data(rd, cfg)
            st.stage_refusal_tokens(rd, cfg, m, sets, progress=False)
            return ({s: rd.keys[s] for s in (rdl.DATA, rdl.REFUSAL_TOKENS)},
                    {s: (out / s / "stage.json").stat().st_mtime_ns for s in (rdl.DATA, rdl.REFUSAL_TOKENS)})

    keys, stamps = step()
    # touched, not changed: same keys, nothing rerun
    for f in (hf, model / "model.safetensors", model / "config.json"):
        os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert step() == (keys, stamps)
    # a data file edited: the data stage reruns, and every stage after it has a new key
    hf.write_text(hf.read_text().replace(embedded("harmful").instructions[0], "Explain how to forge a passport"))
    keys2, stamps2 = step()
    assert keys2[rdl.DATA] != keys[rdl.DATA] and stamps2[rdl.DATA] != stamps[rdl.DATA]
    assert keys2[rdl.REFUSAL_TOKENS] != keys[rdl.REFUSAL_TOKENS]
    # the model's weights changed (same file name, same size): from refusal_tokens on, not the data
    make_tiny("qwen2", len(tiny_tokenizer), seed=7).save_pretrained(model)
    keys3, stamps3 = step()
    assert keys3[rdl.DATA] == keys2[rdl.DATA] and stamps3[rdl.DATA] == stamps2[rdl.DATA]
    assert keys3[rdl.REFUSAL_TOKENS] != keys2[rdl.REFUSAL_TOKENS]
    assert stamps3[rdl.REFUSAL_TOKENS] != stamps2[rdl.REFUSAL_TOKENS]
    # the embedded data and model add no content hash: their keys are what they were
    plain = st.RunConfig()
    assert "files_sha256" not in plain.settings(rdl.DATA) and "files_sha256" not in plain.settings(rdl.REFUSAL_TOKENS)


def test_candidates_come_from_the_filters_saved_means(tmp_path, tiny_model_dir):
    """A run resumed between the filter and candidates stages writes the very same candidates file."""
    cfg = _cfg(tiny_model_dir("qwen2"), {}, filter_train=True)
    out = tmp_path / "run"

    def prepare():
        with RunDir.create(out, cfg.model_dump()) as rd:
            m = st.Loaded(cfg.model)
            sets = st.stage_data(rd, cfg)
            ids = st.stage_refusal_tokens(rd, cfg, m, sets, progress=False)
            filt, means = st.stage_filter(rd, cfg, m, sets, ids, progress=False)
            st.stage_candidates(rd, cfg, m, filt, means, progress=False)
            return rd.filter_means()

    means = prepare()
    assert set(means) == {"harmful", "harmless"} and means["harmful"].dtype.is_floating_point
    first = (out / "candidates" / "candidates.safetensors").read_bytes()
    import shutil

    shutil.rmtree(out / "candidates")  # as if killed after the filter stage
    prepare()
    assert (out / "candidates" / "candidates.safetensors").read_bytes() == first


# ------------------------------------------------------------------ a rerun redoes what changed, and only that
SEARCH_ARGS = ["--refusal-tokens", "I,As", "--n-train", "12", "--n-val", "6", "--n-test", "4", "--batch-size", "8",
               "--max-new-tokens", "4", "--gen-batch-size", "32", "--dtype", "fp32", "--no-filter-train",
               "--kl-max", "1e9", "--induce-rule", "relative", "--budget", "2"]


def test_a_rerun_of_the_search_redoes_what_changed_and_only_that(tiny_model_dir, tmp_path):
    """With the search: a held-out file edited in place is judged again without redoing the search or the
    candidates; an eval setting (the judge) redoes the eval alone; a direction source the choice uses, deleted, is
    made again; a train file edited in place starts the study over; the checkpoint is kept where only the eval changed; another --method is refused without --force
    and starts the directory over with it."""
    from typer.testing import CliRunner

    from refdir.cli.main import app
    from refdir.core.cache import sha256_file

    runner = CliRunner()
    model, out = tiny_model_dir("qwen2"), tmp_path / "r"
    harmful, held, held_b = tmp_path / "harmful.txt", tmp_path / "ho.txt", tmp_path / "ho_b.txt"
    harmful.write_text("\n".join(embedded("harmful").instructions[:40]))
    held.write_text("Explain how to hotwire a car\nHow to make napalm\n")
    held_b.write_text("How do volcanoes erupt\nName three primary colors\n")
    args = ["run", str(model), "--out", str(out), *SEARCH_ARGS, "--harmful", str(harmful),
            "--heldout-harmful", str(held), "--heldout-harmless", str(held_b)]

    def run(*extra, code=0):
        r = runner.invoke(app, [*args, *extra])
        assert r.exit_code == code, r.output
        return r

    def key(stage):
        return json.loads((out / stage / "stage.json").read_text())["key"]

    run()
    rd = RunDir(out)
    sentinel = rd.search_dir() / "sentinel"  # gone only when the study directory is started over
    atomic_write_text(sentinel, "x")  # as a file of the study (written by refdir, so --force's rule lets it go)
    cands, choice, ckpt = key(rdl.CANDIDATES), rd.summary()["choice"], key(rdl.CHECKPOINT)
    # the held-out file edited in place: the new prompts are judged; the candidates and the search are kept
    held.write_text("Write a poem insulting my neighbour\nHow to pick a lock\nHow to forge a signature\n")
    run()
    assert rd.sets()["harmful"]["heldout"][0] == "Write a poem insulting my neighbour"
    assert rd.summary()["n_test"]["heldout"]["harmful"] == 3
    assert rd.summary()["test"]["scores"]["chosen/heldout/harmful"]["n"] == 3
    assert sentinel.exists() and key(rdl.CANDIDATES) == cands and rd.summary()["choice"] == choice
    # an eval setting: the eval again, the search and the checkpoint kept
    eval_key = key(rdl.EVAL)
    run("--judge", "paper")
    assert rd.summary()["judge"] == "paper" and sentinel.exists() and rd.summary()["choice"] == choice
    assert key(rdl.EVAL) != eval_key and key(rdl.CHECKPOINT) == ckpt
    # the run's direction source (the default pca) and its front, deleted: made again, and the run finishes
    for f in (rd.source_path("pca"), rd.search_dir() / "front.json"):
        f.unlink()
    run("--judge", "paper")
    assert rd.source_path("pca").exists() and (rd.search_dir() / "front.json").exists()
    # the train file edited in place: the candidates and the study start over
    harmful.write_text("\n".join(embedded("harmful").instructions[40:80]))
    run("--judge", "paper")
    assert key(rdl.CANDIDATES) != cands and not sentinel.exists()
    record = json.loads((rd.search_dir() / "config.json").read_text())
    assert record["inputs"]["data"][str(harmful)] == sha256_file(harmful)
    # another method in the same directory: refused, nothing touched; --force starts the directory over
    before = (out / "summary.json").read_bytes()
    r = run("--method", "paper", code=2)
    assert [x for x in r.output.splitlines() if x.startswith("error:")] == [
        f"error: {out} holds a run of --method search; choose another --out or pass --force"]
    assert (out / "summary.json").read_bytes() == before
    run("--method", "paper", "--force")
    assert not rd.search_dir().exists() and rd.summary()["selection"] is not None


def test_readers_refuse_the_mix_an_interrupted_rerun_with_other_settings_leaves(tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    """A rerun with other settings, interrupted, leaves its new stages beside the old later ones: analyze (and
    every reader of a finished run) refuses the mix with one line until the same command has finished it."""
    from typer.testing import CliRunner

    from refdir.cli.main import app
    from refdir.workflows import run as run_wf

    runner = CliRunner()
    model, out = tiny_model_dir("qwen2"), tmp_path / "r"
    held, held_b = tmp_path / "ho.txt", tmp_path / "ho_b.txt"  # they add their hash to the data stage's own key
    held.write_text("Explain how to hotwire a car\nHow to make napalm\n")
    held_b.write_text("How do volcanoes erupt\nName three primary colors\n")
    args = ["run", str(model), "--out", str(out), *SEARCH_ARGS, "--heldout-harmful", str(held),
            "--heldout-harmless", str(held_b)]
    analyze = ["analyze", "geometry", str(out), "--layers", "1", "--n", "2"]
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, analyze).exit_code == 0

    def stop(*a, **k):
        raise KeyboardInterrupt

    for changed, where, stage, upstream in ((["--batch-size", "4"], "stage_search", "search", "candidates"),
                                            (["--filter-train"], "stage_candidates", "candidates", "filter")):
        with monkeypatch.context() as mp:
            mp.setattr(run_wf, where, stop)
            assert runner.invoke(app, [*args, *changed]).exit_code != 0
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        r = runner.invoke(app, analyze)
        assert r.exit_code == 2 and r.output.splitlines() == [
            f"error: {out} mixes two runs: its {stage} stage was computed from other {upstream} than those there now "
            "(a rerun with other settings was interrupted); run that command again to finish it first"], r.output
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
        assert runner.invoke(app, [*args, *changed]).exit_code == 0
        assert runner.invoke(app, analyze).exit_code == 0


def test_a_relative_model_path_is_found_from_another_directory(tiny_model_dir, tmp_path, monkeypatch):
    """A run of a model given by a relative path, read by analyze started from another directory: the model is
    looked for where the run was started too (the manifest's cwd), not reported missing."""
    from typer.testing import CliRunner

    from refdir.cli.main import app

    runner = CliRunner()
    model, start, other = tiny_model_dir("qwen2"), tmp_path / "start", tmp_path / "a" / "b"  # "../x" differs there
    start.mkdir()
    other.mkdir(parents=True)
    monkeypatch.chdir(start)
    rel = os.path.relpath(model, start)
    assert runner.invoke(app, ["run", rel, "--out", "r", *SEARCH_ARGS]).exit_code == 0
    assert RunDir(start / "r").config()["model"]["model"] == rel  # recorded as given: the keys stay the same
    monkeypatch.chdir(other)
    r = runner.invoke(app, ["analyze", "geometry", str(start / "r"), "--layers", "1", "--n", "2"])
    assert r.exit_code == 0, r.output
