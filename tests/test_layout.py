"""The package's shape: no import cycles, and the algorithm's modules load no decoding code."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parent.parent / "src"


def _imports(tree: ast.AST, everywhere: bool):
    """The import statements of a module: at module level, or anywhere (inside functions too); imports under
    ``if TYPE_CHECKING:`` are never run, so they are left out."""
    nodes = list(ast.walk(tree)) if everywhere else list(tree.body)
    skipped = {
        id(inner)
        for node in nodes
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for inner in ast.walk(node)
    }
    return [n for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def module_imports(everywhere: bool = False) -> dict[str, set[str]]:
    """{module: the sasr modules it imports at module level}; with ``everywhere``, inside functions too."""
    modules = {}
    for path in (SRC / "sasr").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in _imports(ast.parse(path.read_text()), everywhere):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
            elif node.module and node.module.startswith("sasr"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                found |= subs or ({node.module} & modules.keys())
        graph[name] = found - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycles_at_any_level():
    """No cycle among the imports a module makes when it loads, nor among those its functions make later."""
    for everywhere in (False, True):
        graph = module_imports(everywhere)
        assert {
            "sasr.trainer",
            "sasr.methods",
            "sasr.losses",
            "sasr.rollout.engine",
            "sasr.experiments.compare",
        } <= graph.keys()
        cycle = find_cycle(graph)
        assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail
    hidden = ast.parse("def f():\n    import sasr.config\nif TYPE_CHECKING:\n    import sasr.trainer\n")
    assert [ast.unparse(n) for n in _imports(hidden, everywhere=True)] == ["import sasr.config"]


def test_the_algorithm_loads_no_decoder():
    """Importing the loss module, the methods or the config loads nothing of the rollout engine."""
    code = (
        "import sys, sasr.losses, sasr.config, sasr.methods, sasr.logprobs, sasr.checkpoint; "
        "print(sorted(m for m in sys.modules if m.startswith(('sasr.rollout', 'sasr.experiments', 'sasr.evaluate', 'sasr.trainer'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def importers(graph: dict[str, set[str]], target: str) -> set[str]:
    return {m for m, deps in graph.items() if any(d == target or d.startswith(target + ".") for d in deps)}


def test_imports_point_one_way_loop_over_stages_over_evaluation():
    """Only the experiment tools (and the CLI, and ``sasr.train``) import the trainer or the experiment tools;
    the evaluation and the stages of a step import nothing above them."""
    graph = module_imports(everywhere=True)
    top = {"sasr", "sasr.cli"}
    experiments = {m for m in graph if m.startswith("sasr.experiments")}
    assert importers(graph, "sasr.trainer") <= top | experiments
    assert importers(graph, "sasr.experiments") <= top | experiments
    above = {"sasr.trainer", "sasr.cli", "sasr.experiments", "sasr.collect", "sasr.learner", "sasr.run_dir"}
    for leaf in ("sasr.evaluate", "sasr.rewards", "sasr.metrics"):
        assert not {d for d in graph[leaf] if any(d == a or d.startswith(a + ".") for a in above)}, leaf
    assert importers({"a": {"sasr.trainer"}}, "sasr.trainer") == {"a"}  # the check can fail
