"""The package's house rules, read from the source with ``ast``: no import cycles between modules
(imports inside functions count), and no module imports another module's private names (a
package's own private module, such as ``analysis/_common.py``, is where shared helpers go)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mechtests"


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = p
    return out


def _imports(mod: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module, names imported from it) for every import in ``mod``."""
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [a.name for a in node.names]
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in mods]
            out += [(s, []) for s in subs] + [(base, [n for n in names
                                                     if f"{base}.{n}" not in mods])]
    return out


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for target, _ in _imports(m, p, mods):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != m and not m.startswith(target + "."):
                graph[m].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(_graph(_modules(PACKAGE))) == []


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "mechtests"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from mechtests.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from mechtests.sub.a import x\n")
    (pkg / "c.py").write_text("import mechtests.sub.a\n")
    assert _cycles(_graph(_modules(pkg))) == [["mechtests.sub.a", "mechtests.sub.b"]]


@pytest.mark.parametrize("mod", sorted(_modules(PACKAGE)))
def test_no_module_imports_another_modules_private_names(mod):
    mods = _modules(PACKAGE)
    bad = [f"{target}.{n}" for target, names in _imports(mod, mods[mod], mods)
           if target.startswith("mechtests") and target != mod
           and not target.rpartition(".")[2].startswith("_")  # a package's private module
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert bad == [], f"{mod} imports private names of other modules: {bad}"
