"""Methods: what each optimizer step trains on. One class each, one registry line; see docs/methods.md.

A method is asked ``plan(step)`` before the step (which rows it needs: demonstrations, rollouts, the
demonstration inside each group), ``parts(plan, rows)`` once the rows are sampled and scored (the weighted
loss terms over them), and told ``observe(plan, grad_norm, probe)`` after the update. Its random draws come
from its own generator seeded from the run's seed, so every rank plans the same step; ``parts`` may differ
between ranks in which rows it picks (HPT routes each prompt), never in the parts it returns.

Options are a pydantic model per method (``Options``), validated like task options; the run's config holds
them under the method's name (``sasr.gamma``, ``chord.variant``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sasr.batch import DEMO, GROUP_KINDS, OFFPOLICY, PREFIXED, ROLLOUT, Hints, Part, Plan, Rows
from sasr.errors import SasrError, nearest, unknown
from sasr.losses import LOSS_AGGREGATIONS, REWARD_SCALES, names

PHASES = ("sft", "grpo", "mixed")


class Options(BaseModel):
    """A method's options (none by default); subclasses add fields with defaults and bounds."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Method:
    """Base: a subclass sets ``name``, ``Options``, and implements ``plan`` (and ``parts`` if not the usual)."""

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    # Metric keys its dynamics plots draw beside the phase strip.
    dynamics: ClassVar[tuple[str, ...]] = ()
    # True: trains each RL prompt's own demonstration, so demonstrations cannot come from another source.
    pairs_demos: ClassVar[bool] = False
    # True: the method starts with SFT steps counted by warmup_steps (the others ignore warmup_steps).
    uses_warmup: ClassVar[bool] = False
    uses_demos: ClassVar[bool] = True  # trains on demonstrations at some step
    uses_reference: ClassVar[bool] = True  # samples rollouts, whose KL to the reference is measured
    # In a comparison, this method may take as many SFT steps as the named one took with the same seed.
    sft_budget_from: ClassVar[str | None] = None
    # False: a step with rollouts also trains parts that no clipped ratio bounds (SFT, shaped or weighted
    # terms), so grpo.num_iterations > 1 would repeat them with no trust region.
    repeatable_updates: ClassVar[bool] = True
    # True: the parts depend on which groups were solved (the groups with equal rewards matter to it), so
    # grpo.dynamic_sampling, which drops those groups, would change the method.
    routes_by_outcome: ClassVar[bool] = False
    # True: ``outcomes`` is called after each step with rollouts (a collective: every process's groups).
    observes_outcomes: ClassVar[bool] = False

    def __init__(
        self,
        steps: int,
        warmup_steps: int = 0,
        seed: int = 0,
        demos_per_step: int = 8,
        prompts_per_step: int = 2,
        group_size: int = 8,
        **options: Any,
    ) -> None:
        self.steps, self.warmup_steps = steps, (warmup_steps if self.uses_warmup else 0)
        self.demos_per_step, self.prompts_per_step, self.group_size = (
            demos_per_step,
            prompts_per_step,
            group_size,
        )
        self.opts = self.check_options(options)
        self.check_budget(steps, warmup_steps)
        self.rng = random.Random(seed)  # one generator, seeded identically on every rank
        self.counts = dict.fromkeys(PHASES, 0)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> Options:
        """The validated options, or one sentence naming the bad one (and the nearest valid name)."""
        try:
            return cls.Options(**options)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            valid = list(cls.Options.model_fields)
            if err["type"] == "extra_forbidden":
                raise SasrError(
                    f"method '{cls.name}' has no option '{key}'{nearest(key, valid)}; "
                    f"options: {', '.join(valid) or 'none'}"
                ) from None
            msg = err["msg"].removeprefix("Value error, ")
            raise SasrError(f"config key '{cls.name}.{key}': {msg} (got {err.get('input')!r})") from None

    @classmethod
    def with_sft_steps(cls, options: dict[str, Any], sft_steps: int) -> dict[str, Any]:
        """Its options given ``sft_steps`` SFT steps (see ``sft_budget_from``); options set by hand win."""
        return options

    @classmethod
    def check_budget(cls, steps: int, warmup_steps: int) -> None:
        if cls.uses_warmup and warmup_steps >= steps:
            raise SasrError(
                f"warmup_steps ({warmup_steps}) must be shorter than steps ({steps}) for method '{cls.name}'"
            )

    # --- the three calls ------------------------------------------------------------------------------

    def plan(self, step: int) -> Plan:
        raise NotImplementedError

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        """The usual parts: SFT on the demonstrations, GRPO on the rollouts. Returns (parts, statistics)."""
        parts = []
        if plan.demos or plan.prompt_demos:
            parts.append(Part("sft", "nll", rows.kind == DEMO))
        if plan.prompts:
            parts.append(Part("grpo", "pg", rows.of_kind(ROLLOUT, OFFPOLICY)))
        return parts, {}

    @property
    def reference_step(self) -> int:
        """With ``grpo.reference=warmup``, the step after which the reference snapshot is taken (0: never, the
        loaded model stays the reference): the end of the SFT stage."""
        return self.warmup_steps

    def observe(self, plan: Plan, grad_norm: float | None, probe: float | None = None) -> None:
        """After the step: its pre-clip gradient norm (None when not finite: the update was skipped), and the
        probe's SFT gradient norm when the plan asked for one."""
        self.counts[plan.phase] += 1

    def outcomes(self, plan: Plan, solved: list[tuple[int, int]]) -> None:
        """With ``observes_outcomes``: (RL example index, correct rollouts) of every group of the step, every
        process's, in the same order on every process."""

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {**dict.fromkeys(PHASES, 0), **state["counts"]}
        self.rng.setstate(_as_rng_state(state["rng"]))

    # --- plans every method uses ------------------------------------------------------------------------

    def sft_plan(self, step: int, **info: float) -> Plan:
        return Plan(step, "sft", demos=self.demos_per_step, info=info)

    def grpo_plan(self, step: int, **info: float) -> Plan:
        return Plan(step, "grpo", prompts=self.prompts_per_step, rollouts=self.group_size, info=info)


