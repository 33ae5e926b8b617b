"""The learner's pieces on their own: micro-batches, the whole-step divisors, the loss mask, and the passes a
plan needs (an update itself is tested against TRL in test_losses and test_trl_options)."""

import torch
from helpers import tiny_config

from sasr.batch import DEMO, ROLLOUT, Gather, Part, cat_rows
from sasr.config import validate
from sasr.data import rows_of_kind
from sasr.learner import SFT_PASSES, micro_batches, part_norms, passes
from sasr.losses import Norm
from sasr.objective import loss_mask


def rows(kind: int, lengths: list[int], group: list[int], truncated: list[bool] | None = None):
    """Rows of one kind with completions of ``lengths`` tokens (width 6) and a one-token prompt."""
    mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.full((len(lengths), 6), 7)
    cut = None if truncated is None else torch.tensor(truncated)
    return rows_of_kind(ids[:, :1], mask[:, :1], ids, mask, ["x"] * len(lengths), kind, group, truncated=cut)


# An HPT-like step: 3 demonstrations of no prompt, 2 prompts x 2 rollouts, then each prompt's own demonstration.
STEP = cat_rows(
    [
        rows(DEMO, [2, 3, 4], [-1, -1, -1]),
        rows(ROLLOUT, [6, 1, 5, 6], [0, 0, 1, 1]),
        rows(DEMO, [3, 3], [0, 1]),
    ],
    0,
)


def test_micro_batches_share_out_demonstrations_and_whole_groups_in_order():
    assert [m.tolist() for m in micro_batches(STEP, 1)] == [list(range(9))]
    # demonstrations 0, 1 | 2; prompt 0's group (rollouts 3, 4 and its demonstration 7) | prompt 1's
    assert [m.tolist() for m in micro_batches(STEP, 2)] == [[0, 1, 3, 4, 7], [2, 5, 6, 8]]
    many = micro_batches(STEP, 5)
    assert sorted(i for m in many for i in m.tolist()) == list(range(9))  # every row once
    assert all(len(m) for m in many)  # empty micro-batches are left out
    for g in (0, 1):  # a prompt's rows never split
        assert sum(any(STEP.group[m] == g) for m in many) == 1


def test_part_norms_count_rows_here_and_tokens_per_process_over_all():
    sft = Part("sft", "nll", STEP.kind == DEMO)
    rl = Part("rl", "pg", STEP.kind == ROLLOUT)
    mask = STEP.completion_mask
    assert part_norms([sft, rl], mask) == {"sft": Norm(5, 15.0), "rl": Norm(4, 18.0)}
    # on two processes, the other holding 9 demonstration tokens and 2 rollout tokens: the mean per process
    other = torch.tensor([9.0, 2.0], dtype=torch.float64)
    norms = part_norms([sft, rl], mask, 2, lambda local: local + other)
    assert norms == {"sft": Norm(5, 12.0), "rl": Norm(4, 10.0)}


def test_the_loss_mask_drops_cut_rollouts_only_when_asked():
    cut = rows(ROLLOUT, [6, 2], [0, 0], truncated=[True, False])
    assert torch.equal(loss_mask(cut, False), cut.completion_mask)
    assert loss_mask(cut, True).sum(1).tolist() == [0, 2]


def test_what_a_plan_asks_of_the_passes(tmp_path):
    c = validate(tiny_config(tmp_path, grpo={"temperature": 0.7, "num_iterations": 2}))
    assert passes(Gather(demos=2), c) == SFT_PASSES
    grpo = passes(Gather(prompts=2, rollouts=4), c)
    assert (grpo.temperature, grpo.rollouts, grpo.reference, grpo.iterations) == (0.7, True, True, 2)
    # a step whose groups hold only demonstrations: read at the sampler's temperature, no reference pass
    offpolicy = passes(Gather(prompts=2, group_rows=1), c)
    assert (offpolicy.temperature, offpolicy.reference) == (0.7, False)
