"""The run directory: the one place that knows its layout.

``refdir run`` writes one directory per stage; later commands (analyze, eval, bench, search, export) read
and extend the same directory. Every path inside it is built here::

    RUN/
      config.json                 the run's config (model spec, data spec, settings)
      .refdir.lock                the writer's lock (flock; holds the writer's pid while it runs, see core.dirlock)
      summary.json                the headline numbers (written last by the run)
      manifest.json               versions, hashes of the model files and data, stage keys
      report.html                 the report; report_sections/NAME.html are extra sections in name order
      data/sets.json              harmful/harmless train/val/test prompts and their sources
      refusal_tokens/tokens.json  refusal token ids, their strings and how they were chosen
      filter/filtered.json        the train/val prompts kept by the filter; filter/info.json its counts
      filter/means.safetensors    the mean train residuals of the kept prompts per kind (the candidates' input)
      candidates/candidates.safetensors   difference-in-means vectors, every position and layer
      selection/table.json        scores of every candidate (and table.csv); selection/selection.json the pick
      selection/direction.*       the selected direction (absent when every candidate was filtered out)
      coeff/coeff.json            the addition coefficient and its curve
      eval/completions.json       test completions per arm; eval/scores.json refusal scores; eval/metrics.json
      checkpoint/model/           the edited checkpoint; checkpoint/eval.json its check (or refusal scores);
      checkpoint/model.gguf       the same edit as a GGUF, when the input was a GGUF
      search/                     the Pareto search over edits (refdir search)
      optimize/                   optimized directions and cones, their targets and checkpoints (refdir optimize)
      evaluation/, benchmarks/, analysis/   outputs of refdir eval, bench and analyze with --run

Each stage directory holds ``stage.json`` with the stage's key (a hash of the settings the stage depends on and
of the key it was computed from, ``up``: the stage before it's) and the sizes of the files it wrote. A stage whose
key matches and whose files are all there is done; a stage is written into a temp directory and swapped in whole,
``stage.json`` last, so a crash never leaves a half stage that looks done.
The settings include the content hashes of the files read (data files for ``data``, the model's files for
``refusal_tokens``; see :mod:`refdir.core.fingerprint`). One process at a time writes the directory (its lock);
the temp files of a killed writer are removed when the next one opens it.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from refdir.core import run_files
from refdir.core.directions import Candidates, Direction
from refdir.core.dirlock import LOCK_NAME, DirLock, clean_stale
from refdir.core.io import (
    MARKER,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    make_output_dir,
    read_json_object,
    remove_dir,
)
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
SEARCH_SELECTION_FILE = "selection.json"  # in search/: the warm-start selection's table and pick
EVALUATION = "evaluation"
BENCHMARKS = "benchmarks"
ANALYSIS = "analysis"
SECTIONS = "report_sections"
OPTIMIZE = "optimize"
SOURCES = ("rdo", "pca", "second")  # direction sources besides the candidates, saved in optimize/ by name

# files inside the stage directories (written by refdir.workflows.stages, read by the readers below)
SETS_FILE = "sets.json"
TOKENS_FILE = "tokens.json"
FILTERED_FILE = "filtered.json"
FILTER_INFO_FILE = "info.json"
MEANS_FILE = "means.safetensors"
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
CHECKPOINT_GGUF_FILE = "model.gguf"


def save_filter_means(stage_tmp: Path, means: dict[str, torch.Tensor]) -> None:
    """Write the filter stage's residual means (read back by :meth:`RunDir.filter_means`) into its temp dir."""
    save_file({k: v.detach().cpu().contiguous() for k, v in means.items()}, str(stage_tmp / MEANS_FILE))


