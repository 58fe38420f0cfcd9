"""The package's layering, read from the source: every module imports on its own in a fresh
interpreter, the pipeline's modules import each other without a circle (function-level imports
included, since a late import only hides a circle), and memory_plan depends on no other pipeline
module."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKEND = ROOT / "backend"
PIPELINE = BACKEND / "dreamflow" / "pipeline"


def _module_name(path: Path) -> str:
    rel = path.relative_to(BACKEND).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every dreamflow module ``path`` imports, at any depth of its code (absolute names)."""
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dreamflow"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("dreamflow"):
                continue
            found.add(target)
            # ``from . import x`` / ``from .pkg import mod`` name modules too.
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def pipeline_graph() -> dict[str, set[str]]:
    """Module -> the pipeline modules it imports."""
    modules = {_module_name(p): p for p in PIPELINE.glob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a list of modules (first = last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_pipeline_modules_import_each_other_without_a_circle():
    graph = pipeline_graph()
    assert "dreamflow.pipeline.job" in graph and graph["dreamflow.pipeline.job"]  # the graph was read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_memory_plan_depends_on_nothing_in_the_pipeline():
    assert pipeline_graph()["dreamflow.pipeline.memory_plan"] == set()


def test_every_module_imports_in_a_fresh_interpreter():
    """All of the backend's modules, each imported by name in one new process (nothing preloaded
    by the suite), so that a module that only imports after some other one fails here."""
    names = sorted(_module_name(p) for p in (BACKEND / "dreamflow").rglob("*.py") if p.name != "__main__.py")
    script = ("import importlib, sys, traceback\n"
              "bad = []\n"
              "for name in sys.argv[1:]:\n"
              "    try:\n"
              "        importlib.import_module(name)\n"
              "    except Exception as exc:\n"
              "        bad.append(f'{name}: {type(exc).__name__}: {exc}')\n"
              "print('\\n'.join(bad))\n"
              "sys.exit(1 if bad else 0)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BACKEND), str(ROOT / "shared")])}
    r = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(names) > 50
