"""One self-contained ``report.html`` per run, with embedded PNG plots."""

from __future__ import annotations

import html
import json
import math
import textwrap
from collections import Counter
from pathlib import Path

from refdir.core.html import (
    PAGE_TAIL,
    figure_html,
    page_head,
    plt,
    table_html,
    warnings_html,
    write_sections_report,
)
from refdir.core.io import atomic_write_text
from refdir.core.rundir import RunDir
from refdir.method.refusal_judge import marker
from refdir.method.search.report import draw_reference, reference_models
from refdir.method.uncertainty import CONFIDENCE, count, mcnemar, rate_text, wilson


def add_section(run_dir: str | Path, name: str, body_html: str, title: str | None = None) -> Path:
    """Add (or replace) one named section of a run's report (:meth:`RunDir.add_section`) and re-render
    ``report.html``; a directory without a run summary gets a report of its sections alone."""
    RunDir(run_dir).add_section(name, body_html, title)
    return write_report(run_dir)


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else float("nan")


def plot_selection(rows: list[dict], chosen: dict | None, kl_max: float) -> str:
    """Bypass, induce and KL against layer, one line per position. Lines show the screening
    scores of every candidate (8+8 val prompts) where screening ran; dots show full scores."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    positions = sorted({r["position"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, title in zip(axes, ("bypass", "induce", "kl"),
                              ("bypass: refusal metric, harmful val, ablation",
                               "induce: refusal metric, harmless val, addition", "KL(base‖ablated), harmless val"),
                              strict=True):
        for ci, p in enumerate(positions):
            col = colors[ci % len(colors)]
            rs = sorted((r for r in rows if r["position"] == p), key=lambda r: r["layer"])
            xs = [r["layer"] for r in rs]
            screen = [_num(r.get(key + "_screen")) for r in rs]
            full = [_num(r[key]) for r in rs]
            if any(math.isfinite(v) for v in screen):
                ax.plot(xs, screen, color=col, lw=1, alpha=0.8, label=f"pos {p} (screen)")
                ax.plot(xs, full, "o", color=col, ms=4)
            else:
                ax.plot(xs, full, marker=".", color=col, label=f"pos {p}")
        if chosen:
            ax.scatter([chosen["layer"]], [chosen[key]], s=140, facecolors="none", edgecolors="red", linewidths=2,
                       zorder=5, label="chosen")
        if key == "kl":
            ax.axhline(kl_max, color="gray", ls="--", lw=1)
            ax.set_yscale("log")
        if key == "induce":
            ax.axhline(0, color="gray", ls="--", lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
    axes[0].legend(fontsize=7)
    return figure_html(fig)


def plot_refusal_bars(scores: dict, ckpt: dict | None) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels, vals, colors = [], [], []
    for k, v in scores.items():
        labels.append(k.replace("/", "\n"))
        vals.append(v["refusal"])
        colors.append("#c0392b" if k.endswith("harmful") else "#2874a6")
    if ckpt:
        labels.append("checkpoint\nharmful")
        vals.append(ckpt["refusal"])
        colors.append("#922b21")
    ax.bar(range(len(vals)), vals, color=colors)
    for i, v in enumerate(vals):
        ax.text(i, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(vals)), labels, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share of prompts refused")
    ax.set_title("each bar: arm, set (test or held-out), prompts (red harmful, blue harmless)", fontsize=8)
    return figure_html(fig)


def plot_metric_hist(metrics: dict) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, xs in metrics.items():
        ax.hist(xs, bins=25, alpha=0.5, label=k)
    ax.axvline(0, color="gray", ls="--", lw=1)
    ax.set_xlabel("refusal metric (log-odds of refusal tokens, first answer position)")
    ax.legend(fontsize=8)
    return figure_html(fig)


def write_report(run_dir: str | Path) -> Path:
    """Render ``RUN_DIR/report.html`` from the run's files and its extra sections. A directory without a run
    summary (e.g. ``refdir eval --out DIR``) gets a report of its sections alone."""
    rd = RunDir(run_dir)
    summ = rd.summary()
    if summ is None:
        return write_sections_report(rd.path)
    parts = [page_head(), f"<h1>refdir report: {html.escape(str(summ['model']))}</h1>"]
    parts.append(warnings_html(summ.get("warnings", [])))
    if summ.get("method") == "search":
        return _write(rd, parts + _search_run_parts(rd, summ), summ)
    sel = rd.selection_meta()
    parts += _selection_notes(summ, sel)
    parts += _refusal_parts(rd, summ)
    parts.append("<h2>Candidate scores</h2>" + plot_selection(rd.selection_table(), sel["chosen"],
                                                               sel["config"]["kl_max"]))
    metrics = rd.metrics()
    if metrics is not None:
        parts.append("<h2>Refusal metric</h2>" + plot_metric_hist(metrics))
    comp = rd.completions()
    if comp is not None:
        parts.append("<h2>Example completions</h2>" + _examples(comp))
    return _write(rd, parts, summ)


def _write(rd: RunDir, parts: list[str], summ: dict) -> Path:
    parts.extend(rd.sections())
    parts.append("<h2>Timings (s)</h2>" + timings_html(summ))
    parts.append(PAGE_TAIL)
    atomic_write_text(rd.report_path, "\n".join(parts))
    return rd.report_path


def timings_html(summ: dict) -> str:
    """This invocation's seconds per stage; a stage it reused (a rerun) shows the time it took when computed."""
    t, reused, computed = summ["timings_s"], summ.get("reused", []), summ.get("computed_s", {})
    keys = [x for k in t for x in [k, *(c for c in computed if c.startswith(k + ".") and c not in t)]]

    def note(k: str) -> str:
        if k.split(".")[0] not in reused:
            return ""
        return f"reused; computed in {computed[k]:g} s by an earlier invocation" if k in computed else "reused"

    note_html = ("<p class='note'>total: this invocation's wall time. A rerun reads back the stages whose settings "
                 "and files are unchanged.</p>" if reused else "")
    return table_html([[k, t.get(k, ""), note(k)] for k in keys], ["stage", "s", ""]) + note_html


