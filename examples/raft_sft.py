"""RAFT + SFT: a hybrid that is not one of sasr's, in one file. Every step trains on the step's own best rollouts
(RAFT's reward-ranked fine-tuning, softened: each rollout's tokens weighted by its advantage where that is
positive, nothing where it is not) and, with weight ``sft_weight``, on demonstrations, as SFT.

    sasr train --method examples/raft_sft.py:RaftSFT --set RaftSFT.sft_weight=0.5
    sasr compare --methods sft,examples/raft_sft.py:RaftSFT --output runs/raft-vs-sft
"""

from pydantic import Field

from sasr import metrics
from sasr.batch import DEMO, ROLLOUT, Gather, Part, Plan, Rows
from sasr.losses import PART_LOSSES, LossTerm, PartInputs, PartLoss, token_mean
from sasr.methods import Method, Options

# A metric of its own: registered, it is combined over micro-batches and processes, and drawn by `report`.
metrics.register("raft_kept", "RaftSFT: the share of rollouts with a positive advantage", metrics.PASS)


def advantage_weighted_nll(x: PartInputs) -> PartLoss:
    """-max(A, 0) log p on every token of the part's rows, a token mean (x.logps, x.mask: [b, T])."""
    weight = x.advantages.clamp(min=0)[:, None]  # [b, 1], no gradient
    stats = {"raft_kept": (x.advantages > 0).float().mean().item()} if len(x.advantages) else {}
    return PartLoss(token_mean(-weight * x.logps, x), stats)


# A loss term of its own: parts name it; it reads no setting of the run (LossTerm's settings: none).
PART_LOSSES.add("advantage_weighted_nll", LossTerm(advantage_weighted_nll))


class RaftSFTOptions(Options):
    sft_weight: float = Field(0.5, ge=0, description="weight of the demonstrations' NLL")


class RaftSFT(Method):
    """Every step: RAFT on its rollouts (advantage-weighted NLL) + sft_weight x SFT on demonstrations."""

    Options = RaftSFTOptions
    summary = "advantage-weighted NLL of the step's better rollouts + SFT on demonstrations"
    dynamics = ("raft_kept",)  # what its dynamics plot draws
    repeatable_updates = False  # no clipped ratio bounds its terms: refuse grpo.num_iterations > 1

    def plan(self, step: int) -> Plan:
        gather = Gather(demos=self.demos_per_step, prompts=self.prompts_per_step, rollouts=self.group_size)
        return Plan(step, "mixed", gather)

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        return [
            Part("raft", "advantage_weighted_nll", rows.kind == ROLLOUT),
            Part("sft", "nll", rows.kind == DEMO, self.opts.sft_weight),
        ], {}
