"""Output locations that cannot take the output: a full disk and a read-only directory give one clear
error and leave nothing behind. The disk-full case is real: a child process runs with a file-size limit
(RLIMIT_FSIZE), so the kernel refuses the write exactly as it does on a full disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refdir.core.io import atomic_dir, atomic_write_bytes
from refdir.errors import RefdirError

CHILD = r"""
import resource, signal, sys, torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # get EFBIG from write() instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # no file may grow past 4 KiB
from refdir.errors import RefdirError
from refdir.core.orthogonalize import stream_orthogonalize
try:
    stream_orthogonalize(sys.argv[1], torch.randn(64), sys.argv[2], progress=False)
except RefdirError as e:
    print("REFDIR-ERROR:", e)
    sys.exit(3)
"""


def test_full_disk_is_one_clear_error_and_no_output(tmp_path):
    from conftest import make_tiny

    src = tmp_path / "src"
    make_tiny("llama", 300).save_pretrained(src)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 3, p.stdout + p.stderr
    assert "disk is full or the file is too large" in p.stdout and "nothing was written" in p.stdout
    assert sorted(x.name for x in tmp_path.iterdir()) == ["src"]  # no temp dir, no partial output


SAFETENSORS_CHILD = r"""
import resource, signal, sys, torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from safetensors.torch import save_file
from refdir.core.io import atomic_dir
from refdir.errors import RefdirError
try:
    with atomic_dir(sys.argv[1]) as tmp:  # the library writes and reports the failure as its own SafetensorError
        save_file({"w": torch.zeros(10_000)}, str(tmp / "model.safetensors"))
except RefdirError as e:
    print("REFDIR-ERROR:", e)
    sys.exit(3)
"""


def test_full_disk_met_by_safetensors_is_the_same_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "-c", SAFETENSORS_CHILD, str(tmp_path / "out")], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 3, p.stdout + p.stderr
    assert "disk is full or the file is too large" in p.stdout and "nothing was written" in p.stdout
    assert list(tmp_path.iterdir()) == []


def _read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    # root ignores permission bits; sysfs is read-only for everyone in containers
    d = Path("/sys/kernel")
    try:
        (d / ".refdir-probe").mkdir()
    except OSError:
        return d
    (d / ".refdir-probe").rmdir()
    pytest.skip("no read-only location available on this machine")


def test_read_only_location_is_one_clear_error(tmp_path):
    ro = _read_only_dir(tmp_path)
    with pytest.raises(RefdirError, match="cannot write .*read-only"):
        with atomic_dir(ro / "out"):
            pass
    with pytest.raises(RefdirError, match="cannot write .*read-only"):
        atomic_write_bytes(ro / "x.json", b"{}")
    assert not (ro / "out").exists() and not (ro / "x.json").exists()


def test_read_only_location_from_the_cli(tmp_path):
    from conftest import make_tiny
    from typer.testing import CliRunner

    from refdir.cli.main import app
    from refdir.core.directions import Direction

    src = tmp_path / "src"
    make_tiny("llama", 300).save_pretrained(src)
    Direction(torch.randn(64), 1, -1).save(tmp_path / "r")
    ro = _read_only_dir(tmp_path)
    r = CliRunner().invoke(app, ["orthogonalize", str(src), str(ro / "out"), "--direction", str(tmp_path / "r")])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "read-only" in r.output
