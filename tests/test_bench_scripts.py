"""The bench scripts are commands the README tells people to run: ``--help`` must print their usage and do nothing
else (one of them once took ``--help`` for a run and began writing a 17 GiB scratch checkpoint)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "benchlib.py")


def test_there_are_bench_scripts():
    assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_writes_nothing(script, tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    first_doc_line = (BENCH / script).read_text().split('"""')[1].splitlines()[0].strip()
    assert "usage" in r.stdout.lower() or first_doc_line in r.stdout, r.stdout[:500]
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran (runs/, scratch directories)
