"""Evaluation of interventions side by side: refusal, safety, cross-entropy loss and KL per *arm*.

An arm is the base model (``base``), the base model with a direction file under ablation (``ablate:DIR``) or
addition (``add:DIR:coeff=C[:layer=L]``), or any other checkpoint (``ckpt:SPEC``: an HF directory, a hub id
or a ``.gguf`` file). Every arm sees the same prompts and texts. Extra checkpoints are loaded one at a time and
freed before the next, so memory stays at two models (the base and one checkpoint).

Cross-entropy loss follows the paper's three definitions, each a token-weighted mean in nats:

- ``text``: general text without a chat template, truncated to 256 tokens (the embedded team-written corpus by
  default; a file or a hub corpus such as the Pile online), loss on every token after the first;
- ``pairs``: instruction + response pairs under the chat template, loss on the response tokens only;
- ``ondist``: the base model's own greedy completions on harmless prompts, loss on the completion tokens only.

KL(base ‖ arm) on harmless prompts: at the first answer position (``kl_first``, the selection stage's KL), and
averaged over the first ``kl_tokens`` positions of the base model's greedy continuation (``kl_multi``), since the
first token alone under-reports damage.
"""

from __future__ import annotations

import gc
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from refdir.errors import RefdirError

CE_SETS = ("text", "pairs", "ondist")
TITLE = "Evaluation of arms (refdir eval)"
CE_LABELS = {"text": "general text", "pairs": "instruction pairs", "ondist": "on-distribution"}


# ------------------------------------------------------------------------------------------ arms


@dataclass
class ArmSpec:
    """One arm of an evaluation. ``target`` is a direction file (ablate/add) or a model spec (ckpt)."""

    kind: str  # base | ablate | add | ckpt
    target: str | None = None
    coeff: float = 1.0
    layer: int | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "base":
            return "base"
        if self.kind == "ablate":
            return "ablation"
        if self.kind == "add":
            return f"act-add ×{self.coeff:g}" + (f" @L{self.layer}" if self.layer is not None else "")
        return f"ckpt:{Path(str(self.target)).name or self.target}"


ARM_KINDS = ("base", "ablate", "add", "ckpt")
ARM_SYNTAX = ("base | ablate:DIRECTION | add:DIRECTION[:coeff=C][:layer=L] | ckpt:MODEL "
              "(HF dir, hub id or .gguf); any arm may end with :name=LABEL")


def parse_arm(spec: str) -> ArmSpec:
    """Parse one ``--arm`` value (see :data:`ARM_SYNTAX`)."""
    parts = spec.strip().split(":")
    kind = parts[0]
    if kind not in ARM_KINDS:
        raise RefdirError(f"bad arm {spec!r}: unknown kind {kind!r}; use {ARM_SYNTAX}")
    opts: dict[str, str] = {}
    rest = parts[1:]
    while rest and "=" in rest[-1]:
        k, _, v = rest.pop().partition("=")
        opts[k.strip()] = v.strip()
    unknown = set(opts) - {"coeff", "layer", "name"}
    if unknown:
        raise RefdirError(f"bad arm {spec!r}: unknown option(s) {sorted(unknown)}; use {ARM_SYNTAX}")
    target = ":".join(rest) or None
    if kind == "base" and target:
        raise RefdirError(f"bad arm {spec!r}: base takes no target; use {ARM_SYNTAX}")
    if kind != "base" and not target:
        raise RefdirError(f"bad arm {spec!r}: {kind} needs a target; use {ARM_SYNTAX}")
    if ("coeff" in opts or "layer" in opts) and kind != "add":
        raise RefdirError(f"bad arm {spec!r}: coeff and layer apply to add arms only")
    try:
        coeff = float(opts.get("coeff", 1.0))
        layer = int(opts["layer"]) if "layer" in opts else None
    except ValueError as e:
        raise RefdirError(f"bad arm {spec!r}: {e}") from e
    return ArmSpec(kind, target, coeff, layer, opts.get("name"))


# ------------------------------------------------------------------------------------------ data


def embedded_corpus() -> list[str]:
    """The embedded general-text corpus (team-written passages, ~160 words each)."""
    return json.loads(resources.files("refdir.assets").joinpath("general_text.json").read_text())


def embedded_pairs() -> list[tuple[str, str]]:
    """The embedded instruction + response pairs (team-written, Alpaca-style)."""
    rows = json.loads(resources.files("refdir.assets").joinpath("instruction_pairs.json").read_text())
    return [(r["instruction"], r["response"]) for r in rows]


