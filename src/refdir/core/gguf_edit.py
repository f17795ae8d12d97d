"""GGUF in → GGUF out: orthogonalize a GGUF checkpoint without leaving the format.

Only the tensors that write to the residual stream are dequantized and edited. llama.cpp names
tensors by role, whatever the model family: ``token_embd`` (the embedding; ``position_embd`` for learned
positions), ``blk.N.attn_output``, ``blk.N.ssm_out`` (a hybrid model's mamba mixer), ``blk.N.ffn_down``,
``blk.N.ffn_down_exps`` (experts) and ``blk.N.ffn_down_shexp`` (shared expert), with their biases. Edited tensors
are written back in Q8_0 where they were stored in fewer bits (Q4_0, Q4_1, Q5_0, Q5_1, and the K-quants, which the
gguf library cannot write; F16 when the row length does not fit Q8_0 blocks), else in their own type (Q8_0, BF16,
F16, F32): rounding an edited tensor to its 4- or 5-bit grid again adds a second full rounding error, which on a
small model outweighs the edit (:data:`WIDEN`); the summary says which types changed. Every other tensor's bytes and all
metadata are copied unchanged. A file without ``output.weight`` ties its unembedding to the
embedding: the unedited embedding is then written out as ``output.weight``. Where a post-norm
(``blk.N.post_attention_norm``, ``blk.N.post_ffw_norm``; Gemma 4's chains of two, and its per-layer ``proj`` with
``post_norm``) sits between a writer and the stream, the writer is made orthogonal to the norm's gain ⊙ r instead
(from the outermost norm in), which removes r from the stream exactly.

A basis B [k, d] (a subspace) may stand for r everywhere: the edited tensors lose their span(B) component, and
writers under a post-norm are made orthogonal to the span of the rows gain ⊙ b_i
(:func:`refdir.core.postnorm.gain_basis`), which again removes span(B) from the stream exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants
from tqdm.auto import tqdm

from refdir.core.directions import ablation_operand, check_direction
from refdir.core.gguf_read import GGUFFile
from refdir.core.io import atomic_file, check_file_target, write_error
from refdir.core.postnorm import chain_basis
from refdir.core.projection import project_along
from refdir.errors import RefdirError

# ssm_out: a mamba mixer's output projection (hybrid models), a token mixer's writer like attn_output
# proj: Gemma 4's per-layer-input branch, which writes to the stream through its own post-norm
_WRITER = re.compile(r"^blk\.\d+\.(attn_output|ssm_out|ffn_down|ffn_down_exps|ffn_down_shexp|proj)\.(weight|bias)$")
EMBEDDINGS = ("token_embd.weight", "position_embd.weight")  # rows written to the stream (GPT-2 has learned positions)
# the post-norms (llama.cpp's role names, innermost first) between each writer and the stream: the first chain
# whose norms the block has. Gemma 4's MoE blocks norm the MLP's and the experts' outputs, then their sum
_POST_NORMS = {"attn_output": [("post_attention_norm",)], "ssm_out": [("post_ssm_norm",)],
               "ffn_down": [("post_ffw_norm_1", "post_ffw_norm"), ("post_ffw_norm",)],
               "ffn_down_exps": [("post_ffw_norm_2", "post_ffw_norm"), ("post_ffw_norm",)],
               "ffn_down_shexp": [("post_ffw_norm",)], "proj": [("post_norm",)]}
_SKIP_FIELDS = ("GGUF.", "general.architecture")


def _copy_fields(reader, writer) -> None:
    for name, field in reader.fields.items():
        if name.startswith(_SKIP_FIELDS):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)


REQUANT_ROWS = 8192  # rows quantized at a time: quantization works per row, so the bytes are the same


# edited tensors stored in these types are written in Q8_0: rounded to their own 4- or 5-bit grid again, an edited
# tensor takes a second full rounding error. SmolLM2-135M-Instruct Q4_1, a random direction (an edit that moves the
# first token by KL 0.34): the edited GGUF against the hooks on the dequantized model, KL 0.25 and top-1 agreement
# 0.75 in its own type, 0.0014 and 1.00 in Q8_0, for a file of 144 MB instead of 128 (NOTES.md)
WIDEN = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1})


def _requantize(x: np.ndarray, qtype):
    """(array, type): Q8_0 for a type of :data:`WIDEN`, else ``qtype`` if the library can quantize it, else a
    fallback type; a large 2-D tensor a block of rows at a time (its temporaries stay small)."""
    if x.ndim == 2 and x.shape[0] > REQUANT_ROWS:
        parts = [_requantize(np.ascontiguousarray(x[i:i + REQUANT_ROWS]), qtype)
                 for i in range(0, x.shape[0], REQUANT_ROWS)]
        return np.concatenate([p[0] for p in parts], axis=0), parts[0][1]
    if qtype in (Q.F32, Q.F16):
        return x.astype(np.float32 if qtype == Q.F32 else np.float16), qtype
    for t in (Q.Q8_0 if qtype in WIDEN else qtype, Q.Q8_0, Q.F16):
        try:
            if t == Q.F16:
                return x.astype(np.float16), t
            return quants.quantize(x.astype(np.float32), t), t
        except (NotImplementedError, ValueError, AssertionError, quants.QuantError):
            continue
    raise RefdirError(f"cannot write a tensor of type {qtype.name}")


def _edit(x: np.ndarray, r: np.ndarray, axis: int) -> np.ndarray:
    """``x`` without its component along unit vector ``r`` [d] (or in the span of orthonormal rows ``r`` [k, d])
    on ``axis``, computed in float64."""
    t = torch.from_numpy(x.astype(np.float64))  # a writable copy (x may be a read-only view of the file)
    return project_along(t, torch.from_numpy(r), axis).to(torch.float32).numpy()


def _post_norm_directions(reader, arch: str, r: np.ndarray) -> tuple[dict[str, np.ndarray | None], set[str]]:
    """For every writer under post-norms, what it is made orthogonal to (from the outermost norm in, each gain ⊙ the
    direction, centred for a LayerNorm: :func:`refdir.core.postnorm.chain_basis`; for a basis r [k, d] the span;
    None where that vanishes), and the biases of lone post-norms, which lose their r component (see
    :mod:`refdir.core.postnorm`). llama.cpp's converters store Gemma's ``1 + w`` as the gain itself, so a GGUF
    gain is its weight as stored. A ``post_attention_norm`` is the attention's post-norm only in a block that
    also has an MLP input norm (``ffn_norm``) or an MLP post-norm: elsewhere (gpt-oss, Qwen3-Next) llama.cpp uses
    that name for the MLP's input norm. RMS or LayerNorm is read from the metadata's epsilon key."""
    tensors = {t.name: t for t in reader.tensors}
    centred = (f"{arch}.attention.layer_norm_rms_epsilon" not in reader.fields
               and f"{arch}.attention.layer_norm_epsilon" in reader.fields)
    under: dict[str, np.ndarray | None] = {}
    biases: set[str] = set()
    for name in tensors:
        m = _WRITER.match(name)
        if not m:
            continue
        blk = name.split(".")[1]
        chain = next((ch for ch in _POST_NORMS[m.group(1)] if all(f"blk.{blk}.{n}.weight" in tensors for n in ch)), ())
        if not chain or (m.group(1) == "attn_output" and not {f"blk.{blk}.ffn_norm.weight",
                                                              f"blk.{blk}.post_ffw_norm.weight"} & set(tensors)):
            continue
        gains = []
        for n in chain:
            g = tensors[f"blk.{blk}.{n}.weight"]
            gains.append((torch.from_numpy(quants.dequantize(g.data, g.tensor_type).astype(np.float64).reshape(-1)),
                          centred))
        u = chain_basis(gains, torch.from_numpy(np.asarray(r, dtype=np.float64)))
        under[name] = None if u is None else u.numpy()
        if len(chain) == 1 and f"blk.{blk}.{chain[0]}.bias" in tensors:
            biases.add(f"blk.{blk}.{chain[0]}.bias")
    return under, biases


def open_gguf(src: Path) -> tuple:
    """(reader, architecture, tensor names, d_model) of a GGUF that has an embedding and residual writers under
    llama.cpp's role names; anything else is one clear error."""
    try:
        reader = GGUFFile(src)
    except Exception as e:  # noqa: BLE001
        raise RefdirError(f"could not read GGUF {src}: {e}") from e
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise RefdirError(f"{src} has no general.architecture")
    arch = arch_field.contents()
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names or not any(_WRITER.match(n) for n in names):
        raise RefdirError(f"unsupported GGUF architecture {arch!r}: no token_embd / attn_output / ssm_out / ffn_down tensors")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return reader, arch, names, int(emb.shape[0])  # GGUF shapes are (ne0, ...): ne0 is the embedding's row length


