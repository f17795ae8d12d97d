"""The run directory: the one place that knows its layout.

``refdir run`` writes one directory per stage; later commands (analyze, eval, bench, search, export) read
and extend the same directory. Every path inside it is built here::

    RUN/
      config.json                 the run's config (model spec, data spec, settings)
      summary.json                the headline numbers (written last by the run)
      manifest.json               versions, hashes of the model files and data, stage keys
      report.html                 the report; report_sections/NAME.html are extra sections in name order
      data/sets.json              harmful/harmless train/val/test prompts and their sources
      refusal_tokens/tokens.json  refusal token ids, their strings and how they were chosen
      filter/filtered.json        the train/val prompts kept by the filter; filter/info.json its counts
      candidates/candidates.safetensors   difference-in-means vectors, every position and layer
      selection/table.json        scores of every candidate (and table.csv); selection/selection.json the pick
      selection/direction.*       the selected direction (absent when every candidate was filtered out)
      coeff/coeff.json            the addition coefficient and its curve
      eval/completions.json       test completions per arm; eval/scores.json refusal scores; eval/metrics.json
      checkpoint/model/           the orthogonalized checkpoint; checkpoint/eval.json its refusal scores
      search/                     the Pareto search over edits (refdir search)
      evaluation/, benchmarks/, analysis/   outputs of refdir eval, bench and analyze with --run

Each stage directory holds ``stage.json`` with the stage's key: a hash of the settings the stage depends on
and of the key of the stage before it. A stage whose key matches is done; a stage is written into a temp
directory and swapped in whole, ``stage.json`` last, so a crash never leaves a half stage that looks done.
"""

from __future__ import annotations

import hashlib
import html
import json
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from refdir import __version__
from refdir.core.directions import Candidates, Direction
from refdir.core.io import atomic_dir, atomic_write_json, atomic_write_text
from refdir.core.spec import ModelSpec
from refdir.errors import RefdirError

# the stages of `refdir run`, in order; each stage's key includes the key of the stage before it
DATA = "data"
REFUSAL_TOKENS = "refusal_tokens"
FILTER = "filter"
CANDIDATES = "candidates"
SELECTION = "selection"
COEFF = "coeff"
EVAL = "eval"
CHECKPOINT = "checkpoint"
STAGES = (DATA, REFUSAL_TOKENS, FILTER, CANDIDATES, SELECTION, COEFF, EVAL, CHECKPOINT)

SEARCH = "search"
EVALUATION = "evaluation"
BENCHMARKS = "benchmarks"
ANALYSIS = "analysis"
SECTIONS = "report_sections"

# files inside the stage directories (written by refdir.workflows.stages, read by the readers below)
SETS_FILE = "sets.json"
TOKENS_FILE = "tokens.json"
FILTERED_FILE = "filtered.json"
FILTER_INFO_FILE = "info.json"
TABLE_FILE = "table.json"
TABLE_CSV_FILE = "table.csv"
SELECTION_FILE = "selection.json"
DIRECTION_NAME = "direction"
COEFF_FILE = "coeff.json"
COMPLETIONS_FILE = "completions.json"
SCORES_FILE = "scores.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_EVAL_FILE = "eval.json"
CHECKPOINT_MODEL_DIR = "model"


