"""A front point of a finished search, or the edit ``refdir run`` chose, as an edited Hugging Face checkpoint (the
edit in the weights, no hooks), or as a GGUF file where the search's model was a GGUF."""

from __future__ import annotations

import json
from pathlib import Path

from refdir.core.edits import Edit, apply_weights_, resolve
from refdir.core.gguf_plan import export_gguf_plan
from refdir.core.io import atomic_dir, atomic_write_json, check_replaceable
from refdir.core.model_files import gguf_file_of
from refdir.core.models import save_hf_checkpoint
from refdir.core.preflight import check_output
from refdir.core.rundir import RunDir
from refdir.core.spec import ModelSpec
from refdir.errors import RefdirError

# --point value: the edit `refdir run` chose (off the front when calibrated, with its second direction)
CHOSEN = "chosen"


def export_point(search_dir: str | Path, point: int | str, out: str | Path, *, force: bool = False,
                 model: dict | None = None) -> Path:
    """Write front point ``point`` of the search in run directory ``search_dir`` (or, with ``point="chosen"``, the
    edit ``refdir run`` chose and wrote as its checkpoint: a calibrated copy of a front point with its second
    direction, which no front index names) as an edited HF checkpoint in ``out``. The model is loaded as the search
    recorded it, with ``model``'s ModelSpec fields (e.g. ``{"dtype": "fp32"}``) replacing the recorded ones."""
    rd = RunDir(search_dir)
    f = rd.search_dir() / "front.json"
    cf = rd.search_dir() / "config.json"
    if not f.exists() or not cf.exists():
        raise RefdirError(f"{rd.path} holds no finished search (expected {f})")
    if Path(out).exists() and not force:
        raise RefdirError(f"output directory {out} already exists; pass --force to overwrite it")
    p = _point(rd, f, point)
    # the search's config holds its run config under "run", and that the model spec under "model"
    # (remote code and pickle loading only from ``model``, never from the search's files)
    run = _read(cf, "run", dict)
    if not isinstance(run.get("model"), dict):
        raise RefdirError(f"{cf}: the search's config has no model spec (run.model)")
    spec = ModelSpec.from_record(run["model"], model)
    edit = Edit.from_dict(p["edit"])
    cands = rd.candidates_with_sources()  # an edit of an optimized (rdo) or pca direction resolves too
    if str(out).endswith(".gguf"):
        return _export_gguf(spec, resolve(edit, cands), Path(out), force)
    # everything checked before the model is loaded and anything is written
    spec.check(chat=False)
    check_output(out, "dir", [rd.path, spec.model])
    if force:
        check_replaceable(out)
    lm = spec.load_model()
    summary = apply_weights_(lm.model, resolve(edit, cands))
    with atomic_dir(out, force=force) as tmp:
        save_hf_checkpoint(lm.model, lm.tokenizer, tmp)
        atomic_write_json(tmp / "refdir_edit.json", {
            "kind": "edit", "edit": edit.to_dict(), "describe": edit.describe(), "point": point,
            "trial": p["trial"], "proxy": {"refusal": p["proxy_refusal"], "kl": p["proxy_kl"]},
            "confirmed": p.get("confirmed"), "source_model": lm.model_id, **summary})
    return Path(out)


def _point(rd: RunDir, front: Path, point: int | str) -> dict:
    """The front point ``point`` (an index into ``front.json``), or the run's choice for ``"chosen"``."""
    if point == CHOSEN:
        f = rd.search_dir() / "summary.json"
        choice = _load(f).get("choice") if f.exists() else None
        if not isinstance(choice, dict) or not isinstance(choice.get("edit"), dict):
            raise RefdirError(f"{rd.path} holds no chosen edit (--point {CHOSEN} is for a directory written by "
                              "refdir run; a refdir search directory takes a front index)")
        return choice
    if not isinstance(point, int):
        raise RefdirError(f"--point takes a front index or {CHOSEN!r}, got {point!r}")
    pts = _read(front, "points", list)
    if not 0 <= point < len(pts):
        raise RefdirError(f"point {point} is not on the front (points 0..{len(pts) - 1})")
    return pts[point]


def _export_gguf(spec: ModelSpec, plan, out: Path, force: bool) -> Path:
    """The point written into a copy of the GGUF the search's model was loaded from: only the residual writers
    (and the embedding) are re-encoded, everything else is copied; the model is not loaded."""
    src = gguf_file_of(spec.model)
    if src is None:
        raise RefdirError(f"a .gguf output needs a GGUF model; the search's model {spec.model!r} is not one "
                          "(give an output directory for a Hugging Face checkpoint)")
    if not src.is_file():
        raise RefdirError(f"the search's model {src} does not exist")
    check_output(out, "file", [src])
    export_gguf_plan(src, plan, out, force=force)  # written atomically (as orthogonalize's GGUF output)
    return out


def _load(f: Path) -> dict:
    """The JSON object in the search's file ``f``; an unreadable file is one clear error."""
    try:
        obj = json.loads(f.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RefdirError(f"corrupt search file {f}: {e}") from e
    if not isinstance(obj, dict):
        raise RefdirError(f"corrupt search file {f}: not a JSON object")
    return obj


def _read(f: Path, key: str, kind: type):
    """``key`` of the JSON object in the search's file ``f``; an unreadable file or a missing key is one clear
    error."""
    obj = _load(f)
    if not isinstance(obj.get(key), kind):
        raise RefdirError(f"corrupt search file {f}: no {key!r} {kind.__name__}")
    return obj[key]
