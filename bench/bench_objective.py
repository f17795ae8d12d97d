"""Which last-logit refusal objective tracks generated refusal across edits?

For each of ``--n-edits`` edits of the model (the base model, the run's chosen direction at strengths 0.2–1.0, full
ablations of other difference-in-means candidates, from weak to strong bypass) this computes on the harmful prompts

- today's metric: mean log-odds of the run's refusal tokens (``refusal_tokens`` stage), and its mean probability;
- the new objectives of :mod:`refdir.method.refusal_objective` over refusal starts derived on the embedded
  *train* split (never on the measured prompts): mean log-odds, mean probability (soft count), mean capped
  log-odds, and the probability weighted towards prompts the base model refuses;
- the generated refusals: greedy completions judged by ``judge_all(outs, "wide")`` (headline) and ``broad``.

It prints a table and the Spearman rank correlation of each objective with each refusal count across edits.
Generations are cached per edit in ``--out`` (keyed by edit, prompts, tokens, dtype), so a rerun is cheap.

    python bench/bench_objective.py --run RUN_DIR --prompts embedded|FILE.json [--n-edits 16]
        [--max-new-tokens 64] [--dtype auto] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import time
from pathlib import Path

import torch

from refdir.core.data import embedded
from refdir.core.edits import Component, Edit, Kernel, hooked, resolve
from refdir.core.forward import last_logits
from refdir.core.generation import generate
from refdir.core.rundir import RunDir
from refdir.core.spec import ModelSpec
from refdir.method.refusal_judge import judge_all
from refdir.method.refusal_objective import (
    RefusalObjective,
    derive_refusal_starts,
    objective_from_logits,
    prompt_weights,
    weighted_mean,
)

# (position, layer, strength) beyond the chosen direction's strength sweep, from strong to weak bypass
OTHER = [(-1, 8, 1.0), (-2, 11, 1.0), (-4, 18, 1.0), (-3, 13, 1.0), (-1, 3, 1.0), (-5, 5, 1.0), (-2, 21, 1.0),
         (None, None, 0.5), (-1, 8, 0.5), (-5, 14, 1.0), (None, None, 0.3), (None, None, 0.7), (-3, 22, 1.0),
         (-4, 10, 1.0)]


def edits(chosen: tuple[int, int], n: int) -> list[Edit | None]:
    """``None`` (the base model), the chosen direction at 0.2…1.0, then ``OTHER``; the first ``n``."""
    out: list[Edit | None] = [None] + [strength_edit(*chosen, s) for s in (0.2, 0.4, 0.6, 0.8, 1.0)]
    out += [strength_edit(p if p is not None else chosen[0], layer if layer is not None else chosen[1], s)
            for p, layer, s in OTHER]
    return out[:n]


def strength_edit(position: int, layer: int, s: float) -> Edit:
    """Strength ``s`` on both components at every layer; the embedding only at full strength."""
    if s >= 1.0:
        return Edit.full(position, layer)
    return Edit(position, float(layer), Component(Kernel(s)), Component(Kernel(s)), False)


def load_prompts(spec: str) -> tuple[str, list[str]]:
    if spec == "embedded":
        return "embedded-harmful-val", embedded("harmful", "val").instructions
    rows = json.loads(Path(spec).read_text())
    return Path(spec).stem, [r["instruction"] if isinstance(r, dict) else str(r) for r in rows]


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson correlation of average ranks (ties share their mean rank)."""
    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        r = torch.empty_like(t)
        order = sorted(range(len(v)), key=lambda i: v[i])
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = (rx.norm() * ry.norm()).item()
    return float((rx @ ry).item() / den) if den > 0 else float("nan")


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Probability that a refused prompt scores above an answered one (ties count half)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def per_prompt(rows: list[dict], tok_sets: dict[str, str]) -> None:
    """Per prompt, pooled over edits: how well each token set's p separates generated refusals (wide) from
    answers (log-odds, p and capped log-odds share it: they are monotone in p); and at the base model, how many
    prompts each set scores positive (log-odds > 0) against how many the model refuses."""
    flags = [f for r in rows for f in r["flags"]]
    print("\nper prompt, pooled over edits (AUROC of p against the wide judge's flags):")
    for k, col in tok_sets.items():
        print(f"  {k:6s} AUROC {auroc([v for r in rows for v in r['per_prompt'][col]], flags):.3f}; at base "
              f"{sum(v > 0.5 for v in rows[0]['per_prompt'][col])} prompts with log-odds > 0, "
              f"{sum(rows[0]['flags'])} refused when generating")


