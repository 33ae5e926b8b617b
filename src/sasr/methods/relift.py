"""ReLIFT (arXiv 2506.07527): RL steps; the prompts whose rollouts all fail join a buffer with their
demonstrations, and a full buffer makes the next step SFT on them."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from sasr import metrics
from sasr.batch import DEMO, ROLLOUT, ROW_SOURCES, Apply, Ask, Gather, Part, Plan, Rows, RowSource
from sasr.losses import LOSS_AGGREGATIONS, names
from sasr.methods.base import Method, Options, register_method

metrics.register("relift_buffer", "ReLIFT: failed prompts in the buffer when the step was planned")
metrics.register(
    "relift_failed", "ReLIFT: the share of the step's prompts whose rollouts all failed", metrics.ROLLOUTS
)


def buffered_demonstrations(c, step: int, examples: list, pool: tuple[int, ...]) -> tuple[Rows, dict]:
    """DEMO rows of the RL examples ``pool`` (indices), shared out over the processes."""
    return c.demonstrations([c.examples[i] for i in c.share(pool)]), {}


ROW_SOURCES.add("buffered_demonstrations", RowSource("before", buffered_demonstrations))


class ReLIFTOptions(Options):
    buffer_size: int = Field(64, ge=1, description="failed prompts that make the next step SFT on them (M)")
    sft_learning_rate: float | None = Field(
        None, gt=0, description="the SFT steps' learning rate (their script: 1e-6); null: the schedule's"
    )
    sft_max_grad_norm: float | None = Field(
        None, gt=0, description="the SFT steps' gradient clip (their script: 0.5); null: optim.max_grad_norm"
    )
    beta: float = Field(0.0, ge=0, description="KL weight of the RL steps (ReLIFT: none)")
    epsilon_high: float = Field(0.28, gt=0, description="the RL steps' clip range above 1 (DAPO's)")
    loss_type: names(LOSS_AGGREGATIONS) = Field("dapo", description="the RL steps' aggregation")


@register_method
class ReLIFT(Method):
    """ReLIFT: RL steps (advantage centred, not scaled); every prompt whose G rollouts all fail joins a buffer
    with its demonstration; once the buffer holds ``buffer_size``, the next step is SFT on the whole buffer,
    which then empties. The buffer is the same on every process (their failures are gathered)."""

    name = "relift"
    paper = "arXiv 2506.07527"
    summary = "RL steps; prompts whose rollouts all fail are buffered, and a full buffer is trained with SFT"
    Options = ReLIFTOptions
    pairs_demos = True
    routes_by_outcome = True
    observes_outcomes = True
    dynamics = ("relift_buffer",)

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.buffer: list[int] = []  # RL example indices, in the order they failed

    def plan(self, step: int) -> Plan:
        o, info = self.opts, {"relift_buffer": float(len(self.buffer))}
        if len(self.buffer) >= o.buffer_size:
            gather = Gather(sources=(Ask("buffered_demonstrations", {"pool": tuple(self.buffer)}),))
            apply = Apply(lr=o.sft_learning_rate, max_grad_norm=o.sft_max_grad_norm)
            return Plan(step, "sft", gather, (apply,), info)
        gather = Gather(prompts=self.prompts_per_step, rollouts=self.group_size, scale_rewards="none")
        return Plan(step, "grpo", gather, info=info)

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        if plan.gather.sources:
            return [Part("sft", "nll", rows.kind == DEMO)], {}
        o, rollout = self.opts, rows.kind == ROLLOUT
        solved = torch.zeros(plan.gather.prompts, device=rows.kind.device)
        solved.index_add_(0, rows.group[rollout], rows.correct[rollout].float())
        options = {"beta": o.beta, "epsilon_high": o.epsilon_high, "loss_type": o.loss_type}
        return [Part("grpo", "pg", rollout, 1.0, options)], {
            "relift_failed": (solved == 0).float().mean().item()
        }

    def outcomes(self, plan: Plan, solved: list[tuple[int, int]]) -> None:
        self.buffer += [example for example, correct in solved if correct == 0]

    def observe(self, plan: Plan, grad_norm: float | None, probe: float | None = None) -> None:
        super().observe(plan, grad_norm, probe)
        if plan.gather.sources:  # the SFT step on the buffer was taken: it empties
            self.buffer = []

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.buffer = list(state["buffer"])