def _as_rng_state(state: Any) -> tuple:
    # random.getstate() is (version, tuple_of_ints, gauss); after a JSON round trip it comes back as lists.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


# --- SASR and the baselines: one phase per step ----------------------------------------------------------


class SFTOnly(Method):
    name = "sft"
    uses_reference = False

    def plan(self, step: int) -> Plan:
        return self.sft_plan(step)


class GRPOOnly(Method):
    """GRPO from the loaded model: no warm-up, whatever warmup_steps says."""

    name = "grpo"
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


class SFTThenGRPO(Method):
    """The static two-stage hybrid: ``switch_step`` SFT steps (default warmup_steps), then GRPO; each stage may
    have its own optimiser settings (a peak rate with warm-up and a cosine to a floor for SFT, a constant rate
    for RL, weight decay, clip), as a fair two-stage baseline needs (arXiv 2604.23747)."""

    name = "sft-then-grpo"
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
            settings = {"lr": lr, "weight_decay": o.sft_weight_decay, "max_grad_norm": o.sft_max_grad_norm}
            return dataclasses.replace(self.sft_plan(step), **settings)
        settings = {
            "lr": o.rl_learning_rate,
            "weight_decay": o.rl_weight_decay,
            "max_grad_norm": o.rl_max_grad_norm,
            "fresh_optimizer": o.rl_fresh_optimizer and step == self.switch + 1,
        }
        return dataclasses.replace(self.grpo_plan(step), **settings)

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


class Interleave(Method):
    """Static mixture: after warm-up, SFT with fixed probability ``prob``, or every ``period``-th step."""

    name = "interleave"
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


class SASROptions(Options):
    gamma: float = Field(1.0, gt=0, description="p_t = g_last / (g_last + gamma * G_warmup)")
    probe_every: int = Field(
        0, ge=0, description="if > 0: every k-th GRPO step in a row also measures g_last (no update)"
    )


