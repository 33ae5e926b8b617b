"""ReLIFT (arXiv 2506.07527): RL updates; the prompts whose rollouts all fail join a buffer with their
demonstrations, and once it holds enough, the same step also takes an SFT update on the newest of them, with an
optimizer of its own (docs/methods.md)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

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
metrics.register("relift_sft_prompts", "ReLIFT: the buffered prompts an SFT update trained this step")


def buffered_demonstrations(c, step: int, examples: list, pool: tuple[int, ...]) -> tuple[Rows, dict]:
    """DEMO rows of the RL examples ``pool`` (indices), shared out over the processes."""
    return c.demonstrations([c.examples[i] for i in c.share(pool)]), {}


ROW_SOURCES.add("buffered_demonstrations", RowSource("before", buffered_demonstrations))


class ReLIFTOptions(Options):
    buffer_size: int | None = Field(
        None,
        ge=1,
        description="failed prompts that trigger an SFT update; null: the step's RL prompts (all processes)",
    )
    schedule: Literal["update", "step"] = Field(
        "update",
        description="update: an SFT update in the step, its own optimizer; step: SFT replaces the next step",
    )
    sft_learning_rate: float | None = Field(
        None,
        gt=0,
        description="the SFT update's constant rate (their 1e-6, the RL rate); null: optim.learning_rate",
    )
    sft_max_grad_norm: float = Field(
        1.0, gt=0, description="the SFT update's gradient clip (their sft_grad_clip)"
    )
    rl_max_grad_norm: float = Field(0.7, gt=0, description="the RL update's gradient clip (their grad_clip)")
    remove_clip: bool = Field(True, description="-A x ratio with no clip (their loss_remove_clip)")
    epsilon_high: float | None = Field(None, gt=0, description="with the clip: above 1; null: grpo.epsilon")
    beta: float = Field(0.0, ge=0, description="KL weight of the RL update (ReLIFT: none)")
    loss_type: names(LOSS_AGGREGATIONS) = Field("token_sum", description="the RL update's aggregation")


@register_method
class ReLIFT(Method):
    """ReLIFT: an RL update every step (advantages centred, not scaled); each prompt whose G rollouts all fail
    joins the front of a buffer with its demonstration; once it holds ``buffer_size``, the step also takes an
    SFT update on the newest ``buffer_size`` (the rest stay) with an optimizer of its own. The buffer is the
    same on every process (their failures are gathered)."""

    name = "relift"
    paper = "arXiv 2506.07527"
    summary = "RL updates; prompts whose rollouts all fail are buffered, and a full buffer adds an SFT update"
    Options = ReLIFTOptions
    pairs_demos = True
    routes_by_outcome = True
    observes_outcomes = True
    dynamics = ("relift_buffer", "relift_sft_prompts")

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.buffer: list[int] = []  # RL example indices, newest first ("step": oldest first)

    @property
    def size(self) -> int:
        return self.opts.buffer_size or self.prompts_per_step * self.processes

    def plan(self, step: int) -> Plan:
        o, info = self.opts, {"relift_buffer": float(len(self.buffer))}
        if o.schedule == "step" and len(self.buffer) >= self.size:
            gather = Gather(sources=(Ask("buffered_demonstrations", {"pool": tuple(self.buffer)}),))
            apply = Apply(lr=o.sft_learning_rate, max_grad_norm=o.sft_max_grad_norm)
            return Plan(
                step, "sft", gather, (apply,), {**info, "relift_sft_prompts": float(len(self.buffer))}
            )
        gather = Gather(prompts=self.prompts_per_step, rollouts=self.group_size, scale_rewards="none")
        return Plan(step, "grpo", gather, (Apply(max_grad_norm=o.rl_max_grad_norm),), info)

    def outcomes(self, plan: Plan, solved: list[tuple[int, int]]) -> None:
        failed = [example for example, correct in solved if correct == 0]
        self.buffer = failed + self.buffer if self.opts.schedule == "update" else self.buffer + failed

    def follow_up(self, plan: Plan) -> Plan | None:
        """Once the step's failures have joined the buffer: an SFT update on its newest ``size`` prompts."""
        if self.opts.schedule != "update" or len(self.buffer) < self.size:
            return None
        o, pool = self.opts, tuple(self.buffer[: self.size])
        gather = dataclasses.replace(plan.gather, sources=(Ask("buffered_demonstrations", {"pool": pool}),))
        sft = Apply(optimizer="sft", lr=o.sft_learning_rate, max_grad_norm=o.sft_max_grad_norm)
        info = {**plan.info, "relift_sft_prompts": float(len(pool))}
        return Plan(plan.step, "mixed", gather, (*plan.updates, sft), info)

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        sft = len(plan.updates) - 1  # the SFT update's number: 0 on a step of SFT alone
        parts = [Part("sft", "nll", rows.kind == DEMO, update=sft)] if plan.gather.sources else []
        if not plan.gather.prompts:
            return parts, {}
        o, rollout = self.opts, rows.kind == ROLLOUT
        solved = torch.zeros(plan.gather.prompts, device=rows.kind.device)
        solved.index_add_(0, rows.group[rollout], rows.correct[rollout].float())
        unclipped = {"epsilon": float("inf"), "epsilon_high": float("inf")} if o.remove_clip else {}
        options = {"beta": o.beta, "epsilon_high": o.epsilon_high, "loss_type": o.loss_type, **unclipped}
        parts.insert(0, Part("grpo", "pg", rollout, 1.0, options))
        return parts, {"relift_failed": (solved == 0).float().mean().item()}

    def observe(self, plan: Plan, grad_norm: float | None, probe: float | None = None) -> None:
        super().observe(plan, grad_norm, probe)
        if plan.gather.sources:  # the SFT update on the buffer was taken: its prompts leave it
            self.buffer = self.buffer[len(plan.gather.sources[0].args["pool"]) :]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.buffer = list(state["buffer"])
