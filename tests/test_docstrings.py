"""Public docstrings say array shapes and what they raise (an AST check, nothing imported).

Every public function or method (its name and its class's name not starting with ``_``;
functions nested in functions are left out) of the project's packages:
- whose signature or return annotation names an array type (``np.ndarray``, ``NDArray``,
  ``torch.Tensor``, ``pd.DataFrame``, ``pd.Series`` or an ``ArrayLike`` alias) has a docstring
  giving a shape, such as ``(n_images, n_classes)``, ``(n,)`` or ``(H, W, 3)``;
- whose body holds a ``raise`` statement (not counting nested functions and classes) has a
  docstring with a ``Raises:`` section.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("lesionlab", "featurize", "models", "serve", "benchmarks")
ARRAY_TYPES = re.compile(r"\b(ndarray|NDArray|Tensor|DataFrame|Series|ArrayLike)\b")
# A shape in parentheses: its first axis is an n_/N count, a batch, a height, or a number.
SHAPE = re.compile(r"\(\s*(?:n\b|n_\w+|N\b|B\b|H\b|batch\w*|height\b|\d+\s*[,x])")
RAISES = re.compile(r"^\s*Raises:\s*$", re.MULTILINE)
Function = ast.FunctionDef | ast.AsyncFunctionDef


def _public_functions(tree: ast.Module) -> list[tuple[str, Function]]:
    """Module-level functions and methods of public classes (nested classes included)."""
    found: list[tuple[str, Function]] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, Function) and not node.name.startswith("_"):
                found.append((prefix + node.name, node))
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, "")
    return found


def _raises(function: Function) -> bool:
    """Whether the function's own body (not a nested function or class) has a ``raise``."""
    stack: list[ast.AST] = list(function.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Raise):
            return True
        if isinstance(node, Function | ast.ClassDef | ast.Lambda):
            continue
        stack.extend(ast.iter_child_nodes(node))
    return False


def _annotations(function: Function) -> str:
    """The source text of every parameter and return annotation."""
    args = function.args
    params = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
    nodes = [p.annotation for p in params if p is not None and p.annotation is not None]
    if function.returns is not None:
        nodes.append(function.returns)
    return " ".join(ast.unparse(node) for node in nodes)


def violations(source: str, name: str = "<source>") -> list[str]:
    """``name:line function: what is missing`` for every public function failing the rules."""
    found = []
    for qualname, function in _public_functions(ast.parse(source)):
        doc = ast.get_docstring(function) or ""
        where = f"{name}:{function.lineno} {qualname}"
        if ARRAY_TYPES.search(_annotations(function)) and not SHAPE.search(doc):
            found.append(f"{where}: takes or returns arrays, docstring gives no shape")
        if _raises(function) and not RAISES.search(doc):
            found.append(f"{where}: raises, docstring has no Raises: section")
    return found


def module_files() -> list[Path]:
    """Every ``.py`` file of the project's packages."""
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_every_public_docstring_gives_shapes_and_raises() -> None:
    found = [v for path in module_files()
             for v in violations(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, f"{len(found)} docstrings to fix:\n" + "\n".join(found)


def test_the_packages_are_scanned() -> None:
    files = {str(p.relative_to(ROOT)) for p in module_files()}
    assert {"lesionlab/metrics.py", "models/folder.py", "serve/app.py",
            "benchmarks/run_all.py", "featurize/extract.py"} <= files
    functions = sum(len(_public_functions(ast.parse(p.read_text()))) for p in module_files())
    assert functions > 200


GOOD = '''
import numpy as np

def score(proba: np.ndarray) -> float:
    """Mean top probability.

    Args:
        proba: (n_images, n_classes) probabilities.

    Raises:
        ValueError: if proba is empty.
    """
    if proba.size == 0:
        raise ValueError("empty")
    return float(proba.max(axis=1).mean())

def _private(x: np.ndarray) -> None:
    raise ValueError

def outer() -> int:
    """No raise of its own: the nested function's raise is the nested function's."""
    def inner() -> None:
        raise ValueError
    return 1

class _Hidden:
    def run(self, x: np.ndarray) -> None:
        raise ValueError
'''

NO_SHAPE = '''
import numpy as np

def score(proba: np.ndarray) -> float:
    """Mean top probability of proba."""
    return float(proba.max(axis=1).mean())
'''

PARENTHESES_ARE_NOT_A_SHAPE = '''
import numpy as np

def score(proba: np.ndarray) -> float:
    """Mean top probability (Guo et al. (2017)), of (numbers) (2) like (none_of_them)."""
    return float(proba.max(axis=1).mean())
'''

NO_SHAPE_RETURN = '''
import pandas as pd

class Table:
    def frame(self) -> pd.DataFrame:
        """The table."""
        return pd.DataFrame()
'''

NO_RAISES = '''
def check(x: int) -> int:
    """Check x.

    Args:
        x: a count.
    """
    if x < 0:
        raise ValueError("negative")
    return x
'''

RAISE_IN_BRANCH_NO_DOC = '''
import torch

async def step(batch: "torch.Tensor") -> None:
    for row in batch:
        with open("f") as handle:
            if row is None:
                raise RuntimeError("bad")
'''


def test_a_good_module_passes() -> None:
    assert violations(GOOD) == []


@pytest.mark.parametrize(("source", "expected"), [
    (NO_SHAPE, ["<source>:4 score: takes or returns arrays, docstring gives no shape"]),
    (PARENTHESES_ARE_NOT_A_SHAPE,
     ["<source>:4 score: takes or returns arrays, docstring gives no shape"]),
    (NO_SHAPE_RETURN,
     ["<source>:5 Table.frame: takes or returns arrays, docstring gives no shape"]),
    (NO_RAISES, ["<source>:2 check: raises, docstring has no Raises: section"]),
    (RAISE_IN_BRANCH_NO_DOC,
     ["<source>:4 step: takes or returns arrays, docstring gives no shape",
      "<source>:4 step: raises, docstring has no Raises: section"]),
])
def test_a_planted_bad_docstring_is_caught(source: str, expected: list[str]) -> None:
    assert violations(source) == expected