class SASR(Method):
    """Warm-up SFT, then SFT with probability p_t = g_last / (g_last + gamma * G_warmup), else GRPO.

    G_warmup is the pre-clip gradient norm of the last warm-up step; g_last that of the latest SFT step (or of
    the latest probe, with ``probe_every``).
    """

    name = "sasr"
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
        plan = self.grpo_plan(step, **info)
        k = self.opts.probe_every
        plan.probe = k > 0 and (self.grpo_streak + 1) % k == 0
        return plan

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


# --- the peers: SFT and RL inside one step ---------------------------------------------------------------


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


class Chord(Method):
    """CHORD: every step L = (1 - mu) L_GRPO(rollouts) + mu L_SFT(demonstrations), each a token mean."""

    name = "chord"
    Options = ChordOptions
    dynamics = ("mu",)
    repeatable_updates = False

    def mu(self, step: int) -> float:
        o = self.opts
        if o.variant == "phi":
            return o.phi_mu
        return chord_mu(step - 1, o.mu_peak, o.mu_valley, o.mu_warmup_steps, o.mu_decay_steps)

    def plan(self, step: int) -> Plan:
        return Plan(
            step,
            "mixed",
            demos=self.demos_per_step,
            prompts=self.prompts_per_step,
            rollouts=self.group_size,
            info={"mu": self.mu(step)},
        )

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        mu, o = plan.info["mu"], self.opts
        return [
            Part("sft", "nll", rows.kind == DEMO, mu, {"phi": o.variant == "phi"}),
            Part("grpo", "pg", rows.kind == ROLLOUT, 1 - mu, {"beta": o.beta, "loss_type": o.loss_type}),
        ], {}


class DrGRPOOptions(Options):
    """The RL part as HPT, LUFFY and SRFT's code computes it: no KL, Dr. GRPO's sum over tokens, advantages
    centred on the group mean and not divided by the std."""

    loss_type: names(LOSS_AGGREGATIONS) = Field("dr_grpo", description="aggregation of the RL part")
    scale_rewards: names(REWARD_SCALES) = Field(
        "none", description="what advantages are divided by (the paper: nothing, mean-centred only)"
    )


class HPTOptions(DrGRPOOptions):
    gate: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="a prompt trains with SFT when its fraction of correct rollouts is <= gate",
    )
    sft_loss_coef: float = Field(1.0, ge=0, description="weight of the SFT part")
    beta: float = Field(0.0, ge=0, description="KL weight of the RL part (HPT: none)")


class HPT(Method):
    """HPT: per prompt, after its rollouts are scored, RL on them if it was solved often enough (fraction
    correct > gate), else SFT on its demonstration (its rollouts dropped)."""

    name = "hpt"
    Options = HPTOptions
    pairs_demos = True
    repeatable_updates = False
    routes_by_outcome = True
    dynamics = ("sft_fraction",)

    def plan(self, step: int) -> Plan:
        return Plan(
            step,
            "mixed",
            prompts=self.prompts_per_step,
            rollouts=self.group_size,
            prompt_demos=True,
            scale_rewards=self.opts.scale_rewards,
        )

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        o = self.opts
        rollout, demo = rows.kind == ROLLOUT, rows.kind == DEMO
        n_groups = plan.prompts
        solved = torch.zeros(n_groups, device=rows.kind.device)
        solved.index_add_(0, rows.group[rollout], rows.correct[rollout].float())
        taught = torch.zeros(n_groups, dtype=torch.bool, device=rows.kind.device)
        taught[rows.group[demo]] = True  # [prompts]: with a demonstration (one without is RL only)
        to_sft = (solved / plan.rollouts <= o.gate) & taught  # [prompts]: the prompts routed to SFT
        # DEMO rows of the RL prompts carry their prompt's group number too (sasr.collect.Collector.collect).
        row_to_sft = to_sft[rows.group.clamp(min=0)]
        return [
            Part("sft", "nll", demo & row_to_sft, o.sft_loss_coef),
            Part("rl", "pg", rollout & ~row_to_sft, 1.0, {"beta": o.beta, "loss_type": o.loss_type}),
        ], {"sft_fraction": to_sft.float().mean().item()}


