"""`refdir optimize`: an optimized refusal direction (RDO) or a refusal cone trained on a finished run.

Reads the run's model settings, filtered train / val prompts, refusal tokens, selected difference-in-means
direction and addition coefficient. Targets are generated once, greedy and short, and cached in the run's optimize
directory: compliant completions of the harmful prompts with the difference-in-means direction ablated, refusal
completions of the harmless prompts with it added (times the run's coefficient), and the base completions of the
harmless prompts with the base model's top-k distributions. Training checkpoints (basis, Adam state, step, history,
random state) are written atomically after every validation, so an interrupted command resumes where it stopped;
they and the top-k cache are safetensors files (:mod:`refdir.core.state_file`; the ``.pt`` files of older refdir
versions are never read).
A cone of dimension K is trained for k = 1..K (each warm-started from the k − 1 one); every k's sampled members are
scored (bypass: refusal metric on harmful val with the member ablated; induce: on harmless val with it added) and
the cone dimension is the largest k whose members all still mediate refusal.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from refdir.analysis.independence import independence
from refdir.core import run_files
from refdir.core.directions import Direction, Subspace
from refdir.core.forward import last_logits
from refdir.core.generation import generate
from refdir.core.html import figure_html, plt, table_html
from refdir.core.interventions import ablate, add
from refdir.core.io import atomic_write_json, check_file_target, read_json_object
from refdir.core.rundir import RunDir
from refdir.core.state_file import load_state, save_state
from refdir.errors import RefdirError
from refdir.method.optimize import LOSSES, OptimizeConfig, Optimized, Trainer, add_base_topk, orthonormal
from refdir.method.optimize_data import Examples, TrainSet, shared_prefix, targets_fit
from refdir.method.refusal_judge import judge
from refdir.method.scoring import refusal_metric_from_logits
from refdir.workflows.checks import run_fits_model
from refdir.workflows.report import add_section

METHODS = ("rdo", "cone")


@dataclass
class OptimizeSettings:
    """What ``refdir optimize`` trains: the method, the cone dimension K, the training settings ``train`` (an
    :class:`refdir.method.optimize.OptimizeConfig`, whose defaults are the command's; its ``k`` is set for each k
    trained), the target length, how many filtered train / val prompts of each kind it uses, how many cone members
    the analysis scores per k, and where the result goes. The defaults use 16-token targets on 16 + 4 prompts.
    ``judge_targets``: drop the compliant targets the judge reads as refusals and the refusal targets it reads as
    compliant (:func:`judged_targets`); off by default (every target, as the paper trains): on the default model
    it left RDO at its start, no better on a development split (NOTES.md)."""

    method: str = "rdo"
    k: int = 1
    train: OptimizeConfig = field(default_factory=OptimizeConfig)
    target_tokens: int = 16
    n_train: int = 16
    n_val: int = 4
    samples: int = 8
    independence: bool = True
    judge_targets: bool = False
    out: Path | None = None
    force: bool = False

    def check(self) -> OptimizeSettings:
        if self.method not in METHODS:
            raise RefdirError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.method == "rdo" and self.k != 1:
            raise RefdirError("--k is the cone dimension: use it with --method cone (RDO trains one direction)")
        for name in ("target_tokens", "n_train", "n_val", "samples"):
            if getattr(self, name) < 1:
                raise RefdirError(f"--{name.replace('_', '-')} must be at least 1")
        self.config(self.k)
        return self

    def config(self, k: int) -> OptimizeConfig:
        return replace(self.train, k=k, weights=tuple(self.train.weights)).check()

    def record(self) -> dict:
        """The settings as the summary records them, one flat dict (the report reads the training's from it)."""
        own = {k: v for k, v in asdict(self).items() if k not in ("out", "force", "train")}
        return own | {k: v for k, v in asdict(self.train).items() if k != "k"}

    def out_path(self, rd: RunDir) -> Path:
        if self.out is not None:
            return self.out.with_suffix(".safetensors")
        return rd.source_path("rdo") if self.method == "rdo" else rd.optimize_dir() / f"cone_k{self.k}.safetensors"


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tensor_key(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


@dataclass
class Context:
    """A finished run opened for optimization: its directory, model, prompts and direction."""

    rd: RunDir
    lm: object
    fmt: object
    direction: Direction
    coeff: float
    refusal_ids: list[int]
    prompts: dict = field(default_factory=dict)  # {"harmful"|"harmless": {"train"|"val": [...]}}
    rel_frac: float = 0.5

    @property
    def model(self):
        return self.lm.model

    @property
    def pad(self) -> int:
        return self.lm.tokenizer.pad_token_id

    @property
    def scale(self) -> float:
        """The norm of the added vector: the difference-in-means norm times the run's addition coefficient."""
        return float(self.direction.vector.norm()) * self.coeff


def open_context(run_dir: str | Path, s: OptimizeSettings, model: dict | None = None) -> Context:
    """Read the run (refused before the model loads when it is unusable), then load its model."""
    rd = RunDir.open_finished(run_dir)
    spec = rd.model_spec(model)
    spec.check()
    cfg = rd.config()
    filt = rd.filtered()
    prompts = {kind: {"train": filt["train"][kind][:s.n_train], "val": filt["val"][kind][:s.n_val]}
               for kind in ("harmful", "harmless")}
    empty = [f"{k} {sp}" for k, v in prompts.items() for sp, p in v.items() if not p]
    if empty:
        raise RefdirError(f"the run's filtered sets have no {empty[0]} prompts to optimize on")
    frac = cfg.get("induce_rel_frac", 0.5)
    if not run_files.is_number(frac):
        raise run_files.corrupt(rd.config_path, f"induce_rel_frac is {frac!r}, not a number")
    d, coeff = rd.direction(), (rd.coeff() or {}).get("coeff") or 1.0
    rd.refusal_ids()  # read before the model loads; its ids are checked against the vocabulary after
    lm, fmt = spec.load()
    return Context(rd, lm, fmt, d, float(coeff), run_fits_model(rd, d, lm.model), prompts, float(frac))


def rdo_direction(p, chosen: dict, run, progress: bool = True) -> torch.Tensor:
    """RDO as a stage of the search (``refdir run`` or ``refdir search`` with ``--direction-method rdo``): trained
    with ``refdir optimize``'s defaults from the candidate the search leads with, ``chosen`` (position, layer: the
    selection's choice, else the best scored candidate), on a prepared run ``p`` (a
    :class:`refdir.workflows.search.Prepared`), without the independence analysis; written where ``refdir
    optimize`` writes it, with its summary and report section. Targets and training resume from the optimize
    directory. The addition loss adds the difference in means itself (coefficient 1: the search path fits no
    coefficient). Returns the direction [d]."""
    s = OptimizeSettings(independence=False).check()
    prompts = {kind: {"train": p.filt["train"][kind][:s.n_train], "val": p.filt["val"][kind][:s.n_val]}
               for kind in ("harmful", "harmless")}
    if any(not v for sets in prompts.values() for v in sets.values()):
        raise RefdirError("the run's filtered sets are too small to optimize a direction on")
    d = p.cands.get(chosen["position"], int(chosen["layer"]))
    ctx = Context(p.rd, p.m.lm, p.m.fmt, d, 1.0, p.ids, prompts, float(run.induce_rel_frac))
    _optimize(ctx, s, s.out_path(p.rd), progress)
    return p.rd.source("rdo")


# ------------------------------------------------------------------------------------------------ targets
def make_targets(ctx: Context, n_tokens: int, batch_size: int, progress: bool) -> dict[str, list[list[int]]]:
    """Greedy target completions (token ids, EOS cut): compliant (harmful, d ablated), refusal (harmless, d·coeff
    added), base (harmless, unedited); train prompts first, then val."""
    m, d = ctx.model, ctx.direction
    harmful = ctx.prompts["harmful"]["train"] + ctx.prompts["harmful"]["val"]
    harmless = ctx.prompts["harmless"]["train"] + ctx.prompts["harmless"]["val"]

    def gen(prompts, desc):
        out = generate(m, ctx.fmt, prompts, max_new_tokens=n_tokens, batch_size=batch_size, progress=progress,
                       desc=desc, return_ids=True, shared_prefix=True)
        return [ids for _, ids in out]

    with ablate(m, d.vector):
        compliant = gen(harmful, "targets: compliant")
    with add(m, d.vector, d.layer, ctx.coeff):
        refusal = gen(harmless, "targets: refusal")
    return {"compliant": compliant, "refusal": refusal, "base": gen(harmless, "targets: base")}


def cached_targets(ctx: Context, s: OptimizeSettings, progress: bool) -> tuple[dict, str]:
    """The targets, from the optimize directory when generated before with the same inputs; else generated and
    saved. Returns them with their key."""
    key = _key({"model": ctx.rd.config().get("model"), "direction": _tensor_key(ctx.direction.vector),
                "layer": ctx.direction.layer, "coeff": ctx.coeff, "prompts": ctx.prompts, "n": s.target_tokens})
    f = ctx.rd.optimize_dir() / "targets.json"
    rec = read_json_object(f, "optimize cache") if f.exists() else {}
    if rec.get("key") == key:
        n = {"compliant": sum(map(len, ctx.prompts["harmful"].values()))}
        n["refusal"] = n["base"] = sum(map(len, ctx.prompts["harmless"].values()))
        if not targets_fit(rec.get("targets"), n, ctx.model.config.get_text_config().vocab_size):
            raise RefdirError(f"corrupt optimize cache {f}: its targets are not token ids of the model, one list per "
                              "prompt; delete it to compute them again")
        return rec["targets"], key
    targets = make_targets(ctx, s.target_tokens, max(s.train.batch_size, 16), progress)
    atomic_write_json(f, {"key": key, "prompts": ctx.prompts, "targets": targets})
    return targets, key


TARGET_JUDGE = "wide"  # the widest judge: a compliant target that any judge would flag is not kept


def judged_targets(ctx: Context, targets: dict) -> tuple[dict, dict]:
    """The targets with the compliant ones the judge (:data:`TARGET_JUDGE`) reads as refusals, and the refusal ones
    it reads as compliant, emptied (an empty target is no training row). With the difference in means ablated the
    model still refuses some harmful prompts ("I'm sorry, but I can't assist with that."): trained on such a
    target, the ablation loss would teach the direction to keep that refusal. A kind whose train or val rows would
    all be dropped keeps every target. Returns the targets and, per kind, how many the judge reads off-label
    (None: all of one split, kept)."""
    out, dropped = dict(targets), {}
    for name, kind, want in (("compliant", "harmful", False), ("refusal", "harmless", True)):
        n = len(ctx.prompts[kind]["train"])
        texts = ctx.lm.tokenizer.batch_decode(targets[name], skip_special_tokens=True)
        keep = [f == want for f in judge(texts, TARGET_JUDGE).flags]
        if not (any(keep[:n]) and any(keep[n:])):
            dropped[name] = None
            continue
        out[name] = [t if k else [] for t, k in zip(targets[name], keep, strict=True)]
        dropped[name] = keep.count(False)
    return out, dropped


def train_sets(ctx: Context, targets: dict, key: str, topk: int) -> tuple[TrainSet, TrainSet, list[int]]:
    """The train and val sets with the retain set's base distributions (cached next to the targets)."""
    ids = {k: [ctx.fmt.prompt_ids(p) for sp in ("train", "val") for p in ctx.prompts[k][sp]]
           for k in ("harmful", "harmless")}
    nh, nl = len(ctx.prompts["harmful"]["train"]), len(ctx.prompts["harmless"]["train"])

    def part(h, lo):
        return TrainSet(Examples(ids["harmful"][h], targets["compliant"][h]),
                        Examples(ids["harmless"][lo], targets["refusal"][lo]),
                        Examples(ids["harmless"][lo], targets["base"][lo]))

    train, val = part(slice(0, nh), slice(0, nl)), part(slice(nh, None), slice(nl, None))
    prefix = shared_prefix([train, val])
    f, fkey = ctx.rd.optimize_dir() / "base_topk.safetensors", _key({"targets": key, "topk": topk})

    def use(rec: dict) -> None:
        for name, ts in (("train", train), ("val", val)):
            ts.retain.set_base(rec, name)

    if load_state(f, fkey, "optimize cache", use) is None:
        with torch.no_grad():
            for ts in (train, val):
                add_base_topk(ctx.model, ts.retain, prefix, ctx.pad, topk)
        save_state(f, fkey, train.retain.base_tensors("train") | val.retain.base_tensors("val"))
    return train, val, prefix


# ------------------------------------------------------------------------------------------------ training
def train_k(ctx: Context, s: OptimizeSettings, k: int, init: torch.Tensor, sets: tuple[TrainSet, TrainSet],
            targets_key: str, progress: bool) -> Optimized:
    """Train (or resume, or read back) the k-dim basis from ``init``; checkpointed after every validation."""
    cfg = s.config(k)
    seq = max(len(p) + len(t) for ts in sets for ex in (ts.harmful, ts.refuse, ts.retain)
              for p, t in zip(ex.prompts, ex.targets, strict=True))
    cfg.batch_size = fit_batch_size(ctx.model, seq, cfg.batch_size)  # a pass holds one loss's rows
    tr = Trainer(ctx.model, ctx.pad, init, ctx.direction.layer, ctx.scale, sets[0], sets[1], cfg)
    key = _key({"cfg": asdict(s.config(k)), "targets": targets_key, "init": _tensor_key(init), "scale": ctx.scale,
                **({"judged": True} if s.judge_targets else {})})
    f = ctx.rd.optimize_dir() / f"{s.method}_k{k}_checkpoint.safetensors"  # not cone_kK: the output
    load_state(f, key, "optimize checkpoint", tr.load_state_dict)

    def save(t: Trainer) -> None:
        save_state(f, key, t.state_dict())

    res = tr.run(on_checkpoint=save, progress=progress)
    save(tr)
    return res


def fit_batch_size(model, seq_len: int, requested: int, budget: float = 0.25) -> int:
    """``requested`` rows, fewer where one training batch (activations kept for the backward pass and float32
    logits at ``seq_len`` positions) would take more than ``budget`` of the memory available now."""
    c = model.config.get_text_config()
    d, n_layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    inter = getattr(c, "intermediate_size", None) or 4 * d
    per_row = seq_len * (n_layers * (12 * d + 3 * inter) * next(model.parameters()).element_size() + 3 * vocab * 4)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: trust the request
        return requested
    return max(1, min(requested, int(budget * avail // per_row)))


def grow(basis: torch.Tensor, seed: int) -> torch.Tensor:
    """``basis`` [k, d] with one more row, random and orthogonal to it (the warm start of the k + 1 cone)."""
    g = torch.Generator().manual_seed(seed)
    return orthonormal(torch.cat([basis, torch.randn(1, basis.shape[1], generator=g)]))


# ------------------------------------------------------------------------------------------------ scoring
def mean_metric(ctx: Context, prompts: list[str], batch_size: int = 16) -> float:
    logits = last_logits(ctx.model, ctx.fmt, prompts, batch_size, shared_prefix=True)
    return float(refusal_metric_from_logits(logits, ctx.refusal_ids).mean())


def cone_scores(ctx: Context, basis: torch.Tensor, n: int, seed: int, base: dict) -> dict:
    """Bypass / induce of ``n`` members sampled from the cone (the basis vector itself for k = 1) and the bypass of
    the whole span, on the run's val prompts; a member mediates refusal when its ablation removes and its addition
    adds at least ``rel_frac`` of the gap between the harmful and harmless baselines."""
    harmful, harmless = ctx.prompts["harmful"]["val"], ctx.prompts["harmless"]["val"]
    k = basis.shape[0]
    g = torch.Generator().manual_seed(seed)
    mix = torch.ones(1, 1) if k == 1 else torch.randn(n, k, generator=g).abs()
    members = torch.nn.functional.normalize(mix @ basis, dim=-1)
    with ablate(ctx.model, basis):
        span = mean_metric(ctx, harmful)
    gap = base["harmful"] - base["harmless"]
    rows = []
    for m in members:
        with ablate(ctx.model, m):
            by = mean_metric(ctx, harmful)
        with add(ctx.model, m * ctx.scale, ctx.direction.layer):
            ind = mean_metric(ctx, harmless)
        rows.append({"bypass": by, "induce": ind, "mediates": bool(by <= base["harmful"] - ctx.rel_frac * gap
                                                                   and ind >= base["harmless"] + ctx.rel_frac * gap)})
    return {"span_bypass": span, "members": rows, "all_mediate": all(r["mediates"] for r in rows)}


# ------------------------------------------------------------------------------------------------ the command
def optimize_run(run_dir: str | Path, s: OptimizeSettings, model: dict | None = None, progress: bool = True) -> dict:
    """Train RDO or a cone on a finished run; write the Direction / Subspace file, ``optimize/{method}_summary.json`` and a
    report section. Returns the summary."""
    s.check()
    out = s.out_path(RunDir(run_dir))
    if s.out is not None:
        check_file_target(out, s.force)
    ctx = open_context(run_dir, s, model)
    with ctx.rd.lock():
        return _optimize(ctx, s, out, progress)


def _optimize(ctx: Context, s: OptimizeSettings, out: Path, progress: bool) -> dict:
    t0 = time.perf_counter()
    targets, tkey = cached_targets(ctx, s, progress)
    judged, dropped = judged_targets(ctx, targets)  # the report says how many targets are not what they stand for
    train, val, _ = train_sets(ctx, judged if s.judge_targets else targets, tkey, s.config(1).topk)
    t_targets = time.perf_counter() - t0
    base = {"harmful": mean_metric(ctx, ctx.prompts["harmful"]["val"]),
            "harmless": mean_metric(ctx, ctx.prompts["harmless"]["val"])}
    d_hat = ctx.direction.unit()[None]
    per_k, basis, t_opt = [], d_hat, 0.0
    for k in range(1, s.k + 1):
        init = basis if k == 1 else grow(basis, s.train.seed + k)
        t1 = time.perf_counter()
        res = train_k(ctx, s, k, init, (train, val), tkey, progress)
        t_opt += time.perf_counter() - t1
        basis = res.basis.float()
        per_k.append({"k": k, "best_step": res.best_step, "best_val": res.best_val, "stopped_early": res.stopped_early,
                      "history": res.history, "scores": cone_scores(ctx, basis, s.samples, s.train.seed, base)})
    dim = 0
    while dim < len(per_k) and per_k[dim]["scores"]["all_mediate"]:
        dim += 1
    summary = {"method": s.method, "settings": s.record(),
               "out": str(out), "baseline": base, "dim_scores": cone_scores(ctx, d_hat, 1, s.train.seed, base),
               "coeff": ctx.coeff, "scale": ctx.scale, "per_k": per_k, "cone_dimension": dim,
               "cos_with_dim": float((basis @ d_hat[0]).abs().max()),
               "seconds": {"targets": t_targets, "optimization": t_opt},
               "n": {"train": train.sizes(), "val": val.sizes()},
               "targets_judged": {"off_label": dropped, "dropped": s.judge_targets}}
    if s.method == "rdo" and s.independence and summary["cos_with_dim"] > 1 - 1e-4:
        summary["independence"] = None  # training kept the difference-in-means direction: nothing to compare
    elif s.method == "rdo" and s.independence:
        ind = independence(ctx.model, ctx.fmt, ctx.prompts["harmful"]["val"], basis[0], d_hat[0],
                           from_layer=ctx.direction.layer, progress=progress)
        summary["independence"] = ind.summary()
    _write(ctx, s, out, basis, summary)
    return summary


def _write(ctx: Context, s: OptimizeSettings, out: Path, basis: torch.Tensor, summary: dict) -> None:
    d = ctx.direction
    meta = {"source": s.method, "init": "difference-in-means", "settings": summary["settings"],
            "scale": ctx.scale, "cone_dimension": summary["cone_dimension"]}
    if s.method == "rdo":  # scaled to the difference-in-means norm, so the run's coefficient keeps its meaning
        Direction(basis[0] * d.vector.norm(), d.layer, d.position, d.model_id, "raw", meta).save(out)
    else:
        Subspace(basis, d.layer, d.position, d.model_id, meta).save(out)
    atomic_write_json(ctx.rd.optimize_dir() / f"{s.method}_summary.json", summary)
    add_section(ctx.rd.path, f"optimize_{s.method}", report_html(summary),
                "Optimized refusal direction (RDO)" if s.method == "rdo" else "Refusal cone")


def plot_losses(per_k: list[dict]):
    """Train (lines) and validation (dots) losses against the step, one panel per loss, one colour per k."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ci, rec in enumerate(per_k):
        col = colors[ci % len(colors)]
        for ax, name in zip(axes, ("loss", *LOSSES), strict=True):
            for split, style in (("train", "-"), ("val", "o")):
                pts = [(h["step"], h[name]) for h in rec["history"] if h["split"] == split and name in h]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, color=col, ms=4, lw=1,
                            label=f"k={rec['k']} {split}" if name == "loss" else None)
            ax.set_title("total (weighted)" if name == "loss" else name, fontsize=9)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    return fig


def report_html(summary: dict) -> str:
    """The report section: settings, loss curves, and per k the scores of the sampled members."""
    b, set_ = summary["baseline"], summary["settings"]
    rows = []
    for rec in summary["per_k"]:
        sc = rec["scores"]
        by = [m["bypass"] for m in sc["members"]]
        ind = [m["induce"] for m in sc["members"]]
        rows.append([rec["k"], rec["best_step"], f"{rec['best_val']:.4f}", f"{sc['span_bypass']:.2f}",
                     f"{max(by):.2f} / {sum(by) / len(by):.2f}", f"{min(ind):.2f} / {sum(ind) / len(ind):.2f}",
                     f"{sum(m['mediates'] for m in sc['members'])}/{len(by)}"])
    ds = summary["dim_scores"]["members"][0]
    text = (f"<p>Trained from the difference-in-means direction with weights ablation / addition / retain "
            f"{tuple(set_['weights'])}, lr {set_['lr']}, up to {set_['steps']} steps, batch {set_['batch_size']}, "
            f"{set_['target_tokens']}-token targets; added vector norm {summary['scale']:.2f}. Refusal metric "
            f"baselines on val: harmful {b['harmful']:.2f}, harmless {b['harmless']:.2f}; the difference-in-means "
            f"direction: bypass {ds['bypass']:.2f}, induce {ds['induce']:.2f}. A member mediates refusal when its "
            f"ablation removes and its addition adds at least half the gap. Targets {summary['seconds']['targets']:.0f} s, "
            f"optimization {summary['seconds']['optimization']:.0f} s.</p>")
    off = (summary.get("targets_judged") or {}).get("off_label") or {}
    if off:
        use = "dropped from training" if summary["targets_judged"]["dropped"] else "trained on, as the paper does"
        text += (f"<p>Targets the {TARGET_JUDGE} judge reads against their label (train + val): {off.get('compliant')} "
                 f"compliant targets refuse, {off.get('refusal')} refusal targets comply; {use}.</p>")
    if summary["method"] == "cone":
        text += f"<p><b>Cone dimension: {summary['cone_dimension']}</b> (the largest k whose members all mediate).</p>"
    html = text + figure_html(plot_losses(summary["per_k"])) + table_html(
        rows, ["k", "best step", "val loss", "span bypass", "member bypass max / mean", "member induce min / mean",
               "members mediating"])
    ind = summary.get("independence")
    if ind:
        html += (f"<p>Representational independence (trained direction orthogonalized against the difference in "
                 f"means, cos before {ind['cos_r_d']:.3f}; harmful val, last position, layers ≥ {ind['from_layer']}): "
                 f"ablating d̂ changes r⊥'s expression by {ind['r_change_under_d_ablation']:.1%}, ablating r⊥ changes "
                 f"d̂'s by {ind['d_change_under_r_ablation']:.1%} → "
                 f"{'independent' if ind['independent'] else 'not independent'} (threshold {ind['threshold']:.0%}).</p>")
    return html
