"""Optimized refusal directions (RDO) and cones on tiny models: the training hooks equal the evaluation hooks,
gradients reach only the basis, the weights stay bitwise unchanged, each loss decreases on a planted problem,
training resumes after an interruption to the same result, the command writes loadable files, bad input is one
clear error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import POSTNORM_ARCHS, make_tiny, uneven_post_norms
from safetensors.torch import save_file

from refdir.core.chat import ChatFormat
from refdir.core.data import embedded
from refdir.core.forward import last_logits
from refdir.core.generation import generate
from refdir.core.interventions import ablate, add
from refdir.core.state_file import load_state, save_state
from refdir.errors import RefdirError
from refdir.method.optimize import (
    OptimizeConfig,
    Trainer,
    _Edit,
    add_base_topk,
    frozen,
    orthonormal,
    target_logits,
    training_hooks,
)
from refdir.method.optimize_data import Examples, TrainSet, kl_topk, layout, shared_prefix


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    model = make_tiny("qwen2", len(tiny_tokenizer), seed=3)
    return model, ChatFormat(tiny_tokenizer)


def _planted(model, fmt, n=6, n_tokens=5, seed=0):
    """A planted problem: targets the model generates under a planted edit (ablation of ``p`` for the harmful
    set, addition of ``3 p`` at layer 1 for the refusal set), base completions for the retain set."""
    torch.manual_seed(seed)
    p = torch.randn(64)
    harmful, harmless = embedded("harmful").instructions[:2 * n], embedded("harmless").instructions[:2 * n]
    ids = [fmt.prompt_ids(x) for x in harmful + harmless]
    with ablate(model, p):
        comp = generate(model, fmt, harmful, max_new_tokens=n_tokens, progress=False, return_ids=True)
    with add(model, p, 1, 3.0):
        ref = generate(model, fmt, harmless, max_new_tokens=n_tokens, progress=False, return_ids=True)
    base = generate(model, fmt, harmless, max_new_tokens=n_tokens, progress=False, return_ids=True)
    H, L = ids[:2 * n], ids[2 * n:]

    def part(sl):
        return TrainSet(Examples(H[sl], [t for _, t in comp[sl]]), Examples(L[sl], [t for _, t in ref[sl]]),
                        Examples(L[sl], [t for _, t in base[sl]]))

    train, val = part(slice(0, n)), part(slice(n, 2 * n))
    prefix = shared_prefix([train, val])
    pad = fmt.tokenizer.pad_token_id
    for s in (train, val):
        add_base_topk(model, s.retain, prefix, pad, topk=8)
    return p, train, val


@pytest.fixture(scope="module")
def planted(tiny):
    """The planted problem of :func:`_planted`, built once for the module (training never changes it)."""
    return _planted(*tiny)


def test_layout_aligns_prompt_ends_and_targets():
    lay = layout([([9, 9, 1, 2], [5, 6, 7]), ([9, 9, 3], [8])], 2, 0)
    assert lay.ids.tolist() == [[1, 2, 5, 6, 7], [0, 3, 8, 0, 0]]
    assert lay.mask.tolist() == [[1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0, 0]]
    assert lay.pos.tolist()[1][1:3] == [2, 3] and lay.targets.tolist() == [[5, 6, 7], [8, -100, -100]]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("arch_name", sorted(POSTNORM_ARCHS))
def test_training_hooks_equal_the_weight_edit_under_post_norms_and_pass_gradients(arch_name, k):
    # what RDO trains is what a checkpoint edited with the trained span computes: under post-norms as uneven as
    # Gemma 3's, the training hooks, ablate and orthogonalize_ agree, and the loss still reaches the span
    import copy

    from refdir.core.orthogonalize import orthogonalize_

    model = uneven_post_norms(make_tiny(arch_name, 128))
    span = torch.linalg.qr(torch.randn(64, k, generator=torch.Generator().manual_seed(5)))[0].T.contiguous()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        edited = copy.deepcopy(model)
        orthogonalize_(edited, span)
        want = edited(input_ids=ids).logits
        with ablate(model, span):
            hooked = model(input_ids=ids).logits
    train = span.clone().requires_grad_(True)
    edit = _Edit(span=train)
    with frozen(model), training_hooks(model, edit, 1):
        got = model(input_ids=ids).logits
        got.logsumexp(-1).sum().backward()
    scale = max(1.0, float(want.abs().max()) / 10)
    assert float((hooked - want).abs().max()) <= 1e-4 * scale
    assert float((got.detach() - want).abs().max()) <= 1e-4 * scale
    assert train.grad is not None and float(train.grad.abs().max()) > 0
    assert all(p.grad is None for p in model.parameters())


def test_training_hooks_equal_the_evaluation_hooks_and_target_logits_the_plain_forward(tiny):
    model, fmt = tiny
    torch.manual_seed(1)
    r = torch.randn(64)
    prompts = embedded("harmful").instructions[:4]
    edit = _Edit()
    with ablate(model, r):
        ref = last_logits(model, fmt, prompts)
    with training_hooks(model, edit, 1):
        edit.span = (r / r.norm())[None]
        got = last_logits(model, fmt, prompts)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with add(model, r, 1, 2.0):
        ref = last_logits(model, fmt, prompts)
    with training_hooks(model, edit, 1):
        edit.span, edit.add = None, (2.0 * r)[None].expand(len(prompts), -1)
        got = last_logits(model, fmt, prompts)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # logits at target positions with the shared prefix = the plain full forward of prompt + target
    ids = [fmt.prompt_ids(x) for x in prompts]
    rows = [(p, [5, 6, 7][: 1 + i % 3]) for i, p in enumerate(ids)]
    prefix = shared_prefix([TrainSet(Examples(ids, [[1]] * 4), Examples(ids, [[1]] * 4), Examples(ids, [[1]] * 4))])
    assert len(prefix) >= 2
    with torch.no_grad():
        logits, tgt = target_logits(model, rows, prefix, fmt.tokenizer.pad_token_id)
        for j, (p, t) in enumerate(rows):
            full = model(input_ids=torch.tensor([p + t])).logits[0, len(p) - 1:len(p) - 1 + len(t)]
            torch.testing.assert_close(logits[j, :len(t)], full, rtol=1e-4, atol=1e-4)
            assert tgt[j, :len(t)].tolist() == t


def test_kl_topk_is_zero_at_base_and_equals_full_kl_when_k_is_the_vocab():
    torch.manual_seed(0)
    base, edited = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    tgt = torch.zeros(2, 3, dtype=torch.long)
    logp = torch.log_softmax(base, -1)
    top, ids = logp.topk(11, -1)
    rest = torch.full((2, 3), -30.0)
    full = (logp.exp() * (logp - torch.log_softmax(edited, -1))).sum(-1).mean()
    torch.testing.assert_close(kl_topk(edited, tgt, ids, top, rest), full, rtol=1e-4, atol=1e-6)
    top4, ids4 = logp.topk(4, -1)
    rest4 = torch.log1p(-top4.exp().sum(-1))
    assert abs(float(kl_topk(base, tgt, ids4, top4, rest4))) < 1e-5
    assert 0 < float(kl_topk(edited, tgt, ids4, top4, rest4)) <= float(full) + 1e-5


def test_gradients_reach_only_the_basis_and_weights_stay_bitwise(tiny, planted):
    model, fmt = tiny
    p, train, val = planted
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: q.requires_grad for n, q in model.named_parameters()}
    torch.manual_seed(2)
    tr = Trainer(model, fmt.tokenizer.pad_token_id, torch.randn(64), 1, 3.0 * p.norm(), train, val,
                 OptimizeConfig(steps=3, eval_every=10, batch_size=4))
    init = tr.param.detach().clone()
    res = tr.run(progress=False)
    assert tr.param.grad is not None and torch.isfinite(tr.param.grad).all() and tr.param.grad.abs().sum() > 0
    assert all(q.grad is None for q in model.parameters())
    assert {n: q.requires_grad for n, q in model.named_parameters()} == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(tr.param.detach(), init)
    assert res.basis.shape == (1, 64) and abs(float(res.basis.norm()) - 1) < 1e-5


@pytest.mark.parametrize("k", [1, 2])
def test_backward_pass_by_pass_gives_the_gradient_of_the_total(tiny, planted, k):
    """A training step backpropagates each loss's pass as soon as it is computed (one pass's activations held at
    a time): the same losses and the same gradient as one backward of the weighted total."""
    model, fmt = tiny
    p, train, _ = planted
    torch.manual_seed(4)
    init = torch.stack([p, torch.randn(64)])[:k]
    tr = Trainer(model, fmt.tokenizer.pad_token_id, init, 1, 3.0 * p.norm(), train, train,
                 OptimizeConfig(k=k, batch_size=4, weights=(1.0, 0.2, 0.7)))
    rows, mix = ([0, 2, 4], [1, 3, 5], [0, 1, 5]), torch.tensor([[1.0, 0.5], [0.2, 1.0]])[:, :k]
    with frozen(model), training_hooks(model, tr.edit, 1):
        parts = tr.losses(train, *rows, mix)
        want = torch.autograd.grad(tr.total(parts), tr.param)[0]
        got_parts = tr.losses(train, *rows, mix, backward=True)
    assert set(parts) == set(got_parts) == {"ablation", "addition", "retain"}
    assert all(not v.requires_grad and torch.equal(v, parts[n].detach()) for n, v in got_parts.items())
    assert want.abs().sum() > 0
    torch.testing.assert_close(tr.param.grad, want, rtol=1e-5, atol=1e-7)
    assert tr.edit.span is None and tr.edit.add is None


@pytest.mark.parametrize("loss", ["ablation", "addition", "retain"])
def test_each_loss_decreases_on_a_planted_problem(tiny, planted, loss):
    model, fmt = tiny
    p, train, val = planted
    w = tuple(1.0 if n == loss else 0.0 for n in ("ablation", "addition", "retain"))
    torch.manual_seed(5)
    init = p + 1.5 * p.norm() * torch.nn.functional.normalize(torch.randn(64), dim=0)
    tr = Trainer(model, fmt.tokenizer.pad_token_id, init, 1, 3.0 * p.norm(), train, val,
                 OptimizeConfig(steps=15, lr=0.05, weights=w, eval_every=5, patience=10, batch_size=6))
    res = tr.run(progress=False)
    vals = [h[loss] for h in res.history if h["split"] == "val"]
    assert vals[-1] < vals[0] and res.best_val < vals[0], vals
    assert set(h for h in res.history[1] if h in ("ablation", "addition", "retain")) == {loss}


def test_cone_keeps_an_orthonormal_basis_and_trains_every_row(tiny, planted):
    model, fmt = tiny
    p, train, val = planted
    torch.manual_seed(3)
    init = torch.stack([p, torch.randn(64)])
    tr = Trainer(model, fmt.tokenizer.pad_token_id, init, 1, 3.0 * p.norm(), train, val,
                 OptimizeConfig(k=2, steps=4, eval_every=2, batch_size=4, lr=0.05))
    start = tr.basis().detach().clone()
    tr.run(progress=False)
    q = tr.basis().detach()
    torch.testing.assert_close(q @ q.T, torch.eye(2), atol=1e-5, rtol=0)
    assert all(not torch.allclose(q[i], start[i]) for i in range(2))
    torch.testing.assert_close(orthonormal(start), start, atol=1e-5, rtol=0)


def test_resume_after_interruption_gives_the_uninterrupted_result(tiny, planted, tmp_path):
    model, fmt = tiny
    p, train, val = planted
    cfg = OptimizeConfig(steps=6, eval_every=2, patience=10, batch_size=3, lr=0.03)
    pad = fmt.tokenizer.pad_token_id

    def trainer():
        return Trainer(model, pad, p, 1, 2.0, train, val, cfg)

    full = trainer().run(progress=False)
    ckpt = tmp_path / "state.safetensors"

    class Killed(Exception):
        pass

    def save_then_die(t):
        save_state(ckpt, "k", t.state_dict())
        if t.step_i == 4:
            raise Killed

    with pytest.raises(Killed):
        trainer().run(on_checkpoint=save_then_die, progress=False)
    assert load_state(ckpt, "another key", "checkpoint") is None  # the state of other inputs: train anew
    resumed = trainer()
    assert load_state(ckpt, "k", "checkpoint", resumed.load_state_dict)["step"] == 4
    resumed = resumed.run(progress=False)
    assert torch.equal(resumed.basis, full.basis)
    assert json.dumps(resumed.history) == json.dumps(full.history)


def test_a_checkpoint_that_does_not_fit_is_one_clear_error(tiny, planted, tmp_path):
    """A truncated file, a file that is not a refdir state, and a state of another shape: each one RefdirError
    naming the file; the trainer is left as it was."""
    model, fmt = tiny
    p, train, val = planted
    cfg = OptimizeConfig(steps=2, eval_every=1, batch_size=3)
    t = Trainer(model, fmt.tokenizer.pad_token_id, p, 1, 2.0, train, val, cfg)
    ckpt = tmp_path / "state.safetensors"
    save_state(ckpt, "k", t.state_dict())
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:len(data) // 2])
    with pytest.raises(RefdirError, match="corrupt checkpoint .*state.safetensors.*delete it"):
        load_state(ckpt, "k", "checkpoint", t.load_state_dict)
    save_file({"x": torch.zeros(2)}, str(ckpt))
    with pytest.raises(RefdirError, match="not a refdir.state file"):
        load_state(ckpt, "k", "checkpoint", t.load_state_dict)
    save_state(ckpt, "k", {**t.state_dict(), "param": torch.zeros(2, 64)})
    with pytest.raises(RefdirError, match="'param' is of shape"):
        load_state(ckpt, "k", "checkpoint", t.load_state_dict)
    assert t.step_i == 0 and not t.history


def test_bad_settings_are_one_clear_error(tiny, planted):
    model, fmt = tiny
    p, train, val = planted
    for bad in (dict(steps=0), dict(lr=-1.0), dict(weights=(0.0, 0.0, 0.0)), dict(weights=(1.0, float("nan"), 1.0)),
                dict(k=0), dict(batch_size=0)):
        with pytest.raises(RefdirError):
            Trainer(model, 0, p, 1, 1.0, train, val, OptimizeConfig(**bad))
    with pytest.raises(RefdirError, match="rows"):
        Trainer(model, 0, p, 1, 1.0, train, val, OptimizeConfig(k=2))
    empty = TrainSet(Examples([[1, 2]], [[]]), train.refuse, train.retain)
    with pytest.raises(RefdirError, match="no harmful examples"):
        Trainer(model, 0, p, 1, 1.0, empty, val, OptimizeConfig())


# ------------------------------------------------------------------------------------------------ the command
@pytest.fixture()
def tiny_run(tiny_model_dir, tiny_tokenizer, tmp_path):
    """A minimal finished run on a tiny model: config, data, refusal tokens, filtered sets, coefficient and a
    direction (a planted difference of means is not needed: the command only trains from it)."""
    from refdir.core.directions import Direction
    from refdir.core.io import atomic_write_json

    mdir = tiny_model_dir("qwen2")
    run = tmp_path / "run"
    atomic_write_json(run / "config.json", {"model": {"model": str(mdir), "dtype": "fp32", "device": "cpu"},
                                            "judge": "broad", "induce_rel_frac": 0.5})
    sets = {k: {s: embedded(k, s).instructions[:6] for s in ("train", "val", "test")} for k in ("harmful", "harmless")}
    atomic_write_json(run / "data" / "sets.json", sets)
    atomic_write_json(run / "refusal_tokens" / "tokens.json", {"ids": tiny_tokenizer("I")["input_ids"][:1]})
    atomic_write_json(run / "filter" / "filtered.json",
                      {sp: {k: sets[k][sp] for k in sets} for sp in ("train", "val")})
    atomic_write_json(run / "coeff" / "coeff.json", {"coeff": 2.0})
    torch.manual_seed(0)
    Direction(torch.randn(64), 1, -1, "tiny").save(run / "selection" / "direction")
    return run


def _cli(args):
    from typer.testing import CliRunner

    from refdir.cli.main import app

    return CliRunner().invoke(app, args)


FAST = ["--steps", "2", "--eval-every", "1", "--batch-size", "3", "--target-tokens", "4", "--n-train", "4",
        "--n-val", "2", "--samples", "2"]


def test_cli_writes_a_loadable_direction_and_resumes(tiny_run, tmp_path):
    from refdir.core.directions import Direction

    r = _cli(["optimize", str(tiny_run), *FAST])
    assert r.exit_code == 0, r.output
    d = Direction.load(tiny_run / "optimize" / "rdo")
    ref = Direction.load(tiny_run / "selection" / "direction")
    assert d.layer == ref.layer and d.meta["source"] == "rdo"
    torch.testing.assert_close(d.vector.norm(), ref.vector.norm())
    summ = json.loads((tiny_run / "optimize" / "rdo_summary.json").read_text())
    assert summ["per_k"][0]["history"][0]["split"] == "val" and "independence" in summ
    assert summ["independence"] is None or set(summ["independence"]) >= {"r_change_under_d_ablation", "independent"}
    assert "Optimized refusal direction" in (tiny_run / "report.html").read_text()
    assert summ["targets_judged"]["dropped"] is False and set(summ["targets_judged"]["off_label"]) == {
        "compliant", "refusal"}
    # a rerun with the same settings reads the finished checkpoint back: the same direction, no new steps
    targets = (tiny_run / "optimize" / "targets.json").stat().st_mtime_ns
    r = _cli(["optimize", str(tiny_run), *FAST])
    assert r.exit_code == 0, r.output
    assert torch.equal(Direction.load(tiny_run / "optimize" / "rdo").vector, d.vector)
    assert (tiny_run / "optimize" / "targets.json").stat().st_mtime_ns == targets
    # more steps continue from the checkpoint
    r = _cli(["optimize", str(tiny_run), *FAST[2:], "--steps", "3", "--patience", "5", "--out",
              str(tmp_path / "more")])
    assert r.exit_code == 0, r.output
    assert Direction.load(tmp_path / "more").layer == ref.layer
    # judged targets: a tiny random model's "refusal" targets are no refusals, so that kind is kept whole
    r = _cli(["optimize", str(tiny_run), *FAST, "--judge-targets", "--out", str(tmp_path / "judged")])
    assert r.exit_code == 0, r.output
    summ = json.loads((tiny_run / "optimize" / "rdo_summary.json").read_text())
    assert summ["targets_judged"] == {"off_label": {"compliant": 0, "refusal": None}, "dropped": True}


def test_cli_resumes_an_interrupted_training_from_its_checkpoint(tiny_run, tmp_path, monkeypatch):
    """Interrupted (Ctrl-C) in its third step, after the checkpoint of step 2, the command's rerun trains on from
    that checkpoint to the direction and history an uninterrupted command gets; a pickled checkpoint of an older
    refdir beside it is never read. A truncated checkpoint is one error line, not a traceback."""
    import shutil

    from safetensors import safe_open

    from refdir.core.directions import Direction
    from refdir.method import optimize as method

    fresh = shutil.copytree(tiny_run, tmp_path / "fresh")
    args = [*FAST[4:], "--steps", "4", "--eval-every", "1", "--patience", "10", "--no-independence"]
    r = _cli(["optimize", str(fresh), *args])
    assert r.exit_code == 0, r.output

    opt = tiny_run / "optimize"
    opt.mkdir()
    (opt / "rdo_k1.pt").write_bytes(b"an old pickle: never loaded")
    step = method.Trainer.step

    def interrupted_step(self):
        if self.step_i == 2:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(method.Trainer, "step", interrupted_step)
    r = _cli(["optimize", str(tiny_run), *args])
    assert r.exit_code == 130, r.output
    with safe_open(str(opt / "rdo_k1_checkpoint.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["values"])["step"] == 2
    taken = []

    def counted_step(self):
        taken.append(self.step_i + 1)
        return step(self)

    monkeypatch.setattr(method.Trainer, "step", counted_step)
    r = _cli(["optimize", str(tiny_run), *args])
    assert r.exit_code == 0, r.output
    assert taken == [3, 4]  # resumed: steps 1 and 2 are not taken again
    assert torch.equal(Direction.load(opt / "rdo").vector, Direction.load(fresh / "optimize" / "rdo").vector)
    history = [json.loads((d / "optimize" / "rdo_summary.json").read_text())["per_k"][0]["history"]
               for d in (tiny_run, fresh)]
    assert history[0] == history[1] and history[0][-1]["step"] == 4

    ckpt = opt / "rdo_k1_checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    r = _cli(["optimize", str(tiny_run), *args])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "corrupt optimize checkpoint" in r.output and "delete it" in r.output


def test_cli_cone_writes_a_subspace_and_the_cone_analysis(tiny_run):
    from refdir.core.directions import Subspace

    r = _cli(["optimize", str(tiny_run), "--method", "cone", "--k", "2", *FAST])
    assert r.exit_code == 0, r.output
    sub = Subspace.load(tiny_run / "optimize" / "cone_k2")
    assert sub.k == 2 and sub.layer == 1
    torch.testing.assert_close(sub.basis @ sub.basis.T, torch.eye(2), atol=1e-5, rtol=0)
    summ = json.loads((tiny_run / "optimize" / "cone_summary.json").read_text())
    assert [p["k"] for p in summ["per_k"]] == [1, 2] and 0 <= summ["cone_dimension"] <= 2
    assert len(summ["per_k"][1]["scores"]["members"]) == 2 and "cone dimension" in r.output
    # a rerun reads each k's training checkpoint back (beside the k = 2 output, never mistaken for it)
    r = _cli(["optimize", str(tiny_run), "--method", "cone", "--k", "2", *FAST])
    assert r.exit_code == 0, r.output
    assert torch.equal(Subspace.load(tiny_run / "optimize" / "cone_k2").basis, sub.basis)


@pytest.mark.parametrize("args, msg", [
    (["--method", "pca"], "--method"),
    (["--k", "2"], "--method cone"),
    (["--weights", "1,2"], "--weights"),
    (["--weights", "a,b,c"], "--weights"),
    (["--steps", "0"], "steps"),
    (["--lr", "0"], "learning rate"),
    (["--n-val", "0"], "--n-val"),
])
def test_cli_bad_input_is_one_error_line(tiny_run, args, msg):
    r = _cli(["optimize", str(tiny_run), *args])
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output


def test_cli_refuses_a_directory_that_is_not_a_finished_run(tmp_path, tiny_run):
    r = _cli(["optimize", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "does not exist" in r.output
    (tmp_path / "out.safetensors").write_bytes(b"x")
    r = _cli(["optimize", str(tiny_run), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "already exists" in r.output


# ------------------------------------------------------------------------------------------------ independence
def test_independence_numbers_on_a_tiny_model(tiny):
    from refdir.analysis.independence import _expression, independence, orthogonal_to

    model, fmt = tiny
    torch.manual_seed(4)
    d, r = torch.randn(64), torch.randn(64)
    u = orthogonal_to(r, d)
    assert abs(float(u.norm()) - 1) < 1e-6 and abs(float(u @ torch.nn.functional.normalize(d, dim=0))) < 1e-6
    with pytest.raises(RefdirError, match="parallel"):
        orthogonal_to(2 * d, d)
    prompts = embedded("harmful").instructions[:5]
    # the captured residual is the edited one: a direction's own expression is gone under its ablation
    (own,) = _expression(model, fmt, prompts, [torch.nn.functional.normalize(d, dim=0)], d, 8, False)
    assert abs(own).max() < 1e-4
    ind = independence(model, fmt, prompts, r, d, from_layer=1)
    assert ind.r_base.shape == (4,) and ind.n_prompts == 5
    # at the embedding (layer 0) ablating d cannot move the orthogonal r⊥: only later layers can
    assert abs(ind.r_d_ablated[0] - ind.r_base[0]) < 1e-4 and abs(ind.d_r_ablated[0] - ind.d_base[0]) < 1e-4
    s = ind.summary()
    assert s["r_change_under_d_ablation"] >= 0 and s["independent"] == (ind.r_change < 0.1 and ind.d_change < 0.1)
    assert abs(s["cos_r_d"] - float(torch.nn.functional.cosine_similarity(r, d, dim=0))) < 1e-5


def test_batch_size_is_capped_by_memory(tiny):
    from refdir.workflows.optimize import fit_batch_size

    model, _ = tiny
    assert fit_batch_size(model, 50, 8) == 8  # a tiny model fits
    assert fit_batch_size(model, 50, 8, budget=1e-12) == 1  # never below one row


def test_judged_targets_drop_refusing_compliant_and_compliant_refusal_targets(tiny_tokenizer):
    """The ablation loss trains on compliant targets only, the addition loss on refusals only; a kind whose train or
    val rows would all go keeps every target, so training always has rows."""
    from types import SimpleNamespace

    from refdir.workflows.optimize import Context, judged_targets

    def ids(texts):
        return [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    no, yes = "I'm sorry, but I can't assist with that.", "Sure, here are the steps you asked for."
    prompts = {"harmful": {"train": ["a", "b", "c"], "val": ["d"]}, "harmless": {"train": ["e", "f"], "val": ["g"]}}
    ctx = Context(None, SimpleNamespace(tokenizer=tiny_tokenizer), None, None, 1.0, [], prompts)
    targets = {"compliant": ids([yes, no, yes, yes]), "refusal": ids([no, yes, no]), "base": ids([yes, yes, yes])}
    out, dropped = judged_targets(ctx, targets)
    assert dropped == {"compliant": 1, "refusal": 1}
    assert [bool(t) for t in out["compliant"]] == [True, False, True, True]
    assert [bool(t) for t in out["refusal"]] == [True, False, True]
    assert out["base"] == targets["base"] and targets["compliant"][1]  # the input is not changed
    assert len(Examples([[1]] * 4, out["compliant"])) == 3
    # every val refusal target compliant: that kind is kept as it was
    targets["refusal"] = ids([no, yes, yes])
    out, dropped = judged_targets(ctx, targets)
    assert dropped["refusal"] is None and out["refusal"] == targets["refusal"]