def _selection_notes(summ: dict, sel: dict) -> list[str]:
    """The chosen direction (or the all-filtered diagnostic), the induce rule and the refusal tokens."""
    ch = sel["chosen"]
    if ch:
        first = (f"<p>Chosen direction: position <b>{ch['position']}</b>, layer <b>{ch['layer']}</b> of "
                 f"{summ['selection']['n_layers']} (bypass {ch['bypass']:.2f}, induce {ch['induce']:.2f}, "
                 f"KL {ch['kl']:.3f}).</p>")
    else:
        first = (f"<p class='note'>Every candidate was filtered out.<br><pre>{html.escape(sel['diagnostic'] or '')}"
                 "</pre></p>")
    rule = (f"<p class='note'>Induce rule that decided: <b>{html.escape(sel['rule'])}</b>. Baseline refusal "
            f"metric on val: harmful {sel['baseline']['harmful']:.2f}, harmless {sel['baseline']['harmless']:.2f}. "
            f"Filters removed: {html.escape(json.dumps(sel['filter_counts']))}.</p>")
    tokens = (f"<p>Refusal tokens: {html.escape(', '.join(repr(t) for t in summ['refusal_tokens']))}. "
              f"Judge: {summ['judge']} (the paper's substring list is reported beside it).</p>")
    return [first, rule, tokens]


