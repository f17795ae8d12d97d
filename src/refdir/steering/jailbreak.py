"""Jailbreak vectors (Ball et al., 2024): one steering vector per class of jailbreak.

Templates: a JSON file ``{"classes": {"CLASS": ["... {instruction} ...", ...]}}`` (or a plain
``{"CLASS": [...]}`` mapping). Every template must contain ``{instruction}``. The embedded set
(team-written) has four classes of benign-format wrappers: role-play, prefix injection,
refusal suppression and fiction.

Per class the vector at each layer is mean(wrapped − plain) at the last prompt token, over the
harmful instructions and the class's templates. The study reports:

- cosines between the classes' vectors, and with the refusal direction r, at one layer;
- a transfer matrix: with the class-i vector subtracted at that layer (every position), the
  jailbreak success (1 − refusal rate, broad judge; degenerate completions never count as
  success) of class-j-wrapped harmful prompts, greedy decoding;
- "harmfulness suppression": how far each class moves the projection on r̂ (at r's layer and
  position) from plain harmful prompts toward plain harmless ones:
  ``(proj(harmful) − proj(wrapped)) / (proj(harmful) − proj(harmless))``.
"""

from __future__ import annotations

import html
import json
from contextlib import nullcontext
from importlib import resources
from pathlib import Path

import torch

from refdir.core.activations import residuals
from refdir.core.chat import ChatFormat
from refdir.core.data import embedded
from refdir.core.direction_paths import load_direction
from refdir.core.generation import generate
from refdir.core.html import figure_html, plt, table_html, write_sections_report
from refdir.core.io import atomic_dir, atomic_write_json, read_json_records
from refdir.core.rundir import RunDir
from refdir.errors import RefdirError
from refdir.method.refusal_judge import judge
from refdir.steering.vectors import SteeringVector, dataset_hash, model_hash, steer

PLACEHOLDER = "{instruction}"


def _check(classes: dict, src: str) -> dict[str, list[str]]:
    if not isinstance(classes, dict) or not classes:
        raise RefdirError(f"{src}: expected a mapping of class name to a list of templates")
    out = {}
    for name, temps in classes.items():
        if isinstance(temps, str):
            temps = [temps]
        if not isinstance(temps, list) or not temps:
            raise RefdirError(f"{src}: class {name!r} needs a non-empty list of templates")
        for t in temps:
            if not isinstance(t, str) or PLACEHOLDER not in t:
                raise RefdirError(f"{src}: a template of class {name!r} has no {PLACEHOLDER} placeholder: {str(t)[:60]!r}")
        out[str(name)] = list(temps)
    return out


def load_templates(spec: str | Path = "embedded") -> dict[str, list[str]]:
    """Templates grouped by class from ``embedded`` or a ``.json`` file."""
    if str(spec) == "embedded":
        data = json.loads(resources.files("refdir.assets").joinpath("jailbreak_templates.json").read_text())
        return _check(data["classes"], "embedded templates")
    data = read_json_records(spec, "template", (".json",), '{"classes": {"NAME": ["... {instruction} ..."]}}')
    return _check(data.get("classes", data) if isinstance(data, dict) else data, str(spec))


def wrap(template: str, instruction: str) -> str:
    if PLACEHOLDER not in template:
        raise RefdirError(f"template has no {PLACEHOLDER} placeholder: {template[:60]!r}")
    return template.replace(PLACEHOLDER, instruction)


def class_vectors(model, fmt: ChatFormat, templates: dict[str, list[str]], harmful: list[str], *,
                  n_pos: int = 1, model_id: str = "", batch_size: int = 16, progress: bool = True
                  ) -> tuple[dict[str, SteeringVector], dict[str, torch.Tensor]]:
    """One vector per class (last token, every layer) and the mean residuals [n_pos, L+1, d] of the plain
    prompts and of each class's wrapped prompts (for projections at other post-instruction positions)."""
    means = {"plain": residuals(model, fmt, harmful, n_pos=n_pos, batch_size=batch_size, progress=progress,
                                desc="plain")[0]}
    vecs, mh = {}, model_hash(model)
    for name, temps in templates.items():
        wrapped = [wrap(t, h) for h in harmful for t in temps]
        means[name] = residuals(model, fmt, wrapped, n_pos=n_pos, batch_size=batch_size, progress=progress,
                                desc=name)[0]
        diff = (means[name][-1] - means["plain"][-1]).float()
        vecs[name] = SteeringVector({layer: diff[layer] for layer in range(diff.shape[0])}, model_id, mh, -1, "raw",
                                    f"jailbreak vector: mean(wrapped − plain), class {name}",
                                    dataset_hash([temps, harmful]), {"class": name, "n_templates": len(temps),
                                                                     "n_instructions": len(harmful)})
    return vecs, means


