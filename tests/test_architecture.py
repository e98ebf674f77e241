"""The import graph, read statically: no cycles (function-level imports included), the core never
imports the applications, the diffusion application's layers import only downwards, and nothing in
the repository imports a deprecated alias module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("constrained_opt", "benchmarks")

# The diffusion application's layers, lowest first: a module may import its own layer or lower ones.
# Names are module paths under constrained_opt.diffusion; a package entry covers its submodules.
LAYERS = (
    ("runtime",),
    (
        "models",
        "data",
        "sampling",
        "losses",
        "train",
        "sd.model",
        "sd.loading",
        "sd.lora",
        "sd.latents",
        "sd.prompts",
        "sd.params",
        "sd.job",
    ),
    ("evaluation", "sd.evaluate"),
    ("methods", "sd.methods", "sd.robust"),
    ("attacks",),
    ("jobs",),
    ("cli",),
)


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


FILES = module_files()


def is_alias(path: Path) -> bool:
    """A deprecated alias module: it warns with DeprecationWarning when imported."""
    tree = ast.parse(path.read_text())
    return any(
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and "DeprecationWarning" in ast.unparse(node.value)
        for node in tree.body
    )


def imports_of(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (module level, functions, methods)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in FILES else origin for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in FILES and t != name)
    return out


GRAPH = {name: imports_of(name, path) for name, path in FILES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
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


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import os\n\ndef f():\n    from . import b\n")
    b.write_text("from .a import f\n")
    files = {"pkg.a": a, "pkg.b": b}
    saved = dict(FILES)
    FILES.update(files)
    try:
        graph = {name: imports_of(name, path) for name, path in files.items()}
    finally:
        FILES.clear()
        FILES.update(saved)
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_the_core_imports_no_application():
    core = {
        n for n in GRAPH if n.startswith("constrained_opt") and not n.startswith("constrained_opt.diffusion")
    }
    shim = {"constrained_opt.cli"}  # the console entry point hands over to constrained_opt.diffusion.cli
    bad = {
        (n, m)
        for n in core - shim
        for m in GRAPH[n]
        if m.startswith(("constrained_opt.diffusion", "benchmarks"))
    }
    assert bad == set()


def layer_of(name: str) -> int | None:
    prefix = "constrained_opt.diffusion."
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix) :]
    for rank, members in enumerate(LAYERS):
        if any(rest == m or rest.startswith(m + ".") for m in members):
            return rank
    return None


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if layer_of(n) is not None))
def test_diffusion_layers_import_only_downwards(name):
    if is_alias(FILES[name]):
        pytest.skip("deprecated alias module")
    upward = {m for m in GRAPH[name] if (layer_of(m) or 0) > layer_of(name)}
    assert upward == set(), f"{name} (layer {layer_of(name)}) imports a higher layer: {sorted(upward)}"


def test_every_diffusion_module_has_a_layer():
    prefix = "constrained_opt.diffusion."
    unplaced = [
        n
        for n in GRAPH
        if n.startswith(prefix)
        and layer_of(n) is None
        and n.count(".") > 1
        and not is_alias(FILES[n])
        and FILES[n].name != "__init__.py"
    ]
    assert unplaced == []


def test_nothing_imports_a_deprecated_alias():
    aliases = {n for n, path in FILES.items() if is_alias(path)}
    users = {(n, m) for n, targets in GRAPH.items() if n not in aliases for m in targets & aliases}
    test_users = set()
    for path in (ROOT / "tests").rglob("*.py"):
        if "alias" in path.name or "shim" in path.name:
            continue  # the tests that check the aliases warn and re-export
        text = path.read_text()
        test_users |= {(path.name, a) for a in aliases if f"import {a}" in text or f"from {a} import" in text}
    assert users == set() and test_users == set()