def _refusal_parts(rd: RunDir, summ: dict) -> list[str]:
    """The headline table of refusal on the test split, the addition coefficient and the refusal bars."""
    head = ["arm / prompts", f"refusal ({summ['judge']}; count, {CONFIDENCE:.0%} Wilson interval)",
            "refusal (paper substrings)", "degenerate", "n"]
    trs = [[k, rate_text(v["refusal"], v["n"]), f"{v['refusal_paper']:.3f}", v["degenerate"], v["n"]]
           for k, v in summ["refusal"].items()]
    if summ.get("checkpoint"):
        c = summ["checkpoint"]
        trs.append(["orthogonalized checkpoint / harmful", rate_text(c["refusal"], c["n"]),
                    f"{c['refusal_paper']:.3f}", c["degenerate"], c["n"]])
    parts = ["<h2>Refusal on the test split</h2>" + table_html(trs, head)]
    if summ.get("addition_coeff"):
        parts.append(f"<p>Addition coefficient: {summ['addition_coeff']['coeff']} "
                     f"({html.escape(summ['addition_coeff']['rule'])}).</p>")
    scores = rd.scores()
    if scores is not None:
        parts.append(plot_refusal_bars(scores, summ.get("checkpoint")))
    return parts


def _examples(comp: dict) -> str:
    """The first four test prompts of each kind with their baseline, ablation and addition completions."""
    ex = []
    arms = comp["completions"]
    for kind in ("harmful", "harmless"):
        for i, prompt in enumerate(comp["prompts"][kind][:4]):
            ex.append([kind, prompt] + [arms.get(f"{a}/{kind}", [""] * (i + 1))[i][:300]
                                        for a in ("baseline", "ablation", "addition")])
    return table_html(ex, ["set", "prompt", "baseline", "ablation", "addition"])


ARM_NAMES = {"base": "base model", "plain": "plain direction (selection, full ablation)", "chosen": "chosen edit"}


def test_rows(test: dict):
    """The test table of a run with the search, held-out set first: ``(set, arm, harmful scores, harmless scores or
    None, first-token KL or None)`` for every arm generated on a set's harmful prompts (the base model's KL is 0)."""
    sc, kl = test["scores"], test["kl"]
    for name in ("heldout", "test"):
        for arm in ("base", "plain", "chosen"):
            h = sc.get(f"{arm}/{name}/harmful")
            if h is not None:
                yield name, arm, h, sc.get(f"{arm}/{name}/harmless"), 0.0 if arm == "base" else kl.get(f"{arm}/{name}")


def answered_kl_text(test: dict) -> str:
    """One sentence: the first-token KL over the harmless prompts the base model answers beside the mean over all of
    them, for each edited arm of the headline set ("" for runs without the figure)."""
    ka = test.get("kl_answered") or {}
    if not ka:
        return ""
    parts = [f"{ARM_NAMES[k.split('/')[0]]} {v['kl']:.4f} (all: {test['kl'][k]:.4f})" for k, v in ka.items()]
    name, n = next(iter(ka)).split("/")[1], next(iter(ka.values()))["n"]
    return (f"First-token KL over the {n} {name} harmless prompts the base model answers: " + "; ".join(parts)
            + ". The ones it refuses are over-refusals the edit is meant to change; they count in the KL above.")


def calibration_text(c: dict) -> str:
    """The chosen edit's first-token KL on the harmless calibration prompts, the figure held to the KL target (the
    proxy KL, on fewer prompts, only ranks the search's trials), before and after the second direction."""
    sec, val = c.get("second") or {}, c.get("val") or {}
    if "kl" not in val:
        return ""
    txt = f"; calibration KL {val['kl']:.4f} on {val['n_kl']} harmless train prompts"
    if sec.get("added"):
        txt += f", {sec['calibration_kl']:.4f} with the second direction at {sec['strength']:g}"
    return txt