def versions() -> dict:
    """Versions of refdir and the libraries whose behaviour decides the numbers (for manifests)."""
    import transformers

    return {"refdir": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def model_name(config: dict) -> str | None:
    """The model string of a run's config.json (nested ``{"model": {"model": ...}}``, or an older flat one)."""
    m = config.get("model")
    return m.get("model") if isinstance(m, dict) else m


class RunDir:
    """A run directory: stage keys and the atomic stage writer, config/summary/manifest, report sections and
    typed readers for every artifact. Creating one touches nothing on disk; :meth:`create` opens it for a run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.keys: dict[str, str] = {}  # stage -> key, as computed by key() in this process

    @classmethod
    def create(cls, path: str | Path, config: dict, force: bool = False) -> RunDir:
        """Open ``path`` for a run of ``config`` and write its config.json. An existing directory must be a run
        of the same model; otherwise (or when it is not a run directory at all) it is refused unless ``force``."""
        rd = cls(path)
        if rd.path.exists():
            if not rd.config_path.exists():
                if not force:
                    raise RefdirError(f"{rd.path} exists and is not a refdir run directory; pass --force to replace it")
                shutil.rmtree(rd.path)
            else:
                prev = model_name(rd.config())
                if prev != model_name(config) and not force:
                    raise RefdirError(f"{rd.path} holds a run of model {prev!r}; choose another --out or pass --force")
        rd.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(rd.config_path, config)
        return rd

    @classmethod
    def open_finished(cls, path: str | Path) -> RunDir:
        """An existing run directory with a selected direction (what analyze needs), else one clear error."""
        rd = cls(path)
        if not rd.path.is_dir():
            raise RefdirError(f"run directory {rd.path} does not exist")
        need = {"config.json": rd.config_path, f"{DATA}/{SETS_FILE}": rd._file(DATA, SETS_FILE),
                f"{REFUSAL_TOKENS}/{TOKENS_FILE}": rd._file(REFUSAL_TOKENS, TOKENS_FILE),
                f"{SELECTION}/{DIRECTION_NAME}.safetensors": rd.direction_path().with_suffix(".safetensors")}
        missing = [n for n, p in need.items() if not p.exists()]
        if missing:
            raise RefdirError(f"{rd.path} is not a finished refdir run with a selected direction "
                              f"(missing {', '.join(missing)})")
        return rd

    # ------------------------------------------------------------------ stages
    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def _file(self, stage: str, name: str) -> Path:
        return self.path / stage / name

    def _json(self, stage: str, name: str):
        f = self._file(stage, name)
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise RefdirError(f"{self.path}: unreadable run file {f} ({e})") from e

    def key(self, stage: str, settings: dict, upstream: str | None = None) -> str:
        """The key of ``stage``: a hash of ``settings`` (the config values it depends on) and ``upstream`` (by
        default the key this process computed for the stage before it). Remembered in ``self.keys``."""
        if upstream is None:
            i = STAGES.index(stage)
            upstream = self.keys.get(STAGES[i - 1], "") if i else ""
        blob = json.dumps({"stage": stage, "cfg": settings, "up": upstream}, sort_keys=True, default=str)
        k = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.keys[stage] = k
        return k

    def done(self, stage: str, key: str) -> bool:
        """Whether ``stage`` was finished with this key."""
        f = self._file(stage, "stage.json")
        return f.exists() and json.loads(f.read_text()).get("key") == key

    @contextmanager
    def write_stage(self, stage: str, key: str) -> Iterator[Path]:
        """Yield a temp directory for a stage's files; on success ``stage.json`` (with ``key``) is written last
        and the directory replaces the stage's whole; on error nothing changes."""
        with atomic_dir(self.stage_dir(stage), force=True) as tmp:
            yield tmp
            atomic_write_json(tmp / "stage.json", {"key": key, "stage": stage})

    # ------------------------------------------------------------------ run-level files
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    def config(self) -> dict:
        """config.json as written by the run (or the search)."""
        try:
            return json.loads(self.config_path.read_text())
        except json.JSONDecodeError as e:
            raise RefdirError(f"{self.path}: unreadable run files ({e})") from e

    def model_spec(self) -> ModelSpec:
        """The run's model spec (from a nested config, or from an older flat one)."""
        c = self.config()
        if isinstance(c.get("model"), dict):
            return ModelSpec(**c["model"])
        return ModelSpec(**{k: c[k] for k in ModelSpec.model_fields if c.get(k) is not None})

    def summary(self) -> dict | None:
        f = self.path / "summary.json"
        return json.loads(f.read_text()) if f.exists() else None

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.path / "summary.json", summary)

    def manifest(self) -> dict | None:
        f = self.path / "manifest.json"
        return json.loads(f.read_text()) if f.exists() else None

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.path / "manifest.json", manifest)

    # ------------------------------------------------------------------ report sections
    def add_section(self, name: str, body_html: str, title: str | None = None) -> Path:
        """Add (or replace) the report section ``report_sections/NAME.html`` (an HTML fragment, shown after the
        run's own sections in name order); the report itself is re-rendered by whoever writes it."""
        frag = (f"<h2>{html.escape(title)}</h2>\n" if title else "") + body_html
        f = self.path / SECTIONS / f"{name}.html"
        atomic_write_text(f, frag)
        return f

    def sections(self) -> list[str]:
        """The report sections' HTML, in name order."""
        d = self.path / SECTIONS
        return [f.read_text() for f in sorted(d.glob("*.html"))] if d.is_dir() else []

    # ------------------------------------------------------------------ other commands' directories
    def search_dir(self) -> Path:
        return self.path / SEARCH

    def evaluation_dir(self) -> Path:
        return self.path / EVALUATION

    def benchmarks_dir(self) -> Path:
        return self.path / BENCHMARKS

    def analysis_dir(self) -> Path:
        return self.path / ANALYSIS

    # ------------------------------------------------------------------ artifacts
    def sets(self) -> dict:
        """Per kind (harmful, harmless): train/val/test prompts and their sources."""
        return self._json(DATA, SETS_FILE)

    def refusal_tokens(self) -> dict:
        """``{"ids", "tokens", "evidence"}``: the refusal token ids, their strings, how they were chosen."""
        return self._json(REFUSAL_TOKENS, TOKENS_FILE)

    def refusal_ids(self) -> list[int]:
        return self.refusal_tokens()["ids"]

    def filtered(self) -> dict:
        """The train and val prompts the filter kept, per split and kind."""
        return self._json(FILTER, FILTERED_FILE)

    def filter_info(self) -> dict:
        return self._json(FILTER, FILTER_INFO_FILE)

    def candidates(self) -> Candidates:
        return Candidates.load(self.stage_dir(CANDIDATES))

    def selection_meta(self) -> dict:
        """selection.json: the chosen candidate (or None), the induce rule, baseline, filter counts, config and,
        when nothing was chosen, the diagnostic."""
        return self._json(SELECTION, SELECTION_FILE)

    def selection_table(self) -> list[dict]:
        """One row per scored candidate (see :meth:`refdir.method.selection.Selection.table`)."""
        return self._json(SELECTION, TABLE_FILE)

    def direction_path(self) -> Path:
        """The selected direction's path (without suffix, as Direction.save/load take it)."""
        return self.stage_dir(SELECTION) / DIRECTION_NAME

    def direction(self) -> Direction | None:
        """The selected direction, or None when the run chose none."""
        p = self.direction_path()
        return Direction.load(p) if p.with_suffix(".safetensors").exists() else None

    def coeff(self) -> dict | None:
        """``{"coeff", "curve", "rule"}``, or None when no coefficient was chosen."""
        f = self._file(COEFF, COEFF_FILE)
        return self._json(COEFF, COEFF_FILE) if f.exists() else None

    def scores(self) -> dict | None:
        """The eval stage's judged refusal scores per arm (``"baseline/harmful"`` ...), or None before it ran."""
        return self._json(EVAL, SCORES_FILE) if self._file(EVAL, SCORES_FILE).exists() else None

    def completions(self) -> dict | None:
        """``{"prompts": {kind: [...]}, "completions": {arm: [...]}}`` of the eval stage, or None."""
        f = self._file(EVAL, COMPLETIONS_FILE)
        return self._json(EVAL, COMPLETIONS_FILE) if f.exists() else None

    def metrics(self) -> dict | None:
        """The eval stage's refusal metric per prompt set (for the histogram), or None."""
        return self._json(EVAL, METRICS_FILE) if self._file(EVAL, METRICS_FILE).exists() else None

    def checkpoint_model_dir(self) -> Path:
        return self.stage_dir(CHECKPOINT) / CHECKPOINT_MODEL_DIR

    def has_checkpoint(self) -> bool:
        return (self.checkpoint_model_dir() / "config.json").exists()

    def checkpoint_eval(self) -> dict | None:
        """The orthogonalized checkpoint's refusal scores and completions, or None."""
        f = self._file(CHECKPOINT, CHECKPOINT_EVAL_FILE)
        return self._json(CHECKPOINT, CHECKPOINT_EVAL_FILE) if f.exists() else None
