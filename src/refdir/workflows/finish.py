"""The last stages of ``refdir run`` with the search (``--method search``, the default): the test of the chosen
edit beside the base model and the plain direction, and the chosen edit written into the weights.

Test sets: the run's test split (carved from the same sources as train/val: *in-distribution*) and, when given,
the held-out sets (``--heldout-harmful`` / ``--heldout-harmless``: another source, never used to build or choose
the edit: *cross-source*), which are then the headline. The chosen edit is measured on every set, the base model and
the plain direction on the headline set: harmful prompts generated (``--max-new-tokens``; not the plain direction's
harmless ones), harmless prompts generated for harmless refusal (``HARMLESS_TOKENS``), and the first-token KL of
every edited arm on the harmless prompts of the sets it is measured on, from the logits the harmless generation's
first step computed where an arm was generated (one pass over the prompts instead of two) and a separate pass for
the rest. All arms are generated in one batch (:func:`refdir.core.edits.hooked_rows`).

The checkpoint is the loaded model edited in place (one copy of the model in memory through the run): the edit's
logits under hooks are taken on a batch of test prompts first, the weights are edited, and the same logits are
taken again, which proves the weights compute what the hooks computed (their KL and top-1 agreement are recorded)
without generating again. A GGUF input also gets a GGUF output (:func:`refdir.core.gguf_plan.export_gguf_plan`).
"""

from __future__ import annotations

import torch

from refdir.core import rundir as rdl
from refdir.core.directions import Candidates
from refdir.core.edits import Edit, Plan, apply_weights_, hooked, hooked_rows, resolve
from refdir.core.forward import last_logits
from refdir.core.generation import generate
from refdir.core.gguf_plan import export_gguf_plan, plan_to_cpu
from refdir.core.io import atomic_write_json
from refdir.core.model_files import gguf_file_of
from refdir.core.models import save_hf_checkpoint
from refdir.core.rundir import RunDir
from refdir.method.refusal_judge import refusal_settled, tally_markers
from refdir.method.scoring import first_token_kl
from refdir.workflows.stages import Loaded, RunConfig, judged

ARMS = ("base", "plain", "chosen")
VERIFY_PROMPTS = 16  # prompts whose logits prove the checkpoint equals the hooks
# new tokens for harmless prompts: an over-refusal ("I'm sorry, but I can't…") shows in its opening words, and the
# base model and the edit are judged on the same window; harmful prompts get --max-new-tokens. On the default model
# the broad judge's harmless counts at 8, 12, 16, 24 and 32 tokens were equal on every arm and set (NOTES.md);
# harmful ones were not (some refusals come after a first sentence), so those keep their 64
HARMLESS_TOKENS = 16
# first-token KL from the logits the harmless generation's first step computed (base and chosen arms), instead of a
# second pass over those prompts; False: every arm's logits from a separate pass (the reference, tested equal)
REUSE_FIRST_LOGITS = True
# a row ends once every judge's verdict on it is settled (a refusal phrase among its complete words: no later token
# can change a flag; :func:`refdir.method.refusal_judge.refusal_settled`), and its completion is stored up to there;
# False: every row runs to its window (the reference: the same flags, tested equal)
STOP_SETTLED = True


def measured_on(arm: str, sname: str, headline: str | None) -> bool:
    """Whether ``arm`` is measured on test set ``sname``: the chosen edit on every set, the base model and the plain
    direction only on the ``headline`` set (``None``: every arm on every set)."""
    return arm == "chosen" or headline in (None, sname)


def eval_sets(sets: dict) -> dict[str, dict[str, list[str]]]:
    """``{"test": {"harmful", "harmless"}, "heldout": {...}}``: the in-distribution test split and, when given,
    the held-out (cross-source) sets."""
    out = {"test": {k: sets[k]["test"] for k in ("harmful", "harmless")}}
    if sets["harmful"].get("heldout") or sets["harmless"].get("heldout"):
        out["heldout"] = {k: sets[k].get("heldout", []) for k in ("harmful", "harmless")}
    return out


def _plans(cands: Candidates, choice: dict, plain: dict | None) -> dict[str, Plan | None]:
    plans = {"base": None, "chosen": resolve(Edit.from_dict(choice["edit"]), cands)}
    if plain is not None:
        plans["plain"] = resolve(Edit.from_dict(plain["edit"]), cands)
    return plans