def _search_run_parts(rd: RunDir, summ: dict) -> list[str]:
    """A run with the search: the headline table per test set (cross-source first, labelled), the choice, the
    refusal bars and example completions; the search's own section (the front) follows from the sections."""
    t, c = summ["test"], summ["choice"]
    parts = [f"<p>Chosen edit: <b>{html.escape(c['describe'])}</b> (trial {c['trial']}; {html.escape(c['reason'])}; "
             f"proxy refusal metric {c['proxy_refusal']:.2f}, proxy KL {c['proxy_kl']:.4f}{calibration_text(c)}; "
             f"KL target {c['kl_target']:g}). Search: {summ['search']['n_trials']} trials in {summ['search']['spent_s']:.0f} s "
             f"of a {summ['search']['budget_s']:.0f} s budget; chosen on val and harmless train prompts only.</p>"]
    rows = [[name, ARM_NAMES[arm], rate_text(h["refusal"], h["n"]),
             f"{h['refusal_paper']:.3f}", rate_text(b["refusal"], b["n"]) if b else "—",
             f"{k:.4f}" if k is not None else "—", h["degenerate"]] for name, arm, h, b, k in test_rows(t)]
    head = ["set", "arm", f"harmful refusal ({summ['judge']})", "paper substrings", "harmless refusal",
            "first-token KL", "degenerate"]
    notes = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in t["relation"].items())
    parts.append("<h2>Refusal on prompts the edit never saw</h2>" + table_html(rows, head)
                 + f"<ul class='note'>{notes}</ul><p class='note'>Greedy, {t['max_new_tokens']} new tokens on harmful prompts, "
                 f"{t.get('harmless_tokens') or t['max_new_tokens']} on harmless ones"
                 + ("; a refusal ends once its verdict is settled, so its text stops at the phrase" if t.get("stop_settled")
                    else "") + ". Refusal rates are given with "
                 f"their count and {CONFIDENCE:.0%} Wilson interval: two arms whose intervals overlap widely may "
                 "differ by sampling alone.</p>")
    answered = answered_kl_text(t)
    if answered:
        parts.append(f"<p class='note'>{html.escape(answered)}</p>")
    parts.append(_paired(rd.scores()))
    parts.append(plot_refusal_bars(t["scores"], None))
    if "heldout" in t["relation"] or summ.get("reference"):
        parts.append(plot_heldout(summ))
    ck = summ.get("checkpoint")
    if ck:
        v = ck["verified"]
        gg = f"; GGUF: {html.escape(ck['gguf']['path'])}" if ck.get("gguf") else ""
        parts.append(f"<p>Checkpoint: {html.escape(ck['path'])}{gg}. Weights against hooks on {v['n_prompts']} "
                     f"prompts: KL {v['kl_hooks_weights']:.2e}, top-1 agreement {v['top1_agree']:.2f}, max |Δlogit| "
                     f"{v['max_abs_logit_diff']:.3f}.</p>")
    comp = rd.completions()
    if comp is not None:
        parts.append("<h2>Example completions</h2>" + _search_examples(comp))
        ev = rd.scores()
        if ev and ev.get("scores"):
            parts.append(still_refused_html(comp, ev, summ["judge"]))
    return parts


def still_refused(comp: dict, test: dict, judge: str) -> tuple[str, list[tuple[str, str, str]]]:
    """The headline set's name (held-out when there is one) and each of its harmful prompts that the chosen edit
    still refuses: (prompt, completion, the judge's phrase that counted it). ``test``: the eval's scores file
    (its per-prompt flags), ``comp`` its completions file."""
    name = "heldout" if "heldout" in test["relation"] else "test"
    key = f"chosen/{name}/harmful"
    flags = (test["scores"].get(key) or {}).get("flags") or []
    prompts = [r[3] for r in comp["rows"] if r[:3] == ["chosen", name, "harmful"]]
    gen = comp["completions"].get(key) or []
    return name, [(p, c, marker(c, judge) or "?") for p, c, f in zip(prompts, gen, flags, strict=False) if f]