class LuffyOptions(DrGRPOOptions):
    num_demos: int = Field(1, ge=0, description="k: demonstrations in each group of num_generations rows")
    shaping_gamma: float = Field(0.1, gt=0, description="off-policy tokens weigh f(p) = p / (p + gamma)")
    beta: float = Field(0.0, ge=0, description="KL weight on the rollouts (LUFFY: none)")


class DemosInGroups(Method):
    """Base of LUFFY and SRFT: each GRPO group holds num_generations - k rollouts and k copies of its prompt's
    demonstration (options ``num_demos`` = k and ``scale_rewards``)."""

    pairs_demos = True
    repeatable_updates = False

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if self.opts.num_demos >= self.group_size:
            raise SasrError(
                f"method option '{self.name}.num_demos' ({self.opts.num_demos}) must be smaller than "
                f"grpo.num_generations ({self.group_size}): a group needs at least one rollout"
            )

    def plan(self, step: int) -> Plan:
        k = self.opts.num_demos
        return Plan(
            step,
            "mixed" if k else "grpo",
            prompts=self.prompts_per_step,
            rollouts=self.group_size - k,
            offpolicy=k,
            scale_rewards=self.opts.scale_rewards,
        )

    def offpolicy_share(self, rows: Rows) -> dict[str, float]:
        """The share of the groups' rows that are demonstrations (below k / G where prompts lack one)."""
        demos, group_rows = int((rows.kind == OFFPOLICY).sum()), int(rows.of_kind(ROLLOUT, OFFPOLICY).sum())
        return {"offpolicy_share": demos / group_rows}


class Luffy(DemosInGroups):
    """LUFFY: k demonstrations in each group; their tokens train with the shaped, unclipped off-policy term."""

    name = "luffy"
    Options = LuffyOptions
    dynamics = ("offpolicy_share", "offpolicy_shaped_weight")

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        o = self.opts
        options = {"beta": o.beta, "loss_type": o.loss_type, "shaping_gamma": o.shaping_gamma}
        return [Part("rl", "pg", rows.of_kind(ROLLOUT, OFFPOLICY), 1.0, options)], self.offpolicy_share(rows)


class SRFTOptions(DrGRPOOptions):
    num_demos: int = Field(1, ge=1, description="k: demonstrations in each group of num_generations rows")
    sft_coef: float = Field(0.5, ge=0, description="demonstration SFT weight: sft_coef * exp(-H)")
    rl_coef: float = Field(0.1, ge=0, description="correct self-rollout weight: rl_coef * exp(+H)")
    shaping_gamma: float = Field(
        0.1, gt=0, description="off-policy demonstration tokens weigh p / (p + gamma)"
    )


class SRFT(DemosInGroups):
    """SRFT: entropy-weighted SFT on the demonstrations, the same demonstrations as unclipped off-policy RL
    inside their group, and entropy-weighted self-rollout RL (correct rows pulled up, wrong ones down)."""

    name = "srft"
    Options = SRFTOptions
    dynamics = ("srft_sft_weight", "srft_rl_weight")

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        o = self.opts
        rl = {
            "beta": 0.0,
            "loss_type": o.loss_type,
            "shaping_gamma": o.shaping_gamma,
            "rollout_coef": o.rl_coef,
        }
        return [
            Part("sft", "nll", rows.kind == OFFPOLICY, 1.0, {"entropy_coef": o.sft_coef}),
            Part("rl", "pg", rows.of_kind(ROLLOUT, OFFPOLICY), 1.0, rl),
        ], self.offpolicy_share(rows)


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


