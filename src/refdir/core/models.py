"""Loading models: hub ids, local directories, GGUF files and the embedded default.

A GGUF is dequantized by transformers, which takes a minute for a 1.5B model; refdir keeps one converted
safetensors copy per GGUF file and dtype in its cache (the embedded default's, assembled from its data wheels by
:mod:`refdir.core.model_files`, in bf16), re-checked against the file on every load, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refdir.core.auto_model import auto_class
from refdir.core.cache import (
    CONVERTED_RECORD,
    cached_dir_intact,
    check_record,
    drop_orphan_copies,
    file_record,
    make_room,
    read_record,
    touch_copy,
    write_dir_record,
)
from refdir.core.gguf_read import library_reads
from refdir.core.io import atomic_dir
from refdir.core.model_files import (
    EMBEDDED_ALIASES,
    EMBEDDED_NAME,
    EMBEDDED_SHA256,
    cache_dir,
    embedded_gguf_path,
)
from refdir.core.shards import SHARD_INDEX, ST_TORCH, read_header, read_tensor, safetensors_shards
from refdir.errors import RefdirError

# --------------------------------------------------------------------------------------------
# compute dtype from the hardware
# --------------------------------------------------------------------------------------------


def cpu_has_native_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX-BF16, the instructions that run bf16 matmuls natively.

    Without them bf16 is emulated and far slower than fp32 (see the README), so fp32 is chosen there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return ("avx512_bf16" in flags) or ("amx_bf16" in flags)


def choose_dtype(device: str | torch.device = "cpu", requested: str | torch.dtype | None = None) -> torch.dtype:
    """Pick the compute dtype: the user's choice, else bf16 where the hardware runs it natively, else fp32."""
    if requested not in (None, "auto"):
        return parse_dtype(requested)
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def parse_dtype(d: str | torch.dtype) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if d not in table:
        raise RefdirError(f"unknown dtype {d!r}; use one of {sorted(table)} or 'auto'")
    return table[d]


# --------------------------------------------------------------------------------------------
# the embedded default
# --------------------------------------------------------------------------------------------


def embedded_hf_dir(progress: bool = True) -> Path:
    """A converted safetensors copy of the embedded default (bf16), built on first use and re-checked against its
    record (sizes, and sha256s where an mtime changed) on every load; rebuilt when it does not match."""
    target = cache_dir() / "embedded" / "hf-bf16"
    if cached_dir_intact(target):
        return target
    if target.exists():
        warnings.warn(f"the embedded model's cache {target} does not match its record; rebuilding it", stacklevel=2)
    gguf = embedded_gguf_path()
    model, tok = _load_gguf(gguf, torch.bfloat16, "cpu")
    with atomic_dir(target, force=True, listed=False) as tmp:  # the cache: rebuilt whatever was added
        save_hf_checkpoint(model, tok, tmp, dtype=torch.bfloat16)
        write_dir_record(tmp, source=str(gguf), sha256_gguf=EMBEDDED_SHA256)
    del model
    return target


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    dtype: torch.dtype
    source: dict = field(default_factory=dict)  # how it was loaded; file hashes where cheap

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _strip_gguf_quant(model) -> None:
    """A GGUF-loaded model is dequantized in memory; forget its quantization config so that it
    can be saved and reloaded as a plain checkpoint."""
    if getattr(model.config, "quantization_config", None) is not None:
        try:
            del model.config.quantization_config
        except AttributeError:
            model.config.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None)
            except Exception:  # noqa: BLE001 - read-only properties on some versions
                pass
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except Exception:  # noqa: BLE001
            pass


