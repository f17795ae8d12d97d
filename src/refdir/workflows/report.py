"""One self-contained ``report.html`` per run, with embedded PNG plots."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from refdir.core.io import atomic_write_text  # noqa: E402


def figure_html(fig) -> str:
    """A matplotlib figure as an inline ``<img>`` (the figure is closed)."""
    return _png(fig)


def table_html(rows: list[list], head: list[str]) -> str:
    return _table(rows, head)


SECTIONS_DIR = "report_sections"


def add_section(run_dir: str | Path, name: str, body_html: str, title: str | None = None) -> Path:
    """Add (or replace) one named section of a run's report and re-render ``report.html``.

    Sections are HTML fragments in ``RUN_DIR/report_sections/NAME.html``, written atomically and shown after the
    pipeline's own sections in name order. Other commands (eval, analyze, steering) use this to extend a run's report.
    When the run has no ``summary.json`` yet, a standalone report of the sections alone is written.
    """
    run_dir = Path(run_dir)
    frag = (f"<h2>{html.escape(title)}</h2>\n" if title else "") + body_html
    atomic_write_text(run_dir / SECTIONS_DIR / f"{name}.html", frag)
    return write_report(run_dir)


def _sections(run_dir: Path) -> list[str]:
    d = run_dir / SECTIONS_DIR
    return [f.read_text() for f in sorted(d.glob("*.html"))] if d.is_dir() else []


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


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
    return _png(fig)


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
    ax.set_ylabel("refusal score (test split)")
    return _png(fig)


def plot_metric_hist(metrics: dict) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, xs in metrics.items():
        ax.hist(xs, bins=25, alpha=0.5, label=k)
    ax.axvline(0, color="gray", ls="--", lw=1)
    ax.set_xlabel("refusal metric (log-odds of refusal tokens, first answer position)")
    ax.legend(fontsize=8)
    return _png(fig)


def _table(rows: list[list], head: list[str]) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{b}</table>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3}
.note{background:#fff8e1;padding:8px;border-left:4px solid #f0b400}"""


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").exists():  # sections only (e.g. `refdir eval` without a run dir)
        body = "\n".join(_sections(run_dir))
        out = run_dir / "report.html"
        atomic_write_text(out, f"<html><head><meta charset='utf-8'><title>refdir report</title><style>{CSS}</style>"
                               f"</head><body><h1>refdir report</h1>{body}</body></html>")
        return out
    summ = json.loads((run_dir / "summary.json").read_text())
    sel = json.loads((run_dir / "selection" / "selection.json").read_text())
    rows = json.loads((run_dir / "selection" / "table.json").read_text())
    parts = [f"<html><head><meta charset='utf-8'><title>refdir report</title><style>{CSS}</style></head><body>",
             f"<h1>refdir report: {html.escape(str(summ['model']))}</h1>"]
    ch = sel["chosen"]
    if ch:
        parts.append(f"<p>Chosen direction: position <b>{ch['position']}</b>, layer <b>{ch['layer']}</b> of "
                     f"{summ['selection']['n_layers']} (bypass {ch['bypass']:.2f}, induce {ch['induce']:.2f}, "
                     f"KL {ch['kl']:.3f}).</p>")
    else:
        parts.append(f"<p class='note'>Every candidate was filtered out.<br><pre>{html.escape(sel['diagnostic'] or '')}"
                     "</pre></p>")
    parts.append(f"<p class='note'>Induce rule that decided: <b>{html.escape(sel['rule'])}</b>. Baseline refusal "
                 f"metric on val: harmful {sel['baseline']['harmful']:.2f}, harmless {sel['baseline']['harmless']:.2f}. "
                 f"Filters removed: {html.escape(json.dumps(sel['filter_counts']))}.</p>")
    parts.append(f"<p>Refusal tokens: {html.escape(', '.join(repr(t) for t in summ['refusal_tokens']))}. "
                 f"Judge: {summ['judge']} (the paper's substring list is reported beside it).</p>")
    # headline table
    head = ["arm / prompts", "refusal (" + summ["judge"] + ")", "refusal (paper substrings)", "degenerate", "n"]
    trs = [[k, f"{v['refusal']:.3f}", f"{v['refusal_paper']:.3f}", v["degenerate"], v["n"]]
           for k, v in summ["refusal"].items()]
    if summ.get("checkpoint"):
        c = summ["checkpoint"]
        trs.append(["orthogonalized checkpoint / harmful", f"{c['refusal']:.3f}", f"{c['refusal_paper']:.3f}",
                    c["degenerate"], c["n"]])
    parts.append("<h2>Refusal on the test split</h2>" + _table(trs, head))
    if summ.get("addition_coeff"):
        parts.append(f"<p>Addition coefficient: {summ['addition_coeff']['coeff']} "
                     f"({html.escape(summ['addition_coeff']['rule'])}).</p>")
    ev = run_dir / "eval" / "scores.json"
    if ev.exists():
        scores = json.loads(ev.read_text())
        parts.append(plot_refusal_bars(scores, summ.get("checkpoint")))
    parts.append("<h2>Candidate scores</h2>" + plot_selection(rows, ch, sel["config"]["kl_max"]))
    mp = run_dir / "eval" / "metrics.json"
    if mp.exists():
        parts.append("<h2>Refusal metric</h2>" + plot_metric_hist(json.loads(mp.read_text())))
    cp = run_dir / "eval" / "completions.json"
    if cp.exists():
        comp = json.loads(cp.read_text())
        ex = []
        arms = comp["completions"]
        for kind in ("harmful", "harmless"):
            for i, prompt in enumerate(comp["prompts"][kind][:4]):
                row = [kind, prompt] + [arms.get(f"{a}/{kind}", [""] * (i + 1))[i][:300]
                                        for a in ("baseline", "ablation", "addition")]
                ex.append(row)
        parts.append("<h2>Example completions</h2>" + _table(ex, ["set", "prompt", "baseline", "ablation", "addition"]))
    parts.extend(_sections(run_dir))
    parts.append("<h2>Timings (s)</h2>" + _table([[k, v] for k, v in summ["timings_s"].items()], ["stage", "s"]))
    parts.append("</body></html>")
    out = run_dir / "report.html"
    atomic_write_text(out, "\n".join(parts))
    return out
