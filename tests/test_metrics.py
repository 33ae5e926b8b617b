"""The metrics registry: docs/guide.md's table is generated from it, and its combining rules."""

import re
from pathlib import Path

import pytest

from sasr import metrics

GUIDE = (Path(__file__).parent.parent / "docs" / "guide.md").read_text()


def test_the_guide_s_metrics_table_matches_the_registry_both_ways():
    start = GUIDE.index("| metric | what it is |")
    table = GUIDE[start : GUIDE.index("\n\n", start)]
    documented = {m.group(1) for m in re.finditer(r"^\| `([a-z0-9_/@]+?)(NAME)?` \|", table, re.M)}
    assert documented == set(metrics.METRICS), "docs/guide.md's metrics table and the registry differ"
    assert metrics.table() in GUIDE, "docs/guide.md's metrics table is stale: run python tools/doc_tables.py"


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
    pieces = [{"loss/sft": 1.0, "entropy": 2.0, "reference_seconds": 0.5, "mine": 4.0}] * 2
    total = metrics.combine(pieces, "micro")
    assert total == {"loss/sft": 2.0, "entropy": 2.0, "reference_seconds": 1.0, "mine": 4.0}
    # a part's loss is summed over micro-batches but averaged over updates; time adds up over both
    over_updates = metrics.combine([total, total], "iterations")
    assert over_updates == {"loss/sft": 2.0, "entropy": 2.0, "reference_seconds": 2.0, "mine": 4.0}


def test_a_piece_without_a_value_counts_for_nothing():
    """A micro-batch without rollouts has no entropy, and a part with no rows in it no loss: the step's
    numbers average over the pieces that have one, not over zeros."""
    pieces = [{"entropy": 3.0, "clip_fraction": 0.5}, {"loss/sft": 1.5}, {"entropy": 1.0}]
    assert metrics.combine(pieces, "micro") == {"entropy": 2.0, "clip_fraction": 0.5, "loss/sft": 1.5}
    assert metrics.combine([], "micro") == {}
