"""Token log-probs, the SFT loss, GRPO advantages and the GRPO loss (METHOD.md §1, §3).

Advantage estimators and loss aggregations are registries (name -> function), as in verl: adding one is
a function and a line, never an if-chain in the loop. Names follow TRL so results can be compared.

Shapes: B sequences (prompts x G for GRPO), T completion tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from sasr.engine import unique_prompts
from sasr.errors import unknown

# --- log-probs --------------------------------------------------------------------------------------------


def _chunk_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = logits.float() / temperature  # [b, T, V]
    return scaled.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - scaled.logsumexp(-1)


def gather_logprobs(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, chunk: int = 4
) -> torch.Tensor:
    """log softmax(logits / temperature)[ids], a few rows at a time.

    The float32 copy of a chunk is recomputed in backward instead of kept (activation checkpointing), so
    neither the full [B, T, V] log-softmax nor float copies of the logits ever live at once.
    logits [B, T, V], ids [B, T] -> [B, T]
    """
    out = []
    for lg, ix in zip(logits.split(chunk), ids.split(chunk)):
        if lg.requires_grad:
            out.append(checkpoint(_chunk_logprobs, lg, ix, temperature, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(lg, ix, temperature))
    return torch.cat(out)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0, chunk: int = 4) -> torch.Tensor:
    """Entropy of each next-token distribution, [B, T, V] -> [B, T] (a metric: no gradient)."""
    out = []
    for lg in logits.split(chunk):
        logp = torch.log_softmax(lg.float() / temperature, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out)


def _completion_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int
) -> torch.Tensor:
    """Logits that predict each of the last ``n_completion`` tokens. [B, P + T] -> [B, T, V]

    Rows that repeat the prompt of the row before (GRPO's G completions of one prompt) share one pass over
    it: each distinct prompt goes through the model once and its keys and values are repeated for its rows.
    The same numbers as the plain forward; gradients flow into the prompt through the shared keys/values.
    """
    n_prompt = input_ids.size(1) - n_completion
    first, inverse = (
        unique_prompts(input_ids[:, :n_prompt], attention_mask[:, :n_prompt])
        if n_prompt > 0
        else (None, None)
    )  # [U], [B]
    # A checkpointed layer would append to the cache again when it recomputes in backward: plain path.
    checkpointed = model.training and any(
        getattr(m, "gradient_checkpointing", False) for m in model.modules()
    )
    if first is None or first.numel() == input_ids.size(0) or checkpointed:
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_to_keep=n_completion + 1,
            use_cache=False,
        ).logits[:, :-1]  # position i predicts token i + 1
    head = model(
        input_ids=input_ids[first, :n_prompt], attention_mask=attention_mask[first, :n_prompt], use_cache=True,
        logits_to_keep=1,
    )  # fmt: skip
    cache = head.past_key_values  # [U, heads, P, d] per layer
    cache.batch_select_indices(inverse)  # [B, heads, P, d]
    tail = model(
        input_ids=input_ids[:, n_prompt:],
        attention_mask=attention_mask,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=n_completion,
    ).logits  # [B, T, V]: completion token i predicts token i + 1
    return torch.cat([head.logits[inverse], tail[:, :-1]], dim=1)


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the last ``n_completion`` tokens of each row given what precedes them.

    input_ids, attention_mask [B, P + T] (prompt left-padded) -> logps [B, T], entropy [B, T] or None.
    Only the logits of the completion positions are computed (``logits_to_keep``); consecutive rows with one
    prompt compute it once.
    """
    logits = _completion_logits(model, input_ids, attention_mask, n_completion)  # [B, T, V]
    targets = input_ids[:, -n_completion:]
    logps = gather_logprobs(logits, targets, temperature)
    return logps, (token_entropy(logits, temperature) if with_entropy else None)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


# --- SFT --------------------------------------------------------------------------------------------------


def sft_loss(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the target tokens, mean over target tokens; prompt tokens are masked out.

    logps, mask [B, T] -> scalar
    """
    return -masked_mean(logps, mask)


# --- GRPO advantages --------------------------------------------------------------------------------------

ADVANTAGE_EPS = 1e-4  # as TRL


def _group_centre_mean(grouped: torch.Tensor) -> torch.Tensor:
    return grouped.mean(dim=1, keepdim=True)


def _group_centre_median(grouped: torch.Tensor) -> torch.Tensor:
    # Our reading of the paper's split of each group at the median into G+ and G-.
    return grouped.median(dim=1, keepdim=True).values


ADVANTAGE_CENTRES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": _group_centre_mean,
    "median": _group_centre_median,
}


def group_advantages(
    rewards: torch.Tensor, num_generations: int, centre: str = "mean", scale: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = (r_i - centre(group)) / (std(group) + eps), shared by every token of completion i.

    rewards [B] with B = prompts x G, grouped consecutively -> advantages [B], zero_spread [prompts] (bool).
    ``scale``: 'group' (std of the group, unbiased as TRL), 'batch' (std of the whole batch), 'none'.
    """
    if centre not in ADVANTAGE_CENTRES:
        raise unknown("advantage", centre, ADVANTAGE_CENTRES)
    grouped = rewards.view(-1, num_generations)  # [prompts, G]
    std = grouped.std(dim=1, keepdim=True)  # [prompts, 1]
    zero_spread = torch.isclose(std, torch.zeros_like(std)).squeeze(1)
    adv = grouped - ADVANTAGE_CENTRES[centre](grouped)
    if scale == "group":
        adv = adv / (std + ADVANTAGE_EPS)
    elif scale == "batch":
        adv = adv / (rewards.std() + ADVANTAGE_EPS)
    elif scale != "none":
        raise unknown("scale_rewards", scale, ("group", "batch", "none"))
    return adv.reshape(-1), zero_spread


# --- GRPO loss --------------------------------------------------------------------------------------------


def _agg_grpo(loss: torch.Tensor, mask: torch.Tensor, max_completion_length: int) -> torch.Tensor:
    """Mean over each sequence's tokens, then over sequences."""
    return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def _agg_dr_grpo(loss: torch.Tensor, mask: torch.Tensor, max_completion_length: int) -> torch.Tensor:
    """Sum over tokens / (sequences x max completion length): no length bias."""
    return (loss * mask).sum() / (loss.size(0) * max_completion_length)


def _agg_dapo(loss: torch.Tensor, mask: torch.Tensor, max_completion_length: int) -> torch.Tensor:
    """Mean over all tokens of the batch."""
    return masked_mean(loss, mask)


LOSS_AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "grpo": _agg_grpo,
    "dr_grpo": _agg_dr_grpo,
    "dapo": _agg_dapo,
}


@dataclass
class GRPOLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    kl: float  # mean k3 KL to the reference over completion tokens
    clip_fraction: float  # fraction of completion tokens whose ratio was clipped against the advantage


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "grpo",
    max_completion_length: int = 128,
    use_bias_correction_kl: bool = False,
) -> GRPOLossOutput:
    """The clipped surrogate plus beta x k3 KL (METHOD.md §3).

    logps, old_logps, ref_logps, mask [B, T]; advantages [B].
    rho = exp(logps - old_logps); with one update per batch old_logps = logps.detach(), so rho = 1 in value
    but carries the policy gradient A * grad log pi. ``use_bias_correction_kl`` multiplies the KL by rho
    (TRL's option of that name; off by default, as METHOD.md states the loss).
    """
    if loss_type not in LOSS_AGGREGATIONS:
        raise unknown("loss_type", loss_type, LOSS_AGGREGATIONS)
    adv = advantages.unsqueeze(1)  # [B, 1]
    ratio = torch.exp(logps - old_logps)  # [B, T]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # [B, T]
    kl = torch.zeros_like(logps)
    if ref_logps is not None:  # measured whenever a reference is given; in the loss only when beta != 0
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1  # k3 estimator, >= 0
        if beta != 0.0:
            per_token = per_token + beta * (kl * ratio if use_bias_correction_kl else kl)
    loss = LOSS_AGGREGATIONS[loss_type](per_token, mask, max_completion_length)
    with torch.no_grad():
        is_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
        clip_fraction = masked_mean(is_clipped.float(), mask).item()
        kl_mean = masked_mean(kl, mask).item()
    return GRPOLossOutput(loss=loss, kl=kl_mean, clip_fraction=clip_fraction)
