"""Bias steering: stereotype − anti-stereotype vectors per category, and how they relate to refusal.

Data: StereoSet's intrasentence format — ``{"data": {"intrasentence": [ITEM, ...]}}`` (or a JSON
list / jsonl of items), each item ``{"context": "... BLANK ...", "bias_type", "target",
"sentences": [{"sentence", "gold_label": "stereotype" | "anti-stereotype" | "unrelated"}]}``.
The embedded sample (team-written, 24 items: gender, profession, age) uses the same format.

The bias vector of a category is the mean over its items of the residual at the last token of
the stereotype sentence minus that of the anti-stereotype sentence (plain text, no chat
template), at every layer. The stereotype-preference probability of an item is
``σ(log P(stereotype sentence) − log P(anti-stereotype sentence))``, averaged over a category,
reported under multipliers of the category's vector added at one layer (every position).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refdir.core.activations import last_token_residuals
from refdir.core.direction_paths import load_direction
from refdir.core.forward import left_pad
from refdir.core.html import figure_html, plt, table_html, write_sections_report
from refdir.core.io import atomic_dir, atomic_write_json, read_json_records
from refdir.core.rundir import RunDir
from refdir.errors import RefdirError
from refdir.steering.vectors import SteeringVector, dataset_hash, model_hash, steer

LABELS = ("stereotype", "anti-stereotype", "unrelated")


@dataclass
class BiasItem:
    bias_type: str
    target: str
    context: str
    stereotype: str
    anti_stereotype: str
    unrelated: str = ""


def _items(rows: list, src: str) -> list[BiasItem]:
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "sentences" not in r or "bias_type" not in r:
            raise RefdirError(f"{src}: item {i} is not a StereoSet intrasentence item "
                              "(needs bias_type, context and sentences with gold_label)")
        by = {}
        for s in r["sentences"]:
            label = s.get("gold_label")
            if label not in LABELS:
                raise RefdirError(f"{src}: item {i} has a sentence with gold_label {label!r}; expected one of {LABELS}")
            by[label] = s["sentence"]
        if "stereotype" not in by or "anti-stereotype" not in by:
            raise RefdirError(f"{src}: item {i} lacks a stereotype or anti-stereotype sentence")
        out.append(BiasItem(str(r["bias_type"]), str(r.get("target", "")), str(r.get("context", "")),
                            by["stereotype"], by["anti-stereotype"], by.get("unrelated", "")))
    if not out:
        raise RefdirError(f"{src} holds no intrasentence items")
    return out


def load_stereoset(spec: str | Path = "embedded") -> list[BiasItem]:
    """Intrasentence items from ``embedded`` or a StereoSet ``.json`` / ``.jsonl`` file."""
    if str(spec) == "embedded":
        data = json.loads(resources.files("refdir.assets").joinpath("stereoset_sample.json").read_text())
        return _items(data["data"]["intrasentence"], "embedded StereoSet sample")
    p = Path(spec)
    data = read_json_records(p, "StereoSet")
    try:
        rows = data["data"]["intrasentence"] if isinstance(data, dict) and "data" in data else data
    except (KeyError, TypeError) as e:
        raise RefdirError(f"could not read {p} as StereoSet intrasentence data: {e}") from e
    if not isinstance(rows, list):
        raise RefdirError(f"{p}: expected a list of intrasentence items")
    return _items(rows, str(p))


def by_category(items: list[BiasItem]) -> dict[str, list[BiasItem]]:
    out: dict[str, list[BiasItem]] = {}
    for it in items:
        out.setdefault(it.bias_type, []).append(it)
    return out


def _ids(tok, text: str) -> list[int]:
    ids = tok(text, add_special_tokens=True)["input_ids"]
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    return ids


def category_vectors(model, tok, items: list[BiasItem], *, model_id: str = "", batch_size: int = 16
                     ) -> dict[str, SteeringVector]:
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    mh = model_hash(model)
    out = {}
    for cat, its in by_category(items).items():
        s = last_token_residuals(model, [_ids(tok, it.stereotype) for it in its], pad, batch_size).double()
        a = last_token_residuals(model, [_ids(tok, it.anti_stereotype) for it in its], pad, batch_size).double()
        diff = (s - a).mean(0).float()
        out[cat] = SteeringVector({layer: diff[layer] for layer in range(diff.shape[0])}, model_id, mh, -1, "raw",
                                  f"bias vector: mean(stereotype − anti-stereotype), {cat}",
                                  dataset_hash([[it.stereotype, it.anti_stereotype] for it in its]),
                                  {"category": cat, "n_items": len(its)})
    return out


@torch.no_grad()
def _logprob(model, rows: list[list[int]], pad: int) -> torch.Tensor:
    """Sum of token log-probabilities of each row after its first token."""
    dev = next(model.parameters()).device
    enc = left_pad(rows, pad, dev)
    lp = torch.log_softmax(model(**enc, use_cache=False).logits.float(), -1)[:, :-1]
    tgt = enc["input_ids"][:, 1:]
    tok_lp = lp.gather(2, tgt.unsqueeze(-1)).squeeze(-1) * enc["attention_mask"][:, 1:]
    return tok_lp.sum(1).cpu().double()


def preference(model, tok, items: list[BiasItem], sv: SteeringVector | None = None, layer: int | None = None,
               multiplier: float = 0.0) -> dict:
    """Mean σ(log P(stereotype) − log P(anti-stereotype)) and the share of items preferring the stereotype."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = [_ids(tok, it.stereotype) for it in items] + [_ids(tok, it.anti_stereotype) for it in items]
    ctx = nullcontext() if sv is None or multiplier == 0 else steer(model, sv, multiplier, layers=[layer])
    with ctx:
        lp = _logprob(model, rows, pad)
    d = lp[: len(items)] - lp[len(items):]
    return {"p": float(torch.sigmoid(d).mean()), "share": float((d > 0).double().mean())}


