"""Pipelines behind the CLI: ``extract`` (load → format → activations → candidates)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from refdir import __version__
from refdir.core.activations import residuals
from refdir.core.chat import ChatFormat
from refdir.core.data import load_instructions, sample
from refdir.core.directions import Candidates
from refdir.core.io import atomic_dir, atomic_write_json
from refdir.core.models import load_model


class ExtractConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "default"
    harmful: str = "embedded:harmful:train"
    harmless: str = "embedded:harmless:train"
    column: str = "instruction"
    n_train: int | None = None
    seed: int = 42
    system: str | None = None
    chat_template: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    device_map: str | None = None
    batch_size: int = 16
    trust_remote_code: bool = False


def versions() -> dict:
    import transformers

    return {"refdir": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def run_extract(cfg: ExtractConfig, out: str | Path, force: bool = False) -> Path:
    out = Path(out)
    if out.exists() and not force:
        from refdir.errors import RefdirError

        raise RefdirError(f"output directory {out} already exists; pass --force to overwrite it")
    harmful = load_instructions(cfg.harmful, cfg.column)
    harmless = load_instructions(cfg.harmless, cfg.column)
    lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map,
                    trust_remote_code=cfg.trust_remote_code)
    fmt = ChatFormat(lm.tokenizer, system=cfg.system, template=cfg.chat_template)
    h = sample(harmful.instructions, cfg.n_train, cfg.seed)
    b = sample(harmless.instructions, cfg.n_train, cfg.seed)
    mh, _ = residuals(lm.model, fmt, h, batch_size=cfg.batch_size, desc="harmful activations")
    mb, _ = residuals(lm.model, fmt, b, batch_size=cfg.batch_size, desc="harmless activations")
    cands = Candidates.from_means(mh, mb, lm.model_id, {
        "post_instruction_tokens": fmt.post_instruction_tokens(), "n_harmful": len(h), "n_harmless": len(b),
        "harmful_sha256": harmful.sha256(), "harmless_sha256": harmless.sha256(), "dtype": str(lm.dtype),
    })
    with atomic_dir(out, force=force) as tmp:
        cands.save(tmp)
        atomic_write_json(tmp / "config.json", cfg.model_dump())
        atomic_write_json(tmp / "manifest.json", {"versions": versions(), "model": lm.source,
                                                  "config": cfg.model_dump()})
    return out / "candidates.safetensors"
