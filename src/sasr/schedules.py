"""Schedules: which of SFT or GRPO each optimizer step runs. Small, pure, and separately tested.

A schedule is asked ``decide(step)`` before the step and told ``observe(decision, grad_norm)`` after it,
with the step's pre-clip global gradient norm. Its random draws come from its own generator, seeded from
the run's seed, so every process draws the same numbers and takes the same branch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

from sasr.errors import SasrError, unknown

Phase = Literal["sft", "grpo"]


@dataclass
class Decision:
    step: int  # 1-based optimizer step
    phase: Phase
    info: dict[str, float] = field(
        default_factory=dict
    )  # what the choice was computed from (p_t, alpha, ...)


class Schedule:
    """Base: subclasses implement ``decide``; ``observe`` and the state are shared."""

    name: str = ""

    def __init__(self, steps: int, warmup_steps: int = 0, seed: int = 0, **_: Any) -> None:
        self.steps, self.warmup_steps = steps, warmup_steps
        self.rng = random.Random(seed)  # one generator, seeded identically on every rank
        self.counts = {"sft": 0, "grpo": 0}

    def decide(self, step: int) -> Decision:
        raise NotImplementedError

    def observe(self, decision: Decision, grad_norm: float | None) -> None:
        """After the step: its pre-clip gradient norm, or None when it was not finite (update skipped)."""
        self.counts[decision.phase] += 1

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = dict(state["counts"])
        self.rng.setstate(_as_rng_state(state["rng"]))


def _as_rng_state(state: Any) -> tuple:
    # random.getstate() is (version, tuple_of_ints, gauss); after a JSON round trip it comes back as lists.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


class SFTOnly(Schedule):
    name = "sft"

    def decide(self, step: int) -> Decision:
        return Decision(step, "sft")


class GRPOOnly(Schedule):
    """GRPO from the loaded model: no warm-up, whatever warmup_steps says."""

    name = "grpo"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **{**kw, "warmup_steps": 0})

    def decide(self, step: int) -> Decision:
        return Decision(step, "grpo")


class SFTThenGRPO(Schedule):
    """The static two-stage hybrid: W SFT steps, then GRPO."""

    name = "sft-then-grpo"

    def decide(self, step: int) -> Decision:
        return Decision(step, "sft" if step <= self.warmup_steps else "grpo")


class Interleave(Schedule):
    """Static mixture: after warm-up, SFT with fixed probability p, or every k-th step when period > 0."""

    name = "interleave"

    def __init__(
        self, *args: Any, interleave_prob: float = 0.5, interleave_period: int = 0, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.p, self.period = interleave_prob, interleave_period

    def decide(self, step: int) -> Decision:
        if step <= self.warmup_steps:
            return Decision(step, "sft")
        if self.period > 0:
            return Decision(step, "sft" if (step - self.warmup_steps) % self.period == 0 else "grpo")
        alpha = self.rng.random()
        return Decision(step, "sft" if alpha < self.p else "grpo", {"p_t": self.p, "alpha": alpha})


class SASR(Schedule):
    """METHOD.md §1-2: warm-up SFT, then SFT with probability p_t = g_last / (g_last + gamma * G_warmup).

    G_warmup is the pre-clip gradient norm of the last warm-up step; g_last that of the latest SFT step.
    """

    name = "sasr"

    def __init__(self, *args: Any, gamma: float = 1.0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.gamma = gamma
        self.g_warmup: float | None = None
        self.g_last: float | None = None

    def decide(self, step: int) -> Decision:
        if step <= self.warmup_steps:
            return Decision(step, "sft")
        if self.g_warmup is None or self.g_last is None:
            raise SasrError(
                f"warm-up ended at step {self.warmup_steps} without a finite gradient norm to set G_warmup"
            )
        p_t = self.g_last / (self.g_last + self.gamma * self.g_warmup)
        alpha = self.rng.random()  # alpha ~ U(0, 1), drawn only in the adaptive phase
        phase: Phase = "sft" if alpha < p_t else "grpo"
        return Decision(
            step, phase, {"p_t": p_t, "alpha": alpha, "g_last": self.g_last, "g_warmup": self.g_warmup}
        )

    def observe(self, decision: Decision, grad_norm: float | None) -> None:
        super().observe(decision, grad_norm)
        if decision.phase == "sft" and grad_norm is not None:
            self.g_last = float(grad_norm)
            if decision.step == self.warmup_steps:
                self.g_warmup = float(grad_norm)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "g_warmup": self.g_warmup, "g_last": self.g_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.g_warmup, self.g_last = state["g_warmup"], state["g_last"]


SCHEDULES: dict[str, type[Schedule]] = {s.name: s for s in (SASR, SFTOnly, GRPOOnly, SFTThenGRPO, Interleave)}


def get_schedule(name: str, **kwargs: Any) -> Schedule:
    """A schedule by method name; kwargs a schedule does not use are ignored."""
    if name not in SCHEDULES:
        raise unknown("method", name, SCHEDULES)
    return SCHEDULES[name](**kwargs)