def study(lm, out: str | Path, *, direction: str | Path, data: str = "embedded", layer: int | None = None,
          multipliers: list[float] | None = None, force: bool = False, progress: bool = True) -> dict:
    """Category vectors, the cosine table (with r) and preference curves; everything in ``out`` (atomic)."""
    items = load_stereoset(data)
    r = load_direction(direction)  # a direction file, or a run dir standing for its direction
    arch = SteeringVector.from_direction(r).check_fits(lm.model)
    layer = r.layer if layer is None else layer
    if not 0 <= layer < arch.n_layers:
        raise RefdirError(f"layer {layer} outside 0..{arch.n_layers - 1}")
    multipliers = multipliers if multipliers is not None else [-4, -2, -1, 0, 1, 2, 4]
    tok = lm.tokenizer
    with atomic_dir(out, force=force) as tmp:
        vecs = category_vectors(lm.model, tok, items, model_id=lm.model_id)
        for cat, sv in vecs.items():
            sv.save(tmp / "vectors" / cat)
        cats = list(vecs)
        names = cats + ["refusal r"]
        vs = [vecs[c][layer] for c in cats] + [r.vector.float()]
        cos = [[float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for b in vs] for a in vs]
        groups = by_category(items)
        curves = {c: [preference(lm.model, tok, groups[c], vecs[c], layer, m)
                      for m in tqdm(multipliers, desc=f"bias {c}", disable=not progress, leave=False)] for c in cats}
        summary = {"layer": layer, "categories": cats, "cosine_with_r": {c: cos[i][-1] for i, c in enumerate(cats)},
                   "multipliers": multipliers, "preference": {c: [x["p"] for x in v] for c, v in curves.items()},
                   "norms": {c: vecs[c].norms()[layer] for c in cats}}
        res = {"summary": summary, "cosine": {"names": names, "matrix": cos}, "curves": curves,
               "n_items": {c: len(g) for c, g in groups.items()}, "direction": str(direction)}
        atomic_write_json(tmp / "bias.json", res)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for c in cats:
            ax.plot(multipliers, summary["preference"][c], marker="o", label=f"{c} ({len(groups[c])} items)")
        ax.axhline(0.5, color="gray", ls="--", lw=1)
        ax.set_xlabel(f"multiplier of the category's bias vector (layer {layer})")
        ax.set_ylabel("P(stereotype preferred)")
        ax.legend(fontsize=8)
        body = ("<p>Bias vectors: mean(stereotype − anti-stereotype) at the last token of plain sentences. "
                f"Cosines at layer {layer} (r: layer {r.layer}, position {r.position}).</p>"
                + table_html([[n] + [f"{x:.3f}" for x in row] for n, row in zip(names, cos, strict=True)],
                             [""] + names)
                + figure_html(fig))
        RunDir(tmp).add_section("bias", body, "Bias steering")
        write_sections_report(tmp)
    return res
