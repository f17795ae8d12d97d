"""Shape checks of a run directory's JSON files, applied by their readers in :class:`refdir.core.rundir.RunDir`.

refdir writes every run file whole (atomically), so a file of the wrong shape was edited by hand, damaged or written
by something else. Read unchecked, it failed far from its cause, as a traceback in the middle of an analysis
(``sets.json`` a list: "list indices must be integers"; a refusal token id outside the vocabulary: an index error in
a forward pass). Each check here raises one RefdirError that names the file and says what is wrong in it, when the
file is read: before the model loads, except the vocabulary check (:func:`token_ids`), which needs the model.
"""

from __future__ import annotations

from pathlib import Path

from refdir.core.io import read_json_object
from refdir.core.spec import KINDS
from refdir.errors import RefdirError


def model_name(config: dict) -> str | None:
    """The model string of a run's config.json (nested ``{"model": {"model": ...}}``, or an older flat one)."""
    m = config.get("model")
    return m.get("model") if isinstance(m, dict) else m


def located(rec: dict, manifest: dict | None) -> dict:
    """A run's model record, its local model path resolved against the directory the run was started from (the
    manifest's ``cwd``) when the path is relative and not found from here but is from there: analyze or optimize
    started from another directory load the model the run loaded. Hub ids and the embedded model are left alone
    (the manifest's ``model.kind`` says which the run loaded)."""
    m, info = rec.get("model"), manifest or {}
    cwd, kind = info.get("cwd"), (info.get("model") or {}).get("kind")
    if (isinstance(m, str) and isinstance(cwd, str) and kind in ("dir", "gguf") and not Path(m).is_absolute()
            and not Path(m).exists() and (Path(cwd) / m).exists()):
        return {**rec, "model": str(Path(cwd) / m)}
    return rec


def corrupt(path: Path, why: str) -> RefdirError:
    """The error of a run file that does not hold what refdir wrote there (worded as
    :func:`refdir.core.io.read_json_object`'s)."""
    return RefdirError(f"corrupt run file {path}: {why}")


def _object(obj, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise corrupt(path, "not a JSON object")
    return obj


def is_number(v) -> bool:
    """Whether JSON value ``v`` is a number (``true``/``false`` are not)."""
    return not isinstance(v, bool) and isinstance(v, int | float)


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _nested(obj, path: Path, outer: tuple[str, ...], inner: tuple[str, ...]) -> dict:
    """``obj`` when it is an object of objects whose ``outer`` / ``inner`` entries are lists of prompts."""
    _object(obj, path)
    for a in outer:
        if not isinstance(obj.get(a), dict):
            raise corrupt(path, f"{a!r} is missing or not a JSON object")
        for b in inner:
            if not _strings(obj[a].get(b)):
                raise corrupt(path, f"{a}.{b} is missing or not a list of prompts (strings)")
    return obj


def prompt_sets(obj, path: Path) -> dict:
    """``data/sets.json``: per kind (harmful, harmless) an object whose train, val and test are lists of prompts."""
    return _nested(obj, path, KINDS, ("train", "val", "test"))


def filtered_sets(obj, path: Path) -> dict:
    """``filter/filtered.json``: per split (train, val) an object whose harmful and harmless are lists of prompts."""
    return _nested(obj, path, ("train", "val"), KINDS)


def refusal_tokens(obj, path: Path) -> dict:
    """``refusal_tokens/tokens.json``: an object whose ``ids`` are a non-empty list of token ids (non-negative
    integers; :func:`token_ids` checks them against the model's vocabulary once it is loaded)."""
    ids = _object(obj, path).get("ids")
    if not isinstance(ids, list) or not ids or not all(type(i) is int and i >= 0 for i in ids):
        raise corrupt(path, "'ids' is missing or not a non-empty list of token ids")
    return obj


def token_ids(ids: list[int], n_vocab: int, path: Path) -> list[int]:
    """``ids``, read from ``path``, when each is a token of a vocabulary of ``n_vocab`` (the model's logits)."""
    bad = [i for i in ids if not 0 <= i < n_vocab]
    if bad:
        raise corrupt(path, f"token id {bad[0]} is outside the model's vocabulary of {n_vocab} tokens")
    return ids


def coeff(obj, path: Path) -> dict:
    """``coeff/coeff.json``: an object whose ``coeff`` is a number (or null: none was chosen)."""
    c = _object(obj, path).get("coeff")
    if c is not None and not is_number(c):
        raise corrupt(path, "'coeff' is not a number")
    return obj


def completions(obj, path: Path) -> dict:
    """``eval/completions.json``: an object whose ``completions`` (per arm) and, where present, ``prompts`` (per
    kind) are objects of lists of strings."""
    for part in ("completions", "prompts"):
        v = _object(obj, path).get(part, {} if part == "prompts" else None)
        if not isinstance(v, dict) or not all(_strings(x) for x in v.values()):
            raise corrupt(path, f"{part!r} is missing or not an object of lists of strings")
    return obj


def search_lead(obj, path: Path) -> dict | None:
    """The row of ``search/selection.json`` that stands for a searched run's direction: its ``chosen`` candidate,
    else its ``lead``; each, when there, an object with a ``position`` and a ``layer`` (integers)."""
    row = _object(obj, path).get("chosen") or obj.get("lead")
    if row is not None and not (isinstance(row, dict) and all(type(row.get(k)) is int for k in ("position", "layer"))):
        raise corrupt(path, "its chosen or lead candidate has no integer position and layer")
    return row


def check_chain(records: list[tuple[str, dict | None]], search_summary: Path, path: Path) -> None:
    """Refuse a run directory whose stages were not computed one from another: a rerun with other settings that
    was interrupted leaves its new stages beside the old later ones (the rerun itself redoes those, but a reader
    such as analyze or optimize would take the mix for one run). ``records``: the stages' ``stage.json`` in
    order (None where a stage is absent), each holding the key of the stage it was computed from (``up``; stages
    written before that was recorded are taken as they are); ``search_summary``: the run's search summary file,
    which holds the key of the candidates it searched."""
    prev = None
    for name, rec in records:
        if rec is not None and prev is not None and rec.get("up") not in (None, _chained(prev[1])):
            raise _mixed(path, name, prev[0])
        prev = (name, rec) if rec is not None else None
    cands = dict(records).get("candidates")
    search = read_json_object(search_summary, "run file") if search_summary.exists() else None
    if search is not None and cands is not None and search.get("candidates_key") not in (None, _chained(cands)):
        raise _mixed(path, "search", "candidates")


def _chained(rec: dict) -> str | None:
    """The part of a stage's key that the next stage chains on: a ``+`` suffix hashes files of the stage's own that
    no later stage reads (the data stage's held-out sets)."""
    k = rec.get("key")
    return k.partition("+")[0] if isinstance(k, str) else k


def _mixed(path: Path, stage: str, upstream: str) -> RefdirError:
    return RefdirError(f"{path} mixes two runs: its {stage} stage was computed from other {upstream} than those "
                       "there now (a rerun with other settings was interrupted); run that command again to finish "
                       "it first")
