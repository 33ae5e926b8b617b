"""HPT (arXiv 2509.04419): per prompt, after its rollouts are scored, RL on them if it was solved often enough,
else SFT on its own demonstration."""

from __future__ import annotations

import torch
from pydantic import Field

from sasr import metrics
from sasr.batch import DEMO, ROLLOUT, ROW_SOURCES, Ask, Gather, Part, Plan, Rows, RowSource
from sasr.methods.base import DrGRPOOptions, Method, register_method

metrics.register("sft_fraction", "HPT: the share of prompts routed to SFT", metrics.ROLLOUTS)


def own_demonstrations(c, step: int, examples: list) -> tuple[Rows | None, dict[str, float]]:
    """One DEMO row per group whose prompt has a demonstration of its own, numbered as its group (a prompt
    without one is an RL prompt only)."""
    have = [g for g, ex in enumerate(examples) if c.has_demonstration(c.index_of(ex))]
    return (c.demonstrations([examples[g] for g in have], group=have) if have else None), {}


ROW_SOURCES.add("own_demonstrations", RowSource("after", own_demonstrations))


class HPTOptions(DrGRPOOptions):
    gate: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="a prompt trains with SFT when its fraction of correct rollouts is <= gate",
    )
    sft_loss_coef: float = Field(1.0, ge=0, description="weight of the SFT part")
    beta: float = Field(0.0, ge=0, description="KL weight of the RL part (HPT: none)")


@register_method
class HPT(Method):
    """HPT: per prompt, after its rollouts are scored, RL on them if it was solved often enough (fraction
    correct > gate), else SFT on its demonstration (its rollouts dropped)."""

    name = "hpt"
    paper = "arXiv 2509.04419"
    summary = (
        "per prompt: RL on its rollouts if solved more often than the gate, else SFT on its demonstration"
    )
    Options = HPTOptions
    pairs_demos = True
    repeatable_updates = False
    routes_by_outcome = True
    dynamics = ("sft_fraction",)

    def plan(self, step: int) -> Plan:
        gather = Gather(
            prompts=self.prompts_per_step,
            rollouts=self.group_size,
            sources=(Ask("own_demonstrations"),),
            scale_rewards=self.opts.scale_rewards,
        )
        return Plan(step, "mixed", gather)

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        o, g = self.opts, plan.gather
        rollout, demo = rows.kind == ROLLOUT, rows.kind == DEMO
        solved = torch.zeros(g.prompts, device=rows.kind.device)
        solved.index_add_(0, rows.group[rollout], rows.correct[rollout].float())
        taught = torch.zeros(g.prompts, dtype=torch.bool, device=rows.kind.device)
        taught[rows.group[demo]] = True  # [prompts]: with a demonstration (one without is RL only)
        to_sft = (solved / g.rollouts <= o.gate) & taught  # [prompts]: the prompts routed to SFT
        # DEMO rows of the RL prompts carry their prompt's group number too (own_demonstrations).
        row_to_sft = to_sft[rows.group.clamp(min=0)]
        return [
            Part("sft", "nll", demo & row_to_sft, o.sft_loss_coef),
            Part("rl", "pg", rollout & ~row_to_sft, 1.0, {"beta": o.beta, "loss_type": o.loss_type}),
        ], {"sft_fraction": to_sft.float().mean().item()}
