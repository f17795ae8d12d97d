"""Contrastive Activation Addition (Rimsky et al., 2024): steering vectors from A/B contrastive pairs.

Data: jsonl (or a JSON list) of ``{"question", "answer_matching_behavior", "answer_not_matching_behavior"}``
where the question holds the choices and the answers are ``"(A)"`` / ``"(B)"``; an optional
``"split"`` (train/test) is honoured. Two embedded team-written behaviours, each question in both letter
orders: ``embedded:refusal`` (the default; 72 rows, 48 train / 24 test) prefers the refusing answer to a
harmful request, and ``embedded:myopic`` (36 rows, 24 / 12) prefers a small reward now over a larger one
later.

Prompts: the chat template's rendering of the question, followed by the answer's opening
parenthesis and letter, e.g. ``...<|im_start|>assistant\\n(A``. The vector at each layer is
the mean over pairs of the residual at the **answer-letter token** for the matching answer minus
the same for the non-matching answer. Evaluation: with the vector added at one layer (times a
multiplier), the probability of the matching letter at the letter position, normalised over the
two letters, averaged over items.
"""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refdir.core.activations import last_token_residuals
from refdir.core.architecture import inspect_model
from refdir.core.chat import ChatFormat
from refdir.core.forward import left_pad
from refdir.core.generation import generate
from refdir.core.html import figure_html, plt, table_html, write_sections_report
from refdir.core.io import atomic_write_json, read_json_records
from refdir.core.rundir import RunDir
from refdir.errors import RefdirError
from refdir.steering.vectors import SteeringVector, dataset_hash, model_hash, steer

EMBEDDED = {"refusal": "caa_refusal.jsonl", "myopic": "caa_myopic.jsonl"}
_LETTER = re.compile(r"\(?\s*([A-Z])\s*\)?")


@dataclass
class ABItem:
    question: str
    matching: str  # e.g. "(A)"
    not_matching: str
    split: str = "train"

    @property
    def letters(self) -> tuple[str, str]:
        return _letter(self.matching), _letter(self.not_matching)


def _letter(answer: str) -> str:
    m = _LETTER.match(answer.strip())
    if not m:
        raise RefdirError(f"cannot find the answer letter in {answer!r}; answers look like '(A)'")
    return m.group(1)


def _items_from_rows(rows: list, src: str) -> list[ABItem]:
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise RefdirError(f"{src}: row {i} is not an object")
        missing = [k for k in ("question", "answer_matching_behavior", "answer_not_matching_behavior") if k not in r]
        if missing:
            raise RefdirError(f"{src}: row {i} lacks {missing}; A/B rows need question, "
                              "answer_matching_behavior, answer_not_matching_behavior")
        it = ABItem(str(r["question"]), str(r["answer_matching_behavior"]), str(r["answer_not_matching_behavior"]),
                    str(r.get("split", "train")))
        a, b = it.letters
        if a == b:
            raise RefdirError(f"{src}: row {i} has the same letter for both answers")
        out.append(it)
    if not out:
        raise RefdirError(f"{src} holds no A/B items")
    return out


def load_behaviour(spec: str | Path) -> list[ABItem]:
    """A/B items from ``embedded[:NAME]`` or a ``.jsonl`` / ``.json`` file."""
    s = str(spec)
    if s == "embedded" or s.startswith("embedded:"):
        name = s.split(":", 1)[1] if ":" in s else "refusal"
        if name not in EMBEDDED:
            raise RefdirError(f"unknown embedded behaviour {name!r}; available: {sorted(EMBEDDED)}")
        text = resources.files("refdir.assets").joinpath(EMBEDDED[name]).read_text()
        return _items_from_rows([json.loads(x) for x in text.splitlines() if x.strip()], s)
    rows = read_json_records(s, "behaviour", hint="rows: question, answer_matching_behavior, "
                             "answer_not_matching_behavior")
    if isinstance(rows, dict):
        rows = rows.get("data", [])
    if not isinstance(rows, list):
        raise RefdirError(f"{s}: expected a list of A/B rows")
    return _items_from_rows(rows, s)


def split(items: list[ABItem], which: str) -> list[ABItem]:
    """Items of one split; a file without splits is all 'train', and then 'test' returns it too."""
    got = [it for it in items if it.split == which]
    return got or items


