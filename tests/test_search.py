"""`refdir search` on a tiny random model: outputs, resume after an interruption, refusal of another
model's or config's study, export of a front point."""

from __future__ import annotations

import html
import json
import math
import shutil

import pytest
import torch
from conftest import probe_found_little_refusal
from typer.testing import CliRunner

from refdir.cli.main import app
from refdir.core.directions import Direction
from refdir.core.rundir import RunDir
from refdir.errors import RefdirError
from refdir.method.search.study import lead_candidate
from refdir.method.uncertainty import count_text
from refdir.workflows.search import SearchConfig, pareto_front, run_search


def _cfg(model_dir, **kw) -> SearchConfig:
    base = dict(model=str(model_dir), refusal_tokens=["I", "As"], n_train=12, n_val=6, n_test=5, dtype="fp32",
                batch_size=8, screen_n=4, top_k=2, strong_starts=1, min_layer_frac=0.0, max_new_tokens=6,
                gen_batch_size=8)
    return SearchConfig.of(**(base | kw))


def test_pareto_front():
    pts = [(3.0, 0.0), (1.0, 0.5), (2.0, 0.1), (2.5, 0.6), (0.5, 2.0), (2.0, 0.2)]
    assert pareto_front(pts) == [0, 2, 1, 4]


def test_search_resumes_and_writes_front(tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    md = tiny_model_dir("qwen2")
    out = tmp_path / "s"
    cfg = _cfg(md, kl_marks=[0.3, 3.0])  # a random tiny model's KLs are large: marks it can reach
    calls = []

    def stop_after_3(study, trial):
        calls.append(trial.number)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, out, trials=8, per_mark=2, max_confirm=3, confirm_extra=1, progress=False, callbacks=[stop_after_3])
    assert not (out / "search" / "summary.json").exists()
    import optuna

    from refdir.method.search.study import storage

    st = optuna.load_study(study_name="refdir-search", storage=storage(out / "search" / "study.log"))
    first = {t.number: t.values for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE}
    known = [t for t in st.trials if t.user_attrs.get("from_selection")]
    assert len(first) == 3 + len(known)
    # plain full-strength warm starts the selection scored in full carry its bypass and KL, not a rerun
    saved = json.loads((out / "search" / "selection.json").read_text())
    scores = {(r["position"], float(r["layer"])): [r["bypass"], r["kl"]] for r in saved["table"]}
    assert known and all(t.values == scores[(t.params["position"], t.params["layer"])] for t in known)
    assert known[0].number == 0

    res = run_search(cfg, out, trials=8, per_mark=2, max_confirm=3, confirm_extra=1, progress=False)
    assert res["new_trials"] == 8 - 3 - len(known) and res["n_trials"] == 8
    # refined and calibrated trials are the ones after the searched ones; calibration adds at most one per mark
    assert res["n_refined"] == res["refine_trials"] + res["n_calibrated"]
    assert res["n_calibrated"] <= len(cfg.kl_marks)
    cal = [r for r in res["trials"] if r["calibrated"]]
    assert cal and all(r["refine_of"] is not None for r in cal)
    # a calibrated pick's KL on the confirmation prompts is nearer its aim (0.92 of its mark) than its source's was
    from refdir.method.search import CALIBRATE_MARGIN

    assert CALIBRATE_MARGIN == 0.92
    measured = json.loads((out / "search" / "confirm.json").read_text())
    compared = 0
    for m, picked in res["picks"].items():
        for t in picked:
            r = next(x for x in cal if x["trial"] == t) if t in {x["trial"] for x in cal} else None
            if r is not None:
                aim = CALIBRATE_MARGIN * float(m)
                src = measured[str(r["refine_of"])]["kl"]
                assert abs(math.log(measured[str(t)]["kl"] / aim)) < abs(math.log(src / aim))
                compared += 1
    assert compared >= 1  # at least one pick was calibrated, so the check above ran
    assert all(r["refine_of"] is not None for r in res["trials"][8:])
    again = {r["trial"]: [r["proxy_refusal"], r["proxy_kl"]] for r in res["trials"]}
    for n, v in first.items():  # the interrupted run's trials are kept, not recomputed
        assert again[n] == pytest.approx(v, abs=0)
    # warm start: the selected direction at full strength, plain, is trial 0
    saved = json.loads((out / "search" / "selection.json").read_text())
    sel, table = saved["chosen"], saved["table"]
    e0 = res["trials"][0]["edit"]
    if sel is None:  # a random model may pass no filter: the best fully scored candidate leads
        sel = min((r for r in table if r["bypass"] == r["bypass"]), key=lambda r: r["bypass"])
    assert res["trials"][0]["warm_start"] and e0["position"] == sel["position"] and e0["layer"] == sel["layer"]
    assert e0["attn"]["kernel"]["peak"] == 1.0 and e0["attn"]["variant"] == "plain"

    front = json.loads((out / "search" / "front.json").read_text())["points"]
    assert front and [p["point"] for p in front] == list(range(len(front)))
    kls = [p["proxy_kl"] for p in front]
    assert kls == sorted(kls)
    confirmed = [p for p in front if p["confirmed"]]
    assert confirmed and all(p["confirmed"]["n"] == 5 for p in confirmed)
    assert res["base"]["confirmed"]["kl"] == pytest.approx(0.0, abs=1e-6)
    # under each KL mark: at most per_mark (2) confirmed picks, from different lineages, each under the mark
    by_trial = {r["trial"]: r for r in res["trials"]}
    for m, picked in res["picks"].items():
        assert 1 <= len(picked) <= 2
        fams = [by_trial[t]["refine_of"] if by_trial[t]["refine_of"] is not None else t for t in picked]
        assert len(set(fams)) == len(fams)
        assert all(by_trial[t]["confirmed"]["kl"] <= float(m) for t in picked)
    # TPE sees the KL band [0.5·min mark, 1.2·max mark] as constraints on every trial
    lo, hi = 0.5 * min(cfg.kl_marks), 1.2 * max(cfg.kl_marks)
    for t in optuna.load_study(study_name="refdir-search", storage=storage(out / "search" / "study.log")).trials:
        assert t.constraints == pytest.approx({"kl_low": lo - t.values[1], "kl_high": t.values[1] - hi})
    assert "spearman_refusal" in res
    assert (out / "search" / "front.csv").read_text().startswith("point,trial")
    report = (out / "report.html").read_text()
    assert "Pareto search over edits" in report
    b = res["base"]["confirmed"]  # the base model's count with its interval; each confirmed point's too
    assert f"Base model: {count_text(b['refusals'], b['n'])} refusals" in report
    assert all(count_text(p["confirmed"]["refusals"], 5) in report for p in confirmed)

    # a finished study reruns without new trials or generations
    res2 = run_search(cfg, out, trials=8, per_mark=2, max_confirm=3, confirm_extra=1, progress=False)
    assert res2["new_trials"] == 0 and res2["front"][0]["confirmed"] == res["front"][0]["confirmed"]
    assert res2["n_refined"] == res["n_refined"] and res2["n_calibrated"] == res["n_calibrated"]
    # tokens the user gave say nothing of how often the model refuses; a probe that found 2 refusals in 32 gives a
    # warning in the summary and the report
    assert res["warnings"] == res2["warnings"] == []
    probe_found_little_refusal(out)
    res3 = run_search(cfg, out, trials=8, per_mark=2, max_confirm=3, confirm_extra=1, progress=False)
    assert len(res3["warnings"]) == 1 and "only 2 of 32" in res3["warnings"][0]
    assert html.escape(res3["warnings"][0]) in (out / "report.html").read_text()

    # export a point through the CLI and check the weights carry the edit: logits differ from the base
    ck = tmp_path / "ck"
    r = CliRunner().invoke(app, ["export", str(out), str(ck), "--point", str(len(front) - 1)])
    assert r.exit_code == 0, r.output
    meta = json.loads((ck / "refdir_edit.json").read_text())
    assert meta["point"] == len(front) - 1 and meta["edit"] == front[-1]["edit"]
    from transformers import AutoModelForCausalLM

    from refdir.core.edits import Edit, hooked, resolve
    from refdir.core.rundir import RunDir

    base, edited = (AutoModelForCausalLM.from_pretrained(p, trust_remote_code=False) for p in (md, ck))
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    plan = resolve(Edit.from_dict(front[-1]["edit"]), RunDir(out).candidates_with_sources())
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        with hooked(base, plan):
            want = base(input_ids=ids).logits
        got = edited(input_ids=ids).logits
    assert not torch.allclose(want, plain, atol=1e-3) and torch.allclose(got, want, atol=1e-4)
    r = CliRunner().invoke(app, ["export", str(out), str(tmp_path / "ck2"), "--point", "99"])
    assert r.exit_code == 2 and "not on the front" in r.output and not (tmp_path / "ck2").exists()

    # another config or another model: refused, the study is left as it was
    before = (out / "search" / "study.log").read_bytes()
    with pytest.raises(RefdirError, match="another config"):
        run_search(_cfg(md, max_strength=0.5), out, trials=6, progress=False)
    other = shutil.copytree(md, tmp_path / "other")  # a model that exists: a missing one is refused before
    with pytest.raises(RefdirError, match="another model|a run of model"):
        run_search(_cfg(other), out, trials=6, progress=False)
    r = CliRunner().invoke(app, ["search", str(md), "--out", str(out), "--seed", "7", "--n-val", "6"])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "another config" in r.output
    assert (out / "search" / "study.log").read_bytes() == before


