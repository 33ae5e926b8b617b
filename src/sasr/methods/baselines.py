"""The baselines SASR is judged against: SFT alone, GRPO alone, the static two-stage hybrid and the random
interleave."""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

from sasr.batch import Apply, Plan
from sasr.methods.base import Method, Options, register_method


@register_method
class SFTOnly(Method):
    name = "sft"
    summary = "SFT on demonstrations at every step"
    uses_reference = False

    def plan(self, step: int) -> Plan:
        return self.sft_plan(step)


@register_method
class GRPOOnly(Method):
    """GRPO from the loaded model: no warm-up, whatever warmup_steps says."""

    name = "grpo"
    paper = "arXiv 2402.03300"
    summary = "GRPO on sampled rollouts at every step, from the loaded model"
    uses_demos = False

    def plan(self, step: int) -> Plan:
        return self.grpo_plan(step)


class SFTThenGRPOOptions(Options):
    switch_step: int | None = Field(None, ge=0, description="SFT steps before GRPO (null: warmup_steps)")
    sft_learning_rate: float | None = Field(
        None,
        gt=0,
        description="the SFT stage's peak rate, on its own cosine schedule; null: the run's schedule",
    )
    sft_warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the SFT stage warming its rate up")
    sft_lr_floor: float = Field(0.0, ge=0, le=1, description="the SFT stage's final rate / its peak")
    sft_weight_decay: float | None = Field(
        None, ge=0, description="the SFT stage's; null: optim.weight_decay"
    )
    sft_max_grad_norm: float | None = Field(
        None, gt=0, description="the SFT stage's; null: optim.max_grad_norm"
    )
    rl_learning_rate: float | None = Field(
        None, gt=0, description="the RL stage's constant rate; null: the run's schedule"
    )
    rl_weight_decay: float | None = Field(None, ge=0, description="the RL stage's; null: optim.weight_decay")
    rl_max_grad_norm: float | None = Field(
        None, gt=0, description="the RL stage's; null: optim.max_grad_norm"
    )
    rl_fresh_optimizer: bool = Field(
        False, description="the RL stage starts from a fresh AdamW state, as two separate runs would"
    )


@register_method
class SFTThenGRPO(Method):
    """The static two-stage hybrid: ``switch_step`` SFT steps (default warmup_steps), then GRPO; each stage may
    have its own optimiser settings (a peak rate with warm-up and a cosine to a floor for SFT, a constant rate
    for RL, weight decay, clip), as a fair two-stage baseline needs (arXiv 2604.23747)."""

    name = "sft-then-grpo"
    summary = (
        "SFT for switch_step steps (default warmup_steps), then GRPO; each stage its own optimiser settings"
    )
    Options = SFTThenGRPOOptions
    uses_warmup = True

    sft_budget_from = "sasr"

    @classmethod
    def with_sft_steps(cls, options: dict[str, Any], sft_steps: int) -> dict[str, Any]:
        return options if options.get("switch_step") is not None else {**options, "switch_step": sft_steps}

    @property
    def switch(self) -> int:
        return self.warmup_steps if self.opts.switch_step is None else self.opts.switch_step

    @property
    def reference_step(self) -> int:
        return self.switch

    @classmethod
    def check_budget(cls, steps: int, warmup_steps: int) -> None:
        pass  # any switch works: 0 is plain GRPO, steps or more plain SFT

    def plan(self, step: int) -> Plan:
        o = self.opts
        if step <= self.switch:
            lr = None if o.sft_learning_rate is None else self.sft_rate(step)
            apply = Apply(lr=lr, weight_decay=o.sft_weight_decay, max_grad_norm=o.sft_max_grad_norm)
            plan = self.sft_plan(step)
        else:
            apply = Apply(
                lr=o.rl_learning_rate,
                weight_decay=o.rl_weight_decay,
                max_grad_norm=o.rl_max_grad_norm,
                fresh_optimizer=o.rl_fresh_optimizer and step == self.switch + 1,
            )
            plan = self.grpo_plan(step)
        plan.updates = (apply,)
        return plan

    def sft_rate(self, step: int) -> float:
        """The SFT stage's rate at ``step`` (1-based): linear warm-up over ``sft_warmup_ratio`` of the stage,
        then a cosine from the peak down to ``sft_lr_floor`` x peak at its last step."""
        o, n = self.opts, self.switch
        warm = math.ceil(o.sft_warmup_ratio * n)
        if step <= warm:
            return o.sft_learning_rate * step / warm
        done = (step - warm) / max(n - warm, 1)  # 1 at the stage's last step
        cosine = 0.5 * (1 + math.cos(math.pi * done))
        return o.sft_learning_rate * (o.sft_lr_floor + (1 - o.sft_lr_floor) * cosine)


class InterleaveOptions(Options):
    prob: float = Field(0.5, ge=0, le=1, description="chance of an SFT step after warm-up")
    period: int = Field(0, ge=0, description="if > 0: SFT every period-th step after warm-up instead")


@register_method
class Interleave(Method):
    """Static mixture: after warm-up, SFT with fixed probability ``prob``, or every ``period``-th step."""

    name = "interleave"
    summary = "warm-up SFT, then SFT with a fixed probability (or every k-th step), else GRPO"
    Options = InterleaveOptions
    uses_warmup = True
    dynamics = ("p_t",)

    def plan(self, step: int) -> Plan:
        if step <= self.warmup_steps:
            return self.sft_plan(step)
        if self.opts.period > 0:
            sft = (step - self.warmup_steps) % self.opts.period == 0
            return self.sft_plan(step) if sft else self.grpo_plan(step)
        alpha = self.rng.random()
        info = {"p_t": self.opts.prob, "alpha": alpha}
        return self.sft_plan(step, **info) if alpha < self.opts.prob else self.grpo_plan(step, **info)
