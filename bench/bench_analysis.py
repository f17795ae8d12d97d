"""Wall time, CPU time and peak RSS of each §5 analysis on a finished run (default: a copy of runs/demo).

Each analysis runs in its own child process so that its peak RSS (VmHWM) is its own:

- geometry: `refdir analyze geometry` on the run's train sets (all prompts);
- expression + head attribution: the two building blocks alone on 32 harmful + 32 harmless val prompts;
- suffix analysis: `refdir analyze suffix --suffixes FILE` (no search) with the suffixes in FILE;
- GCG: a few steps of the search on one prompt, to give the cost of a step (the search itself is the
  `refdir analyze suffix --search` run; its per-prompt wall and CPU seconds are stored in suffixes.json).

    python bench/bench_analysis.py [--run runs/demo] [--work runs/bench-analysis] [--suffixes FILE]
                                   [--gcg-steps 3] [--threads 2] [--skip geometry]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchlib import fresh_dir


def child(code: str, threads: int) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds and the child's own peak RSS (MiB) of a Python snippet; its stdout."""
    code = (f"import torch; torch.set_num_threads({threads})\n" + code
            + "\nimport resource as _r; _u = _r.getrusage(_r.RUSAGE_SELF)"
            + "\nprint('CPU', _u.ru_utime + _u.ru_stime)"
            + "\nprint('VmHWM', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    t = time.time()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.time() - t
    if res.returncode != 0:
        raise SystemExit(f"child failed:\n{res.stderr[-3000:]}")
    lines = res.stdout.splitlines()
    hwm = int(next(ln.split()[1] for ln in lines if ln.startswith("VmHWM")))
    cpu = float(next(ln.split()[1] for ln in lines if ln.startswith("CPU")))
    return wall, cpu, hwm / 1024, res.stdout


class Rows(list):
    """Rows of the result table, each printed as soon as it is measured."""

    def append(self, row) -> None:
        name, what, wall, cpu, mib = row
        print(f"{name:30s} {what:40s} {wall:8.1f} {cpu:8.1f} {mib:13.0f}", flush=True)
        super().append(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="a finished `refdir run` directory (it is copied, not changed)")
    ap.add_argument("--work", default="runs/bench-analysis", help="scratch directory (replaced)")
    ap.add_argument("--suffixes", help="a suffix file for the suffix analysis")
    ap.add_argument("--gcg-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated analyses to skip, e.g. geometry")
    a = ap.parse_args()
    src, work, suffixes, steps, threads = Path(a.run), Path(a.work), a.suffixes, a.gcg_steps, a.threads
    fresh_dir(work)
    shutil.copytree(src, work, ignore=shutil.ignore_patterns("checkpoint", "analysis", "report_sections"))
    skip = set(a.skip.split(","))
    rows = Rows()
    print(f"torch threads {threads}; times under whatever load the machine has")
    print(f"{'analysis':30s} {'what':40s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS MiB':>13s}", flush=True)

    if "geometry" not in skip:
        w, c, m, _ = child(f"from refdir.workflows.analyze import analyze_geometry_run as f; f({str(work)!r}, "
                           "progress=False)", threads)
        g = json.loads((work / "analysis" / "geometry.json").read_text())
        rows.append(("geometry", f"{g['n_harmful']}+{g['n_harmless']} train prompts, {len(g['per_layer'])} layers",
                     w, c, m))

    code = f"""
import time
from refdir.workflows.analyze import open_run
from refdir.analysis.geometry import expression
from refdir.analysis.heads import head_attribution
ctx = open_run({str(work)!r}).load()
v = ctx.sets
t, c = time.time(), time.process_time()
expression(ctx.lm.model, ctx.fmt, {{"harmful": v["harmful"]["val"], "harmless": v["harmless"]["val"]}},
           ctx.direction.vector, progress=False)
print("EXPR", time.time() - t, time.process_time() - c)
t, c = time.time(), time.process_time()
head_attribution(ctx.lm.model, ctx.fmt, v["harmful"]["val"] + v["harmless"]["val"], ctx.direction.vector,
                 progress=False)
print("HEADS", time.time() - t, time.process_time() - c)
"""
    w, c, m, out = child(code, threads)
    te, ce = (float(x) for x in next(ln.split()[1:] for ln in out.splitlines() if ln.startswith("EXPR")))
    th, ch = (float(x) for x in next(ln.split()[1:] for ln in out.splitlines() if ln.startswith("HEADS")))
    rows.append(("expression", "32+32 val prompts", te, ce, m))
    rows.append(("head attribution", "64 val prompts", th, ch, m))

    if suffixes:
        w, c, m, _ = child(f"from pathlib import Path\nfrom refdir.workflows.analyze import analyze_suffix_run as f\n"
                           f"f({str(work)!r}, suffixes_file=Path({suffixes!r}), progress=False)", threads)
        s = json.loads((work / "analysis" / "suffix.json").read_text())
        rows.append(("suffix analysis (no search)", f"{len(s['instructions'])} targets, 4 groups", w, c, m))

    code = f"""
import time
from refdir.workflows.analyze import open_run
from refdir.analysis.suffix import gcg_search, GCGBudget
ctx = open_run({str(work)!r}).load()
s = gcg_search(ctx.lm.model, ctx.fmt, ctx.sets["harmful"]["test"][0],
               budget=GCGBudget(steps={steps}, search_width=32, topk=64, n_tokens=12, early_stop=False),
               progress=False)
print("GCG", s.seconds / s.steps, s.cpu_seconds / s.steps)
"""
    w, c, m, out = child(code, threads)
    ws, cs = (float(x) for x in next(ln.split()[1:] for ln in out.splitlines() if ln.startswith("GCG")))
    rows.append(("GCG step", "width 32, top-k 64, 12 tokens", ws, cs, m))



if __name__ == "__main__":
    main()