class ReLIFT(Method):
    """ReLIFT: RL steps (advantage centred, not scaled); every prompt whose G rollouts all fail joins a buffer
    with its demonstration; once the buffer holds ``buffer_size``, the next step is SFT on the whole buffer,
    which then empties. The buffer is the same on every process (their failures are gathered)."""

    name = "relift"
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
            pool = tuple(self.buffer)
            return Plan(
                step,
                "sft",
                demo_pool=pool,
                lr=o.sft_learning_rate,
                max_grad_norm=o.sft_max_grad_norm,
                info=info,
            )
        plan = self.grpo_plan(step, **info)
        return dataclasses.replace(plan, scale_rewards="none")

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        if plan.demo_pool:
            return [Part("sft", "nll", rows.kind == DEMO)], {}
        o, rollout = self.opts, rows.kind == ROLLOUT
        solved = torch.zeros(plan.prompts, device=rows.kind.device)
        solved.index_add_(0, rows.group[rollout], rows.correct[rollout].float())
        options = {"beta": o.beta, "epsilon_high": o.epsilon_high, "loss_type": o.loss_type}
        return [Part("grpo", "pg", rollout, 1.0, options)], {
            "relift_failed": (solved == 0).float().mean().item()
        }

    def outcomes(self, plan: Plan, solved: list[tuple[int, int]]) -> None:
        self.buffer += [example for example, correct in solved if correct == 0]

    def observe(self, plan: Plan, grad_norm: float | None, probe: float | None = None) -> None:
        super().observe(plan, grad_norm, probe)
        if plan.demo_pool:  # the SFT step on the buffer was taken: it empties
            self.buffer = []

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.buffer = list(state["buffer"])


class UFTOptions(Options):
    variant: Literal["uft", "r3"] = Field(
        "uft", description="uft: hint lengths on a schedule and the hint's NLL; r3: uniform lengths, no NLL"
    )
    hint_steps: int | None = Field(
        None, ge=1, description="steps with hints (their 300 of 500); null: 60% of the run's steps"
    )
    p_start: float = Field(0.95, ge=0, le=1, description="the chance of each hint part at step 1")
    p_end: float = Field(0.05, ge=0, le=1, description="... at the last hinted step (a cosine between)")
    hint_chunks: int = Field(5, ge=1, description="the demonstration is shown in up to this many equal parts")
    sft_coef: float = Field(0.001, ge=0, description="weight of the hint tokens' NLL (uft)")
    beta: float = Field(0.001, ge=0, description="KL weight of the RL part (their 0.001)")


class UFT(Method):
    """UFT (and R3): GRPO on prompts extended with the start of their own demonstration (a hint whose length
    shrinks on a schedule to none), plus a small NLL on the hint's tokens; evaluation never shows a hint."""

    name = "uft"
    Options = UFTOptions
    pairs_demos = True
    repeatable_updates = False
    dynamics = ("uft_hint_p", "uft_hint_share")

    @property
    def hint_steps(self) -> int:
        return self.opts.hint_steps or max(1, round(0.6 * self.steps))

    def hint_p(self, step: int) -> float:
        """p(t): a cosine from p_start at step 1 to p_end at hint_steps, then 0."""
        o, n = self.opts, self.hint_steps
        return 0.0 if step > n else cosine(step, o.p_start, o.p_end, n)

    def plan(self, step: int) -> Plan:
        o, p = self.opts, self.hint_p(step)
        hinted = step <= self.hint_steps
        hints = Hints(p, o.hint_chunks, o.variant == "r3", o.variant == "uft") if hinted else None
        info = {"uft_hint_p": p} if o.variant == "uft" else {}
        plan = self.grpo_plan(step, **info)
        phase = "mixed" if hints is not None and hints.train else "grpo"  # the hint's NLL is an SFT part
        return dataclasses.replace(plan, phase=phase, hints=hints)

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        o = self.opts
        parts = [Part("rl", "pg", rows.kind == ROLLOUT, 1.0, {"beta": o.beta})]
        if plan.hints is not None and plan.hints.train:
            parts.append(Part("hint", "nll", rows.kind == DEMO, o.sft_coef))
        return parts, {}


