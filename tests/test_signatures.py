"""Typed public signatures in the analysis-facing modules: every parameter is annotated, a
`model` is a `HookedMoETransformer` and a `cache` an `ActivationCache` (each possibly in a union),
and every public function and method declares what it returns."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moe_hooked"
MODULES = sorted(
    {*PACKAGE.glob("viz/*.py"), *PACKAGE.glob("analysis/*.py"), *PACKAGE.glob("report*.py"),
     *(PACKAGE / f"{name}.py" for name in ("lens", "interventions", "attribution", "generation", "cache", "corpus"))}
)
REQUIRED = {"model": "HookedMoETransformer", "cache": "ActivationCache"}


def public_functions(tree: ast.Module, prefix: str = ""):
    """(qualified name, node) of the public functions of a module and the methods of its public classes."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            yield from public_functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.FunctionDef) and (not node.name.startswith("_") or node.name == "__init__"):
            yield prefix + node.name, node


def signature_problems(node: ast.FunctionDef) -> list[str]:
    problems = []
    for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
        annotation = ast.unparse(arg.annotation) if arg.annotation else ""
        if arg.arg in ("self", "cls"):
            continue
        if not annotation:
            problems.append(f"{arg.arg} is not annotated")
        elif arg.arg in REQUIRED and REQUIRED[arg.arg] not in annotation:
            problems.append(f"{arg.arg}: {annotation} (expected {REQUIRED[arg.arg]})")
    if node.returns is None and node.name != "__init__":
        problems.append("no return annotation")
    return problems


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_public_signatures_are_typed(path):
    tree = ast.parse(path.read_text())
    problems = [f"{name}: {problem}" for name, node in public_functions(tree) for problem in signature_problems(node)]
    assert problems == []


def test_the_check_sees_an_untyped_model():
    tree = ast.parse("def f(model, cache: dict, n: int = 1): pass\nclass A:\n    def g(self, cache) -> None: pass")
    problems = {name: signature_problems(node) for name, node in public_functions(tree)}
    assert problems == {"f": ["model is not annotated", "cache: dict (expected ActivationCache)", "no return annotation"],
                        "A.g": ["cache is not annotated"]}
