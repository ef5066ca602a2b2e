"""The package layout: no import cycle in ``experiments`` (module-level or inside
functions), every module imports alone in a fresh interpreter, and the library never
imports the experiment layer."""

import ast
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _modules(package: str) -> dict[str, str]:
    """``{dotted module name: file path}`` of a package."""
    out = {}
    base = os.path.join(ROOT, package)
    for dirpath, _, files in os.walk(base):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3]
                name = rel.replace(os.sep, ".").removesuffix(".__init__")
                out[name] = os.path.join(dirpath, f)
    return out


def _imports(path: str, module: str, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``path`` imports anywhere (functions included)."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n != module:
                found.add(n)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return stack[stack.index(v) :] + [v]
            if v not in state and (c := visit(v)):
                return c
        state[u] = "done"
        stack.pop()
        return None

    for u in sorted(graph):
        if u not in state and (c := visit(u)):
            return c
    return None


def test_experiments_has_no_import_cycle():
    mods = _modules("experiments")
    graph = {m: _imports(p, m, set(mods)) for m, p in mods.items()}
    # a package __init__ is imported by its submodules implicitly; it imports nothing here
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
    # the negative control: the walk does see a cycle when there is one
    graph["experiments.spec"] = graph["experiments.spec"] | {"experiments.train"}
    assert _cycle(graph) is not None


def test_the_library_never_imports_the_experiments():
    mods = _modules("deqjax")
    known = set(mods) | set(_modules("experiments"))
    bad = {
        m: sorted(i for i in _imports(p, m, known) if i.startswith("experiments"))
        for m, p in mods.items()
    }
    assert not {m: v for m, v in bad.items() if v}


@pytest.mark.parametrize("package", ["experiments", "deqjax"])
def test_every_module_imports_alone(package):
    names = sorted(m for m in _modules(package) if not m.endswith("__main__"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    failures = {}
    for chunk in range(0, len(names), 4):  # 4 fresh interpreters at a time
        procs = {
            m: subprocess.Popen(
                [sys.executable, "-c", f"import {m}"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for m in names[chunk : chunk + 4]
        }
        for m, p in procs.items():
            out = p.communicate(timeout=120)[0]
            if p.returncode:
                failures[m] = out[-1500:]
    assert not failures, failures
