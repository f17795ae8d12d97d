"""Instruction datasets: the embedded team-written sets, file and hub loaders, sampling; and the texts the
evaluation scores (general-text corpus, instruction + response pairs) through the same readers.

File formats: ``.txt`` (one instruction per line), ``.csv``, ``.json`` (a list of strings or of
objects), ``.jsonl`` and ``.parquet``; objects are read through ``column`` (default
``instruction``). Anything else with no such path is taken as a hub dataset id (needs
``refdir[hub]`` and a network).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from refdir.errors import RefdirError

SPLITS = ("train", "val", "test")


@dataclass
class InstructionSet:
    instructions: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.instructions)

    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.instructions).encode()).hexdigest()


def dedupe(items: list[str]) -> list[str]:
    """Drop empty and repeated instructions (case- and whitespace-insensitive), keeping order."""
    seen, out = set(), []
    for s in items:
        s = s.strip()
        key = " ".join(s.lower().split())
        if s and key not in seen:
            seen.add(key)
            out.append(s)
    return out


def sample(items: list[str], n: int | None, seed: int) -> list[str]:
    """A seeded sample of ``n`` items (all, shuffled, when n is None or larger than the set)."""
    rng = random.Random(seed)
    items = list(items)
    rng.shuffle(items)
    return items if n is None else items[:n]


def embedded(kind: str, split: str | None = None) -> InstructionSet:
    """The embedded team-written set: ``kind`` is harmful or harmless; ``split`` train/val/test."""
    if kind not in ("harmful", "harmless"):
        raise RefdirError(f"unknown embedded set {kind!r}; use harmful or harmless")
    if split is not None and split not in SPLITS:
        raise RefdirError(f"unknown split {split!r}; use one of {SPLITS}")
    rows = json.loads(resources.files("refdir.assets").joinpath(f"{kind}.json").read_text())
    items = [r["instruction"] for r in rows if split is None or r["split"] == split]
    return InstructionSet(items, f"embedded:{kind}" + (f":{split}" if split else ""))


def _from_rows(rows: list, column: str, path: str) -> list[str]:
    out = []
    for i, r in enumerate(rows):
        if isinstance(r, str):
            out.append(r)
        elif isinstance(r, dict):
            if column not in r:
                raise RefdirError(
                    f"{path}: row {i} has no column {column!r} (columns: {sorted(r)}); choose one with --column"
                )
            if not isinstance(r[column], str):  # a number or null is no prompt (it was read as "5", "None")
                raise RefdirError(f"{path}: row {i}'s {column!r} is {type(r[column]).__name__}, not text")
            out.append(r[column])
        else:
            raise RefdirError(f"{path}: row {i} is neither a string nor an object")
    return out


def read_rows(path: str | Path, split: str | None = None, txt: str = "lines") -> list:
    """The rows of a local file: ``.txt`` lines (``txt="passages"``: blocks separated by blank lines), ``.csv``
    rows as dicts, a ``.json`` list (or an object's ``data`` list, else its ``split`` list), ``.jsonl`` values,
    ``.parquet`` rows as dicts. Unparsable text and unknown suffixes are one clear error."""
    p = Path(path)
    suf = p.suffix.lower()
    if suf not in READABLE:
        raise RefdirError(f"unknown dataset format {suf!r} for {p}; use txt, csv, json, jsonl or parquet")
    if not p.exists():
        raise RefdirError(f"no such file: {p}")
    if not p.is_file():
        what = "a directory" if p.is_dir() else "not a regular file"
        raise RefdirError(f"{p} is {what}, not a {suf[1:]} file")
    try:
        return _read_rows(p, suf, split, txt)
    except OSError as e:
        raise RefdirError(f"cannot read {p}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise RefdirError(f"could not parse {p}: {e}") from e


READABLE = (".txt", ".csv", ".json", ".jsonl", ".parquet")


def _read_rows(p: Path, suf: str, split: str | None, txt: str) -> list:
    """The rows of ``p`` (see :func:`read_rows`); parse errors propagate."""
    if suf == ".txt":
        text = p.read_text()
        if txt == "passages":
            return [b.strip() for b in text.split("\n\n") if b.strip()]
        return text.splitlines()
    if suf == ".csv":
        with open(p, newline="") as f:
            return list(csv.DictReader(f))
    if suf == ".json":
        data = json.loads(p.read_text())
        if isinstance(data, dict):
            data = data.get("data", data.get(split, []) if split else [])
        if not isinstance(data, list):
            raise RefdirError(f"{p}: expected a JSON list of strings or objects (or an object whose 'data' is "
                              f"one), found {type(data).__name__}")
        return data
    if suf == ".jsonl":
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError as e:
        raise RefdirError("reading parquet needs pyarrow: pip install 'refdir[hub]'") from e
    try:
        return pq.read_table(p).to_pylist()
    except pyarrow.ArrowException as e:
        raise RefdirError(f"could not read {p} as parquet: {e}") from e


def hub_rows(spec: str, split: str = "train", n: int | None = None) -> list:
    """The rows of a hub dataset's ``split``: all of them, or the first ``n`` streamed (a large corpus is then
    not downloaded whole). Needs ``refdir[hub]`` and a network (or the hub cache)."""
    try:
        import datasets
    except ImportError as e:
        raise RefdirError(f"{spec} is not a file; loading hub datasets needs: pip install 'refdir[hub]'") from e
    try:
        if n is None:
            return datasets.load_dataset(spec, split=split).to_list()
        ds = datasets.load_dataset(spec, split=split, streaming=True)
        return [r for _, r in zip(range(n), ds, strict=False)]
    except Exception as e:  # noqa: BLE001 - offline, missing or gated datasets all end here
        raise RefdirError(f"could not load hub dataset {spec!r} (split {split}; offline? gated?): "
                          f"{type(e).__name__}: {e}") from e


def load_instructions(spec: str | Path, column: str = "instruction", split: str = "train") -> InstructionSet:
    """Load instructions from a file or a hub dataset id; deduplicated; empty sets are refused."""
    spec_s = str(spec)
    if spec_s.startswith("embedded:"):
        parts = spec_s.split(":")
        return embedded(parts[1], parts[2] if len(parts) > 2 else None)
    rows = read_rows(spec_s, split) if _local(spec_s) else hub_rows(spec_s, split)
    texts = [s.strip() for s in _from_rows(rows, column, spec_s) if s.strip()]
    items = dedupe(texts)
    if not items:
        raise RefdirError(f"empty dataset: {spec_s} holds no instructions")
    if len(items) == 1 and len(texts) > 1:
        raise RefdirError(f"{spec_s} holds {len(texts)} copies of one instruction (duplicates are dropped), "
                          "too few to compute a mean from")
    return InstructionSet(items, spec_s)


def _local(spec: str) -> bool:
    """Whether ``spec`` names a local file: one that exists, or one that looks like a path (a dataset suffix, or a
    leading ``/``, ``.`` or ``~``), which is then refused as missing instead of being looked up on the hub."""
    return (Path(spec).exists() or Path(spec).suffix.lower() in READABLE
            or spec.startswith(("/", ".", "~")) or "\\" in spec)


# ------------------------------------------------------------------------------------------ evaluation texts


def embedded_corpus() -> list[str]:
    """The embedded general-text corpus (team-written passages, ~160 words each)."""
    return json.loads(resources.files("refdir.assets").joinpath("general_text.json").read_text())


def embedded_pairs() -> list[tuple[str, str]]:
    """The embedded instruction + response pairs (team-written, Alpaca-style)."""
    rows = json.loads(resources.files("refdir.assets").joinpath("instruction_pairs.json").read_text())
    return [(r["instruction"], r["response"]) for r in rows]


def embedded_opinion_questions() -> list[str]:
    """The embedded opinion questions (team-written, harmless): the persona second direction's contrast."""
    return json.loads(resources.files("refdir.assets").joinpath("opinion_questions.json").read_text())["questions"]