def still_refused_html(comp: dict, test: dict, judge: str) -> str:
    """What the chosen edit still refuses on the headline set, with the phrase counted and a tally by phrase."""
    name, rows = still_refused(comp, test, judge)
    if not rows:
        return ""
    by = ", ".join(f"“{html.escape(m)}” {n}" for m, n in Counter(m for _, _, m in rows).most_common())
    return (f"<h2>Still refused by the chosen edit ({name}, {len(rows)})</h2><p class='note'>The {judge} judge "
            f"counts a completion as a refusal when it contains one of its phrases anywhere; the first phrase found, "
            f"by count: {by}. A preamble such as “As an AI language model, …” counts even when an answer "
            "follows.</p>" + table_html([[p, c[:400], m] for p, c, m in rows], ["prompt", "completion", "phrase"]))


def _paired(ev: dict | None) -> str:
    """The chosen edit against the plain direction and the base model on the same harmful prompts of each set:
    the prompts only one of the two refuses, and the exact McNemar p-value of that split."""
    sc = (ev or {}).get("scores") or {}
    items = []
    for name in ("heldout", "test"):
        ch = sc.get(f"chosen/{name}/harmful")
        for other in ("plain", "base"):
            o = sc.get(f"{other}/{name}/harmful")
            if not (ch and o and ch.get("flags") and o.get("flags")):
                continue
            only_o, only_c, p = mcnemar(o["flags"], ch["flags"])
            items.append(f"<li>{name}, chosen edit against the {ARM_NAMES[other]} on the same {len(ch['flags'])} "
                         f"prompts: {only_o} refused only by the {other} arm, {only_c} only by the chosen edit "
                         f"(exact McNemar p = {p:.2g})</li>")
    return f"<ul class='note'>{''.join(items)}</ul>" if items else ""


def plot_heldout(summ: dict) -> str:
    """Refusals against first-token KL on the held-out set (else the test split) for the base model, the plain
    direction and the chosen edit, with another tool's points where given (scaled to the same prompt count)."""
    t = summ["test"]
    name = "heldout" if "heldout" in t["relation"] else "test"
    fig, ax = plt.subplots(figsize=(6.5, 4))
    n = None
    for arm, mk, col in (("base", "s", "k"), ("plain", "*", "C1"), ("chosen", "o", "C3")):
        h = t["scores"].get(f"{arm}/{name}/harmful")
        if h is None:
            continue
        n = h["n"]
        k = max(t["kl"].get(f"{arm}/{name}", 0.0), 1e-4)
        c = count(h["refusal"], n)
        lo, hi = wilson(c, n)
        ax.errorbar([k], [c], yerr=[[c - lo * n], [hi * n - c]], fmt=mk, color=col, ms=10, capsize=3,
                    label=ARM_NAMES[arm] + (" (KL 0, drawn at 1e-4)" if arm == "base" else ""))
    draw_reference(ax, summ.get("reference"), n, 1e-4)
    ax.axvline(summ["choice"]["kl_target"], ls="--", c="0.6", lw=1, label=f"KL target {summ['choice']['kl_target']:g}")
    ax.set_xscale("log")
    ax.set_xlabel(f"first-token KL on the {name} harmless prompts")
    ax.set_ylabel(f"refusals of {n} {name} harmful prompts\n({summ['judge']} judge; {CONFIDENCE:.0%} interval)")
    ax.set_ylim(bottom=0)
    refs = summ.get("reference")
    ax.set_title(textwrap.fill("other tools' points were measured on their own data and machine"
                               + reference_models(refs), 90) if refs else name, fontsize=8)
    ax.legend(fontsize=7)
    return figure_html(fig)


def _search_examples(comp: dict) -> str:
    """The first three harmful prompts of each test set, with every arm's completion."""
    rows, gen = comp["rows"], comp["completions"]
    out = []
    for name in ("heldout", "test"):
        prompts = [r[3] for r in rows if r[0] == "base" and r[1] == name and r[2] == "harmful"][:3]
        for i, p in enumerate(prompts):
            out.append([name, p] + [gen.get(f"{a}/{name}/harmful", [""] * (i + 1))[i][:300]
                                    for a in ("base", "plain", "chosen")])
    return table_html(out, ["set", "prompt", "base", "plain", "chosen"])