def _dequantized() -> dict:
    """``from_pretrained`` options that ask for plain dense weights. Transformers 5.25 keeps some architectures'
    GGUF weights packed (Qwen3.5, LFM2) and fetches a matmul kernel for them from the hub, where one is published:
    refdir edits weights, so it asks for them unpacked (and so fetches no code); older versions always unpack."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _load_gguf(path: Path, dtype: torch.dtype, device: str, device_map=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise RefdirError(f"GGUF file not found: {path}")
    try:
        with library_reads():  # transformers parses the whole file three times (tokenizer, config, weights)
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=dtype, device_map=device_map, trust_remote_code=False,
                **_dequantized(),
            )
    except Exception as e:  # noqa: BLE001
        raise RefdirError(f"could not load GGUF {path}: {type(e).__name__}: {e}") from e
    _strip_gguf_quant(model)
    if device_map is None:
        model.to(device)
    return model, tok


def gguf_cache_path(gguf: Path, dtype: torch.dtype) -> Path:
    """Where the converted copy of the GGUF file ``gguf`` in ``dtype`` is kept: one directory per file (by its
    resolved path) and dtype. Stored in the dtype it is loaded in, so that it loads exactly what converting the
    GGUF again would give: 2 bytes a parameter in bf16, 4 in fp32."""
    key = hashlib.sha256(str(Path(gguf).resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{key}-{str(dtype).removeprefix('torch.')}"


def cached_gguf(gguf: Path, dtype: torch.dtype) -> Path | None:
    """The converted copy of ``gguf`` in ``dtype`` if the cache holds one made from the file as it is now (its size,
    and its sha256 where its mtime changed) whose own files are intact; else None."""
    target = gguf_cache_path(gguf, dtype)
    rec = read_record(target / CONVERTED_RECORD)
    src = check_record(Path(gguf), rec.get("source_file")) if rec else None
    if src is None or not cached_dir_intact(target):
        return None
    if src != rec["source_file"]:  # the same content under a new mtime: hashed once, not again
        fresh = read_record(target / CONVERTED_RECORD) or rec
        (target / CONVERTED_RECORD).write_text(json.dumps({**fresh, "source_file": src}, indent=2))
    touch_copy(target)
    return target


def checkpoint_bytes(model) -> int:
    """About what ``save_pretrained`` writes for ``model``: each distinct tensor once (tied weights share one),
    plus 64 MiB for the tokenizer and configs."""
    seen, n = set(), 64 << 20
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def cache_gguf(gguf: Path, dtype: torch.dtype, model, tok) -> None:
    """Keep the just-converted ``model`` and ``tok`` of ``gguf`` for later loads (atomically), within the cache's
    disk budget (:func:`refdir.core.cache.make_room`). Best effort: a copy that does not fit, or cannot be written
    (a full disk, a read-only home), is skipped with a warning; the model is loaded anyway."""
    target = gguf_cache_path(gguf, dtype)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        drop_orphan_copies(target.parent)
        need = checkpoint_bytes(model)
        if not make_room(target.parent, need, keep=target):
            warnings.warn(f"the converted GGUF ({need / 2**30:.1f} GiB) was not cached: it does not fit the cache's "
                          f"budget in {target.parent} (REFDIR_GGUF_CACHE_GB, and 2 GiB left free on the disk); "
                          "it is converted again next time", stacklevel=3)
            return
        with atomic_dir(target, force=True, listed=False) as tmp:  # the cache: rebuilt whatever was added
            save_hf_checkpoint(model, tok, tmp)
            write_dir_record(tmp, source=str(Path(gguf).resolve()), source_file=file_record(Path(gguf)),
                             dtype=str(dtype))
    except (OSError, RefdirError) as e:  # a full disk as safetensors reports it is a RefdirError (io.write_errors)
        warnings.warn(f"the converted GGUF could not be cached in {target} ({e}); it is converted again next time",
                      stacklevel=3)


# --------------------------------------------------------------------------------------------
# what a model may do while it loads: no code of its own, no unpickling (unless the caller allows it)
# --------------------------------------------------------------------------------------------

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickled_weights(path: Path, allow_pickle: bool) -> None:
    """Refuse a model directory whose weights exist only as pickle files (unpickling can run code), unless the
    caller passed ``allow_pickle``. A directory with safetensors is loaded from those alone."""
    if allow_pickle or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise RefdirError(f"{path} holds its weights only as pickle files ({', '.join(pickles[:3])}); refdir loads "
                          "safetensors only, since unpickling can run code: convert them to safetensors, or pass "
                          "--allow-pickle if you trust these files")


def load_error(spec: str, e: Exception, allow_pickle: bool = False) -> RefdirError | None:
    """One clear error for what transformers raises while loading ``spec``: custom code it was not allowed to
    run, a repository without safetensors, a missing file. None for anything else."""
    msg = str(e)
    if "trust_remote_code" in msg:
        return RefdirError(f"{spec} needs its own code to load (its config names custom code); refdir never runs "
                           "a model's code unless you pass --trust-remote-code")
    if isinstance(e, OSError) and not allow_pickle and ".safetensors" in msg:
        return RefdirError(f"could not load model {spec!r}: it has no safetensors weights ({msg.splitlines()[0]}); "
                           "refdir loads safetensors only, since unpickling can run code (--allow-pickle to "
                           "allow pickled weights)")
    if isinstance(e, OSError):
        return RefdirError(f"could not load model {spec!r}: {e}")
    if isinstance(e, RuntimeError) and ("size mismatch" in msg or "ignore_mismatched_sizes" in msg):
        # transformers: weights of other shapes than the config's (its report of which ones goes to its log)
        detail = next((x.strip() for x in msg.splitlines() if "size mismatch" in x), None)
        return RefdirError(f"could not load model {spec!r}: its weights do not fit its config"
                           + (f" ({detail})" if detail else ""))
    return None


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """A model directory's or cached hub id's tokenizer, with the chat template that vision-language checkpoints
    keep only for their processor (``chat_template.json``, which the tokenizer does not load) where it has none:
    the model's own template all the same."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if not getattr(tok, "chat_template", None):
        if Path(name).exists():
            f = Path(name) / "chat_template.json"
        else:  # a hub id: its cached snapshot
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(name, "chat_template.json")
            f = Path(hit) if isinstance(hit, str) else None
        if f is not None and f.is_file():
            try:
                t = json.loads(f.read_text()).get("chat_template")
            except (OSError, ValueError, AttributeError) as e:
                raise RefdirError(f"{f} is not a JSON object with a chat_template: {e}") from e
            tok.chat_template = t if isinstance(t, str) and t else None
    return tok


