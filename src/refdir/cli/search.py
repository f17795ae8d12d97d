"""`refdir search`: Pareto search over ablation strength and variants; `refdir export`: a front point as a
checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from refdir.cli.common import DIRECTION_METHOD_HELP, console, model_options, model_overrides
from refdir.core.edits import Edit
from refdir.core.rundir import RunDir
from refdir.core.spec import ModelSpec
from refdir.errors import RefdirError
from refdir.method.search.export import CHOSEN
from refdir.method.uncertainty import CONFIDENCE, count_text
from refdir.workflows.checks import print_warnings
from refdir.workflows.search import SearchConfig, export_point, run_search


@model_options
def search(
    spec: ModelSpec,
    out: Path = typer.Option(..., "--out", help="run directory; rerunning resumes the study"),
    trials: int = typer.Option(20, help="TPE trials in all (a rerun with more trials extends the study)"),
    harmful: str = typer.Option("embedded:harmful", help="harmful train source (candidates + proxy prompts)"),
    harmless: str = typer.Option("embedded:harmless", help="harmless train source"),
    harmful_test: str = typer.Option(None, help="harmful confirmation prompts (default: the source's test split)"),
    harmless_test: str = typer.Option(None, help="harmless confirmation prompts (first-token KL)"),
    column: str = typer.Option("instruction"),
    n_train: int = typer.Option(None, help="train prompts per set for the candidates (default: all)"),
    n_val: int = typer.Option(40, help="harmless proxy prompts (first-token KL), carved from the train source"),
    n_val_harmful: int = typer.Option(24, help="harmful proxy prompts (refusal metric), carved likewise"),
    n_test: int = typer.Option(None, help="confirmation prompts per set (default: all)"),
    seed: int = typer.Option(42),
    refusal_tokens: str = typer.Option(None, help="comma-separated refusal token strings (default: derived)"),
    batch_size: int = typer.Option(32),
    top_k: int = typer.Option(4, help="selection finalists; the best also warm-start the search"),
    max_strength: float = typer.Option(1.0, help="largest per-layer strength searched (≤ 1)"),
    variants: str = typer.Option("plain,projected,norm", help="variants searched, comma-separated"),
    direction_method: str = typer.Option("dim", help=DIRECTION_METHOD_HELP),
    max_new_tokens: int = typer.Option(100, help="tokens generated per prompt to confirm a point"),
    kl_marks: str = typer.Option("0.01,0.05", help="KL budgets: the front is refined towards each, and its best "
                                 "point under each is confirmed by generation"),
    refine: int = typer.Option(2, help="front points per KL mark refined by strength scaling (0: off)"),
    per_mark: int | None = typer.Option(None, help="front points confirmed by generation under each KL mark (the "
                                        "lowest proxy refusals, from different lineages); default 2 where the "
                                        "model computes in bf16/fp16 or on an accelerator, else 1"),
    max_confirm: int = typer.Option(0, help="front points confirmed by generation besides the KL marks' "
                                    "(spread along it: 1 = its low-KL end, 2 = both ends, ...)"),
    confirm_plain: bool = typer.Option(False, help="also confirm the plain full edit by generation"),
    calibrate: bool = typer.Option(True, help="rescale each KL mark's pick once so that its KL on the "
                                   "confirmation prompts lands at 0.92 of the mark"),
    confirm_extra: int = typer.Option(0, help="other trials confirmed too, for the proxy/generation correlation"),
    reference: Path = typer.Option(None, help="JSON list of {label, refusals, kl} drawn beside the front"),
    force: bool = typer.Option(False, help="replace a study made with another model or config"),
) -> None:
    """Multi-objective search (refusal vs KL) over edits; writes the front, confirms it by generation."""
    cfg = SearchConfig.of(**spec.model_dump(), harmful=harmful, harmless=harmless, harmful_test=harmful_test,
                          harmless_test=harmless_test, column=column, n_train=n_train, n_val=n_val,
                          n_val_harmful=n_val_harmful, n_test=n_test, seed=seed,
                          refusal_tokens=refusal_tokens.split(",") if refusal_tokens else None,
                          batch_size=batch_size, top_k=top_k, max_strength=max_strength,
                          variants=[v.strip() for v in variants.split(",") if v.strip()],
                          direction_method=direction_method,
                          max_new_tokens=max_new_tokens, kl_marks=_marks(kl_marks))
    if not 0 < max_strength <= 1:
        raise RefdirError("--max-strength must be in (0, 1]")
    res = run_search(cfg, out, trials=trials, refine=refine, per_mark=per_mark, max_confirm=max_confirm,
                     confirm_plain=confirm_plain, confirm_extra=confirm_extra, calibrate=calibrate,
                     reference=reference, force=force)
    print_front(res, out)


@model_overrides
def export(
    overrides: dict,
    search_dir: Path = typer.Argument(..., help="a directory written by refdir search or refdir run"),
    out: Path = typer.Argument(..., help="output directory for the edited checkpoint, or a .gguf file where the "
                                         "search's model was a GGUF (the embedded default included)"),
    point: str = typer.Option(..., "--point", help="front point K (see the search's front.csv), or `chosen`: the "
                                                   "edit refdir run chose (its second direction included)"),
    force: bool = typer.Option(False),
) -> None:
    """Write one front point of a search (or the edit a run chose) as an edited Hugging Face checkpoint, or as a GGUF
    (OUT.gguf) for a GGUF model: the writers re-encoded in a copy of that GGUF, without loading the model."""
    if point != CHOSEN:
        try:
            point = int(point)
        except ValueError:
            raise RefdirError(f"--point takes a front index or {CHOSEN!r}, got {point!r}") from None
    export_point(search_dir, point, out, force=force, model=overrides)
    console.print(f"{'the chosen edit' if point == CHOSEN else f'point {point}'} written to [bold]{out}[/]")


def _marks(s: str) -> list[float]:
    """Parse --kl-marks; run_search checks the values."""
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise RefdirError(f"--kl-marks takes comma-separated numbers, got {s!r}") from e


def print_front(res: dict, out: Path) -> None:
    """The search's front with its confirmed points, and the best confirmed point under each KL mark."""
    b = res["base"]["confirmed"]
    judge = res["config"]["run"]["judge"]
    t = Table("point", "proxy refusal", "proxy KL", f"refusals ({judge})", "paper", "KL", "edit")
    for r in res["front"]:
        c = r.get("confirmed")
        t.add_row(str(r["point"]), f"{r['proxy_refusal']:.2f}", f"{r['proxy_kl']:.4f}",
                  count_text(c["refusals"], c["n"]) if c else "", f"{c['refusals_paper']}/{c['n']}" if c else "",
                  f"{c['kl']:.4f}" if c else "", Edit.from_dict(r["edit"]).describe())
    console.print(t)
    rho = res["spearman_refusal"]
    console.print(f"base model: {count_text(b['refusals'], b['n'])} refusals ({CONFIDENCE:.0%} intervals); "
                  f"Spearman(proxy, generated refusal) = "
                  f"{'n/a' if rho is None else f'{rho:.2f}'} over {res['n_confirmed']} points; "
                  f"{res['timings_s']['total']:.0f} s")
    for m, best in res.get("best_at_kl", {}).items():
        got = (f"{count_text(best['refusals'], best['n'])} refusals at KL {best['kl']:.4f} "
               f"(point of trial {best['trial']})") if best else "no confirmed point"
        console.print(f"best confirmed at KL ≤ {m}: {got}")
    print_warnings(res.get("warnings", []))
    rd = RunDir(out)
    console.print(f"front: [bold]{rd.search_dir() / 'front.csv'}[/]  report: [bold]{rd.report_path}[/]")