def stage_test(rd: RunDir, cfg: RunConfig, m: Loaded, sets: dict, cands: Candidates, choice: dict,
               plain: dict | None, progress: bool = True) -> dict:
    """Judge the base model, the plain direction and the chosen edit on the test (and held-out) sets; returns
    ``{"scores": {"ARM/SET/KIND": judged}, "kl": {"ARM/SET": mean KL}, "relation": {SET: ...}}``."""
    settings = {**cfg.settings(rdl.EVAL), "choice": choice["edit"], "plain": plain and plain["edit"],
                "harmless_tokens": HARMLESS_TOKENS, "stop_settled": STOP_SETTLED}
    held = cfg.heldout_settings()
    if held is not None:  # another held-out set (or the same file edited) is judged again
        settings["heldout"] = held
    key = rd.key(rdl.EVAL, settings, upstream=rd.keys.get(rdl.CANDIDATES, ""))
    if rd.done(rdl.EVAL, key):
        return rd.scores()
    model, fmt = m.lm.model, m.fmt
    plans = _plans(cands, choice, plain)
    names = list(plans)
    tsets = eval_sets(sets)
    rows: list[tuple[str, str, str, str]] = []  # (arm, set, kind, prompt)
    headline = "heldout" if "heldout" in tsets else "test"
    for sname, ts in tsets.items():
        for arm in names:
            if measured_on(arm, sname, headline):
                rows += [(arm, sname, "harmful", p) for p in ts["harmful"]]
        for arm in ("base", "chosen"):
            if measured_on(arm, sname, headline):
                rows += [(arm, sname, "harmless", p) for p in ts["harmless"]]
    outs: dict[int, str] = {}
    firsts: dict[tuple[str, str], torch.Tensor] = {}  # (arm, set) -> first-step logits of its harmless rows
    with hooked_rows(model, [plans[a] for a in names]) as hr:
        for kind, n_tok in (("harmful", cfg.max_new_tokens), ("harmless", min(cfg.max_new_tokens, HARMLESS_TOKENS))):
            idx = [i for i, r in enumerate(rows) if r[2] == kind]
            if not idx:
                continue
            reuse = kind == "harmless" and REUSE_FIRST_LOGITS
            o = generate(model, fmt, [rows[i][3] for i in idx], max_new_tokens=n_tok, batch_size=cfg.gen_batch_size,
                         progress=progress, desc=f"test: {kind}, {len(idx)} rows", rows=hr,
                         groups=[names.index(rows[i][0]) for i in idx], shared_prefix=True, first_logits=reuse,
                         decided=refusal_settled if STOP_SETTLED else None)
            if reuse:
                o, lg = o
                for arm, sname in {(rows[i][0], rows[i][1]) for i in idx}:
                    js = [j for j, i in enumerate(idx) if rows[i][:2] == (arm, sname)]
                    # each (arm, set) is one block of rows: a view, not a copy of its [n, vocab] logits
                    contiguous = js == list(range(js[0], js[-1] + 1))
                    firsts[arm, sname] = lg[js[0]:js[-1] + 1] if contiguous else lg[js]
                del lg
            outs.update(zip(idx, o, strict=True))
        kl, kl_each = _kls(model, fmt, tsets, plans, names, hr, cfg.batch_size, firsts, headline)
    gen: dict[str, list[str]] = {}
    for i, r in enumerate(rows):
        o = outs[i]
        gen.setdefault(f"{r[0]}/{r[1]}/{r[2]}", []).append(o)
    scores = {k: judged(v, cfg.judge) for k, v in gen.items()}
    src = sets["harmful"]["source"]
    relation = {"test": "in-distribution: carved from the same sources as the train/val prompts"
                if src.get("test") == src.get("train") else "as given (--harmful-test / --harmless-test)"}
    if "heldout" in tsets:
        relation["heldout"] = "cross-source: held-out sets of another source, never used to build or choose the edit"
    res = {"scores": scores, "kl": kl, "kl_answered": kl_answered(scores, kl_each, headline), "relation": relation,
           "arms": {"chosen": choice, "plain": plain},
           "max_new_tokens": cfg.max_new_tokens, "harmless_tokens": min(cfg.max_new_tokens, HARMLESS_TOKENS),
           "stop_settled": STOP_SETTLED,
           "judge": cfg.judge}
    left = f"chosen/{headline}/harmful"
    if left in gen:  # what the chosen edit still refuses on the headline set, by the judge's phrase
        res["still_refused"] = {"set": headline, "n": sum(scores[left]["flags"]),
                                "by_phrase": tally_markers(gen[left], scores[left]["flags"], cfg.judge)}
    with rd.write_stage(rdl.EVAL, key) as d:
        atomic_write_json(d / rdl.COMPLETIONS_FILE, {"rows": [list(r[:3]) + [r[3]] for r in rows], "completions": gen})
        atomic_write_json(d / rdl.SCORES_FILE, res)
    return rd.scores()


def kl_answered(scores: dict, kl_each: dict[str, list[float]], headline: str) -> dict[str, dict]:
    """First-token KL over the harmless prompts of the headline set that the base model answers, per edited arm:
    ``{"ARM/SET": {"kl": mean, "n": prompts}}``. The prompts the base model refuses are ones the edit is meant to
    change (its over-refusals); on the default model they carry a third to a half of the mean KL, so the two
    figures side by side say whether the KL is side effect or intended change."""
    base = scores.get(f"base/{headline}/harmless")
    if base is None:
        return {}
    answered = [not f for f in base["flags"]]
    out = {}
    for key, each in kl_each.items():
        if key.endswith(f"/{headline}") and any(answered):  # the same prompts in the same order (zip is strict)
            vals = [k for k, a in zip(each, answered, strict=True) if a]
            out[key] = {"kl": sum(vals) / len(vals), "n": len(vals)}
    return out


