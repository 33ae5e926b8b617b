"""The metrics registry: the README's table is generated from it, and its combining rules."""

import re
from pathlib import Path

import pytest

from sasr import metrics

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_metrics_table_matches_the_registry_both_ways():
    start = README.index("| metric | what it is |")
    table = README[start : README.index("\n\n", start)]
    documented = {m.group(1) for m in re.finditer(r"^\| `([a-z0-9_/@]+?)(NAME)?` \|", table, re.M)}
    assert documented == set(metrics.METRICS), "the README's metrics table and the registry differ"
    assert metrics.table() in README, "a meaning or rule in the README differs from the registry"


@pytest.mark.parametrize(
    ("name", "registered"),
    [("loss", "loss"), ("loss/sft", "loss/"), ("rewards/task/mean", "rewards/"), ("eval_accuracy", "eval_")],
)
def test_a_name_is_registered_by_itself_or_its_family(name, registered):
    assert metrics.metric(name) is metrics.METRICS[registered]


def test_an_unregistered_name_is_not_sasrs():
    assert metrics.metric("mean_length_reward") is None
    assert metrics.metric("losses") is None  # a family matches by its whole prefix only


def test_pieces_combine_by_each_metrics_rule():
    total: dict[str, float] = {}
    for piece in ({"loss/sft": 1.0, "entropy": 2.0, "reference_seconds": 0.5, "mine": 4.0},) * 2:
        metrics.combine(total, piece, 2, "micro")
    assert total == {"loss/sft": 2.0, "entropy": 2.0, "reference_seconds": 1.0, "mine": 4.0}
    over_updates: dict[str, float] = {}
    for _ in range(2):
        metrics.combine(over_updates, total, 2, "iterations")
    # a part's loss is summed over micro-batches but averaged over updates; time adds up over both
    assert over_updates == {"loss/sft": 2.0, "entropy": 2.0, "reference_seconds": 2.0, "mine": 4.0}
