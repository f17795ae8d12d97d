"""What the bench scripts share: failing as refdir's commands fail, clearing only what refdir wrote, and the
development-slice measurement of an edit given as hooks.

The scripts run as ``python bench/NAME.py``, so this folder is on ``sys.path`` and they import it by name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

import torch

from refdir.core.forward import last_logits
from refdir.core.generation import generate
from refdir.core.io import make_output_dir, remove_dir
from refdir.errors import RefdirError
from refdir.method.refusal_judge import judge_all
from refdir.method.scoring import first_token_kl


def fail(message: str) -> NoReturn:
    """One ``error:`` line and exit 2, as refdir's commands fail on bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def fresh_dir(path: str | Path, create: bool = False) -> Path:
    """Delete ``path`` before a bench rewrites it, only when it is missing, empty or written by refdir (the same
    rule as ``--force``): a mistyped ``--out`` never deletes a user's folder. ``create``: make it again, marked
    as refdir's as a whole (its marker lists no files), for benches that write into it themselves, with any
    writer."""
    try:
        remove_dir(path)
        return make_output_dir(path, listed=False) if create else Path(path)
    except RefdirError as e:
        fail(str(e))


def add_dev_arguments(ap: argparse.ArgumentParser) -> None:
    """The development slices an arm is measured on: harmful prompts to generate from, harmless ones for the KL."""
    ap.add_argument("--harmful", required=True, help="JSON list of {instruction}: refusals on the first --n-harmful")
    ap.add_argument("--harmless", required=True, help="JSON list of {instruction}: KL on the first --n-harmless")
    ap.add_argument("--n-harmful", type=int, default=160)
    ap.add_argument("--n-harmless", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)


class DevSlices:
    """The slices of :func:`add_dev_arguments`, with the base model's first-token log-probabilities on the harmless
    ones; :meth:`measure` generates and judges under whatever hooks are open."""

    def __init__(self, model, fmt, a: argparse.Namespace):
        self.model, self.fmt, self.a = model, fmt, a
        self.harmful = [x["instruction"] for x in json.loads(Path(a.harmful).read_text())][:a.n_harmful]
        self.harmless = [x["instruction"] for x in json.loads(Path(a.harmless).read_text())][:a.n_harmless]
        self.base = torch.log_softmax(last_logits(model, self.fmt, self.harmless, a.batch, shared_prefix=True).double(),
                                      -1)

    def measure(self, hooks, label: str) -> None:
        """Inside ``hooks``: refusals (wide judge, broad beside it) on the harmful slice, greedy, and the mean
        first-token KL from the base model on the harmless one; one printed line."""
        m, fmt, a = self.model, self.fmt, self.a
        with hooks:
            comps = generate(m, fmt, self.harmful, max_new_tokens=a.tokens, batch_size=a.batch, progress=False)
            logits = last_logits(m, fmt, self.harmless, a.batch, shared_prefix=True)
            kl = float(first_token_kl(self.base, logits).mean())
        j = judge_all(comps, "wide")
        print(f"{label:32s} refusals {j['headline'].n_refusal}/{len(comps)} (broad {j['broad'].n_refusal}), "
              f"first-token KL {kl:.4f}", flush=True)
