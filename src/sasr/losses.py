"""The SFT loss, GRPO advantages, the GRPO loss and the part losses of a step (docs/methods.md).

Advantage estimators and loss aggregations are registries (name -> function), as in verl: adding one is
a function and a line, never an if-chain in the loop. Names follow TRL so results can be compared.

Shapes: B sequences (prompts x G for GRPO), T completion tokens, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sasr.errors import unknown


def names(registry: dict[str, object]) -> Any:
    """The registry's names as a ``Literal`` type, for the config schema: one source of truth."""
    return Literal[tuple(registry)]


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


@dataclass(frozen=True)
class Centre:
    """What a group's rewards are centred on, [prompts, G] -> [prompts, 1]: over every reward, and over the
    scored ones only (NaN: a row no reward function scored)."""

    of: Callable[[torch.Tensor], torch.Tensor]
    of_scored: Callable[[torch.Tensor], torch.Tensor]


ADVANTAGE_CENTRES: dict[str, Centre] = {
    "mean": Centre(
        lambda grouped: grouped.mean(dim=1, keepdim=True),
        lambda grouped: torch.nanmean(grouped, dim=1, keepdim=True),
    ),
    # Our reading of the paper's split of each group at the median into G+ and G-.
    "median": Centre(
        lambda grouped: grouped.median(dim=1, keepdim=True).values,
        lambda grouped: torch.nanmedian(grouped, dim=1, keepdim=True).values,
    ),
}


# What advantages are divided by (plus ADVANTAGE_EPS), from the groups' stds [prompts, 1] and the rewards [B].
REWARD_SCALES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]] = {
    "group": lambda group_std, rewards: group_std,  # TRL's default: each group's (unbiased) std
    "batch": lambda group_std, rewards: rewards.std(),
    "none": lambda group_std, rewards: None,  # centred only (Dr. GRPO, LUFFY, HPT)
}


