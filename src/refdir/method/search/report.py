"""The search's outputs besides ``summary.json``: the front and trial tables, the front plot and the report
section; and the reference points drawn beside the front."""

from __future__ import annotations

import html
import json
from pathlib import Path

from refdir.core.edits import Edit
from refdir.core.html import figure_html, plt, table_html, warnings_html
from refdir.core.io import atomic_write_json, atomic_write_text
from refdir.core.rundir import RunDir
from refdir.errors import RefdirError
from refdir.method.uncertainty import CONFIDENCE, count_text

SECTION = "search"  # the report section's name
TITLE = "Pareto search over edits"


def load_reference(path: str | Path) -> list[dict]:
    """Reference points to draw beside the front: a JSON list of ``{"label", "refusals", "kl"}`` (optional "n",
    "model"), or another tool's measured front: an object with ``pareto_front`` (``{"trial", "refusals", "kl"}``),
    ``tool``, ``n_bad_eval`` and ``model``. The model the points were measured on is kept, so that the report
    says it (a reference measured on another model is not refused: only the user knows whether it compares)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        if isinstance(data, dict) and isinstance(data.get("pareto_front"), list):
            tool, n, model = str(data.get("tool", p.stem)), data.get("n_bad_eval"), data.get("model")
            data = [{**d, "label": f"{tool} #{d.get('trial', i)}", "n": n, "model": model, "tool": tool}
                    for i, d in enumerate(data["pareto_front"])]
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise TypeError("not a list of objects")
        pts = [{"label": str(d.get("label", "")), "refusals": float(d["refusals"]), "kl": float(d["kl"]),
                "n": d.get("n"), "model": None if d.get("model") is None else str(d["model"]),
                "tool": None if d.get("tool") is None else str(d["tool"])} for d in data]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise RefdirError(f"reference file {p}: expected a JSON list of {{label, refusals, kl}} ({e})") from e
    return pts


def draw_reference(ax, refs: list[dict] | None, n: int | None, floor: float) -> None:
    """Reference points on a refusals-against-KL axis (KL below ``floor`` drawn at it; counts scaled to ``n``
    prompts where both say how many): another tool's front as one series, its points joined in KL order under one
    legend entry; points of a plain list each with their own label."""
    fronts: dict[str, list[tuple[float, float]]] = {}
    for ref in refs or []:
        x, y = max(ref["kl"], floor), ref["refusals"] * (n / (ref.get("n") or n) if n else 1)
        if ref.get("tool"):
            fronts.setdefault(ref["tool"], []).append((x, y))
        else:
            ax.plot([x], [y], "^", c="C0", ms=7)
            ax.annotate(ref["label"], (x, y), fontsize=7, color="C0", xytext=(3, -9), textcoords="offset points")
    for i, (tool, pts) in enumerate(fronts.items()):
        xs, ys = zip(*sorted(pts), strict=True)
        ax.plot(xs, ys, "^--", c=("C0", "C9", "C8", "C7")[i % 4], ms=7, lw=1, label=f"{tool} (its front)")


def reference_models(refs: list[dict] | None, escape=str) -> str:
    """``", on MODEL"`` (or ``", on MODEL1 and MODEL2"``): the models reference points say they were measured on,
    for a caption; "" where none says."""
    models = list(dict.fromkeys(r["model"] for r in refs or [] if r.get("model")))
    return f", on {' and '.join(escape(m) for m in models)}" if models else ""


def _slim(r: dict) -> dict:
    """A trial row as one line of the CSV tables."""
    c = r.get("confirmed") or {}
    e = Edit.from_dict(r["edit"])
    return {"point": r.get("point", ""), "trial": r["trial"], "proxy_refusal": round(r["proxy_refusal"], 4),
            "proxy_kl": round(r["proxy_kl"], 5), "refusals": c.get("refusals", ""),
            "refusals_paper": c.get("refusals_paper", ""), "n": c.get("n", ""),
            "kl": round(c["kl"], 5) if c else "", "edit": e.describe()}


def _csv(rows: list[dict], cols: list[str]) -> str:
    return ",".join(cols) + "\n" + "".join(
        ",".join(f'"{r[k]}"' if k == "edit" else str(r[k]) for k in cols) + "\n" for r in rows)


def write_tables(sdir: Path, res: dict) -> None:
    """``front.json`` (the front's points and the base model, completions left out), ``front.csv`` and
    ``trials.csv`` in the search directory ``sdir``."""
    front = [_slim(r) for r in res["front"]]
    atomic_write_json(sdir / "front.json", {"points": [
        {k: v for k, v in r.items()} | {"confirmed": {k: v for k, v in (r.get("confirmed") or {}).items()
                                                      if k != "completions"} or None}
        for r in res["front"]], "base": {k: v for k, v in res["base"]["confirmed"].items() if k != "completions"}})
    cols = list(front[0]) if front else []
    atomic_write_text(sdir / "front.csv", _csv(front, cols))
    atomic_write_text(sdir / "trials.csv", _csv([_slim(r) for r in res["trials"]], cols))


def _plot_proxy(ax, res: dict) -> None:
    tr = res["trials"]
    ax.scatter([max(r["proxy_kl"], 1e-5) for r in tr], [r["proxy_refusal"] for r in tr], s=12, c="0.7",
               label="trials")
    fr = res["front"]
    ax.plot([max(r["proxy_kl"], 1e-5) for r in fr], [r["proxy_refusal"] for r in fr], "o-", c="C3", ms=4,
            drawstyle="steps-post", label="Pareto front")
    if res.get("plain"):
        ax.plot([res["plain"]["proxy_kl"]], [res["plain"]["proxy_refusal"]], "*", c="k", ms=12,
                label="plain edit (selected direction, full strength)")
    trials = {r["trial"]: r for r in tr}
    for m, v in res.get("best_at_kl", {}).items():
        if v and v["trial"] in trials:
            r = trials[v["trial"]]
            ax.plot([max(r["proxy_kl"], 1e-5)], [r["proxy_refusal"]], "D", mfc="none", mec="C2", ms=11, mew=1.5,
                    label=f"pick under KL ≤ {m} (trial {r['trial']}, confirmed KL {v['kl']:.4f})")
    ax.axhline(res["base"]["proxy_refusal"], ls=":", c="k", lw=1, label="base model")
    ax.set_xscale("log")
    ax.set_xlabel("proxy first-token KL (harmless proxy prompts)")
    ax.set_ylabel("proxy refusal metric (harmful proxy prompts)")
    ax.set_title(f"search: {len(tr)} trials")
    ax.legend(fontsize=7)


def _plot_confirmed(ax, res: dict) -> None:
    n = res["base"]["confirmed"]["n"]
    conf = [r for r in res["trials"] if "confirmed" in r]
    cf = [r for r in res["front"] if "confirmed" in r]
    ax.scatter([max(r["confirmed"]["kl"], 1e-5) for r in conf], [r["confirmed"]["refusals"] for r in conf], s=14,
               c="0.6", label="confirmed trials")
    ax.plot([max(r["confirmed"]["kl"], 1e-5) for r in cf], [r["confirmed"]["refusals"] for r in cf], "o", c="C3",
            ms=6, label="front points, confirmed")
    for r in cf:
        ax.annotate(str(r["point"]), (max(r["confirmed"]["kl"], 1e-5), r["confirmed"]["refusals"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if res.get("plain") and "confirmed" in res["plain"]:
        p = res["plain"]["confirmed"]
        ax.plot([p["kl"]], [p["refusals"]], "*", c="k", ms=12, label="plain edit")
    ax.axhline(res["base"]["confirmed"]["refusals"], ls=":", c="k", lw=1, label="base model")
    draw_reference(ax, res.get("reference"), n, 1e-5)
    if conf or res.get("reference"):  # a log axis needs at least one point
        ax.set_xscale("log")
    ax.set_xlabel(f"first-token KL, {res['confirm_prompts']['harmless']} harmless confirmation prompts")
    ax.set_ylabel(f"refusals of {n} ({_judge(res)} judge, "
                  f"{res['confirm_prompts']['max_new_tokens']} generated tokens)")
    ax.set_title("confirmed by generation")
    ax.legend(fontsize=7)


def _judge(res: dict) -> str:
    """The headline refusal judge of a summary (its config holds the run config under "run")."""
    return res["config"]["run"]["judge"]


def generated(res: dict) -> bool:
    """Whether the confirmation generated completions (``refdir run`` confirms its one pick by KL alone)."""
    return "refusals" in res["base"]["confirmed"]


def plot_front(res: dict):
    """Two panels: every trial and the front in proxy scores; the confirmed points in refusals and KL (only the
    first where nothing was generated)."""
    if not generated(res):
        fig, a1 = plt.subplots(figsize=(6.5, 4.6))
        _plot_proxy(a1, res)
        fig.tight_layout()
        return fig
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.6))
    _plot_proxy(a1, res)
    _plot_confirmed(a2, res)
    fig.tight_layout()
    return fig


EDIT_LEGEND = ("<p>How an edit reads: its direction (a difference-in-means candidate's position and layer, or a "
               "source: pca, rdo); then per component (attn, mlp: the writers of attention and MLP outputs) its "
               "variant (plain, projected, norm) and strength over layers, <code>PEAK@CENTRE±WIDTH→FLOOR</code> "
               "(PEAK at layer CENTRE, falling linearly to FLOOR at WIDTH layers away, none beyond) or "
               "<code>S everywhere</code>; <code>emb</code>: the embedding edited too; <code>+ second S</code>: a "
               "second direction removed from every writer at strength S.</p>")


def report_html(res: dict) -> str:
    """The search's report section: what was run, the best confirmed point under each KL mark, the plot and the
    front's table."""
    jname = _judge(res)
    gen = generated(res)
    # the front, then the picks off it (a calibrated pick rescales a front point: its proxy values tie or lose)
    on_front = {r["trial"] for r in res["front"]}
    trials = {r["trial"]: r for r in res.get("trials", [])}
    off = [trials[v["trial"]] for v in res.get("best_at_kl", {}).values()
           if v and v["trial"] not in on_front and v["trial"] in trials]
    rows = []
    for r in res["front"] + off:
        c = r.get("confirmed")
        g = c is not None and "refusals" in c
        refusals = [count_text(c["refusals"], c["n"]) if g else "", f"{c['refusals_paper']}/{c['n']}" if g else ""]
        rows.append([r.get("point", "pick"), r["trial"], f"{r['proxy_refusal']:.2f}", f"{r['proxy_kl']:.4f}",
                     *(refusals if gen else []), f"{c['kl']:.4f}" if c else "", Edit.from_dict(r["edit"]).describe()])
    b = res["base"]["confirmed"]
    rho = res["spearman_refusal"]
    best = "; ".join(f"KL ≤ {m}: " + ("none confirmed" if not v else
                                      f"{count_text(v['refusals'], v['n'])} refusals at KL {v['kl']:.4f} "
                                      f"(trial {v['trial']})"
                                      if gen else f"trial {v['trial']} at KL {v['kl']:.4f}")
                     for m, v in res.get("best_at_kl", {}).items())
    ch = (res.get("selection") or {}).get("chosen")
    pe = (res.get("plain") or {}).get("edit")
    plain_txt = ("" if pe is None else
                 f"The plain edit (★) is position {pe['position']}, layer {pe['layer']:g} at full strength: "
                 + ("the selected direction. " if ch else "no candidate passed the selection filters, so it is the "
                    "finalist with the lowest bypass. "))
    ref_txt = (" Reference points come from the file given with <code>--reference</code>; they may have been "
               "measured with another judge or precision" + reference_models(res.get("reference"), html.escape) + "."
               if res.get("reference") else "")
    confirm = (f"{res['confirm_prompts']['max_new_tokens']} greedy tokens on {b['n']} harmful prompts ({jname} judge; "
               f"paper substrings beside it), first-token KL on {res['confirm_prompts']['harmless']} harmless "
               f"prompts. Base model: {count_text(b['refusals'], b['n'])} refusals ({CONFIDENCE:.0%} Wilson "
               f"intervals in brackets). Best confirmed point under each KL mark: "
               f"{best}. Rank correlation (Spearman) of proxy refusal vs generated refusal over "
               f"{res['n_confirmed']} confirmed points: {'n/a' if rho is None else f'{rho:.2f}'}. " if gen else
               f"first-token KL on {res['confirm_prompts']['harmless']} harmless prompts (no generation: the run "
               f"takes one point per mark and judges it on its test prompts). Point under each KL mark: {best}"
               f"{_second_text(res)}. ")
    txt = (f"<p>{res['n_trials']} TPE trials and {res.get('n_refined', 0)} refinement trials; proxy: refusal metric "
           f"on {res['proxy_prompts']['harmful']} harmful and "
           f"first-token KL on {res['proxy_prompts']['harmless']} harmless proxy prompts. Confirmation: "
           f"{confirm}{plain_txt}Export a point: "
           f"<code>refdir export DIR OUT --point K</code>.{ref_txt}</p>{EDIT_LEGEND}")
    # nothing generated (a run's search): no refusal columns, only the KL the choice confirmed
    head = ["point", "trial", "proxy refusal", "proxy KL", *([f"refusals ({jname})", "refusals (paper)", "KL"] if gen
                                                              else ["confirmed KL"]), "edit"]
    return warnings_html(res.get("warnings", [])) + txt + figure_html(plot_front(res)) + table_html(rows, head)


def _second_text(res: dict) -> str:
    """For a run's search: the second direction its choice added to the point (see the report's choice)."""
    sec = (res.get("choice") or {}).get("second") or {}
    if not sec.get("added"):
        return ""
    return (f"; the run's choice is that point with the second direction added at strength {sec['strength']:g} "
            f"(calibration KL {sec['calibration_kl']:.4f})")


def write_search_report(rd: RunDir, res: dict) -> None:
    """The tables in the search directory and the report section of run directory ``rd`` (the report itself is
    re-rendered by the caller)."""
    write_tables(rd.search_dir(), res)
    rd.add_section(SECTION, report_html(res), TITLE)
