"""The direction sources of ``refdir run``'s search stage beyond the difference-in-means candidates: the pca
source (a candidate off the harmless principal components) and the choice's second direction (the strongest other
candidate off its components, or the persona direction), each saved in the run's optimize directory."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from refdir.core import rundir as rdl
from refdir.core.data import embedded_opinion_questions
from refdir.core.directions import Candidates, Direction
from refdir.core.edits import Edit, Second, hooked, resolve
from refdir.core.forward import last_logits
from refdir.core.rundir import RunDir
from refdir.method import second_direction
from refdir.method.pca_direction import COMPONENTS, pca_direction, prompt_residuals
from refdir.method.scoring import first_token_kl
from refdir.method.search import CALIBRATE_MARGIN
from refdir.workflows.stages import Loaded

SECOND = "second"  # the optimize-directory name of the choice's second direction
CALIBRATION_PROMPTS = 80  # harmless train prompts whose first-token KL calibrates the pick (the proxy uses val)


@dataclass
class Prepared:
    """A run directory prepared by ``refdir run``'s first stages, and the (lazily loaded) model."""

    rd: RunDir
    m: Loaded
    sets: dict
    ids: list[int]
    filt: dict
    cands: Candidates
    # (prompts, the base model's first-token log-probabilities on them) where the search's confirmation computed
    # them: its calibration prompts, which the second direction's calibration reads again
    base_logp: tuple[tuple[str, ...], torch.Tensor] | None = None
    # (prompts, their residuals at every post-instruction position and layer): the pca source's fit, which the
    # second direction's pca fit reads again (the same prompts and batches, so the same numbers)
    pca_acts: tuple[tuple[str, ...], torch.Tensor] | None = None

    def pca_residuals(self, prompts: list[str], progress: bool = True) -> torch.Tensor:
        """:func:`refdir.method.pca_direction.prompt_residuals` of ``prompts``, computed once per process."""
        if self.pca_acts is None or self.pca_acts[0] != tuple(prompts):
            self.pca_acts = (tuple(prompts), prompt_residuals(self.m.lm.model, self.m.fmt, prompts, progress=progress))
        return self.pca_acts[1]


def pca_prompts(harmless: list[str], calibration: list[str]) -> list[str]:
    """The (filtered) harmless train prompts a source's principal components are fitted on: those the calibration
    does not read, so that its KL is not measured on the prompts the direction was fitted to (all of them when fewer
    than 4 per component remain)."""
    used = set(calibration)
    prompts = [x for x in harmless if x not in used]
    return prompts if len(prompts) >= 4 * COMPONENTS else harmless


def pca_source(p: Prepared, lead: dict, calibration: list[str], progress: bool = True,
               name: str = "pca") -> torch.Tensor:
    """``--direction-method pca``: the lead candidate off the top principal components of harmless activations
    (:mod:`refdir.method.pca_direction`), fitted on :func:`pca_prompts`. Saved in the run's optimize directory as source ``name``,
    where :meth:`RunDir.source` reads it back. Returns the direction [d] (the candidate's norm)."""
    d = p.cands.get(lead["position"], int(lead["layer"]))
    prompts = pca_prompts(p.filt["train"]["harmless"], calibration)
    v = pca_direction(p.m.lm.model, p.m.fmt, d.vector, prompts, d.position, d.layer, progress=progress,
                      acts=p.pca_residuals(prompts, progress))
    meta = {"source": name, "components": COMPONENTS, "n_prompts": len(prompts)}
    Direction(v, d.layer, d.position, d.model_id, "raw", meta).save(p.rd.source_path(name))
    return v


def persona_source(p: Prepared, calibration: list[str], progress: bool = True) -> tuple[torch.Tensor | None, dict]:
    """``--second-source persona``: the persona direction (:func:`refdir.method.second_direction.persona_contrast`,
    the embedded opinion questions against the harmless train prompts the calibration does not read) at the last
    post-instruction position and ``PERSONA_LAYER_FRAC`` of the depth, off the harmless principal components there
    as the pca source, saved as the run's second direction. Returns it (None when too few questions drew a
    disclaimer) and what was counted."""
    model, fmt = p.m.lm.model, p.m.fmt
    layer = min(p.cands.n_layers, max(1, round(second_direction.PERSONA_LAYER_FRAC * p.cands.n_layers)))
    used = set(calibration)
    harmless = [x for x in p.sets["harmless"]["train"] if x not in used]
    raw, info = second_direction.persona_contrast(model, fmt, embedded_opinion_questions(), harmless, layer,
                                                  progress=progress)
    info = {**info, "position": -1, "layer": layer}
    if raw is None:
        return None, info
    prompts = pca_prompts(p.filt["train"]["harmless"], calibration)
    v = pca_direction(model, fmt, raw, prompts, -1, layer, progress=progress, acts=p.pca_residuals(prompts, progress))
    meta = {"source": SECOND, "kind": "persona", "components": COMPONENTS, "n_prompts": len(prompts), **info}
    Direction(v, layer, -1, p.cands.model_id, "raw", meta).save(p.rd.source_path(SECOND))
    return v, info


