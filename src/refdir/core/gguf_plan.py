"""GGUF in → GGUF out for a parameterised edit (:class:`refdir.core.edits.Plan`): the search's chosen point,
written without leaving the format.

Each residual writer ``blk.N.attn_output`` (component ``attn``) and ``blk.N.ffn_down`` / ``_exps`` / ``_shexp``
(component ``mlp``), with its bias, is dequantized, edited exactly as :func:`refdir.core.edits.apply_weights_`
edits the loaded model (its write vectors lose ``s`` of their part along the component's direction; the
``norm`` variant rescales them back, biases are projected only), and written back in its own quantization type
where the gguf library can quantize it (else Q8_0 or F16, listed in the summary). With the embedding edited,
``token_embd`` loses its r part and a file without ``output.weight`` gets the unedited embedding as its
unembedding, as in :func:`refdir.core.gguf_edit.orthogonalize_gguf`. Every other tensor's bytes and all metadata
are copied unchanged. Post-norm blocks are edited against the direction itself (approximate, like
``apply_weights_``; the summary says so).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants
from tqdm.auto import tqdm

from refdir.core.edits import Plan
from refdir.core.gguf_edit import _WRITER, _copy_fields, _requantize
from refdir.core.io import atomic_file, check_file_target, write_error
from refdir.errors import RefdirError

_COMPONENT = {"attn_output": "attn", "ffn_down": "mlp", "ffn_down_exps": "mlp", "ffn_down_shexp": "mlp"}


ROWS = 8192  # vectors edited (and rows quantized) at a time: float64 work on a 151k-row embedding stays small


def edit_rows(x: np.ndarray, r: np.ndarray, s: float, keep_norm: bool, axis: int) -> np.ndarray:
    """``x`` with its vectors along ``axis`` losing ``s`` of their r̂ part (float64 maths in blocks of ``ROWS``
    vectors, float32 out); with ``keep_norm`` each vector is rescaled to its original norm (the ``norm`` variant).
    A float32 ``x`` whose vectors are its rows is edited in place (the dequantized embedding: no second copy)."""
    xm = np.moveaxis(x, axis, -1)
    flat = xm.reshape(-1, xm.shape[-1])
    inplace = x.dtype == np.float32 and axis in (-1, x.ndim - 1) and x.flags.c_contiguous and x.flags.writeable
    out = flat if inplace else np.empty(flat.shape, dtype=np.float32)
    for i in range(0, flat.shape[0], ROWS):
        v = flat[i:i + ROWS].astype(np.float64)
        y = v - s * (v @ r)[:, None] * r
        if keep_norm:
            n0 = np.linalg.norm(v, axis=-1, keepdims=True)
            n1 = np.linalg.norm(y, axis=-1, keepdims=True)
            y = np.where(n1 > 0, y * (n0 / np.maximum(n1, 1e-300)), y)
        out[i:i + ROWS] = y
    return np.moveaxis(out.reshape(xm.shape), -1, axis)


def requantize(x: np.ndarray, qtype):
    """:func:`refdir.core.gguf_edit._requantize`, a block of rows at a time for a 2-D tensor (quantization works
    per row, so the bytes are the same; the temporaries stay small)."""
    if x.ndim != 2 or x.shape[0] <= ROWS:
        return _requantize(x, qtype)
    parts = [_requantize(np.ascontiguousarray(x[i:i + ROWS]), qtype) for i in range(0, x.shape[0], ROWS)]
    return np.concatenate([p[0] for p in parts], axis=0), parts[0][1]


def _target(name: str, plan: Plan, n_layers: int) -> tuple[np.ndarray, float, bool] | None:
    """(direction, strength, keep_norm) for tensor ``name`` under ``plan``; None when it is not edited."""
    m = _WRITER.match(name)
    if not m:
        return None
    blk = int(name.split(".")[1])
    if blk >= n_layers:
        raise RefdirError(f"{name}: block {blk} is beyond the edit's {n_layers} layers")
    c = _COMPONENT[m.group(1)]
    s = float(plan.strengths[c][blk])
    if s <= 0:
        return None
    r = plan.directions[c].double().numpy()
    return r / np.linalg.norm(r), s, plan.variants[c] == "norm" and m.group(2) == "weight"


def export_gguf_plan(src: str | Path, plan: Plan, out: str | Path, *, force: bool = False,
                     progress: bool = True) -> dict:
    """Write ``src`` (a GGUF file) with ``plan`` applied to its weights into ``out``; returns a summary."""
    src, out = Path(src), Path(out)
    check_file_target(out, force)
    try:
        reader = gguf.GGUFReader(str(src))
    except Exception as e:  # noqa: BLE001
        raise RefdirError(f"could not read GGUF {src}: {e}") from e
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise RefdirError(f"{src} has no general.architecture")
    arch = arch_field.contents()
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names or not any(_WRITER.match(n) for n in names):
        raise RefdirError(f"unsupported GGUF architecture {arch!r}: no token_embd / attn_output / ffn_down tensors")
    d = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[0])
    if plan.r.numel() != d:
        raise RefdirError(f"the edit's direction has size {plan.r.numel()}, the GGUF's embedding width is {d}")
    n_layers = len(plan.strengths["attn"])
    post_norms = any(n.endswith(("post_attention_norm.weight", "post_ffw_norm.weight")) for n in names)
    tied = "output.weight" not in names
    changed: dict[str, str] = {}
    edited: list[str] = []
    try:
        with atomic_file(out, overwrite=force) as tmp:
            writer = gguf.GGUFWriter(str(tmp), arch=arch)
            _copy_fields(reader, writer)
            for t in tqdm(reader.tensors, desc="gguf tensors", disable=not progress):
                qtype = t.tensor_type
                emb = t.name == "token_embd.weight" and plan.embedding
                tgt = None if emb else _target(t.name, plan, n_layers)
                if not emb and tgt is None:
                    writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=qtype)
                    continue
                x = quants.dequantize(t.data, qtype)  # numpy layout is PyTorch's: [..., out, in]
                if emb:
                    if tied:  # keep the unembedding: the unedited embedding becomes output.weight
                        writer.add_tensor("output.weight", np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=qtype)
                    r = plan.r.double().numpy()
                    y = edit_rows(x, r / np.linalg.norm(r), 1.0, False, x.ndim - 1)
                else:
                    r, s, keep = tgt
                    axis = 0 if x.ndim == 1 else x.ndim - 2
                    if x.shape[axis] != d:
                        raise RefdirError(f"{t.name} has shape {x.shape}; expected {d} outputs")
                    y = edit_rows(x, r, s, keep, axis)
                y, new_t = requantize(y, qtype)
                if new_t != qtype:
                    changed[t.name] = f"{qtype.name} -> {new_t.name}"
                if new_t in (Q.F32, Q.F16):
                    writer.add_tensor(t.name, y)
                else:
                    writer.add_tensor(t.name, y, raw_shape=y.shape, raw_dtype=new_t)
                edited.append(t.name)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
            writer.close()
    except OSError as e:
        raise write_error(out, e) from e
    return {"kind": "edit", "mode": "gguf", "source": str(src), "edited": edited, "changed_types": changed,
            "untied_output": tied and plan.embedding, "post_norms": "approximate" if post_norms else "none"}


def plan_to_cpu(plan: Plan) -> Plan:
    """``plan`` with its tensors on the CPU (the GGUF writer reads them as numpy arrays)."""
    return Plan(plan.r.detach().cpu(), {c: v.detach().cpu() for c, v in plan.directions.items()},
                plan.strengths, plan.variants, plan.embedding)


__all__ = ["edit_rows", "export_gguf_plan", "plan_to_cpu", "requantize"]
