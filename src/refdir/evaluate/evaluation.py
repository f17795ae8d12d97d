"""Evaluation of interventions side by side: refusal, safety, cross-entropy loss and KL per *arm*.

An arm is the base model (``base``), the base model with a direction file (or a run directory, for its selected
direction) under ablation (``ablate:DIR``; a subspace file there ablates its whole span) or addition (``add:DIR:coeff=C[:layer=L]``), or any other checkpoint
(``ckpt:SPEC``: an HF directory, a hub id or a ``.gguf`` file). Every arm sees the same prompts and texts. Extra
checkpoints are loaded one at a time and freed before the next, so memory stays at two models (the base and one
checkpoint). The loss and KL definitions are in :mod:`refdir.evaluate.ce`, the tables in
:mod:`refdir.evaluate.tables`.
"""

from __future__ import annotations

import gc
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from refdir.core.data import load_corpus, load_instructions, load_pairs
from refdir.core.direction_paths import load_direction
from refdir.core.directions import Direction, Subspace, edit_tensor
from refdir.core.generation import generate
from refdir.core.html import write_sections_report
from refdir.core.interventions import ablate, add
from refdir.core.io import atomic_dir, atomic_write_json, atomic_write_text, check_replaceable
from refdir.core.preflight import check_output
from refdir.core.rundir import RunDir
from refdir.core.spec import ModelSpec
from refdir.errors import RefdirError
from refdir.evaluate.ce import CE_SETS, OnDist, cross_entropy, ondist_pass, prompt_seqs, text_seqs
from refdir.evaluate.safety_judge import load_judge, make_judge, parse_judge_spec
from refdir.evaluate.tables import TITLE, markdown_tables, report_html
from refdir.method.refusal_judge import judge_all

__all__ = ["ARM_SYNTAX", "ArmSpec", "EvalConfig", "arm_context", "load_directions", "markdown_tables",
           "parse_arm", "run_eval"]


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
              "(DIRECTION: a direction file or a run dir; MODEL: HF dir, hub id or .gguf); any arm may end with "
              ":name=LABEL")


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


# ------------------------------------------------------------------------------------------ config, run


class EvalConfig(BaseModel):
    model: str = "default"
    arms: list[str] = ["base"]
    harmful: str = "embedded:harmful:test"
    harmless: str = "embedded:harmless:test"
    column: str = "instruction"
    n_harmful: int | None = Field(None, ge=1)
    n_harmless: int | None = Field(32, ge=1)
    text: str = "embedded"
    n_text: int | None = Field(None, ge=1)
    text_tokens: int = Field(256, ge=1)
    pairs: str = "embedded"
    n_pairs: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(64, ge=1)  # completions judged for refusal and safety
    ondist_tokens: int = Field(64, ge=1)  # length of the base model's greedy continuations on harmless prompts
    kl_tokens: int = Field(32, ge=1)
    judge: str = "substring"
    short_safe: bool = False
    system: str | None = None
    chat_template: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    device_map: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    batch_size: int = Field(16, ge=1)

    def model_spec(self, model: str | None = None) -> ModelSpec:
        """How to load the base model, or ``model`` (a checkpoint arm) with the same settings."""
        return ModelSpec(model=model or self.model, dtype=self.dtype, device=self.device, device_map=self.device_map,
                         trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle,
                         system=self.system, chat_template=self.chat_template)


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
    """The intervention an arm runs under (none for base and checkpoint arms)."""
    if arm.kind == "ablate":
        return ablate(model, edit_tensor(direction))
    if arm.kind == "add":
        layer = direction.layer if arm.layer is None else arm.layer
        n_layers = model.config.get_text_config().num_hidden_layers
        if not 0 <= layer < n_layers:
            raise RefdirError(f"arm {arm.label}: layer {layer} outside 0..{n_layers - 1}")
        return add(model, direction.vector, layer, arm.coeff)
    return nullcontext()


def _arm_file(arm: ArmSpec) -> Direction | Subspace:
    """The direction (ablate, add) or subspace (ablate only) file of an arm."""
    return load_direction(arm.target, subspace=arm.kind == "ablate")  # a file, or a run dir for its direction


