"""SASR (arXiv 2505.13026): warm-up SFT, then at every step SFT with probability p_t, else GRPO."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from sasr import metrics
from sasr.batch import Gather, Plan
from sasr.errors import SasrError
from sasr.methods.base import Method, Options, register_method

metrics.register("p_t", "SASR: the probability of an SFT step; interleave: its fixed prob")
metrics.register("alpha", "SASR / interleave: the uniform draw compared with p_t")
metrics.register("g_last", "SASR: the gradient norm p_t was computed from")
metrics.register("g_warmup", "SASR: the gradient norm of the last warm-up step")


class SASROptions(Options):
    gamma: float = Field(1.0, gt=0, description="p_t = g_last / (g_last + gamma * G_warmup)")
    probe_every: int = Field(
        0, ge=0, description="if > 0: every k-th GRPO step in a row also measures g_last (no update)"
    )


@register_method
class SASR(Method):
    """Warm-up SFT, then SFT with probability p_t = g_last / (g_last + gamma * G_warmup), else GRPO.

    G_warmup is the pre-clip gradient norm of the last warm-up step; g_last that of the latest SFT step (or of
    the latest probe, with ``probe_every``).
    """

    name = "sasr"
    paper = "arXiv 2505.13026"
    summary = "warm-up SFT, then SFT with probability p_t (from the SFT gradient norm), else GRPO"
    Options = SASROptions
    uses_warmup = True
    dynamics = ("p_t",)

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.g_warmup: float | None = None
        self.g_last: float | None = None
        self.grpo_streak = 0  # GRPO steps in a row since the last SFT step

    @classmethod
    def check_budget(cls, steps: int, warmup_steps: int) -> None:
        super().check_budget(steps, warmup_steps)
        if warmup_steps < 1:
            raise SasrError("method 'sasr' needs warmup_steps >= 1 to measure G_warmup")

    def plan(self, step: int) -> Plan:
        if step <= self.warmup_steps:
            return self.sft_plan(step)
        if self.g_warmup is None or self.g_last is None:
            raise SasrError(
                f"warm-up ended at step {self.warmup_steps} without a finite gradient norm to set G_warmup"
            )
        p_t = self.g_last / (self.g_last + self.opts.gamma * self.g_warmup)
        alpha = self.rng.random()  # alpha ~ U(0, 1), drawn only in the adaptive phase
        info = {"p_t": p_t, "alpha": alpha, "g_last": self.g_last, "g_warmup": self.g_warmup}
        if alpha < p_t:
            return self.sft_plan(step, **info)
        k = self.opts.probe_every
        probe = k > 0 and (self.grpo_streak + 1) % k == 0
        gather = Gather(prompts=self.prompts_per_step, rollouts=self.group_size, probe=probe)
        return Plan(step, "grpo", gather, info=info)

    def observe(self, plan: Plan, grad_norm: float | None, probe: float | None = None) -> None:
        super().observe(plan, grad_norm)
        if plan.phase == "sft" and grad_norm is not None:
            self.g_last = float(grad_norm)
            if plan.step == self.warmup_steps:
                self.g_warmup = float(grad_norm)
        self.grpo_streak = self.grpo_streak + 1 if plan.phase == "grpo" else 0
        if probe is not None:
            self.g_last = float(probe)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "g_warmup": self.g_warmup,
            "g_last": self.g_last,
            "grpo_streak": self.grpo_streak,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.g_warmup, self.g_last = state["g_warmup"], state["g_last"]
        self.grpo_streak = state.get("grpo_streak", 0)
