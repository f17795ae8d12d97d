"""Directions named on the command line: a direction file, or a run directory standing for its direction.

A user who has just run ``make demo`` holds a run directory, not a file name. Commands that take a refusal direction
(``eval``'s arms, ``jailbreak``, ``bias``, ``steer``) accept either, and read ``RUN/selection/direction`` of a run
with the search (which keeps the selection's pick among its candidates instead of in that file) as the run.
"""

from __future__ import annotations

from pathlib import Path

from refdir.core.directions import Direction, Subspace, load_edit
from refdir.core.rundir import DIRECTION_NAME, SELECTION, RunDir
from refdir.errors import RefdirError


def run_of(path: str | Path) -> RunDir | None:
    """The run ``path`` names: a run directory, or ``RUN/selection/direction`` where that file is absent (a run
    with the search); None for anything else (a direction file, a missing path)."""
    p = Path(path)
    if p.is_dir():
        return RunDir(p)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    if p.name == DIRECTION_NAME and p.parent.name == SELECTION and not p.with_suffix(".safetensors").exists():
        run = p.parent.parent
        if (run / "config.json").exists():
            return RunDir(run)
    return None


def load_direction(path: str | Path, *, subspace: bool = False) -> Direction | Subspace:
    """The direction at ``path`` (a file, its suffix optional; a subspace file too where ``subspace``), or a run's
    selected direction (:meth:`RunDir.direction`: the selection's pick, also in a run with the search). One clear
    error for a run that chose none or is not finished."""
    rd = run_of(path)
    if rd is None:
        return load_edit(path) if subspace else Direction.load(path)
    d = RunDir.open_finished(rd.path).direction()
    if d is None:
        raise RefdirError(f"the run {rd.path} chose no direction: every candidate failed the selection's filters "
                          "(its report lists the best rejected ones)")
    return d
