"""The shared losses of a step (docs/methods.md): the SFT loss, GRPO advantages, the GRPO loss, and the two
core part losses, ``nll`` and ``pg``, built from pieces a method's own loss terms reuse.

Advantage centres and estimators, loss aggregations and part losses are registries (name -> function), as in
verl: adding one is a function and a line, never an if-chain in the loop; a method module registers its own
loss terms (``PART_LOSSES``) and estimators (``ADVANTAGES``). Names follow TRL so results can be compared.

Shapes: B sequences (prompts x G for GRPO), T completion tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from sasr.errors import unknown
from sasr.passes import ANCHOR
from sasr.registry import Registry


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


# --- advantage estimators (a step's Gather.advantage names one) ----------------------------------------------


@dataclass
class Advantages:
    """What an estimator gives a step's group rows: each row's advantage [B], whether each prompt's group has
    no spread [prompts] (bool), and per-row numbers it adds to the rows (``Rows.extras``)."""

    advantages: torch.Tensor
    zero_spread: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


# name -> estimator(rewards [B], rows, group_size, centre, scale, gather) -> Advantages
ADVANTAGES: Registry[Callable[..., Advantages]] = Registry(
    "advantage estimator",
    "sasr.losses.ADVANTAGES",
    "an advantage estimator over a step's groups (a plan names it in `Gather.advantage`)",
)


@ADVANTAGES.register("group")
def _group(rewards, rows, group_size: int, centre: str, scale: str, gather) -> Advantages:
    """GRPO's: each reward centred on its group's (``grpo.advantage``), divided as ``scale`` says."""
    return Advantages(*group_advantages(rewards, group_size, centre, scale))


# --- the parts of a step (sasr.batch.Part) ---------------------------------------------------------------


@dataclass
class PartInputs:
    """One part's rows, taken from the step's passes. b rows, T completion tokens."""

    logps: torch.Tensor  # [b, T] differentiable
    mask: torch.Tensor  # [b, T] completion tokens that carry loss
    entropy: torch.Tensor | None  # [b, T] no gradient
    ref_logps: torch.Tensor | None  # [b, T] (sampled rows; the policy's own elsewhere)
    advantages: torch.Tensor  # [b]
    kind: torch.Tensor  # [b] long: each row's kind (sasr.batch.ROW_KINDS)
    correct: torch.Tensor  # [b] bool
    old_logps: torch.Tensor | None = None  # [b, T] pi_old, the policy that sampled; None: logps.detach()
    norm: Norm | None = None  # the step's counts when these rows are one piece of it
    anchor_kl: torch.Tensor | None = None  # [b, T] KL(pi_ref || pi) per token, differentiable (sft.loss=asft)
    given: torch.Tensor | None = None  # [b, T] bool: tokens of sampled rows that were given, not sampled
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # the rows' Rows.extras
    passes: dict[str, torch.Tensor] = field(default_factory=dict)  # other passes' outputs (sasr.passes)
    divergence: torch.Tensor | None = None  # [b, T] the policy's from a whole pass's, differentiable


@dataclass
class PartLoss:
    loss: torch.Tensor  # scalar, differentiable
    stats: dict[str, float]


@dataclass(frozen=True)
class LossTerm:
    """A registered part loss: ``fn(inputs, **options) -> PartLoss``; ``settings`` maps each keyword it takes
    from the run's configuration to that dotted key (a part's own options override them); ``passes``: the
    forward passes it needs besides the policy's, given its options (sasr.passes); ``divergence``: the whole
    pass and the TokenDivergence (sasr.divergences) whose value it needs at each token, or None."""

    fn: Callable[..., PartLoss]
    settings: dict[str, str] = field(default_factory=dict)
    passes: Callable[[dict[str, Any]], tuple[str, ...]] = lambda options: ()
    divergence: Callable[[dict[str, Any]], tuple[str, Any] | None] = lambda options: None


PART_LOSSES: Registry[LossTerm] = Registry(
    "part loss",
    "sasr.losses.PART_LOSSES",
    "a loss term a `Part` names (`LossTerm`: the function, the run's settings it reads, the passes it needs, "
    "the divergence it asks of the policy pass)",
)


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

# A further stop-gradient token weight a method puts on demonstration tokens: (inputs, weight [b, T]) ->
# (weight [b, T], statistics).
TokenWeight = Callable[[PartInputs, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def nll_part(
    x: PartInputs, *, loss_type: str = "nll", asft_beta: float = 0.1, reweight: TokenWeight | None = None
) -> PartLoss:
    """SFT: token-mean negative log-likelihood of the part's rows, each token weighted as ``loss_type`` says
    (``SFT_LOSSES``) and then as ``reweight`` says; an anchored loss (ASFT) adds ``asft_beta`` x the token
    mean of ``x.anchor_kl``."""
    if loss_type not in SFT_LOSSES:
        raise unknown("sft.loss", loss_type, SFT_LOSSES)
    token_weight = SFT_LOSSES[loss_type]
    if token_weight is None and reweight is None and x.norm is None:
        return PartLoss(sft_loss(x.logps, x.mask), {})
    weight = torch.ones_like(x.logps) if token_weight is None else token_weight(x.logps)
    stats: dict[str, float] = {}
    if reweight is not None:
        weight, stats = reweight(x, weight)
    per_token = -x.logps * weight  # [b, T]
    if loss_type in ANCHORED_SFT_LOSSES:
        if x.anchor_kl is None:
            raise ValueError(f"sft.loss={loss_type} needs the reference's distributions (anchor_kl)")
        per_token = per_token + asft_beta * x.anchor_kl
        stats["asft_kl"] = masked_mean(x.anchor_kl.detach(), x.mask).item()
    return PartLoss(token_mean(per_token, x), stats)


def token_mean(per_token: torch.Tensor, x: PartInputs) -> torch.Tensor:
    """The mean of ``per_token`` [b, T] over the part's tokens: of these rows, or of the whole step (every
    process's tokens, see Norm) when they are one piece of it."""
    if x.norm is not None:
        return (per_token * x.mask).sum() / max(x.norm.tokens, 1.0)
    return masked_mean(per_token, x.mask)