# ---------------------------------------------------------------------------- token plumbing
def _letter_ids(fmt: ChatFormat, item: ABItem) -> tuple[list[int], int, int]:
    """(prompt ids before the letter token, matching letter id, non-matching letter id)."""
    tok = fmt.tokenizer
    base = fmt.render(item.question)
    seqs = []
    for letter in item.letters:
        seqs.append(tok(base + "(" + letter, add_special_tokens=False)["input_ids"])
    a, b = seqs
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    if not (len(a) == len(b) == k + 1):
        raise RefdirError("this tokenizer does not end '(A' / '(B' with one letter token; cannot score A/B items")
    return a[:k], a[k], b[k]


@torch.no_grad()
def _last_logits(model, rows: list[list[int]], pad: int, batch_size: int, sv: SteeringVector | None = None,
                 layer: int | None = None, multiplier: float = 0.0, tail: int | None = None) -> torch.Tensor:
    """Last-position logits; with ``sv``, ``multiplier · sv[layer]`` is added at every position, or only at the
    last ``tail`` positions of each (left-padded) row."""
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(rows), batch_size):
        enc = left_pad(rows[s : s + batch_size], pad, dev)
        n = enc["input_ids"].shape[1]
        if sv is None or multiplier == 0:
            ctx = nullcontext()
        elif tail is None:
            ctx = steer(model, sv, multiplier, positions="all", layers=[layer])
        else:
            ctx = steer(model, sv, multiplier, positions="generated", layers=[layer], prompt_len=max(n - tail, 0))
        with ctx:
            out.append(model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1, :].float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------- train / evaluate
def train(model, fmt: ChatFormat, items: list[ABItem], *, model_id: str = "", batch_size: int = 16,
          progress: bool = True) -> SteeringVector:
    """The CAA vector at every layer: mean(h(matching letter) − h(non-matching letter)) at the letter token."""
    pad = fmt.tokenizer.pad_token_id
    pos, neg = [], []
    for it in items:
        prefix, m, n = _letter_ids(fmt, it)
        pos.append(prefix + [m])
        neg.append(prefix + [n])
    total = None
    for s in tqdm(range(0, len(items), batch_size), desc="CAA activations", disable=not progress, leave=False):
        d = (last_token_residuals(model, pos[s : s + batch_size], pad, batch_size).double()
             - last_token_residuals(model, neg[s : s + batch_size], pad, batch_size).double()).sum(0)
        total = d if total is None else total + d
    diffs = (total / len(items)).float()
    rows = [{"q": it.question, "m": it.matching, "n": it.not_matching} for it in items]
    return SteeringVector({layer: diffs[layer] for layer in range(diffs.shape[0])}, model_id, model_hash(model),
                          "answer letter", "raw", "CAA (mean difference at the answer-letter token)",
                          dataset_hash(rows), {"n_pairs": len(items)})


def matching_probability(model, fmt: ChatFormat, items: list[ABItem], sv: SteeringVector | None = None,
                         layer: int | None = None, multiplier: float = 0.0, batch_size: int = 16,
                         tail: int | None = None) -> float:
    """Mean over items of P(matching letter) / (P(A) + P(B)) at the letter position, with ``multiplier · sv[layer]``
    added at every position, or at the last ``tail`` prompt tokens only (e.g. ``fmt.n_post``, the tokens after the
    instruction); no steering when ``sv`` is None or the multiplier is 0."""
    trip = [_letter_ids(fmt, it) for it in items]
    rows = [t[0] for t in trip]
    pad = fmt.tokenizer.pad_token_id
    logits = _last_logits(model, rows, pad, batch_size, sv, layer, multiplier, tail)
    lp = torch.log_softmax(logits.double(), -1)
    m = torch.tensor([t[1] for t in trip])
    n = torch.tensor([t[2] for t in trip])
    pm, pn = lp.gather(1, m[:, None]).exp().squeeze(1), lp.gather(1, n[:, None]).exp().squeeze(1)
    return float((pm / (pm + pn)).mean())


def layer_sweep(model, fmt, items, sv: SteeringVector, layers: list[int], multipliers=(-1.0, 1.0),
                after_instruction: bool = True, progress: bool = True) -> dict:
    """P(matching) at each layer for each multiplier, plus the unsteered baseline; the best layer is the one
    with the largest P(max multiplier) − P(min multiplier). ``after_instruction`` steers only the tokens after
    the instruction (the template's post-instruction tokens, as CAA does), else every position."""
    tail = fmt.n_post if after_instruction else None
    base = matching_probability(model, fmt, items)
    table = {}
    for layer in tqdm(layers, desc="CAA layer sweep", disable=not progress, leave=False):
        table[layer] = {m: matching_probability(model, fmt, items, sv, layer, m, tail=tail) for m in multipliers}
    lo, hi = min(multipliers), max(multipliers)
    best = max(layers, key=lambda layer: table[layer][hi] - table[layer][lo])
    return {"baseline": base, "multipliers": list(multipliers), "layers": layers, "after_instruction": after_instruction,
            "p": {str(k): {str(m): v for m, v in d.items()} for k, d in table.items()}, "best_layer": best}


