"""The package's imports flow one way: each layer imports only from the layers below it, no module
imports another module's private names, and no import circle exists (lazy imports count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "nuclick_wsi"

#: top to bottom; a module may import from its own layer's other subpackages and from any layer below
LAYERS = [
    ["cli"],
    ["workflows"],
    ["training"],
    ["evaluation"],
    ["pipeline", "proposals"],  # proposals: the propose command's top level, beside segment's
    ["engine", "detection"],  # detection: the proposal detector over slides, an engine like the prompt runs
    ["guidance", "postprocess", "store", "outputs", "qc"],
    ["model"],
    ["io"],
    ["records", "errors", "_util", ""],  # "": the package's __init__ (its version)
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) of every nuclick_wsi import in a file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    mod = module_name(path)
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "nuclick_wsi":
                out.append((target, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "nuclick_wsi"]
    return out


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(target: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """The modules an import statement loads (``from pkg import mod`` loads ``pkg.mod``)."""
    out = [target]
    out += [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return [m for m in out if m in known]


def test_every_subpackage_has_a_layer():
    missing = {layer_of(m) for m in all_modules()} - set(RANK)
    assert not missing, f"subpackages without a layer in tests/test_layering.py: {sorted(missing)}"


def test_no_upward_imports():
    bad = []
    for mod, path in all_modules().items():
        here = RANK[layer_of(mod)]
        for target, _, line in imports(path):
            there = RANK.get(layer_of(target))
            if there is not None and there < here:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {mod} imports {target} (a higher layer)")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for mod, path in all_modules().items():
        for target, names, line in imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != mod:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {', '.join(private)} from {target}")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    known = all_modules()
    graph = {m: set() for m in known}
    for mod, path in known.items():
        for target, names, _ in imports(path):
            for dep in resolve(target, names, known):
                if dep != mod and not mod.startswith(dep + "."):  # a module's own package __init__ is no circle
                    graph[mod].add(dep)
    # Tarjan's strongly connected components
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v, counter=[0]):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("source, expect", [
    ("from nuclick_wsi.cli.main import main\n", "upward"),
    ("from nuclick_wsi.io.slides.base import _secret\n", "private"),
])
def test_the_checks_catch_a_bad_import(tmp_path, monkeypatch, source, expect):
    """The checks above can fail: a model module importing the CLI, or a private name."""
    probe = PACKAGE / "model" / "_layering_probe.py"
    probe.write_text(source)
    try:
        check = test_no_upward_imports if expect == "upward" else test_no_private_names_across_modules
        with pytest.raises(AssertionError, match="_layering_probe"):
            check()
    finally:
        probe.unlink()
