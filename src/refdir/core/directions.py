"""Difference-in-means candidates, directions and subspaces, saved as safetensors + JSON.

A candidate is ``mean(harmful) − mean(harmless)`` at one post-instruction position and one
layer (the input of that block; layer L is the output of the last block). Candidates form a
tensor [positions × (L+1) × d_model]. Positions are negative indices into the prompt
(-1 = the last post-instruction token).

A :class:`Subspace` is an orthonormal basis B [k × d_model] (a refusal cone's span); ablating it projects the whole
span out, ``x ← x − Bᵀ(B x)``. Every edit (hooks, weights in memory, streamed, GGUF) takes either a [d] vector or a
[k, d] basis through :func:`ablation_operand`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from refdir.core.io import atomic_file, atomic_write_json, read_json_object
from refdir.errors import RefdirError

FORMAT_VERSION = 1


def check_direction(v: torch.Tensor, what: str = "the direction", allow_zero: bool = False) -> torch.Tensor:
    """``v`` itself if it can serve as a direction: not empty, every value finite and, unless ``allow_zero``,
    not the zero vector; else one clear error. The one check behind every place a direction or steering vector
    enters refdir (construction and load, orthogonalize in memory, streamed and in GGUF, ablation, edits,
    addition, steering), so a NaN, infinite or zero vector never reaches a weight or a forward pass."""
    if not isinstance(v, torch.Tensor):
        v = torch.as_tensor(v)
    if v.numel() == 0:
        raise RefdirError(f"{what} is empty")
    if not bool(torch.isfinite(v).all()):
        raise RefdirError(f"{what} has NaN or infinite values")
    if not allow_zero and not bool((v != 0).any()):
        raise RefdirError(f"{what} is the zero vector, which has no direction")
    return v


def unit_vector(v: torch.Tensor, dtype: torch.dtype = torch.float32, what: str = "the direction") -> torch.Tensor:
    """``v`` flattened, in ``dtype``, scaled to norm 1; a non-finite or zero vector (or a norm that over- or
    underflows in ``dtype``) is an error."""
    check_direction(v, what)
    v = v.detach().to(dtype).flatten()
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise RefdirError(f"{what} has zero or non-finite norm")
    return v / n


def orthonormal_basis(b: torch.Tensor, dtype: torch.dtype = torch.float32,
                      what: str = "the basis") -> torch.Tensor:
    """An orthonormal basis [k, d] of the span of the rows of ``b`` (QR in float64), in ``dtype``; row i lies in
    the span of rows 0..i with a positive component along row i, so a one-row basis is its unit vector. Rows that
    are already orthonormal to float32 precision are kept as given (a saved basis loads back bit for bit). Refused:
    not 2-D, empty, non-finite, more rows than columns, or rank-deficient (numpy's ``matrix_rank`` rule: a singular
    value at most ``max(k, d) · eps · σ_max``, eps of the input's dtype)."""
    b = check_direction(b if isinstance(b, torch.Tensor) else torch.as_tensor(b), what)
    if b.dim() != 2:
        raise RefdirError(f"{what} must be a 2-D tensor [k, d_model], found shape {tuple(b.shape)}")
    k, d = b.shape
    if k > d:
        raise RefdirError(f"{what} has {k} rows but only {d} columns: at most {d} rows can be independent")
    x = b.detach().to(torch.float64)
    if float((x @ x.T - torch.eye(k, dtype=torch.float64)).abs().max()) <= 1e-6:
        return b.detach().to(dtype).clone()
    sv = torch.linalg.svdvals(x)
    eps = torch.finfo(b.dtype if b.dtype.is_floating_point else torch.float64).eps
    if not torch.isfinite(sv).all() or sv[-1] <= max(k, d) * eps * sv[0]:
        raise RefdirError(f"{what} is rank-deficient: its {k} rows span fewer than {k} dimensions")
    q, r = torch.linalg.qr(x.T)  # x.T = q r, q [d, k] orthonormal columns
    return (q * torch.sign(torch.diagonal(r))).T.to(dtype).contiguous()


def ablation_operand(v: torch.Tensor, dtype: torch.dtype = torch.float32, what: str = "the direction") -> torch.Tensor:
    """What an ablation projects out, from a direction [d] or a basis [k, d]: a unit vector [d] when there is one
    dimension (a vector, or a one-row basis: the same unit vector either way, bit for bit), else an orthonormal
    basis [k, d] (:func:`orthonormal_basis`). Every edit calls this, so both shapes mean the same everywhere."""
    if not isinstance(v, torch.Tensor):
        v = torch.as_tensor(v)
    if v.dim() == 1 or (v.dim() == 2 and v.shape[0] == 1):
        return unit_vector(v, dtype, what)
    if v.dim() != 2:
        raise RefdirError(f"{what} must be a vector [d_model] or a basis [k, d_model], found shape {tuple(v.shape)}")
    return orthonormal_basis(v, dtype, what)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """safetensors + JSON sidecar, each written under a temporary name and renamed."""
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    atomic_write_json(path.with_suffix(".json"), meta)


def _load_meta(path: Path) -> dict:
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise RefdirError(f"expected {path} and {meta_path}")
    return read_json_object(meta_path, "metadata file")


def need_ints(meta: dict, keys: tuple[str, ...], where: Path) -> None:
    """Refuse metadata without one of ``keys`` as an integer (one clear error naming the file and the key)."""
    for k in keys:
        if k not in meta:
            raise RefdirError(f"{where}: the metadata has no {k!r}")
        if not isinstance(meta[k], int) or isinstance(meta[k], bool):
            raise RefdirError(f"{where}: {k!r} must be an integer, found {meta[k]!r}")


def _tensors(path: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, which must hold ``names``; an unreadable file or a missing tensor is one
    clear error."""
    try:
        t = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on corrupt files
        raise RefdirError(f"corrupt safetensors file {path}: {e}") from e
    missing = [n for n in names if n not in t]
    if missing:
        raise RefdirError(f"{path} holds no tensor {missing[0]!r} (it holds {sorted(t)})")
    return t


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

    def __post_init__(self) -> None:
        # zero is allowed in memory: a difference of means at layer 0 on template tokens is exactly zero, and
        # such candidates are built, then filtered out; saving, loading or using a zero direction is refused
        check_direction(self.vector, self._what(), allow_zero=True)

    def _what(self) -> str:
        return f"the direction at position {self.position}, layer {self.layer}"

    def unit(self) -> torch.Tensor:
        return unit_vector(self.vector, what=self._what())

    @property
    def d_model(self) -> int:
        return int(self.vector.numel())

    def save(self, path: str | Path) -> Path:
        path = Path(path).with_suffix(".safetensors")
        check_direction(self.vector, self._what())
        meta = {"format": "refdir.direction", "version": FORMAT_VERSION, "layer": self.layer,
                "position": self.position, "model_id": self.model_id, "norm": self.norm,
                "d_model": self.d_model, "meta": self.meta}
        _save_tensors(path, {"direction": self.vector.to(torch.float32)}, meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        path = Path(path).with_suffix(".safetensors")
        meta = _load_meta(path)
        if meta.get("format") == "refdir.subspace":
            raise RefdirError(f"{path} is a subspace (k = {meta.get('k')}), not a single direction")
        if meta.get("format") != "refdir.direction":
            raise RefdirError(f"{path} is not a refdir direction file")
        need_ints(meta, ("layer", "position"), path.with_suffix(".json"))
        v = _tensors(path, ("direction",))["direction"]
        if v.dim() != 1:
            raise RefdirError(f"{path}: the direction must be a 1-D tensor, found shape {tuple(v.shape)}")
        check_direction(v, f"the direction in {path}")
        return cls(v, meta["layer"], meta["position"], meta.get("model_id", ""), meta.get("norm", "raw"),
                   meta.get("meta", {}))


@dataclass
class Subspace:
    """An orthonormal basis [k, d_model] of residual-stream directions (a refusal cone's span), with provenance.

    The basis is orthonormalized on construction (:func:`orthonormal_basis`; a rank-deficient or non-finite one
    is refused). Ablating it removes the whole span: ``x ← x − Bᵀ(B x)``."""

    basis: torch.Tensor
    layer: int
    position: int
    model_id: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.basis = orthonormal_basis(self.basis, torch.float32, self._what())

    def _what(self) -> str:
        return f"the subspace at position {self.position}, layer {self.layer}"

    @property
    def k(self) -> int:
        return int(self.basis.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.basis.shape[1])

    def save(self, path: str | Path) -> Path:
        path = Path(path).with_suffix(".safetensors")
        meta = {"format": "refdir.subspace", "kind": "subspace", "version": FORMAT_VERSION, "k": self.k,
                "layer": self.layer, "position": self.position, "model_id": self.model_id,
                "d_model": self.d_model, "meta": self.meta}
        _save_tensors(path, {"basis": self.basis}, meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Subspace:
        path = Path(path).with_suffix(".safetensors")
        meta = _load_meta(path)
        if meta.get("format") != "refdir.subspace":
            raise RefdirError(f"{path} is not a refdir subspace file")
        need_ints(meta, ("layer", "position", "k"), path.with_suffix(".json"))
        b = _tensors(path, ("basis",))["basis"]
        if b.dim() != 2 or b.shape[0] != meta["k"]:
            raise RefdirError(f"{path}: the basis must be a [k = {meta['k']}, d_model] tensor, found shape "
                              f"{tuple(b.shape)}")
        return cls(b, meta["layer"], meta["position"], meta.get("model_id", ""), meta.get("meta", {}))


def load_edit(path: str | Path) -> Direction | Subspace:
    """A direction or a subspace file, whichever ``path`` holds (its JSON's ``format``); anything else is one
    clear error."""
    path = Path(path).with_suffix(".safetensors")
    fmt = _load_meta(path).get("format")
    if fmt == "refdir.direction":
        return Direction.load(path)
    if fmt == "refdir.subspace":
        return Subspace.load(path)
    raise RefdirError(f"{path} is neither a refdir direction nor a refdir subspace file (format {fmt!r})")


def edit_tensor(e: Direction | Subspace) -> torch.Tensor:
    """What the edits take from a loaded file: a direction's raw vector or a subspace's basis (both are normalized
    by :func:`ablation_operand` where they are used, so a direction edits exactly as it always did)."""
    return e.vector if isinstance(e, Direction) else e.basis


def load_ablation(path: str | Path) -> torch.Tensor:
    """What ablating the file at ``path`` projects out: a unit vector [d] for a direction file, an orthonormal
    basis [k, d] for a subspace file."""
    e = load_edit(path)
    return e.unit() if isinstance(e, Direction) else e.basis.clone()


@dataclass
class Candidates:
    """All difference-in-means candidates of one model and one dataset."""

    vectors: torch.Tensor  # [P, L+1, d] float32, computed from float64 means
    harmful_mean: torch.Tensor  # [P, L+1, d]
    harmless_mean: torch.Tensor  # [P, L+1, d]
    positions: list[int]  # negative indices, e.g. [-5, -4, -3, -2, -1]
    model_id: str = ""
    meta: dict = field(default_factory=dict)
    # optimized directions by name (e.g. "rdo": [d]), one vector for every layer; edits may use them instead of a
    # candidate (refdir.core.edits.Edit.direction). Not part of the candidates file: the run adds them in memory
    optimized: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_means(cls, harmful_mean: torch.Tensor, harmless_mean: torch.Tensor, model_id: str = "",
                   meta: dict | None = None) -> Candidates:
        diff = (harmful_mean.to(torch.float64) - harmless_mean.to(torch.float64)).to(torch.float32)
        P = diff.shape[0]
        return cls(diff, harmful_mean.float(), harmless_mean.float(), list(range(-P, 0)), model_id, meta or {})

    @property
    def n_layers(self) -> int:
        return self.vectors.shape[1] - 1

    def with_optimized(self, name: str, vector: torch.Tensor) -> Candidates:
        """A copy that also holds the optimized direction ``vector`` [d] under ``name``."""
        if vector.shape != self.vectors.shape[-1:]:
            raise RefdirError(f"optimized direction of shape {tuple(vector.shape)}, the candidates have "
                              f"d_model {self.vectors.shape[-1]}")
        return replace(self, optimized={**self.optimized, name: vector.detach().float().cpu()})

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
        if not isinstance(meta.get("positions"), list):
            raise RefdirError(f"{path.with_suffix('.json')}: candidates metadata has no 'positions' list")
        t = _tensors(path, ("candidates", "harmful_mean", "harmless_mean"))
        return cls(t["candidates"], t["harmful_mean"], t["harmless_mean"], meta["positions"],
                   meta.get("model_id", ""), meta.get("meta", {}))


def as_dict(d: Direction) -> dict:
    out = asdict(d)
    out.pop("vector")
    return out
