"""``refdir run``: the staged pipeline from a model to a selected direction, an evaluation, an
orthogonalized checkpoint and a report.

Stages (one directory each under the run dir, each with ``stage.json`` holding its key):

    data → refusal_tokens → filter → candidates → selection → coeff → eval → checkpoint → report

A stage's key hashes the part of the config it depends on and its upstream keys; rerunning
the same command skips stages whose key matches and recomputes the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from rich.console import Console

from refdir.core.activations import residual_batches, residuals
from refdir.core.chat import ChatFormat
from refdir.core.data import embedded, load_instructions, sample
from refdir.core.directions import Candidates, Direction
from refdir.core.generation import generate
from refdir.core.interventions import ablate, add
from refdir.core.io import atomic_dir, atomic_write_json, atomic_write_text
from refdir.core.models import load_model, sha256_file
from refdir.errors import RefdirError
from refdir.method.refusal_judge import judge
from refdir.method.scoring import (
    derive_refusal_tokens,
    last_logits,
    refusal_metric_from_logits,
    tokens_from_strings,
)
from refdir.method.selection import (
    CandidateScore,
    Selection,
    SelectionConfig,
    apply_filters,
    score_candidates,
)

console = Console(stderr=True)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "default"
    # data: embedded sets by default; files or hub ids otherwise (their own train/val/test are
    # then carved out by seeded sampling)
    harmful: str = "embedded:harmful"
    harmless: str = "embedded:harmless"
    # optional separate val/test sources (files, hub ids or embedded:KIND:SPLIT)
    harmful_val: str | None = None
    harmless_val: str | None = None
    harmful_test: str | None = None
    harmless_test: str | None = None
    column: str = "instruction"
    n_train: int | None = None  # default: all of the train split
    n_val: int = 32
    n_test: int | None = None  # default: all of the test split
    seed: int = 42
    filter_train: bool = True  # keep harmful with metric > 0, harmless with metric < 0 (paper)
    filter_val: bool = False
    refusal_tokens: list[str] | None = None  # default: derived from the model's own refusals
    system: str | None = None
    chat_template: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    device_map: str | None = None
    trust_remote_code: bool = False
    batch_size: int = 32
    # selection
    max_layer_frac: float = 0.8
    kl_max: float = 0.1
    induce_rule: str = "auto"
    induce_rel_frac: float = 0.5
    positions: list[int] | None = None  # default: every post-instruction position
    exhaustive: bool = False  # fully score every candidate instead of screening
    screen_n: int = 8
    top_k: int = 12
    # evaluation
    max_new_tokens: int = 128
    gen_batch_size: int = 40
    judge: Literal["broad", "paper", "wide"] = "broad"
    add_coeffs: list[float] = [1.0, 1.25, 1.5, 2.0, 2.5, 3.0]
    add_target: float = 0.9  # share of harmless val prompts whose metric must be > 0
    save_checkpoint: bool = True


STAGE_DEPS: dict[str, list[str]] = {
    "data": ["harmful", "harmless", "harmful_val", "harmless_val", "harmful_test", "harmless_test", "column",
             "n_train", "n_val", "n_test", "seed"],
    "refusal_tokens": ["model", "dtype", "refusal_tokens", "system", "chat_template"],
    "filter": ["filter_train", "filter_val"],
    "candidates": ["batch_size"],
    "selection": ["max_layer_frac", "kl_max", "induce_rule", "induce_rel_frac", "positions", "exhaustive",
                  "screen_n", "top_k"],
    "coeff": ["add_coeffs", "add_target"],
    "eval": ["max_new_tokens", "judge"],
    "checkpoint": ["save_checkpoint"],
}
STAGES = list(STAGE_DEPS)


def _key(cfg: RunConfig, stage: str, upstream: str) -> str:
    part = {k: getattr(cfg, k) for k in STAGE_DEPS[stage]}
    blob = json.dumps({"stage": stage, "cfg": part, "up": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Run:
    """A run directory and its stages."""

    def __init__(self, cfg: RunConfig, out: str | Path, force: bool = False, progress: bool = True):
        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress
        self.timings: dict[str, float] = {}
        self._lm = None
        self._fmt = None
        self._train_means = None  # (filtered train sets, harmful mean, harmless mean) from the filter's pass
        if self.out.exists():
            old = self.out / "config.json"
            if not old.exists():
                if force:
                    shutil.rmtree(self.out)
                else:
                    raise RefdirError(f"{self.out} exists and is not a refdir run directory; pass --force to replace it")
            else:
                prev = json.loads(old.read_text())
                if prev.get("model") != cfg.model and not force:
                    raise RefdirError(f"{self.out} holds a run of model {prev.get('model')!r}; "
                                      "choose another --out or pass --force")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", cfg.model_dump())
        self.keys: dict[str, str] = {}

    # ------------------------------------------------------------------ stage plumbing
    def _stage_key(self, stage: str) -> str:
        i = STAGES.index(stage)
        up = self.keys.get(STAGES[i - 1], "") if i else ""
        k = _key(self.cfg, stage, up)
        self.keys[stage] = k
        return k

    def done(self, stage: str) -> bool:
        k = self._stage_key(stage)
        f = self.out / stage / "stage.json"
        return f.exists() and json.loads(f.read_text()).get("key") == k

    def write_stage(self, stage: str):
        """Context manager: write a stage's files into a temp dir, then swap it in whole."""
        return _StageWriter(self, stage)

    @property
    def lm(self):
        if self._lm is None:
            t = time.time()
            self._lm = load_model(self.cfg.model, dtype=self.cfg.dtype, device=self.cfg.device,
                                  device_map=self.cfg.device_map, trust_remote_code=self.cfg.trust_remote_code)
            self.timings["load"] = time.time() - t
        return self._lm

    @property
    def fmt(self) -> ChatFormat:
        if self._fmt is None:
            self._fmt = ChatFormat(self.lm.tokenizer, system=self.cfg.system, template=self.cfg.chat_template)
        return self._fmt

    def read_json(self, stage: str, name: str):
        return json.loads((self.out / stage / name).read_text())

    # ------------------------------------------------------------------ stages
    def stage_data(self) -> dict:
        if not self.done("data"):
            c = self.cfg
            sets = {}
            for kind, spec in (("harmful", c.harmful), ("harmless", c.harmless)):
                val_spec, test_spec = getattr(c, f"{kind}_val"), getattr(c, f"{kind}_test")
                if spec in (f"embedded:{kind}", "embedded"):
                    tr, va, te = (embedded(kind, s).instructions for s in ("train", "val", "test"))
                else:
                    items = sample(load_instructions(spec, c.column).instructions, None, c.seed)
                    n_te = 0 if test_spec else (c.n_test or max(1, len(items) // 5))
                    n_va = 0 if val_spec else c.n_val
                    if len(items) < n_te + n_va + 2:
                        raise RefdirError(f"{spec}: {len(items)} instructions are too few for val {n_va} + test {n_te}")
                    te, va, tr = items[:n_te], items[n_te:n_te + n_va], items[n_te + n_va:]
                if val_spec:
                    va = load_instructions(val_spec, c.column).instructions
                if test_spec:
                    te = load_instructions(test_spec, c.column).instructions
                tr = sample(tr, c.n_train, c.seed)
                va = sample(va, c.n_val, c.seed)
                te = te[: c.n_test] if c.n_test else te
                overlap = set(te) & (set(tr) | set(va))
                if overlap:
                    raise RefdirError(f"{len(overlap)} {kind} test prompts also appear in train/val, "
                                      f"e.g. {next(iter(overlap))[:60]!r}")
                sets[kind] = {"train": tr, "val": va, "test": te,
                              "source": {"train": spec, "val": val_spec or spec, "test": test_spec or spec}}
            with self.write_stage("data") as d:
                atomic_write_json(d / "sets.json", sets)
        return self.read_json("data", "sets.json")

    def stage_refusal_tokens(self, sets: dict) -> list[int]:
        if not self.done("refusal_tokens"):
            tok = self.lm.tokenizer
            if self.cfg.refusal_tokens:
                ids = tokens_from_strings(tok, self.cfg.refusal_tokens)
                ev = {"source": "user", "strings": self.cfg.refusal_tokens}
            else:
                ids, ev = derive_refusal_tokens(self.lm.model, self.fmt, sets["harmful"]["train"], n_prompts=32,
                                                batch_size=self.cfg.batch_size, progress=self.progress)
                ev["source"] = "derived"
            with self.write_stage("refusal_tokens") as d:
                atomic_write_json(d / "tokens.json", {"ids": ids, "tokens": [tok.decode([i]) for i in ids],
                                                      "evidence": ev})
        return self.read_json("refusal_tokens", "tokens.json")["ids"]

    def metric(self, prompts: list[str], ids: list[int]) -> list[float]:
        lg = last_logits(self.lm.model, self.fmt, prompts, self.cfg.batch_size, shared_prefix=True)
        return refusal_metric_from_logits(lg, ids).tolist()

    def judged(self, outs: list[str]) -> dict:
        """The broad and paper judges' refusal scores for a set of completions; the headline (and the flags) use
        cfg.judge."""
        jh, jb, jp = judge(outs, self.cfg.judge), judge(outs, "broad"), judge(outs, "paper")
        return {"refusal": jh.refusal, "refusal_broad": jb.refusal, "refusal_paper": jp.refusal,
                "degenerate": jh.n_degenerate, "n": jh.n, "flags": jh.flags}

    def stage_filter(self, sets: dict, ids: list[int]) -> dict:
        """Keep harmful prompts with metric > 0 and harmless ones with metric < 0 (the paper's filter), per split as
        configured. The train pass also caches the residuals at the post-instruction positions, so that the
        candidates stage that follows in the same process needs no second pass over the same prompts."""
        if not self.done("filter"):
            out: dict = {}
            info: dict = {}
            means: dict = {}
            for split, on in (("train", self.cfg.filter_train), ("val", self.cfg.filter_val)):
                if split == "val" and not on:
                    out[split] = {k: sets[k][split] for k in ("harmful", "harmless")}
                    info[split] = {"filtered": False, "harmful_kept": len(out[split]["harmful"]),
                                   "harmless_kept": len(out[split]["harmless"])}
                    continue
                kept, metrics, sums = {}, {}, {}
                for kind, sign in (("harmful", 1.0), ("harmless", -1.0)):
                    prompts = sets[kind][split]
                    if split == "train":
                        m, sums[kind] = self._metric_and_means(prompts, ids, sign if on else None, kind)
                    else:
                        m = self.metric(prompts, ids)
                    if any(not math.isfinite(x) for x in m):
                        raise RefdirError("non-finite refusal metric on the data: the model produces NaN logits")
                    metrics[kind] = m
                    kept[kind] = [p for p, x in zip(prompts, m, strict=True) if sign * x > 0 or not on]
                h, b = kept["harmful"], kept["harmless"]
                subset = "kept"
                if on and (len(h) < 4 or len(b) < 4):
                    console.print(f"[yellow]filter kept only {len(h)} harmful / {len(b)} harmless {split} prompts; "
                                  "keeping the unfiltered set instead[/]")
                    h, b = sets["harmful"][split], sets["harmless"][split]
                    info[f"{split}_fallback"] = "unfiltered (too few passed)"
                    subset = "all"
                if split == "train":
                    means = {kind: sums[kind][subset] for kind in ("harmful", "harmless")}
                out[split] = {"harmful": h, "harmless": b}
                hm, bm = metrics["harmful"], metrics["harmless"]
                info[split] = {"harmful_kept": len(h), "harmful_total": len(hm), "harmless_kept": len(b),
                               "harmless_total": len(bm), "harmful_metric_mean": sum(hm) / len(hm),
                               "harmless_metric_mean": sum(bm) / len(bm)}
            with self.write_stage("filter") as d:
                atomic_write_json(d / "filtered.json", out)
                atomic_write_json(d / "info.json", info)
            self._train_means = (out["train"], means["harmful"], means["harmless"])
        return self.read_json("filter", "filtered.json")

    def _metric_and_means(self, prompts: list[str], ids: list[int], sign: float | None, kind: str):
        """One pass over ``prompts``: the refusal metric of each, and the mean residuals of all of them and of those
        the filter keeps (``sign · metric > 0``; all of them when ``sign`` is None)."""
        tot = {"all": None, "kept": None}
        n = {"all": 0, "kept": 0}
        metric = [0.0] * len(prompts)
        for idx, stack, lg in residual_batches(self.lm.model, self.fmt, prompts, n_pos=self.fmt.n_post,
                                               batch_size=self.cfg.batch_size, shared_prefix=True, logits=True,
                                               desc=f"{kind} train (metric + activations)", progress=self.progress):
            m = refusal_metric_from_logits(lg, ids).tolist()
            for j, i in enumerate(idx):
                metric[i] = m[j]
            keep = torch.tensor([sign is None or sign * x > 0 for x in m])
            for part, sel in (("all", torch.ones_like(keep)), ("kept", keep)):
                if sel.any():
                    add = stack[sel].to(torch.float64).sum(0)
                    tot[part] = add if tot[part] is None else tot[part] + add
                    n[part] += int(sel.sum())
        return metric, {p: (tot[p] / n[p] if n[p] else None) for p in tot}

    def stage_candidates(self, filt: dict) -> Candidates:
        if not self.done("candidates"):
            tr = filt["train"]
            cached = self._train_means
            if cached is not None and cached[0] == tr and cached[1] is not None and cached[2] is not None:
                mh, mb = cached[1], cached[2]
            else:
                mh, _ = residuals(self.lm.model, self.fmt, tr["harmful"], batch_size=self.cfg.batch_size,
                                  desc="harmful activations", progress=self.progress, shared_prefix=True)
                mb, _ = residuals(self.lm.model, self.fmt, tr["harmless"], batch_size=self.cfg.batch_size,
                                  desc="harmless activations", progress=self.progress, shared_prefix=True)
            c = Candidates.from_means(mh, mb, self.lm.model_id, {
                "post_instruction_tokens": self.fmt.post_instruction_tokens(),
                "n_harmful": len(tr["harmful"]), "n_harmless": len(tr["harmless"])})
            with self.write_stage("candidates") as d:
                c.save(d)
        return Candidates.load(self.out / "candidates")

    def stage_selection(self, filt: dict, cands: Candidates, ids: list[int]) -> tuple[Selection, Direction | None]:
        scfg = SelectionConfig(max_layer_frac=self.cfg.max_layer_frac, kl_max=self.cfg.kl_max,
                               induce_rule=self.cfg.induce_rule, induce_rel_frac=self.cfg.induce_rel_frac,
                               batch_size=self.cfg.batch_size, exhaustive=self.cfg.exhaustive,
                               screen_n=self.cfg.screen_n, top_k=self.cfg.top_k)
        if not self.done("selection"):
            va = filt["val"]
            c = cands
            if self.cfg.positions:
                keep = [c.positions.index(p) for p in self.cfg.positions]
                c = Candidates(c.vectors[keep], c.harmful_mean[keep], c.harmless_mean[keep],
                               [c.positions[k] for k in keep], c.model_id, c.meta)
            sel = score_candidates(self.lm.model, self.fmt, c, va["harmful"], va["harmless"], ids, scfg,
                                   progress=self.progress)
            with self.write_stage("selection") as d:
                rows = sel.table()
                atomic_write_json(d / "table.json", rows)
                cols = ["position", "layer", "bypass", "induce", "kl", "ok", "filtered", "bypass_screen", "kl_screen"]
                atomic_write_text(d / "table.csv", ",".join(cols) + "\n" + "\n".join(
                    ",".join(str(r[k]) if k != "filtered" else '"' + ";".join(r[k]) + '"' for k in cols)
                    for r in rows) + "\n")
                atomic_write_json(d / "selection.json", {
                    "chosen": asdict(sel.chosen) if sel.chosen else None, "rule": sel.rule,
                    "baseline": sel.baseline, "filter_counts": sel.filter_counts, "config": sel.config,
                    "diagnostic": None if sel.chosen else sel.diagnostic()})
                if sel.chosen:
                    direction = cands.get(sel.chosen.position, sel.chosen.layer)
                    direction.meta.update(bypass=sel.chosen.bypass, induce=sel.chosen.induce, kl=sel.chosen.kl,
                                          rule=sel.rule)
                    direction.save(d / "direction")
        meta = self.read_json("selection", "selection.json")
        rows = self.read_json("selection", "table.json")
        names = [f.name for f in fields(CandidateScore)]
        scores = [CandidateScore(**{k: r[k] for k in names if k in r}) for r in rows]
        sel = apply_filters(scores, meta["baseline"], scfg, cands.n_layers)
        if meta["chosen"] is None:
            return sel, None
        return sel, Direction.load(self.out / "selection" / "direction")

    def stage_coeff(self, filt: dict, direction: Direction, ids: list[int]) -> dict:
        """Choose the addition coefficient: the smallest on the grid whose addition makes the
        refusal metric positive on ``add_target`` of the harmless val prompts."""
        if not self.done("coeff"):
            prompts = filt["val"]["harmless"]
            curve = []
            chosen = None
            for c in self.cfg.add_coeffs:
                with add(self.lm.model, direction.vector, direction.layer, c):
                    m = self.metric(prompts, ids)
                share = sum(x > 0 for x in m) / len(m)
                curve.append({"coeff": c, "mean_metric": sum(m) / len(m), "share_positive": share})
                if share >= self.cfg.add_target:
                    chosen = c
                    break
            if chosen is None:
                chosen = max(curve, key=lambda r: r["share_positive"])["coeff"]
            with self.write_stage("coeff") as d:
                atomic_write_json(d / "coeff.json", {"coeff": chosen, "curve": curve,
                                                      "rule": f"smallest coefficient with metric > 0 on "
                                                              f">= {self.cfg.add_target:.0%} of harmless val"})
        return self.read_json("coeff", "coeff.json")

    def stage_eval(self, sets: dict, direction: Direction | None, coeff: float | None) -> dict:
        if not self.done("eval"):
            m = self.lm.model
            H, B = sets["harmful"]["test"], sets["harmless"]["test"]
            gen = {}

            def g(name, prompts):
                return generate(m, self.fmt, prompts, max_new_tokens=self.cfg.max_new_tokens,
                                batch_size=self.cfg.gen_batch_size, progress=self.progress, desc=name)

            gen["baseline/harmful"] = g("baseline harmful", H)
            gen["baseline/harmless"] = g("baseline harmless", B)
            if direction is not None:
                with ablate(m, direction.vector):
                    gen["ablation/harmful"] = g("ablation harmful", H)
                    gen["ablation/harmless"] = g("ablation harmless", B)
                with add(m, direction.vector, direction.layer, coeff or 1.0):
                    gen["addition/harmless"] = g("addition harmless", B)
            scores = {k: self.judged(outs) for k, outs in gen.items()}
            # metric histograms (first-answer-position log-odds) for the report
            ids = self.read_json("refusal_tokens", "tokens.json")["ids"]
            hist = {"harmful": self.metric(H, ids), "harmless": self.metric(B, ids)}
            if direction is not None:
                with ablate(m, direction.vector):
                    hist["harmful (ablation)"] = self.metric(H, ids)
                with add(m, direction.vector, direction.layer, coeff or 1.0):
                    hist["harmless (addition)"] = self.metric(B, ids)
            with self.write_stage("eval") as d:
                atomic_write_json(d / "completions.json", {"prompts": {"harmful": H, "harmless": B},
                                                           "completions": gen})
                atomic_write_json(d / "scores.json", scores)
                atomic_write_json(d / "metrics.json", hist)
        return self.read_json("eval", "scores.json")

    def stage_checkpoint(self, sets: dict, direction: Direction | None) -> dict | None:
        if direction is None or not self.cfg.save_checkpoint:
            return None
        if not self.done("checkpoint"):
            from transformers import AutoModelForCausalLM

            from refdir.core.orthogonalize import save_orthogonalized

            lm = self.lm
            ckpt = self.out / "checkpoint" / "model"
            # edit a copy so the in-memory model stays the base model
            edited = load_model(self.cfg.model, dtype=self.cfg.dtype, device=self.cfg.device,
                                device_map=self.cfg.device_map, trust_remote_code=self.cfg.trust_remote_code)
            with self.write_stage("checkpoint") as d:
                save_orthogonalized(edited.model, edited.tokenizer, direction.vector, d / "model", force=True,
                                    meta={"direction": {"layer": direction.layer, "position": direction.position},
                                          "source_model": lm.model_id})
                del edited
                reloaded = AutoModelForCausalLM.from_pretrained(d / "model", dtype=lm.dtype).eval()
                outs = generate(reloaded, self.fmt, sets["harmful"]["test"], max_new_tokens=self.cfg.max_new_tokens,
                                batch_size=self.cfg.gen_batch_size, progress=self.progress, desc="checkpoint harmful")
                res = {k: v for k, v in self.judged(outs).items() if k != "flags"} | {"path": str(ckpt)}
                atomic_write_json(d / "eval.json", {**res, "completions": outs})
                del reloaded
        return self.read_json("checkpoint", "eval.json")

    # ------------------------------------------------------------------ all
    def run(self) -> dict:
        t0 = time.time()
        stage_times = {}

        def timed(name, fn, *a):
            t = time.time()
            r = fn(*a)
            stage_times[name] = round(time.time() - t, 2)
            return r

        sets = timed("data", self.stage_data)
        ids = timed("refusal_tokens", self.stage_refusal_tokens, sets)
        filt = timed("filter", self.stage_filter, sets, ids)
        cands = timed("candidates", self.stage_candidates, filt)
        sel, direction = timed("selection", self.stage_selection, filt, cands, ids)
        if direction is None:
            console.print("[bold yellow]every candidate was filtered out:[/]\n" + sel.diagnostic())
            coeff = None
            self.done("coeff")
        else:
            coeff = timed("coeff", self.stage_coeff, filt, direction, ids)
        scores = timed("eval", self.stage_eval, sets, direction, coeff["coeff"] if coeff else None)
        ckpt = timed("checkpoint", self.stage_checkpoint, sets, direction)
        summary = self._summary(sets, sel, direction, coeff, scores, ckpt, stage_times, time.time() - t0)
        atomic_write_json(self.out / "summary.json", summary)
        atomic_write_json(self.out / "manifest.json", self._manifest(sets))
        from refdir.workflows.report import write_report

        write_report(self.out)
        return summary

    def _summary(self, sets, sel, direction, coeff, scores, ckpt, stage_times, wall) -> dict:
        tokinfo = self.read_json("refusal_tokens", "tokens.json")
        finfo = self.read_json("filter", "info.json")
        s = {
            "model": self.cfg.model,
            "refusal_tokens": tokinfo["tokens"],
            "filter": finfo,
            "selection": {
                "chosen": asdict(sel.chosen) if sel.chosen else None,
                "rule": sel.rule, "baseline": sel.baseline, "filter_counts": sel.filter_counts,
                "n_layers": sel.config["n_layers"],
            },
            "addition_coeff": coeff,
            "refusal": {k: {kk: v[kk] for kk in ("refusal", "refusal_broad", "refusal_paper", "degenerate", "n")}
                        for k, v in scores.items()},
            "checkpoint": {k: ckpt[k] for k in ("refusal", "refusal_broad", "refusal_paper", "degenerate", "n", "path")}
            if ckpt else None,
            "judge": self.cfg.judge,
            "n_test": {"harmful": len(sets["harmful"]["test"]), "harmless": len(sets["harmless"]["test"])},
            "timings_s": {**stage_times, "total": round(wall, 2), **{k: round(v, 2) for k, v in self.timings.items()}},
        }
        return s

    def _manifest(self, sets) -> dict:
        from refdir.workflows.extract import versions

        prev_path = self.out / "manifest.json"
        if self._lm is None and prev_path.exists():  # fully cached rerun: the model was not loaded
            prev = json.loads(prev_path.read_text())
            src, files = prev.get("model", {}), prev.get("model_files_sha256", {})
            p = None
        else:
            src = dict(self._lm.source) if self._lm is not None else {}
            files = {}
            p = src.get("path")
        if p and Path(p).is_dir():
            for f in sorted(Path(p).glob("*.safetensors")):
                files[f.name] = sha256_file(f)
        elif p and Path(p).is_file():
            files[Path(p).name] = sha256_file(p)
        data_hash = {f"{k}/{s}": hashlib.sha256("\n".join(v[s]).encode()).hexdigest()
                     for k, v in sets.items() for s in ("train", "val", "test")}
        return {"versions": versions(), "seed": self.cfg.seed, "config": self.cfg.model_dump(),
                "model": src, "model_files_sha256": files, "data_sha256": data_hash,
                "stage_keys": self.keys, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


class _StageWriter:
    def __init__(self, run: Run, stage: str):
        self.run, self.stage = run, stage
        self._ctx = atomic_dir(run.out / stage, force=True)

    def __enter__(self) -> Path:
        self.tmp = self._ctx.__enter__()
        return self.tmp

    def __exit__(self, et, ev, tb):
        if et is None:
            atomic_write_json(self.tmp / "stage.json", {"key": self.run.keys[self.stage], "stage": self.stage})
        return self._ctx.__exit__(et, ev, tb)


def run_pipeline(cfg: RunConfig, out: str | Path, force: bool = False, progress: bool = True) -> dict:
    return Run(cfg, out, force=force, progress=progress).run()