def transfer_matrix(model, fmt: ChatFormat, vecs: dict[str, SteeringVector], templates: dict[str, list[str]],
                    harmful: list[str], layer: int, *, coeff: float = -1.0, max_new_tokens: int = 32,
                    judge_kind: str = "broad", progress: bool = True) -> dict:
    """Rows: no steering, then each class vector added with ``coeff`` (−1 = subtracted); columns: plain and each
    class (first template). Cells: jailbreak success = share of non-refused, non-degenerate completions."""
    cols = ["plain"] + list(templates)
    prompts = {c: harmful if c == "plain" else [wrap(templates[c][0], h) for h in harmful] for c in cols}
    rows, cells, examples = ["none"] + list(vecs), {}, {}
    for r in rows:
        ctx = nullcontext() if r == "none" else steer(model, vecs[r], coeff, positions="all", layers=[layer])
        with ctx:
            for c in cols:
                outs = generate(model, fmt, prompts[c], max_new_tokens=max_new_tokens, progress=progress,
                                desc=f"{r} → {c}")
                j = judge(outs, judge_kind)
                cells[f"{r}|{c}"] = (j.n - j.n_refusal - j.n_degenerate) / j.n
                examples[f"{r}|{c}"] = outs[0]
    return {"rows": rows, "cols": cols, "success": [[cells[f"{r}|{c}"] for c in cols] for r in rows],
            "layer": layer, "coeff": coeff, "n_prompts": len(harmful), "max_new_tokens": max_new_tokens,
            "judge": judge_kind, "examples": examples}


def _heatmap(mat, rows, cols, title, fmt_s="{:.2f}", vmin=None, vmax=None, cmap="viridis") -> str:
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2.5, 0.7 * len(rows) + 1.5))
    im = ax.imshow(mat, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, fmt_s.format(mat[i][j]), ha="center", va="center", fontsize=8, color="white")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    return figure_html(fig)


def study(lm, fmt: ChatFormat, out: str | Path, *, direction: str | Path, templates: str = "embedded",
          n_train: int = 16, n_test: int = 6, layer: int | None = None, max_new_tokens: int = 32,
          force: bool = False, progress: bool = True) -> dict:
    """Vectors, cosines, transfer matrix and harmfulness suppression; everything in ``out`` (atomic)."""
    temps = load_templates(templates)
    if len(temps) < 2:
        raise RefdirError("a jailbreak study needs at least two template classes")
    r = load_direction(direction)  # a direction file, or a run dir standing for its direction
    arch = SteeringVector.from_direction(r).check_fits(lm.model)
    layer = r.layer if layer is None else layer
    if not 0 <= layer < arch.n_layers:
        raise RefdirError(f"layer {layer} outside 0..{arch.n_layers - 1}")
    harm_train = embedded("harmful", "train").instructions[:n_train]
    harm_test = embedded("harmful", "test").instructions[:n_test]
    harmless = embedded("harmless", "train").instructions[:n_train]
    n_pos = max(1, -r.position)
    with atomic_dir(out, force=force) as tmp:
        vecs, means = class_vectors(lm.model, fmt, temps, harm_train, n_pos=n_pos, model_id=lm.model_id,
                                    progress=progress)
        for name, sv in vecs.items():
            sv.save(tmp / "vectors" / name)
        means["harmless"] = residuals(lm.model, fmt, harmless, n_pos=n_pos, progress=progress, desc="harmless")[0]
        r_hat = r.unit()
        proj = {k: float(m[n_pos + r.position, r.layer].float() @ r_hat) for k, m in means.items()}
        gap = proj["plain"] - proj["harmless"]
        suppression = {c: (proj["plain"] - proj[c]) / gap for c in temps}
        names = list(temps) + ["refusal r"]
        vs = [vecs[c][layer] for c in temps] + [r.vector.float()]
        cos = [[float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for b in vs] for a in vs]
        tr = transfer_matrix(lm.model, fmt, vecs, temps, harm_test, layer, max_new_tokens=max_new_tokens,
                             progress=progress)
        summary = {"classes": list(temps), "layer": layer, "cosine_with_r": {c: cos[i][-1] for i, c in enumerate(temps)},
                   "suppression": suppression, "transfer_rows": tr["rows"], "transfer_cols": tr["cols"],
                   "transfer_success": tr["success"]}
        res = {"summary": summary, "cosine": {"names": names, "matrix": cos}, "projection_on_r": proj,
               "transfer": tr, "direction": {"layer": r.layer, "position": r.position, "file": str(direction)},
               "n_train": len(harm_train), "n_test": len(harm_test)}
        atomic_write_json(tmp / "jailbreak.json", res)
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(list(suppression), list(suppression.values()))
        ax.axhline(0, color="gray", lw=1)
        ax.set_ylabel("harmfulness suppression")
        ax.tick_params(axis="x", labelsize=8)
        body = (f"<p>{len(harm_train)} harmful train instructions × each class's templates for the vectors; "
                f"{len(harm_test)} harmful test instructions for the transfer matrix (greedy, {max_new_tokens} new "
                f"tokens, broad judge). Layer {layer}; r from {html.escape(str(direction))} (layer {r.layer}, "
                f"position {r.position}).</p>"
                + _heatmap(cos, names, names, f"cosine between jailbreak vectors and r (layer {layer})",
                           vmin=-1, vmax=1, cmap="coolwarm")
                + _heatmap(tr["success"], [f"− {x}" if x != "none" else "no steering" for x in tr["rows"]], tr["cols"],
                           "jailbreak success (1 − refusal) with the row's vector subtracted", vmin=0, vmax=1)
                + "<h3>Harmfulness suppression</h3>"
                + table_html([[k, f"{v:.3f}"] for k, v in proj.items()], ["prompts", "mean projection on r̂"])
                + figure_html(fig))
        RunDir(tmp).add_section("jailbreak", body, "Jailbreak vectors")
        write_sections_report(tmp)
    return res

