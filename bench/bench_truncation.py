"""How many new tokens the run's test needs: re-judge a finished run's test completions cut to their first N tokens.

`refdir run` generates ``--max-new-tokens`` (64) on harmful prompts and ``HARMLESS_TOKENS`` on harmless ones. This
prints, per arm and set, the refusal count the judge gives each completion cut to N tokens, and how many
completions ended (EOS) before 16 tokens, so that a shorter window is chosen by measurement: a count that changes
between N and the full length means refusals that start later than N.

    python bench/bench_truncation.py RUN [--judge broad] [--tokens 8,12,16,24,32,64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from refdir.core.rundir import EVAL, RunDir
from refdir.method.refusal_judge import judge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished `refdir run` directory (method search)")
    ap.add_argument("--judge", default="broad")
    ap.add_argument("--tokens", default="8,12,16,24,32,64")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    rd = RunDir(a.run)
    comps = json.loads((rd.stage_dir(EVAL) / "completions.json").read_text())["completions"]
    tok_dir = rd.checkpoint_model_dir()
    if not Path(tok_dir).is_dir():
        raise SystemExit(f"{tok_dir}: the run has no checkpoint, whose tokenizer this script reads")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ns = [int(n) for n in a.tokens.split(",")]
    print(f"{'arm/set/kind':28s} " + " ".join(f"{n:>5d}" for n in ns) + "   full  ended<16")
    for name, texts in comps.items():
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        counts = [judge([tok.decode(i[:n]) for i in ids], a.judge).n_refusal for n in ns]
        full = judge(texts, a.judge).n_refusal
        print(f"{name:28s} " + " ".join(f"{c:5d}" for c in counts) + f"  {full:5d}  {sum(len(i) < 16 for i in ids):5d}"
              f"   (of {len(texts)})")


if __name__ == "__main__":
    main()
