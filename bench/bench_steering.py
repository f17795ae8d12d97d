"""Steering studies on the embedded model, with timings and peak RSS: CAA sweeps, jailbreak vectors, bias steering.

    python bench/bench_steering.py --out runs/steering [--only caa|jailbreak|bias]

Writes each study's results and report into OUT/<study>/ and prints the headline numbers.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from benchlib import fresh_dir


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/steering")
    ap.add_argument("--only", default=None, choices=["caa", "jailbreak", "bias"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--direction", default="runs/demo", help="a direction file or a run dir (its selected direction)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from refdir.core.chat import ChatFormat
    from refdir.core.models import load_model

    t0 = time.time()
    lm = load_model("default")
    fmt = ChatFormat(lm.tokenizer)
    out = Path(args.out)
    print(f"load {time.time() - t0:.1f} s")
    if args.only in (None, "caa"):
        from refdir.steering import caa

        d = out / "caa"
        fresh_dir(d, create=True)
        items = caa.load_behaviour("embedded:refusal")
        t = time.time()
        sv = caa.train(lm.model, fmt, caa.split(items, "train"), model_id=lm.model_id)
        sv.save(d / "vector")
        t_train = time.time() - t
        t = time.time()
        res = caa.sweep_report(lm.model, fmt, caa.split(items, "test"), sv, d)
        ms = res["multiplier_sweep"]
        print(f"CAA train {t_train:.1f} s, sweeps {time.time() - t:.1f} s; best layer {ms['layer']}; "
              f"monotonic {ms['monotonic_increasing']}")
        print("  multipliers", ms["multipliers"])
        print("  P(matching)", [round(p, 4) for p in ms["p"]])
        print("  layer sweep", json.dumps(res["layer_sweep"]["p"]))
    if args.only in (None, "jailbreak"):
        from refdir.steering import jailbreak

        t = time.time()
        res = jailbreak.study(lm, fmt, out / "jailbreak", direction=args.direction, force=True)
        print(f"jailbreak study {time.time() - t:.1f} s")
        print(json.dumps(res["summary"], indent=1))
    if args.only in (None, "bias"):
        from refdir.steering import bias

        t = time.time()
        res = bias.study(lm, out / "bias", direction=args.direction, force=True)
        print(f"bias study {time.time() - t:.1f} s")
        print(json.dumps(res["summary"], indent=1))
    print(f"peak RSS {rss_gb():.2f} GB, total {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
