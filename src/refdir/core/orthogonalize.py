"""Weight orthogonalization: edit every matrix that writes to the residual stream so that it
cannot write along r̂. For a pre-norm decoder this equals :func:`refdir.core.interventions.ablate`.

W_out ← W_out − r̂ r̂ᵀ W_out (output axis), b ← b − r̂ r̂ᵀ b, and for the embedding
E ← E − E r̂ r̂ᵀ. A tied ``lm_head`` is untied first so the unembedding is unchanged.

Where a post-norm sits between a writer and the stream (Gemma 2/3/4, OLMo 2), the writer is made orthogonal to
û = gain ⊙ r̂ normalized instead (centred for a LayerNorm, whose bias also loses its r̂ part; through each norm of
a chain, from the outermost in, in Gemma 4): the block then writes nothing along r̂, exactly, and computes what
the ablation hooks compute, which act there too (:mod:`refdir.core.interventions`, :mod:`refdir.core.postnorm`).

Every function here also takes an orthonormal basis B [k, d] (a subspace, :class:`refdir.core.directions.Subspace`)
instead of r: then W_out ← (I − BᵀB) W_out, b ← (I − BᵀB) b, E ← E (I − BᵀB), and writers under a post-norm are
made orthogonal to the span of the rows gain ⊙ b_i (:func:`refdir.core.postnorm.gain_basis`), exactly.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from refdir.core.architecture import Architecture, inspect_model
from refdir.core.auto_model import auto_class, checkpoint_renamer
from refdir.core.config_check import check_config
from refdir.core.directions import ablation_operand, check_direction
from refdir.core.io import atomic_dir, atomic_write_json
from refdir.core.models import load_config, save_hf_checkpoint
from refdir.core.postnorm import COMPONENTS, chain_basis, chain_gains, known_chain, norm_form
from refdir.core.projection import project_along_
from refdir.core.shards import (
    SHARD_INDEX,
    ST_TORCH,
    check_in_source,
    copy_side_files,
    read_exact,
    read_header,
    read_tensor,
    safetensors_shards,
)
from refdir.errors import RefdirError


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
    """Edit ``model`` in place against a direction [d] or the span of a basis [k, d]. Returns a summary of what
    was edited."""
    arch = arch or inspect_model(model)
    if _width(direction) != arch.d_model:
        raise RefdirError(f"direction has size {_width(direction)}, the model's d_model is {arch.d_model}")
    r = ablation_operand(direction, torch.float64)
    untied = untie_lm_head(model, arch)
    names = {id(p): n for n, p in model.named_parameters()}
    edited, approximate = [], []
    for name, emb in arch.embeddings:
        project_along_(emb.weight.data, 1, (r, 1.0, False))
        edited.append(f"{name}.weight")
    for bp in arch.blocks:
        for c in COMPONENTS:
            for mod in bp.modules(c):
                chain, gains = bp.chain(mod), chain_gains(bp, mod)
                if gains is None:  # approximate: made orthogonal to r
                    approximate += [type(n).__name__ for n in chain]
                elif len(chain) == 1 and norm_form(chain[0]).has_bias:
                    b = chain[0].bias  # a centring post-norm's bias loses its r (span) component
                    project_along_(b.data, 0, (r, 1.0, False))
                    edited.append(names.get(id(b), "post-norm bias"))
                u = r if gains is None else chain_basis(gains, r)
                for w in bp.writers_of(mod):
                    p = getattr(w.module, w.param)
                    axis = 0 if p.dim() == 1 else w.out_axis
                    if u is not None:
                        project_along_(p.data, axis, (u, 1.0, False))
                    edited.append(w.name)
    if approximate:
        warnings.warn(f"cannot tell how the post-norms {sorted(set(approximate))[:3]} scale their output; there "
                      "the weights are made orthogonal to r, which only approximates removing r", stacklevel=2)
    post = "none" if not arch.has_post_norms else ("approximate" if approximate else "exact")
    return {"edited": edited, "untied_lm_head": untied, "exact": arch.weight_edit_exact, "post_norms": post,
            "k": _k(r)}


def _width(direction: torch.Tensor) -> int:
    """The model width a direction [d] or a basis [k, d] is for."""
    return int(direction.shape[-1]) if direction.dim() == 2 else direction.numel()


def _k(r: torch.Tensor) -> int:
    """How many dimensions the edit removes."""
    return int(r.shape[0]) if r.dim() == 2 else 1


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


def _writer_table(config, stored: set[str], layouts: dict | None = None
                  ) -> tuple[dict[str, int], list[str], bool, int, dict[str, tuple]]:
    """Tensor names that write to the residual stream (→ output axis), embedding names, tied flag, d_model and, for
    writers under post-norms, ``{writer: ((gain name, NormForm or None), ...)}`` innermost first, read from a model
    skeleton on the meta device (no weights allocated, no forward pass, no model code run; the post-norms from
    ``layouts``, a traced copy's, where given: :func:`refdir.core.config_check.check_config`). Names are the checkpoint's: a
    parameter that transformers renames on load (:func:`~refdir.core.auto_model.checkpoint_renamer`) is given under the
    name in ``stored`` that loads as it."""
    with torch.device("meta"):
        skeleton = auto_class(config).from_config(config, trust_remote_code=False)
    rename = checkpoint_renamer(skeleton)
    as_stored = {rename(n): n for n in stored}

    def ck(name: str) -> str:
        return as_stored.get(name, name)

    arch = inspect_model(skeleton, trace=False, layouts=layouts)
    if not arch.post_norms_known:  # no traced copy, and a forward source the static reading cannot vouch for
        raise RefdirError(f"cannot tell, without loading the model, where {type(arch.blocks[0].block).__name__} "
                          "normalizes what its writers write; use --in-memory, which traces the loaded model")
    table: dict[str, int] = {}
    post: dict[str, tuple] = {}
    for bp in arch.blocks:
        for mod in (m for c in COMPONENTS for m in bp.modules(c)):
            chain = tuple((ck(f"{arch.blocks_path}.{bp.index}.{bp.child_name(n)}.weight"), norm_form(n))
                          for n in bp.chain(mod))
            for w in bp.writers_of(mod):
                p = getattr(w.module, w.param)
                table[ck(w.name)] = 0 if p.dim() == 1 else w.out_axis
                if chain:
                    post[ck(w.name)] = chain
    emb = [ck(f"{n}.weight") for n, _ in arch.embeddings]
    return table, emb, arch.tied, arch.d_model, post


def _read_small(src: Path, shards: list[str], weight_map: dict[str, str], names: set[str]) -> dict:
    """The tensors ``names`` (small ones: norm gains) read from the checkpoint's shards."""
    out: dict[str, torch.Tensor] = {}
    files = sorted({weight_map[n] for n in names if n in weight_map}) if weight_map else shards
    for s in files:
        header, base = read_header(src / s)
        with open(src / s, "rb") as f:
            for n in sorted(names & header.keys()):
                h = header[n]
                if h["dtype"] not in ST_TORCH:
                    raise RefdirError(f"{src / s}: tensor {n} has dtype {h['dtype']}, not a float type")
                out[n] = read_tensor(f, src / s, base, n, h).clone()
    return out


def _post_norm_directions(src: Path, shards: list[str], weight_map: dict[str, str], post: dict[str, tuple],
                          r: torch.Tensor) -> tuple[dict[tuple, torch.Tensor | None], set[str], list[str]]:
    """Per chain of post-norms (by their gains' names, innermost first), what its writers are made orthogonal to:
    from the outermost norm in, each gain ⊙ the direction, normalized, with the gains read from the checkpoint (None:
    nothing to remove); the biases of single centring post-norms, which lose their r̂ part; and the post-norms whose
    form is unknown, or that have a bias inside a chain of several (their writers are made orthogonal to r̂:
    approximate)."""
    chains = set(post.values())
    want = {g for ch in chains for g, f in ch if f is not None}
    weights = _read_small(src, shards, weight_map, want)
    if want - set(weights):
        raise RefdirError(f"{src} has no tensor {sorted(want - set(weights))[0]}, a post-norm gain the model class "
                          "built from its config has")
    dirs: dict[tuple, torch.Tensor | None] = {}
    biases, approximate = set(), set()
    for ch in chains:
        if not known_chain([f for _g, f in ch]):
            dirs[ch] = r
            approximate |= {g.removesuffix(".weight") for g, _f in ch}
            continue
        dirs[ch] = chain_basis([(f.offset + weights[g].double(), f.centred) for g, f in ch], r)
        if len(ch) == 1 and ch[0][1].has_bias:
            biases.add(ch[0][0].removesuffix("weight") + "bias")
    return dirs, biases, sorted(approximate)


def _table_key(name: str, table: dict[str, int]) -> str | None:
    """The model parameter (a key of ``table``) that checkpoint tensor ``name`` is, or is one expert's slice of:
    checkpoints may store mixture-of-experts weights per expert (``experts.3.down_proj.weight``, 2-D) while the
    model fuses them (``experts.down_proj``, 3-D)."""
    if name in table:
        return name
    fused = _EXPERT_INDEX.sub(".experts.", name)
    for cand in (fused, fused.removesuffix(".weight"), fused.removesuffix(".bias") + "_bias"):
        if cand in table:
            return cand
    return None


def _match_writer(name: str, table: dict[str, int], shape: tuple[int, ...] | None, d: int) -> int | None:
    """The output axis if the checkpoint tensor ``name`` writes to the stream, else None (see :func:`_table_key`)."""
    key = _table_key(name, table)
    if key is None:
        return None
    if key == name:
        return table[name] if shape is None or len(shape) > 1 else 0
    if shape is None or len(shape) == 1:
        return 0
    axes = [a for a, n in enumerate(shape) if n == d]
    if len(axes) != 1:
        raise RefdirError(f"cannot tell the output axis of {name} with shape {shape}")
    return axes[0]


def _rewrite_shard(src_file: Path, dst_file: Path, transform, wants) -> list[str]:
    """Copy one safetensors file tensor by tensor, passing each tensor for which ``wants(name)``
    is true through ``transform(name, t)``; the others are copied byte for byte.

    ``transform`` returns the tensor unchanged or an edited tensor of the same dtype and shape (``t`` is read
    into its own buffer, so it may edit it in place). Tensors are read with plain file reads
    (no memory map, whose touched pages would stay resident) and written right after the header,
    so memory holds about one tensor at a time; the safetensors library's writer would need the
    whole shard in memory, hence this small writer for the documented format."""
    header, base = read_header(src_file)  # offsets and sizes checked against the file
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
            if h["dtype"] not in ST_TORCH or start == end or not wants(n):
                left = end - start  # unchanged: copy the bytes in 64 MiB pieces
                while left:
                    piece = read_exact(r, min(left, 1 << 26), src_file, n)
                    w.write(piece)
                    left -= len(piece)
                continue
            t = read_tensor(r, src_file, base, n, h)
            shape, dtype = t.shape, t.dtype
            new = transform(n, t)
            if new.dtype != dtype:
                raise RefdirError(f"internal: edit changed the dtype of {n}")
            if new.shape != shape:
                raise RefdirError(f"internal: edit changed the size of {n}")
            changed.append(n)
            w.write(new.contiguous().reshape(-1).view(torch.uint8).numpy())  # its bytes, without a copy of them
            del t, new
    return changed


def _indexed_names(tmp: Path, shards: list[str], new_map: dict[str, str]) -> list[str]:
    """Rename a lone ``model.safetensors`` in ``tmp`` (in ``new_map`` too) before an index is added beside it:
    transformers reads a lone ``model.safetensors`` and ignores the index, and with it the untied head."""
    if shards != ["model.safetensors"]:
        return shards
    name = "model-00001-of-00001.safetensors"
    (tmp / shards[0]).rename(tmp / name)
    new_map.update({k: name for k, v in new_map.items() if v == shards[0]})
    return [name]


class _StreamEdit:
    """What the streamed edit does to each tensor of the shards it rewrites: the embedding and writers lose their
    r̂ part (writers under a post-norm: their û part, see :func:`_post_norm_directions`), centring post-norms'
    biases lose their r̂ part, and a tied embedding is also written out unedited as ``lm_head.weight``."""

    def __init__(self, r, table, emb_names, tied, d, under: dict, biases: set[str]):
        self.r, self.table, self.emb_names, self.tied, self.d = r, table, emb_names, tied, d
        self.under, self.biases = under, biases  # writer -> û (None: leave it), post-norm biases
        self.edited: list[str] = []
        self.new_map: dict[str, str] = {}
        self.head_from_embedding: str | None = None

    def rewrite(self, src: Path, tmp: Path, shard: str) -> None:
        """Rewrite ``shard`` of ``src`` into ``tmp``."""
        r, table, d = self.r, self.table, self.d

        def wants(name: str) -> bool:
            self.new_map[name] = shard
            return name in self.emb_names or name in self.biases or _match_writer(name, table, None, d) is not None

        def transform(name: str, t: torch.Tensor) -> torch.Tensor:
            """``t`` (read into its own buffer) edited in place, a block of vectors at a time."""
            if name in self.emb_names:
                if self.tied and name == self.emb_names[0] and self.head_from_embedding is None:
                    self.head_from_embedding = name
                    save_file({"lm_head.weight": t.contiguous()}, str(tmp / "model-lm_head.safetensors"),
                              metadata={"format": "pt"})
                u, axis = r, t.dim() - 1
            elif name in self.biases:
                u, axis = r, 0
            else:
                u = self.under.get(_table_key(name, table), r)
                axis = None if u is None else _match_writer(name, table, tuple(t.shape), d)
            if u is not None:
                project_along_(t, axis, (u, 1.0, False))
            return t

        self.edited += _rewrite_shard(src / shard, tmp / shard, transform, wants)


def stream_orthogonalize(src: str | Path, direction: torch.Tensor, out: str | Path, *, force: bool = False,
                         progress: bool = True) -> dict:
    """Orthogonalize a safetensors checkpoint shard by shard, one tensor at a time, against a direction [d] or
    the span of a basis [k, d].

    Peak memory is about one shard plus one tensor: the model is never built (only a skeleton
    on the meta device, to find which parameters write to the residual stream). Writers and the
    embedding are edited; every other tensor is copied unchanged; a tied ``lm_head`` is written
    out explicitly from the unedited embedding. Config (untied), index and tokenizer files are
    written beside the shards. The output directory appears whole or not at all. Under post-norms the
    writers are made orthogonal to the post-norm's gain ⊙ r̂ (:mod:`refdir.core.postnorm`), read from the
    checkpoint before the shards are rewritten.
    """
    src = Path(src)
    check_direction(direction)
    if not (src / "config.json").exists():
        raise RefdirError(f"{src} is not a model directory (no config.json)")
    check_in_source(src / "config.json", src)
    index_path = src / SHARD_INDEX
    weight_map, shards = safetensors_shards(src)  # plain names inside src, no links out of it
    if not index_path.exists() and len(shards) != 1:
        raise RefdirError(
            f"{src} has {len(shards)} safetensors files and no model.safetensors.index.json; "
            "a sharded checkpoint needs its index"
        )
    stored: set[str] = set()
    for s in shards:  # every shard's offsets against its length, before anything is written
        stored |= read_header(src / s)[0].keys()
    config = load_config(src)  # never the checkpoint's own code
    # a model whose stream a weight edit cannot cover is refused before anything is written; the traced copy's
    # post-norms serve the skeleton
    layouts = check_config(config)
    table, emb_names, tied, d, post = _writer_table(config, stored, layouts)
    found = {_table_key(n, table) for n in stored}
    if missing := sorted(set(table) - found):
        raise RefdirError(f"{src}: the checkpoint stores the residual writer {missing[0]} (and {len(missing) - 1} "
                          "more) under a name refdir cannot map to the model's; use --in-memory, which loads the "
                          "model through transformers")
    if _width(direction) != d:
        raise RefdirError(f"direction has size {_width(direction)}, the checkpoint's hidden size is {d}")
    r = ablation_operand(direction, torch.float64)
    dirs, biases, approximate = _post_norm_directions(src, shards, weight_map, post, r)
    if approximate:
        warnings.warn(f"cannot tell how the post-norms {approximate[:3]} scale their output; there the weights are "
                      "made orthogonal to r, which only approximates removing r", stacklevel=2)
    edit = _StreamEdit(r, table, emb_names, tied, d, {w: dirs[ch] for w, ch in post.items()}, biases)
    with atomic_dir(out, force=force) as tmp:
        for shard in tqdm(shards, desc="orthogonalize shards", disable=not progress):
            edit.rewrite(src, tmp, shard)
        edited, new_map, head_from_embedding = edit.edited, edit.new_map, edit.head_from_embedding
        if head_from_embedding is not None and "lm_head.weight" not in new_map:
            new_map["lm_head.weight"] = "model-lm_head.safetensors"
            shards = [*_indexed_names(tmp, shards, new_map), "model-lm_head.safetensors"]
        elif head_from_embedding is not None:  # the checkpoint stores its own lm_head: no copy of the embedding
            (tmp / "model-lm_head.safetensors").unlink()
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
        copy_side_files(src, tmp, {"config.json", index_path.name})
        summary = {"kind": "orthogonalize", "mode": "streaming", "source": str(src), "edited": edited,
                   "untied_lm_head": bool(head_from_embedding), "shards": shards,
                   "post_norms": "none" if not post else ("approximate" if approximate else "exact"), "k": _k(r)}
        atomic_write_json(tmp / "refdir_edit.json", summary)
    return summary
