"""What every method is: its options, the three calls the trainer makes of it, and the plans most of them use.

A method is asked ``plan(step)`` before the step (what the collector gathers, what the learner applies, what
the record shows: ``sasr.batch.Plan``), ``parts(plan, rows)`` once the rows are sampled and scored (the
weighted loss terms over them), and told ``observe(plan, grad_norm, probe)`` after the update. Its random draws
come from its own generator seeded from the run's seed, so every rank plans the same step; ``parts`` may differ
between ranks in which rows it picks (HPT routes each prompt), never in the parts it returns. Its options are
a pydantic model (``Options``), held by the run's config under the method's name (``sasr.gamma``).
"""

from __future__ import annotations

import math
import random
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sasr.batch import DEMO, ROLLOUT, Gather, Part, Plan, Rows
from sasr.errors import SasrError, nearest
from sasr.losses import LOSS_AGGREGATIONS, REWARD_SCALES, names
from sasr.registry import Registry

PHASES = ("sft", "grpo", "mixed")


class Options(BaseModel):
    """A method's options (none by default); subclasses add fields with defaults and bounds."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Method:
    """Base: a subclass sets ``name``, ``Options``, and implements ``plan`` (and ``parts`` if not the usual)."""

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    paper: ClassVar[str] = ""  # where it comes from (the README's methods table)
    summary: ClassVar[str] = ""  # what a step trains on, in a line (the README's methods table)
    dynamics: ClassVar[tuple[str, ...]] = ()  # metric keys its dynamics plots draw beside the phase strip
    # True: trains each RL prompt's own demonstration, so demonstrations cannot come from another source.
    pairs_demos: ClassVar[bool] = False
    # True: the method starts with SFT steps counted by warmup_steps (the others ignore warmup_steps).
    uses_warmup: ClassVar[bool] = False
    uses_demos: ClassVar[bool] = True  # trains on demonstrations at some step
    uses_reference: ClassVar[bool] = True  # samples rollouts, whose KL to the reference is measured
    sft_budget_from: ClassVar[str | None] = None  # compare: take the SFT steps this method took (same seed)
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
        processes: int = 1,
        **options: Any,
    ) -> None:
        self.steps, self.warmup_steps = steps, (warmup_steps if self.uses_warmup else 0)
        self.processes = processes  # the run's processes (a step's RL prompts: prompts_per_step x processes)
        self.demos_per_step, self.prompts_per_step = demos_per_step, prompts_per_step
        self.group_size = group_size
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
        parts, g = [], plan.gather
        if g.demos or g.sources:
            parts.append(Part("sft", "nll", rows.kind == DEMO))
        if g.prompts:
            parts.append(Part("grpo", "pg", rows.kind == ROLLOUT))
        return parts, {}

    @property
    def reference_step(self) -> int:
        """With ``grpo.reference=warmup``, the step after which the reference snapshot is taken (0: never, the
        loaded model stays the reference): the end of the SFT stage."""
        return self.warmup_steps

    def attach(self, model: Any, use_lora: bool) -> None:
        """The model the run trains, before its first step and before a resume reads ``tensors``."""

    def observe(self, plan: Plan, grad_norm: float | None, probe: float | None = None) -> None:
        """After the step: its pre-clip gradient norm (None when not finite: the update was skipped), and the
        probe's SFT gradient norm when the plan asked for one."""
        self.counts[plan.phase] += 1

    def outcomes(self, plan: Plan, solved: list[tuple[int, int]]) -> None:
        """With ``observes_outcomes``: (RL example index, correct rollouts) of every group of the step that
        has a demonstration to pair, every process's, in the same order on every process; told once the
        step's rows are scored, before its parts are made."""

    def follow_up(self, plan: Plan) -> Plan | None:
        """With ``observes_outcomes``, once ``outcomes`` was told: the step's plan grown by what its outcomes
        call for (more row sources in ``gather.sources``, more ``updates``), or None. The same on every
        process (the outcomes are every process's)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of the method (JSON-able; tensors go in ``tensors()``)."""
        return {"counts": dict(self.counts), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {**dict.fromkeys(PHASES, 0), **state["counts"]}
        self.rng.setstate(_as_rng_state(state["rng"]))

    def tensors(self) -> dict[str, Any]:
        """Tensors a resumed run needs of the method (saved beside the checkpoint's weights), by name."""
        return {}

    def load_tensors(self, tensors: dict[str, Any]) -> None:  # what ``tensors()`` returned
        pass

    # --- plans every method uses ------------------------------------------------------------------------

    def sft_plan(self, step: int, **info: float) -> Plan:
        return Plan(step, "sft", Gather(demos=self.demos_per_step), info=info)

    def grpo_plan(self, step: int, **info: float) -> Plan:
        return Plan(step, "grpo", Gather(prompts=self.prompts_per_step, rollouts=self.group_size), info=info)


def _as_rng_state(state: Any) -> tuple:
    # random.getstate() is (version, tuple_of_ints, gauss); after a JSON round trip it comes back as lists.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def cosine(step: int, start: float, end: float, steps: int) -> float:
    """A cosine from ``start`` at step 1 to ``end`` at ``steps``."""
    t = (step - 1) / max(steps - 1, 1)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


class DrGRPOOptions(Options):
    """The RL part as HPT, LUFFY and SRFT's code computes it: no KL, Dr. GRPO's sum over tokens, advantages
    centred on the group mean and not divided by the std."""

    loss_type: names(LOSS_AGGREGATIONS) = Field("dr_grpo", description="aggregation of the RL part")
    scale_rewards: names(REWARD_SCALES) = Field(
        "none", description="what advantages are divided by (the paper: nothing, mean-centred only)"
    )


METHODS: Registry[type[Method]] = Registry(
    "method",
    "sasr.methods.METHODS",
    "a method class (`@register_method`; a user's class joins it from `--method file.py:Class`)",
)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: the method joins the registry under its ``name``."""
    return METHODS.add(cls.name, cls)
