"""The stages of ``refdir run`` as functions: values in, values out, each cached in its run-directory stage.

Every stage takes the run directory, the run's config, the model (a :class:`Loaded`, loaded on first use) and
the values of the stages before it; it returns its own values. A stage whose key matches the one on disk is
not recomputed: its values are read back, and the model is not loaded for it. ``refdir search`` and
``refdir extract`` reuse the preparation stages (data, refusal tokens, filter, candidates).

    data → refusal_tokens → filter → candidates → selection → coeff → eval → checkpoint
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, fields
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from refdir.core import rundir as rdl
from refdir.core.activations import residual_batches, residuals
from refdir.core.directions import Candidates, Direction
from refdir.core.fingerprint import data_sha256, model_sha256
from refdir.core.generation import generate
from refdir.core.interventions import ablate, add
from refdir.core.io import atomic_write_json, atomic_write_text
from refdir.core.orthogonalize import save_orthogonalized
from refdir.core.rundir import RunDir, save_filter_means
from refdir.core.spec import HELDOUT_FIELDS, HELDOUT_SOURCES, KINDS, DataSpec, ModelSpec
from refdir.errors import RefdirError
from refdir.method.refusal_judge import judge_all
from refdir.method.scoring import derive_refusal_tokens, refusal_metric_from_logits, tokens_from_strings
from refdir.method.selection import (
    CandidateScore,
    Selection,
    SelectionConfig,
    apply_filters,
    score_candidates,
)
from refdir.workflows.loaded import Loaded

console = Console(stderr=True)


class RunConfig(BaseModel):
    """Everything ``refdir run`` depends on: the model, the data and the settings of each stage."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    # "search": selection, then a Pareto search over edits within `budget` seconds, the point for `kl_target`;
    # "paper": the paper's single difference-in-means direction, addition coefficient and orthogonalization
    method: Literal["search", "paper"] = "search"
    kl_target: float = Field(0.05, gt=0, allow_inf_nan=False)
    budget: float = Field(60.0, gt=0)  # seconds of search trials (refinement included); a bigger one extends
    # the search's directions: "dim" the difference-in-means candidates; "rdo" also an optimized direction trained
    # from the selected one (minutes); "pca" also the selected one off the harmless principal components (seconds)
    direction_method: Literal["dim", "rdo", "pca"] = "dim"
    second_direction: bool = False  # with the search: workflows.sources.add_second on the choice, from this source:
    second_source: Literal["strong", "persona"] = "strong"
    filter_train: bool = True  # keep harmful with metric > 0, harmless with metric < 0 (paper)
    filter_val: bool = False
    refusal_tokens: list[str] | None = None  # default: derived from the model's own refusals
    batch_size: int = Field(32, ge=1)
    max_layer_frac: float = Field(0.8, gt=0, le=1)  # selection, from here to top_k
    kl_max: float = Field(0.1, gt=0)  # inf: no KL filter
    induce_rule: Literal["paper", "relative", "auto"] = "auto"
    induce_rel_frac: float = 0.5
    positions: list[int] | None = None  # default: every post-instruction position
    exhaustive: bool = False  # fully score every candidate instead of screening
    screen_n: int = Field(8, ge=1)
    top_k: int = Field(12, ge=1)
    max_new_tokens: int = Field(128, ge=1)  # evaluation, from here on
    gen_batch_size: int = Field(40, ge=1)
    judge: Literal["broad", "paper", "wide"] = "broad"
    add_coeffs: list[float] = Field([1.0, 1.25, 1.5, 2.0, 2.5, 3.0], min_length=1)
    add_target: float = Field(0.9, gt=0, le=1)  # share of harmless val prompts whose metric must be > 0
    save_checkpoint: bool = True

    def settings(self, stage: str) -> dict:
        """The config values ``stage``'s key hashes (under their flat names, so keys match earlier runs), and the
        content hashes of the files it reads: the local data files (data), the local model's files (refusal
        tokens, and through the chained keys every later stage). The embedded sets and model add none."""
        # the held-out sets decide only the data stage's files and the eval (heldout_settings): defaults here
        data = self.data.without_heldout()
        flat = {**data.model_dump(), **self.model.model_dump(), **self.model_dump(exclude={"model", "data"})}
        out = {k: flat[k] for k in STAGE_SETTINGS[stage]}
        files = data_sha256(self.data) if stage == rdl.DATA else None
        if stage == rdl.REFUSAL_TOKENS:
            files = model_sha256(self.model.model)
        if files:
            out["files_sha256"] = files
        return out

    def heldout_settings(self) -> dict | None:
        """What the held-out sets are (their sources, how many prompts, the content of local files), or None when
        none is given. They are read by the data stage and judged by the eval, but nothing is built or chosen from
        them: they are in the key of the data stage's files and of the eval, not in the chain of keys the stages
        between hash (a new held-out set redoes neither the search nor the candidates)."""
        if not (self.data.heldout_harmful or self.data.heldout_harmless):
            return None
        out = {k: getattr(self.data, k) for k in HELDOUT_FIELDS}
        files = data_sha256(self.data, HELDOUT_SOURCES)
        return out | {"files_sha256": files} if files else out

    def selection_config(self) -> SelectionConfig:
        return SelectionConfig(max_layer_frac=self.max_layer_frac, kl_max=self.kl_max, induce_rule=self.induce_rule,
                               induce_rel_frac=self.induce_rel_frac, batch_size=self.batch_size,
                               exhaustive=self.exhaustive, screen_n=self.screen_n, top_k=self.top_k)


