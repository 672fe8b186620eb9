"""The package's modules import in floors: no module imports, even lazily inside a function, one
that imports it back (DESIGN.md: a file only imports from floors below it)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kervljepa_jax"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules `path` imports anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kervljepa_jax"):
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kervljepa_jax")}
    return {m for m in found if m in modules}


def import_cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    cycles = set()

    def walk(node, stack):
        for nxt in graph.get(node, ()):
            if nxt in stack:
                cycle = tuple(stack[stack.index(nxt):])
                first = cycle.index(min(cycle))
                cycles.add(cycle[first:] + cycle[:first])
            elif len(stack) < 12:
                walk(nxt, stack + [nxt])

    for start in graph:
        walk(start, [start])
    return cycles


def test_the_finder_finds_a_planted_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}


def test_no_import_circles():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    # A package's __init__ importing its own submodules is not a circle of the code's floors.
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    assert import_cycles(graph) == set()


def test_every_module_imports_beside_every_other():
    """One process may import every module (a notebook, a test run): no two define the same absl
    flag at import time (the CLIs' own flags are defined when they run)."""
    import subprocess
    import sys
    names = sorted(m for m in _modules() if not m.startswith("kervljepa_jax.configs"))
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % names
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
