"""``refdir extract``: load → format → activations → difference-in-means candidates, in one directory."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from refdir.core.data import load_instructions, sample
from refdir.core.directions import Candidates
from refdir.core.io import atomic_dir, atomic_write_json
from refdir.core.rundir import versions
from refdir.core.spec import ModelSpec
from refdir.errors import RefdirError
from refdir.workflows.stages import Loaded, mean_residuals


class ExtractConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelSpec = Field(default_factory=ModelSpec)
    harmful: str = "embedded:harmful:train"
    harmless: str = "embedded:harmless:train"
    column: str = "instruction"
    n_train: int | None = None  # sample this many of each set (default: all, shuffled)
    seed: int = 42
    batch_size: int = 16


def run_extract(cfg: ExtractConfig, out: str | Path, force: bool = False) -> Path:
    """Write ``OUT/candidates.safetensors`` (with config.json and manifest.json); an existing ``out`` is refused
    unless ``force``. Returns the candidates file."""
    out = Path(out)
    if out.exists() and not force:
        raise RefdirError(f"output directory {out} already exists; pass --force to overwrite it")
    harmful = load_instructions(cfg.harmful, cfg.column)
    harmless = load_instructions(cfg.harmless, cfg.column)
    m = Loaded(cfg.model)
    h = sample(harmful.instructions, cfg.n_train, cfg.seed)
    b = sample(harmless.instructions, cfg.n_train, cfg.seed)
    mh = mean_residuals(m, h, cfg.batch_size, "harmful activations", shared_prefix=False)
    mb = mean_residuals(m, b, cfg.batch_size, "harmless activations", shared_prefix=False)
    cands = Candidates.from_means(mh, mb, m.lm.model_id, {
        "post_instruction_tokens": m.fmt.post_instruction_tokens(), "n_harmful": len(h), "n_harmless": len(b),
        "harmful_sha256": harmful.sha256(), "harmless_sha256": harmless.sha256(), "dtype": str(m.lm.dtype),
    })
    with atomic_dir(out, force=force) as tmp:
        cands.save(tmp)
        atomic_write_json(tmp / "config.json", cfg.model_dump())
        atomic_write_json(tmp / "manifest.json", {"versions": versions(), "model": m.lm.source,
                                                  "config": cfg.model_dump()})
    return out / "candidates.safetensors"
