"""Difference-in-means candidates and directions, saved as safetensors + JSON.

A candidate is ``mean(harmful) − mean(harmless)`` at one post-instruction position and one
layer (the input of that block; layer L is the output of the last block). Candidates form a
tensor [positions × (L+1) × d_model]. Positions are negative indices into the prompt
(-1 = the last post-instruction token).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from refdir.core.io import atomic_file, atomic_write_json
from refdir.errors import RefdirError

FORMAT_VERSION = 1


def unit_vector(v: torch.Tensor, dtype: torch.dtype = torch.float32, what: str = "the direction") -> torch.Tensor:
    """``v`` flattened, in ``dtype``, scaled to norm 1; a zero or non-finite norm is an error."""
    v = v.detach().to(dtype).flatten()
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise RefdirError(f"{what} has zero or non-finite norm")
    return v / n


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """safetensors + JSON sidecar, each written under a temporary name and renamed."""
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    atomic_write_json(path.with_suffix(".json"), meta)


def _load_meta(path: Path) -> dict:
    meta_path = path.with_suffix(".json")
    if not path.exists() or not meta_path.exists():
        raise RefdirError(f"expected {path} and {meta_path}")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise RefdirError(f"corrupt metadata file {meta_path}: {e}") from e


@dataclass
class Direction:
    """One residual-stream direction with its provenance.

    ``vector`` is stored raw (the difference of means, norm convention ``"raw"``); use
    :meth:`unit` for r̂.
    """

    vector: torch.Tensor
    layer: int
    position: int
    model_id: str = ""
    norm: str = "raw"
    meta: dict = field(default_factory=dict)

    def unit(self) -> torch.Tensor:
        return unit_vector(self.vector)

    @property
    def d_model(self) -> int:
        return int(self.vector.numel())

    def save(self, path: str | Path) -> Path:
        path = Path(path).with_suffix(".safetensors")
        meta = {"format": "refdir.direction", "version": FORMAT_VERSION, "layer": self.layer,
                "position": self.position, "model_id": self.model_id, "norm": self.norm,
                "d_model": self.d_model, "meta": self.meta}
        _save_tensors(path, {"direction": self.vector.to(torch.float32)}, meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        path = Path(path).with_suffix(".safetensors")
        meta = _load_meta(path)
        if meta.get("format") != "refdir.direction":
            raise RefdirError(f"{path} is not a refdir direction file")
        try:
            v = load_file(str(path))["direction"]
        except Exception as e:  # noqa: BLE001
            raise RefdirError(f"corrupt direction file {path}: {e}") from e
        return cls(v, meta["layer"], meta["position"], meta.get("model_id", ""), meta.get("norm", "raw"),
                   meta.get("meta", {}))


@dataclass
class Candidates:
    """All difference-in-means candidates of one model and one dataset."""

    vectors: torch.Tensor  # [P, L+1, d] float32, computed from float64 means
    harmful_mean: torch.Tensor  # [P, L+1, d]
    harmless_mean: torch.Tensor  # [P, L+1, d]
    positions: list[int]  # negative indices, e.g. [-5, -4, -3, -2, -1]
    model_id: str = ""
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_means(cls, harmful_mean: torch.Tensor, harmless_mean: torch.Tensor, model_id: str = "",
                   meta: dict | None = None) -> Candidates:
        diff = (harmful_mean.to(torch.float64) - harmless_mean.to(torch.float64)).to(torch.float32)
        P = diff.shape[0]
        return cls(diff, harmful_mean.float(), harmless_mean.float(), list(range(-P, 0)), model_id, meta or {})

    @property
    def n_layers(self) -> int:
        return self.vectors.shape[1] - 1

    def get(self, position: int, layer: int) -> Direction:
        pi = self.positions.index(position)
        return Direction(self.vectors[pi, layer].clone(), layer, position, self.model_id, "raw",
                         {"source": "difference-in-means", **self.meta})

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "candidates.safetensors"
        meta = {"format": "refdir.candidates", "version": FORMAT_VERSION, "positions": self.positions,
                "n_layers": self.n_layers, "d_model": int(self.vectors.shape[-1]),
                "model_id": self.model_id, "norm": "raw", "meta": self.meta}
        _save_tensors(path, {"candidates": self.vectors, "harmful_mean": self.harmful_mean,
                             "harmless_mean": self.harmless_mean}, meta)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Candidates:
        path = Path(directory)
        if path.is_dir():
            path = path / "candidates.safetensors"
        meta = _load_meta(path)
        if meta.get("format") != "refdir.candidates":
            raise RefdirError(f"{path} is not a refdir candidates file")
        t = load_file(str(path))
        return cls(t["candidates"], t["harmful_mean"], t["harmless_mean"], meta["positions"],
                   meta.get("model_id", ""), meta.get("meta", {}))


def as_dict(d: Direction) -> dict:
    out = asdict(d)
    out.pop("vector")
    return out
