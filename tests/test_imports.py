"""The package's import structure: every module imports on its own, and no two modules import
each other, directly or through others.

Every `import` statement counts, including those inside functions and under `TYPE_CHECKING`:
a cycle that only works because one side imports late is still two modules that each need the
other, and it breaks as soon as someone moves an import to the top. Importing a submodule runs
its package's `__init__` first; that parent-package step is not an edge (it is how packages
work), but importing a name *from* a package's `__init__` is.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The distribution's top-level packages; pyproject.toml maps passes/, runtime/ and models/ into
# the rwdeploy namespace, so they are found through the import system, not the folder tree.
ROOTS = ("rwdeploy", "rwdeploy.passes", "rwdeploy.runtime", "rwdeploy.models")


def package_modules() -> dict[str, Path]:
    """Every module of the package (name -> source file), found without importing any of them
    except the root package."""
    modules: dict[str, Path] = {}
    for root in ROOTS:
        folder = Path(importlib.util.find_spec(root).submodule_search_locations[0])
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            if any(not (folder.joinpath(*parts[:i], "__init__.py")).is_file() for i in range(1, len(parts))):
                continue  # a folder without __init__.py (data shipped beside the code)
            if rel.name != "__init__" and not (path.parent / "__init__.py").is_file():
                continue
            modules[".".join((root, *parts))] = path
    return modules


def _imported_names(name: str, path: Path) -> set[str]:
    """Dotted names that module `name` imports, anywhere in its file; `from a import b` gives
    `a.b` (a submodule or a name in `a`) and relative imports are resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (the deepest module each import names)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for dotted in _imported_names(name, path):
            while dotted and dotted not in modules:
                dotted = dotted.rpartition(".")[0]
            if dotted and dotted != name:
                targets.add(dotted)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_check_finds_a_cycle():
    """The check itself, on hand-made graphs: a three-module ring, and a chain without one."""
    ring = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(ring) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from rwdeploy.compile import x\n    from . import sibling\n")
    assert _imported_names("rwdeploy.pkg.mod", src) == {"rwdeploy.compile.x", "rwdeploy.pkg.sibling"}


def test_no_import_cycles():
    graph = import_graph(package_modules())
    assert len(graph) > 50  # the whole package was found
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


# Runs in one subprocess: loads the third-party libraries the package needs (what makes a
# fresh interpreter slow: torch, TVM, ...), checks that no module of the package is loaded, then
# forks one process per package module, which imports that module alone and exits. Each fork
# starts with none of the package imported, exactly as a fresh interpreter would.
_FORK_PER_MODULE = r"""
import importlib, os, sys, traceback
for library in ("torch", "numpy", "onnx", "onnxruntime", "tvm", "click", "rich", "yaml"):
    try:
        importlib.import_module(library)
    except ImportError:
        pass
loaded = [m for m in sys.modules if m == "rwdeploy" or m.startswith("rwdeploy.")]
assert not loaded, f"the parent must not import the package: {loaded}"
failed = 0
for name in sys.argv[1:]:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            print(f"{name}: {traceback.format_exc().strip().splitlines()[-1]}", flush=True)
            code = 1
        os._exit(code)
    failed += os.waitpid(pid, 0)[1] != 0
sys.exit(1 if failed else 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_every_module_imports_on_its_own():
    """One process per module: an import-order dependency (a module that works only when another
    was imported first) fails here, whichever order the test suite happens to use."""
    modules = sorted(m for m in package_modules() if not m.endswith("__main__"))  # __main__ runs the CLI
    proc = subprocess.run([sys.executable, "-c", _FORK_PER_MODULE, *modules], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