def test_bad_reference_file_is_refused(tmp_path, tiny_model_dir):
    bad = tmp_path / "ref.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(RefdirError, match="reference file"):
        run_search(_cfg(tmp_path / "m"), tmp_path / "s", trials=2, reference=bad, progress=False)
    assert not (tmp_path / "s").exists()


def test_reference_points_keep_the_model_they_were_measured_on(tmp_path):
    import html

    from refdir.method.search import load_reference, reference_models

    front = tmp_path / "tool.json"
    front.write_text(json.dumps({"tool": "other 1.0", "model": "Model <A>", "n_bad_eval": 39,
                                 "pareto_front": [{"trial": 3, "refusals": 5, "kl": 0.06}, {"refusals": 9, "kl": 0.01}]}))
    pts = load_reference(front)
    assert [(p["label"], p["refusals"], p["kl"], p["n"], p["model"]) for p in pts] == [
        ("other 1.0 #3", 5.0, 0.06, 39, "Model <A>"), ("other 1.0 #1", 9.0, 0.01, 39, "Model <A>")]
    listed = tmp_path / "points.json"
    listed.write_text(json.dumps([{"label": "x", "refusals": 1, "kl": 0.1, "model": "B"}, {"refusals": 2, "kl": 0.2}]))
    more = load_reference(listed)
    assert [p["model"] for p in more] == ["B", None]
    # the report's caption names every model once, escaped for HTML where asked; nothing where none is given
    assert reference_models(pts + more, html.escape) == ", on Model &lt;A&gt; and B"
    assert reference_models(more[1:]) == "" and reference_models(None) == ""
    # drawn: the tool's front as one series in KL order, scaled from its 39 prompts to 78, one legend entry; the
    # listed points each with their label, unscaled where they say no count
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from refdir.method.search.report import draw_reference

    fig, ax = plt.subplots()
    draw_reference(ax, pts + more, 78, 1e-4)
    series = [ln for ln in ax.get_lines() if ln.get_label() == "other 1.0 (its front)"]
    assert len(series) == 1 and list(series[0].get_xdata()) == [0.01, 0.06]
    assert list(series[0].get_ydata()) == [18.0, 10.0]
    assert sorted(a.get_text() for a in ax.texts) == ["", "x"] and len(ax.get_lines()) == 3
    plt.close(fig)