def _read_rows(spec: str) -> list:
    p = Path(spec)
    try:
        if p.suffix == ".txt":  # passages separated by blank lines
            return [b.strip() for b in p.read_text().split("\n\n") if b.strip()]
        if p.suffix == ".json":
            data = json.loads(p.read_text())
            return data.get("data", []) if isinstance(data, dict) else data
        if p.suffix == ".jsonl":
            return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RefdirError(f"could not parse {p}: {e}") from e
    raise RefdirError(f"unknown format {p.suffix!r} for {p}; use txt, json or jsonl")


def _hub_rows(spec: str, n: int) -> list:
    try:
        import datasets
    except ImportError as e:
        raise RefdirError(f"{spec} is not a file; hub corpora need: pip install 'refdir[hub]'") from e
    try:
        ds = datasets.load_dataset(spec, split="train", streaming=True)
        return [r for _, r in zip(range(n), ds, strict=False)]
    except Exception as e:  # noqa: BLE001 - offline, missing or gated datasets all end here
        raise RefdirError(f"could not load hub dataset {spec!r} (offline? gated?): {type(e).__name__}: {e}") from e


def load_corpus(spec: str, n: int | None = None, column: str = "text") -> list[str]:
    """General text: ``embedded``, a txt/json/jsonl file, or a hub dataset id (streamed, first ``n`` rows)."""
    if spec == "embedded":
        rows = embedded_corpus()
    elif Path(spec).exists():
        rows = _read_rows(spec)
    else:
        rows = _hub_rows(spec, n or 64)
    texts = [r if isinstance(r, str) else str(r.get(column, "")) for r in rows]
    texts = [t for t in texts if t.strip()][:n]
    if not texts:
        raise RefdirError(f"the general-text corpus {spec!r} is empty")
    return texts


def load_pairs(spec: str, n: int | None = None) -> list[tuple[str, str]]:
    """Instruction + response pairs: ``embedded`` or a json/jsonl file with ``instruction`` (+ optional
    ``input``) and ``response`` or ``output`` (Alpaca's columns)."""
    if spec == "embedded":
        pairs = embedded_pairs()
    else:
        rows = _read_rows(spec) if Path(spec).exists() else _hub_rows(spec, n or 64)
        pairs = []
        for i, r in enumerate(rows):
            resp = r.get("response", r.get("output")) if isinstance(r, dict) else None
            if not isinstance(r, dict) or "instruction" not in r or resp is None:
                raise RefdirError(f"{spec}: row {i} needs 'instruction' and 'response' (or 'output')")
            instr = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
            if str(resp).strip():
                pairs.append((instr, str(resp)))
    pairs = pairs[:n]
    if not pairs:
        raise RefdirError(f"the instruction-pair set {spec!r} is empty")
    return pairs


# ------------------------------------------------------------------------------------------ CE and KL


@dataclass
class Seq:
    ids: list[int]
    start: int  # first target index: the loss covers ids[start:]


def text_seqs(tokenizer, texts: list[str], max_tokens: int = 256) -> list[Seq]:
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True)["input_ids"][:max_tokens]
        if len(ids) >= 2:
            out.append(Seq(ids, 1))
    return out


def prompt_seqs(fmt, prompts: list[str], targets: list[list[int]]) -> list[Seq]:
    """Chat-formatted prompt followed by target token ids (possibly empty: first position only)."""
    out = []
    for p, t in zip(prompts, targets, strict=True):
        pre = fmt._ids(fmt.render(p))
        out.append(Seq(pre + list(t), len(pre)))
    return out


@torch.no_grad()
def _logprobs(model, seq: Seq, n_pos: int | None = None) -> torch.Tensor:
    """log-softmax (float32) at the positions that predict ``ids[start:]`` ([max(1, T), vocab]); with no
    targets, the one position after the prompt. ``n_pos`` keeps only the first positions."""
    dev = next(model.parameters()).device
    n_t = max(1, len(seq.ids) - seq.start)
    if n_pos is not None:
        n_t = min(n_t, n_pos)
    logits = model(input_ids=torch.tensor([seq.ids], device=dev), use_cache=False).logits[0]
    return torch.log_softmax(logits[seq.start - 1: seq.start - 1 + n_t].float(), -1).cpu()