class PrefixRFTOptions(Options):
    num_prefixed: int = Field(
        1, ge=1, description="rows of each group of num_generations that continue the prompt's prefix"
    )
    prefix_start: float = Field(
        0.95, ge=0, le=1, description="the prefix's share of the demonstration at step 1"
    )
    prefix_end: float = Field(
        0.05, ge=0, le=1, description="... at prefix_steps and after (a cosine between)"
    )
    prefix_steps: int | None = Field(None, ge=1, description="steps of the cosine; null: the whole run")
    prefix_entropy_top: float = Field(
        0.2, gt=0, le=1, description="rho: the share of prefix tokens, highest entropy first, that train"
    )
    prefix_epsilon: float | None = Field(
        None, gt=0, description="the prefix tokens' clip range below 1; null: grpo.epsilon"
    )
    prefix_epsilon_high: float | None = Field(
        None, gt=0, description="... above 1; null: the rollouts' (grpo.epsilon_high, else epsilon)"
    )
    loss_type: names(LOSS_AGGREGATIONS) = Field("dr_grpo", description="aggregation of the RL part")
    scale_rewards: Literal["none", "group"] = Field(
        "none", description="what advantages are divided by: nothing (their dr_grpo), or the subgroup's std"
    )
    beta: float = Field(0.0, ge=0, description="KL weight (Prefix-RFT: none)")


class PrefixRFT(Method):
    """Prefix-RFT: in each group, ``num_prefixed`` rows start with the first l(t) of the prompt's demonstration
    (l on a cosine from 0.95 to 0.05) and go on with what the policy samples; advantages centred within each
    (prompt, prefix) subgroup; the prefix tokens train as off-policy tokens with their own advantage and clip,
    only the highest-entropy share rho of them; the sampled tokens as rollouts."""

    name = "prefix-rft"
    Options = PrefixRFTOptions
    pairs_demos = True
    dynamics = ("prefix_fraction", "prefix_accuracy")

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if self.opts.num_prefixed >= self.group_size:
            raise SasrError(
                f"method option 'prefix-rft.num_prefixed' ({self.opts.num_prefixed}) must be smaller than "
                f"grpo.num_generations ({self.group_size}): a group needs on-policy rollouts"
            )

    def fraction(self, step: int) -> float:
        """l(t): a cosine from prefix_start at step 1 to prefix_end at prefix_steps, then prefix_end."""
        o = self.opts
        n = o.prefix_steps or self.steps
        return o.prefix_end if step > n else cosine(step, o.prefix_start, o.prefix_end, n)

    def plan(self, step: int) -> Plan:
        n, l_t = self.opts.num_prefixed, self.fraction(step)
        return Plan(
            step,
            "mixed",
            prompts=self.prompts_per_step,
            rollouts=self.group_size - n,
            prefixed=n,
            prefix_fraction=l_t,
            scale_rewards=self.opts.scale_rewards,
            info={"prefix_fraction": l_t},
        )

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        o = self.opts
        options = {
            "beta": o.beta,
            "loss_type": o.loss_type,
            "prefix_epsilon": o.prefix_epsilon,
            "prefix_epsilon_high": o.prefix_epsilon_high,
            "prefix_entropy_top": o.prefix_entropy_top,
        }
        prefixed = rows.kind == PREFIXED
        stats = {"prefix_share": prefixed.sum().item() / rows.of_kind(*GROUP_KINDS).sum().item()}
        if prefixed.any():  # no prompt with a demonstration: no prefixed row to report on
            stats["prefix_accuracy"] = rows.correct[prefixed].float().mean().item()
        return [Part("rl", "pg", rows.of_kind(ROLLOUT, PREFIXED), 1.0, options)], stats


def cosine(step: int, start: float, end: float, steps: int) -> float:
    """A cosine from ``start`` at step 1 to ``end`` at ``steps``."""
    t = (step - 1) / max(steps - 1, 1)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        SASR,
        SFTOnly,
        GRPOOnly,
        SFTThenGRPO,
        Interleave,
        Chord,
        HPT,
        Luffy,
        SRFT,
        ReLIFT,
        UFT,
        PrefixRFT,
    )
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise unknown("method", name, METHODS)
    return METHODS[name]


def get_method(name: str, **kwargs: Any) -> Method:
    """A method by name, built with the run's budget (steps, warmup_steps, seed, batch sizes) and its options."""
    return method_class(name)(**kwargs)
