"""The layout rules the code must keep: dependencies point one way (no module imports another that imports it
back), imports sit at the top of each file, functions stay small (radon complexity C at most in the package, D in
the benchmarks), and exactly one module patches PEFT."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "peft_softprompt_ext"
radon_complexity = pytest.importorskip("radon.complexity")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool, modules: set[str]) -> list[str]:
    """The package modules an import statement reaches: `from pkg import sub` reaches pkg.sub (a module), `from
    pkg import name` reaches pkg itself."""
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
    subs = [f"{target}.{alias.name}" for alias in node.names]
    return [s for s in subs if s in modules] + ([target] if any(s not in modules for s in subs) else [])


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(module, node, path.name == "__init__.py", set(modules))
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[module] |= {t for t in targets if t in modules and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_another_that_imports_it_back():
    graph = import_graph()
    # the package __init__ wires everything together; nothing inside may import it back
    importers = sorted(m for m, targets in graph.items() if "peft_softprompt_ext" in targets)
    assert importers == [], f"modules importing the package root: {importers}"
    assert cycles(graph) == []


def test_imports_sit_at_the_top_of_every_file():
    inside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                inside += [
                    f"{path.relative_to(REPO)}:{inner.lineno}"
                    for inner in ast.walk(node)
                    if isinstance(inner, ast.Import | ast.ImportFrom)
                ]
    assert inside == [], f"imports inside functions: {inside}"


def _too_complex(root: Path, worst: str) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for block in radon_complexity.cc_visit(path.read_text()):
            rank = radon_complexity.cc_rank(block.complexity)
            if rank > worst:
                found.append(f"{path.relative_to(REPO)}:{block.lineno} {block.name} {rank} ({block.complexity})")
    return found


def test_no_function_in_the_package_is_above_complexity_c():
    assert _too_complex(PACKAGE, "C") == []


def test_no_function_in_the_benchmarks_is_above_complexity_d():
    assert _too_complex(REPO / "benchmarks", "D") == []


def test_exactly_one_module_patches_peft():
    """Only _peft_patch assigns into PEFT's classes and mappings (subclass hooks live in the tuner)."""
    patching = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        if any(
            marker in source
            for marker in ("PeftModel.__new__ =", "PeftModel.from_pretrained =", "register_peft_method(")
        ):
            patching.append(path.name)
    assert patching == ["_peft_patch.py"]
