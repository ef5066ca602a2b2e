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


# Each module is imported with none of deqjax's or experiments' modules loaded before it
# (so it cannot lean on an import another module happened to run first), in ONE
# interpreter: the third-party packages (jax, flax, …) stay loaded between modules,
# which saves a JAX start-up per module.
ALONE = """
import importlib, sys, traceback
names = sys.argv[1:]
for m in names:  # load every third-party dependency once
    importlib.import_module(m)
failures = {}
for m in names:
    for k in [k for k in sys.modules if k.split(".")[0] in ("deqjax", "experiments")]:
        del sys.modules[k]
    try:
        importlib.import_module(m)
    except Exception:
        failures[m] = traceback.format_exc()[-1500:]
    if not (m in sys.modules and sum(k.split(".")[0] in ("deqjax", "experiments")
                                    for k in sys.modules) >= 1):
        failures.setdefault(m, "not imported")
print(repr(failures))
"""


@pytest.mark.parametrize("package", ["experiments", "deqjax"])
def test_every_module_imports_alone(package):
    names = sorted(m for m in _modules(package) if not m.endswith("__main__"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", ALONE, *names],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "{}", out.stdout[-3000:]


def test_import_alone_check_catches_a_module_that_leans_on_another(tmp_path):
    """The negative control: a module that works only if another was imported first."""
    pkg = tmp_path / "deqjax_probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import sys\nsys.modules[__package__].flag = 1\n")
    (pkg / "b.py").write_text("import sys\nassert hasattr(sys.modules[__package__], 'flag')\n")
    script = ALONE.replace('("deqjax", "experiments")', '("deqjax_probe_pkg",)')
    names = ["deqjax_probe_pkg.a", "deqjax_probe_pkg.b"]
    out = subprocess.run(
        [sys.executable, "-c", script, *names],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert "deqjax_probe_pkg.b" in last and "deqjax_probe_pkg.a" not in last, last


def test_a_missing_torch_peer_fails_under_ci_and_skips_elsewhere(monkeypatch):
    """The torch cross-checks (tests/test_crosscheck.py, test_benchmarks.py, the FAB
    reference check) import their peers through ``import_or_skip``: a skip on a
    developer machine without them, a failure under ``CI=true`` (CI installs them)."""
    from tests.helpers import import_or_skip

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but 'deqjax_no_such_peer'"):
        import_or_skip("deqjax_no_such_peer")
    assert import_or_skip("json").__name__ == "json"
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        import_or_skip("deqjax_no_such_peer")
