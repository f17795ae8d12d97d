"""Every import in src/ is covered by what pyproject.toml declares for the command that needs it, checked
statically: each module's imports (ast), mapped to distributions (importlib.metadata.packages_distributions).

- A module-level import must be a base dependency: the ``refdir`` command imports every command module.
- An import inside a function (loaded when a command runs) must be a base dependency or in the extra declared
  below for that module (``MODULE_EXTRAS``).
- An import guarded by ``except ImportError`` (used only when installed) must be declared somewhere.
- ``NO_DEPS``: distributions whose metadata pip cannot resolve together with refdir's (nanogcg pins
  transformers<=4.47.1); `make setup` installs them with ``--no-deps`` beside the extra named.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "refdir"

# module (or package prefix) -> the extras its lazy imports may come from, and the command that needs them
MODULE_EXTRAS = {
    "refdir.core.data": ["hub"],  # datasets (hub ids), pyarrow (parquet files): every command that reads data
    "refdir.method.search": ["search"],  # optuna, scipy (Spearman): refdir search, export
    "refdir.evaluate.benchmarks": ["eval"],  # lm_eval: refdir bench
    "refdir.analysis.geometry": ["analysis"],  # scikit-learn (ROC AUC): refdir analyze geometry
    "refdir.analysis.suffix": ["attack"],  # nanogcg: refdir analyze suffix
}
NO_DEPS = {"nanogcg": "attack"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0])


@pytest.fixture(scope="module")
def declared() -> tuple[set[str], dict[str, set[str]]]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    extras = {k: {_requirement_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    return base, extras


def _optional(node: ast.Try) -> bool:
    for h in node.handlers:
        names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
        if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
            return True
    return False


def _imports(path: Path) -> list[tuple[str, bool, bool, int]]:
    """``(top-level name, lazy, optional, line)`` of every absolute import of a third-party module in ``path``."""
    out = []

    def visit(node: ast.AST, lazy: bool, optional: bool) -> None:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            names = []
        for n in names:
            top = n.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ("refdir", "__future__"):
                out.append((top, lazy, optional, node.lineno))
        in_func = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            guarded = optional or (isinstance(node, ast.Try) and child in node.body and _optional(node))
            visit(child, in_func, guarded)

    visit(ast.parse(path.read_text()), False, False)
    return out


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _extras_of(module: str) -> list[str]:
    return [e for prefix, es in MODULE_EXTRAS.items() if module == prefix or module.startswith(prefix + ".")
            for e in es]


def test_every_import_is_declared_for_the_command_that_needs_it(declared):
    base, extras = declared
    dists = {k: [_norm(d) for d in v] for k, v in packages_distributions().items()}
    anywhere = base.union(*extras.values())
    problems = []
    for f in sorted(SRC.rglob("*.py")):
        mod = _module(f)
        for top, lazy, optional, line in _imports(f):
            where = f"{mod}:{line} imports {top}"
            if top in NO_DEPS:
                if NO_DEPS[top] not in _extras_of(mod):
                    problems.append(f"{where}: only modules of the [{NO_DEPS[top]}] extra may use it")
                continue
            names = dists.get(top)
            if not names:
                problems.append(f"{where}: no installed distribution provides it")
                continue
            allowed = anywhere if optional else base.union(*(extras[e] for e in _extras_of(mod))) if lazy else base
            if not set(names) & allowed:
                need = ("base dependencies or any extra" if optional else "base dependencies" if not lazy else
                        f"base dependencies or the extras {_extras_of(mod)}")
                problems.append(f"{where} ({'/'.join(names)}): not in the {need}")
    assert not problems, "\n".join(problems)


def test_the_module_table_names_declared_extras_and_real_modules(declared):
    _base, extras = declared
    modules = {_module(f) for f in SRC.rglob("*.py")}
    for prefix, es in MODULE_EXTRAS.items():
        assert set(es) <= set(extras), prefix
        assert any(m == prefix or m.startswith(prefix + ".") for m in modules), prefix
    assert set(NO_DEPS.values()) <= set(extras)
    makefile = (ROOT / "Makefile").read_text()
    for dist in NO_DEPS:
        assert re.search(rf"--no-deps\s+{dist}\b", makefile), f"make setup must install {dist} with --no-deps"


def test_install_hints_name_extras_that_exist(declared):
    _base, extras = declared
    hints = {m for f in SRC.rglob("*.py") for m in re.findall(r"pip install 'refdir\[([a-z,]+)\]'", f.read_text())}
    for h in hints:
        assert set(h.split(",")) <= set(extras), h


def test_the_issue_cases(declared):
    base, extras = declared
    assert "scipy" in extras["search"]  # the search's Spearman at its very end
    assert "scikit-learn" in extras["analysis"]  # analyze geometry's ROC AUC
    assert "pyarrow" in extras["hub"]  # parquet files