# per stage, the settings its key depends on (besides the key of the stage before it)
STAGE_SETTINGS: dict[str, list[str]] = {
    rdl.DATA: list(DataSpec.model_fields),
    rdl.REFUSAL_TOKENS: ["model", "dtype", "refusal_tokens", "system", "chat_template"],
    rdl.FILTER: ["filter_train", "filter_val"],
    rdl.CANDIDATES: ["batch_size"],
    rdl.SELECTION: ["max_layer_frac", "kl_max", "induce_rule", "induce_rel_frac", "positions", "exhaustive",
                    "screen_n", "top_k"],
    rdl.COEFF: ["add_coeffs", "add_target"],
    rdl.EVAL: ["max_new_tokens", "judge"],
    rdl.CHECKPOINT: ["save_checkpoint"],
}


def judged(outs: list[str], headline: str) -> dict:
    """The headline, broad and paper judges' refusal scores of a set of completions; the degenerate count and
    the per-completion flags come from the headline judge."""
    j = judge_all(outs, headline)
    return {"refusal": j["headline"].refusal, "refusal_broad": j["broad"].refusal, "refusal_paper": j["paper"].refusal,
            "degenerate": j["headline"].n_degenerate, "n": j["headline"].n, "flags": j["headline"].flags}


# ------------------------------------------------------------------------------------------ preparation


def stage_data(rd: RunDir, cfg: RunConfig, sets: dict | None = None) -> dict:
    """The harmful/harmless train/val/test prompts (:meth:`DataSpec.split`; ``sets`` when the caller already
    split them, to check them before the run directory was created)."""
    key = rd.key(rdl.DATA, cfg.settings(rdl.DATA))  # what the later stages chain on
    held = cfg.heldout_settings()
    if held is not None:  # the stage's own files hold the held-out prompts too
        key += "+" + hashlib.sha256(json.dumps(held, sort_keys=True).encode()).hexdigest()[:16]
    if not rd.done(rdl.DATA, key):
        sets = sets if sets is not None else cfg.data.split()
        with rd.write_stage(rdl.DATA, key) as d:
            atomic_write_json(d / rdl.SETS_FILE, sets)
    return rd.sets()


