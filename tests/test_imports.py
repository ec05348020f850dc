"""The project's imports flow one way: no cycle among its top-level files.

Protects: every `import X` / `from X import ...` of a project module (a top-level .py file), at any
depth of any top-level file (function-level imports included, as `ast.walk` sees them), forms an
acyclic graph; a failure prints the whole graph and the cycle it found. Also: the trainer never
imports the programs that read runs, and the method reads the toy world through world.py only."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}


def import_graph():
    """{module: set of project modules it imports}, read with ast from every top-level .py file."""
    graph = {}
    for module in sorted(MODULES):
        with open(os.path.join(ROOT, module + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        graph[module] = (names & MODULES) - {module}
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
    assert not graph["selfdistill"] & {"eval", "compare", "analyze", "prepare"}, describe(graph)
    assert not graph["selfdistill"] & {"toy", "toy_build"}, describe(graph)  # through world.py
    assert not graph["eval"] & {"toy", "toy_build"}, describe(graph)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