def load_config(path: str | Path, trust_remote_code: bool = False):
    """A model's transformers config, never running code the model ships (unless ``trust_remote_code``)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise load_error(str(path), e) or RefdirError(f"could not read the config of {path}: {e}") from e


def load_model(
    spec: str | Path = "default",
    *,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    gguf_file: str | None = None,
    cache: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``spec`` is ``"default"`` (the embedded model), a ``.gguf`` file, a local ``from_pretrained``
    directory or a hub id. ``dtype=None`` picks the compute dtype from the hardware.
    ``trust_remote_code`` stays off unless the caller turns it on, and weights load from safetensors only
    (or GGUF) unless the caller passes ``allow_pickle``. A GGUF file is converted once and its copy kept in the
    cache for later loads, unless ``cache`` is False (a file loaded once, such as a just-exported checkpoint).
    """

    torch_dtype = choose_dtype(device, dtype)
    if isinstance(device_map, str) and device_map.lstrip().startswith("{"):  # a JSON map from the CLI
        try:
            device_map = json.loads(device_map)
        except ValueError as e:
            raise RefdirError(f"--device-map is not valid JSON: {e}") from e
    spec_s = str(spec)
    source: dict = {"spec": spec_s}
    if spec_s in EMBEDDED_ALIASES:
        path = embedded_hf_dir()
        source.update(kind="embedded", path=str(path), sha256_gguf=EMBEDDED_SHA256)
        model_id = EMBEDDED_NAME
    elif spec_s.endswith(".gguf") or gguf_file:
        p = Path(spec_s) if spec_s.endswith(".gguf") else Path(spec_s) / gguf_file
        source.update(kind="gguf", path=str(p))
        path = cached_gguf(p, torch_dtype) if device_map is None else None
        if path is None:  # converted now, and kept for the next load
            model, tok = _load_gguf(p, torch_dtype, device, device_map)
            if device_map is None and cache:
                cache_gguf(p, torch_dtype, model, tok)
            model.eval()
            return LoadedModel(model, tok, p.name, torch_dtype, source)
        source["converted"] = str(path)
        model_id = p.name
    else:
        path = Path(spec_s)
        if path.exists():
            if not (path / "config.json").exists():
                raise RefdirError(f"{path} is not a Hugging Face model directory (no config.json)")
            if (path / SHARD_INDEX).exists():
                safetensors_shards(path)  # the index's shard names, before transformers opens them
            refuse_pickled_weights(path, allow_pickle)
            source.update(kind="dir", path=str(path))
        else:
            source.update(kind="hub")
        model_id = spec_s
    config = None
    if source["kind"] != "embedded":  # custom code is refused here, with one clear error, before anything loads
        config = load_config(str(path) if source["kind"] != "hub" else spec_s, trust_remote_code)
    # a local half-precision checkpoint loaded in fp32 on the CPU: loaded as stored, then cast tensor by tensor
    stored = (_files_dtype(path) if source["kind"] != "hub" and device == "cpu" and device_map is None
              and torch_dtype == torch.float32 else None)
    upcast = stored is not None
    try:
        tok = load_tokenizer(str(path) if source["kind"] != "hub" else spec_s, trust_remote_code)
        model = auto_class(config).from_pretrained(
            str(path) if source["kind"] != "hub" else spec_s,
            dtype=stored if upcast else torch_dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
        )
    except (OSError, ValueError, RuntimeError) as e:
        err = load_error(spec_s, e, allow_pickle)
        if err is None:
            raise
        raise err from e
    if upcast:
        upcast_from_files(model, path, torch_dtype)
    if device_map is None:
        model.to(device)
    model.eval()
    return LoadedModel(model, tok, model_id, torch_dtype, source)


