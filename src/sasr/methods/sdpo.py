"""SDPO (arXiv 2601.20802, "Reinforcement Learning via Self-Distillation"): GRPO whose rollouts are also distilled
towards the same model shown a successful rollout of the same group; the loss is (1 - w) x policy + w x
distillation (docs/methods.md). TRL 1.16's ``trl.experimental.sdpo`` is the reference: its option names and
defaults, its teacher prompts (``SuccessfulRolloutTeacherContextBuilder``), its loss.

The teacher and the distillation loss are ``sasr.methods.self_distillation``'s.
"""

from __future__ import annotations

import logging
import re
from typing import Literal

import torch
from pydantic import Field

from sasr import metrics
from sasr.batch import CONTEXTS, ROLLOUT, Ask, Gather, Part, Plan, Rows
from sasr.losses import LOSS_AGGREGATIONS, names
from sasr.methods.base import register_method
from sasr.methods.self_distillation import (
    TEACHERS,
    DistillationOptions,
    SelfDistillation,
    register_metrics,
    register_teacher,
    teacher_chat,
)

CONTEXT = "sdpo_teacher"
log = logging.getLogger(__name__)

register_metrics("sdpo", "SDPO")
metrics.register_all(
    [
        ("sdpo_success_group_fraction", "SDPO: share of groups with a success", metrics.ROLLOUTS),
        ("sdpo_success_sample_fraction", "SDPO: share of rollouts shown a successful one", metrics.ROLLOUTS),
        ("sdpo_feedback_used_fraction", "SDPO: share of rollouts shown feedback", metrics.ROLLOUTS),
    ]
)
register_teacher(CONTEXT)


def successful_rollout_contexts(
    c, step: int, examples: list, rows: Rows, reprompt: str, solution: str, threshold: float, **how
):
    """Each rollout's teacher chat, as TRL's SuccessfulRolloutTeacherContextBuilder builds it: the first
    other rollout of its group whose reward reaches ``threshold`` (``dont_reprompt_self``: never the row
    itself), decoded and set in ``solution``, and with ``feedback`` the prompt's environment feedback (its
    row's ``privileged_context`` column, TRL's; ``feedback_only_without_solution``: where no rollout is shown),
    set in ``reprompt`` in place of the last user turn; a row with neither keeps its prompt and trains no
    distillation."""
    rewards = rows.rewards.tolist()  # NaN (no function scored it) never reaches the threshold
    groups, chats, successes, solved, told = rows.group.tolist(), [], set(), 0, 0
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    for i, g in enumerate(groups):
        good = [j for j in members[g] if rewards[j] >= threshold]
        if good:
            successes.add(g)
        shown = [j for j in good if not (how["dont_reprompt_self"] and j == i)]
        raw = c.task.columns(examples[g]).get("privileged_context") if how["feedback"] else None
        told_here = (
            isinstance(raw, str)
            and raw.strip() != ""
            and not (how["feedback_only_without_solution"] and shown)
        )
        if not shown and not told_here:
            chats.append(None)
            continue
        filled = ""
        if shown:
            text = rows.texts[shown[0]]
            if how["remove_thinking"]:
                text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL).strip()
            filled, solved = solution.format(successful_previous_attempt=text), solved + 1
        feedback = how["feedback_template"].format(feedback_raw=raw) if told_here else ""
        told += told_here
        chats.append(teacher_chat(c.task.messages(examples[g]), reprompt, solution=filled, feedback=feedback))
    n = max(len(chats), 1)
    stats = {
        "sdpo_success_group_fraction": len(successes) / max(len(members), 1),
        "sdpo_success_sample_fraction": solved / n,
        "sdpo_feedback_used_fraction": told / n,
    }
    return CONTEXT, chats, stats


CONTEXTS.add(CONTEXT, successful_rollout_contexts)


