"""Wall time per stage and peak RSS of `refdir run` on the embedded default model.

Runs the pipeline twice in child processes: once from scratch (the GGUF conversion cache is
kept, delete ~/.cache/refdir to include it) and once fully cached (resume).

    python bench/bench_run.py [--out runs/bench] [extra `refdir run` args, e.g. --dtype fp32 or --method paper]
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchlib import fresh_dir

from refdir.method.uncertainty import rate_text


def cpu_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    return f"{model}; {' '.join(have)}"


def run_child(args: list[str]) -> tuple[float, float]:
    t = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "refdir", *args], check=True)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return time.time() - t, max(rss, before) / 1024


def main() -> None:
    argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return
    out = "runs/bench"
    if "--out" in argv:
        i = argv.index("--out")
        out = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    fresh_dir(out)
    print(f"cpu: {cpu_flags()}; python {platform.python_version()}")
    wall, rss = run_child(["run", "default", "--out", out, *argv])
    summary = json.loads((Path(out) / "summary.json").read_text())
    print(f"fresh run: {wall:.1f} s wall, peak RSS {rss:.0f} MiB = {rss / 1024:.2f} GiB = {rss * 2**20 / 1e9:.2f} GB")
    peaks = summary.get("peak_rss_mib", {})
    for k, v in summary["timings_s"].items():
        print(f"  {k:16s} {v:8.1f} s" + (f"   peak RSS so far {peaks[k]:6.0f} MiB" if k in peaks else ""))
    wall2, _ = run_child(["run", "default", "--out", out, *argv])
    print(f"cached rerun: {wall2:.1f} s wall")
    if summary.get("method") == "search":
        c = summary["choice"]
        print(f"chosen: {c['describe']} ({c['reason']})")
        print(f"search: {summary['search']['n_trials']} trials, {summary['search']['spent_s']:.0f} s of "
              f"{summary['search']['budget_s']:.0f}")
        for k, v in summary["test"]["scores"].items():
            print(f"  {k:26s} refusal {rate_text(v['refusal'], v['n'])} (paper substrings {v['refusal_paper']:.3f})")
        for k, v in summary["test"]["kl"].items():
            print(f"  {k:26s} first-token KL {v:.4f}")
        return
    ch = summary["selection"]["chosen"]
    if ch:
        print(f"chosen: position {ch['position']} layer {ch['layer']} bypass {ch['bypass']:.2f} "
              f"induce {ch['induce']:.2f} kl {ch['kl']:.3f} ({summary['selection']['rule']})")
    for k, v in summary["refusal"].items():
        print(f"  {k:20s} refusal {v['refusal']:.3f} (paper substrings {v['refusal_paper']:.3f})")
    if summary.get("checkpoint"):
        print(f"  {'checkpoint/harmful':20s} refusal {summary['checkpoint']['refusal']:.3f}")


if __name__ == "__main__":
    main()
