"""Weight orthogonalization: edit every matrix that writes to the residual stream so that it
cannot write along r̂. For a pre-norm decoder this equals :func:`refdir.core.interventions.ablate`.

W_out ← W_out − r̂ r̂ᵀ W_out (output axis), b ← b − r̂ r̂ᵀ b, and for the embedding
E ← E − E r̂ r̂ᵀ. A tied ``lm_head`` is untied first so the unembedding is unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from refdir.core.architecture import Architecture, inspect_model
from refdir.core.directions import unit_vector
from refdir.core.io import atomic_dir, atomic_write_json
from refdir.core.models import save_hf_checkpoint
from refdir.errors import RefdirError


def _project_axis(t: torch.Tensor, r: torch.Tensor, axis: int) -> torch.Tensor:
    """Remove the r̂ component along ``axis`` of ``t`` (computed in float64 for accuracy)."""
    x = t.detach().to(torch.float64).movedim(axis, -1)
    x = x - (x @ r).unsqueeze(-1) * r
    return x.movedim(-1, axis).to(t.dtype)


def untie_lm_head(model: nn.Module, arch: Architecture) -> bool:
    if not arch.tied:
        return False
    head = arch.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone())
    cfg = model.config
    cfg.tie_word_embeddings = False
    text_cfg = getattr(cfg, "get_text_config", lambda: None)()
    if text_cfg is not None and text_cfg is not cfg:
        text_cfg.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        try:
            model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
        except Exception:  # noqa: BLE001
            pass
    arch.tied = False
    return True


@torch.no_grad()
def orthogonalize_(model: nn.Module, direction: torch.Tensor, arch: Architecture | None = None) -> dict:
    """Edit ``model`` in place. Returns a summary of what was edited."""
    arch = arch or inspect_model(model)
    if direction.numel() != arch.d_model:
        raise RefdirError(f"direction has size {direction.numel()}, the model's d_model is {arch.d_model}")
    if not arch.weight_edit_exact:
        warnings.warn(
            "this architecture normalises attention/MLP outputs after they are computed (post-norms); "
            "weight orthogonalization is then an approximation of ablation, not an exact equivalent",
            stacklevel=2,
        )
    r = unit_vector(direction, torch.float64)
    untied = untie_lm_head(model, arch)
    edited = []
    for name, emb in arch.embeddings:
        r_dev = r.to(emb.weight.device)
        emb.weight.data.copy_(_project_axis(emb.weight.data, r_dev, 1))
        edited.append(f"{name}.weight")
    for bp in arch.blocks:
        for w in bp.writers:
            p = getattr(w.module, w.param)
            r_dev = r.to(p.device)
            axis = 0 if p.dim() == 1 else w.out_axis
            p.data.copy_(_project_axis(p.data, r_dev, axis))
            edited.append(w.name)
    return {"edited": edited, "untied_lm_head": untied, "exact": arch.weight_edit_exact}


def save_orthogonalized(model: nn.Module, tokenizer, direction: torch.Tensor, out_dir: str | Path,
                        *, force: bool = False, meta: dict | None = None) -> Path:
    """Orthogonalize ``model`` in place and save it as a standard HF checkpoint (atomic)."""
    summary = orthogonalize_(model, direction)
    with atomic_dir(out_dir, force=force) as tmp:
        save_hf_checkpoint(model, tokenizer, tmp)
        atomic_write_json(tmp / "refdir_edit.json", {"kind": "orthogonalize", **summary, **(meta or {})})
    return Path(out_dir)


# ------------------------------------------------------------------------------------------------
# streaming: a sharded safetensors checkpoint, one tensor at a time, without building the model
# ------------------------------------------------------------------------------------------------

_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")


def _writer_table(config) -> tuple[dict[str, int], list[str], bool, int]:
    """Parameter names that write to the residual stream (→ output axis), embedding names, tied
    flag and d_model, read from a model skeleton on the meta device (no weights allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    arch = inspect_model(skeleton, trace=False)
    table: dict[str, int] = {}
    for bp in arch.blocks:
        for w in bp.writers:
            p = getattr(w.module, w.param)
            table[w.name] = 0 if p.dim() == 1 else w.out_axis
    emb = [f"{n}.weight" for n, _ in arch.embeddings]
    return table, emb, arch.tied, arch.d_model


def _match_writer(name: str, table: dict[str, int], shape: tuple[int, ...] | None, d: int) -> int | None:
    """The output axis if the checkpoint tensor ``name`` writes to the stream, else None.

    Handles checkpoints that store mixture-of-experts weights per expert
    (``experts.3.down_proj.weight``, 2-D) while the model fuses them (``experts.down_proj``, 3-D)."""
    if name in table:
        return table[name] if shape is None or len(shape) > 1 else 0
    fused = _EXPERT_INDEX.sub(".experts.", name)
    for cand in (fused, fused.removesuffix(".weight"), fused.removesuffix(".bias") + "_bias"):
        if cand in table:
            if shape is None:
                return 0
            if len(shape) == 1:
                return 0
            axes = [a for a, n in enumerate(shape) if n == d]
            if len(axes) != 1:
                raise RefdirError(f"cannot tell the output axis of {name} with shape {shape}")
            return axes[0]
    return None


def _project_axis_chunked(t: torch.Tensor, r: torch.Tensor, axis: int, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """:func:`_project_axis` in slices along another axis, so the float64 temporaries stay small."""
    if t.dim() == 1 or t.numel() <= chunk_elems:
        return _project_axis(t, r, axis)
    other = 1 if axis == 0 else 0
    step = max(1, chunk_elems // max(1, t.numel() // t.shape[other]))
    parts = [_project_axis(t.narrow(other, s, min(step, t.shape[other] - s)), r, axis)
             for s in range(0, t.shape[other], step)]
    return torch.cat(parts, dim=other)


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}

_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RefdirError(f"corrupt safetensors header in {path}: {e}") from e
    return header, 8 + n


def _rewrite_shard(src_file: Path, dst_file: Path, transform, wants) -> list[str]:
    """Copy one safetensors file tensor by tensor, passing each tensor for which ``wants(name)``
    is true through ``transform(name, t)``; the others are copied byte for byte.

    ``transform`` returns the tensor unchanged, an edited tensor of the same dtype and shape, or
    an iterator of row blocks (slices along dim 0) of one. Tensors are read with plain file reads
    (no memory map, whose touched pages would stay resident) and written right after the header,
    so memory holds about one tensor at a time; the safetensors library's writer would need the
    whole shard in memory, hence this small writer for the documented format."""
    header, base = _read_header(src_file)
    meta = header.pop("__metadata__", None)
    names = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    out_header: dict = {}
    off = 0
    for n in names:
        h = header[n]
        size = h["data_offsets"][1] - h["data_offsets"][0]
        out_header[n] = {"dtype": h["dtype"], "shape": h["shape"], "data_offsets": [off, off + size]}
        off += size
    if meta:
        out_header["__metadata__"] = meta
    hbytes = json.dumps(out_header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    changed = []
    with open(src_file, "rb") as r, open(dst_file, "wb") as w:
        w.write(len(hbytes).to_bytes(8, "little"))
        w.write(hbytes)
        for n in names:
            h = header[n]
            start, end = h["data_offsets"]
            r.seek(base + start)
            if h["dtype"] not in _ST_TORCH or not wants(n):
                left = end - start  # unchanged: copy the bytes in 64 MiB pieces
                while left:
                    piece = r.read(min(left, 1 << 26))
                    w.write(piece)
                    left -= len(piece)
                continue
            buf = bytearray(end - start)
            r.readinto(buf)
            t = torch.frombuffer(buf, dtype=_ST_TORCH[h["dtype"]]).reshape(h["shape"])
            new = transform(n, t)
            changed.append(n)
            blocks = [new] if isinstance(new, torch.Tensor) else new
            written = 0
            for b in blocks:
                if b.dtype != t.dtype:
                    raise RefdirError(f"internal: edit changed the dtype of {n}")
                b = b.contiguous()
                w.write((b.view(torch.int16) if b.dtype == torch.bfloat16 else b).numpy().tobytes())
                written += b.numel()
            if written != t.numel():
                raise RefdirError(f"internal: edit changed the size of {n}")
            del t, new, buf
    return changed


def _rows_projected(t: torch.Tensor, r: torch.Tensor, rows: int = 8192):
    """Project r out of the last axis of a 2-D tensor, yielding row blocks (bounded memory)."""
    for s in range(0, t.shape[0], rows):
        yield _project_axis(t[s : s + rows], r, 1)


def stream_orthogonalize(src: str | Path, direction: torch.Tensor, out: str | Path, *, force: bool = False,
                         progress: bool = True) -> dict:
    """Orthogonalize a safetensors checkpoint shard by shard, one tensor at a time.

    Peak memory is about one shard plus one tensor: the model is never built (only a skeleton
    on the meta device, to find which parameters write to the residual stream). Writers and the
    embedding are edited; every other tensor is copied unchanged; a tied ``lm_head`` is written
    out explicitly from the unedited embedding. Config (untied), index and tokenizer files are
    written beside the shards. The output directory appears whole or not at all.
    """
    from transformers import AutoConfig  # only this path needs it: the model itself is never built

    src = Path(src)
    if not (src / "config.json").exists():
        raise RefdirError(f"{src} is not a model directory (no config.json)")
    index_path = src / "model.safetensors.index.json"
    if index_path.exists():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    else:
        found = sorted(p.name for p in src.glob("*.safetensors"))
        if len(found) != 1:
            raise RefdirError(
                f"{src} has {len(found)} safetensors files and no model.safetensors.index.json; "
                "a sharded checkpoint needs its index"
            )
        shards = found
        weight_map = {}
    for s in shards:
        if not (src / s).exists():
            raise RefdirError(f"the index names shard {s}, which is missing from {src}")
    config = AutoConfig.from_pretrained(src)
    table, emb_names, tied, d = _writer_table(config)
    if direction.numel() != d:
        raise RefdirError(f"direction has size {direction.numel()}, the checkpoint's hidden size is {d}")
    r = unit_vector(direction, torch.float64)
    edited: list[str] = []
    new_map: dict[str, str] = {}
    head_from_embedding = None
    with atomic_dir(out, force=force) as tmp:
        for shard in tqdm(shards, desc="orthogonalize shards", disable=not progress):

            def wants(name: str, shard: str = shard) -> bool:
                new_map[name] = shard
                return name in emb_names or _match_writer(name, table, None, d) is not None

            def transform(name: str, t: torch.Tensor) -> torch.Tensor:
                nonlocal head_from_embedding
                if name in emb_names:
                    if tied and name == emb_names[0] and head_from_embedding is None:
                        head_from_embedding = name
                        save_file({"lm_head.weight": t.contiguous()}, str(tmp / "model-lm_head.safetensors"),
                                  metadata={"format": "pt"})
                    return _rows_projected(t, r) if t.dim() == 2 else _project_axis_chunked(t, r, t.dim() - 1)
                return _project_axis_chunked(t, r, _match_writer(name, table, tuple(t.shape), d))

            edited += _rewrite_shard(src / shard, tmp / shard, transform, wants)
        if head_from_embedding is not None and "lm_head.weight" not in new_map:
            new_map["lm_head.weight"] = "model-lm_head.safetensors"
            shards = [*shards, "model-lm_head.safetensors"]
        n_blocks_edited = len({n.split(".experts.")[0] for n in edited})
        if not edited or n_blocks_edited < 2:
            raise RefdirError(f"found no residual-writing tensors in {src}: its tensor names do not match the "
                              "model class built from its config")
        total = sum((tmp / s).stat().st_size for s in shards)
        if len(shards) > 1 or index_path.exists():
            atomic_write_json(tmp / "model.safetensors.index.json",
                              {"metadata": {"total_size": total}, "weight_map": new_map})
        cfg = json.loads((src / "config.json").read_text())
        if tied:
            cfg["tie_word_embeddings"] = False
            if isinstance(cfg.get("text_config"), dict):
                cfg["text_config"]["tie_word_embeddings"] = False
        cfg.pop("quantization_config", None)
        atomic_write_json(tmp / "config.json", cfg)
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", index_path.name):
                shutil.copy2(f, tmp / f.name)
        summary = {"kind": "orthogonalize", "mode": "streaming", "source": str(src), "edited": edited,
                   "untied_lm_head": bool(head_from_embedding), "shards": shards}
        atomic_write_json(tmp / "refdir_edit.json", summary)
    return summary