class SDPOOptions(DistillationOptions):
    teacher_model_kind: Literal[TEACHERS] = Field(
        "ema", description=DistillationOptions.model_fields["teacher_model_kind"].description
    )
    distillation_weight: float = Field(1.0, ge=0, le=1, description="loss = (1 - w) policy + w distillation")
    success_reward_threshold: float = Field(1.0, description="a rollout is successful at this reward or more")
    dont_reprompt_on_self_success: bool = Field(True, description="a rollout is never shown itself")
    remove_thinking_from_demonstration: bool = Field(False, description="drop <think>...</think> from it")
    max_reprompt_len: int = Field(10240, ge=1, description="the teacher prompt keeps its last N tokens")
    reprompt_template: str = Field(
        "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n",
        description="the teacher's last user turn",
    )
    solution_template: str = Field(
        "\nCorrect solution:\n\n{successful_previous_attempt}\n\n", description="how the shown rollout is set"
    )
    include_environment_feedback: bool = Field(
        False, description="show the teacher the prompt's feedback too (its row's privileged_context column)"
    )
    environment_feedback_only_without_solution: bool = Field(
        False, description="the feedback only where no successful rollout is shown"
    )
    feedback_template: str = Field(
        "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n\n",
        description="how the feedback is set",
    )
    loss_type: names(LOSS_AGGREGATIONS) = Field(
        "dapo", description="the policy part's aggregation (TRL: dapo)"
    )
    epsilon: float = Field(0.2, gt=0, description="the policy part's clip range")
    epsilon_high: float | None = Field(None, gt=0, description="its upper range; null: epsilon")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="advantages' divisor")
    diagnostics_warning_interval: int = Field(
        10, ge=0, description="warn at the first step with no teacher in a row and every N-th (0: never)"
    )


@register_method
class SDPO(SelfDistillation):
    """SDPO: GRPO plus distillation towards the model shown a successful rollout of the same group."""

    name = "sdpo"
    paper = "arXiv 2601.20802"
    summary = "GRPO + distillation towards the model shown a successful rollout of the same group"
    Options = SDPOOptions
    uses_demos = False
    routes_by_outcome = True
    dynamics = ("sdpo_success_group_fraction", "sdpo_teacher_kl", "sdpo_is_clip_fraction")
    idle = 0  # steps in a row with no teacher (the diagnostic)

    def plan(self, step: int) -> Plan:
        o = self.opts
        args = {
            "reprompt": o.reprompt_template,
            "solution": o.solution_template,
            "threshold": o.success_reward_threshold,
            "dont_reprompt_self": o.dont_reprompt_on_self_success,
            "remove_thinking": o.remove_thinking_from_demonstration,
            "max_tokens": o.max_reprompt_len,
            "feedback": o.include_environment_feedback,
            "feedback_only_without_solution": o.environment_feedback_only_without_solution,
            "feedback_template": o.feedback_template,
        }
        gather = Gather(
            prompts=self.prompts_per_step,
            rollouts=self.group_size,
            contexts=Ask(CONTEXT, args),
            scale_rewards=o.scale_rewards,
        )
        return Plan(step, "grpo", gather)

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        o, w, rollout = self.opts, self.opts.distillation_weight, rows.kind == ROLLOUT
        parts = []
        if w < 1.0:  # TRL computes no policy loss at w = 1 and no teacher at w = 0
            clip = {
                "beta": 0.0,
                "loss_type": o.loss_type,
                "epsilon": o.epsilon,
                "epsilon_high": o.epsilon_high,
            }
            parts.append(Part("policy", "pg", rollout, 1.0 - w, clip))
        if w > 0.0:
            parts.append(Part("distill", "self_distill", rollout, w, self.distill_options(CONTEXT, "sdpo")))
            if CONTEXT in rows.extras:  # made by the collector once the groups are scored
                self.watch(rows.extras[CONTEXT])
        return parts, {}

    def watch(self, taught: torch.Tensor) -> None:
        """TRL's diagnostic: say when no row of the step had a teacher, at the first such step in a row and
        every ``diagnostics_warning_interval``-th."""
        every = self.opts.diagnostics_warning_interval
        self.idle = 0 if bool(taught.any()) else self.idle + 1
        if every and self.idle and (self.idle == 1 or self.idle % every == 0):
            log.warning(
                "SDPO distils nothing this step (%d in a row): no rollout of its groups reached "
                "sdpo.success_reward_threshold (%s) and none was shown feedback; lower the threshold, give "
                "feedback, or set sdpo.distillation_weight below 1 so that the policy part trains meanwhile",
                self.idle,
                self.opts.success_reward_threshold,
            )
