"""The layering DESIGN.md states holds, with no import cycle: import-linter's contracts in
pyproject.toml (``[tool.importlinter]``) are all kept. Function-local imports count too."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import ROOT


def lint_imports() -> str | None:
    """The ``lint-imports`` of this interpreter's environment, else on PATH, else None."""
    here = Path(sys.executable).parent / "lint-imports"
    return str(here) if here.is_file() else shutil.which("lint-imports")


def test_contracts_name_the_design_layers() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert set(config["root_packages"]) == {"lesionlab", "featurize", "models", "serve",
                                            "benchmarks"}
    layers = next(c for c in config["contracts"] if c["type"] == "layers")
    assert layers["layers"] == ["serve | benchmarks", "models", "featurize", "lesionlab"]
    acyclic = next(c for c in config["contracts"] if c["type"] == "acyclic_siblings")
    assert set(acyclic["ancestors"]) == set(config["root_packages"])


def test_import_contracts_are_kept() -> None:
    tool = lint_imports()
    assert tool is not None, "import-linter is not installed: the layering is not checked"
    res = subprocess.run([tool, str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "2 kept, 0 broken" in res.stdout


def test_no_function_over_60_lines() -> None:
    """The code style's limit: no function or method of the packages is longer than 60
    lines (decorators excluded, docstring included)."""
    import ast

    long = []
    for pkg in ("lesionlab", "featurize", "models", "serve", "benchmarks"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                        node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert long == []