def test_front_picks_spread_along_the_front():
    from refdir.method.search.confirm import front_picks

    front = [{"proxy_kl": x} for x in (0.0, 0.001, 0.003, 0.008, 0.012, 0.03, 0.045, 0.07, 0.2, 0.5, 1.0)]
    assert front_picks(front, 4) == [0, 3, 7, 10]
    assert front_picks(front, 20) == list(range(11))
    assert front_picks(front[:1], 3) == [0]
    assert front_picks(front, 0) == []


def test_refine_front_lands_under_each_kl_mark():
    """Strength refinement on an objective with a known answer: KL = 0.1·(attn² + mlp²) of the peaks and refusal
    = −(attn + mlp). Each mark gets a trial within 10 % of REFINE_MARGIN·mark, found in at most two tries per source; a rerun
    adds nothing."""
    import optuna

    from refdir.method.search import REFINE_MARGIN, Space, refine_front

    space = Space([-1], 4, 1.0, 3.0, 1.0, ["plain"])
    calls = []

    def objective(trial):
        e = space.suggest(trial)
        a, m = e.attn.kernel.peak, e.mlp.kernel.peak
        calls.append(trial.number)
        return -(a + m), 0.1 * (a * a + m * m)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for peak in (0.1, 0.5, 1.0):  # KL 0.002, 0.05, 0.2
        p = space.full_params(-1, 2.0)
        study.enqueue_trial(p | {"attn_peak": peak, "mlp_peak": peak})
    study.optimize(objective, n_trials=3)
    marks = [0.01, 0.05]
    added = refine_front(study, objective, space, marks, per_mark=2, progress=False)
    refined = [t for t in study.trials if "refine_of" in t.user_attrs]
    assert added == len(refined) > 0 and len(refined) <= 2 * 2 * len(marks)
    for m in marks:
        kls = [t.values[1] for t in refined if t.user_attrs["mark"] == m]
        assert any(abs(k / (REFINE_MARGIN * m) - 1) <= 0.1 for k in kls), (m, kls)
        assert all(k > 0 for k in kls)
    n = len(study.trials)
    assert refine_front(study, objective, space, marks, per_mark=2, progress=False) == 0
    assert len(study.trials) == n


