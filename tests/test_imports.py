"""The project's imports flow one way: no cycle among its modules, across the folders.

Protects: every `import X` / `from X import ...` of a project module (a top-level .py file, or one
of the plumbing/ and toyworld/ folders), at any depth of any module (function-level imports included, as `ast.walk` sees them), forms an
acyclic graph; a failure prints the whole graph and the cycle it found. Also: the trainer never
imports the programs that read runs, the method reads the toy world through world.py only, and
the plumbing imports neither the programs nor the toy world."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINGS = ("plumbing", "toyworld")  # the two folders beside the method and the programs


def project_modules():
    """{dotted module name: its file}: the top-level .py files and the two wings' modules."""
    modules = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")}
    for wing in WINGS:
        for name in os.listdir(os.path.join(ROOT, wing)):
            if name.endswith(".py") and name != "__init__.py":
                modules[f"{wing}.{name[:-3]}"] = os.path.join(ROOT, wing, name)
    return modules


MODULES = project_modules()


def import_graph():
    """{module: set of project modules it imports}, read with ast from every project module;
    `from plumbing import common` and `from plumbing.common import X` both name plumbing.common."""
    graph = {}
    for module, path in sorted(MODULES.items()):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module] = (names & set(MODULES)) - {module}
    return graph


def find_cycle(graph):
    """One cycle as a list of modules (first == last), or None."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def describe(graph):
    return "\n".join(f"  {m} <- {', '.join(sorted(graph[m])) or '(nothing)'}" for m in sorted(graph))


def test_project_imports_are_acyclic():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle {' -> '.join(cycle)}; the graph (module <- what it imports):\n" \
                          f"{describe(graph)}"


def test_the_trainer_imports_no_program_that_reads_runs_and_the_world_through_one_seam():
    graph = import_graph()
    assert not graph["selfdistill"] & {"eval", "compare", "analyze", "prepare", "explain"}, describe(graph)
    toy_inside = {m for m in MODULES if m.startswith("toyworld.") and m != "toyworld.world"}
    assert not graph["selfdistill"] & toy_inside, describe(graph)  # through world.py
    assert not graph["eval"] & toy_inside, describe(graph)


def test_the_plumbing_imports_no_program_and_no_toy_world():
    graph = import_graph()
    for module in (m for m in MODULES if m.startswith("plumbing.")):
        assert not graph[module] & {"selfdistill", "eval", "compare", "analyze", "prepare", "explain"}, module
        assert not any(m.startswith("toyworld.") for m in graph[module]), (module, describe(graph))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
