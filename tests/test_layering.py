"""The package reads in one direction: each module imports only from the floors below its own.

The floors are the import-linter contract in pyproject.toml (docs/design.md §2 explains them). An
import inside a function would hide an upward import from a reader (and used to hide a cycle of
nine modules), so none is allowed, except in the CLI, which defers its heavy imports so that
`--help` answers at once.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ekfac_influence"
MAY_DEFER_IMPORTS = {"cli.py"}


def lint_imports() -> subprocess.CompletedProcess:
    command = Path(sys.executable).with_name("lint-imports")
    if not command.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    return subprocess.run([str(command), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_the_import_linter_contracts_are_kept():
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_every_module_of_the_package_stands_on_a_floor_of_the_contract():
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {name.strip() for floor in contract["layers"] for name in floor.replace(":", "|").split("|")}
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules - named == set(), "modules missing from the layers contract in pyproject.toml"
    assert named - modules == set(), "the layers contract names modules that do not exist"


def _imports_inside_functions(path: Path) -> list[str]:
    """`from .x import y` / `import ekfac_influence.x` lines below module level (in a def or a class)."""
    found = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            own = (isinstance(child, ast.ImportFrom) and (child.level > 0 or (child.module or "").startswith("ekfac_influence"))
                   or isinstance(child, ast.Import) and any(a.name.startswith("ekfac_influence") for a in child.names))
            if nested and own:
                found.append(f"{path.name}:{child.lineno}")
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def test_no_module_imports_the_package_inside_a_function():
    offenders = [hit for path in sorted(PACKAGE.glob("*.py")) if path.name not in MAY_DEFER_IMPORTS
                 for hit in _imports_inside_functions(path)]
    assert offenders == []


def test_the_inner_import_check_finds_an_inner_import(tmp_path):
    """The check above can fail: an import of the package inside a function is found, one at module level is not."""
    source = tmp_path / "module.py"
    source.write_text("from . import config\n\ndef f():\n    from .factors import Factors\n    import json\n"
                      "\nclass C:\n    def g(self):\n        import ekfac_influence.fit\n")
    assert _imports_inside_functions(source) == ["module.py:4", "module.py:9"]