def test_bad_kl_marks_are_refused(tmp_path):
    for marks, msg in (("0,0.05", "KL marks must be positive"), ("0.01,abc", "comma-separated numbers")):
        out = tmp_path / "s"
        r = CliRunner().invoke(app, ["search", str(tmp_path / "m"), "--out", str(out), "--kl-marks", marks])
        assert r.exit_code == 2 and r.output.startswith("error: ") and msg in r.output, r.output
        assert not out.exists()


def test_warm_starts_add_the_strongest_screened_directions():
    """After the selection's own warm starts come the candidates with the lowest screened bypass, whatever their KL,
    at full strength in the projected variant; candidates outside the searched layers never enter."""
    from refdir.method.search import Space, warm_starts

    nan = float("nan")
    table = [
        {"position": -1, "layer": 4, "bypass": -3.0, "kl": 0.05, "bypass_screen": -3.1},
        {"position": -1, "layer": 5, "bypass": -2.0, "kl": 0.02, "bypass_screen": -2.2},
        {"position": -1, "layer": 7, "bypass": nan, "kl": nan, "bypass_screen": -6.0},  # screened out (KL)
        {"position": -2, "layer": 6, "bypass": nan, "kl": nan, "bypass_screen": -5.0},
        {"position": -2, "layer": 2, "bypass": nan, "kl": nan, "bypass_screen": -9.0},  # below the searched layers
    ]
    space = Space([-1, -2], 10, 3.0, 8.0, 1.0, ["plain", "projected", "norm"])
    out = warm_starts(table, table[0], space, kl_max=0.1, top_k=1, strong_starts=2)
    lead = [space.full_params(-1, 4.0, v) for v in ("plain", "projected", "norm")]
    assert out == lead + [space.full_params(-1, 5.0, "plain"), space.full_params(-1, 7.0, "projected"),
                          space.full_params(-2, 6.0, "projected")]
    assert warm_starts(table, table[0], space, kl_max=0.1, top_k=1, strong_starts=0) == out[:4]
    # a strong start that is already a warm start is not repeated
    again = warm_starts(table, table[0], space, kl_max=0.1, top_k=1, strong_starts=5)
    assert len(again) == len({json.dumps(p, sort_keys=True) for p in again}) == 7
    assert again[-1] == space.full_params(-1, 5.0, "projected")