def group_advantages(
    rewards: torch.Tensor, num_generations: int, centre: str = "mean", scale: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = (r_i - centre(group)) / (scale + eps), shared by every token of completion i.

    rewards [B] with B = prompts x G, grouped consecutively -> advantages [B], zero_spread [prompts] (bool).
    ``scale``: 'group' (std of the group, unbiased as TRL), 'batch' (std of the whole batch), 'none'.
    """
    if centre not in ADVANTAGE_CENTRES:
        raise unknown("advantage", centre, ADVANTAGE_CENTRES)
    if scale not in REWARD_SCALES:
        raise unknown("scale_rewards", scale, REWARD_SCALES)
    if rewards.isnan().any():  # rows no reward function scored: out of the group's statistics, advantage 0
        return _group_advantages_nan(rewards, num_generations, centre, scale)
    grouped = rewards.view(-1, num_generations)  # [prompts, G]
    std = grouped.std(dim=1, keepdim=True)  # [prompts, 1]
    zero_spread = torch.isclose(std, torch.zeros_like(std)).squeeze(1)
    adv = grouped - ADVANTAGE_CENTRES[centre].of(grouped)
    divisor = REWARD_SCALES[scale](std, rewards)
    if divisor is not None:
        adv = adv / (divisor + ADVANTAGE_EPS)
    return adv.reshape(-1), zero_spread


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std over the non-NaN values of each row (TRL's nanstd). [N, G] -> [N, 1]"""
    mean = torch.nanmean(x, dim=1, keepdim=True)
    count = (~x.isnan()).sum(dim=1, keepdim=True)
    var = torch.nansum((x - mean) ** 2, dim=1, keepdim=True) / (count - 1).clamp(min=1)
    return var.sqrt()


def _group_advantages_nan(rewards: torch.Tensor, num_generations: int, centre: str, scale: str):
    grouped = rewards.view(-1, num_generations)  # [prompts, G], NaN where unscored
    std = _nanstd(grouped)  # [prompts, 1]
    zero_spread = torch.isclose(std, torch.zeros_like(std)).squeeze(1)
    adv = grouped - ADVANTAGE_CENTRES[centre].of_scored(grouped)
    divisor = REWARD_SCALES[scale](std, rewards[~rewards.isnan()])  # the registry, over the scored rows
    if divisor is not None:
        adv = adv / (divisor + ADVANTAGE_EPS)
    return adv.reshape(-1).nan_to_num(0.0), zero_spread


def prefix_group_advantages(
    rewards: torch.Tensor,
    subgroup: torch.Tensor,
    num_generations: int,
    rows_per_prefix: int,
    scale: str = "none",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefix-RFT's advantages: each row's reward centred within its (prompt, prefix) subgroup, and the prefix
    tokens' advantage (that advantage - the on-policy subgroup's mean reward) / rows_per_prefix.

    rewards, subgroup [B] with B = prompts x G, grouped consecutively; subgroup 0: the on-policy rows, j >= 1:
    the rows continuing the prompt's j-th prefix. A subgroup of one row is centred on 0 (and, with
    ``scale='group'``, divided by 1), as the official code does. NaN rewards (no function scored the row) are
    out of the statistics, advantage 0. -> advantages [B], prefix advantages [B] (0 on on-policy rows),
    zero_spread [prompts] (bool: no row or prefix token of the group has an advantage; with a subgroup of one
    an all-correct group still has).
    """
    if scale not in ("none", "group"):
        raise unknown("scale_rewards", scale, ("none", "group"))
    B, device = rewards.numel(), rewards.device
    prompt = torch.arange(B, device=device) // num_generations  # [B]
    S = int(subgroup.max()) + 1
    key = prompt * S + subgroup  # [B]: the row's (prompt, prefix) subgroup
    scored = ~rewards.isnan()
    r = rewards.nan_to_num(0.0)
    slots = (B // num_generations) * S
    count = torch.zeros(slots, device=device).index_add_(0, key, scored.float())
    total = torch.zeros(slots, device=device).index_add_(0, key, r * scored)
    mean = torch.where(count > 1, total / count.clamp(min=1), torch.zeros_like(total))  # [prompts x S]
    adv = r - mean[key]
    if scale == "group":
        sq = torch.zeros(slots, device=device).index_add_(0, key, adv**2 * scored)
        std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.ones_like(sq))
        adv = adv / (std[key] + ADVANTAGE_EPS)
    on_mean = mean.view(-1, S)[:, 0]  # [prompts]
    prefix_adv = torch.where(subgroup > 0, (adv - on_mean[prompt]) / rows_per_prefix, torch.zeros_like(adv))
    zero = torch.zeros_like(adv)
    adv, prefix_adv = torch.where(scored, adv, zero), torch.where(scored, prefix_adv, zero)
    moved = (adv.abs() + prefix_adv.abs()).view(-1, num_generations).amax(dim=1)  # [prompts]
    return adv, prefix_adv, torch.isclose(moved, torch.zeros_like(moved))


def top_entropy(entropy: torch.Tensor, tokens: torch.Tensor, keep: float) -> torch.Tensor:
    """[b, T] bool: of ``tokens`` ([b, T] bool), the ``keep`` share with the highest ``entropy`` [b, T]; the
    lowest int(n x (1 - keep)) of the n are dropped (ties in the order of the tokens)."""
    values = entropy[tokens]  # [n]
    drop = int(values.numel() * (1 - keep))
    kept = torch.ones_like(values, dtype=torch.bool)
    kept[torch.argsort(values, stable=True)[:drop]] = False
    out = torch.zeros_like(tokens)
    out[tokens] = kept
    return out


# --- GRPO loss --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Norm:
    """What a part's loss is divided by when its rows are computed in pieces: counted over the whole optimizer
    step (every micro-batch). ``tokens`` is the part's completion tokens summed over every process and divided
    by the number of processes, so that DDP's mean of the processes' gradients divides by the global count (as
    TRL's ``dapo`` does). None: the rows at hand are the whole step on one process."""

    rows: int
    tokens: float
    micro_batches: int = 1  # the optimizer step's micro-batches (TRL's bnpo averages their own means)


def _agg_grpo(loss: torch.Tensor, mask: torch.Tensor, max_completion_length: int, norm: Norm | None = None):
    """Mean over each sequence's tokens, then over sequences."""
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    return per_seq.mean() if norm is None else per_seq.sum() / max(norm.rows, 1)


def _agg_dr_grpo(
    loss: torch.Tensor, mask: torch.Tensor, max_completion_length: int, norm: Norm | None = None
):
    """Sum over tokens / (sequences x max completion length): no length bias."""
    rows = loss.size(0) if norm is None else max(norm.rows, 1)
    return (loss * mask).sum() / (rows * max_completion_length)


def _agg_dapo(loss: torch.Tensor, mask: torch.Tensor, max_completion_length: int, norm: Norm | None = None):
    """Mean over all tokens of the batch (every process's: see Norm)."""
    return masked_mean(loss, mask) if norm is None else (loss * mask).sum() / max(norm.tokens, 1.0)


def _agg_bnpo(loss: torch.Tensor, mask: torch.Tensor, max_completion_length: int, norm: Norm | None = None):
    """Mean over the micro-batch's own tokens, then over micro-batches and processes (TRL's bnpo: a mean of
    means, so a micro-batch's tokens weigh by how few they are)."""
    mean = masked_mean(loss, mask)
    return mean if norm is None else mean / norm.micro_batches


def _agg_token_sum(
    loss: torch.Tensor, mask: torch.Tensor, max_completion_length: int, norm: Norm | None = None
):
    """Sum over every token of the rows / max completion length, not divided by the rows: the official
    LUFFY and HPT scripts' ``loss_remove_token_mean=True`` (verl). Summed over micro-batches, averaged over
    processes, as their gradient accumulation and data parallelism do."""
    return (loss * mask).sum() / max_completion_length


LOSS_AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": _agg_grpo,
    "bnpo": _agg_bnpo,
    "dr_grpo": _agg_dr_grpo,
    "dapo": _agg_dapo,
    "token_sum": _agg_token_sum,
}


