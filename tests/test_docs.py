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
    """README's options, metrics and usage, docs/methods.md's registries: as ``tools/doc_tables.py`` writes
    them (the usage line lists every registered method)."""
    tables = _doc_tables()
    for path, parts in tables.PARTS.items():
        text = path.read_text()
        for start, make in parts.items():
            assert tables.generated(text, start) == make(), (
                f"{path.name} is stale: run python tools/doc_tables.py"
            )
    from sasr.methods import METHODS

    usage = tables.generated((ROOT / "README.md").read_text(), "sasr train [")
    assert all(f"|{m}|" in usage or f"{m}|" in usage for m in METHODS)
    assert (
        tables.generated("a\n\n| registry |x\n| y |\n\nb", "| registry |") == "| registry |x\n| y |"
    )  # can fail


def test_the_example_hybrid_in_the_docs_is_the_file_that_runs():
    text = (ROOT / "docs" / "methods.md").read_text()
    shown = re.search(r"## Write your own hybrid.*?```python\n(.*?)```", text, re.S).group(1)
    assert shown == (ROOT / "examples" / "raft_sft.py").read_text()
    assert "--method examples/raft_sft.py:RaftSFT" in text
