"""``refdir extract``: load → format → activations → difference-in-means candidates, in one directory."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from refdir.core.data import sample
from refdir.core.directions import Candidates
from refdir.core.fingerprint import versions
from refdir.core.io import atomic_dir, atomic_write_json, check_replaceable
from refdir.core.spec import ModelSpec
from refdir.errors import RefdirError
from refdir.workflows.checks import check_extract, check_prompts_fit
from refdir.workflows.stages import Loaded, mean_residuals


class ExtractConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelSpec = Field(default_factory=ModelSpec)
    harmful: str = "embedded:harmful:train"
    harmless: str = "embedded:harmless:train"
    column: str = "instruction"
    n_train: int | None = Field(None, ge=1)  # sample this many of each set (default: all, shuffled)
    seed: int = Field(42, ge=0, lt=2**32)  # numpy's seed range
    batch_size: int = Field(16, ge=1)


def run_extract(cfg: ExtractConfig, out: str | Path, force: bool = False) -> Path:
    """Write ``OUT/candidates.safetensors`` (with config.json and manifest.json); an existing ``out`` is refused
    unless ``force``. Returns the candidates file. The model, the output location and the data are checked before
    the model is loaded (:func:`refdir.workflows.checks.check_extract`), the prompts' lengths right after it."""
    out = Path(out)
    if out.exists() and not force:
        raise RefdirError(f"output directory {out} already exists; pass --force to overwrite it")
    check_replaceable(out)  # --force replaces only a directory refdir wrote: refused now, not after the work
    harmful, harmless, context = check_extract(cfg.model, out, cfg.harmful, cfg.harmless, cfg.column)
    h = sample(harmful.instructions, cfg.n_train, cfg.seed)
    b = sample(harmless.instructions, cfg.n_train, cfg.seed)
    check_prompts_fit(cfg.model, context, h + b)
    m = Loaded(cfg.model, prompts=h + b)
    m.lm  # noqa: B018 - load now: prompts that do not fit the context are refused before any forward pass
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
