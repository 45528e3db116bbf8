"""The package's layers (docs/ARCHITECTURE.md, "Layers"): every import of a jaxtree_lora module, at
module level or inside a function, goes to the same or a lower layer, and no modules import each
other in a circle. Read from the source with `ast`, nothing is imported."""
from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxtree_lora"

# Lowest first. A module belongs to the layer of the longest prefix listed here; an import may go to
# its own layer or below. Written once: docs/ARCHITECTURE.md draws the same list.
LAYERS = (
    ("foundation", ("errors", "faults", "keys", "threefry", "ledger", "assets", "config", "checkpoint",
                    "atomic")),
    ("models", ("models",)),
    ("lora", ("lora",)),
    ("tree", ("tree",)),
    ("task metrics", ("evaluation.task_metrics",)),  # pure string scoring: data/files.py checks metric names
    ("data", ("data",)),
    ("methods", ("methods",)),
    ("assemble", ("assemble",)),
    ("evaluation", ("evaluation",)),
    ("reporting", ("reporting",)),
    ("train", ("train",)),
    ("export", ("export",)),
    ("cli", ("cli", "__main__", "")),  # "": the package's own __init__
)

# Circles still in the package, each to be dissolved: the test fails on any other circle, and once one
# of these is gone, so that its entry is removed with it. None today.
KNOWN_CIRCLES = ()


def module_files() -> dict[str, pathlib.Path]:
    """{dotted module name: file} for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("jaxtree_lora",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The package modules `name` imports anywhere in its file (a `from X import y` names module X.y
    where that is a module, else X)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != "jaxtree_lora":
                continue
            while target not in modules:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target != name:
                found.add(target)
    return found


def layer_of(name: str) -> int:
    """Index into LAYERS of a dotted module name (longest listed prefix wins)."""
    relative = name.partition(".")[2]
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = relative == prefix or (prefix and relative.startswith(prefix + "."))
            if matches and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"{name} is in no layer: add it to LAYERS (and to docs/ARCHITECTURE.md)"
    return best


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of `graph` that goes to a higher layer, as a line naming both ends and layers."""
    return sorted(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                  for name, targets in graph.items() for target in targets if layer_of(target) > layer_of(name))


def circles(graph: dict[str, set[str]]) -> list[str]:
    """The import circles a depth-first walk of `graph` meets, each as "a -> b -> a"."""
    found, state = [], {}  # state: 1 on the current path, 2 finished

    def visit(name, path):
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                found.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def test_no_module_imports_from_a_higher_layer():
    upward = upward_imports(import_graph())
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_import_circle_inside_the_package():
    found = circles(import_graph())
    new = [circle for circle in found if circle not in KNOWN_CIRCLES]
    assert not new, "modules that import each other in a circle:\n" + "\n".join(new)
    gone = [circle for circle in KNOWN_CIRCLES if circle not in found]
    assert not gone, "no longer a circle, remove it from KNOWN_CIRCLES (and docs/ARCHITECTURE.md):\n" + "\n".join(gone)


def test_the_checks_catch_what_they_are_for():
    """On the real parse and on made-up graphs, so a parser that found no imports, or checks that
    flagged nothing, could not pass the two tests above."""
    graph = import_graph()
    assert {"jaxtree_lora.train.step", "jaxtree_lora.keys"} <= graph["jaxtree_lora.train.loop"], \
        "the parser missed the loop's imports"
    assert "jaxtree_lora.tree.bandit" in graph["jaxtree_lora.methods.treelora_llm"], \
        "`from jaxtree_lora.tree import bandit` was not read as the module tree.bandit"
    assert layer_of("jaxtree_lora.evaluation.task_metrics") < layer_of("jaxtree_lora.data.files") < \
        layer_of("jaxtree_lora.evaluation.evaluator"), "task_metrics is not carved out of evaluation"
    assert upward_imports({"jaxtree_lora.methods.loda": {"jaxtree_lora.train.step"}}) == [
        "jaxtree_lora.methods.loda (methods) imports jaxtree_lora.train.step (train)"]
    assert upward_imports({"jaxtree_lora.train.step": {"jaxtree_lora.methods.loda"}}) == []
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert circles({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) == []
