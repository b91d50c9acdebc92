"""The layering DESIGN.md promises, read from the source: dependencies point one way
(jobs → pipelines → mplug), no import cycle between modules (module-level and function-level
imports alike), the model library free of Ray and torch.distributed, and the evaluator free of
any task's name (tasks say what they need through their interface)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mplug", "pipelines", "jobs")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # `from pipelines.tasks import task_class`: the module is pipelines.tasks
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package_of(module: str) -> str:
    """A package's `__init__` counts as the package; its modules, as themselves."""
    return module


def test_no_import_cycle_between_modules() -> None:
    assert _cycles(_graph()) == []


def test_dependencies_point_one_way() -> None:
    graph = _graph()
    rank = {"mplug": 0, "pipelines": 1, "jobs": 2}
    upward = [
        (a, b)
        for a, targets in graph.items()
        for b in targets
        if rank[b.split(".")[0]] > rank[a.split(".")[0]]
    ]
    assert upward == []


def test_the_model_library_imports_neither_ray_nor_torch_distributed() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(i for i in _imports(p) if i.split(".")[0] == "ray" or i.startswith("torch.distributed"))
        for p in (ROOT / "mplug").rglob("*.py")
    }  # fmt: skip
    assert {k: v for k, v in offenders.items() if v} == {}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of a module and its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def test_the_evaluator_names_no_task() -> None:
    """No string in pipelines/eval/'s code is a task's name (its docstrings may show examples)."""
    from pipelines.tasks import TASKS

    hits = {}
    for path in (ROOT / "pipelines" / "eval").rglob("*.py"):
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree)
        names = [
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant)
            and isinstance(n.value, str)
            and n.value in TASKS
            and id(n) not in skip
        ]
        if names:
            hits[str(path.relative_to(ROOT))] = names
    assert hits == {}
