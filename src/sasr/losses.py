"""Token log-probs, the SFT loss, GRPO advantages, the GRPO loss and the part losses of a step (docs/methods.md).

Advantage estimators and loss aggregations are registries (name -> function), as in verl: adding one is
a function and a line, never an if-chain in the loop. Names follow TRL so results can be compared.

Shapes: B sequences (prompts x G for GRPO), T completion tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sasr.engine import unique_prompts
from sasr.errors import unknown
from sasr.lora_linear import checkpointed, fused_lora

# --- log-probs --------------------------------------------------------------------------------------------


# Logits per chunk: float32 temporaries of 16 MB, small enough for the allocator to reuse.
CHUNK_ELEMENTS = 2**22


def _scaled(logits: torch.Tensor, temperature: float, buffer: torch.Tensor) -> torch.Tensor:
    """logits / temperature in float32: the logits themselves when that is what they are, else in ``buffer``."""
    if logits.dtype == torch.float32 and temperature == 1.0:
        return logits
    out = buffer[: logits.size(0)].copy_(logits)  # upcast first, then divide: no bf16 rounding of s
    return out if temperature == 1.0 else out.div_(temperature)


def _workspace(logits: torch.Tensor, chunk: int) -> torch.Tensor:
    # Allocated once per call and reused by every chunk: a fresh tensor per chunk costs page faults.
    return torch.empty(min(chunk, logits.size(0)), logits.size(1), device=logits.device)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(z / T)[ids] and, with no gradient, the entropy of softmax(z / T), chunk by chunk of tokens.

    It saves only the logits (alive anyway) and one log-sum-exp per token, and its backward writes
    g * (onehot(ids) - softmax(z / T)) / T straight into the gradient: no float32 copy of the logits and no
    [N, V] log-softmax is ever kept, and nothing is computed twice.
    """

    @staticmethod
    def forward(ctx, logits, ids, temperature: float, chunk: int, with_entropy: bool):
        # logits [N, V], ids [N] -> logps [N], entropy [N] (or [0])
        logps, lses, entropies = [], [], []
        scaled_buf, exp_buf = _workspace(logits, chunk), _workspace(logits, chunk)  # [chunk, V] each
        for lg, ix in zip(logits.split(chunk), ids.split(chunk)):
            s = _scaled(lg, temperature, scaled_buf)  # [n, V] float32
            top = s.amax(-1, keepdim=True)  # [n, 1]
            e = torch.sub(s, top, out=exp_buf[: s.size(0)]).exp_()  # [n, V] exp(s - max)
            total = e.sum(-1)  # [n]
            lse = top.squeeze(-1) + total.log()
            logps.append(s.gather(-1, ix[:, None]).squeeze(-1) - lse)
            lses.append(lse)
            if with_entropy:  # H = lse - sum_v p_v s_v with p = e / total; bmm: no [n, V] product
                entropies.append(lse - (e[:, None, :] @ s[:, :, None]).view(-1) / total)
        ctx.save_for_backward(logits, ids, torch.cat(lses))
        ctx.temperature, ctx.chunk = temperature, chunk
        entropy = torch.cat(entropies) if with_entropy else logits.new_empty(0, dtype=torch.float32)
        ctx.mark_non_differentiable(entropy)
        return torch.cat(logps), entropy

    @staticmethod
    def backward(ctx, grad_logps, _):
        logits, ids, lse = ctx.saved_tensors
        temperature = ctx.temperature
        grad = torch.empty_like(logits)  # [N, V]
        scaled_buf = _workspace(logits, ctx.chunk)
        exp_buf = None if grad.dtype == torch.float32 else _workspace(logits, ctx.chunk)
        for lg, ix, ls, g, out in zip(*(t.split(ctx.chunk) for t in (logits, ids, lse, grad_logps, grad))):
            p = out if exp_buf is None else exp_buf[: out.size(0)]
            torch.sub(_scaled(lg, temperature, scaled_buf), ls[:, None], out=p).exp_()  # softmax(s) [n, V]
            p.mul_(-g[:, None]).scatter_add_(-1, ix[:, None], g[:, None])  # g (onehot - softmax)
            if temperature != 1.0:
                p.div_(temperature)
            if p is not out:
                out.copy_(p)
        return grad, None, None, None, None