def load_corpus(spec: str, n: int | None = None, column: str = "text") -> list[str]:
    """General text: ``embedded``, a txt (passages separated by blank lines)/json/jsonl file, or a hub dataset id
    (streamed, first ``n`` rows)."""
    if spec == "embedded":
        rows = embedded_corpus()
    elif Path(spec).exists():
        rows = read_rows(spec, txt="passages")
    else:
        rows = hub_rows(spec, n=n or 64)
    texts = [r if isinstance(r, str) else str(r.get(column, "")) for r in rows]
    texts = [t for t in texts if t.strip()][:n]
    if not texts:
        raise RefdirError(f"the general-text corpus {spec!r} is empty")
    return texts


def load_pairs(spec: str, n: int | None = None) -> list[tuple[str, str]]:
    """Instruction + response pairs: ``embedded`` or a json/jsonl file with ``instruction`` (+ optional
    ``input``) and ``response`` or ``output`` (Alpaca's columns)."""
    if spec == "embedded":
        pairs = embedded_pairs()
    else:
        rows = read_rows(spec, txt="passages") if Path(spec).exists() else hub_rows(spec, n=n or 64)
        pairs = []
        for i, r in enumerate(rows):
            resp = r.get("response", r.get("output")) if isinstance(r, dict) else None
            if not isinstance(r, dict) or "instruction" not in r or resp is None:
                raise RefdirError(f"{spec}: row {i} needs 'instruction' and 'response' (or 'output')")
            instr = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
            if str(resp).strip():
                pairs.append((instr, str(resp)))
    pairs = pairs[:n]
    if not pairs:
        raise RefdirError(f"the instruction-pair set {spec!r} is empty")
    return pairs
