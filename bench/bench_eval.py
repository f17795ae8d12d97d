"""Evaluation suite on the embedded Qwen: base, ablation with a run's direction, act-add (the paper's Table 9
activation addition: subtract the direction at its layer, coefficient -1) and the run's orthogonalized checkpoint.

Prints the Table 9 (CE) and Table 10 (refusal / safety) layouts, the acceptance checks, wall time and peak RSS.

    python bench/bench_eval.py --run runs/demo --out runs/eval_demo [--judge llm:default]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo", help="a finished `refdir run` directory (read only)")
    ap.add_argument("--out", default="runs/eval_demo")
    ap.add_argument("--judge", default="llm:default")
    ap.add_argument("--n-harmful", type=int, default=40)
    ap.add_argument("--n-harmless", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from refdir.core.run_files import model_name
    from refdir.core.rundir import RunDir
    from refdir.evaluate.evaluation import EvalConfig, run_eval
    from refdir.evaluate.tables import markdown_tables

    run = RunDir(a.run)
    d = run.path  # a run dir stands for its selected direction
    arms = ["base", f"ablate:{d}", f"add:{d}:coeff=-1:name=act-add", f"ckpt:{run.checkpoint_model_dir()}:name=ortho"]
    if (run.search_dir() / "front.json").exists():
        print("a run with the search: its checkpoint is the chosen edit, not the ablation of the selected direction, "
              "so the ablation = checkpoint lines below do not apply (they do to a --method paper run)")
    cfg = EvalConfig(model=model_name(run.config()) or "default", arms=arms,
                     n_harmful=a.n_harmful, n_harmless=a.n_harmless, max_new_tokens=a.max_new_tokens, judge=a.judge)
    t = time.time()
    s = run_eval(cfg, a.out, force=True)
    wall = time.time() - t
    print(markdown_tables(s))
    arm = {x["name"]: x for x in s["arms"]}
    ab, oc, aa = arm["ablation"], arm["ortho"], arm["act-add"]
    print("\nacceptance")
    print(f"  refusal |ablation - ortho| (paper substrings): {abs(ab['refusal']['paper'] - oc['refusal']['paper']):.3f}"
          " (<= 0.02)")
    for k in ("text", "pairs", "ondist"):
        print(f"  CE {k:6s}: |ablation - ortho| {abs(ab['ce'][k] - oc['ce'][k]):.4f} (<= 0.01); "
              f"ablation - base {ab['ce_delta'][k]:+.4f}; act-add - base {aa['ce_delta'][k]:+.4f}")
    comp = json.loads((Path(a.out) / "completions.json").read_text())
    if a.judge.startswith("llm"):
        from refdir.evaluate.safety_judge import SubstringJudge

        for name in ("base", "ablation"):
            sub = SubstringJudge()(comp["prompts"], comp["completions"][name]).unsafe
            llm = arm[name]["safety"]["unsafe"]
            agree = sum(x == y for x, y in zip(sub, llm, strict=True))
            print(f"  llm judge vs substring on the {len(sub)} {name} completions: {agree}/{len(sub)} "
                  f"= {agree / len(sub):.3f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nwall {wall:.0f} s (per arm: " + ", ".join(f"{k} {v:.0f}" for k, v in s["timings_s"].items()
                                                    if k != "total") + f"); peak RSS {rss:.2f} GiB; "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