def selective_log_softmax(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[ids], and the entropy of each distribution if asked (a metric: no
    gradient). logits [B, T, V], ids [B, T] -> [B, T], [B, T] or None. ``chunk``: tokens at a time."""
    B, T, V = logits.shape
    chunk = chunk or max(1, CHUNK_ELEMENTS // V)
    logps, entropy = _SelectiveLogSoftmax.apply(
        logits.reshape(B * T, V), ids.reshape(B * T), temperature, chunk, with_entropy
    )
    return logps.view(B, T), (entropy.view(B, T) if with_entropy else None)


# Rows are computed in at most this many groups of similar completion length; a further group must save at
# least 1/GROUP_SAVING of the B x T padded tokens (it costs one more forward call).
MAX_GROUPS, GROUP_SAVING = 4, 8


def length_groups(lengths: torch.Tensor, max_groups: int = MAX_GROUPS) -> list[tuple[torch.Tensor, int]]:
    """Rows grouped by completion length, each computed only up to its group's longest: [(rows [b], t)].

    lengths [B] (real tokens per row; right padding after them). The distinct lengths, longest first, are cut
    into at most ``max_groups`` runs so as to minimise the tokens computed (rows x longest, summed over runs),
    a cut being worth it only where it saves B x T / GROUP_SAVING tokens. Within a group rows keep their
    order, so the G rows of one prompt stay consecutive.
    """
    lengths_cpu = lengths.detach().cpu().clamp(min=1)  # [B]
    B, T = lengths_cpu.numel(), int(lengths_cpu.max())
    step = -(-T // 512)  # at most 512 distinct lengths: the table below is (D + 1)^2
    rounded = (-(-lengths_cpu // step) * step).clamp(max=T)  # [B]
    values, counts = rounded.unique(sorted=True, return_counts=True)
    values, counts = values.flip(0), counts.flip(0)  # [D] longest first
    D = values.numel()
    rows_before = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # [D + 1]
    a, b = torch.arange(D + 1)[:, None], torch.arange(D + 1)[None, :]
    # run[a, b]: tokens of lengths [a, b) computed as one run, up to values[a]; inf unless a < b
    longest = torch.cat([values, values[-1:]]).double()[:, None]  # [D + 1, 1]
    run = (rows_before[None, :] - rows_before[:, None]) * longest + B * T / GROUP_SAVING
    run = run.masked_fill(a >= b, float("inf"))
    best = torch.full((D + 1,), float("inf"), dtype=torch.float64)
    best[0] = 0.0  # best[b]: least cost of lengths [0, b) with the runs allowed so far
    starts = []  # starts[k][b]: where the last run ending at b starts with k + 1 runs allowed (-1: k runs do)
    for _ in range(max_groups):
        cost, start = (best[:, None] + run).min(0)  # [D + 1]
        keep = best <= cost
        best, start = torch.where(keep, best, cost), torch.where(keep, -1, start)
        starts.append(start)
    groups, stop = [], D
    for start in reversed(starts):
        if stop > 0 and start[stop] >= 0:
            first = int(start[stop])
            rows = (
                ((rounded <= values[first]) & (rounded >= values[stop - 1])).nonzero().squeeze(1)
            )  # in order
            groups.append((rows.to(lengths.device), int(values[first])))
            stop = first
    return groups[::-1]


def _completion_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    groups: list[tuple[torch.Tensor, int]],
) -> list[list[torch.Tensor]]:
    """Per group (rows [b], t): the logits that predict its rows' first t completion tokens, as pieces along the
    token axis whose concatenation is [b, t, V] (concatenating them would copy the largest tensor of the step).

    The last token is never fed: nothing reads what it predicts. Rows that repeat the prompt of the row before
    (GRPO's G completions of one prompt) share one pass over it: each distinct prompt goes through the model
    once and its keys and values are repeated for its rows, in every group. The same numbers as the plain
    forward; gradients flow into the prompt through the shared keys/values.
    """
    n_prompt = input_ids.size(1) - n_completion
    first, inverse = (
        unique_prompts(input_ids[:, :n_prompt], attention_mask[:, :n_prompt])
        if n_prompt > 0
        else (None, None)
    )  # [U], [B]
    # A checkpointed layer would append to the cache again when it recomputes in backward: plain path.
    if first is None or first.numel() == input_ids.size(0) or checkpointed(model):
        return [
            [
                model(
                    input_ids=input_ids[rows, : n_prompt + t - 1],
                    attention_mask=attention_mask[rows, : n_prompt + t - 1],
                    logits_to_keep=t,
                    use_cache=False,
                ).logits  # [b, t, V]: position i predicts token i + 1
            ]
            for rows, t in groups
        ]
    head = model(
        input_ids=input_ids[first, :n_prompt], attention_mask=attention_mask[first, :n_prompt], use_cache=True,
        logits_to_keep=1,
    )  # fmt: skip
    cache = head.past_key_values
    prompt_kv = [(layer.keys, layer.values) for layer in cache.layers]  # [U, heads, P, d] per layer
    out = []
    for rows, t in groups:
        for layer, (keys, values) in zip(cache.layers, prompt_kv):  # this group's prompts; its pass appends
            layer.keys, layer.values = keys[inverse[rows]], values[inverse[rows]]  # [b, heads, P, d]
        parts = [head.logits[inverse[rows]]]  # [b, 1, V]: the prompt's last token predicts the first token
        if t > 1:
            parts.append(
                model(
                    input_ids=input_ids[rows, n_prompt : n_prompt + t - 1],
                    attention_mask=attention_mask[rows, : n_prompt + t - 1],
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=t - 1,
                ).logits  # [b, t - 1, V]: completion token i predicts token i + 1
            )
        out.append(parts)
    return out


def forwards_are_collective(model: torch.nn.Module) -> bool:
    """Whether each forward call of this model talks to the other ranks, so that every rank (each with its own
    completion lengths) must make as many calls, and a pass computes one padded group instead of length groups.

    True for a DDP that broadcasts its buffers (sasr's trainer turns that off), FSDP (each unit gathers its
    weights) and DeepSpeed (ZeRO-3 gathers them; the engine is taken as collective whatever its stage).
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.broadcast_buffers
    if type(model).__name__ == "DeepSpeedEngine" or any(hasattr(p, "ds_id") for p in model.parameters()):
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the last ``n_completion`` tokens of each row given what precedes them.

    input_ids, attention_mask [B, P + T] (prompt left-padded, completion right-padded) -> logps [B, T], entropy
    [B, T] or None, both 0 past the longest row of a row's length group. Only the logits of the completion
    positions are computed (``logits_to_keep``), rows of similar length together up to their longest
    (``length_groups``), and consecutive rows with one prompt compute it once.
    """
    T = n_completion
    P = input_ids.size(1) - T
    groups = length_groups(attention_mask[:, P:].sum(1), 1 if forwards_are_collective(model) else MAX_GROUPS)
    with fused_lora(getattr(model, "module", model)):  # the peft model inside a DDP wrapper
        logits = _completion_logits(model, input_ids, attention_mask, T, groups)
    logps, entropies = [], []
    for (rows, t), parts in zip(groups, logits):  # parts: [b, t_i, V], sum t_i = t
        targets = input_ids[rows, P : P + t].split([p.size(1) for p in parts], dim=1)
        out = [selective_log_softmax(p, y, temperature, with_entropy) for p, y in zip(parts, targets)]
        logps.append(torch.nn.functional.pad(torch.cat([lp for lp, _ in out], dim=1), (0, T - t)))  # [b, T]
        if with_entropy:
            entropies.append(torch.nn.functional.pad(torch.cat([e for _, e in out], dim=1), (0, T - t)))
    back = torch.cat([rows for rows, _ in groups]).argsort()  # [B]: group order -> row order
    return torch.cat(logps)[back], (torch.cat(entropies)[back] if with_entropy else None)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate plus beta x k3 KL: (loss [B, T], kl [B, T], clipped [B, T] bool).

    logps, old_logps, ref_logps [B, T]; adv [B, 1].
    """
    ratio = torch.exp(logps - old_logps)  # [B, T]
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
    return per_token, kl, is_clipped


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
    """The clipped surrogate plus beta x k3 KL (docs/methods.md, GRPO).

    logps, old_logps, ref_logps, mask [B, T]; advantages [B].
    rho = exp(logps - old_logps); with one update per batch old_logps = logps.detach(), so rho = 1 in value
    but carries the policy gradient A * grad log pi. ``use_bias_correction_kl`` multiplies the KL by rho
    (TRL's option of that name; off by default, as the method states the loss).
    """
    if loss_type not in LOSS_AGGREGATIONS:
        raise unknown("loss_type", loss_type, LOSS_AGGREGATIONS)
    per_token, kl, is_clipped = _clipped_tokens(
        logps, old_logps, ref_logps, advantages.unsqueeze(1), beta=beta, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, use_bias_correction_kl=use_bias_correction_kl,
    )  # fmt: skip
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


@dataclass
class PartLoss:
    loss: torch.Tensor  # scalar, differentiable
    stats: dict[str, float]


def row_entropy(x: PartInputs) -> torch.Tensor:
    """[b]: each row's mean token entropy (no gradient)."""
    if x.entropy is None:
        raise ValueError("this part needs the policy pass's entropy")
    return (x.entropy * x.mask).sum(1) / x.mask.sum(1).clamp(min=1)


def nll_part(x: PartInputs, *, phi: bool = False, entropy_coef: float | None = None) -> PartLoss:
    """SFT: token-mean negative log-likelihood of the part's rows.

    ``phi``: each token weighted by the stop-gradient p (1 - p) (CHORD-phi). ``entropy_coef``: each row weighted
    by the stop-gradient entropy_coef * exp(-H_row), H_row its mean token entropy (SRFT).
    """
    if not phi and entropy_coef is None:
        return PartLoss(sft_loss(x.logps, x.mask), {})
    weight = torch.ones_like(x.logps)
    stats = {}
    if phi:
        p = x.logps.detach().exp()
        weight = weight * p * (1 - p)
        stats["chord_phi"] = masked_mean(weight, x.mask).item()
    if entropy_coef is not None:
        w_row = entropy_coef * torch.exp(-row_entropy(x))  # [b]
        weight = weight * w_row[:, None]
        stats["srft_sft_weight"] = w_row.mean().item() if w_row.numel() else 0.0
    return PartLoss(-masked_mean(x.logps * weight, x.mask), stats)


def pg_part(
    x: PartInputs,
    *,
    beta: float,
    epsilon: float,
    epsilon_high: float | None,
    loss_type: str,
    max_completion_length: int,
    use_bias_correction_kl: bool,
    shaping_gamma: float | None = None,
    rollout_coef: float | None = None,
) -> PartLoss:
    """Policy gradient over a group's rows, aggregated together by ``loss_type``.

    Rollout rows: GRPO's clipped surrogate plus beta x KL; or, with ``rollout_coef`` (SRFT), -w log p with the
    stop-gradient w = rollout_coef * exp(H_row) on correct rows and -1 on wrong ones.
    Off-policy rows (demonstrations in the group, behaviour probability taken as 1): -A f(p), unclipped, with
    f(p) = p / (p + shaping_gamma) (LUFFY's policy shaping), or f(p) = p without it.
    """
    if loss_type not in LOSS_AGGREGATIONS:
        raise unknown("loss_type", loss_type, LOSS_AGGREGATIONS)
    adv = x.advantages.unsqueeze(1)  # [b, 1]
    per_token, kl, is_clipped = _clipped_tokens(
        x.logps, x.logps.detach(), x.ref_logps, adv, beta=beta, epsilon_low=epsilon,
        epsilon_high=epsilon_high if epsilon_high is not None else epsilon,
        use_bias_correction_kl=use_bias_correction_kl,
    )  # fmt: skip
    stats: dict[str, float] = {}
    if rollout_coef is not None:
        h = row_entropy(x)  # [b]
        w_row = torch.where(x.correct, rollout_coef * torch.exp(h), torch.full_like(h, -1.0))
        per_token = -w_row[:, None] * x.logps
        positive = x.correct & ~x.offpolicy
        stats["srft_rl_weight"] = w_row[positive].mean().item() if positive.any() else 0.0
    off = x.offpolicy[:, None]  # [b, 1]
    if shaping_gamma is not None:
        p = x.logps.exp()
        off_token = -adv * p / (p + shaping_gamma)  # no ratio to clip: the behaviour probability is 1
        per_token = torch.where(off, off_token, per_token)
        with torch.no_grad():
            off_mask = x.mask * off.to(x.mask.dtype)
            pd = p.detach()
            # d f(p) / d log p: what an off-policy token weighs where an on-policy one weighs 1
            stats["offpolicy_shaped_weight"] = masked_mean(
                pd * shaping_gamma / (pd + shaping_gamma) ** 2, off_mask
            ).item()
            stats["offpolicy_prob"] = masked_mean(pd, off_mask).item()
    on_mask = x.mask * (~off).to(x.mask.dtype)
    if x.logps.size(0) == 0:  # no rows on this rank (HPT routed every prompt to SFT): a zero with a graph
        loss = x.logps.sum()
    else:
        loss = LOSS_AGGREGATIONS[loss_type](per_token, x.mask, max_completion_length)
    with torch.no_grad():
        stats["clip_fraction"] = masked_mean(is_clipped.float(), on_mask).item()
        stats["kl"] = masked_mean(kl, on_mask).item()
    return PartLoss(loss, stats)


PART_LOSSES: dict[str, Callable[..., PartLoss]] = {"nll": nll_part, "pg": pg_part}
