"""GGUF → GGUF on the embedded default: edit time, type changes, and the refusal score of the
edited GGUF (loaded back through transformers) against the in-memory edit, on the embedded
harmful test split. Uses the direction of a finished run (default runs/demo).

    python bench/bench_gguf.py [RUN_DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from refdir.core.chat import ChatFormat
from refdir.core.data import embedded
from refdir.core.direction_paths import load_direction
from refdir.core.generation import generate
from refdir.core.gguf_edit import orthogonalize_gguf
from refdir.core.interventions import ablate
from refdir.core.model_files import embedded_gguf_path
from refdir.core.models import load_model
from refdir.method.refusal_judge import judge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", default="runs/demo", help="a finished `refdir run` directory")
    run = Path(ap.parse_args().run)
    d = load_direction(run)  # the run's selected direction (also of a run with the search)
    H = embedded("harmful", "test").instructions
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "edited.gguf"
        t = time.time()
        s = orthogonalize_gguf(embedded_gguf_path(), d.vector, out, progress=False)
        print(f"GGUF edit: {time.time() - t:.1f} s, {len(s['edited'])} tensors edited, type changes: "
              f"{sorted(set(s['changed_types'].values())) or 'none'}")
        edited = load_model(str(out))
        fmt = ChatFormat(edited.tokenizer)
        ref_gguf = judge(generate(edited.model, fmt, H, batch_size=40, progress=False)).refusal
        del edited
    base = load_model(str(embedded_gguf_path()), dtype=None)
    fmt = ChatFormat(base.tokenizer)
    with ablate(base.model, d.vector):
        ref_mem = judge(generate(base.model, fmt, H, batch_size=40, progress=False)).refusal
    print(f"harmful test refusal: edited GGUF {ref_gguf:.3f}, in-memory edit (ablation on the GGUF model) "
          f"{ref_mem:.3f}, difference {abs(ref_gguf - ref_mem):.3f}")


if __name__ == "__main__":
    main()
