"""The code's shape: imports go down the layers with no cycle, modules and functions stay small, and the run
directory's layout is spelled out in one module only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "refdir"
# lower number = lower layer; a module may import its own layer or any lower one
LAYERS = {"errors": 0, "assets": 0, "core": 1, "method": 2, "evaluate": 3, "analysis": 3, "steering": 3, "workflows": 4, "cli": 5,
          "__main__": 5}  # `python -m refdir`: the command line's entry point, beside it
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    mods = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The refdir module an import names (a module, or the package it is in)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(path: Path) -> set[str]:
    """Every refdir module ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] == "refdir":
                m = _resolve(n)
                if m and m != "refdir":
                    out.add(m)
    return out


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_no_relative_imports():
    bad = [str(p) for p in MODULES.values()
           if any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(p.read_text())))]
    assert not bad


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                cyc = visit(n)
                if cyc:
                    return cyc
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state:
            cyc = visit(m)
            assert cyc is None, "import cycle: " + " -> ".join(cyc)


def test_imports_only_go_down_the_layers():
    up = [f"{m} -> {n}" for m, deps in GRAPH.items() for n in deps
          if _layer(m) is not None and _layer(n) is not None and _layer(n) > _layer(m)]
    assert not up, "imports that go up a layer:\n" + "\n".join(sorted(up))


def test_every_module_is_in_a_layer():
    loose = [m for m in MODULES if m != "refdir" and _layer(m) is None]
    assert not loose


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_MODULE_LINES, f"{module}: {n} lines"


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str) and len(body) > 1:
        body = body[1:]  # the docstring
    return body[-1].end_lineno - body[0].lineno + 1


def test_function_size():
    long = []
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _body_lines(node)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert not long, "\n".join(long)


# a run directory's stage names, used as path parts ("/ 'selection'", "'selection/...'", ...) anywhere but the
# run directory's own module
_STAGES = ("data", "refusal_tokens", "filter", "candidates", "selection", "coeff", "eval", "checkpoint", "search",
           "report_sections", "evaluation", "analysis", "benchmarks")
_NAMES = "|".join(_STAGES)
_PATHISH = re.compile(r"""/\s*["'](""" + _NAMES + r""")["']|["'](""" + _NAMES + r""")/""")


def test_run_directory_layout_is_declared_once():
    owner = SRC / "core" / "rundir.py"
    assert owner.exists()
    hits = []
    for p in MODULES.values():
        if p == owner:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if _PATHISH.search(line):
                hits.append(f"{p.relative_to(SRC)}:{i}: {line.strip()}")
    assert not hits, "run-directory paths built outside core/rundir.py:\n" + "\n".join(hits)
