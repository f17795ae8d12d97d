"""What a workflow is run on: the model (``ModelSpec``) and the prompt sets (``DataSpec``).

Every config that loads a model composes a ``ModelSpec`` instead of repeating its fields, so that each command
takes the same model options and loads the model and its chat format the same way. ``DataSpec`` holds the
harmful/harmless sources and how they are split into train, val and test.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from refdir.core.chat import ChatFormat
from refdir.core.data import embedded, load_instructions, sample
from refdir.core.models import LoadedModel, load_model, parse_dtype, refuse_pickled_weights
from refdir.core.preflight import check_device, check_model
from refdir.errors import RefdirError

# ModelSpec fields honoured only from the command line or the Python call, never from a file
UNSAFE_FIELDS = ("trust_remote_code", "allow_pickle")


class ModelSpec(BaseModel):
    """A model and how to load it: the source, compute dtype and placement, and its chat format."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "default"  # 'default' (the embedded model), a .gguf file, a model directory or a hub id
    dtype: str = "auto"  # auto (bf16 where the hardware runs it natively, else fp32), fp32, bf16, fp16
    device: str = "cpu"
    device_map: str | None = None  # accelerate device_map: a name such as auto, or a JSON map
    trust_remote_code: bool = False  # never read back from a file: see from_record
    allow_pickle: bool = False  # load pickled (.bin/.pt) weights when a model has no safetensors; never from a file
    system: str | None = None  # system prompt
    chat_template: str | None = None  # a template string with {instruction}, for models without one

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        """Refuse an unknown dtype name now (a RefdirError), not after the data is loaded."""
        if v != "auto":
            parse_dtype(v)
        return v

    @field_validator("chat_template")
    @classmethod
    def _template_has_placeholder(cls, v: str | None) -> str | None:
        if v is not None and "{instruction}" not in v:
            raise RefdirError("--chat-template must contain the placeholder {instruction}")
        return v

    def check(self, chat: bool = True) -> int | None:
        """Refuse, before anything is loaded or written, a model that cannot be loaded as this spec says: the
        device, the model's existence and type, custom code, and (with ``chat``) its chat template (see
        :func:`refdir.core.preflight.check_model`). Returns the context length its config states, or None."""
        check_device(self.device, self.device_map)
        context = check_model(self.model, trust_remote_code=self.trust_remote_code,
                              chat_template=self.chat_template, chat=chat)
        if Path(self.model).is_dir():
            refuse_pickled_weights(Path(self.model), self.allow_pickle)
        return context

    @classmethod
    def from_record(cls, recorded: dict, given: dict | None = None) -> ModelSpec:
        """The spec a run or search directory recorded, with the settings ``given`` by the caller on top.

        The settings that let a model run code or unpickle files (``UNSAFE_FIELDS``) are never taken from the
        record, only from ``given``: a directory someone sends you cannot switch them on."""
        safe = {k: v for k, v in recorded.items() if k not in UNSAFE_FIELDS}
        return cls(**{**safe, **(given or {})})

    def load_model(self) -> LoadedModel:
        """The model and tokenizer, loaded as this spec says."""
        return load_model(self.model, dtype=self.dtype, device=self.device, device_map=self.device_map,
                          trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle)

    def chat(self, tokenizer) -> ChatFormat:
        """The chat format of ``tokenizer`` with this spec's system prompt and template."""
        return ChatFormat(tokenizer, system=self.system, template=self.chat_template)

    def load(self) -> tuple[LoadedModel, ChatFormat]:
        """The loaded model and its chat format."""
        lm = self.load_model()
        return lm, self.chat(lm.tokenizer)


KINDS = ("harmful", "harmless")
HELDOUT_SOURCES = ("heldout_harmful", "heldout_harmless")  # the DataSpec fields naming the held-out sets
HELDOUT_FIELDS = (*HELDOUT_SOURCES, "n_heldout")


class DataSpec(BaseModel):
    """The harmful and harmless prompt sources and their train/val/test split.

    The embedded sets come with their own splits. Files and hub ids are shuffled with ``seed`` and carved into
    test, val and train (in that order) unless separate val/test sources are given.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    harmful: str = "embedded:harmful"
    harmless: str = "embedded:harmless"
    # optional separate val/test sources (files, hub ids or embedded:KIND:SPLIT)
    harmful_val: str | None = None
    harmless_val: str | None = None
    harmful_test: str | None = None
    harmless_test: str | None = None
    column: str = "instruction"  # the instruction's column in csv/json/jsonl/parquet
    n_train: int | None = Field(None, ge=1)  # default: all of the train split
    n_val: int = Field(32, ge=1)
    n_test: int | None = Field(None, ge=1)  # default: all of the test split
    # optional held-out test sets from another source than train/val (files, hub ids or embedded:KIND:SPLIT):
    # the run's headline is measured on them when given, beside the in-distribution test split
    heldout_harmful: str | None = None
    heldout_harmless: str | None = None
    n_heldout: int | None = Field(100, ge=1)  # the first n of each held-out set (None: all)
    seed: int = Field(42, ge=0, lt=2**32)  # numpy's and optuna's seed range

    def without_heldout(self) -> DataSpec:
        """This spec with the held-out settings at their defaults: what the stages that build and choose the edit
        read (the held-out sets are judged, never built from or chosen on)."""
        return self.model_copy(update={k: DataSpec.model_fields[k].default for k in HELDOUT_FIELDS})

    def split(self) -> dict:
        """Per kind (harmful, harmless): ``{"train", "val", "test", "heldout": [prompts], "source": {split: spec}}``
        (``heldout`` is empty unless a held-out source is given).

        Raises a RefdirError when a source is too small to carve val and test from, or when test prompts also
        appear in train or val."""
        return {kind: self.split_kind(kind) for kind in KINDS}

    def split_kind(self, kind: str) -> dict:
        """The train/val/test prompts of one kind (see :meth:`split`)."""
        spec = getattr(self, kind)
        val_spec, test_spec = getattr(self, f"{kind}_val"), getattr(self, f"{kind}_test")
        if spec in (f"embedded:{kind}", "embedded"):
            tr, va, te = (embedded(kind, s).instructions for s in ("train", "val", "test"))
        else:
            items = sample(load_instructions(spec, self.column).instructions, None, self.seed)
            n_te = 0 if test_spec else (self.n_test or max(1, len(items) // 5))
            n_va = 0 if val_spec else self.n_val
            if len(items) < n_te + n_va + 2:
                raise RefdirError(f"{spec}: {len(items)} instructions are too few for val {n_va} + test {n_te}")
            te, va, tr = items[:n_te], items[n_te:n_te + n_va], items[n_te + n_va:]
        if val_spec:
            va = load_instructions(val_spec, self.column).instructions
        if test_spec:
            te = load_instructions(test_spec, self.column).instructions
        tr = sample(tr, self.n_train, self.seed)
        va = sample(va, self.n_val, self.seed)
        te = te[: self.n_test] if self.n_test else te
        ho_spec = getattr(self, f"heldout_{kind}")
        ho = load_instructions(ho_spec, self.column).instructions[: self.n_heldout] if ho_spec else []
        for name, t in (("test", te), ("held-out", ho)):
            overlap = set(t) & (set(tr) | set(va))
            if overlap:
                raise RefdirError(f"{len(overlap)} {kind} {name} prompts also appear in train/val, "
                                  f"e.g. {next(iter(overlap))[:60]!r}")
        return {"train": tr, "val": va, "test": te, "heldout": ho,
                "source": {"train": spec, "val": val_spec or spec, "test": test_spec or spec, "heldout": ho_spec}}
