"""Checks made before anything is loaded or written: the model exists and can be loaded as given, the device
exists, the output location can be written, and the prompts fit the model's context.

Each check reads only small files (a model's ``config.json`` and tokenizer config, a GGUF header) so that a
command refuses bad input in well under a second, before it creates its output directory or starts the long work.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from refdir.core.architecture import inspect_model
from refdir.core.chat import ChatFormat
from refdir.core.io import read_json_object, write_error
from refdir.core.model_files import EMBEDDED_ALIASES
from refdir.errors import RefdirError

NO_TEMPLATE = ("{model} has no chat template; pass one with --chat-template (a string containing {{instruction}}, "
               "e.g. '### Instruction:\\n{{instruction}}\\n### Response:\\n')")
# files that hold a tokenizer's chat template besides tokenizer_config.json's "chat_template"
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_device(device: str, device_map: str | None) -> None:
    """Refuse a device that does not exist on this machine, and a device map that is not valid JSON."""
    if device_map is not None:
        if device_map.lstrip().startswith("{"):
            try:
                json.loads(device_map)
            except ValueError as e:
                raise RefdirError(f"--device-map is not valid JSON: {e}") from e
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise RefdirError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RefdirError(f"device {device!r} asked for, but torch sees no CUDA device on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RefdirError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                          "device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RefdirError("device 'mps' asked for, but MPS is not available on this machine")


def check_model(model: str, *, trust_remote_code: bool = False, chat_template: str | None = None,
                chat: bool = True) -> int | None:
    """Refuse a model that cannot be loaded as given, before anything is loaded: a missing path, a file that is
    neither a directory nor a ``.gguf``, a directory without ``config.json``, a model type this transformers does
    not know, a config that names its own code without ``trust_remote_code``, a hub id that is neither cached nor
    reachable, and (with ``chat``) a tokenizer without a chat template when no ``chat_template`` is given.
    Returns the model's context length when its config states one."""
    if model in EMBEDDED_ALIASES:
        return None
    path = Path(model)
    if model.endswith(".gguf"):
        return _check_gguf(path, chat and chat_template is None)
    if path.exists():
        if not path.is_dir():
            raise RefdirError(f"{path} is neither a model directory nor a .gguf file")
        return _check_dir(path, trust_remote_code, chat and chat_template is None)
    if model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1 or model.endswith("/"):
        raise RefdirError(f"model path {model} does not exist")
    return _check_hub(model, trust_remote_code)


def _read_json(f: Path) -> dict:
    return read_json_object(f, "model file")


def _check_dir(path: Path, trust_remote_code: bool, need_template: bool) -> int | None:
    f = path / "config.json"
    if not f.is_file():
        raise RefdirError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = _read_json(f)
    check_model_type(config, str(path), trust_remote_code)
    if need_template:
        if not any((path / n).is_file() for n in TOKENIZER_FILES):
            raise RefdirError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
        tc = path / "tokenizer_config.json"
        has = any((path / n).is_file() for n in TEMPLATE_FILES) or (path / "additional_chat_templates").is_dir()
        if not has and not (tc.is_file() and _read_json(tc).get("chat_template")):
            raise RefdirError(NO_TEMPLATE.format(model=path))
    return _context(config)


def check_model_type(config: dict, name: str, trust_remote_code: bool) -> None:
    """Refuse a config whose ``model_type`` this transformers does not know, and one that names its own code
    (``auto_map``) when ``trust_remote_code`` is off: refdir never runs a model repository's code unasked."""
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    mt = config.get("model_type")
    if "auto_map" in config and not trust_remote_code and mt not in CONFIG_MAPPING:
        raise RefdirError(f"{name} names its own code (auto_map in config.json); refdir does not run a model "
                          "repository's code unless you pass --trust-remote-code")
    if mt is None:
        raise RefdirError(f"{name}: config.json has no model_type")
    if mt not in CONFIG_MAPPING and not trust_remote_code:
        raise RefdirError(f"refdir cannot load model type {mt!r} ({name}): transformers {__version__} does not "
                          "know it")


def _context(config: dict) -> int | None:
    """The context length a config states (its text config's, for multimodal configs)."""
    for c in (config.get("text_config") or {}, config):
        for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(c.get(k), int) and c[k] > 0:
                return c[k]
    return None