def writer_axis(name: str, x: np.ndarray, d: int) -> int:
    """The output axis of a residual writer's dequantized array (numpy layout is PyTorch's: [..., out, in]; a bias
    is 1-D), checked to have ``d`` entries."""
    axis = 0 if x.ndim == 1 else x.ndim - 2
    if x.shape[axis] != d:
        raise RefdirError(f"{name} has shape {x.shape}; expected {d} outputs")
    return axis


def rewrite_gguf(reader, arch: str, out: Path, wants, transform, *, force: bool, progress: bool
                 ) -> tuple[list[str], dict[str, str]]:
    """Write ``out`` (atomically): the metadata and every tensor of ``reader`` copied byte for byte, except those
    ``wants(name)`` picks, which are dequantized, replaced by ``transform(name, x)`` and written back in their own
    type where the gguf library can quantize it (else Q8_0 or F16). When the embedding is edited in a file without
    ``output.weight`` (a tied unembedding), the unedited embedding is written as ``output.weight``. Returns the
    edited names and the type changes."""
    tied = "output.weight" not in {t.name for t in reader.tensors}
    changed: dict[str, str] = {}
    edited: list[str] = []
    try:
        with atomic_file(out, overwrite=force) as tmp:
            writer = gguf.GGUFWriter(str(tmp), arch=arch)
            _copy_fields(reader, writer)
            for t in tqdm(reader.tensors, desc="gguf tensors", disable=not progress):
                qtype = t.tensor_type
                if not wants(t.name):
                    writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=qtype)
                    continue
                if t.name == "token_embd.weight" and tied:  # keep the unembedding
                    writer.add_tensor("output.weight", np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=qtype)
                x = quants.dequantize(t.data, qtype)  # numpy shape: reversed GGUF shape, row length last
                y, new_t = _requantize(transform(t.name, x), qtype)
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
    except OSError as e:  # anything the OS refuses while writing the output
        raise write_error(out, e) from e
    return edited, changed


