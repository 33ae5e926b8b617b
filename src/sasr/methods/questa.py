"""QuestA (arXiv 2507.13266, "Expanding Reasoning Capacity in LLMs via Question Augmentation"): GRPO on
questions that carry the start of their own solution as a hint, a long one first (50%) then a shorter one
(25%); the hint is part of the prompt, so no loss falls on it, and evaluation never shows one
(docs/methods.md). The authors' code (foreverlasting1202/QuestA, ``AReaL/datasets/add_prefix.py``) writes the
hinted question as the problem, a blank line, ``## Hint.`` and the solution's start, and shows no hint when
that start is under 10 characters.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from sasr import batch, metrics
from sasr.batch import Ask, Gather, Plan
from sasr.methods.base import Method, Options, register_method

metrics.register(
    "questa_hint_ratio", "QuestA: the share of each demonstration shown as the hint at this step"
)


def hint(c, step: int, example, ratio: float, template: str, min_chars: int) -> str:
    """The text ``example``'s question ends with: ``template`` around the first ``ratio`` of its
    demonstration's characters (after any ``</think>``), or nothing when that is under ``min_chars``
    characters or the example has no demonstration."""
    if not c.has_demonstration(c.index_of(example)):
        return ""
    solution = c.task.target(example).split("</think>")[-1]
    start = solution[: int(len(solution) * ratio)]
    return "" if len(start) < min_chars else template.format(hint=start)


batch.PROMPT_EXTENSIONS.add("questa_hint", batch.PromptExtension(hint, where="question"))


class QuestAOptions(Options):
    hint_ratio: float = Field(
        0.5, ge=0, le=1, description="the share of the demonstration shown, first stage"
    )
    second_hint_ratio: float = Field(0.25, ge=0, le=1, description="the share shown in the second stage")
    second_stage_step: int | None = Field(
        None, ge=1, description="the second stage's first step; null: the middle of the run"
    )
    hint_template: str = Field("\n\n## Hint.{hint}", description="how the hint ends the question ({hint})")
    min_hint_chars: int = Field(10, ge=0, description="a shorter hint is not shown (theirs: 10 characters)")

    @model_validator(mode="after")
    def _template(self) -> QuestAOptions:
        if "{hint}" not in self.hint_template:
            raise ValueError("hint_template must hold {hint}")
        return self


@register_method
class QuestA(Method):
    """QuestA: GRPO on questions that end with the start of their demonstration (50%, then 25%)."""

    name = "questa"
    paper = "arXiv 2507.13266"
    summary = "GRPO on questions ending with the start of their demonstration as a hint (50%, then 25%)"
    Options = QuestAOptions
    pairs_demos = True
    dynamics = ("questa_hint_ratio",)

    def plan(self, step: int) -> Plan:
        o = self.opts
        second = o.second_stage_step or self.steps // 2 + 1
        ratio = o.hint_ratio if step < second else o.second_hint_ratio
        args = {"ratio": ratio, "template": o.hint_template, "min_chars": o.min_hint_chars}
        gather = Gather(
            prompts=self.prompts_per_step, rollouts=self.group_size, extend_prompts=Ask("questa_hint", args)
        )
        return Plan(step, "grpo", gather, info={"questa_hint_ratio": ratio})