@torch.no_grad()
def cross_entropy(model, seqs: list[Seq], desc: str = "CE") -> float:
    """Token-weighted mean negative log-likelihood of the targets, in nats."""
    total, n = 0.0, 0
    for s in tqdm(seqs, desc=desc, leave=False):
        tgt = s.ids[s.start:]
        if not tgt:
            continue
        lp = _logprobs(model, s)
        total += -lp[torch.arange(len(tgt)), torch.tensor(tgt)].double().sum().item()
        n += len(tgt)
    if n == 0:
        raise RefdirError("no target tokens to compute a cross-entropy loss on")
    return total / n


@dataclass
class OnDist:
    """The on-distribution pass of one arm: CE on the base continuation and KL(base ‖ arm) along it."""

    ce: float
    kl_first: float
    kl_multi: float
    kl_per_position: list[float]
    ref: list[torch.Tensor] | None = None  # the base model's log-probs (float32), kept from the reference pass


@torch.no_grad()
def ondist_pass(model, seqs: list[Seq], kl_tokens: int, ref: list[torch.Tensor] | None = None,
                desc: str = "on-distribution") -> OnDist:
    """One forward per sequence: CE on all completion tokens, KL against ``ref`` on the first ``kl_tokens``
    positions. Without ``ref`` (the base model itself) the log-probs are returned as the reference."""
    total, n = 0.0, 0
    keep, kls = [], []
    for i, s in enumerate(tqdm(seqs, desc=desc, leave=False)):
        lp = _logprobs(model, s)
        tgt = s.ids[s.start:]
        if tgt:
            total += -lp[torch.arange(len(tgt)), torch.tensor(tgt)].double().sum().item()
            n += len(tgt)
        head = lp[:kl_tokens]
        if ref is None:
            keep.append(head)
            kls.append(torch.zeros(head.shape[0], dtype=torch.float64))
        else:
            base = ref[i]
            m = min(base.shape[0], head.shape[0])
            kls.append((base[:m].exp() * (base[:m] - head[:m])).sum(-1).double().clamp_min(0))
    ce = total / n if n else float("nan")
    first = float(torch.stack([k[0] for k in kls]).mean())
    multi = float(torch.stack([k.mean() for k in kls]).mean())
    width = max(k.shape[0] for k in kls)
    per_pos = []
    for j in range(width):
        vals = [float(k[j]) for k in kls if k.shape[0] > j]
        per_pos.append(sum(vals) / len(vals))
    return OnDist(ce, first, multi, per_pos, keep if ref is None else None)


# ------------------------------------------------------------------------------------------ config, run


class EvalConfig(BaseModel):
    model: str = "default"
    arms: list[str] = ["base"]
    harmful: str = "embedded:harmful:test"
    harmless: str = "embedded:harmless:test"
    column: str = "instruction"
    n_harmful: int | None = None
    n_harmless: int | None = 32
    text: str = "embedded"
    n_text: int | None = None
    text_tokens: int = 256
    pairs: str = "embedded"
    n_pairs: int | None = None
    max_new_tokens: int = 64  # completions judged for refusal and safety
    ondist_tokens: int = 64  # length of the base model's greedy continuations on harmless prompts
    kl_tokens: int = 32
    judge: str = "substring"
    short_safe: bool = False
    system: str | None = None
    chat_template: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    trust_remote_code: bool = False
    batch_size: int = 16


@dataclass
class ArmResult:
    name: str
    spec: str
    ce: dict = field(default_factory=dict)
    kl: dict = field(default_factory=dict)
    refusal: dict = field(default_factory=dict)
    safety: dict = field(default_factory=dict)
    completions: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _same_tokenizer(a, b) -> bool:
    return a is b or a.get_vocab() == b.get_vocab()


def arm_context(model, arm: ArmSpec, direction):
    from refdir.core.interventions import ablate, add

    if arm.kind == "ablate":
        return ablate(model, direction.vector)
    if arm.kind == "add":
        layer = direction.layer if arm.layer is None else arm.layer
        n_layers = model.config.get_text_config().num_hidden_layers
        if not 0 <= layer < n_layers:
            raise RefdirError(f"arm {arm.label}: layer {layer} outside 0..{n_layers - 1}")
        return add(model, direction.vector, layer, arm.coeff)
    return nullcontext()


def load_directions(arms: list[ArmSpec], d_model: int) -> dict[str, object]:
    """Load every direction file up front (cheap) so that a bad one fails before any model work."""
    from refdir.core.directions import Direction

    dirs = {}
    for a in arms:
        if a.kind in ("ablate", "add"):
            d = Direction.load(a.target)
            if d.d_model != d_model:
                raise RefdirError(f"arm {a.label}: direction {a.target} has size {d.d_model}, the model {d_model}")
            dirs[a.target] = d
    return dirs