def multiplier_sweep(model, fmt, items, sv: SteeringVector, layer: int, multipliers: list[float],
                     after_instruction: bool = True, progress: bool = True) -> dict:
    tail = fmt.n_post if after_instruction else None
    ps = [matching_probability(model, fmt, items, sv, layer, m, tail=tail)
          for m in tqdm(multipliers, desc="CAA multiplier sweep", disable=not progress, leave=False)]
    steps = [b - a for a, b in zip(ps, ps[1:], strict=False)]
    return {"layer": layer, "multipliers": list(multipliers), "p": ps,
            "monotonic_increasing": all(s > 0 for s in steps), "non_decreasing": all(s >= 0 for s in steps)}


def generate_steered(model, fmt: ChatFormat, prompts: list[str], sv: SteeringVector, layer: int,
                     multipliers: list[float], *, positions: str = "all", max_new_tokens: int = 64,
                     progress: bool = True) -> dict[float, list[str]]:
    """Open-ended greedy completions under each multiplier (0 = unsteered)."""
    out = {}
    for m in multipliers:
        with steer(model, sv, m, positions=positions, layers=[layer]):
            out[m] = generate(model, fmt, prompts, max_new_tokens=max_new_tokens, progress=progress,
                              desc=f"generate ×{m:g}")
    return out


# ---------------------------------------------------------------------------- plots
def plot_layer_sweep(res: dict) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    layers = res["layers"]
    for m in res["multipliers"]:
        ax.plot(layers, [res["p"][str(layer)][str(m)] for layer in layers], marker=".", label=f"multiplier {m:g}")
    ax.axhline(res["baseline"], color="gray", ls="--", lw=1, label="no steering")
    ax.axvline(res["best_layer"], color="red", lw=1, alpha=0.5)
    ax.set_xlabel("layer (input of block)")
    ax.set_ylabel("P(matching answer letter)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return figure_html(fig)


def plot_multiplier_sweep(res: dict, baseline: float | None = None) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(res["multipliers"], res["p"], marker="o")
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", lw=1, label="no steering")
        ax.legend(fontsize=8)
    ax.set_xlabel("multiplier")
    ax.set_ylabel("P(matching answer letter)")
    ax.set_ylim(0, 1)
    ax.set_title(f"layer {res['layer']}", fontsize=9)
    return figure_html(fig)


# ---------------------------------------------------------------------------- the whole study
def sweep_report(model, fmt, items: list[ABItem], sv: SteeringVector, out_dir: str | Path,
                 layers: list[int] | None = None, multipliers: list[float] | None = None,
                 after_instruction: bool = True, progress: bool = True) -> dict:
    """Layer sweep (±1) on the test items, multiplier sweep at the best layer, ``sweep.json`` and a report
    section in ``out_dir`` (which must exist)."""
    L = inspect_model(model).n_layers
    layers = layers if layers is not None else list(range(max(1, L // 4), (3 * L) // 4 + 1))
    multipliers = multipliers if multipliers is not None else [-2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2]
    ls = layer_sweep(model, fmt, items, sv, layers, after_instruction=after_instruction, progress=progress)
    ms = multiplier_sweep(model, fmt, items, sv, ls["best_layer"], multipliers, after_instruction, progress)
    res = {"n_items": len(items), "layer_sweep": ls, "multiplier_sweep": ms}
    atomic_write_json(Path(out_dir) / "sweep.json", res)
    body = (f"<p>{len(items)} test items; vector norm convention {sv.norm}; steering "
            f"{'after the instruction' if after_instruction else 'at every position'}. Best layer "
            f"<b>{ls['best_layer']}</b> (largest P(+1) − P(−1)); unsteered P(matching) {ls['baseline']:.3f}; "
            f"monotonic over the multipliers: <b>{ms['monotonic_increasing']}</b>.</p>"
            + plot_layer_sweep(ls) + plot_multiplier_sweep(ms, ls["baseline"])
            + table_html([[f"{m:g}", f"{p:.4f}"] for m, p in zip(ms["multipliers"], ms["p"], strict=True)],
                         ["multiplier", "P(matching)"]))
    RunDir(out_dir).add_section("caa_sweep", body, "CAA: layer and multiplier sweeps")
    write_sections_report(out_dir)
    return res
