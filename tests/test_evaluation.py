"""refdir eval / bench: arms, CE loss, KL, the tables, lm-eval, bad inputs (tiny random models)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny
from typer.testing import CliRunner

from refdir.cli.main import app
from refdir.core.directions import Direction
from refdir.errors import RefdirError
from refdir.evaluate.evaluation import EvalConfig, parse_arm, run_eval

SMALL = dict(n_harmful=4, n_harmless=4, n_text=3, n_pairs=3, text_tokens=48, max_new_tokens=6, ondist_tokens=6, kl_tokens=4,
             dtype="fp32", batch_size=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    """A tiny llama, its orthogonalized copy, an unrelated second tiny checkpoint and a direction file."""
    from refdir.core.orthogonalize import save_orthogonalized

    tmp_path = tmp_path_factory.mktemp("eval-models")
    base = tmp_path / "base"
    m = make_tiny("llama", len(tiny_tokenizer))
    m.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    torch.manual_seed(3)
    d = Direction(torch.randn(64), layer=1, position=-1, model_id="tiny")
    dpath = d.save(tmp_path / "direction")
    save_orthogonalized(m, tiny_tokenizer, d.vector, tmp_path / "ortho")
    other = tmp_path / "other"
    make_tiny("llama", len(tiny_tokenizer), seed=7).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    return {"base": str(base), "dir": str(dpath.with_suffix("")), "ortho": str(tmp_path / "ortho"),
            "other": str(other)}


@pytest.fixture()
def setup(models, tmp_path):
    return {**models, "tmp": tmp_path}


def test_parse_arm():
    a = parse_arm("add:runs/x/selection/direction:coeff=-1.5:layer=3:name=subtract")
    assert (a.kind, a.target, a.coeff, a.layer, a.label) == ("add", "runs/x/selection/direction", -1.5, 3, "subtract")
    assert parse_arm("ckpt:org/model-name").target == "org/model-name"
    assert parse_arm("ablate:d").label == "ablation" and parse_arm("base").label == "base"
    for bad in ("frobnicate:x", "ablate", "base:x", "ablate:d:coeff=2", "add:d:coeff=abc", "add:d:colour=red"):
        with pytest.raises(RefdirError):
            parse_arm(bad)


def test_eval_arms_agree_and_differ(setup):
    s = setup
    out = s["tmp"] / "eval"
    cfg = EvalConfig(model=s["base"], arms=["base", f"ablate:{s['dir']}", f"add:{s['dir']}:coeff=0:name=add0",
                                             f"add:{s['dir']}:coeff=8:name=add8",
                                             f"ckpt:{s['ortho']}:name=ortho", f"ckpt:{s['other']}:name=other"],
                     **SMALL)
    summ = run_eval(cfg, out)
    arms = {a["name"]: a for a in summ["arms"]}
    base, abl, ortho = arms["base"], arms["ablation"], arms["ortho"]
    assert base["kl"]["first"] == 0 and base["kl"]["multi"] == 0
    for k in ("text", "pairs", "ondist"):
        assert abs(arms["add0"]["ce"][k] - base["ce"][k]) < 1e-6  # coefficient 0 changes nothing
        assert abs(abl["ce"][k] - ortho["ce"][k]) < 1e-4  # weight edit == ablation hooks (fp32)
        assert abs(abl["ce"][k] - base["ce"][k]) > 1e-4  # ablating a random direction does change the model
        assert abs(arms["other"]["ce"][k] - base["ce"][k]) > 1e-3  # a different checkpoint is a different model
        assert arms["add8"]["ce_delta"][k] == pytest.approx(arms["add8"]["ce"][k] - base["ce"][k])
    assert arms["add0"]["kl"]["multi"] < 1e-8
    assert abs(abl["kl"]["multi"] - ortho["kl"]["multi"]) < 1e-4 and abl["kl"]["multi"] > 1e-4
    assert arms["other"]["kl"]["first"] > abl["kl"]["first"]
    assert len(abl["kl"]["per_position"]) == 4
    comp = json.loads((out / "completions.json").read_text())["completions"]
    assert comp["ablation"] == comp["ortho"]
    for a in summ["arms"]:
        assert 0 <= a["refusal"]["paper"] <= 1 and 0 <= a["safety"]["score"] <= 1 and a["refusal"]["n"] == 4
    md = (out / "table.md").read_text()
    assert all(n in md for n in arms) and "CE on-distribution" in md
    assert "Table 9 layout" in (out / "report.html").read_text()
    with pytest.raises(RefdirError, match="already exists"):
        run_eval(cfg, out)


def test_eval_adds_section_to_run_report(setup):
    s = setup
    run = s["tmp"] / "run"
    run.mkdir()
    cfg = EvalConfig(model=s["base"], arms=["base", f"ablate:{s['dir']}"], judge=f"llm:{s['base']}", **SMALL)
    summ = run_eval(cfg, s["tmp"] / "ev", run_dir=run)
    for a in summ["arms"]:  # the base model itself judged (its tokenizer has a chat template)
        assert a["safety"]["judge"].startswith("llm:") and len(a["safety"]["unsafe"]) == 4
        assert a["safety"]["verdicts"][0].startswith("log P(yes)=")
    assert (run / "report_sections" / "eval.html").exists()
    assert "Table 10 layout" in (run / "report.html").read_text()


@pytest.mark.parametrize("case", ["missing_ckpt", "empty_prompts", "bad_direction", "judge_no_template"])
def test_eval_bad_inputs_leave_nothing(setup, case, tiny_tokenizer):
    s = setup
    out = s["tmp"] / f"out-{case}"
    kw = dict(SMALL)
    arms = ["base"]
    if case == "missing_ckpt":
        arms.append(f"ckpt:{s['tmp'] / 'no-such-model'}")
    elif case == "empty_prompts":
        (s["tmp"] / "empty.json").write_text("[]")
        kw["harmful"] = str(s["tmp"] / "empty.json")
    elif case == "bad_direction":
        arms.append(f"ablate:{s['tmp'] / 'nothing'}")
    else:
        nt = s["tmp"] / "no-template"
        make_tiny("llama", len(tiny_tokenizer)).save_pretrained(nt)
        tok = type(tiny_tokenizer).from_pretrained(s["base"])
        tok.chat_template = None
        tok.save_pretrained(nt)
        kw["judge"] = f"llm:{nt}"
    with pytest.raises(RefdirError) as e:
        run_eval(EvalConfig(model=s["base"], arms=arms, **kw), out)
    assert "\n" not in str(e.value)
    assert not out.exists()
    assert not list(s["tmp"].glob(f".out-{case}*"))


def test_cli_eval(setup):
    s = setup
    r = CliRunner()
    base_args = ["eval", s["base"], "--n-harmful", "3", "--n-harmless", "3", "--n-text", "2", "--n-pairs", "2",
                 "--max-new-tokens", "4", "--ondist-tokens", "4", "--kl-tokens", "2", "--dtype", "fp32"]
    res = r.invoke(app, base_args + ["--arm", "base", "--arm", f"ablate:{s['dir']}", "--out", str(s["tmp"] / "c")])
    assert res.exit_code == 0, res.output
    assert json.loads((s["tmp"] / "c" / "results.json").read_text())["arms"][1]["name"] == "ablation"
    res = r.invoke(app, base_args + ["--arm", "nonsense:x", "--out", str(s["tmp"] / "d")])
    assert res.exit_code == 2 and res.output.strip().startswith("error:") and len(res.output.strip().splitlines()) == 1
    assert not (s["tmp"] / "d").exists()


# ---------------------------------------------------------------------- lm-eval


def _local_task(d):
    """An lm-eval multiple-choice task over a small local jsonl file."""
    rows = [{"question": f"Which number follows {i}?", "choices": [str(i + 1), str(i + 3), str(i - 2)], "answer": 0}
            for i in range(5)]
    (d / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "refdir_toy.yaml").write_text(
        "task: refdir_toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n")
    return d


def test_bench_local_task_runs_hooks(setup):
    from refdir.evaluate.benchmarks import BenchConfig, run_bench

    s = setup
    tasks = _local_task(s["tmp"])
    out = s["tmp"] / "bench"
    cfg = BenchConfig(model=s["base"], arms=["base", f"ablate:{s['dir']}", f"ckpt:{s['ortho']}:name=ortho"],
                      tasks=["refdir_toy"], include_path=str(tasks), include_defaults=False, dtype="fp32",
                      batch_size=4)
    summ = run_bench(cfg, out)
    accs = [a["results"]["refdir_toy"]["acc"] for a in summ["arms"]]
    assert all(0 <= x <= 1 for x in accs)
    samples = [json.loads((out / "samples" / f"{i:02d}.json").read_text())["samples"]["refdir_toy"] for i in range(3)]
    base, abl, ortho = ([r["resps"] for r in sorted(x, key=lambda r: r["doc_id"])] for x in samples)
    assert len(base) == 5
    flat = [[float(v[0]) for v in doc] for doc in base], [[float(v[0]) for v in doc] for doc in abl], \
        [[float(v[0]) for v in doc] for doc in ortho]
    # the ablation hooks are active inside lm-eval: log-likelihoods move, and match the weight-edited checkpoint
    assert max(abs(x - y) for a, b in zip(flat[0], flat[1], strict=True) for x, y in zip(a, b, strict=True)) > 1e-3
    assert max(abs(x - y) for a, b in zip(flat[1], flat[2], strict=True) for x, y in zip(a, b, strict=True)) < 1e-3
    assert "refdir_toy acc" in (out / "table.md").read_text()


def test_bench_unknown_task(setup):
    from refdir.evaluate.benchmarks import BenchConfig, run_bench

    out = setup["tmp"] / "bench-bad"
    with pytest.raises(RefdirError, match="unknown lm-eval task"):
        run_bench(BenchConfig(model=setup["base"], tasks=["refdir_toy", "no_such_task_xyz"],
                              include_path=str(_local_task(setup["tmp"])), include_defaults=False), out)
    assert not out.exists()


def test_bench_missing_data_and_cli_errors(setup):
    from refdir.evaluate.benchmarks import BenchConfig, run_bench

    d = _local_task(setup["tmp"])
    (d / "data.jsonl").unlink()  # the task's data is gone (as benchmark data is, offline)
    out = setup["tmp"] / "bench-nodata"
    with pytest.raises(RefdirError, match="could not get the data of lm-eval task"):
        run_bench(BenchConfig(model=setup["base"], tasks=["refdir_toy"], include_path=str(d),
                              include_defaults=False), out)
    assert not out.exists()
    res = CliRunner().invoke(app, ["bench", setup["base"], "--tasks", "nope_task", "--include-path", str(d),
                                   "--no-lm-eval-tasks", "--out", str(out)])
    assert res.exit_code == 2 and res.output.strip().startswith("error: unknown lm-eval task")
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()


def test_default_arms_from_a_run(setup):
    from refdir.cli.evaluation import default_arms

    run = setup["tmp"] / "run"
    assert default_arms(run) == ["base"]
    Direction(torch.ones(64), 1, -1).save(run / "selection" / "direction")
    (run / "checkpoint" / "model").mkdir(parents=True)
    (run / "checkpoint" / "model" / "config.json").write_text("{}")
    assert default_arms(run) == ["base", f"ablate:{run / 'selection' / 'direction'}",
                                  f"ckpt:{run / 'checkpoint' / 'model'}:name=orthogonalized"]
