"""Steering vectors: one shared format for CAA, jailbreak, bias and refusal vectors.

A :class:`SteeringVector` holds one float32 vector per layer plus its provenance (model id and
hash, read position, norm convention, method, dataset hash). Layers use refdir's convention
everywhere: layer ``l`` is the residual stream at the **input of block l** (0 = the embedding
output, L = the output of the last block), the same index as :mod:`refdir.directions`.

Files: safetensors (``layer.{l}`` tensors) + a JSON sidecar, and llama.cpp control vectors.

llama.cpp control vectors (GGUF, architecture ``controlvector``): 1-D F32 tensors named
``direction.{k}`` of length n_embd, plus ``controlvector.model_hint`` and
``controlvector.layer_count``. llama.cpp's loader rejects k = 0 and adds ``direction.k`` to the
*output* of block k (0-based) right after its last residual add (``build_cvec(cur, il)`` then
``l_out``), at every position; k runs over 1..n_layer-1. The output of block k is the input of
block k+1, so **refdir layer l ↔ ``direction.{l-1}``**, and only refdir layers 2..L can be
exported (llama.cpp cannot steer the embedding output or the output of block 0). refdir's own
metadata rides along in a ``refdir.steering_vector`` string key, which llama.cpp ignores.

:func:`steer` applies a vector while a context is open, at the positions chosen: ``prompt``,
``generated`` or ``all``. A token's position is its index in the full sequence: the number of
tokens already in the KV cache plus its offset in the current forward call. The prompt length
is taken from the first uncached forward call (or given explicitly), so steering a cached
``generate`` equals steering the recomputed full sequence without a cache (tested).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import gguf
import torch
from safetensors.torch import load_file, save_file

from refdir.core.activations import decoder_body
from refdir.core.architecture import Architecture, cache_in, inspect_model
from refdir.core.directions import Direction, check_direction
from refdir.core.gguf_read import GGUFFile
from refdir.core.hooks import PerDevice, map_input, map_output, registered
from refdir.core.io import atomic_file, atomic_write_json, check_file_target, read_json_object
from refdir.errors import RefdirError

FORMAT = "refdir.steering_vector"
VERSION = 1
NORMS = ("raw", "unit", "mean-norm")
POSITIONS = ("prompt", "generated", "all")
GGUF_META_KEY = "refdir.steering_vector"


def dataset_hash(items: Iterable) -> str:
    """sha256 of a dataset's rows (each JSON-encoded with sorted keys), order-sensitive."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(it, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def model_hash(model: torch.nn.Module) -> str:
    """A cheap fingerprint of a model: its config and the first 64 values of every parameter."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(p.detach().flatten()[:64].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class SteeringVector:
    """Per-layer vectors (layer = input of that block) with provenance."""

    vectors: dict[int, torch.Tensor]
    model_id: str = ""
    model_hash: str = ""
    read_position: int | str = -1  # where activations were read (negative index, or a name)
    norm: str = "raw"  # raw | unit | mean-norm
    method: str = ""
    dataset_hash: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.vectors:
            raise RefdirError("a steering vector needs at least one layer")
        if self.norm not in NORMS:
            raise RefdirError(f"unknown norm convention {self.norm!r}; use one of {NORMS}")
        vs = {int(k): v.detach().to("cpu", torch.float32).flatten().clone() for k, v in self.vectors.items()}
        sizes = {v.numel() for v in vs.values()}
        if len(sizes) != 1:
            raise RefdirError(f"layers of one steering vector must have one size, got {sorted(sizes)}")
        if min(vs) < 0:
            raise RefdirError(f"negative layer index {min(vs)}")
        for layer, v in vs.items():  # a zero layer adds nothing; NaN or inf would poison every activation
            check_direction(v, f"layer {layer} of the steering vector", allow_zero=True)
        self.vectors = dict(sorted(vs.items()))

    # ------------------------------------------------------------------ basics
    @property
    def layers(self) -> list[int]:
        return list(self.vectors)

    @property
    def d_model(self) -> int:
        return next(iter(self.vectors.values())).numel()

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.vectors:
            raise RefdirError(f"this steering vector has no layer {layer} (layers: {self.layers})")
        return self.vectors[layer]

    def only(self, layers: Iterable[int]) -> SteeringVector:
        return replace(self, vectors={int(layer): self[int(layer)] for layer in layers})

    def norms(self) -> dict[int, float]:
        return {layer: float(v.norm()) for layer, v in self.vectors.items()}

    def unit(self) -> SteeringVector:
        out = {}
        for layer, v in self.vectors.items():
            n = v.norm()
            if not torch.isfinite(n) or n == 0:
                raise RefdirError(f"layer {layer} has a zero or non-finite vector; it has no unit direction")
            out[layer] = v / n
        return replace(self, vectors=out, norm="unit")

    # ------------------------------------------------------------------ arithmetic
    def _combine(self, other: SteeringVector, sign: float) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.d_model != self.d_model:
            raise RefdirError(f"cannot combine vectors of sizes {self.d_model} and {other.d_model}")
        layers = sorted(set(self.vectors) | set(other.vectors))
        z = torch.zeros(self.d_model)
        out = {layer: self.vectors.get(layer, z) + sign * other.vectors.get(layer, z) for layer in layers}
        op = "+" if sign > 0 else "-"
        return replace(self, vectors=out, method=f"({self.method}) {op} ({other.method})",
                       norm="raw",
                       dataset_hash=self.dataset_hash if self.dataset_hash == other.dataset_hash else "",
                       meta={**self.meta, "combined_with": other.meta})

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, -1.0)

    def __mul__(self, c: float) -> SteeringVector:
        if not isinstance(c, (int, float)):
            return NotImplemented
        return replace(self, vectors={k: v * float(c) for k, v in self.vectors.items()},
                       norm="raw" if c != 1 else self.norm)

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> SteeringVector:
        if c == 0:
            raise RefdirError("cannot divide a steering vector by zero")
        return self * (1.0 / c)

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def cosine(self, other: SteeringVector | torch.Tensor, layer: int) -> float:
        b = other[layer] if isinstance(other, SteeringVector) else other.flatten().float()
        return float(torch.nn.functional.cosine_similarity(self[layer], b, dim=0))

    # ------------------------------------------------------------------ checks
    def check_fits(self, model: torch.nn.Module, arch: Architecture | None = None) -> Architecture:
        """Raise one clear RefdirError when the vector's size or layers do not fit ``model``."""
        arch = arch or inspect_model(model)
        if self.d_model != arch.d_model:
            raise RefdirError(f"steering vector has hidden size {self.d_model} but the model has {arch.d_model}")
        bad = [layer for layer in self.layers if layer > arch.n_layers]
        if bad:
            raise RefdirError(f"steering vector has layers {bad} but the model has {arch.n_layers} blocks "
                              f"(layers 0..{arch.n_layers})")
        return arch

    # ------------------------------------------------------------------ files
    def _meta(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "layers": self.layers, "d_model": self.d_model,
                "model_id": self.model_id, "model_hash": self.model_hash, "read_position": self.read_position,
                "norm": self.norm, "method": self.method, "dataset_hash": self.dataset_hash,
                "layer_convention": "input of block l (0 = embeddings, L = output of the last block)",
                "meta": self.meta}

    @classmethod
    def _from_meta(cls, vectors: dict[int, torch.Tensor], m: dict) -> SteeringVector:
        return cls(vectors, m.get("model_id", ""), m.get("model_hash", ""), m.get("read_position", -1),
                   m.get("norm", "raw"), m.get("method", ""), m.get("dataset_hash", ""), m.get("meta", {}))

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write ``PATH.safetensors`` and ``PATH.json`` (each atomically); existing files are refused unless
        ``force``."""
        path = Path(path).with_suffix(".safetensors")
        check_file_target(path, force)
        check_file_target(path.with_suffix(".json"), force)
        with atomic_file(path, overwrite=force) as tmp:
            save_file({f"layer.{k}": v.contiguous() for k, v in self.vectors.items()}, str(tmp),
                      metadata={"format": FORMAT})
        atomic_write_json(path.with_suffix(".json"), self._meta())
        return path

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        """Load a steering vector: refdir safetensors + JSON, a llama.cpp ``.gguf`` control vector, or
        a refdir direction file (becomes a one-layer vector at the direction's layer)."""
        path = Path(path)
        if path.suffix == ".gguf":
            return cls.from_gguf(path)
        path = path.with_suffix(".safetensors")
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            raise RefdirError(f"expected a steering vector at {path} and {meta_path}")
        m = read_json_object(meta_path, "metadata file")
        if m.get("format") == "refdir.direction":
            return cls.from_direction(Direction.load(path))
        if m.get("format") != FORMAT:
            raise RefdirError(f"{path} is not a refdir steering vector (format {m.get('format')!r})")
        try:
            t = load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise RefdirError(f"corrupt steering vector file {path}: {e}") from e
        bad = [k for k in t if not re.fullmatch(r"layer\.\d+", k)]
        if bad:
            raise RefdirError(f"{path}: unexpected tensor {bad[0]!r} (a steering vector holds only layer.N tensors)")
        return cls._from_meta({int(k.split(".", 1)[1]): v for k, v in t.items()}, m)

    @classmethod
    def from_direction(cls, d) -> SteeringVector:
        """A refdir :class:`~refdir.core.directions.Direction` as a one-layer steering vector."""
        return cls({d.layer: d.vector}, d.model_id, "", d.position, d.norm, "difference-in-means (refusal)",
                   "", dict(d.meta))

    # ------------------------------------------------------------------ llama.cpp
    def to_gguf(self, path: str | Path, model_hint: str | None = None, force: bool = False) -> Path:
        """Write a llama.cpp control vector (``direction.{l-1}`` for refdir layer l; F32; atomic); an existing
        file (a model's .gguf, say) is refused unless ``force``."""
        bad = [layer for layer in self.layers if layer < 2]
        if bad:
            raise RefdirError(f"llama.cpp control vectors cannot steer refdir layers {bad}: llama.cpp adds "
                              "direction.k to the output of block k for k >= 1 (refdir layer k+1), so only "
                              "layers >= 2 can be exported")
        path = Path(path)
        check_file_target(path, force)
        with atomic_file(path, overwrite=force) as tmp:
            w = gguf.GGUFWriter(str(tmp), arch="controlvector")
            w.add_string("controlvector.model_hint", model_hint or self.model_id or "unknown")
            w.add_uint32("controlvector.layer_count", len(self.layers))
            w.add_string(GGUF_META_KEY, json.dumps(self._meta()))
            for layer, v in self.vectors.items():
                w.add_tensor(f"direction.{layer - 1}", v.numpy().astype("float32"))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        return path

    @classmethod
    def from_gguf(cls, path: str | Path) -> SteeringVector:
        """Read a llama.cpp control vector (any writer's); refdir metadata is restored when present."""
        path = Path(path)
        if not path.exists():
            raise RefdirError(f"no such control vector file: {path}")
        try:
            r = GGUFFile(path)
        except Exception as e:  # noqa: BLE001
            raise RefdirError(f"{path} is not a readable GGUF file: {e}") from e
        arch = _gguf_str(r, "general.architecture")
        if arch != "controlvector":
            raise RefdirError(f"{path} is a GGUF of architecture {arch!r}, not a llama.cpp control vector")
        vectors: dict[int, torch.Tensor] = {}
        for t in r.tensors:
            name = t.name
            if not name.startswith("direction.") or not name.split(".", 1)[1].isdigit():
                raise RefdirError(f"{path}: tensor {name!r} is not named direction.N")
            k = int(name.split(".", 1)[1])
            if k == 0:
                raise RefdirError(f"{path}: direction.0 is invalid in llama.cpp control vectors")
            if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
                raise RefdirError(f"{path}: {name} must be a 1-D F32 tensor")
            v = torch.from_numpy(t.data.copy()).float()
            vectors[k + 1] = vectors[k + 1] + v if k + 1 in vectors else v  # llama.cpp sums duplicates
        if not vectors:
            raise RefdirError(f"{path} holds no direction tensors")
        raw = _gguf_str(r, GGUF_META_KEY)
        if raw:
            try:
                m = json.loads(raw)
            except json.JSONDecodeError as e:
                raise RefdirError(f"{path}: corrupt {GGUF_META_KEY} metadata: {e}") from e
            if not isinstance(m, dict):
                raise RefdirError(f"{path}: corrupt {GGUF_META_KEY} metadata: not a JSON object")
            return cls._from_meta(vectors, m)
        return cls(vectors, _gguf_str(r, "controlvector.model_hint") or "", method="llama.cpp control vector")


def _gguf_str(reader, key: str) -> str | None:
    f = reader.fields.get(key)
    if f is None:
        return None
    return bytes(f.parts[f.data[0]]).decode()


def rescale_mean_norm(vectors: list[SteeringVector]) -> list[SteeringVector]:
    """CAA's normalization: at each layer, give every vector the mean norm of the set's vectors there."""
    layers = set(vectors[0].layers)
    for sv in vectors[1:]:
        layers &= set(sv.layers)
    out = []
    for sv in vectors:
        new = {}
        for layer in sorted(layers):
            target = sum(float(s[layer].norm()) for s in vectors) / len(vectors)
            n = float(sv[layer].norm())
            new[layer] = sv[layer] * (target / n if n > 0 else 0.0)
        out.append(replace(sv, vectors=new, norm="mean-norm"))
    return out


# ---------------------------------------------------------------------------- applying
class _Positions:
    """Tracks where the current forward call sits in the full sequence (see the module doc)."""

    def __init__(self, prompt_len: int | None):
        self.fixed = prompt_len
        self.prompt_len = prompt_len
        self.prompt_ids: torch.Tensor | None = None
        self.offset = 0

    def body_hook(self, _mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        emb = kwargs.get("inputs_embeds")
        x = ids if ids is not None else emb
        if x is None:
            return None
        seq = x.shape[1]
        pkv = cache_in(kwargs)
        self.offset = int(pkv.get_seq_length()) if pkv is not None and hasattr(pkv, "get_seq_length") else 0
        if self.fixed is None and self.offset == 0:
            p = self.prompt_ids
            continuing = (ids is not None and p is not None and ids.shape[0] == p.shape[0]
                          and seq >= p.shape[1] and torch.equal(ids[:, : p.shape[1]], p))
            if not continuing:  # a new prompt: its length defines the prompt positions
                self.prompt_len = seq
                self.prompt_ids = ids.detach().clone() if ids is not None else None
        return None

    def mask(self, x: torch.Tensor, mode: str) -> torch.Tensor | None:
        """[1, S, 1] mask of the positions to steer in ``x`` (None = all of them)."""
        if mode == "all":
            return None
        pos = self.offset + torch.arange(x.shape[1], device=x.device)
        gen = pos >= (self.prompt_len or 0)
        m = gen if mode == "generated" else ~gen
        return m.view(1, -1, 1).to(x.dtype)


@contextmanager
def steer(model: torch.nn.Module, sv: SteeringVector, coeff: float = 1.0, positions: str = "all",
          layers: Iterable[int] | None = None, prompt_len: int | None = None,
          arch: Architecture | None = None) -> Iterator[None]:
    """Add ``coeff · sv[l]`` to the residual stream at layer l (input of block l; L = output of
    the last block) for every chosen layer, at the chosen positions, while the context is open.
    Works with ``model.generate`` (every decoding step, with or without a KV cache)."""
    if positions not in POSITIONS:
        raise RefdirError(f"unknown position mode {positions!r}; use one of {POSITIONS}")
    if not math.isfinite(float(coeff)):
        raise RefdirError(f"the steering coefficient must be finite, got {coeff}")
    arch = sv.check_fits(model, arch)
    chosen = sv.layers if layers is None else [int(x) for x in layers]
    missing = [x for x in chosen if x not in sv.vectors]
    if missing:
        raise RefdirError(f"steering vector has no layers {missing} (it has {sv.layers})")
    state = _Positions(prompt_len)

    def adder(vec: PerDevice):
        def fn(x):
            v = vec.on(x)
            m = state.mask(x, positions)
            return x + v if m is None else x + m * v

        return fn

    with registered([decoder_body(model, arch).register_forward_pre_hook(state.body_hook, with_kwargs=True)]) as hs:
        for layer in chosen:
            vec = PerDevice(sv[layer] * float(coeff))
            if layer < arch.n_layers:
                h = arch.blocks[layer].block.register_forward_pre_hook(map_input(adder(vec)), with_kwargs=True)
            else:
                h = arch.blocks[-1].block.register_forward_hook(map_output(adder(vec)))
            hs.append(h)
        yield


apply = steer
