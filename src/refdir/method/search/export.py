"""A front point of a finished search as an edited Hugging Face checkpoint (the edit in the weights, no hooks)."""

from __future__ import annotations

import json
from pathlib import Path

from refdir.core.edits import Edit, apply_weights_, resolve
from refdir.core.io import atomic_dir, atomic_write_json
from refdir.core.models import save_hf_checkpoint
from refdir.core.rundir import RunDir
from refdir.core.spec import ModelSpec
from refdir.errors import RefdirError


def export_point(search_dir: str | Path, point: int, out: str | Path, *, force: bool = False,
                 model: dict | None = None) -> Path:
    """Write front point ``point`` of the search in run directory ``search_dir`` as an edited HF checkpoint in
    ``out``. The model is loaded as the search recorded it, with ``model``'s ModelSpec fields (e.g.
    ``{"dtype": "fp32"}``) replacing the recorded ones."""
    rd = RunDir(search_dir)
    f = rd.search_dir() / "front.json"
    cf = rd.search_dir() / "config.json"
    if not f.exists() or not cf.exists():
        raise RefdirError(f"{rd.path} holds no finished search (expected {f})")
    if Path(out).exists() and not force:
        raise RefdirError(f"output directory {out} already exists; pass --force to overwrite it")
    pts = json.loads(f.read_text())["points"]
    if not 0 <= point < len(pts):
        raise RefdirError(f"point {point} is not on the front (points 0..{len(pts) - 1})")
    # the search's config holds its run config under "run", and that the model spec under "model"
    spec = ModelSpec(**(json.loads(cf.read_text())["run"]["model"] | (model or {})))
    p = pts[point]
    edit = Edit.from_dict(p["edit"])
    cands = rd.candidates()
    lm = spec.load_model()
    summary = apply_weights_(lm.model, resolve(edit, cands))
    with atomic_dir(out, force=force) as tmp:
        save_hf_checkpoint(lm.model, lm.tokenizer, tmp)
        atomic_write_json(tmp / "refdir_edit.json", {
            "kind": "edit", "edit": edit.to_dict(), "describe": edit.describe(), "point": point,
            "trial": p["trial"], "proxy": {"refusal": p["proxy_refusal"], "kl": p["proxy_kl"]},
            "confirmed": p.get("confirmed"), "source_model": lm.model_id, **summary})
    return Path(out)