class RunDir:
    """A run directory: stage keys and the atomic stage writer, config/summary/manifest, report sections and
    typed readers for every artifact. Creating one touches nothing on disk; :meth:`create` opens it for a run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        # stage -> its key and the key it was computed from, as key() made them here; the stages written here
        self.keys, self.ups, self.written = {}, {}, set()
        self._lock = DirLock(self.path)

    @classmethod
    def create(cls, path: str | Path, config: dict, force: bool = False,
               check: Callable[[], None] | None = None) -> RunDir:
        """Open ``path`` for a run of ``config``: take its writer lock (a directory another refdir process is
        writing is refused), remove the temp files a killed writer left, write config.json. An existing directory
        must be a run of the same model; otherwise (or when it is not a run directory at all) it is refused unless
        ``force``. ``check`` (e.g. the search's check of its study) runs under the lock before anything is
        written. Hold the result in a ``with`` block (or call :meth:`close`) to release the lock."""
        rd = cls(path)
        if rd._lock.path.exists():
            rd.lock()  # a directory a refdir process may be writing: refused before it is even read
        try:
            rd._check_reuse(config, force)
            rd.lock()
            if check is not None:
                check()
            make_output_dir(rd.path)
            rd._lock.stamp()
            clean_stale(rd.path)
            atomic_write_json(rd.config_path, config)
        except BaseException:
            rd.close()
            raise
        return rd

    def _check_reuse(self, config: dict, force: bool) -> None:
        """Refuse, reading only, a directory this run cannot use: a run of another model, or a directory that is
        not a run directory (unless empty or holding only refdir's marker and lock), unless ``force``; under
        ``force`` the latter is deleted when refdir wrote it (:func:`refdir.core.io.remove_dir`)."""
        if not self.path.exists():
            return
        if self.config_path.exists():
            self.check_readable()
            prev, name = self.config(), run_files.model_name
            other = (f"model {name(prev)!r}" if name(prev) != name(config) else
                     f"--method {prev['method']}" if prev.get("method") not in (None, config.get("method")) else None)
            if other is None:
                return
            if not force:
                raise RefdirError(f"{self.path} holds a run of {other}; choose another --out or pass --force")
            # another model or method: --force starts over (its stages and sections would read as this run's)
        elif self.path.is_dir() and all(p.name in (MARKER, LOCK_NAME) for p in self.path.iterdir()):
            return
        elif not force:
            raise RefdirError(f"{self.path} exists and is not a refdir run directory; pass --force to replace it")
        self.close()  # the directory goes, its lock file with it; create() takes a new one
        remove_dir(self.path)

    def lock(self) -> RunDir:
        """Take the writer lock (:class:`refdir.core.dirlock.DirLock`; refused while another holds it); self."""
        self._lock.acquire()
        return self

    def close(self) -> None:
        """Release the writer lock (a no-op when not held)."""
        self._lock.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def open_finished(cls, path: str | Path) -> RunDir:
        """An existing run directory with a selected direction (what analyze needs), else one clear error."""
        rd = cls(path)
        if not rd.path.is_dir():
            raise RefdirError(f"run directory {rd.path} does not exist")
        need = {"config.json": rd.config_path, f"{DATA}/{SETS_FILE}": rd._file(DATA, SETS_FILE),
                f"{REFUSAL_TOKENS}/{TOKENS_FILE}": rd._file(REFUSAL_TOKENS, TOKENS_FILE),
                f"{SELECTION}/{DIRECTION_NAME}.safetensors": rd.direction_path().with_suffix(".safetensors")}
        if rd._search_lead() is not None:  # a run with the search: its selection's pick (or lead) is the direction
            del need[f"{SELECTION}/{DIRECTION_NAME}.safetensors"]
        missing = [n for n, p in need.items() if not p.exists()]
        if missing:
            raise RefdirError(f"{rd.path} is not a finished refdir run with a selected direction "
                              f"(missing {', '.join(missing)})")
        run_files.check_chain([(st, rd._stage_record(st)) for st in STAGES[:STAGES.index(COEFF) + 1]],
                              rd.search_dir() / "summary.json", rd.path)
        return rd

    # ------------------------------------------------------------------ stages
    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def _file(self, stage: str, name: str) -> Path:
        return self.path / stage / name

    def _json(self, stage: str, name: str, check: Callable[[object, Path], object] | None = None):
        """A stage's JSON file, passed through ``check`` (one of :mod:`refdir.core.run_files`) where given."""
        f = self._file(stage, name)
        try:
            obj = json.loads(f.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RefdirError(f"{self.path}: unreadable run file {f} ({e})") from e
        return obj if check is None else check(obj, f)

    def key(self, stage: str, settings: dict, upstream: str | None = None) -> str:
        """The key of ``stage``: a hash of ``settings`` (the config values it depends on) and ``upstream`` (by
        default the key this process computed for the stage before it). Remembered in ``self.keys``."""
        if upstream is None:
            i = STAGES.index(stage)
            upstream = self.keys.get(STAGES[i - 1], "") if i else ""
        blob = json.dumps({"stage": stage, "cfg": settings, "up": upstream}, sort_keys=True, default=str)
        k = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.keys[stage], self.ups[stage] = k, upstream
        return k

    def finished(self, stage: str) -> bool:
        """Whether ``stage`` was finished, with any key."""
        return self._stage_record(stage) is not None

    def done(self, stage: str, key: str) -> bool:
        """Whether ``stage`` was finished with this key and still holds the files it wrote, at their sizes (a user
        may delete a checkpoint to save disk: the stage is then done again, not reported with a missing path)."""
        rec = self._stage_record(stage)
        if rec is None or rec.get("key") != key:
            return False
        d = self.stage_dir(stage)
        return all((d / f).is_file() and (d / f).stat().st_size == n for f, n in rec.get("files", {}).items())

    def _stage_record(self, stage: str) -> dict | None:
        """``stage.json`` of ``stage`` (None when the stage was never finished); a corrupt one is one clear error
        (it is written last and atomically, so it is never half-written by refdir itself)."""
        f = self._file(stage, "stage.json")
        if not f.exists():
            return None
        try:
            rec = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            rec = e
        if not isinstance(rec, dict):
            raise RefdirError(f"{f} is corrupt ({rec}); delete {self.stage_dir(stage)} to recompute that stage")
        return rec

    def check_readable(self) -> None:
        """Refuse, reading only, a run directory whose config.json or any stage.json cannot be read."""
        if self.config_path.exists():
            self.config()
        for stage in STAGES:
            self._stage_record(stage)

    @contextmanager
    def write_stage(self, stage: str, key: str) -> Iterator[Path]:
        """Yield a temp directory for a stage's files; on success ``stage.json`` (with ``key``) is written last
        and the directory replaces the stage's whole; on error nothing changes."""
        with atomic_dir(self.stage_dir(stage), force=True) as tmp:
            yield tmp
            files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in sorted(tmp.rglob("*"))
                     if f.is_file() and f.name != MARKER}  # the marker's file list grows until the commit
            atomic_write_json(tmp / "stage.json", dict(key=key, stage=stage, files=files, up=self.ups.get(stage)))
        self.written.add(stage)

    # ------------------------------------------------------------------ run-level files
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    def config(self) -> dict:
        """config.json as written by the run (or the search)."""
        return read_json_object(self.config_path, "run file")

    def model_spec(self, given: dict | None = None) -> ModelSpec:
        """The run's model spec (nested config, or an older flat one), with the settings ``given`` by the caller on
        top: remote code and pickle loading only from ``given``; a relative path also from where the run started."""
        c = self.config()
        rec = c["model"] if isinstance(c.get("model"), dict) else {
            k: c[k] for k in ModelSpec.model_fields if c.get(k) is not None}
        return ModelSpec.from_record(run_files.located(rec, self.manifest()), given)

    def summary(self) -> dict | None:
        f = self.path / "summary.json"
        return read_json_object(f, "run file") if f.exists() else None

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.path / "summary.json", summary)

    def manifest(self) -> dict | None:
        f = self.path / "manifest.json"
        return read_json_object(f, "run file") if f.exists() else None

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

    def optimize_dir(self) -> Path:
        return self.path / OPTIMIZE

    # ------------------------------------------------------------------ artifacts
    def sets(self) -> dict:
        """Per kind (harmful, harmless): train/val/test prompts and their sources."""
        return self._json(DATA, SETS_FILE, run_files.prompt_sets)

    def refusal_tokens(self) -> dict:
        """``{"ids", "tokens", "evidence"}``: the refusal token ids, their strings, how they were chosen."""
        return self._json(REFUSAL_TOKENS, TOKENS_FILE, run_files.refusal_tokens)

    def refusal_ids(self, n_vocab: int | None = None) -> list[int]:
        """The refusal token ids; with ``n_vocab`` (the loaded model's vocabulary size) each checked to be in it."""
        ids = self.refusal_tokens()["ids"]
        return ids if n_vocab is None else run_files.token_ids(ids, n_vocab, self._file(REFUSAL_TOKENS, TOKENS_FILE))

    def filtered(self) -> dict:
        """The train and val prompts the filter kept, per split and kind."""
        return self._json(FILTER, FILTERED_FILE, run_files.filtered_sets)

    def filter_info(self) -> dict:
        return self._json(FILTER, FILTER_INFO_FILE)

    def filter_means(self) -> dict[str, torch.Tensor] | None:
        """The filter stage's mean train residuals of the kept prompts, ``{kind: float64 [positions, layers + 1,
        d_model]}``: the candidates' input, saved so that a resumed run computes the very same candidates. None
        for a filter stage written before the means were saved."""
        f = self._file(FILTER, MEANS_FILE)
        return load_file(f) if f.exists() else None

    def candidates(self) -> Candidates:
        return Candidates.load(self.stage_dir(CANDIDATES))

    def source_path(self, name: str) -> Path:
        """Where a search's direction source ``name`` (:data:`SOURCES`: rdo, pca, second) is saved."""
        return self.optimize_dir() / f"{name}.safetensors"

    def source(self, name: str) -> torch.Tensor | None:
        """The direction [d] of source ``name`` as the run saved it; None when it saved none (or for ``dim``, the
        candidates themselves)."""
        f = self.source_path(name) if name in SOURCES else None
        return Direction.load(f).vector if f is not None and f.exists() else None

    def candidates_with_sources(self) -> Candidates:
        """The candidates with every direction source the run saved (rdo, pca, second), so that any edit of its search
        resolves (:func:`refdir.core.edits.resolve`)."""
        c = self.candidates()
        for name in SOURCES:
            v = self.source(name)
            if v is not None:
                c = c.with_optimized(name, v)
        return c

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
        """The selected direction, or None when the run chose none: the selection stage's file (``--method
        paper``), else the search's warm-start pick or, where every candidate failed its filters, its lead (the
        best scored: the eval's "plain" arm, and what the direction sources were made from)."""
        p = self.direction_path()
        if p.with_suffix(".safetensors").exists():
            return Direction.load(p)
        chosen = self._search_lead()
        return None if chosen is None else self.candidates().get(chosen["position"], int(chosen["layer"]))

    def _search_lead(self) -> dict | None:
        """The selection row of a run with the search that stands for its direction (see :meth:`direction`)."""
        f = self.search_dir() / SEARCH_SELECTION_FILE
        if not f.exists() or not (self.stage_dir(CANDIDATES) / "candidates.safetensors").exists():
            return None
        return run_files.search_lead(read_json_object(f, "run file"), f)  # runs before 2026-12-05: no lead

    def coeff(self) -> dict | None:
        """``{"coeff", "curve", "rule"}``, or None when no coefficient was chosen."""
        return self._json(COEFF, COEFF_FILE, run_files.coeff) if self._file(COEFF, COEFF_FILE).exists() else None

    def scores(self) -> dict | None:
        """The eval stage's judged refusal scores per arm (``"baseline/harmful"`` ...), or None before it ran."""
        return self._json(EVAL, SCORES_FILE) if self._file(EVAL, SCORES_FILE).exists() else None

    def completions(self) -> dict | None:
        """The eval stage's ``{"completions": {arm: [...]}}`` and its prompts (``prompts`` or ``rows``), or None."""
        f = self._file(EVAL, COMPLETIONS_FILE)
        return self._json(EVAL, COMPLETIONS_FILE, run_files.completions) if f.exists() else None

    def metrics(self) -> dict | None:
        """The eval stage's refusal metric per prompt set (for the histogram), or None."""
        return self._json(EVAL, METRICS_FILE) if self._file(EVAL, METRICS_FILE).exists() else None

    def checkpoint_model_dir(self) -> Path:
        return self.stage_dir(CHECKPOINT) / CHECKPOINT_MODEL_DIR

    def checkpoint_gguf(self) -> Path:
        return self.stage_dir(CHECKPOINT) / CHECKPOINT_GGUF_FILE

    def relative(self, path: Path) -> str:
        """``path`` as artifacts record it: relative to the run dir, which may move or be read from elsewhere."""
        return path.relative_to(self.path).as_posix()

    def has_checkpoint(self) -> bool:
        return (self.checkpoint_model_dir() / "config.json").exists()

    def checkpoint_eval(self) -> dict | None:
        """The orthogonalized checkpoint's refusal scores and completions, or None."""
        f = self._file(CHECKPOINT, CHECKPOINT_EVAL_FILE)
        return self._json(CHECKPOINT, CHECKPOINT_EVAL_FILE) if f.exists() else None