def stage_refusal_tokens(rd: RunDir, cfg: RunConfig, m: Loaded, sets: dict, progress: bool = True) -> list[int]:
    """The refusal token ids: the configured strings' tokens, else those the model starts its refusals with."""
    key = rd.key(rdl.REFUSAL_TOKENS, cfg.settings(rdl.REFUSAL_TOKENS))
    if not rd.done(rdl.REFUSAL_TOKENS, key):
        tok = m.lm.tokenizer
        if cfg.refusal_tokens:
            ids = tokens_from_strings(tok, cfg.refusal_tokens)
            ev = {"source": "user", "strings": cfg.refusal_tokens}
        else:
            ids, ev = derive_refusal_tokens(m.lm.model, m.fmt, sets["harmful"]["train"], n_prompts=32,
                                            batch_size=cfg.batch_size, progress=progress)
            ev["source"] = "derived"
        with rd.write_stage(rdl.REFUSAL_TOKENS, key) as d:
            atomic_write_json(d / rdl.TOKENS_FILE, {"ids": ids, "tokens": [tok.decode([i]) for i in ids],
                                                    "evidence": ev})
    return rd.refusal_ids()


def stage_filter(rd: RunDir, cfg: RunConfig, m: Loaded, sets: dict, ids: list[int],
                 progress: bool = True) -> tuple[dict, dict]:
    """Keep harmful prompts with metric > 0 and harmless ones with metric < 0 (the paper's filter), per split as
    configured. Returns the kept prompts ``{split: {kind: [...]}}`` and the mean train residuals of the kept
    prompts ``{kind: tensor}``: the train pass captures them, so that :func:`stage_candidates` needs no second
    pass, and the stage saves them, so that a resumed run's candidates are the very same. Both are read back
    from the stage's files, whether computed now or cached."""
    key = rd.key(rdl.FILTER, cfg.settings(rdl.FILTER))
    if rd.done(rdl.FILTER, key) and rd.filter_means() is not None:
        return rd.filtered(), rd.filter_means()
    out: dict = {}
    info: dict = {}
    means = None
    for split, on in (("train", cfg.filter_train), ("val", cfg.filter_val)):
        if split == "val" and not on:
            out[split] = {k: sets[k][split] for k in KINDS}
            info[split] = {"filtered": False, "harmful_kept": len(out[split]["harmful"]),
                           "harmless_kept": len(out[split]["harmless"])}
            continue
        kept, counts, fallback, sums = _filter_split(cfg, m, sets, ids, split, on, progress)
        if fallback:
            info[f"{split}_fallback"] = "unfiltered (too few passed)"
        out[split], info[split] = kept, counts
        if split == "train":
            subset = "all" if fallback else "kept"
            means = {kind: sums[kind][subset] for kind in KINDS}
    if means is None or any(v is None for v in means.values()):
        raise RefdirError("the filter's train pass left a prompt set empty; no residual means to save")
    with rd.write_stage(rdl.FILTER, key) as d:
        atomic_write_json(d / rdl.FILTERED_FILE, out)
        atomic_write_json(d / rdl.FILTER_INFO_FILE, info)
        save_filter_means(d, means)
    return rd.filtered(), rd.filter_means()


def _filter_split(cfg: RunConfig, m: Loaded, sets: dict, ids: list[int], split: str, on: bool, progress: bool):
    """One split of the filter: (kept prompts per kind, counts and metric means, whether it fell back to the
    unfiltered set, and on train the residual means per kind and subset)."""
    kept, metrics, sums = {}, {}, {}
    for kind, sign in (("harmful", 1.0), ("harmless", -1.0)):
        prompts = sets[kind][split]
        if split == "train":
            x, sums[kind] = metric_and_means(m, prompts, ids, sign if on else None, cfg.batch_size,
                                             f"{kind} train (metric + activations)", progress)
        else:
            x = m.metric(prompts, ids, cfg.batch_size)
        if any(not math.isfinite(v) for v in x):
            raise RefdirError("non-finite refusal metric on the data: the model produces NaN logits")
        metrics[kind] = x
        kept[kind] = [p for p, v in zip(prompts, x, strict=True) if sign * v > 0 or not on]
    h, b = kept["harmful"], kept["harmless"]
    fallback = on and (len(h) < 4 or len(b) < 4)
    if fallback:
        console.print(f"[yellow]filter kept only {len(h)} harmful / {len(b)} harmless {split} prompts; "
                      "keeping the unfiltered set instead[/]")
        h, b = sets["harmful"][split], sets["harmless"][split]
    hm, bm = metrics["harmful"], metrics["harmless"]
    info = {"harmful_kept": len(h), "harmful_total": len(hm), "harmless_kept": len(b), "harmless_total": len(bm),
            "harmful_metric_mean": sum(hm) / len(hm), "harmless_metric_mean": sum(bm) / len(bm)}
    return {"harmful": h, "harmless": b}, info, fallback, sums


