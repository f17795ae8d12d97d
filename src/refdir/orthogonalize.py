"""Weight orthogonalization: edit every matrix that writes to the residual stream so that it
cannot write along r̂. For a pre-norm decoder this equals :func:`refdir.interventions.ablate`.

W_out ← W_out − r̂ r̂ᵀ W_out (output axis), b ← b − r̂ r̂ᵀ b, and for the embedding
E ← E − E r̂ r̂ᵀ. A tied ``lm_head`` is untied first so the unembedding is unchanged.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .architecture import Architecture, inspect_model
from .errors import RefdirError
from .io import atomic_dir, atomic_write_json


def _unit64(direction: torch.Tensor) -> torch.Tensor:
    r = direction.detach().to(torch.float64).flatten()
    return r / r.norm()


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
    r = _unit64(direction)
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
    from .models import save_hf_checkpoint

    summary = orthogonalize_(model, direction)
    with atomic_dir(out_dir, force=force) as tmp:
        save_hf_checkpoint(model, tokenizer, tmp)
        atomic_write_json(tmp / "refdir_edit.json", {"kind": "orthogonalize", **summary, **(meta or {})})
    return Path(out_dir)
