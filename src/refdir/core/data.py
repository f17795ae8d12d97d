"""Instruction datasets: the embedded team-written sets, file and hub loaders, sampling.

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
            out.append(str(r[column]))
        else:
            raise RefdirError(f"{path}: row {i} is neither a string nor an object")
    return out


def load_instructions(spec: str | Path, column: str = "instruction", split: str = "train") -> InstructionSet:
    """Load instructions from a file or a hub dataset id; deduplicated; empty sets are refused."""
    spec_s = str(spec)
    if spec_s.startswith("embedded:"):
        parts = spec_s.split(":")
        return embedded(parts[1], parts[2] if len(parts) > 2 else None)
    p = Path(spec_s)
    if p.exists():
        suf = p.suffix.lower()
        try:
            if suf == ".txt":
                items = p.read_text().splitlines()
            elif suf == ".csv":
                with open(p, newline="") as f:
                    items = _from_rows(list(csv.DictReader(f)), column, spec_s)
            elif suf == ".json":
                data = json.loads(p.read_text())
                if isinstance(data, dict):
                    data = data.get("data", data.get(split, []))
                items = _from_rows(data, column, spec_s)
            elif suf == ".jsonl":
                rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
                items = _from_rows(rows, column, spec_s)
            elif suf == ".parquet":
                try:
                    import pyarrow.parquet as pq
                except ImportError as e:
                    raise RefdirError("reading parquet needs pyarrow: pip install 'refdir[hub]'") from e
                items = _from_rows(pq.read_table(p).to_pylist(), column, spec_s)
            else:
                raise RefdirError(f"unknown dataset format {suf!r} for {p}; use txt, csv, json, jsonl or parquet")
        except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
            raise RefdirError(f"could not parse {p}: {e}") from e
    else:
        try:
            import datasets
        except ImportError as e:
            raise RefdirError(f"{spec_s} is not a file; loading hub datasets needs: pip install 'refdir[hub]'") from e
        try:
            ds = datasets.load_dataset(spec_s, split=split)
        except Exception as e:  # noqa: BLE001
            raise RefdirError(f"could not load dataset {spec_s!r} (split {split}): {e}") from e
        if column not in ds.column_names:
            raise RefdirError(f"{spec_s} has no column {column!r} (columns: {ds.column_names})")
        items = [str(x) for x in ds[column]]
    items = dedupe(items)
    if not items:
        raise RefdirError(f"empty dataset: {spec_s} holds no instructions")
    return InstructionSet(items, spec_s)