def metric_and_means(m: Loaded, prompts: list[str], ids: list[int], sign: float | None, batch_size: int,
                     desc: str, progress: bool = True) -> tuple[list[float], dict]:
    """One pass over ``prompts``: the refusal metric of each, and the mean residuals (float64, every
    post-instruction position and layer) of all of them and of those the filter keeps (``sign · metric > 0``;
    all of them when ``sign`` is None), as ``{"all": mean, "kept": mean}`` (None for an empty subset)."""
    tot = {"all": None, "kept": None}
    n = {"all": 0, "kept": 0}
    metric = [0.0] * len(prompts)
    for idx, stack, lg in residual_batches(m.lm.model, m.fmt, prompts, n_pos=m.fmt.n_post, batch_size=batch_size,
                                           shared_prefix=True, logits=True, desc=desc, progress=progress):
        x = refusal_metric_from_logits(lg, ids).tolist()
        for j, i in enumerate(idx):
            metric[i] = x[j]
        keep = torch.tensor([sign is None or sign * v > 0 for v in x])
        for part, sel in (("all", torch.ones_like(keep)), ("kept", keep)):
            if sel.any():
                s = stack[sel].to(torch.float64).sum(0)
                tot[part] = s if tot[part] is None else tot[part] + s
                n[part] += int(sel.sum())
    return metric, {p: (tot[p] / n[p] if n[p] else None) for p in tot}


def mean_residuals(m: Loaded, prompts: list[str], batch_size: int, desc: str, progress: bool = True,
                   shared_prefix: bool = True) -> torch.Tensor:
    """The mean residual stream of ``prompts`` at every post-instruction position and layer."""
    mean, _ = residuals(m.lm.model, m.fmt, prompts, batch_size=batch_size, desc=desc, progress=progress,
                        shared_prefix=shared_prefix)
    return mean


def stage_candidates(rd: RunDir, cfg: RunConfig, m: Loaded, filt: dict, means: dict | None = None,
                     progress: bool = True) -> Candidates:
    """Difference-in-means candidates from the filter stage's saved residual means (``means`` as
    :func:`stage_filter` returns them, else read from the run directory): computed once, by the filter's pass,
    so a run resumed between the two stages gives the very same candidates."""
    key = rd.key(rdl.CANDIDATES, cfg.settings(rdl.CANDIDATES))
    if not rd.done(rdl.CANDIDATES, key):
        tr = filt["train"]
        means = means if means is not None else rd.filter_means()
        if means is None:
            raise RefdirError(f"{rd.path}: the filter stage saved no residual means; run the filter stage first")
        c = Candidates.from_means(means["harmful"], means["harmless"], m.lm.model_id, {
            "post_instruction_tokens": m.fmt.post_instruction_tokens(),
            "n_harmful": len(tr["harmful"]), "n_harmless": len(tr["harmless"])})
        with rd.write_stage(rdl.CANDIDATES, key) as d:
            c.save(d)
    return rd.candidates()


# ------------------------------------------------------------------------------------------ selection on


