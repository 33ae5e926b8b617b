"""CHORD (arXiv 2508.11408): every step L = (1 - mu) L_GRPO(rollouts) + mu L_SFT(demonstrations), each a token
mean; CHORD-phi weights each demonstration token by p (1 - p)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from sasr import metrics
from sasr.batch import DEMO, ROLLOUT, Gather, Part, Plan, Rows
from sasr.losses import LOSS_AGGREGATIONS, PartInputs, masked_mean, names
from sasr.methods.base import Method, Options, register_method

metrics.register("mu", "CHORD: the weight of the demonstration part")
metrics.register("chord_phi", "CHORD-phi: mean token weight p(1 - p) on demonstrations", metrics.PASS)


def phi(x: PartInputs, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Each demonstration token further weighted by the stop-gradient p (1 - p)."""
    p = x.logps.detach().exp()
    weight = weight * p * (1 - p)
    return weight, {"chord_phi": masked_mean(weight, x.mask).item()}


class ChordOptions(Options):
    variant: Literal["mu", "phi"] = Field(
        "mu", description="'mu': the mu schedule; 'phi': fixed mu = phi_mu and phi = p(1-p) token weights"
    )
    mu_peak: float = Field(0.9, ge=0, le=1, description="mu after its linear warm-up")
    mu_valley: float = Field(0.05, ge=0, le=1, description="mu after its cosine decay")
    mu_warmup_steps: int = Field(0, ge=0, description="steps of the linear warm-up of mu from 0")
    mu_decay_steps: int = Field(200, ge=0, description="steps of the cosine decay from mu_peak to mu_valley")
    phi_mu: float = Field(0.1, ge=0, le=1, description="variant 'phi': the fixed mu")
    beta: float = Field(0.0, ge=0, description="KL weight of its GRPO part (CHORD: none)")
    loss_type: names(LOSS_AGGREGATIONS) = Field("dapo", description="its GRPO part's aggregation")


def chord_mu(t: int, peak: float, valley: float, warmup: int, decay: int) -> float:
    """mu after t steps: linear 0 -> peak over ``warmup`` steps, cosine peak -> valley over ``decay``, then
    valley."""
    if t < warmup:
        return peak * t / warmup
    if t >= warmup + decay:
        return valley
    return valley + (peak - valley) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / decay))


@register_method
class Chord(Method):
    """CHORD: every step L = (1 - mu) L_GRPO(rollouts) + mu L_SFT(demonstrations), each a token mean."""

    name = "chord"
    paper = "arXiv 2508.11408"
    summary = "every step (1 - mu) GRPO + mu SFT, mu on a schedule (CHORD-mu) or fixed with p(1-p) weights (CHORD-phi)"
    Options = ChordOptions
    dynamics = ("mu",)
    repeatable_updates = False

    def mu(self, step: int) -> float:
        o = self.opts
        if o.variant == "phi":
            return o.phi_mu
        return chord_mu(step - 1, o.mu_peak, o.mu_valley, o.mu_warmup_steps, o.mu_decay_steps)

    def plan(self, step: int) -> Plan:
        gather = Gather(demos=self.demos_per_step, prompts=self.prompts_per_step, rollouts=self.group_size)
        return Plan(step, "mixed", gather, info={"mu": self.mu(step)})

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        mu, o = plan.info["mu"], self.opts
        sft = {"reweight": phi} if o.variant == "phi" else {}
        return [
            Part("sft", "nll", rows.kind == DEMO, mu, sft),
            Part("grpo", "pg", rows.kind == ROLLOUT, 1 - mu, {"beta": o.beta, "loss_type": o.loss_type}),
        ], {}
