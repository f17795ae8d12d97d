"""What the bench scripts share: failing as refdir's commands fail, and clearing only what refdir wrote.

The scripts run as ``python bench/NAME.py``, so this folder is on ``sys.path`` and they import it by name.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

from refdir.core.io import make_output_dir, remove_dir
from refdir.errors import RefdirError


def fail(message: str) -> NoReturn:
    """One ``error:`` line and exit 2, as refdir's commands fail on bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def fresh_dir(path: str | Path, create: bool = False) -> Path:
    """Delete ``path`` before a bench rewrites it, only when it is missing, empty or written by refdir (the same
    rule as ``--force``): a mistyped ``--out`` never deletes a user's folder. ``create``: make it again, marked
    as refdir's, for benches that write into it themselves."""
    try:
        remove_dir(path)
        return make_output_dir(path) if create else Path(path)
    except RefdirError as e:
        fail(str(e))
