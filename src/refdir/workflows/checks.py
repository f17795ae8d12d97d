"""What a run, a search and an extraction check before they write anything: the model, the output location
and the data. Each returns what it read, so that the work then uses exactly what was checked.

Settings are checked earlier still, when the config is built (pydantic: counts ≥ 1, judges, rules, dtypes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from refdir.core import rundir as rdl
from refdir.core.data import InstructionSet, load_instructions
from refdir.core.directions import Direction
from refdir.core.fingerprint import DATA_SOURCES
from refdir.core.io import remove_dir
from refdir.core.model_files import EMBEDDED_ALIASES
from refdir.core.models import load_tokenizer
from refdir.core.preflight import check_fits, check_output
from refdir.core.rundir import RunDir
from refdir.core.spec import HELDOUT_SOURCES, KINDS, ModelSpec
from refdir.errors import RefdirError
from refdir.method.scoring import little_refusal
from refdir.workflows.stages import RunConfig, console

DATA_FILES = (*DATA_SOURCES, *HELDOUT_SOURCES)  # the DataSpec fields that may name local files a run reads


def check_run(cfg: RunConfig, out: str | Path) -> dict:
    """Refuse, before the run directory is created or touched: a model that cannot be loaded as given (see
    :meth:`ModelSpec.check`), an output location that cannot be written or an existing run directory whose files
    cannot be read, data that cannot be read or split, and an optimized direction without the search. Returns the split sets (see :meth:`DataSpec.split`)."""
    if cfg.direction_method != "dim" and cfg.method != "search":
        raise RefdirError(f"--direction-method {cfg.direction_method} is a source of the search: use it with "
                          "--method search")
    context = cfg.model.check()
    check_output(out, "dir", [cfg.model.model, *(getattr(cfg.data, k) for k in DATA_FILES)])
    rd = RunDir(out)
    if rd.path.is_dir():
        rd.check_readable()
    sets = cfg.data.split()
    check_prompts_fit(cfg.model, context, all_prompts(sets))
    return sets


@contextmanager
def no_early_leftovers(rd: RunDir, new: bool) -> Iterator[None]:
    """Remove the run directory ``rd`` again when the work inside fails before the model computed anything worth
    keeping (loading it, or a model that refuses nothing for the refusal-token probe) and this command created
    it (``new``): bad input leaves nothing on disk. A directory that existed before is never removed here."""
    try:
        yield
    except Exception:
        if new and not rd.finished(rdl.REFUSAL_TOKENS):
            remove_dir(rd.path)
        raise


def check_extract(spec: ModelSpec, out: str | Path, harmful: str, harmless: str,
                  column: str) -> tuple[InstructionSet, InstructionSet, int | None]:
    """The same checks for ``refdir extract``: the model, the output location, and both prompt sets, which are
    returned with the model's context length (for :func:`check_prompts_fit` on the prompts sampled from them)."""
    context = spec.check()
    check_output(out, "dir", [spec.model, harmful, harmless])
    return load_instructions(harmful, column), load_instructions(harmless, column), context


def check_prompts_fit(spec: ModelSpec, context: int | None, prompts: list[str]) -> None:
    """Refuse prompts that do not fit the model's context of ``context`` tokens once formatted, where the tokenizer
    loads without the model (a local directory or a cached hub id: about a second); for a GGUF file or the
    embedded model :class:`refdir.workflows.stages.Loaded` checks them right after loading the model, before any
    forward pass."""
    if context is None or spec.model.endswith(".gguf") or spec.model in EMBEDDED_ALIASES:
        return
    tok = load_tokenizer(spec.model, spec.trust_remote_code)
    check_fits(spec.chat(tok), prompts, context)


def all_prompts(sets: dict) -> list[str]:
    """Every prompt of a run's split sets (to check that they fit the model's context)."""
    return [p for kind in KINDS for split in ("train", "val", "test", "heldout")
            for p in sets[kind].get(split, [])]


def refusal_warnings(rd: RunDir) -> list[str]:
    """The warnings a run or a search gives from its refusal-token probe's evidence (a model that hardly refuses:
    :func:`refdir.method.scoring.little_refusal`), each printed as it is found."""
    w = little_refusal(rd.refusal_tokens()["evidence"])
    warnings = [w] if w else []
    print_warnings(warnings)
    return warnings


CHECKPOINT_KL = 0.01  # weights against hooks above this first-token KL: the checkpoint is not the edit tested
# (measured: fp32 1e-11 to 1e-6; bf16 7e-4 to 3e-3 on Qwen2.5 0.5B and SmolLM2, 1e-2 on Gemma 3 270M; its
# checkpoint before post-norm edits acted where weights can, 16)


def choice_warnings(choice: dict, ckpt: dict | None) -> list[str]:
    """The warnings a run with the search gives about what it chose and wrote, each printed as it is found: no
    edit under the KL target, and a checkpoint whose logits are not those of the tested (hooked) edit."""
    out = []
    if not choice.get("met", True):
        out.append(f"no edit the search found keeps the calibration prompts' KL under the target "
                   f"{choice['kl_target']:g}: the chosen one is the front's lowest-KL point (proxy KL "
                   f"{choice['proxy_kl']:.3g}); a bigger --budget may find one")
    v = (ckpt or {}).get("verified")
    if v and v["kl_hooks_weights"] > CHECKPOINT_KL:
        why = "" if ckpt.get("exact", True) else (" (this model has post-norms of a form refdir does not know, "
                                                  "where the weight edit only approximates the hooks)")
        out.append(f"the checkpoint does not compute what the test measured: its first-token KL from the hooked "
                   f"edit is {v['kl_hooks_weights']:.3g} on {v['n_prompts']} prompts, top-1 agreement "
                   f"{v['top1_agree']:.2f}{why}; the test's figures describe the hooked edit, not the checkpoint")
    print_warnings(out)
    return out


def print_warnings(warnings: list[str]) -> None:
    """Warnings on the console, one line each: as a run or search finds them, and again at the end of the
    command (a summary's ``warnings``), where the progress bars do not scroll them away."""
    for w in warnings:
        console.print(f"[bold yellow]warning:[/] {w}")


def run_fits_model(rd: RunDir, direction: Direction, model) -> list[int]:
    """The run's refusal token ids, once they and its ``direction`` are checked against the loaded ``model`` (its
    vocabulary, its hidden size): one error naming the cause, not an index error deep in a forward pass."""
    text = model.config.get_text_config()
    if direction.d_model != text.hidden_size:
        raise RefdirError(f"the run's direction has size {direction.d_model} but the model has {text.hidden_size}")
    return rd.refusal_ids(text.vocab_size)
