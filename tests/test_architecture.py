"""The package's shape, checked: parts import only parts below them, no import cycles (module-level,
``TYPE_CHECKING`` and in-function imports alike), and small files, functions and classes.

The parts and their order are drawn in ``docs/architecture.md``; a new module belongs to exactly
one of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "taps_cl"

# Low to high: a module may import its own part and the parts listed before it, never after.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("config", "errors", "registry", "bases", "images", "data")),
    ("method", ("taps",)),
    ("routing math", ("routing",)),
    ("training", ("training", "joint")),
    ("storage", ("storage",)),
    ("serving", ("serving",)),
    ("tracking", ("tracking",)),
    ("engine", ("engine",)),
    ("integrations", ("strategies", "scenarios")),
    ("cli", ("cli", "__main__", "")),  # "" = the package root (the public facade)
]
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_METHODS = 450, 60, 20


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        name = ".".join(("taps_cl", *path.relative_to(ROOT).with_suffix("").parts))
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every taps_cl module ``name`` imports, wherever the import statement stands."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    for rank, (_, parts) in enumerate(LAYERS):
        if part in parts:
            return rank
    raise AssertionError(f"{module} belongs to no part: add it to LAYERS and docs/architecture.md")


MODS = _modules()
EDGES = {name: _imports(name, path, MODS) for name, path in MODS.items()}


def test_every_module_has_a_part():
    for name in MODS:
        _layer(name)


def test_no_part_imports_a_higher_one():
    wrong = [
        f"{src} ({LAYERS[_layer(src)][0]}) imports {dst} ({LAYERS[_layer(dst)][0]})"
        for src, dsts in EDGES.items()
        for dst in dsts
        if _layer(dst) > _layer(src)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in EDGES[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                cycles.append(sorted([v, *comp]))

    for v in EDGES:
        if v not in index:
            visit(v)
    assert not cycles, cycles


BENCHMARKS = sorted((ROOT.parent / "benchmarks").glob("*.py"))  # research/ is kept as run


@pytest.mark.parametrize("path", [*(MODS[n] for n in sorted(MODS)), *BENCHMARKS], ids=str)
def test_small_files_functions_and_classes(path):
    text = path.read_text()
    assert text.count("\n") <= MAX_FILE_LINES, f"{path}: over {MAX_FILE_LINES} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name}: {length}"
        if isinstance(node, ast.ClassDef):
            defs = [b for b in node.body if isinstance(b, ast.FunctionDef | ast.AsyncFunctionDef)]
            assert len(defs) <= MAX_METHODS, f"{path}:{node.lineno} {node.name}: {len(defs)}"