def add_second(p: Prepared, choice: dict, sdir: Path, calibration: list[str], target: float, bs: int,
               progress: bool = True, source: str = "strong") -> dict:
    """The choice with a second direction (:mod:`refdir.method.second_direction`) where its calibration KL leaves
    room, at its strength, lowered once (KL about the square of the strength) towards ``CALIBRATE_MARGIN·target``
    when the calibration KL would pass the target; dropped if it still would. ``source``: ``strong``, the
    selection's strongest other candidate off its harmless components; ``persona``, the contrast of the embedded
    opinion questions the model answers with a disclaimer against plain harmless answers (:func:`persona_source`).
    Reads only the calibration prompts (harmless train), the other harmless train prompts and the selection (or the
    embedded questions); ``choice["second"]`` records what was measured and decided."""
    if not choice["met"]:
        return {**choice, "second": {"added": False, "why": "the choice is not under the target"}}
    edit = Edit.from_dict(choice["edit"])
    if source == "persona":
        v, row = persona_source(p, calibration, progress)
        if v is None:
            return {**choice, "second": {"added": False, "source": source, **row}}
    else:
        sel = json.loads((sdir / rdl.SEARCH_SELECTION_FILE).read_text())
        row = second_direction.strongest(sel["table"], _own_candidates(p.rd, edit))
        if row is None:
            return {**choice, "second": {"added": False, "why": "no other scored candidate"}}
        v = pca_source(p, row, calibration, progress, name=SECOND)
    p.cands = p.cands.with_optimized(SECOND, v)
    cos = abs(float(torch.nn.functional.cosine_similarity(v.double(), resolve(edit, p.cands).r.double(), dim=0)))
    if cos > second_direction.MAX_COS or not float(v.norm()) > 0:
        why = f"the {source} second direction is zero or the chosen direction again (|cos| {cos:.3f})"
        return {**choice, "second": {"added": False, "why": why, "source": source, "position": row["position"],
                                     "layer": row["layer"]}}
    model, fmt = p.m.lm.model, p.m.fmt
    if p.base_logp is not None and p.base_logp[0] == tuple(calibration):
        base = p.base_logp[1]
    else:
        base = torch.log_softmax(last_logits(model, fmt, calibration, bs, shared_prefix=True).double(), -1)

    def kl(e: Edit) -> float:
        with hooked(model, resolve(e, p.cands)):
            return float(first_token_kl(base, last_logits(model, fmt, calibration, bs, shared_prefix=True)).mean())

    # the choice's own calibration KL was measured by the confirmation on these prompts (``val``)
    k0 = choice["val"]["kl"] if choice.get("val") else kl(edit)
    s = second_direction.STRENGTH
    tried = []
    while s is not None:
        e2 = replace(edit, second=Second(SECOND, round(s, 4)))
        k = kl(e2)
        tried.append({"strength": round(s, 4), "calibration_kl": k})
        if k <= target:
            out = {"added": True, "strength": round(s, 4), "calibration_kl": k}
            break
        s = None if len(tried) > 1 else second_direction.rescaled(s, k0, k, CALIBRATE_MARGIN * target)
    else:
        out = {"added": False, "why": "no strength keeps the calibration KL under the target"}
    info = {**out, "source": source, **{k: row[k] for k in ("position", "layer", "bypass", "n_questions", "n_plain")
                                         if k in row}, "calibration_kl_before": k0, "tried": tried}
    if not out["added"]:
        return {**choice, "second": info}
    return {**choice, "edit": e2.to_dict(), "describe": e2.describe(), "second": info}


def _own_candidates(rd: RunDir, edit: Edit) -> set[tuple[int, int]]:
    """The (position, layer) candidates an edit is made of: the one it is applied at and, for a direction source
    (rdo, pca), the candidate that source was made from; the second direction is taken from none of them."""
    own = {(edit.position, int(round(edit.layer)))}
    f = rd.source_path(edit.direction) if edit.direction in rdl.SOURCES else None
    if f is not None and f.exists():
        d = Direction.load(f)
        own.add((d.position, d.layer))
    return own