def test_warm_starts_give_every_direction_its_plain_ablation_first():
    """With an optimized direction beside the difference in means, both plain full ablations lead the warm starts
    (a tight time budget runs the first few only), then the other variants of each."""
    from refdir.method.search import Space, warm_starts

    table = [{"position": -1, "layer": 4, "bypass": -3.0, "kl": 0.05, "bypass_screen": -3.1}]
    space = Space([-1], 10, 3.0, 8.0, 1.0, ["plain", "projected", "norm"], ("dim", "rdo"))
    out = warm_starts(table, table[0], space, kl_max=0.1, top_k=1, strong_starts=0)
    assert out == [space.full_params(-1, 4.0, v, d) for v in ("plain", "projected", "norm") for d in ("dim", "rdo")]


def test_refine_skips_sources_already_on_target():
    """A front point already within 10 % of a mark's aim does not use up a refinement slot: the next nearest is
    refined instead."""
    import optuna

    from refdir.method.search import REFINE_MARGIN, Space, refine_front

    space = Space([-1], 4, 1.0, 3.0, 1.0, ["plain"])

    def objective(trial):
        e = space.suggest(trial)
        a, m = e.attn.kernel.peak, e.mlp.kernel.peak
        return -(a + m), 0.1 * (a * a + m * m)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    on_target = math.sqrt(REFINE_MARGIN * 0.01 / 0.2)  # KL exactly at the aim of mark 0.01
    for peak in (on_target, math.sqrt(0.1)):  # KL 0.009, 0.02
        study.enqueue_trial(space.full_params(-1, 2.0) | {"attn_peak": peak, "mlp_peak": peak})
    study.optimize(objective, n_trials=2)
    assert refine_front(study, objective, space, [0.01], per_mark=1, progress=False) >= 1
    refined = [t for t in study.trials if "refine_of" in t.user_attrs]
    assert {t.user_attrs["refine_of"] for t in refined} == {1}
    assert any(abs(t.values[1] / (REFINE_MARGIN * 0.01) - 1) <= 0.1 for t in refined)


def test_default_per_mark_follows_the_compute_dtype():
    from refdir.method.search import default_per_mark

    m = torch.nn.Linear(2, 2)
    assert default_per_mark(m) == 1
    assert default_per_mark(m.to(torch.bfloat16)) == 2


def test_each_optimized_direction_gets_its_own_refinement():
    """With an optimized direction in the space, its nearest front point is refined even when the difference-in-
    means points nearer the mark fill the per-mark slots (the demo's case: RDO's full strength sat third nearest)."""
    import optuna

    from refdir.method.search import Space, refine_front

    space = Space([-1], 4, 1.0, 3.0, 1.0, ["plain"], ("dim", "rdo"))
    gain = {"dim": 1.0, "rdo": 1.3}  # rdo cuts more refusal per unit of strength, at more KL

    def objective(trial):
        e = space.suggest(trial)
        a = e.attn.kernel.peak
        return -gain[e.direction] * 2 * a, 0.1 * gain[e.direction] ** 2 * 2 * a * a

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for d, peak in (("dim", 0.35), ("dim", 0.55), ("rdo", 0.6)):  # KL 0.0245, 0.0605, 0.1217 (all on the front)
        study.enqueue_trial(space.full_params(-1, 2.0, "plain", d) | {"attn_peak": peak, "mlp_peak": peak})
    study.optimize(objective, n_trials=3)
    refine_front(study, objective, space, [0.05], per_mark=2, progress=False)
    sources = {t.user_attrs["refine_of"] for t in study.trials if "refine_of" in t.user_attrs}
    assert sources == {0, 1, 2}
    refined = [t for t in study.trials if t.user_attrs.get("refine_of") == 2]
    assert refined and refined[0].params["direction"] == "rdo"
    # without the optimized direction in the space, two sources as before
    space1 = Space([-1], 4, 1.0, 3.0, 1.0, ["plain"])
    assert "direction" not in space1.full_params(-1, 2.0)