@dataclass
class GRPOLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    kl: float  # mean k3 KL to the reference over completion tokens
    clip_fraction: float  # fraction of completion tokens whose ratio was clipped against the advantage


def _clipped_tokens(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    adv: torch.Tensor,
    *,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    use_bias_correction_kl: bool,
    importance_sampling_level: str = "token",
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate plus beta x k3 KL: (loss [B, T], kl [B, T], clipped [B, T] bool).

    logps, old_logps, ref_logps, mask [B, T]; adv [B, 1]. ``importance_sampling_level='sequence'`` (GSPO): every
    token of a sequence takes the sequence's ratio exp(mean over its tokens of log pi - log pi_old), as TRL
    computes it (the mean needs ``mask``).
    """
    log_ratio = logps - old_logps  # [B, T]
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)  # [B, 1]
    elif importance_sampling_level != "token":
        raise unknown("importance_sampling_level", importance_sampling_level, ("token", "sequence"))
    ratio = torch.exp(log_ratio)  # [B, T] or [B, 1]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # [B, T]
    kl = torch.zeros_like(logps)
    if ref_logps is not None:  # measured whenever a reference is given; in the loss only when beta != 0
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1  # k3 estimator, >= 0
        if beta != 0.0:
            per_token = per_token + beta * (kl * ratio if use_bias_correction_kl else kl)
    with torch.no_grad():
        is_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return per_token, kl, is_clipped.expand_as(logps)


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
    importance_sampling_level: str = "token",
) -> GRPOLossOutput:
    """The clipped surrogate plus beta x k3 KL (docs/methods.md, GRPO).

    logps, old_logps, ref_logps, mask [B, T]; advantages [B].
    rho = exp(logps - old_logps); with one update per batch old_logps = logps.detach(), so rho = 1 in value
    but carries the policy gradient A * grad log pi. ``use_bias_correction_kl`` multiplies the KL by rho
    (TRL's option of that name; off by default, as the method states the loss).
    """
    if loss_type not in LOSS_AGGREGATIONS:
        raise unknown("loss_type", loss_type, LOSS_AGGREGATIONS)
    per_token, kl, is_clipped = _clipped_tokens(
        logps,
        old_logps,
        ref_logps,
        advantages.unsqueeze(1),
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        use_bias_correction_kl=use_bias_correction_kl,
        importance_sampling_level=importance_sampling_level,
        mask=mask,
    )
    loss = LOSS_AGGREGATIONS[loss_type](per_token, mask, max_completion_length)
    with torch.no_grad():
        clip_fraction = masked_mean(is_clipped.float(), mask).item()
        kl_mean = masked_mean(kl, mask).item()
    return GRPOLossOutput(loss=loss, kl=kl_mean, clip_fraction=clip_fraction)


# --- the parts of a step (sasr.batch.Part) ---------------------------------------------------------------


@dataclass
class PartInputs:
    """One part's rows, taken from the step's policy pass. b rows, T completion tokens."""

    logps: torch.Tensor  # [b, T] differentiable
    mask: torch.Tensor  # [b, T] completion tokens
    entropy: torch.Tensor | None  # [b, T] no gradient
    ref_logps: torch.Tensor | None  # [b, T] (ROLLOUT rows; anything elsewhere)
    advantages: torch.Tensor  # [b]
    offpolicy: torch.Tensor  # [b] bool: demonstrations inside a group
    correct: torch.Tensor  # [b] bool
    old_logps: torch.Tensor | None = None  # [b, T] pi_old, the policy that sampled; None: logps.detach()
    norm: Norm | None = None  # the step's counts when these rows are one piece of it
    anchor_kl: torch.Tensor | None = None  # [b, T] KL(pi_ref || pi) per token, differentiable (sft.loss=asft)
    prefix: torch.Tensor | None = None  # [b, T] bool: demonstration-prefix tokens of PREFIXED rows
    prefix_advantages: torch.Tensor | None = None  # [b]: the advantage of those tokens


@dataclass
class PartLoss:
    loss: torch.Tensor  # scalar, differentiable
    stats: dict[str, float]


def row_entropy(x: PartInputs) -> torch.Tensor:
    """[b]: each row's mean token entropy (no gradient)."""
    if x.entropy is None:
        raise ValueError("this part needs the policy pass's entropy")
    return (x.entropy * x.mask).sum(1) / x.mask.sum(1).clamp(min=1)


# The demonstration tokens' losses (``sft.loss``): each token's NLL times a stop-gradient weight of its
# log-probability, [b, T] -> [b, T]; None: weight 1.
def _own_probability(logps: torch.Tensor) -> torch.Tensor:
    return logps.detach().exp()


SFT_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "nll": None,
    "dft": _own_probability,  # DFT (arXiv 2508.05629): -sg(p) log p, TRL's loss_type="dft"
    "asft": _own_probability,  # ASFT (arXiv 2509.23753): DFT's weights, plus an anchor KL
}
ANCHORED_SFT_LOSSES = ("asft",)  # these add asft_beta x KL(pi_ref || pi) on the demonstration tokens


def nll_part(
    x: PartInputs,
    *,
    loss_type: str = "nll",
    phi: bool = False,
    entropy_coef: float | None = None,
    asft_beta: float = 0.1,
) -> PartLoss:
    """SFT: token-mean negative log-likelihood of the part's rows, each token weighted as ``loss_type`` says
    (``SFT_LOSSES``); an anchored loss (ASFT) adds ``asft_beta`` x the token mean of ``x.anchor_kl``.

    ``phi``: each token weighted by the stop-gradient p (1 - p) (CHORD-phi). ``entropy_coef``: each row weighted
    by the stop-gradient entropy_coef * exp(-H_row), H_row its mean token entropy (SRFT).
    """
    if loss_type not in SFT_LOSSES:
        raise unknown("sft.loss", loss_type, SFT_LOSSES)
    token_weight = SFT_LOSSES[loss_type]
    if token_weight is None and not phi and entropy_coef is None and x.norm is None:
        return PartLoss(sft_loss(x.logps, x.mask), {})
    weight = torch.ones_like(x.logps) if token_weight is None else token_weight(x.logps)
    stats = {}
    if phi:
        p = x.logps.detach().exp()
        weight = weight * p * (1 - p)
        stats["chord_phi"] = masked_mean(weight, x.mask).item()
    if entropy_coef is not None:
        w_row = entropy_coef * torch.exp(-row_entropy(x))  # [b]
        weight = weight * w_row[:, None]
        stats["srft_sft_weight"] = w_row.mean().item()  # the loop leaves a part with no rows out
    per_token = -x.logps * weight  # [b, T]
    if loss_type in ANCHORED_SFT_LOSSES:
        if x.anchor_kl is None:
            raise ValueError(f"sft.loss={loss_type} needs the reference's distributions (anchor_kl)")
        per_token = per_token + asft_beta * x.anchor_kl
        stats["asft_kl"] = masked_mean(x.anchor_kl.detach(), x.mask).item()
    if x.norm is not None:  # a token mean over the whole step, every process's tokens (see Norm)
        return PartLoss((per_token * x.mask).sum() / max(x.norm.tokens, 1.0), stats)
    return PartLoss(masked_mean(per_token, x.mask), stats)


def pg_part(
    x: PartInputs,
    *,
    beta: float,
    epsilon: float,
    epsilon_high: float | None,
    loss_type: str,
    max_completion_length: int,
    use_bias_correction_kl: bool,
    importance_sampling_level: str = "token",
    shaping_gamma: float | None = None,
    rollout_coef: float | None = None,
    prefix_epsilon: float | None = None,
    prefix_epsilon_high: float | None = None,
    prefix_entropy_top: float | None = None,
) -> PartLoss:
    """Policy gradient over a group's rows, aggregated together by ``loss_type``.

    Rollout rows: GRPO's clipped surrogate plus beta x KL; or, with ``rollout_coef`` (SRFT), -w log p with the
    stop-gradient w = rollout_coef * exp(H_row) on correct rows and -1 on wrong ones (nothing clipped).
    Off-policy rows (demonstrations in the group), with ``shaping_gamma``: -A f(p), f(p) = p / (p + gamma),
    unclipped, the behaviour probability taken as 1 (LUFFY's policy shaping); without it they take the
    rollouts' term. Their reference log-probs are their own (KL 0).
    Prefixed rows (Prefix-RFT): their demonstration-prefix tokens take ``x.prefix_advantages`` and their own
    clip range (``prefix_epsilon``, ``prefix_epsilon_high``; None: the rollouts'), and with
    ``prefix_entropy_top`` only that share of the prefix tokens at hand, the highest-entropy ones, keeps its
    advantage; what the policy sampled after the prefix trains as a rollout does.
    """
    if loss_type not in LOSS_AGGREGATIONS:
        raise unknown("loss_type", loss_type, LOSS_AGGREGATIONS)
    adv = x.advantages.unsqueeze(1)  # [b, 1]
    off = x.offpolicy[:, None]  # [b, 1]
    pre = None if x.prefix is None else x.prefix & x.mask.bool()  # [b, T]: the prefix tokens with loss
    pre = pre if pre is not None and pre.any() else None
    on_mask = x.mask * (~off).to(x.mask.dtype)
    if pre is not None:
        on_mask = on_mask * (~pre).to(x.mask.dtype)
    stats: dict[str, float] = {}
    if rollout_coef is None:
        if pre is not None:
            adv = torch.where(pre, x.prefix_advantages[:, None], adv)  # [b, T]
            if prefix_entropy_top is not None:
                if x.entropy is None:
                    raise ValueError("prefix_entropy_top needs the policy pass's entropy")
                kept = top_entropy(x.entropy, pre, prefix_entropy_top)
                adv = adv.masked_fill(pre & ~kept, 0.0)
                stats["prefix_kept"] = (kept.sum() / pre.sum()).item()
        clip = functools.partial(
            _clipped_tokens,
            x.logps,
            x.logps.detach() if x.old_logps is None else x.old_logps,
            x.ref_logps,
            adv,
            beta=beta,
            use_bias_correction_kl=use_bias_correction_kl,
            importance_sampling_level=importance_sampling_level,
            mask=x.mask,
        )
        high = epsilon_high if epsilon_high is not None else epsilon
        per_token, _, is_clipped = clip(epsilon_low=epsilon, epsilon_high=high)
        stats["clip_fraction"] = masked_mean(is_clipped.float(), on_mask).item()
        if pre is not None:
            low_pre = epsilon if prefix_epsilon is None else prefix_epsilon
            high_pre = high if prefix_epsilon_high is None else prefix_epsilon_high
            if (low_pre, high_pre) != (epsilon, high):
                pre_token, _, is_clipped = clip(epsilon_low=low_pre, epsilon_high=high_pre)
                per_token = torch.where(pre, pre_token, per_token)
            stats["prefix_clip_fraction"] = masked_mean(is_clipped.float(), pre).item()
    else:
        h = row_entropy(x)  # [b]
        w_row = torch.where(x.correct, rollout_coef * torch.exp(h), torch.full_like(h, -1.0))
        per_token = -w_row[:, None] * x.logps
        positive = x.correct & ~x.offpolicy
        if positive.any():  # no correct rollout: no weight to report (not 0)
            stats["srft_rl_weight"] = w_row[positive].mean().item()
        stats["clip_fraction"] = 0.0  # no ratio is clipped in this term
    if shaping_gamma is not None:
        p = x.logps.exp()
        off_token = -adv * p / (p + shaping_gamma)  # no ratio to clip: the behaviour probability is 1
        per_token = torch.where(off, off_token, per_token)
        with torch.no_grad():
            off_mask = x.mask * off.to(x.mask.dtype)
            pd = p.detach()
            # d f(p) / d log p: what an off-policy token weighs where an on-policy one weighs 1
            shaped = pd * shaping_gamma / (pd + shaping_gamma) ** 2
            if off.any():  # statistics of the off-policy tokens: none without such rows
                stats["offpolicy_shaped_weight"] = masked_mean(shaped, off_mask).item()
                stats["offpolicy_prob"] = masked_mean(pd, off_mask).item()
    if x.logps.size(0) == 0:  # no rows on this rank (HPT routed every prompt to SFT): a zero with a graph
        loss = x.logps.sum()
    else:
        loss = LOSS_AGGREGATIONS[loss_type](per_token, x.mask, max_completion_length, x.norm)
    return PartLoss(loss, stats)


PART_LOSSES: dict[str, Callable[..., PartLoss]] = {"nll": nll_part, "pg": pg_part}
