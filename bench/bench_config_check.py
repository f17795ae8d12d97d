"""Time and peak memory of the streamed path's structural check (``core/config_check.check_config``) on
transformers' default configs, one child process per model type so that each peak RSS is its own.

The check builds a random two-block copy of the config's class and traces it; built narrow (hidden size 64) it
takes about a second where the full-width copy of a 24B model's config took a minute and over 10 GB.
``--full-width`` times the copy at the config's own widths, as the check did before it was made narrow (and as it
still does for a config that does not build narrow).

    python bench/bench_config_check.py                      # the README's model types, narrow
    python bench/bench_config_check.py mistral3 --full-width
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

TYPES = ["mistral3", "qwen2_5_vl", "deepseek_v3", "llama4", "mixtral", "qwen3_moe", "gemma3", "qwen3_vl"]


def one(model_type: str, full_width: bool) -> dict:
    """Run the check on ``AutoConfig.for_model(model_type)`` in this process; its wall time, peak RSS and outcome."""
    from transformers import AutoConfig

    from refdir.core import config_check
    from refdir.errors import RefdirError

    if full_width:
        cut = config_check._cut
        config_check._cut = lambda config, narrow: cut(config, False)
    config = AutoConfig.for_model(model_type)
    t = time.perf_counter()
    try:
        layouts = config_check.check_config(config)
        outcome = "not checked (no copy built)" if layouts is None else "passes"
    except RefdirError as e:
        outcome = f"refused: {str(e).splitlines()[0][:80]}"
    return {"type": model_type, "seconds": round(time.perf_counter() - t, 2),
            "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "outcome": outcome}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("types", nargs="*", default=TYPES, help=f"transformers model types (default: {' '.join(TYPES)})")
    ap.add_argument("--full-width", action="store_true", help="the copy at the config's own widths")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.types[0], a.full_width)))
        return
    print(f"{'model type':14s} {'seconds':>8s} {'peak MiB':>9s}  outcome ({'full width' if a.full_width else 'narrow'})")
    for t in a.types:
        cmd = [sys.executable, __file__, t, "--child"] + (["--full-width"] if a.full_width else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            print(f"{t:14s} failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:100]}", flush=True)
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{t:14s} {r['seconds']:8.2f} {r['peak_mib']:9d}  {r['outcome']}", flush=True)


if __name__ == "__main__":
    main()