def orthogonalize_gguf(src: str | Path, direction: torch.Tensor, out: str | Path, *, force: bool = False,
                       progress: bool = True) -> dict:
    """Write ``out``, the GGUF ``src`` with its residual-writing tensors orthogonalized against ``direction`` [d]
    or against the span of a basis [k, d]. Returns a summary (edited tensors, changed types, post-norms)."""
    src, out = Path(src), Path(out)
    check_file_target(out, force)
    check_direction(direction)
    reader, arch, names, d = open_gguf(src)
    width = int(direction.shape[-1]) if direction.dim() == 2 else direction.numel()
    if width != d:
        raise RefdirError(f"direction has size {width}, the GGUF's embedding width is {d}")
    if direction.dim() == 1:
        r = direction.detach().double().flatten().numpy()
        r = r / np.linalg.norm(r)
    else:  # a basis [k, d] (a one-row basis is its unit vector)
        r = ablation_operand(direction, torch.float64).numpy()
    under, biases = _post_norm_directions(reader, arch, r)

    tied = "output.weight" not in names

    def wants(name: str) -> bool:  # writers under a post-norm: its gain ⊙ r (None: nothing to remove)
        return (name in EMBEDDINGS or bool(_WRITER.match(name)) or name in biases) and \
            under.get(name, r) is not None

    def transform(name: str, x: np.ndarray) -> np.ndarray:
        if name in EMBEDDINGS:
            return _edit(x, r, x.ndim - 1)
        return _edit(x, under.get(name, r), writer_axis(name, x, d))

    edited, changed_types = rewrite_gguf(reader, arch, out, wants, transform, force=force, progress=progress)
    return {"kind": "orthogonalize", "mode": "gguf", "source": str(src), "edited": edited,
            "changed_types": changed_types, "untied_output": tied, "post_norms": "exact" if under else "none",
            "k": int(r.shape[0]) if r.ndim == 2 else 1}
