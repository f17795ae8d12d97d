"""GGUF in → GGUF out for a parameterised edit (:class:`refdir.core.edits.Plan`): the search's chosen point,
written without leaving the format.

Each residual writer ``blk.N.attn_output`` (component ``attn``) and ``blk.N.ffn_down`` / ``_exps`` / ``_shexp``
(component ``mlp``), with its bias, is dequantized, edited exactly as :func:`refdir.core.edits.apply_weights_`
edits the loaded model (its write vectors lose ``s`` of their part along the component's direction; the
``norm`` variant rescales them back, biases are projected only), and written back as
:func:`refdir.core.gguf_edit.rewrite_gguf` writes edited tensors (Q8_0 for types under 8 bits, else its own type;
changes listed in the summary). With the embedding edited,
``token_embd`` loses its r part. A plan's second direction is removed after that from every writer (and the edited
embedding), as ``apply_weights_`` removes it. The file is written by :func:`refdir.core.gguf_edit.rewrite_gguf`, as
``orthogonalize`` writes its GGUF: every other tensor's bytes and all metadata copied unchanged, a tied
unembedding kept as ``output.weight``. A writer under a post-norm is edited along ``gain ⊙ d`` (normalized; the
gain as llama.cpp stores it), as ``apply_weights_`` and the hooks edit it (:mod:`refdir.core.edits`); its bias,
if any, is left as they leave it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from refdir.core.edits import Plan
from refdir.core.gguf_edit import (
    _WRITER,
    EMBEDDINGS,
    _post_norm_directions,
    open_gguf,
    rewrite_gguf,
    writer_axis,
)
from refdir.core.io import check_file_target
from refdir.core.projection import project_rows
from refdir.errors import RefdirError

_COMPONENT = {"attn_output": "attn", "ssm_out": "attn", "ffn_down": "mlp", "ffn_down_exps": "mlp", "ffn_down_shexp": "mlp",
              "proj": "mlp"}  # proj: Gemma 4's per-layer-input branch, an MLP-side writer in the loaded model too


ROWS = 8192  # vectors edited at a time: float64 work on a 151k-row embedding stays small


def edit_rows(x: np.ndarray, r: np.ndarray, s: float, keep_norm: bool, axis: int) -> np.ndarray:
    """``x`` with its vectors along ``axis`` losing ``s`` of their r̂ part (float64 maths in blocks of ``ROWS``
    vectors, float32 out); with ``keep_norm`` each vector is rescaled to its original norm (the ``norm`` variant).
    A float32 ``x`` whose vectors are its rows is edited in place (the dequantized embedding: no second copy)."""
    xm = np.moveaxis(x, axis, -1)
    flat = xm.reshape(-1, xm.shape[-1])
    inplace = x.dtype == np.float32 and axis in (-1, x.ndim - 1) and x.flags.c_contiguous and x.flags.writeable
    out = flat if inplace else np.empty(flat.shape, dtype=np.float32)
    rt = torch.from_numpy(np.asarray(r, dtype=np.float64))
    for i in range(0, flat.shape[0], ROWS):
        v = torch.from_numpy(flat[i:i + ROWS].astype(np.float64))
        out[i:i + ROWS] = project_rows(v, rt, s, keep_norm).numpy()
    return np.moveaxis(out.reshape(xm.shape), -1, axis)


def _unit(v) -> np.ndarray:
    r = v.double().cpu().numpy()
    return r / np.linalg.norm(r)


def _target(name: str, plan: Plan, n_layers: int, dirs: dict, under: dict) -> tuple[np.ndarray, float, bool] | None:
    """(direction, strength, keep_norm) for tensor ``name`` under ``plan``; None when it is not edited.
    ``dirs[c]``: component c's unit direction; ``under[c]``: its writers' directions under a post-norm (None: the
    norm cannot write along it)."""
    m = _WRITER.match(name)
    if not m:
        return None
    blk = int(name.split(".")[1])
    if blk >= n_layers:
        raise RefdirError(f"{name}: block {blk} is beyond the edit's {n_layers} layers")
    c = _COMPONENT[m.group(1)]
    s = float(plan.strengths[c][blk])
    u = under[c].get(name, dirs[c])
    if s <= 0 or u is None:
        return None
    return u, s, plan.variants[c] == "norm" and m.group(2) == "weight"


def export_gguf_plan(src: str | Path, plan: Plan, out: str | Path, *, force: bool = False,
                     progress: bool = True) -> dict:
    """Write ``src`` (a GGUF file) with ``plan`` applied to its weights into ``out``; returns a summary."""
    src, out = Path(src), Path(out)
    check_file_target(out, force)
    reader, arch, names, d = open_gguf(src)
    if plan.r.numel() != d:
        raise RefdirError(f"the edit's direction has size {plan.r.numel()}, the GGUF's embedding width is {d}")
    n_layers = len(plan.strengths["attn"])
    tied = "output.weight" not in names
    r = _unit(plan.r)
    # writers under a post-norm: each component's direction (and the second) as gain ⊙ d, from the stored gains
    dirs = {c: _unit(plan.directions[c]) for c in ("attn", "mlp")}
    under = {c: _post_norm_directions(reader, arch, dirs[c])[0] for c in dirs}
    second = None if plan.second is None else (_unit(plan.second[0]), plan.second[1])
    under2 = {} if second is None else _post_norm_directions(reader, arch, second[0])[0]

    def wants(name: str) -> bool:
        if name in EMBEDDINGS:
            return plan.embedding
        return (_target(name, plan, n_layers, dirs, under) is not None
                or (second is not None and bool(_WRITER.match(name)) and under2.get(name, second[0]) is not None))

    def transform(name: str, x: np.ndarray) -> np.ndarray:
        if name in EMBEDDINGS:
            y = edit_rows(x, r, 1.0, False, x.ndim - 1)
            axis = x.ndim - 1
            u2 = None if second is None else second[0]
        else:
            axis, t = writer_axis(name, x, d), _target(name, plan, n_layers, dirs, under)
            y = x if t is None else edit_rows(x, *t, axis)
            u2 = None if second is None else under2.get(name, second[0])
        # the second direction after the edit itself, as apply_weights_ and the hooks apply it
        return y if u2 is None else edit_rows(y, u2, second[1], False, axis)

    edited, changed = rewrite_gguf(reader, arch, out, wants, transform, force=force, progress=progress)
    return {"kind": "edit", "mode": "gguf", "source": str(src), "edited": edited, "changed_types": changed,
            "untied_output": tied and plan.embedding, "post_norms": "exact" if under["attn"] or under["mlp"] else "none"}


def plan_to_cpu(plan: Plan) -> Plan:
    """``plan`` with its tensors on the CPU (the GGUF writer reads them as numpy arrays)."""
    second = None if plan.second is None else (plan.second[0].detach().cpu(), plan.second[1])
    return Plan(plan.r.detach().cpu(), {c: v.detach().cpu() for c, v in plan.directions.items()},
                plan.strengths, plan.variants, plan.embedding, second)


__all__ = ["edit_rows", "export_gguf_plan", "plan_to_cpu"]
