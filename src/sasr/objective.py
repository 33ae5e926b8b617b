"""One micro-batch's loss from the per-token numbers its passes gave: a pure function, no model.

The learner runs the passes (``sasr.learner``) and calls ``micro_loss``; a test, or a researcher checking a
method against its paper, calls it with log-probabilities of their own and gets exactly the loss, gradient
and statistics the learner would. b rows of the micro-batch, T completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sasr.batch import Part, Rows
from sasr.losses import PART_LOSSES, Norm, PartInputs, masked_mean


@dataclass
class PassOutputs:
    """What a micro-batch's passes computed."""

    logps: torch.Tensor  # [b, T] the policy's, differentiable
    entropy: torch.Tensor | None = None  # [b, T] the policy's token entropy (steps with rollouts)
    ref: torch.Tensor | None = None  # [s, T] the reference's, on the s sampled rows only (in their order)
    old: torch.Tensor | None = None  # [b, T] pi_old's (num_iterations > 1); None: the policy's, detached
    anchor_kl: torch.Tensor | None = None  # [b, T] KL(pi_ref || pi) per token, differentiable
    others: dict[str, torch.Tensor] = field(default_factory=dict)  # further passes' [b, T], by name
    divergence: torch.Tensor | None = None  # [b, T] the policy's from a whole pass's, differentiable


def options(part: Part, settings: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``part``'s loss: the run's settings it reads (``settings``: the dotted
    configuration), overridden by the part's own options."""
    term = PART_LOSSES[part.loss]
    return {**{k: settings[key] for k, key in term.settings.items()}, **part.options}


def loss_mask(rows: Rows, mask_truncated: bool) -> torch.Tensor:
    """[B, T]: the tokens that carry loss (with mask_truncated_completions, none of a cut rollout's)."""
    if not mask_truncated:
        return rows.completion_mask
    return rows.completion_mask * (~rows.cut())[:, None].to(rows.completion_mask.dtype)


def sampled_stats(rows: Rows, out: PassOutputs, ref_logps: torch.Tensor | None) -> dict[str, float]:
    """Statistics of the sampled tokens: the policy's entropy, its k3 KL to the reference (whichever part
    trains a row) and how far the sampler's log-probs are from the learner's."""
    mask, logps = rows.sampled(), out.logps.detach()
    stats = {"entropy": masked_mean(out.entropy, mask).item()}
    if ref_logps is not None:
        delta = ref_logps - logps
        stats["kl"] = masked_mean(torch.exp(delta) - delta - 1, mask).item()
    if rows.sampler_logprobs is not None:
        stats["sampler_logprob_gap"] = masked_mean((logps - rows.sampler_logprobs).abs(), mask).item()
    return stats


def _at(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[idx]


def micro_loss(
    rows: Rows,
    parts: list[Part],
    out: PassOutputs,
    settings: dict[str, Any],
    norms: dict[str, Norm] | None = None,
    rollouts: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The sum of the weighted part losses over ``rows`` (``parts``' rows are masks over them) and the
    statistics of the pass: each part's loss from ``PART_LOSSES``, its options from ``settings`` and the
    part, its divisors from ``norms`` when the rows are one piece of a step. ``rollouts``: the step sampled
    rollouts, whose tokens' statistics are measured."""
    norms = norms or {}
    on_rows = rows.sampled_rows().nonzero().squeeze(1)
    ref_logps = None  # [b, T]: the reference on sampled rows; elsewhere the policy itself (KL 0)
    if out.ref is not None:
        ref_logps = (
            out.ref if len(on_rows) == len(rows) else out.logps.detach().index_copy(0, on_rows, out.ref)
        )
    stats = sampled_stats(rows, out, ref_logps) if rollouts and len(on_rows) else {}
    carries = loss_mask(rows, settings["grpo.mask_truncated_completions"])
    total = None
    for part in parts:
        pidx = part.rows.nonzero().squeeze(1)  # [p]
        x = PartInputs(
            out.logps[pidx],
            carries[pidx],
            _at(out.entropy, pidx),
            _at(ref_logps, pidx),
            rows.advantages[pidx].nan_to_num(0.0),  # a row no reward function scored: no advantage
            rows.kind[pidx],
            rows.correct[pidx],
            old_logps=_at(out.old, pidx),
            norm=norms.get(part.name),
            anchor_kl=_at(out.anchor_kl, pidx),
            given=_at(rows.given, pidx),
            extras={k: v[pidx] for k, v in rows.extras.items()},
            passes={k: v[pidx] for k, v in out.others.items()},
            divergence=_at(out.divergence, pidx),
        )
        result = PART_LOSSES[part.loss].fn(x, **options(part, settings))
        term = result.loss if part.weight == 1.0 else part.weight * result.loss
        total = term if total is None else total + term
        if len(pidx):  # a part with no rows here has no value here, not 0 (sasr.metrics.combine)
            stats.update(result.stats)
            if len(parts) > 1:
                stats[f"loss/{part.name}"] = result.loss.item()
        if len(parts) > 1:
            stats[f"weight/{part.name}"] = part.weight
    return total, stats
