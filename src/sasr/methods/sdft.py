"""SDFT (arXiv 2601.19897, "Self-Distillation Enables Continual Learning"): the policy samples completions from
the prompt alone; a teacher, the same model shown the prompt's demonstration, scores the same tokens; the loss
pulls the student's token distribution towards the teacher's (docs/methods.md). TRL 1.16's
``trl.experimental.sdft`` is the reference: its option names and defaults, its loss.

Here: TRL's ``sampled_token`` objective (the reverse KL's score-function gradient on the sampled tokens, with
its clipped importance ratio when the update reuses rollouts), teachers ``base`` (the initial weights: the LoRA
adapter off) and ``live`` (the current weights). Not yet: ``topk_logits`` / ``full_logits`` (they need the
student's whole distribution in the policy pass), the ``ema`` teacher, ``generate_from_teacher``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from sasr import metrics
from sasr.batch import CONTEXTS, ROLLOUT, Ask, Gather, Part, Plan, Rows
from sasr.errors import SasrError
from sasr.logprobs import completion_logprobs
from sasr.losses import LOSS_AGGREGATIONS, PART_LOSSES, LossTerm, PartInputs, PartLoss, masked_mean
from sasr.methods.base import Method, Options, register_method
from sasr.passes import PASSES, Pass

CONTEXT = "sdft_teacher"  # the teacher's prompt of each group row (Rows.contexts; Rows.extras: 1 where given)

metrics.register_all(
    [
        (
            "sdft_distillation_loss",
            "SDFT: token mean of the distillation loss (TRL's logged value)",
            metrics.PASS,
        ),
        (
            "sdft_teacher_kl",
            "SDFT: token mean of log pi(y) - log teacher(y) on the sampled tokens",
            metrics.PASS,
        ),
        ("sdft_is_clip_fraction", "SDFT: share of tokens whose importance ratio hit the clip", metrics.PASS),
        (
            "sdft_no_demonstration",
            "SDFT: share of group rows whose prompt has no demonstration",
            metrics.ROLLOUTS,
        ),
    ]
)


def teacher_chat(messages: list[dict], demonstration: str, template: str) -> list[dict]:
    """The teacher's chat, as TRL's DemonstrationTeacherContextBuilder makes it: the turns before the last
    kept, the last (a user turn) replaced by ``template`` filled with its text and the demonstration."""
    if not messages or messages[-1].get("role") != "user":
        raise SasrError("SDFT's teacher prompt needs a prompt that ends with a user turn")
    text = template.format(prompt=messages[-1]["content"], privileged_context=demonstration)
    return [*messages[:-1], {"role": "user", "content": text}]


def teacher_contexts(c, step: int, examples: list, rows: Rows, template: str, skip: bool):
    """Each group row's teacher chat: its prompt with the prompt's own demonstration (``task.target``)."""
    chats = []
    for g in rows.group.tolist():
        ex = examples[g]
        if not c.has_demonstration(c.index_of(ex)):
            if not skip:
                raise SasrError(
                    f"SDFT shows the teacher each prompt's demonstration, and RL prompt {ex.question[:60]!r} has "
                    "none; give every prompt one, or set sdft.skip_prompts_without_demonstration=true"
                )
            chats.append(None)
            continue
        chats.append(teacher_chat(c.task.messages(ex), c.task.target(ex), template))
    missing = sum(chat is None for chat in chats) / max(len(chats), 1)
    return CONTEXT, chats, {"sdft_no_demonstration": missing}


CONTEXTS.add(CONTEXT, teacher_contexts)


def teacher_logprobs(learner, rows: Rows, temperature: float, live: bool) -> torch.Tensor:
    """The teacher's log-probabilities of each row's completion under its teacher prompt [b, T]: the current
    weights (``live``) or the initial ones (the reference policy: LoRA's adapter off, else its snapshot)."""
    ids, mask = rows.contexts[CONTEXT]
    T = rows.completion_ids.size(1)
    input_ids = torch.cat([ids, rows.completion_ids], dim=1)
    attention = torch.cat([mask, rows.completion_mask], dim=1)
    with learner.accelerator.autocast():
        if live:
            model = learner.accelerator.unwrap_model(learner.model)
            return completion_logprobs(model, input_ids, attention, T, temperature)[0]
        return learner.reference.logprobs(input_ids, attention, T, temperature)


PASSES.add("sdft_teacher_base", Pass(lambda learner, rows, t: teacher_logprobs(learner, rows, t, False)))
PASSES.add("sdft_teacher_live", Pass(lambda learner, rows, t: teacher_logprobs(learner, rows, t, True)))


def distill_part(
    x: PartInputs, *, teacher: str, alpha: float, is_clip: float | None, skip_tokens: int, **_: Any
) -> PartLoss:
    """TRL's sampled_token objective, per token sg(s - t) * s with s, t the student's and the teacher's
    log-probabilities of the sampled token (its gradient is the reverse KL's); times the detached ratio
    pi / pi_old capped at ``is_clip`` when the update reuses rollouts; a mean over each row's tokens (from the
    ``skip_tokens``-th on), then over rows."""
    s, t = x.logps, x.passes[f"sdft_teacher_{teacher}"]
    per_token = (s - t).detach() * s
    clipped = torch.zeros_like(s, dtype=torch.bool)
    if is_clip is not None and x.old_logps is not None:
        ratio = torch.exp((s - x.old_logps).detach().clamp(-20.0, 20.0))
        clipped = ratio > is_clip
        per_token = per_token * ratio.clamp(max=is_clip)
    positions = torch.arange(s.size(1), device=s.device)[None, :]
    mask = x.mask * x.extras[CONTEXT][:, None] * (positions >= skip_tokens)
    stats = {
        "sdft_distillation_loss": masked_mean(per_token.detach(), mask).item(),
        "sdft_teacher_kl": masked_mean((s - t).detach(), mask).item(),
        "sdft_is_clip_fraction": masked_mean(clipped.float(), mask).item(),
    }
    if s.size(0) == 0:
        return PartLoss(s.sum(), stats)
    return PartLoss(LOSS_AGGREGATIONS["grpo"](per_token, mask, 0, x.norm), stats)


PART_LOSSES.add(
    "sdft_distill",
    LossTerm(distill_part, passes=lambda options: (f"sdft_teacher_{options['teacher']}",)),
)


class SDFTOptions(Options):
    distillation_mode: Literal["sampled_token"] = Field(
        "sampled_token",
        description="TRL's sampled_token: the reverse KL's gradient on the sampled tokens (TRL's default "
        "topk_logits is not in sasr yet)",
    )
    distillation_alpha: float = Field(
        1.0, ge=0, le=1, description="0 forward KL, 1 reverse KL (sampled_token: 1 only)"
    )
    distillation_is_clip: float | None = Field(
        2.0, gt=0, description="cap of the detached ratio pi / pi_old on each token's loss; null: none"
    )
    num_loss_tokens_to_skip: int = Field(0, ge=0, description="the first N completion tokens carry no loss")
    teacher_model_kind: Literal["base", "live"] = Field(
        "base", description="the teacher's weights: base (the initial model), live (the current one)"
    )
    teacher_prompt_template: str = Field(
        "{prompt}\n\n{privileged_context}",
        description="the teacher's last user turn: {prompt} its text, {privileged_context} the demonstration",
    )
    skip_prompts_without_demonstration: bool = Field(
        False, description="a prompt without a demonstration trains nothing (false: an error)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> SDFTOptions:
        if self.distillation_mode == "sampled_token" and self.distillation_alpha != 1.0:
            raise ValueError("distillation_mode sampled_token takes distillation_alpha 1.0 only (as TRL)")
        for field in ("{prompt}", "{privileged_context}"):
            if field not in self.teacher_prompt_template:
                raise ValueError(f"teacher_prompt_template must hold {field}")
        return self


@register_method
class SDFT(Method):
    """SDFT: rollouts from the prompt alone, distilled towards the same model shown the demonstration."""

    name = "sdft"
    paper = "arXiv 2601.19897"
    summary = "rollouts from the prompt alone, distilled towards the model shown the prompt's demonstration"
    Options = SDFTOptions
    pairs_demos = True
    dynamics = ("sdft_teacher_kl", "sdft_distillation_loss")

    def plan(self, step: int) -> Plan:
        o = self.opts
        ask = Ask(
            CONTEXT, {"template": o.teacher_prompt_template, "skip": o.skip_prompts_without_demonstration}
        )
        return Plan(
            step, "grpo", Gather(prompts=self.prompts_per_step, rollouts=self.group_size, contexts=ask)
        )

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        o = self.opts
        options = {
            "teacher": o.teacher_model_kind,
            "alpha": o.distillation_alpha,
            "is_clip": o.distillation_is_clip,
            "skip_tokens": o.num_loss_tokens_to_skip,
        }
        return [Part("distill", "sdft_distill", rows.kind == ROLLOUT, 1.0, options)], {}
