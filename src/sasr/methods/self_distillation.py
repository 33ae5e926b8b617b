"""What SDFT and SDPO share (TRL 1.16's ``trl.experimental.sdft`` / ``sdpo``): a teacher, the same model reading
the same completion under another prompt (``Rows.contexts``), and the loss that pulls the student's tokens
towards the teacher's: TRL's three objectives (``sampled_token``, ``topk_logits``, ``full_logits``), its
options under its names, and the teachers ``base`` (the initial weights: LoRA's adapter off, else the reference
snapshot), ``live`` (the current weights) and ``ema`` (a moving average of them)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from sasr import metrics
from sasr.batch import Plan
from sasr.divergences import TokenDivergence
from sasr.errors import SasrError
from sasr.losses import LOSS_AGGREGATIONS, PART_LOSSES, LossTerm, PartInputs, PartLoss, masked_mean
from sasr.methods.base import Method, Options
from sasr.passes import register_context_passes
from sasr.reference import AveragePolicy

TEACHERS = ("base", "live", "ema")
MODES = ("sampled_token", "topk_logits", "full_logits")


class DistillationOptions(Options):
    """The distillation options SDFT and SDPO share, under TRL's names (each method sets its own defaults)."""

    distillation_mode: Literal[MODES] = Field(
        "sampled_token",
        description="sampled_token: the reverse KL's gradient on the sampled tokens; topk_logits: the "
        "divergence on the student's top k tokens; full_logits: on the whole vocabulary",
    )
    distillation_topk: int | None = Field(None, ge=1, description="k of topk_logits")
    distillation_alpha: float = Field(
        1.0, ge=0, le=1, description="0 forward KL, 1 reverse KL, between: generalized JSD (sampled_token: 1)"
    )
    distillation_add_tail: bool = Field(
        False, description="topk_logits: the mass outside the top k as one more category (false: renormalize)"
    )
    distillation_is_clip: float | None = Field(
        2.0, gt=0, description="cap of the detached ratio pi / pi_old on each token's loss; null: none"
    )
    teacher_model_kind: Literal[TEACHERS] = Field(
        "base",
        description="the teacher's weights: base (the initial model), live (the current one), ema (a moving "
        "average of the current one)",
    )
    teacher_update_rate: float = Field(
        0.05, gt=0, le=1, description="ema: teacher = (1 - rate) teacher + rate student at each sync"
    )
    teacher_sync_steps: int = Field(1, ge=1, description="ema: the teacher is updated every N steps")

    @model_validator(mode="after")
    def _mode_settings(self) -> DistillationOptions:
        if self.distillation_mode == "sampled_token" and self.distillation_alpha != 1.0:
            raise ValueError("distillation_mode sampled_token takes distillation_alpha 1.0 only (as TRL)")
        if self.distillation_mode == "topk_logits" and self.distillation_topk is None:
            raise ValueError("distillation_mode topk_logits needs distillation_topk (as TRL)")
        return self

    def part_options(self, context: str, label: str) -> dict[str, Any]:
        """The ``self_distill`` part's options."""
        return {
            "context": context,
            "teacher": self.teacher_model_kind,
            "label": label,
            "is_clip": self.distillation_is_clip,
            "mode": self.distillation_mode,
            "alpha": self.distillation_alpha,
            "topk": self.distillation_topk,
            "add_tail": self.distillation_add_tail,
        }


def register_metrics(label: str, method: str) -> None:
    metrics.register_all(
        [
            (
                f"{label}_distillation_loss",
                f"{method}: token mean of the distillation loss (TRL's)",
                metrics.PASS,
            ),
            (
                f"{label}_teacher_kl",
                f"{method}: token mean of log pi(y) - log teacher(y), sampled y",
                metrics.PASS,
            ),
            (f"{label}_is_clip_fraction", f"{method}: share of tokens whose ratio hit the cap", metrics.PASS),
        ]
    )


def teacher_chat(messages: list[dict], template: str, **fields: str) -> list[dict]:
    """``messages`` with the last turn (a user turn, as TRL requires) replaced by one holding ``template``
    filled with its text (``{prompt}``) and ``fields``."""
    if not messages or messages[-1].get("role") != "user":
        raise SasrError("a teacher prompt needs a prompt that ends with a user turn, as TRL's")
    return [
        *messages[:-1],
        {"role": "user", "content": template.format(prompt=messages[-1]["content"], **fields)},
    ]


