"""Content hashes of the files a run reads (its data files, its model's weights, config and tokenizer), for the
stage keys of :mod:`refdir.core.rundir`: a file edited between two runs changes the key of the stage that read
it, whatever its name and path.

A file's sha256 is cached under its resolved path with its size, mtime, ctime and inode (in
``cache_dir()/file_hashes.json``, shared by every run): a file whose stat is unchanged is not read again; a
touched or replaced one is hashed again in full (and, if its bytes did not change, gives the same hash).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from refdir import __version__
from refdir.core.cache import sha256_file
from refdir.core.io import atomic_write_json
from refdir.core.model_files import EMBEDDED_ALIASES, cache_dir
from refdir.core.spec import DataSpec
from refdir.errors import RefdirError

CACHE_NAME = "file_hashes.json"
# the DataSpec fields that name the prompt sources the stages build from (files, hub ids or embedded sets); the
# held-out sets are fingerprinted for the eval alone (workflows.stages.RunConfig.heldout_settings)
DATA_SOURCES = ("harmful", "harmless", "harmful_val", "harmless_val", "harmful_test", "harmless_test")
# the files of a model directory that decide what is loaded: weights, configs, tokenizer, chat template
MODEL_SUFFIXES = {".safetensors", ".gguf", ".json", ".jinja", ".model", ".txt", ".tiktoken"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth"}  # weights only where a directory has no safetensors


def _stat(p: str) -> list[int]:
    st = os.stat(p)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_cache(f: Path) -> dict:
    try:
        c = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    return c if isinstance(c, dict) else {}


def files_sha256(paths: list[str | Path]) -> dict[str, str]:
    """The sha256 of each file in ``paths`` (keyed by the path as given), from the cache where the file's stat
    is the one cached, else read in full."""
    cache_file = cache_dir() / CACHE_NAME
    cache = _read_cache(cache_file)
    out, changed = {}, False
    for p in paths:
        real = str(Path(p).resolve())
        before = _stat(real)
        hit = cache.get(real)
        if isinstance(hit, dict) and hit.get("stat") == before:
            out[str(p)] = hit["sha256"]
            continue
        h = sha256_file(real)
        out[str(p)] = h
        if _stat(real) == before:  # not cached when the file changed while it was read
            cache[real] = {"stat": before, "sha256": h}
            changed = True
    if changed:
        try:
            atomic_write_json(cache_file, {k: v for k, v in cache.items() if os.path.exists(k)})
        except (OSError, RefdirError):
            pass  # an unwritable cache costs time on the next run, nothing else
    return out


def model_files(model: str) -> list[Path]:
    """The local files a model is loaded from: a ``.gguf`` (or other) file itself; in a directory its weights,
    configs, tokenizer and template files (pickled weights only where it has no safetensors). None for the
    embedded model (its bytes are fixed by its sha256) and for hub ids."""
    if model in EMBEDDED_ALIASES:
        return []
    p = Path(model)
    if p.is_file():
        return [p]
    if not p.is_dir():
        return []
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    keep = [f for f in files if f.suffix in MODEL_SUFFIXES]
    if not any(f.suffix == ".safetensors" for f in keep):
        keep += [f for f in files if f.suffix in PICKLE_SUFFIXES]
    return sorted(keep)


def model_sha256(model: str) -> dict[str, str]:
    """``{file name: sha256}`` of :func:`model_files` ({} for the embedded model and hub ids)."""
    files = model_files(model)
    return {Path(k).name: v for k, v in files_sha256(files).items()}


def data_sha256(data: DataSpec, fields: tuple[str, ...] = DATA_SOURCES) -> dict[str, str]:
    """``{source: sha256}`` of the data spec's sources (``fields``: by default the train, val and test sources)
    that are local files ({} when every source is an embedded set or a hub id)."""
    sources = [s for s in (getattr(data, k) for k in fields)
               if s and not s.startswith("embedded:") and Path(s).is_file()]
    return files_sha256(sorted(set(sources)))


def versions() -> dict:
    """Versions of refdir and the libraries whose behaviour decides the numbers (for manifests)."""
    import transformers

    return {"refdir": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