def anchor_if_anchored(options: dict[str, Any]) -> tuple[str, ...]:
    return (ANCHOR,) if options.get("loss_type") in ANCHORED_SFT_LOSSES else ()


# The settings the demonstration and policy-gradient parts read from the run's configuration.
NLL_SETTINGS = {"loss_type": "sft.loss", "asft_beta": "sft.asft_beta"}
PG_SETTINGS = {
    k: f"grpo.{k}"
    for k in (
        "beta",
        "epsilon",
        "epsilon_high",
        "loss_type",
        "max_completion_length",
        "use_bias_correction_kl",
        "importance_sampling_level",
    )
}
PART_LOSSES.add("nll", LossTerm(nll_part, NLL_SETTINGS, anchor_if_anchored))


def clipped(
    x: PartInputs,
    adv: torch.Tensor,
    *,
    beta: float,
    epsilon: float,
    epsilon_high: float | None,
    use_bias_correction_kl: bool,
    importance_sampling_level: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's per-token clipped surrogate plus beta x k3 KL of the part's rows against the advantages ``adv``
    ([b, 1], or [b, T] for a per-token advantage): (loss [b, T], clipped [b, T] bool)."""
    high = epsilon_high if epsilon_high is not None else epsilon
    per_token, _, is_clipped = _clipped_tokens(
        x.logps,
        x.logps.detach() if x.old_logps is None else x.old_logps,
        x.ref_logps,
        adv,
        beta=beta,
        epsilon_low=epsilon,
        epsilon_high=high,
        use_bias_correction_kl=use_bias_correction_kl,
        importance_sampling_level=importance_sampling_level,
        mask=x.mask,
    )
    return per_token, is_clipped


def aggregate(per_token: torch.Tensor, x: PartInputs, loss_type: str, max_completion_length: int):
    """The part's token losses [b, T] as one number, by ``loss_type`` (LOSS_AGGREGATIONS); a part with no rows
    here (HPT routed every prompt to SFT) is a zero that still has a graph."""
    if x.logps.size(0) == 0:
        return x.logps.sum()
    return LOSS_AGGREGATIONS[loss_type](per_token, x.mask, max_completion_length, x.norm)


def pg_part(x: PartInputs, *, loss_type: str, max_completion_length: int, **clip_settings: Any) -> PartLoss:
    """Policy gradient over a group's sampled rows: GRPO's clipped surrogate plus beta x KL, aggregated by
    ``loss_type``."""
    if loss_type not in LOSS_AGGREGATIONS:
        raise unknown("loss_type", loss_type, LOSS_AGGREGATIONS)
    per_token, is_clipped = clipped(x, x.advantages.unsqueeze(1), **clip_settings)
    stats = {"clip_fraction": masked_mean(is_clipped.float(), x.mask).item()}
    return PartLoss(aggregate(per_token, x, loss_type, max_completion_length), stats)


PART_LOSSES.add("pg", LossTerm(pg_part, PG_SETTINGS))


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
