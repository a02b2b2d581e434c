"""The library's import graph: no cycle, and no module name at two levels of one package path.

How imports are counted: every ``import`` statement in a module's source, at module level or inside a function (the
library imports heavy modules lazily, and a lazy cycle is still a tangle). An edge goes to the module the statement
names: ``from a.b import c`` points at ``a.b.c`` when that is a module, else at ``a.b`` (its ``__init__``). The parent
packages that Python runs first (``a`` and ``a.b`` for ``import a.b.c``) are not edges: a package whose ``__init__``
imports its own submodules would otherwise count as a cycle of every submodule with its package.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "platform" / "lm_lexicon"


def modules_of(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for a package directory and everything under it."""
    root = package_dir.parent
    names = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (see the module docstring for what counts)."""
    modules = modules_of(package_dir)
    top = package_dir.name

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names if a.name.split(".")[0] == top]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] != top:
                    continue
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else known(base) for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
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
                    work.append((child, iter(sorted(graph[child]))))
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


def test_the_library_has_no_import_cycle():
    graph = import_graph(LIBRARY)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the walk found the library and its imports
    assert cycles(graph) == []


def test_the_cycle_check_sees_lazy_and_package_level_cycles(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from toy.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from toy import a  # lazy, still a cycle\n")
    (pkg / "sub" / "__init__.py").write_text("from toy.sub.leaf import VALUE\n")
    (pkg / "sub" / "leaf.py").write_text("VALUE = 1\n")  # the package importing its own module: no cycle
    (pkg / "sub" / "user.py").write_text("from .leaf import VALUE\nfrom toy.sub import VALUE as V\n")
    graph = import_graph(pkg)
    assert graph["toy.sub.user"] == {"toy.sub.leaf", "toy.sub"}
    assert cycles(graph) == [["toy.a", "toy.b"]]
    (pkg / "sub" / "leaf.py").write_text("from toy.sub import user\nVALUE = 1\n")
    assert sorted(cycles(import_graph(pkg))) == [["toy.a", "toy.b"], ["toy.sub", "toy.sub.leaf", "toy.sub.user"]]


def test_no_module_name_is_also_a_name_in_an_enclosing_package():
    """e.g. not ``partition.py`` beside ``stages/partition.py``, nor ``config.py`` beside ``serving/config.py``.
    Siblings may share a name (every stage package has its ``stage.py``)."""
    clashes = []
    for name in modules_of(LIBRARY):
        parts = name.split(".")
        for depth in range(1, len(parts) - 1):
            enclosing = LIBRARY.parent.joinpath(*parts[:depth])
            own = parts[-1]
            if (enclosing / f"{own}.py").exists() or (enclosing / own / "__init__.py").exists():
                clashes.append(f"{name} vs {'.'.join(parts[:depth])}.{own}")
    assert clashes == [], clashes