def test_a_tight_budget_runs_the_warm_starts_only_while_they_fit_and_an_extension_runs_the_rest():
    """Warm starts under a time budget run one at a time, in order, while they and the reserve fit (a slow machine
    keeps time for refinement); a bigger budget later runs the ones left, then TPE."""
    import time

    import optuna

    from refdir.method.search.study import run_budget, spent_seconds, unrun_warm_starts

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        time.sleep(0.1)
        return x, 1.0 - x

    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.TPESampler(seed=0))
    warm = [{"x": i / 10} for i in range(8)]
    n = run_budget(study, objective, 0.55, 2, [0.5], progress=False, warm=warm)
    ran = [tr.params for tr in study.trials]
    assert 1 <= n == len(ran) < len(warm)  # stopped with the reserve (2 trials) still in the budget
    assert ran == warm[:n] and all(tr.user_attrs["warm_start"] for tr in study.trials)
    assert spent_seconds(study) <= 0.55
    left = unrun_warm_starts(study, warm)
    assert left == warm[n:]
    study.enqueue_trial(left[0], user_attrs={"warm_start": True})  # a queued one counts as seen
    assert unrun_warm_starts(study, warm) == warm[n + 1:]
    m = run_budget(study, objective, 1e6, 2, [0.5], progress=False, max_trials=len(left) + 1,
                   warm=unrun_warm_starts(study, warm))
    assert m == len(left) + 1
    assert [tr.params for tr in study.trials][: len(warm)] == warm  # the queued one ran first, then the rest
    assert "warm_start" not in study.trials[-1].user_attrs  # then TPE


def test_search_takes_an_optimized_direction_from_the_command_line(tmp_path, tiny_model_dir):
    """`refdir search --direction-method rdo` trains RDO from the search's lead candidate, searches it beside the
    candidates (warm-started at full strength) and reads it back on a rerun; a value it does not know is refused
    before anything is written."""
    torch.set_num_threads(1)
    md, out = tiny_model_dir("qwen2"), tmp_path / "s"
    args = ["search", str(md), "--out", str(out), "--refusal-tokens", "I,As", "--n-train", "12", "--n-val", "6",
            "--n-val-harmful", "4", "--n-test", "3", "--dtype", "fp32", "--batch-size", "8", "--top-k", "2",
            "--max-new-tokens", "4", "--kl-marks", "0.3,3", "--trials", "8", "--direction-method"]
    bad = CliRunner().invoke(app, [*args, "sideways"])
    assert bad.exit_code == 2 and bad.output.strip().splitlines()[-1].startswith("error:")
    assert "sideways" in bad.output and not out.exists()
    ran = CliRunner().invoke(app, [*args, "rdo"])
    assert ran.exit_code == 0, ran.output
    rd = RunDir(out)
    r = Direction.load(rd.optimize_dir() / "rdo.safetensors")
    res = json.loads((rd.search_dir() / "summary.json").read_text())
    # trained from the candidate the search leads with: the selection's choice, else (as on this random model,
    # where the paper's filters pass nothing) the best scored candidate
    sel = json.loads((rd.search_dir() / "selection.json").read_text())
    lead = lead_candidate(sel["table"], sel["chosen"], res["config"]["run"]["kl_max"])
    assert (r.position, r.layer) == (lead["position"], lead["layer"])
    assert res["config"]["run"]["direction_method"] == "rdo"
    rdo = [t for t in res["trials"] if t["edit"].get("direction") == "rdo"]
    assert rdo and any(t["warm_start"] for t in rdo)
    again = CliRunner().invoke(app, [*args, "rdo"])  # the same study: nothing new to run
    assert again.exit_code == 0, again.output
    assert json.loads((rd.search_dir() / "summary.json").read_text())["trials"] == res["trials"]


def test_post_norm_models_take_the_selection_scores_as_pre_norm_ones_do(tmp_path, tiny_model_dir):
    """Under post-norms the selection's ablation acts where the search's full edit acts (before the norm; both
    equal the weights: tests/test_architectures.py), so the plain warm starts take the selection's scores as on a
    pre-norm model (before 2026-12-07 its hooks acted after the norm, and each warm start was run again)."""
    import optuna

    from refdir.method.search.study import storage

    out = tmp_path / "s"
    run_search(_cfg(tiny_model_dir("gemma2"), kl_marks=[3.0]), out, trials=4, per_mark=1, max_confirm=1,
               progress=False)
    st = optuna.load_study(study_name="refdir-search", storage=storage(out / "search" / "study.log"))
    warm = [t for t in st.trials if t.user_attrs.get("warm_start")]
    assert warm and any(t.user_attrs.get("from_selection") for t in warm)
    assert all(t.datetime_start is not None and t.datetime_complete is not None for t in warm)