def _kls(model, fmt, tsets: dict, plans: dict, names: list[str], hr, batch_size: int,
         known: dict[tuple[str, str], torch.Tensor] | None = None,
         headline: str | None = None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Mean first-token KL(base ‖ arm) on each set's harmless prompts for every edited arm measured there
    (:func:`measured_on`), and the per-prompt values (same keys). ``known``: the logits of (arm, set) pairs the generation
    already computed (in the set's prompt order); the rest are computed in one pass per set."""
    known = known or {}
    out: dict[str, float] = {}
    each: dict[str, list[float]] = {}
    for sname, ts in tsets.items():
        B = ts["harmless"]
        if not B:
            continue
        arms = [a for a in names[1:] if measured_on(a, sname, headline)]
        logits = {a: known[a, sname] for a in names if (a, sname) in known}
        todo = [k for k, a in enumerate(names) if a not in logits and a in ("base", *arms)]
        if todo:
            lg = last_logits(model, fmt, B * len(todo), batch_size, shared_prefix=True, rows=hr,
                             groups=[k for k in todo for _ in B])
            logits |= {names[k]: lg[j * len(B):(j + 1) * len(B)] for j, k in enumerate(todo)}
        for arm in arms:
            k = first_token_kl(logits["base"], logits[arm], base_logits=True)
            out[f"{arm}/{sname}"], each[f"{arm}/{sname}"] = float(k.mean()), k.tolist()
    return out, each


@torch.no_grad()
def stage_edit_checkpoint(rd: RunDir, cfg: RunConfig, m: Loaded, sets: dict, cands: Candidates, choice: dict,
                          progress: bool = True) -> dict | None:
    """Write the chosen edit into the loaded model's weights (in place: no second copy) and save it as a HF
    checkpoint (and a GGUF when the input was one); prove by logits that the weights compute what the hooks
    computed. The model in memory is the edited one afterwards, and with a GGUF to write it is released first, so
    this is the run's last model stage."""
    if not cfg.save_checkpoint:
        return None
    # the edit and the model (the candidates' key chains the data and model files): not the eval's settings
    key = rd.key(rdl.CHECKPOINT, {**cfg.settings(rdl.CHECKPOINT), "choice": choice["edit"]},
                 upstream=rd.keys.get(rdl.CANDIDATES, ""))
    if rd.done(rdl.CHECKPOINT, key):
        return rd.checkpoint_eval()
    lm, fmt = m.lm, m.fmt
    plan = resolve(Edit.from_dict(choice["edit"]), cands)
    prompts = (sets["harmful"]["test"][: VERIFY_PROMPTS // 2] + sets["harmless"]["test"][: VERIFY_PROMPTS // 2])
    with hooked(lm.model, plan):
        want = last_logits(lm.model, fmt, prompts, cfg.batch_size, shared_prefix=True)
    summary = apply_weights_(lm.model, plan)
    m.edited = True  # the base model is gone from memory
    got = last_logits(lm.model, fmt, prompts, cfg.batch_size, shared_prefix=True)
    verified = {"n_prompts": len(prompts),
                "kl_hooks_weights": float(first_token_kl(torch.log_softmax(want.double(), -1), got).mean()),
                "top1_agree": float((want.argmax(-1) == got.argmax(-1)).float().mean()),
                "max_abs_logit_diff": float((want - got).abs().max())}
    src = gguf_source(lm.source)
    with rd.write_stage(rdl.CHECKPOINT, key) as d:
        save_hf_checkpoint(lm.model, lm.tokenizer, d / rdl.CHECKPOINT_MODEL_DIR)
        meta = {"kind": "edit", "edit": choice["edit"], "describe": choice.get("describe"), "trial": choice["trial"],
                "source_model": lm.model_id, **summary}
        atomic_write_json(d / rdl.CHECKPOINT_MODEL_DIR / "refdir_edit.json", meta)
        gg = None
        if src is not None:
            plan = plan_to_cpu(plan)
            del lm
            m.release()  # the export reads the source GGUF, not the model: its weights need not stay in memory
            gg = export_gguf_plan(src, plan, d / rdl.CHECKPOINT_GGUF_FILE, progress=progress)
        res = {"path": rd.relative(rd.checkpoint_model_dir()), "verified": verified, "exact": summary["exact"],
               "gguf": {"path": rd.relative(rd.checkpoint_gguf()),
                        "changed_types": gg["changed_types"], "post_norms": gg["post_norms"]} if gg else None}
        atomic_write_json(d / rdl.CHECKPOINT_EVAL_FILE, res)
    return rd.checkpoint_eval()


def gguf_source(source: dict) -> str | None:
    """The GGUF file the model was loaded from (a GGUF path, or the embedded default's GGUF), else None."""
    p = gguf_file_of(source["path"] if source.get("kind") == "gguf" else source.get("spec", ""))
    return None if p is None else str(p)
