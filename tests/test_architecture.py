"""The layer rules of docs/architecture.md, read from every module's imports (ast): no import cycle,
no import from a lower layer into a higher one, and Flower only in simlab/federated and simlab/engine."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "simlab"
FLOWER_ROOMS = ("simlab.federated", "simlab.engine")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (lazy imports count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def simlab_imports(path: Path) -> set[str]:
    """The simlab modules ``path`` imports (names resolved to modules that exist)."""
    return {m for m in imports_of(path) if m in MODULES and m != module_name(path)}


def layers() -> list[list[str]]:
    """The layer table of docs/architecture.md, bottom first: one line per layer, ``name: prefixes``."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- layers -->\s*```text\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no layer table (a ```text block after <!-- layers -->)"
    rows = [line.split(":", 1)[1].split() for line in block.group(1).strip().splitlines()]
    return list(reversed(rows))  # the document lists the top layer first


def layer_of(module: str, table: list[list[str]]) -> int:
    best, level = -1, None
    for i, prefixes in enumerate(table):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is in no layer of docs/architecture.md"
    return level


def test_every_module_has_a_layer():
    table = layers()
    for m in MODULES:
        layer_of(m, table)


def test_no_import_goes_up_a_layer():
    table = layers()
    bad = [f"{m} (layer {layer_of(m, table)}) imports {d} (layer {layer_of(d, table)})"
           for m, p in MODULES.items() for d in sorted(simlab_imports(p)) if layer_of(d, table) > layer_of(m, table)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {d for d in simlab_imports(p) if not (m.startswith(d + ".") and MODULES[d].name == "__init__.py")}
             for m, p in MODULES.items()}
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state[d] == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif state[d] == 0:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if state[m] == 0:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_only_federated_and_engine_import_flower():
    offenders = [m for m, p in MODULES.items() if not m.startswith(FLOWER_ROOMS)
                 and any(i == "flwr" or i.startswith("flwr.") for i in imports_of(p))]
    assert not offenders, f"modules outside {FLOWER_ROOMS} import flwr: {offenders}"


def test_no_core_module_pulls_in_flower_at_run_time():
    """Transitively too: importing every module outside the Flower rooms loads no flwr module."""
    core = [m for m in MODULES if not m.startswith(FLOWER_ROOMS)]
    code = (f"import importlib, sys\nfor m in {core!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("limit_lines, limit_function", [(500, 60)])
def test_files_and_functions_fit_on_a_screen(limit_lines, limit_function):
    long_files = [f"{m}: {len(p.read_text().splitlines())} lines" for m, p in MODULES.items()
                  if len(p.read_text().splitlines()) > limit_lines]
    long_functions = []
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit_function:
                    long_functions.append(f"{m}.{node.name}: {n} lines")
    assert not long_files and not long_functions, "\n".join(long_files + long_functions)