def teacher_pass(options: dict[str, Any]) -> str:
    """The name of the pass a part's options ask for: per token for sampled_token, whole otherwise."""
    whole = "" if options["mode"] == "sampled_token" else "_whole"
    return f"{options['context']}_{options['teacher']}{whole}"


def register_teacher(context: str) -> None:
    """The passes ``CONTEXT_KIND`` and ``CONTEXT_KIND_whole``: the teacher of the prompts named ``context``."""
    register_context_passes(context, TEACHERS)


class SelfDistillation(Method):
    """What SDFT and SDPO share as methods: the ema teacher's weights, made when the model is attached,
    updated after every ``teacher_sync_steps``-th step, saved with the run's checkpoints."""

    average: AveragePolicy | None = None

    def attach(self, model: torch.nn.Module, use_lora: bool) -> None:
        if self.opts.teacher_model_kind == "ema":
            self.average = AveragePolicy(model, use_lora, self.opts.teacher_update_rate)

    def observe(self, plan: Plan, grad_norm: float | None, probe: float | None = None) -> None:
        super().observe(plan, grad_norm, probe)
        if self.average is not None and plan.step % self.opts.teacher_sync_steps == 0:
            self.average.update()

    def tensors(self) -> dict[str, Any]:
        return {} if self.average is None else {f"average.{k}": t for k, t in self.average.snapshot_.items()}

    def load_tensors(self, tensors: dict[str, Any]) -> None:
        if self.average is not None:
            self.average.snapshot_ = {k.removeprefix("average."): t for k, t in tensors.items()}

    def distill_options(self, context: str, label: str) -> dict[str, Any]:
        """The ``self_distill`` part's options."""
        return {**self.opts.part_options(context, label), "average": self.average}


def distill_part(
    x: PartInputs,
    *,
    context: str,
    teacher: str,
    label: str,
    is_clip: float | None,
    mode: str = "sampled_token",
    skip_tokens: int = 0,
    **_: Any,
) -> PartLoss:
    """TRL's objectives per token: sampled_token, sg(s - t) * s with s and t the student's and the teacher's
    log-probabilities of the sampled token (its gradient is the reverse KL's); topk_logits and full_logits,
    the divergence the policy pass computed (``x.divergence``). Times the detached ratio pi / pi_old capped at
    ``is_clip`` when the update reuses rollouts; a mean over each row's tokens (from the ``skip_tokens``-th
    on; rows without a teacher prompt: none), then over rows, as TRL aggregates it."""
    s, t = x.logps, x.passes[teacher_pass({"context": context, "teacher": teacher, "mode": mode})]
    per_token = (s - t).detach() * s if mode == "sampled_token" else x.divergence
    clipped = torch.zeros_like(s, dtype=torch.bool)
    if is_clip is not None and x.old_logps is not None:
        ratio = torch.exp((s - x.old_logps).detach().clamp(-20.0, 20.0))
        clipped = ratio > is_clip
        per_token = per_token * ratio.clamp(max=is_clip)
    positions = torch.arange(s.size(1), device=s.device)[None, :]
    mask = x.mask * x.extras[context][:, None] * (positions >= skip_tokens)
    stats = {
        f"{label}_distillation_loss": masked_mean(per_token.detach(), mask).item(),
        f"{label}_teacher_kl": masked_mean((s - t).detach(), mask).item(),
        f"{label}_is_clip_fraction": masked_mean(clipped.float(), mask).item(),
    }
    if s.size(0) == 0:
        return PartLoss(s.sum(), stats)
    return PartLoss(LOSS_AGGREGATIONS["grpo"](per_token, mask, 0, x.norm), stats)


def divergence_of(options: dict[str, Any]) -> tuple[str, TokenDivergence] | None:
    """What a topk_logits or full_logits part asks of the policy pass: the teacher's pass, the divergence."""
    if options["mode"] == "sampled_token":
        return None
    topk = options["topk"] if options["mode"] == "topk_logits" else None
    return teacher_pass(options), TokenDivergence(options["alpha"], topk, options["add_tail"])


PART_LOSSES.add(
    "self_distill",
    LossTerm(distill_part, passes=lambda options: (teacher_pass(options),), divergence=divergence_of),
)