def stage_selection(rd: RunDir, cfg: RunConfig, m: Loaded, filt: dict, cands: Candidates, ids: list[int],
                    progress: bool = True) -> tuple[Selection, Direction | None]:
    """Score the candidates on the val prompts and pick the direction (:func:`score_candidates`); the selection is
    rebuilt from the saved scores, and the direction is None when every candidate was filtered out."""
    scfg = cfg.selection_config()
    key = rd.key(rdl.SELECTION, cfg.settings(rdl.SELECTION))
    if not rd.done(rdl.SELECTION, key):
        c = cands
        if cfg.positions:
            keep = [c.positions.index(p) for p in cfg.positions]
            c = Candidates(c.vectors[keep], c.harmful_mean[keep], c.harmless_mean[keep],
                           [c.positions[k] for k in keep], c.model_id, c.meta)
        sel = score_candidates(m.lm.model, m.fmt, c, filt["val"]["harmful"], filt["val"]["harmless"], ids, scfg,
                               progress=progress)
        with rd.write_stage(rdl.SELECTION, key) as d:
            _write_selection(d, sel, cands)
    meta = rd.selection_meta()
    names = [f.name for f in fields(CandidateScore)]
    scores = [CandidateScore(**{k: r[k] for k in names if k in r}) for r in rd.selection_table()]
    sel = apply_filters(scores, meta["baseline"], scfg, cands.n_layers)
    if meta["chosen"] is None:
        return sel, None
    return sel, rd.direction()


def _write_selection(d, sel: Selection, cands: Candidates) -> None:
    """The selection stage's files: the score table (JSON and CSV), the pick and the chosen direction."""
    rows = sel.table()
    atomic_write_json(d / rdl.TABLE_FILE, rows)
    cols = ["position", "layer", "bypass", "induce", "kl", "ok", "filtered", "bypass_screen", "kl_screen"]
    atomic_write_text(d / rdl.TABLE_CSV_FILE, ",".join(cols) + "\n" + "\n".join(
        ",".join(str(r[k]) if k != "filtered" else '"' + ";".join(r[k]) + '"' for k in cols)
        for r in rows) + "\n")
    atomic_write_json(d / rdl.SELECTION_FILE, {
        "chosen": asdict(sel.chosen) if sel.chosen else None, "rule": sel.rule,
        "baseline": sel.baseline, "filter_counts": sel.filter_counts, "config": sel.config,
        "diagnostic": None if sel.chosen else sel.diagnostic()})
    if sel.chosen:
        direction = cands.get(sel.chosen.position, sel.chosen.layer)
        direction.meta.update(bypass=sel.chosen.bypass, induce=sel.chosen.induce, kl=sel.chosen.kl, rule=sel.rule)
        direction.save(d / rdl.DIRECTION_NAME)


def stage_coeff(rd: RunDir, cfg: RunConfig, m: Loaded, filt: dict, direction: Direction | None,
                ids: list[int]) -> dict | None:
    """The addition coefficient: the smallest on the grid whose addition makes the refusal metric positive on
    ``add_target`` of the harmless val prompts (else the grid's best). None without a direction."""
    key = rd.key(rdl.COEFF, cfg.settings(rdl.COEFF))
    if direction is None:
        return None
    if not rd.done(rdl.COEFF, key):
        prompts = filt["val"]["harmless"]
        curve = []
        chosen = None
        for c in cfg.add_coeffs:
            with add(m.lm.model, direction.vector, direction.layer, c):
                x = m.metric(prompts, ids, cfg.batch_size)
            share = sum(v > 0 for v in x) / len(x)
            curve.append({"coeff": c, "mean_metric": sum(x) / len(x), "share_positive": share})
            if share >= cfg.add_target:
                chosen = c
                break
        if chosen is None:
            chosen = max(curve, key=lambda r: r["share_positive"])["coeff"]
        with rd.write_stage(rdl.COEFF, key) as d:
            atomic_write_json(d / rdl.COEFF_FILE, {"coeff": chosen, "curve": curve,
                                                   "rule": f"smallest coefficient with metric > 0 on "
                                                           f">= {cfg.add_target:.0%} of harmless val"})
    return rd.coeff()