def _check_gguf(path: Path, need_template: bool) -> int | None:
    from refdir.core.gguf_read import GGUFFile

    if not path.is_file():
        raise RefdirError(f"GGUF file not found: {path}" if not path.exists() else f"{path} is not a file")
    try:
        r = GGUFFile(path)
        fields = {k: r.fields[k].contents() for k in ("general.architecture", "tokenizer.chat_template")
                  if k in r.fields}
        arch = fields.get("general.architecture")
        ctx = r.fields[f"{arch}.context_length"].contents() if f"{arch}.context_length" in r.fields else None
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError, IndexError, struct errors on bad files
        raise RefdirError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from e
    if need_template and not fields.get("tokenizer.chat_template"):
        raise RefdirError(NO_TEMPLATE.format(model=path))
    return int(ctx) if ctx else None


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _check_hub_reachable(model: str) -> None:
    """Refuse at once a hub id that is in neither the hub cache nor reach: where the hub's host name does not
    resolve (no network), huggingface_hub would retry each request five times with back-off (~25 s of warnings)
    before the same failure. Skipped behind a proxy, which resolves names itself."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return
    try:
        if isinstance(try_to_load_from_cache(model, "config.json"), str):
            return
    except ValueError:  # not a valid repo id: the hub call below says so
        return
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError) as e:
        raise RefdirError(f"model {model!r} is not a local path or in the hub cache, and the hub ({host}) cannot "
                          f"be reached: {e.strerror or e}") from e


def _check_hub(model: str, trust_remote_code: bool) -> int | None:
    """A hub id: its config, from the hub cache or (when online) the hub. Parsing it refuses unknown model types
    and, without ``trust_remote_code``, custom code."""
    from transformers import AutoConfig

    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if not offline:
        _check_hub_reachable(model)
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, local_files_only=offline)
    except OSError as e:
        where = ("the hub is offline (HF_HUB_OFFLINE) and it is not in the local hub cache" if offline else
                 f"the hub could not provide it ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        raise RefdirError(f"model {model!r} is not a local path, and {where}") from e
    except ValueError as e:
        raise RefdirError(f"refdir cannot load model {model!r}: {str(e).splitlines()[0]}") from e
    text = config.get_text_config()
    n = getattr(text, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_output(target: str | Path, kind: str = "dir", inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse, before any work, an output ``kind`` ("dir" or "file") that cannot be written at ``target``: a file
    where a directory goes or the reverse, a nearest existing ancestor that is not a directory, or one where a
    probe file cannot be created (read-only, permission denied). The probe has no name and leaves nothing. Also
    an output that is, or holds, one of the command's local ``inputs`` (:func:`check_not_an_input`)."""
    check_not_an_input(target, inputs)
    p = Path(target).absolute()
    if p.exists() and p.is_dir() != (kind == "dir"):
        raise RefdirError(f"{target} exists and is {'a directory' if p.is_dir() else 'not a directory'}")
    a = p.parent
    while not a.exists():
        a = a.parent
    if not a.is_dir():
        raise RefdirError(f"cannot write {target}: {a} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=p if kind == "dir" and p.is_dir() else a, prefix=".refdir-probe-"):
            pass
    except OSError as e:
        raise write_error(Path(target), e) from e


def check_not_an_input(target: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output location that is one of the command's inputs or holds one (links followed): writing it,
    or replacing it under ``--force``, would delete what the command reads (a run's own checkpoint given as the
    model of a run into that directory, a run directory given as its own eval's output). Inputs that are not
    local paths (hub ids, embedded sets) are skipped."""
    out = Path(target).absolute().resolve()
    for i in inputs:
        if i is None or str(i).startswith("embedded"):
            continue
        for p in (Path(i), Path(f"{i}.safetensors")):  # a direction file may be named without its suffix
            if os.path.lexists(p) and (p.absolute().resolve() == out or out in p.absolute().resolve().parents):
                raise RefdirError(f"{target} holds {i}, which this command reads; choose another output")


def context_length(model: torch.nn.Module) -> int | None:
    """The context length a loaded model's config states, or None."""
    return _context(model.config.get_text_config().to_dict())


def check_fits(fmt: ChatFormat, prompts: list[str], limit: int | None, extra: int = 0) -> None:
    """Refuse prompts that do not fit the model's context of ``limit`` tokens once formatted (with ``extra``
    tokens to spare, e.g. for generation), before the long work starts."""
    if not limit or not prompts:
        return
    lengths = [len(ids) for ids in fmt.tokenizer([fmt.render(p) for p in prompts], add_special_tokens=False)
               ["input_ids"]]
    over = [n for n in lengths if n + extra > limit]
    if over:
        spare = f" plus {extra} generated tokens" if extra else ""
        raise RefdirError(f"{len(over)} of {len(prompts)} prompts do not fit the model's context of {limit} tokens "
                          f"once formatted{spare} (the longest has {max(lengths)} tokens); use shorter prompts")


def check_editable(fmt: ChatFormat, prompts: list[str], model: torch.nn.Module) -> None:
    """What a command that edits a freshly loaded model checks before its first forward pass: the prompts fit the
    context (:func:`check_fits`), and the architecture is one a weight edit covers (:func:`inspect_model`'s
    stream checks refuse the others)."""
    check_fits(fmt, prompts, context_length(model))
    inspect_model(model)


def require(*modules: str, extra: str) -> None:
    """Refuse, before any work, a command whose optional packages (``modules``, from ``refdir[extra]``) are not
    installed, instead of failing at the end of the work."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise RefdirError(f"this command needs {', '.join(missing)}: pip install 'refdir[{extra}]'")
