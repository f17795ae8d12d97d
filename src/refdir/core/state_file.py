"""A state refdir saves and reads back itself (a cache, a resumable training state) as one safetensors file: the
tensors as its tensors, everything else as JSON in its metadata, next to the key of the inputs it was computed
from.

Reading it unpickles nothing (refdir unpickles only where a command-line flag asks for it, and a file it reads
back by itself is no exception), and the key and the tensors are one file written atomically, so they can never
come from two different writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from refdir.core.io import atomic_file
from refdir.errors import RefdirError

FORMAT = "refdir.state"


def save_state(path: str | Path, key: str, state: dict) -> None:
    """Write ``state`` (a flat dict: tensors, and values JSON can hold) under ``key`` to ``path``, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    meta = {"format": FORMAT, "key": key, "values": json.dumps(values)}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_state(path: str | Path, key: str, what: str, use: Callable[[dict], object] | None = None) -> dict | None:
    """The state :func:`save_state` wrote to ``path`` under ``key``, handed to ``use`` (which checks and takes it,
    e.g. a trainer's ``load_state_dict``) before it is returned; None when there is no such file or it holds the
    state of other inputs (whoever asked computes it anew and overwrites it). A file that cannot be read as one
    (truncated, damaged, not refdir's), or whose state ``use`` refuses with a RefdirError or ValueError, is one
    RefdirError naming ``what`` (e.g. "optimize checkpoint"): refdir never leaves one half-written, so it is
    reported, not silently replaced."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            if meta.get("key") != key:
                return None
            values = json.loads(meta.get("values", "null"))
            if not isinstance(values, dict):
                raise ValueError("its values are not a JSON object")
            state = values | {k: f.get_tensor(k) for k in f.keys()}
        if use is not None:
            use(state)
    except (SafetensorError, ValueError, RefdirError) as e:
        raise RefdirError(f"corrupt {what} {p}: {e}; delete it to compute it again") from e
    return state
