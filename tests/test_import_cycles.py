"""No import circle inside the package: module A importing B (at the top or inside a function) while B,
directly or through others, imports A. Read from the source with `ast`, so a circle that a lazy import
inside a function hides from Python (as TreeLoRA's two forms once had) is caught too."""
import ast
import os

PACKAGE = "jaxtree_lora"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def modules() -> dict:
    """module name -> its file, for every module of the package."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for file in files:
            if file.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, file), os.path.dirname(ROOT))[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = os.path.join(folder, file)
    return found


def imports(name: str, path: str, known: dict) -> set:
    """The package's modules that `name` imports anywhere in its source (relative imports resolved;
    `from package import module` names the module, `from module import name` the module)."""
    is_package = path.endswith("__init__.py")
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out.update(target for target in targets if target in known and target != name)
    return out


def cycles(graph: dict) -> list:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def graph_of(known: dict) -> dict:
    return {name: imports(name, path, known) for name, path in known.items()}


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]], "a three-module circle went unseen (the test below would prove nothing)"
    assert cycles({"a": {"b"}, "b": set()}) == [], "a one-way import was taken for a circle"


def test_lazy_imports_are_read():
    known = modules()
    assert "jaxtree_lora.methods.treelora_hide" in imports(
        "jaxtree_lora.methods.treelora", known["jaxtree_lora.methods.treelora"], known), \
        "the reader misses a from-import of a sibling module"


def test_no_import_circle_in_the_package():
    found = cycles(graph_of(modules()))
    assert not found, "import circles (modules that import each other, maybe through others): " + "; ".join(
        " <-> ".join(group) for group in found)
