"""The docs' generated parts are what their registries print, and the code they show is the code that runs."""

import importlib.util
import re

from helpers import ROOT


def _doc_tables():
    spec = importlib.util.spec_from_file_location("doc_tables", ROOT / "tools" / "doc_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_part_of_the_docs_is_current():
    """README's methods, docs/options.md's options, docs/guide.md's metrics and usage, docs/methods.md's
    registries: as ``tools/doc_tables.py`` writes them (the usage line lists every registered method)."""
    tables = _doc_tables()
    for path, parts in tables.PARTS.items():
        text = path.read_text()
        for start, make in parts.items():
            assert tables.generated(text, start) == make(), (
                f"{path.name} is stale: run python tools/doc_tables.py"
            )
    from sasr.methods import METHODS

    usage = tables.generated((ROOT / "docs" / "guide.md").read_text(), "sasr train [")
    assert all(f"|{m}|" in usage or f"{m}|" in usage for m in METHODS)
    assert (
        tables.generated("a\n\n| registry |x\n| y |\n\nb", "| registry |") == "| registry |x\n| y |"
    )  # can fail


def test_the_example_hybrid_in_the_docs_is_the_file_that_runs():
    text = (ROOT / "docs" / "methods.md").read_text()
    shown = re.search(r"## Write your own hybrid.*?```python\n(.*?)```", text, re.S).group(1)
    assert shown == (ROOT / "examples" / "raft_sft.py").read_text()
    assert "--method examples/raft_sft.py:RaftSFT" in text


def test_every_list_with_a_registry_names_all_of_it():
    """The lists the docs write by hand name every entry of their registry: tasks (the guide's table), loss
    aggregations (the guide's sentence), methods (docs/methods.md's sections); the README stays short."""
    from sasr.losses import LOSS_AGGREGATIONS
    from sasr.methods import BUILT_IN, METHODS
    from sasr.tasks import TASKS

    guide = (ROOT / "docs" / "guide.md").read_text()
    table = _doc_tables().generated(guide, "| task | data | judge |")
    tasks = set(re.findall(r"^\| `([a-z0-9-]+)(?::PATH)?` \|", table, re.M))
    assert tasks == set(TASKS), f"docs/guide.md's tasks table: {sorted(tasks)} against {sorted(TASKS)}"
    listed = _doc_tables().generated(guide, "**GRPO's loss aggregations**").split(":", 1)[1]
    assert set(re.findall(r"`([a-z_]+)` \(", listed)) == set(LOSS_AGGREGATIONS)
    text = (ROOT / "docs" / "methods.md").read_text()
    assert set(re.findall(r"^### `([a-z-]+)`", text, re.M)) == set(BUILT_IN)
    refusing = re.search(
        r"\n(.*?) train\s+each RL prompt's own demonstration, so they refuse", text, re.S
    ).group(1)
    assert set(re.findall(r"`([a-z-]+)`", refusing.split(".")[-1])) == {
        name for name in BUILT_IN if METHODS[name].pairs_demos
    }
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
