"""SDFT (arXiv 2601.19897, "Self-Distillation Enables Continual Learning"): the policy samples completions from
the prompt alone; a teacher, the same model shown the prompt's demonstration, scores the same tokens; the loss
pulls the student's token distribution towards the teacher's (docs/methods.md). TRL 1.16's
``trl.experimental.sdft`` is the reference: its option names and defaults, its loss.

The teacher and the loss are ``sasr.methods.self_distillation``'s (shared with SDPO). ``generate_from_teacher``
samples the rollouts from the teacher's prompt (a prompt extension that only samples).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import Field, model_validator

from sasr import metrics
from sasr.batch import CONTEXTS, PROMPT_EXTENSIONS, ROLLOUT, Ask, Gather, Part, Plan, PromptExtension, Rows
from sasr.errors import SasrError
from sasr.methods.base import register_method
from sasr.methods.self_distillation import (
    MODES,
    DistillationOptions,
    SelfDistillation,
    register_metrics,
    register_teacher,
    teacher_chat,
)

CONTEXT = "sdft_teacher"  # the teacher's prompt of each group row (Rows.contexts; Rows.extras: 1 where given)

register_metrics("sdft", "SDFT")
metrics.register(
    "sdft_no_demonstration", "SDFT: share of group rows whose prompt has no demonstration", metrics.ROLLOUTS
)
register_teacher(CONTEXT)


def demonstration_chat(c, example, template: str, skip: bool) -> list[dict] | None:
    """The teacher's chat of ``example``, as TRL's DemonstrationTeacherContextBuilder composes it: the turns
    before the last kept, the last user turn rewritten by ``template`` with the prompt's own demonstration;
    None for a prompt without one (with ``skip``; an error otherwise)."""
    if not c.has_demonstration(c.index_of(example)):
        if skip:
            return None
        raise SasrError(
            f"SDFT shows the teacher each prompt's demonstration, and RL prompt {example.question[:60]!r} has "
            "none; give every prompt one, draw only those that have one "
            "(sdft.prompts_with_demonstration_only=true), or set sdft.skip_prompts_without_demonstration=true"
        )
    return teacher_chat(c.task.messages(example), template, privileged_context=c.task.target(example))


def teacher_contexts(c, step: int, examples: list, rows: Rows, template: str, skip: bool):
    """Each group row's teacher chat (``demonstration_chat`` of its prompt)."""
    by_group = {g: demonstration_chat(c, examples[g], template, skip) for g in set(rows.group.tolist())}
    chats = [by_group[g] for g in rows.group.tolist()]
    missing = sum(chat is None for chat in chats) / max(len(chats), 1)
    return CONTEXT, chats, {"sdft_no_demonstration": missing}


def generation_chat(c, step: int, example, template: str, skip: bool) -> list[dict]:
    """generate_from_teacher: the chat the rollouts are sampled from, the teacher's (its own without one)."""
    return demonstration_chat(c, example, template, skip) or c.task.messages(example)


CONTEXTS.add(CONTEXT, teacher_contexts)
PROMPT_EXTENSIONS.add("sdft_generation", PromptExtension(generation_chat, where="chat", sample_only=True))


class SDFTOptions(DistillationOptions):
    distillation_mode: Literal[MODES] = Field(
        "topk_logits", description=DistillationOptions.model_fields["distillation_mode"].description
    )
    distillation_topk: int | None = Field(100, ge=1, description="k of topk_logits")
    distillation_alpha: float = Field(
        0.5, ge=0, le=1, description="0 forward KL, 1 reverse KL, between: generalized JSD (sampled_token: 1)"
    )
    num_loss_tokens_to_skip: int = Field(0, ge=0, description="the first N completion tokens carry no loss")
    teacher_prompt_template: str = Field(
        "{prompt}\n\n{privileged_context}",
        description="the teacher's last user turn: {prompt} its text, {privileged_context} the demonstration",
    )
    skip_prompts_without_demonstration: bool = Field(
        False, description="a prompt without a demonstration trains nothing (false: an error)"
    )
    prompts_with_demonstration_only: bool = Field(
        False, description="draw RL prompts only from those with a demonstration (few demonstrations)"
    )
    generate_from_teacher: bool = Field(
        False,
        description="sample the rollouts from the teacher's prompt (the student trains on them off-policy)",
    )

    @model_validator(mode="after")
    def _template(self) -> SDFTOptions:
        for field in ("{prompt}", "{privileged_context}"):
            if field not in self.teacher_prompt_template:
                raise ValueError(f"teacher_prompt_template must hold {field}")
        return self


@register_method
class SDFT(SelfDistillation):
    """SDFT: rollouts from the prompt alone, distilled towards the same model shown the demonstration."""

    name = "sdft"
    paper = "arXiv 2601.19897"
    summary = "rollouts from the prompt alone, distilled towards the model shown the prompt's demonstration"
    Options = SDFTOptions
    pairs_demos = True
    dynamics = ("sdft_teacher_kl", "sdft_distillation_loss", "sdft_is_clip_fraction")

    def plan(self, step: int) -> Plan:
        o = self.opts
        ask = Ask(
            CONTEXT, {"template": o.teacher_prompt_template, "skip": o.skip_prompts_without_demonstration}
        )
        only = o.prompts_with_demonstration_only
        gather = Gather(
            prompts=self.prompts_per_step, paired_only=only, rollouts=self.group_size, contexts=ask
        )
        if o.generate_from_teacher:
            gather = dataclasses.replace(gather, extend_prompts=Ask("sdft_generation", ask.args))
        return Plan(step, "grpo", gather)

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        o = self.opts
        options = {**self.distill_options(CONTEXT, "sdft"), "skip_tokens": o.num_loss_tokens_to_skip}
        return [Part("distill", "self_distill", rows.kind == ROLLOUT, 1.0, options)], {}
