"""The package has no import circles: every `import` of one nanoqwen module by another, at the top of a file or
inside a function, read with ast, forms a graph without cycles."""
import ast
import os

import nanoqwen

PACKAGE = os.path.dirname(nanoqwen.__file__)

def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imported_modules(path: str, modules: set[str]) -> set[str]:
    """The package's modules that the file at `path` imports, wherever the import statement is."""
    name, found = module_name(path), set()
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:  # `from .x import f`: the module is .x
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate not in (name, "nanoqwen"):
                found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = [os.path.join(folder, f) for folder, _, files in os.walk(PACKAGE) for f in files if f.endswith(".py")]
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules)
            for p in paths}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None: depth-first search for a back edge."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_reader_sees_function_level_imports_and_cycles():
    source = os.path.join(PACKAGE, "cli.py")  # imports the generation package inside its command functions
    assert "nanoqwen.generation.api" in imported_modules(source, set(import_graph()))
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_no_import_circles():
    found = cycle(import_graph())
    assert found is None, "import circle: " + " -> ".join(found)
