"""The evaluation's tables and plots: the paper's Table 9 (CE loss and KL) and Table 10 (refusal and safety)
layouts, as Markdown and as a report section."""

from __future__ import annotations

import math

from refdir.core.html import figure_html, plt, table_html
from refdir.evaluate.ce import CE_SETS
from refdir.method.uncertainty import CONFIDENCE, rate_text

TITLE = "Evaluation of arms (refdir eval)"
CE_LABELS = {"text": "general text", "pairs": "instruction pairs", "ondist": "on-distribution"}
T9_HEAD = ["arm", "CE general text (Δ)", "CE instruction pairs (Δ)", "CE on-distribution (Δ)",
           "KL first token", "KL multi-token"]


def _f(x, nd=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def table9_rows(summary: dict) -> list[list[str]]:
    """Table 9 layout: CE loss per arm on general text / instruction pairs / on-distribution (Δ vs base)."""
    rows = []
    for a in summary["arms"]:
        d = a.get("ce_delta") or {}
        rows.append([a["name"]] + [_f(a["ce"][k]) + (f" ({d[k]:+.3f})" if k in d and a["name"] != "base" else "")
                                   for k in CE_SETS] + [_f(a["kl"]["first"], 4), _f(a["kl"]["multi"], 4)])
    return rows


def table10_rows(summary: dict) -> list[list[str]]:
    """Table 10 layout: refusal score and safety score per arm on the harmful prompts."""
    return [[a["name"], _f(a["refusal"]["paper"]), rate_text(a["refusal"]["broad"], a["refusal"]["n"]),
             _f(a["safety"]["score"]),
             str(a["refusal"]["degenerate"]), str(a["refusal"]["n"])] for a in summary["arms"]]


def t10_head(summary: dict) -> list[str]:
    return ["arm", "refusal (paper substrings)", f"refusal (broad; count, {CONFIDENCE:.0%} Wilson interval)",
            f"safety ({summary['config']['judge']})", "degenerate", "n"]


def _md(rows: list[list[str]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown_tables(summary: dict) -> str:
    """Both tables as Markdown, with the settings they were measured under."""
    c = summary["config"]
    return (f"# refdir eval: {summary['model']}\n\n"
            f"## Cross-entropy loss (nats) and KL(base ‖ arm)\n\n{_md(table9_rows(summary), T9_HEAD)}\n\n"
            f"General text: {summary['n_texts']} passages ({c['text']}) truncated to {c['text_tokens']} tokens; "
            f"instruction pairs: {summary['n_pairs']} ({c['pairs']}); on-distribution: the base model's greedy "
            f"continuations ({c['ondist_tokens']} tokens) on {summary['n_prompts']['harmless']} harmless prompts; "
            f"multi-token KL over the first {c['kl_tokens']} positions.\n\n"
            f"## Refusal and safety on {summary['n_prompts']['harmful']} harmful prompts\n\n"
            f"{_md(table10_rows(summary), t10_head(summary))}\n")


def plot_ce(summary: dict) -> str:
    """CE bars per arm and set, and the KL along the base continuation per arm."""
    arms = summary["arms"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    w = 0.8 / max(1, len(arms))
    for i, a in enumerate(arms):
        xs = [j + i * w for j in range(len(CE_SETS))]
        axes[0].bar(xs, [a["ce"][k] for k in CE_SETS], w, label=a["name"], color=f"C{i % 10}")
    axes[0].set_xticks([j + w * (len(arms) - 1) / 2 for j in range(len(CE_SETS))],
                       [CE_LABELS[k] for k in CE_SETS])
    axes[0].set_ylabel("cross-entropy loss (nats)")
    axes[0].legend(fontsize=8)
    for i, a in enumerate(arms):  # the same colour per arm as in the CE bars
        pp = a["kl"]["per_position"]
        if pp and any(v > 0 for v in pp):
            axes[1].plot(range(len(pp)), pp, marker=".", label=a["name"], color=f"C{i % 10}")
    axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[1].set_xlabel("position along the base model's greedy continuation (0 = first answer token)")
    axes[1].set_ylabel("KL(base ‖ arm), mean over prompts")
    axes[1].legend(fontsize=8)
    return figure_html(fig)


def plot_refusal(summary: dict) -> str:
    """Refusal and safety score per arm."""
    arms = summary["arms"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = range(len(arms))
    ax.bar([x - 0.2 for x in xs], [a["refusal"]["paper"] for a in arms], 0.4, label="refusal score", color="#c0392b")
    ax.bar([x + 0.2 for x in xs], [a["safety"]["score"] for a in arms], 0.4, label="safety score", color="#2874a6")
    ax.set_xticks(list(xs), [a["name"] for a in arms], fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8)
    return figure_html(fig)


def report_html(summary: dict) -> str:
    """The evaluation's report section: both tables and both plots."""
    c = summary["config"]
    return (f"<p>Model: {summary['model']}. Arms: {', '.join(a['name'] for a in summary['arms'])}.</p>"
            "<h3>Cross-entropy loss and KL (Table 9 layout)</h3>" + table_html(table9_rows(summary), T9_HEAD)
            + f"<p>General text: {summary['n_texts']} passages truncated to {c['text_tokens']} tokens; instruction "
            f"pairs: {summary['n_pairs']}; on-distribution: base greedy continuations ({c['ondist_tokens']} tokens) "
            f"on {summary['n_prompts']['harmless']} harmless prompts. Δ = arm − base.</p>" + plot_ce(summary)
            + f"<h3>Refusal and safety on {summary['n_prompts']['harmful']} harmful prompts (Table 10 layout)</h3>"
            + table_html(table10_rows(summary), t10_head(summary)) + plot_refusal(summary))