def run_eval(cfg: EvalConfig, out: str | Path, *, force: bool = False, run_dir: str | Path | None = None) -> dict:
    """Evaluate every arm, judge, and write ``results.json``, ``table.md``, ``completions.json`` and plots to
    ``out`` (atomically; an existing ``out`` is refused unless ``force``). With ``run_dir`` the tables and plots
    are also added to that run's report."""
    from refdir.core.chat import ChatFormat
    from refdir.core.data import load_instructions
    from refdir.core.generation import generate
    from refdir.core.models import load_model
    from refdir.evaluate.safety_judge import load_judge, make_judge, parse_judge_spec
    from refdir.method.refusal_judge import judge as refusal_judge

    out = Path(out)
    if out.exists() and not force:
        raise RefdirError(f"output directory {out} already exists; pass --force to overwrite it")
    if run_dir is not None and not Path(run_dir).is_dir():
        raise RefdirError(f"run directory {run_dir} does not exist")
    if not cfg.arms:
        raise RefdirError("no arms to evaluate; give at least one --arm")
    arms = [parse_arm(a) for a in cfg.arms]
    labels = [a.label for a in arms]
    if len(set(labels)) != len(labels):
        raise RefdirError(f"two arms share a label ({labels}); give them names with :name=LABEL")
    parse_judge_spec(cfg.judge)
    t0 = time.time()
    harmful = load_instructions(cfg.harmful, cfg.column).instructions[: cfg.n_harmful]
    harmless = load_instructions(cfg.harmless, cfg.column).instructions[: cfg.n_harmless]
    if not harmful or not harmless:
        raise RefdirError("empty prompt set: the harmful and harmless prompt sets need at least one prompt each")
    texts = load_corpus(cfg.text, cfg.n_text)
    pairs = load_pairs(cfg.pairs, cfg.n_pairs)

    base = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    d_model = base.model.config.get_text_config().hidden_size
    directions = load_directions(arms, d_model)
    fmt = ChatFormat(base.tokenizer, cfg.system, cfg.chat_template)

    # the base model's greedy continuations on harmless prompts: on-distribution CE targets and the KL path
    cont = generate(base.model, fmt, harmless, max_new_tokens=cfg.ondist_tokens, batch_size=cfg.batch_size,
                    desc="base continuations", return_ids=True)
    cont_ids = [ids for _, ids in cont]
    ref = ondist_pass(base.model, prompt_seqs(fmt, harmless, cont_ids), cfg.kl_tokens, desc="base reference")

    results: list[ArmResult] = []
    for arm, spec in tqdm(list(zip(arms, cfg.arms, strict=True)), desc="arms"):
        ta = time.time()
        res = ArmResult(arm.label, spec)
        if arm.kind == "ckpt":
            lm = load_model(arm.target, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
            model, tok = lm.model, lm.tokenizer
            afmt = ChatFormat(tok, cfg.system, cfg.chat_template)
        else:
            lm, model, tok, afmt = None, base.model, base.tokenizer, fmt
        same = _same_tokenizer(tok, base.tokenizer)
        targets = cont_ids if same else [tok(t, add_special_tokens=False)["input_ids"] for t, _ in cont]
        with arm_context(model, arm, directions.get(arm.target)):
            res.ce["text"] = cross_entropy(model, text_seqs(tok, texts, cfg.text_tokens), f"{arm.label}: text CE")
            res.ce["pairs"] = cross_entropy(
                model, prompt_seqs(afmt, [p for p, _ in pairs],
                                   [tok(r, add_special_tokens=False)["input_ids"] for _, r in pairs]),
                f"{arm.label}: pairs CE")
            if arm.kind == "base":
                od = ref
            elif same:
                od = ondist_pass(model, prompt_seqs(afmt, harmless, targets), cfg.kl_tokens, ref.ref,
                                 f"{arm.label}: on-distribution")
            else:  # another tokenizer: CE on its own tokens of the same text; KL needs a shared vocabulary
                od = OnDist(cross_entropy(model, prompt_seqs(afmt, harmless, targets)), math.nan, math.nan, [])
            res.ce["ondist"] = od.ce
            res.kl = {"first": od.kl_first, "multi": od.kl_multi, "per_position": od.kl_per_position}
            res.completions = generate(model, afmt, harmful, max_new_tokens=cfg.max_new_tokens,
                                       batch_size=cfg.batch_size, desc=f"{arm.label}: harmful completions")
        paper, broad = refusal_judge(res.completions, "paper"), refusal_judge(res.completions, "broad")
        res.refusal = {"paper": paper.refusal, "broad": broad.refusal, "degenerate": paper.n_degenerate,
                       "n": paper.n}
        if lm is not None:
            del model, lm
            gc.collect()
        res.seconds = time.time() - ta
        results.append(res)

    kind, judge_model = parse_judge_spec(cfg.judge)
    if judge_model == cfg.model:  # the base model judges (no hooks are active now): no second copy
        judge = make_judge(kind, base.model, base.tokenizer, short_safe=cfg.short_safe)
    else:
        judge = load_judge(cfg.judge, dtype=cfg.dtype, device=cfg.device, short_safe=cfg.short_safe,
                           trust_remote_code=cfg.trust_remote_code)
    for res in results:
        s = judge(harmful, res.completions)
        res.safety = {"judge": cfg.judge, "score": s.safety, "n_unsafe": sum(s.unsafe), "unsafe": s.unsafe,
                      "verdicts": s.raw}
    base_ce = next((r.ce for r, a in zip(results, arms, strict=True) if a.kind == "base"), None)
    summary = {
        "config": cfg.model_dump(), "model": base.model_id, "n_prompts": {"harmful": len(harmful),
                                                                          "harmless": len(harmless)},
        "n_texts": len(texts), "n_pairs": len(pairs),
        "arms": [{k: v for k, v in asdict(r).items() if k != "completions"}
                 | {"ce_delta": {k: r.ce[k] - base_ce[k] for k in CE_SETS} if base_ce else None}
                 for r in results],
        "timings_s": {"total": time.time() - t0, **{r.name: r.seconds for r in results}},
    }
    from refdir.core.io import atomic_dir, atomic_write_json, atomic_write_text
    from refdir.workflows.report import add_section

    with atomic_dir(out, force=force) as tmp:
        atomic_write_json(tmp / "results.json", summary)
        atomic_write_json(tmp / "completions.json", {"prompts": harmful,
                                                     "completions": {r.name: r.completions for r in results}})
        atomic_write_text(tmp / "table.md", markdown_tables(summary))
        html = report_html(summary)
        add_section(tmp, "eval", html, TITLE)  # a standalone report.html of this evaluation
    if run_dir is not None:
        add_section(run_dir, "eval", html, TITLE)
    return summary


# ------------------------------------------------------------------------------------------ tables, plots


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
    return [[a["name"], _f(a["refusal"]["paper"]), _f(a["refusal"]["broad"]), _f(a["safety"]["score"]),
             str(a["refusal"]["degenerate"]), str(a["refusal"]["n"])] for a in summary["arms"]]


T9_HEAD = ["arm", "CE general text (Δ)", "CE instruction pairs (Δ)", "CE on-distribution (Δ)",
           "KL first token", "KL multi-token"]


def t10_head(summary: dict) -> list[str]:
    return ["arm", "refusal (paper substrings)", "refusal (broad)", f"safety ({summary['config']['judge']})",
            "degenerate", "n"]


def _md(rows: list[list[str]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown_tables(summary: dict) -> str:
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
    import matplotlib.pyplot as plt

    from refdir.workflows.report import figure_html

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
    import matplotlib.pyplot as plt

    from refdir.workflows.report import figure_html

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
    from refdir.workflows.report import table_html

    c = summary["config"]
    return (f"<p>Model: {summary['model']}. Arms: {', '.join(a['name'] for a in summary['arms'])}.</p>"
            "<h3>Cross-entropy loss and KL (Table 9 layout)</h3>" + table_html(table9_rows(summary), T9_HEAD)
            + f"<p>General text: {summary['n_texts']} passages truncated to {c['text_tokens']} tokens; instruction "
            f"pairs: {summary['n_pairs']}; on-distribution: base greedy continuations ({c['ondist_tokens']} tokens) "
            f"on {summary['n_prompts']['harmless']} harmless prompts. Δ = arm − base.</p>" + plot_ce(summary)
            + f"<h3>Refusal and safety on {summary['n_prompts']['harmful']} harmful prompts (Table 10 layout)</h3>"
            + table_html(table10_rows(summary), t10_head(summary)) + plot_refusal(summary))
