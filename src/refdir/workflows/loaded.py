"""A run's model, loaded by the first stage that needs it: a fully cached rerun never loads it."""

from __future__ import annotations

import gc
import time

from refdir.core.chat import ChatFormat
from refdir.core.forward import last_logits
from refdir.core.models import LoadedModel
from refdir.core.preflight import check_editable
from refdir.core.spec import ModelSpec
from refdir.method.scoring import refusal_metric_from_logits


class Loaded:
    """A model spec's model and chat format, loaded on first use (so a fully cached rerun never loads it)."""

    def __init__(self, spec: ModelSpec, prompts: list[str] | None = None):
        self.spec = spec
        self.load_s: float | None = None  # seconds the load took, once loaded
        self.edited = False  # set once the weights were edited in place (the base model is gone)
        self._lm: LoadedModel | None = None
        self._fmt: ChatFormat | None = None
        # the prompts the work will run on: refused on load, before any forward pass, if they overflow the context
        self.prompts = list(prompts or [])

    @property
    def loaded(self) -> bool:
        return self._lm is not None

    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            t = time.time()
            self._lm = self.spec.load_model()
            self.load_s = time.time() - t
            check_editable(self.fmt, self.prompts, self._lm.model)
        return self._lm

    def release(self) -> None:
        """Free the model's weights once no stage needs them (before the GGUF export); its source stays known."""
        if self._lm is not None:
            self._lm.model = None
            gc.collect()

    @property
    def fmt(self) -> ChatFormat:
        if self._fmt is None:
            self._fmt = self.spec.chat(self.lm.tokenizer)
        return self._fmt

    def metric(self, prompts: list[str], ids: list[int], batch_size: int) -> list[float]:
        """The refusal metric of each prompt at the first answer position (shared-prefix batches)."""
        lg = last_logits(self.lm.model, self.fmt, prompts, batch_size, shared_prefix=True)
        return refusal_metric_from_logits(lg, ids).tolist()
