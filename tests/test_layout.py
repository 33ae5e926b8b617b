"""The package's shape: no import cycles, and the algorithm's modules load no decoding code."""

import ast
import re
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
    """Only the experiment tools (and the CLI, ``sasr.train`` and ``SASRTrainer``) import the trainer or the
    experiment tools; the evaluation and the stages of a step import nothing above them."""
    graph = module_imports(everywhere=True)
    top = {"sasr", "sasr.cli", "sasr.api"}
    experiments = {m for m in graph if m.startswith("sasr.experiments")}
    assert importers(graph, "sasr.trainer") <= top | experiments
    assert importers(graph, "sasr.experiments") <= top | experiments
    above = {
        "sasr.trainer",
        "sasr.api",
        "sasr.cli",
        "sasr.experiments",
        "sasr.collect",
        "sasr.learner",
        "sasr.run_dir",
    }
    for leaf in ("sasr.evaluate", "sasr.rewards", "sasr.metrics"):
        assert not {d for d in graph[leaf] if any(d == a or d.startswith(a + ".") for a in above)}, leaf
    assert importers({"a": {"sasr.trainer"}}, "sasr.trainer") == {"a"}  # the check can fail


METHOD_NAMES = ("relift", "uft", "luffy", "srft", "hpt", "chord", "prefix_rft", "sdft", "sdpo", "questa")
METHOD_WORDS = (
    "hint",
    "prefix_",
    "prefixed",
    "offpolicy",
    "off_policy",
    "demo_pool",
    "shaping",
    "rollout_coef",
)
CORE = ("collect", "learner", "losses", "batch", "config", "metrics", "trainer", "run_dir", "objective")


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the string constants that are docstrings (a module's, class's or function's first line)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def code_words(source: str) -> list[str]:
    """The names and the string literals a module's code holds, lower-cased: comments and docstrings aside."""
    tree = ast.parse(source)
    skip, out = _docstrings(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            out.append(node.value)
        elif isinstance(node, ast.Name):
            out.append(node.id)
        elif isinstance(node, ast.Attribute):
            out.append(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append(node.name)
        elif isinstance(node, ast.arg) or isinstance(node, ast.keyword) and node.arg:
            out.append(node.arg)
        elif isinstance(node, ast.alias):
            out.append(node.asname or node.name)
    return [w.lower() for w in out]


def named(words: list[str], names: tuple[str, ...]) -> set[str]:
    """The ``names`` that occur in ``words`` as words of their own (not inside a longer word)."""
    pattern = re.compile(r"(?<![a-z])(" + "|".join(n.replace("_", "[_-]") for n in names) + r")(?![a-z])")
    return {m.group(1).replace("-", "_") for w in words for m in pattern.finditer(w)}


def core_files(names: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for name in names:
        folder = SRC / "sasr" / name
        paths = sorted(folder.glob("*.py")) if folder.is_dir() else [SRC / "sasr" / f"{name}.py"]
        out.update({str(p.relative_to(SRC)): p for p in paths})
    return out


def test_the_core_names_no_method_and_holds_no_method_specific_words():
    """The collector, the learner, the losses, the rows, the configuration, the metrics, the trainer and the
    run directory name no method: each method's rows, advantages, losses and metrics are registered by its own
    module. The stages of a step also hold none of a method's words (hints, prefixes, off-policy rows)."""
    for path_name, path in core_files(CORE).items():
        words = code_words(path.read_text())
        assert not named(words, METHOD_NAMES), f"{path_name} names a method: {named(words, METHOD_NAMES)}"
    for path_name, path in core_files(("collect", "learner", "losses", "batch", "objective")).items():
        found = {w for w in METHOD_WORDS for text in code_words(path.read_text()) if w in text}
        assert not found, f"{path_name} holds a method's words: {sorted(found)}"
    # the checks can fail: a name in code counts, the same in a docstring or a comment does not
    sample = 'def f(x):\n    """Unlike LUFFY."""\n    # luffy\n    return x.luffy_share + "hint"\n'
    assert named(code_words(sample), METHOD_NAMES) == {"luffy"}
    assert named(["anchored", "shift", "prefix-rft"], METHOD_NAMES) == {"prefix_rft"}
    assert "hint" in code_words(sample)


def test_no_method_module_is_over_200_lines_and_no_training_function_over_60():
    long_modules = {
        p.name: n
        for p in (SRC / "sasr" / "methods").glob("*.py")
        if (n := len(p.read_text().splitlines())) > 200
    }
    assert not long_modules, f"method modules over 200 lines: {long_modules}"
    training = core_files(("collect", "learner", "objective", "trainer", "batch", "losses"))
    long_functions = {}
    for path_name, path in training.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long_functions[f"{path_name}:{node.name}"] = length
    assert not long_functions, f"functions over 60 lines in the training path: {long_functions}"
    collector = ast.parse((SRC / "sasr" / "collect" / "__init__.py").read_text())
    (cls,) = [n for n in collector.body if isinstance(n, ast.ClassDef) and n.name == "Collector"]
    assert cls.end_lineno - cls.lineno + 1 <= 220


def test_library_code_never_exits_the_interpreter():
    """A notebook or a script catches sasr.SasrError; only the command line turns it into exit code 2."""
    exits = []
    for path in sorted((SRC / "sasr").rglob("*.py")):
        if path.name in ("__main__.py", "cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in ("sys.exit", "exit", "quit", "os._exit"):
                    exits.append(f"{path.relative_to(SRC)}:{node.lineno} {name}")
    assert not exits, exits
