"""The run's GGUF in llama.cpp: does the edited file, run by llama.cpp itself, refuse as the run's evaluation said?

A GGUF output is for llama.cpp and the tools built on it, which compute with the quantized blocks rather than the
dequantized weights refdir evaluates. This loads the run's base GGUF (the model it was given) and its edited
``checkpoint/model.gguf`` with llama-cpp-python, answers the held-out prompts greedily through llama.cpp's own chat
template handling (no system message: the template's default, as the run; repeat penalty off), judges them with
the run's judge and prints the refusals beside the run's evaluation (the same prompts, transformers on the
dequantized weights), with the prompts the two flag differently. It also takes the first-token KL between the two
files' next-token distributions (llama.cpp's logits) on the harmless prompts, beside the run's figure.

With ``--edit-check SRC.gguf`` instead of a run: any GGUF (SmolLM2's Q4_1 file, Gemma 3's Q4_K_M) is
orthogonalized against a fixed random direction (seed 0) with ``refdir.core.gguf_edit``, and the next-token
distributions after a few plain-text prompts are compared: the same edit made in memory on the dequantized source
(``orthogonalize_``, transformers, fp32: what the file should compute), the edited file loaded back by transformers,
both files in llama.cpp, and the direction ablated with hooks (equal to the weight edit; on post-norm models
since 2026-12-07).
``--own-type`` writes the edited tensors in their own quantization type, as refdir did before 2026-12-07.

llama-cpp-python is not a refdir dependency (it builds llama.cpp from source: ``pip install llama-cpp-python``,
about 7 minutes on 2 cores).

    python bench/bench_llamacpp.py RUN --harmful $P/harmful_val.json --harmless $P/harmless_val.json
    python bench/bench_llamacpp.py --edit-check ~/.cache/refdir/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf [--own-type]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import fail

from refdir.core import rundir as rdl
from refdir.core.model_files import gguf_file_of
from refdir.core.rundir import RunDir
from refdir.method.refusal_judge import judge
from refdir.method.scoring import first_token_kl
from refdir.workflows.finish import HARMLESS_TOKENS


def _prompts(path: str, n: int | None) -> list[str]:
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {e}")
    return [r["instruction"] if isinstance(r, dict) else r for r in rec][:n]


def _answers(llm, prompts: list[str], tokens: int) -> list[str]:
    """Greedy answers through llama.cpp's chat handling (the GGUF's template), the repeat penalty off."""
    out = []
    for p in prompts:
        r = llm.create_chat_completion(messages=[{"role": "user", "content": p}], temperature=0.0, top_k=1,
                                       repeat_penalty=1.0, max_tokens=tokens)
        out.append(r["choices"][0]["message"]["content"] or "")
    return out


def _last_logits(llm, token_lists: list[list[int]]) -> torch.Tensor:
    """llama.cpp's next-token logits after each token list [N, vocab] (the instance needs ``logits_all``: this
    llama-cpp-python keeps no logits without it)."""
    rows = []
    for ids in token_lists:
        if len(ids) > llm.n_ctx():
            fail(f"a prompt of {len(ids)} tokens exceeds the context of the logits pass ({llm.n_ctx()})")
        llm.reset()
        llm.eval(ids)
        z = torch.from_numpy(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
        if not z.any():
            fail("llama.cpp returned no logits (this llama-cpp-python keeps them only with logits_all)")
        rows.append(z)
    return torch.stack(rows)


def _chat_tokens(llm, prompts: list[str]) -> list[list[int]]:
    """Each prompt as one user turn rendered by the GGUF's chat template, with the generation prompt."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="", bos_token="",
                              add_generation_prompt=True)
    return [llm.tokenize(fmt(messages=[{"role": "user", "content": p}]).prompt.encode(), add_bos=False, special=True)
            for p in prompts]