def load_directions(arms: list[ArmSpec], d_model: int) -> dict[str, object]:
    """Load every direction file up front (cheap) so that a bad one fails before any model work. An ablate arm
    also takes a subspace file (the whole span is ablated)."""
    dirs: dict[str, Direction | Subspace] = {}
    for a in arms:
        if a.kind in ("ablate", "add"):
            d = _arm_file(a)
            if d.d_model != d_model:
                raise RefdirError(f"arm {a.label}: direction {a.target} has size {d.d_model}, the model {d_model}")
            dirs[a.target] = d
    return dirs


@dataclass
class EvalInputs:
    """What every arm is evaluated on: the prompts, texts and pairs, and the base model's greedy continuations
    of the harmless prompts with its reference pass along them."""

    harmful: list[str]
    harmless: list[str]
    texts: list[str]
    pairs: list[tuple[str, str]]
    cont: list[tuple[str, list[int]]]
    ref: OnDist


def run_eval(cfg: EvalConfig, out: str | Path, *, force: bool = False, run_dir: str | Path | None = None) -> dict:
    """Evaluate every arm, judge, and write ``results.json``, ``table.md``, ``completions.json`` and plots to
    ``out`` (atomically; an existing ``out`` is refused unless ``force``). With ``run_dir`` the tables and plots
    are also added to that run's report sections (the caller re-renders the run's report)."""
    out = Path(out)
    arms = _checked_arms(cfg, out, force, run_dir)
    _check_sources(cfg, arms, out, force, run_dir)
    t0 = time.time()
    harmful = load_instructions(cfg.harmful, cfg.column).instructions[: cfg.n_harmful]
    harmless = load_instructions(cfg.harmless, cfg.column).instructions[: cfg.n_harmless]
    if not harmful or not harmless:
        raise RefdirError("empty prompt set: the harmful and harmless prompt sets need at least one prompt each")
    texts = load_corpus(cfg.text, cfg.n_text)
    pairs = load_pairs(cfg.pairs, cfg.n_pairs)

    base, fmt = cfg.model_spec().load()
    directions = load_directions(arms, base.model.config.get_text_config().hidden_size)
    # the base model's greedy continuations on harmless prompts: on-distribution CE targets and the KL path
    cont = generate(base.model, fmt, harmless, max_new_tokens=cfg.ondist_tokens, batch_size=cfg.batch_size,
                    desc="base continuations", return_ids=True)
    ref = ondist_pass(base.model, prompt_seqs(fmt, harmless, [ids for _, ids in cont]), cfg.kl_tokens,
                      desc="base reference")
    inputs = EvalInputs(harmful, harmless, texts, pairs, cont, ref)

    results = [_eval_arm(cfg, arm, spec, base, fmt, directions, inputs)
               for arm, spec in tqdm(list(zip(arms, cfg.arms, strict=True)), desc="arms")]
    _judge_safety(cfg, base, harmful, results)
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
    _write(out, summary, results, harmful, force, run_dir)
    return summary


def _checked_arms(cfg: EvalConfig, out: Path, force: bool, run_dir: str | Path | None) -> list[ArmSpec]:
    """The parsed arms, after refusing what would fail later (an existing ``out``, a missing run directory,
    no arms, two arms with one label, an unknown safety judge)."""
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
    return arms


def _check_sources(cfg: EvalConfig, arms: list[ArmSpec], out: Path, force: bool,
                   run_dir: str | Path | None = None) -> None:
    """Refuse, before any model is loaded, what would fail later: the base model and every checkpoint arm's model
    (see :meth:`ModelSpec.check`), an unreadable direction file, an output location that cannot be written or
    that holds an input (the run directory, the model, an arm's file)."""
    cfg.model_spec().check()
    for a in arms:
        if a.kind == "ckpt":
            cfg.model_spec(a.target).check(chat=False)
        elif a.kind in ("ablate", "add"):
            _arm_file(a)
    check_output(out, "dir", [run_dir, cfg.model_spec().model, *(a.target for a in arms)])
    if force:
        check_replaceable(out)