def derived_starts(model, fmt, out: Path, dtype: str) -> tuple[list[int], dict]:
    path = out / f"derived_{dtype}.json"
    if path.exists():
        d = json.loads(path.read_text())
        return d["ids"], d
    ids, ev = derive_refusal_starts(model, fmt, embedded("harmful", "train").instructions,
                                    embedded("harmless", "train").instructions)
    path.write_text(json.dumps(ev, indent=1))
    return ids, ev


def completions(model, fmt, prompts, plan, cache: Path, args) -> list[str]:
    if cache.exists():
        return json.loads(cache.read_text())
    ctx = hooked(model, plan) if plan is not None else contextlib.nullcontext()
    with ctx:
        outs = generate(model, fmt, prompts, max_new_tokens=args.max_new_tokens,
                        batch_size=max(40, args.batch), progress=False, shared_prefix=True)
    cache.write_text(json.dumps(outs))
    return outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--prompts", default="embedded")
    ap.add_argument("--n-edits", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--out", default="/tmp/bench_objective")
    a = ap.parse_args()

    rd = RunDir(a.run)
    cands, today_ids = rd.candidates(), rd.refusal_ids()
    chosen = rd.selection_meta()["chosen"]
    name, prompts = load_prompts(a.prompts)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lm, fmt = ModelSpec(model="default", dtype=a.dtype).load()
    model = lm.model
    print(f"torch threads {torch.get_num_threads()}, dtype {lm.dtype}, prompts {name} ({len(prompts)}), "
          f"{a.max_new_tokens} new tokens")
    new_ids, ev = derived_starts(model, fmt, out, a.dtype)
    tok = fmt.tokenizer.decode
    print(f"today's tokens {[tok([t]) for t in today_ids]}; derived starts {ev['kept']} "
          f"(greedy {ev['greedy']}, soft {ev['soft']}; refusal first tokens {ev['first_tokens']})")
    objs = {"today_lo": RefusalObjective("logodds", today_ids), "today_p": RefusalObjective("prob", today_ids),
            "new_lo": RefusalObjective("logodds", new_ids), "new_p": RefusalObjective("prob", new_ids),
            "new_cap": RefusalObjective("capped_logodds", new_ids)}
    cols = [*objs, "new_wp"]
    rows, weights = [], None
    for i, e in enumerate(edits((chosen["position"], chosen["layer"]), a.n_edits)):
        t = time.perf_counter()
        plan = resolve(e, cands) if e is not None else None
        with hooked(model, plan) if plan is not None else contextlib.nullcontext():
            logits = last_logits(model, fmt, prompts, 40, shared_prefix=True)
        vals = {k: objective_from_logits(logits, o) for k, o in objs.items()}
        if weights is None:  # the base model comes first: weights towards the prompts it refuses
            weights = prompt_weights(vals["new_p"])
        row = {k: float(v.mean()) for k, v in vals.items()}
        row["new_wp"] = weighted_mean(vals["new_p"], weights)
        cache = out / f"gen_{key(e.to_dict() if e else None, prompts, a.max_new_tokens, a.dtype, a.run)}.json"
        verdict = judge_all(completions(model, fmt, prompts, plan, cache, a), "wide")
        row["per_prompt"] = {k: vals[k].tolist() for k in ("today_p", "new_p")}
        row["flags"] = verdict["headline"].flags
        row |= {"wide": verdict["headline"].n_refusal, "broad": verdict["broad"].n_refusal,
                "degen": verdict["headline"].n_degenerate, "edit": e.describe() if e else "base"}
        rows.append(row)
        print(f"  edit {i:2d} done in {time.perf_counter() - t:5.1f}s: {row['edit']}", flush=True)

    print(f"\n{'#':>2} " + " ".join(f"{c:>9s}" for c in cols) + "  wide broad degen  edit")
    for i, r in enumerate(rows):
        print(f"{i:2d} " + " ".join(f"{r[c]:9.3f}" for c in cols)
              + f"  {r['wide']:4d} {r['broad']:5d} {r['degen']:5d}  {r['edit']}")
    print(f"\nSpearman rho across {len(rows)} edits ({name}):")
    for c in cols:
        print(f"  {c:9s} vs wide {spearman([r[c] for r in rows], [r['wide'] for r in rows]):+.3f}   "
              f"vs broad {spearman([r[c] for r in rows], [r['broad'] for r in rows]):+.3f}")
    per_prompt(rows, {"today": "today_p", "new": "new_p"})
    (out / f"table_{name}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
