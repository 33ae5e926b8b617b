"""What SDFT and SDPO share (TRL 1.16's ``trl.experimental.sdft`` / ``sdpo``): a teacher, the same model reading
the same completion under another prompt (``Rows.contexts``), and the loss that pulls the student's tokens
towards the teacher's. Here: TRL's ``sampled_token`` objective; teachers ``base`` (the initial weights: LoRA's
adapter off, else the reference snapshot) and ``live`` (the current weights)."""

from __future__ import annotations

from typing import Any

import torch

from sasr import metrics
from sasr.batch import Rows
from sasr.errors import SasrError
from sasr.logprobs import completion_logprobs
from sasr.losses import LOSS_AGGREGATIONS, PART_LOSSES, LossTerm, PartInputs, PartLoss, masked_mean
from sasr.passes import PASSES, Pass

TEACHERS = ("base", "live")


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


def teacher_chat(messages: list[dict], text: str) -> list[dict]:
    """``messages`` with the last turn (a user turn, as TRL requires) replaced by one with ``text``."""
    if not messages or messages[-1].get("role") != "user":
        raise SasrError("a teacher prompt needs a prompt that ends with a user turn, as TRL's")
    return [*messages[:-1], {"role": "user", "content": text}]


def teacher_logprobs(learner, rows: Rows, temperature: float, context: str, live: bool) -> torch.Tensor:
    """The teacher's log-probabilities of each row's completion under its prompt ``context`` [b, T]: the
    current weights (``live``) or the initial ones (the reference policy)."""
    ids, mask = rows.contexts[context]
    T = rows.completion_ids.size(1)
    input_ids = torch.cat([ids, rows.completion_ids], dim=1)
    attention = torch.cat([mask, rows.completion_mask], dim=1)
    with learner.accelerator.autocast():
        if live:
            model = learner.accelerator.unwrap_model(learner.model)
            return completion_logprobs(model, input_ids, attention, T, temperature)[0]
        return learner.reference.logprobs(input_ids, attention, T, temperature)


def register_teacher(context: str) -> None:
    """The passes ``CONTEXT_base`` and ``CONTEXT_live``: the teacher of the prompts named ``context``."""
    for kind in TEACHERS:
        live = kind == "live"
        PASSES.add(
            f"{context}_{kind}",
            Pass(lambda learner, rows, t, live=live: teacher_logprobs(learner, rows, t, context, live)),
        )


def distill_part(
    x: PartInputs,
    *,
    context: str,
    teacher: str,
    label: str,
    is_clip: float | None,
    skip_tokens: int = 0,
    **_: Any,
) -> PartLoss:
    """TRL's sampled_token objective: per token sg(s - t) * s, s and t the student's and the teacher's
    log-probabilities of the sampled token (its gradient is the reverse KL's), times the detached ratio
    pi / pi_old capped at ``is_clip`` when the update reuses rollouts; a mean over each row's tokens (from the
    ``skip_tokens``-th on; rows without a teacher prompt: none), then over rows, as TRL aggregates it."""
    s, t = x.logps, x.passes[f"{context}_{teacher}"]
    per_token = (s - t).detach() * s
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


PART_LOSSES.add(
    "self_distill",
    LossTerm(distill_part, passes=lambda options: (f"{options['context']}_{options['teacher']}",)),
)
