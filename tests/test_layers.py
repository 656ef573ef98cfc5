"""The layering of src/md4: imports point one way (no module imports one that imports it)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the md4 package (a package is its __init__)."""
    found = {}
    for path in (src / "md4").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the md4 modules it imports anywhere in its text (top level and inside functions).

    `from md4.a import b` is an edge to md4.a.b when that is a module, else to md4.a; relative
    imports are resolved against the module's package."""
    mods = modules(src)

    def owner(name: str) -> str | None:  # the longest module prefix of a dotted name
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(owner(a.name) for a in node.names if a.name.split(".")[0] == "md4")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if base.split(".")[0] == "md4":
                    edges.update(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else owner(base)
                                 for a in node.names)
        graph[name] = edges - {name, None}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def test_cycle_finder_finds_a_function_level_cycle(tmp_path):
    pkg = tmp_path / "md4"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from md4 import b\n")
    (pkg / "b.py").write_text("def f():\n    from md4.sub.c import g\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..a import x\n")
    (pkg / "d.py").write_text("import md4.a\n")
    graph = import_graph(tmp_path)
    assert graph["md4.b"] == {"md4.sub.c"} and graph["md4.sub.c"] == {"md4.a"} and graph["md4.d"] == {"md4.a"}
    assert cycles(graph) == [["md4.a", "md4.b", "md4.sub.c"]]


def test_src_md4_has_no_import_cycle():
    graph = import_graph()
    assert "md4.diffusion" in graph and "md4.nn.transformer" in graph
    assert cycles(graph) == []