def _eval_arm(cfg: EvalConfig, arm: ArmSpec, spec: str, base, fmt, directions: dict,
              inputs: EvalInputs) -> ArmResult:
    """CE on the three sets, KL along the base continuations, and judged harmful completions of one arm."""
    ta = time.time()
    res = ArmResult(arm.label, spec)
    if arm.kind == "ckpt":
        lm, afmt = cfg.model_spec(arm.target).load()
        model, tok = lm.model, lm.tokenizer
    else:
        lm, model, tok, afmt = None, base.model, base.tokenizer, fmt
    same = _same_tokenizer(tok, base.tokenizer)
    cont, harmless = inputs.cont, inputs.harmless
    targets = [ids for _, ids in cont] if same else [tok(t, add_special_tokens=False)["input_ids"] for t, _ in cont]
    with arm_context(model, arm, directions.get(arm.target)):
        res.ce["text"] = cross_entropy(model, text_seqs(tok, inputs.texts, cfg.text_tokens),
                                       f"{arm.label}: text CE")
        res.ce["pairs"] = cross_entropy(
            model, prompt_seqs(afmt, [p for p, _ in inputs.pairs],
                               [tok(r, add_special_tokens=False)["input_ids"] for _, r in inputs.pairs]),
            f"{arm.label}: pairs CE")
        if arm.kind == "base":
            od = inputs.ref
        elif same:
            od = ondist_pass(model, prompt_seqs(afmt, harmless, targets), cfg.kl_tokens, inputs.ref.ref,
                             f"{arm.label}: on-distribution")
        else:  # another tokenizer: CE on its own tokens of the same text; KL needs a shared vocabulary
            od = OnDist(cross_entropy(model, prompt_seqs(afmt, harmless, targets)), math.nan, math.nan, [])
        res.ce["ondist"] = od.ce
        res.kl = {"first": od.kl_first, "multi": od.kl_multi, "per_position": od.kl_per_position}
        res.completions = generate(model, afmt, inputs.harmful, max_new_tokens=cfg.max_new_tokens,
                                   batch_size=cfg.batch_size, desc=f"{arm.label}: harmful completions")
    verdicts = judge_all(res.completions)
    paper, broad = verdicts["paper"], verdicts["broad"]
    res.refusal = {"paper": paper.refusal, "broad": broad.refusal, "degenerate": paper.n_degenerate, "n": paper.n}
    if lm is not None:
        del model, lm
        gc.collect()
    res.seconds = time.time() - ta
    return res


def _judge_safety(cfg: EvalConfig, base, harmful: list[str], results: list[ArmResult]) -> None:
    """Every arm's completions through the safety judge (after all arms, so that a judge model is loaded once,
    and never while an arm's hooks are active)."""
    kind, judge_model = parse_judge_spec(cfg.judge)
    if judge_model == cfg.model:  # the base model judges (no hooks are active now): no second copy
        judge = make_judge(kind, base.model, base.tokenizer, short_safe=cfg.short_safe)
    else:
        judge = load_judge(cfg.judge, dtype=cfg.dtype, device=cfg.device, short_safe=cfg.short_safe,
                           trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    for res in results:
        s = judge(harmful, res.completions)
        res.safety = {"judge": cfg.judge, "score": s.safety, "n_unsafe": sum(s.unsafe), "unsafe": s.unsafe,
                      "verdicts": s.raw}


def _write(out: Path, summary: dict, results: list[ArmResult], harmful: list[str], force: bool,
           run_dir: str | Path | None) -> None:
    """results.json, completions.json, table.md and a standalone report in ``out`` (atomic); with ``run_dir``
    the same section among the run's report sections."""
    with atomic_dir(out, force=force) as tmp:
        atomic_write_json(tmp / "results.json", summary)
        atomic_write_json(tmp / "completions.json", {"prompts": harmful,
                                                     "completions": {r.name: r.completions for r in results}})
        atomic_write_text(tmp / "table.md", markdown_tables(summary))
        html = report_html(summary)
        RunDir(tmp).add_section("eval", html, TITLE)
        write_sections_report(tmp)  # a standalone report.html of this evaluation
    if run_dir is not None:
        RunDir(run_dir).add_section("eval", html, TITLE)
        write_sections_report(run_dir)  # only where run_dir holds no run; a run's report is its caller's to render