# ------------------------------------------------------------------------------------------ evaluation


def stage_eval(rd: RunDir, cfg: RunConfig, m: Loaded, sets: dict, direction: Direction | None, coeff: float | None,
               ids: list[int], progress: bool = True) -> dict:
    """Generate on the test prompts (baseline; with a direction also ablation and addition at ``coeff``), judge
    the completions, and record the refusal metric per set for the report's histogram. Returns the judged
    scores per arm (``"baseline/harmful"`` ...)."""
    key = rd.key(rdl.EVAL, cfg.settings(rdl.EVAL))
    if not rd.done(rdl.EVAL, key):
        model = m.lm.model
        H, B = sets["harmful"]["test"], sets["harmless"]["test"]

        def g(name, prompts):
            return generate(model, m.fmt, prompts, max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.gen_batch_size, progress=progress, desc=name)

        gen = {"baseline/harmful": g("baseline harmful", H), "baseline/harmless": g("baseline harmless", B)}
        if direction is not None:
            with ablate(model, direction.vector):
                gen["ablation/harmful"] = g("ablation harmful", H)
                gen["ablation/harmless"] = g("ablation harmless", B)
            with add(model, direction.vector, direction.layer, coeff or 1.0):
                gen["addition/harmless"] = g("addition harmless", B)
        scores = {k: judged(outs, cfg.judge) for k, outs in gen.items()}
        # metric histograms (first-answer-position log-odds) for the report
        hist = {"harmful": m.metric(H, ids, cfg.batch_size), "harmless": m.metric(B, ids, cfg.batch_size)}
        if direction is not None:
            with ablate(model, direction.vector):
                hist["harmful (ablation)"] = m.metric(H, ids, cfg.batch_size)
            with add(model, direction.vector, direction.layer, coeff or 1.0):
                hist["harmless (addition)"] = m.metric(B, ids, cfg.batch_size)
        with rd.write_stage(rdl.EVAL, key) as d:
            atomic_write_json(d / rdl.COMPLETIONS_FILE, {"prompts": {"harmful": H, "harmless": B},
                                                         "completions": gen})
            atomic_write_json(d / rdl.SCORES_FILE, scores)
            atomic_write_json(d / rdl.METRICS_FILE, hist)
    return rd.scores()


def stage_checkpoint(rd: RunDir, cfg: RunConfig, m: Loaded, sets: dict, direction: Direction | None,
                     progress: bool = True) -> dict | None:
    """Orthogonalize the loaded model in place (the direction projected out of the weights; no second copy),
    save it and judge its completions on the harmful test prompts. None without a direction or with
    ``save_checkpoint`` off."""
    if direction is None or not cfg.save_checkpoint:
        return None
    key = rd.key(rdl.CHECKPOINT, cfg.settings(rdl.CHECKPOINT))
    if not rd.done(rdl.CHECKPOINT, key):
        lm = m.lm
        with rd.write_stage(rdl.CHECKPOINT, key) as d:
            # the loaded model is orthogonalized in place (one copy in memory), so this is the last model stage
            save_orthogonalized(lm.model, lm.tokenizer, direction.vector, d / rdl.CHECKPOINT_MODEL_DIR, force=True,
                                meta={"direction": {"layer": direction.layer, "position": direction.position},
                                      "source_model": lm.model_id})
            m.edited = True
            outs = generate(lm.model, m.fmt, sets["harmful"]["test"], max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.gen_batch_size, progress=progress, desc="checkpoint harmful")
            res = {k: v for k, v in judged(outs, cfg.judge).items() if k != "flags"}
            res["path"] = rd.relative(rd.checkpoint_model_dir())
            atomic_write_json(d / rdl.CHECKPOINT_EVAL_FILE, {**res, "completions": outs})
    return rd.checkpoint_eval()