_HALF = ("BF16", "F16")


def _files_dtype(path: Path) -> torch.dtype | None:
    """The one floating dtype of a directory's safetensors files if it is bf16 or fp16 (else None)."""
    kinds = set()
    for f in sorted(path.glob("*.safetensors")):
        header, _ = read_header(f)
        kinds |= {h["dtype"] for n, h in header.items() if n != "__metadata__" and h["dtype"].startswith(("F", "BF"))}
    return ST_TORCH[kinds.pop()] if len(kinds) == 1 and next(iter(kinds)) in _HALF else None


def upcast_from_files(model, path: Path, dtype: torch.dtype) -> None:
    """Cast a model that ``from_pretrained`` loaded in its files' half-precision dtype to ``dtype``, each parameter
    replaced by the cast of its tensor read from the files with plain reads. Asking ``from_pretrained`` for another
    dtype than the files' keeps every page of the memory-mapped files resident while it builds the copy (fp32 from
    the default model's bf16 cache peaked at 4.0 GiB for a 2.35 GiB model); loaded as stored, the map is only
    touched where a tensor is read, and here none is. The result equals ``from_pretrained(dtype=dtype)``: the same
    exact cast. Parameters stay the same objects (tied weights stay tied); any not found by name in the files, and
    floating buffers, are cast in place."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for f in sorted(path.glob("*.safetensors")):
        header, base = read_header(f)
        with open(f, "rb") as r:
            for name, h in header.items():
                p = params.get(name)
                if name == "__metadata__" or p is None or p.dtype == dtype or h["dtype"] not in _HALF:
                    continue
                if tuple(h["shape"]) != tuple(p.shape):
                    continue  # stored under another layout: the in-place cast below handles it
                p.data = read_tensor(r, f, base, name, h).to(dtype)
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)
    model.config.dtype = dtype


def save_hf_checkpoint(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None) -> None:
    """Save a standard HF checkpoint (safetensors) plus tokenizer into an existing directory."""
    out_dir = Path(out_dir)
    _strip_gguf_quant(model)
    if dtype is not None and next(model.parameters()).dtype != dtype:
        model = model.to(dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    cfg = out_dir / "config.json"
    data = json.loads(cfg.read_text())
    if data.pop("quantization_config", None) is not None:
        cfg.write_text(json.dumps(data, indent=2))