def _kl(base: torch.Tensor, edited: torch.Tensor) -> float:
    """Mean first-token KL(base ‖ edited) of two [N, vocab] logit tensors (refdir's formula)."""
    return float(first_token_kl(base, edited, base_logits=True).mean())


CHECK_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Water boils at a temperature of",
                 "Once upon a time, in a small village,", "The three primary colors are", "import numpy as np\nx = np.",
                 "My favourite season is autumn because", "To make a cup of tea, first",
                 "The largest planet in the solar system is", "In 1969, astronauts", "A haiku about the sea:\n",
                 "Q: What is 12 times 7?\nA:"]


def edit_check(Llama, src: Path, threads: int, own_type: bool) -> None:
    """The edited file against the same edit in memory, in transformers and in llama.cpp (the module's docstring)."""
    import copy
    import tempfile

    import refdir.core.gguf_edit as gguf_edit
    from refdir.core.interventions import ablate
    from refdir.core.models import load_model
    from refdir.core.orthogonalize import orthogonalize_

    if own_type:
        gguf_edit.WIDEN = frozenset()
    lm = load_model(str(src), dtype="fp32")
    d = lm.model.config.get_text_config().hidden_size
    r = torch.randn(d, generator=torch.Generator().manual_seed(0))

    def llama_logits(path: Path, ids) -> torch.Tensor:
        return _last_logits(Llama(model_path=str(path), n_ctx=128, n_threads=threads, verbose=False, logits_all=True),
                            ids)

    def hf_logits(model, ids) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([model(input_ids=torch.tensor([i])).logits[0, -1].float() for i in ids])

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "edited.gguf"
        t = time.perf_counter()
        summary = gguf_edit.orthogonalize_gguf(src, r, out, progress=False)
        secs = time.perf_counter() - t
        probe = Llama(model_path=str(src), n_ctx=128, n_threads=threads, verbose=False, vocab_only=True)
        ids = [probe.tokenize(p.encode(), add_bos=True, special=False) for p in CHECK_PROMPTS]
        del probe
        hf_base = hf_logits(lm.model, ids)
        with ablate(lm.model, r):
            hooks = hf_logits(lm.model, ids)
        weights = copy.deepcopy(lm.model)
        orthogonalize_(weights, r)
        mem = hf_logits(weights, ids)
        del lm, weights
        hf_file = hf_logits(load_model(str(out), dtype="fp32", cache=False).model, ids)
        ll_base, ll_file = llama_logits(src, ids), llama_logits(out, ids)
        size = out.stat().st_size

    def kl(p: torch.Tensor, q: torch.Tensor) -> str:
        return f"{_kl(p, q):.4f}"

    def top1(p: torch.Tensor, q: torch.Tensor) -> str:
        return f"{float((p.argmax(-1) == q.argmax(-1)).double().mean()):.2f}"

    types = sorted(set(summary["changed_types"].values())) or "none"
    print(f"{src.name} ({src.stat().st_size / 1e6:.0f} MB) → {size / 1e6:.0f} MB in {secs:.1f} s, "
          f"{len(summary['edited'])} tensors edited, type changes: {types}; {len(ids)} prompts, first-token KL (top-1 "
          "agreement):")
    print(f"  the edit itself: in memory against the source (transformers) {kl(hf_base, mem)} ({top1(hf_base, mem)})")
    print(f"  the edited file (transformers) against the edit in memory    {kl(mem, hf_file)} ({top1(mem, hf_file)})")
    print(f"  the edited file in llama.cpp against the edit in memory      {kl(mem, ll_file)} ({top1(mem, ll_file)})")
    print(f"  the source in llama.cpp against transformers (the floor)     {kl(hf_base, ll_base)} ({top1(hf_base, ll_base)})")
    print(f"  ablation hooks against the edit in memory                    {kl(mem, hooks)} ({top1(mem, hooks)}); "
          f"against the source {kl(hf_base, hooks)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", nargs="?", help="a finished `refdir run` directory whose model was a GGUF (the default is)")
    ap.add_argument("--harmful", help="the held-out harmful prompts the run was given (JSON)")
    ap.add_argument("--harmless", help="the held-out harmless prompts (JSON; the first --n-harmless)")
    ap.add_argument("--n-harmless", type=int, default=100, help="as the run's --n-heldout (100)")
    ap.add_argument("--edit-check", type=Path, help="instead of a run: a GGUF edited with a random direction")
    ap.add_argument("--own-type", action="store_true", help="with --edit-check: edited tensors in their own type")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if (a.run is None) == (a.edit_check is None) or (a.run is not None and not (a.harmful and a.harmless)):
        fail("give a run directory with --harmful and --harmless, or --edit-check SRC.gguf")
    try:
        from llama_cpp import Llama
    except ImportError:
        fail("this bench needs llama-cpp-python: pip install llama-cpp-python")
    if a.edit_check is not None:
        if not a.edit_check.is_file():
            fail(f"no such GGUF file: {a.edit_check}")
        edit_check(Llama, a.edit_check, a.threads, a.own_type)
        return
    rd = RunDir(a.run)
    try:
        summ = json.loads((rd.path / "summary.json").read_text())
        comp = json.loads((rd.stage_dir(rdl.EVAL) / rdl.COMPLETIONS_FILE).read_text())["completions"]
        src = gguf_file_of(rd.config()["model"]["model"])
    except (OSError, ValueError, KeyError) as e:
        fail(f"{a.run} is not a finished refdir run with the search: {e}")
    edited = rd.checkpoint_gguf()
    if src is None or not edited.is_file():
        fail(f"{a.run} has no edited GGUF (its model was not a GGUF, or its checkpoint was not written)")
    harmful, harmless = _prompts(a.harmful, None), _prompts(a.harmless, a.n_harmless)
    kind, tokens = summ["judge"], summ["test"]["max_new_tokens"]
    print(f"{len(harmful)} harmful prompts ({tokens} tokens), {len(harmless)} harmless ({HARMLESS_TOKENS} tokens), "
          f"{kind} judge; base {src.name}, edited {edited}")
    logits = {}
    for arm, path in (("base", src), ("chosen", edited)):
        t = time.perf_counter()
        llm = Llama(model_path=str(path), n_ctx=1024, n_threads=a.threads, verbose=False, seed=0)
        for set_kind, prompts, n_tok in (("harmful", harmful, tokens), ("harmless", harmless, HARMLESS_TOKENS)):
            mine = judge(_answers(llm, prompts, n_tok), kind)
            ref = comp.get(f"{arm}/heldout/{set_kind}")
            theirs = judge(ref, kind) if ref is not None and len(ref) == len(prompts) else None
            line = f"{arm:6s} {set_kind:8s} llama.cpp {mine.n_refusal}/{mine.n} refused"
            if theirs is not None:
                differ = [i for i, (x, y) in enumerate(zip(mine.flags, theirs.flags, strict=True)) if x != y]
                line += f"; the run's eval {theirs.n_refusal}/{theirs.n}; flagged differently: {len(differ)} {differ}"
            print(line, flush=True)
        del llm
        # logits are kept only with logits_all (every position's row: a short context keeps that small)
        llm = Llama(model_path=str(path), n_ctx=256, n_threads=a.threads, verbose=False, logits_all=True)
        logits[arm] = _last_logits(llm, _chat_tokens(llm, harmless))
        del llm
        print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    run_kl = summ["test"].get("kl", {}).get("chosen/heldout")
    print(f"first-token KL(base || edited) in llama.cpp: {_kl(logits['base'], logits['chosen']):.4f} over "
          f"{len(harmless)} harmless prompts; "
          f"the run's (transformers, dequantized): {run_kl if run_kl is None else f'{run_kl:.4f}'}")


if __name__ == "__main__":
    main()
