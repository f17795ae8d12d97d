"""The files of a local safetensors checkpoint, read without trusting them.

A checkpoint directory (or one someone sent you) decides which file names an index lists, what a safetensors
header says about offsets, and where its links point. Before refdir reads or writes anything from it:

- every shard an index names is a plain ``.safetensors`` file name in the directory (no ``/``, ``\\``, ``..``
  or absolute name, which would read or write outside it);
- every tensor's offsets lie inside the file, do not overlap, and match its dtype and shape, so a truncated
  file is one clear error before any tensor is read;
- a link is followed only when it resolves inside the checkpoint (or, for a Hugging Face cache snapshot,
  inside that repository's cache, where every file is a link into ``blobs``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from refdir.core.io import MARKER, inside
from refdir.errors import RefdirError

SHARD_INDEX = "model.safetensors.index.json"

# bytes per element of the safetensors dtypes; a dtype not listed here (a packed type) is checked for bounds only
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def source_root(src: Path) -> Path:
    """The directory that links in checkpoint ``src`` may point into: ``src`` itself, or for a snapshot in the
    Hugging Face cache (``.../snapshots/REV``, whose files link to ``../../blobs``) that repository's cache."""
    src = Path(src)
    if src.parent.name == "snapshots" and (src.parent.parent / "blobs").is_dir():
        return src.parent.parent
    return src


def check_shard_name(name: object, index: Path) -> str:
    """A shard named by an index must be a plain ``.safetensors`` file name in the checkpoint's directory: a path
    (``/``, ``\\``), ``..`` or an absolute name would read, or write, a file outside it."""
    if (not isinstance(name, str) or not name.endswith(".safetensors") or "/" in name or "\\" in name
            or ".." in name or "\0" in name or os.path.isabs(name)):
        raise RefdirError(f"{index} names the shard {name!r}; a shard must be a plain .safetensors file name in "
                          "the checkpoint's directory")
    return name


def check_in_source(f: Path, src: Path, what: str = "file", root: Path | None = None) -> None:
    """Refuse ``f`` (a file of checkpoint ``src``) when it, through its links, lies outside the checkpoint."""
    if not inside(f, root or source_root(src)):
        raise RefdirError(f"{what} {f} links to {os.readlink(f) if f.is_symlink() else f.resolve()}, outside "
                          f"{src}; refusing to follow it")


def safetensors_shards(src: Path) -> tuple[dict[str, str], list[str]]:
    """``(weight_map, shard names)`` of the safetensors checkpoint in ``src``: from its index when it has one
    (every name checked by :func:`check_shard_name`), else its ``*.safetensors`` files with an empty map. Every
    shard must exist, be a file, and, through any links, lie inside the checkpoint (:func:`source_root`)."""
    src = Path(src)
    index_path = src / SHARD_INDEX
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as e:
            raise RefdirError(f"unreadable shard index {index_path}: {e}") from e
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(k, str) for k in weight_map):
            raise RefdirError(f"{index_path} has no weight_map from tensor names to shard files")
        shards = sorted({check_shard_name(v, index_path) for v in weight_map.values()})
    else:
        weight_map, shards = {}, sorted(p.name for p in src.glob("*.safetensors"))
    root = source_root(src)
    for s in shards:
        f = src / s
        if not f.exists():
            raise RefdirError(f"the index names shard {s}, which is missing from {src}")
        check_in_source(f, src, "shard", root)
        if not f.is_file():
            raise RefdirError(f"shard {f} is not a file")
    return weight_map, shards


def _check_entries(path: Path, header: dict, data_len: int) -> None:
    """Every tensor entry well formed, inside the ``data_len`` data bytes, sized by its dtype and shape, and no two
    overlapping."""
    spans = []
    for name, h in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = h["dtype"], h["shape"], h["data_offsets"]
            ok = isinstance(dtype, str) and isinstance(shape, list) and start <= end and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in [*shape, start, end])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise RefdirError(f"corrupt safetensors header in {path}: bad entry for tensor {name!r}")
        if end > data_len:
            raise RefdirError(f"{path} is truncated or corrupt: tensor {name} ends at byte {end} of the data, "
                              f"which holds {data_len} bytes")
        size = math.prod(shape) * ST_ITEMSIZE[dtype] if dtype in ST_ITEMSIZE else None
        if size is not None and end - start != size:
            raise RefdirError(f"corrupt safetensors header in {path}: tensor {name} ({dtype}, shape {shape}) "
                              f"needs {size} bytes, its offsets give {end - start}")
        spans.append((start, end, name))
    spans.sort()
    for (_s0, e0, a), (s1, _e1, b) in zip(spans, spans[1:], strict=False):
        if s1 < e0:
            raise RefdirError(f"corrupt safetensors header in {path}: tensors {a} and {b} overlap")


def read_header(path: Path) -> tuple[dict, int]:
    """The header of safetensors file ``path`` and where its data starts, checked against the file's length
    (:func:`_check_entries`): a truncated or corrupt file is one clear error before any tensor is read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise RefdirError(f"{path} is not a safetensors file or is truncated (a header of {n} bytes in a file "
                              f"of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RefdirError(f"corrupt safetensors header in {path}: {e}") from e
    if not isinstance(header, dict):
        raise RefdirError(f"corrupt safetensors header in {path}: not a JSON object")
    _check_entries(path, header, size - 8 - n)
    return header, 8 + n


ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}  # torch dtype -> safetensors dtype name
ST_TORCH = {v: k for k, v in ST_DTYPES.items()}


def read_tensor(f, path: Path, base: int, name: str, h: dict) -> torch.Tensor:
    """Tensor ``name`` (header entry ``h``, data starting at ``base``) read from the open file ``f`` of ``path``
    with a plain read into its own buffer (no memory map, whose touched pages would stay resident); one clear
    error when the file ends first. The dtype must be one of :data:`ST_TORCH`."""
    start, end = h["data_offsets"]
    buf = bytearray(end - start)
    f.seek(base + start)
    if f.readinto(buf) != len(buf):
        raise RefdirError(f"{path} ended early while reading tensor {name}: the file is truncated")
    return torch.frombuffer(buf, dtype=ST_TORCH[h["dtype"]]).reshape(h["shape"]) if buf else \
        torch.empty(h["shape"], dtype=ST_TORCH[h["dtype"]])


def read_exact(f, n: int, path: Path, name: str) -> bytes:
    """``n`` bytes from ``f``, or one clear error when the file ends first (it changed or was cut short)."""
    b = f.read(n)
    if len(b) != n:
        raise RefdirError(f"{path} ended early while reading tensor {name}: the file is truncated")
    return b


def copy_side_files(src: Path, dst: Path, skip: set[str]) -> None:
    """Copy the regular files beside the weights (tokenizer, generation config, chat template ...) from ``src``
    into ``dst``, except the weights, ``skip`` and refdir's marker. A link is copied (its target's content) only
    when it resolves inside the checkpoint; one leading out of it is refused."""
    root = source_root(src)
    for f in sorted(src.iterdir()):
        if f.name in skip or f.name == MARKER or f.suffix == ".safetensors":
            continue
        if f.is_symlink():
            check_in_source(f, src, "file", root)
        if f.is_file():
            shutil.copy2(f, dst / f.name)
