"""Token log-probs of a batch of rows, computed lean: only the completion positions' logits, rows of similar
completion length together (length groups), each distinct prompt once for its rows (shared prompts), and a
selective log-softmax that never keeps a [N, V] float32 copy of the logits.

Shapes: B rows, P prompt tokens (left-padded), T completion tokens (right-padded), V vocabulary.
"""

from __future__ import annotations

import torch

from sasr import fsdp
from sasr.divergences import TokenDivergence, token_divergence
from sasr.lora_linear import checkpointed, fused_lora


def unique_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of identical consecutive prompts (ids and padding), as GRPO lays out its G rows per prompt.

    [B, P], [B, P] -> first [U] (the first row of each run), inverse [B] (row b's run), U <= B.
    """
    _, inverse, counts = torch.unique_consecutive(
        torch.cat([prompt_ids, prompt_mask.long()], 1), dim=0, return_inverse=True, return_counts=True
    )
    return counts.cumsum(0) - counts, inverse


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
    """log softmax(z / T)[ids] and, with no gradient, the entropy of softmax(z / T), chunk by chunk of tokens;
    given ``soft`` (target distributions q [N, V]), also the cross term sum_v q_v log softmax(z / T)_v.

    It saves only the logits (alive anyway) and one log-sum-exp per token, and its backward writes
    g * (onehot(ids) - softmax(z / T)) / T (plus g_cross * (q - softmax(z / T) sum_v q_v) / T) straight into
    the gradient: no float32 copy of the logits and no [N, V] log-softmax is ever kept.
    """

    @staticmethod
    def forward(ctx, logits, ids, temperature: float, chunk: int, with_entropy: bool, soft):
        # logits [N, V], ids [N], soft [N, V] or None -> logps [N], entropy [N] (or [0]), cross [N] (or [0])
        logps, lses, entropies, crosses = [], [], [], []
        scaled_buf, exp_buf = _workspace(logits, chunk), _workspace(logits, chunk)  # [chunk, V] each
        softs = soft.split(chunk) if soft is not None else [None] * len(ids.split(chunk))
        for lg, ix, q in zip(logits.split(chunk), ids.split(chunk), softs):
            s = _scaled(lg, temperature, scaled_buf)  # [n, V] float32
            top = s.amax(-1, keepdim=True)  # [n, 1]
            e = torch.sub(s, top, out=exp_buf[: s.size(0)]).exp_()  # [n, V] exp(s - max)
            total = e.sum(-1)  # [n]
            lse = top.squeeze(-1) + total.log()
            logps.append(s.gather(-1, ix[:, None]).squeeze(-1) - lse)
            lses.append(lse)
            if with_entropy:  # H = lse - sum_v p_v s_v with p = e / total; bmm: no [n, V] product
                entropies.append(lse - (e[:, None, :] @ s[:, :, None]).view(-1) / total)
            if q is not None:  # sum_v q_v (s_v - lse)
                crosses.append((q[:, None, :] @ s[:, :, None]).view(-1) - lse * q.sum(-1))
        ctx.save_for_backward(logits, ids, torch.cat(lses), soft if soft is not None else logits.new_empty(0))
        ctx.temperature, ctx.chunk = temperature, chunk
        entropy = torch.cat(entropies) if with_entropy else logits.new_empty(0, dtype=torch.float32)
        cross = torch.cat(crosses) if soft is not None else logits.new_empty(0, dtype=torch.float32)
        ctx.mark_non_differentiable(entropy)
        return torch.cat(logps), entropy, cross

    @staticmethod
    def backward(ctx, grad_logps, _, grad_cross):
        logits, ids, lse, soft = ctx.saved_tensors
        temperature = ctx.temperature
        grad = torch.empty_like(logits)  # [N, V]
        scaled_buf = _workspace(logits, ctx.chunk)
        exp_buf = None if grad.dtype == torch.float32 else _workspace(logits, ctx.chunk)
        with_soft = soft.numel() > 0 and grad_cross is not None
        softs = soft.split(ctx.chunk) if with_soft else [None] * len(ids.split(ctx.chunk))
        crosses = grad_cross.split(ctx.chunk) if with_soft else softs
        for lg, ix, ls, g, out, q, gq in zip(
            *(t.split(ctx.chunk) for t in (logits, ids, lse, grad_logps, grad)), softs, crosses
        ):
            p = out if exp_buf is None else exp_buf[: out.size(0)]
            torch.sub(_scaled(lg, temperature, scaled_buf), ls[:, None], out=p).exp_()  # softmax(s) [n, V]
            if q is None:
                p.mul_(-g[:, None]).scatter_add_(-1, ix[:, None], g[:, None])  # g (onehot - softmax)
            else:  # g (onehot - softmax) + gq (q - softmax sum q)
                p.mul_(-(g + gq * q.sum(-1))[:, None]).scatter_add_(-1, ix[:, None], g[:, None])
                p.add_(q * gq[:, None])
            if temperature != 1.0:
                p.div_(temperature)
            if p is not out:
                out.copy_(p)
        return grad, None, None, None, None, None


def selective_log_softmax(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[ids], and the entropy of each distribution if asked (a metric: no
    gradient). logits [B, T, V], ids [B, T] -> [B, T], [B, T] or None. ``chunk``: tokens at a time."""
    logps, entropy, _ = _selective(logits, ids, temperature, with_entropy, chunk, None)
    return logps, entropy


def _selective(logits, ids, temperature, with_entropy, chunk, soft):
    """selective_log_softmax, and with ``soft`` [B, T, V] the cross term [B, T] (else None)."""
    B, T, V = logits.shape
    chunk = chunk or max(1, CHUNK_ELEMENTS // V)
    flat = None if soft is None else soft.reshape(B * T, V)
    logps, entropy, cross = _SelectiveLogSoftmax.apply(
        logits.reshape(B * T, V), ids.reshape(B * T), temperature, chunk, with_entropy, flat
    )
    return (
        logps.view(B, T),
        entropy.view(B, T) if with_entropy else None,
        cross.view(B, T) if soft is not None else None,
    )


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
    share_prompts: bool = True,
) -> list[list[torch.Tensor]]:
    """Per group (rows [b], t): the logits that predict its rows' first t completion tokens, as pieces along the
    token axis whose concatenation is [b, t, V] (concatenating them would copy the largest tensor of the step).

    The last token is never fed: nothing reads what it predicts. Rows that repeat the prompt of the row before
    (GRPO's G completions of one prompt) share one pass over it: each distinct prompt goes through the model
    once and its keys and values are repeated for its rows, in every group. The same numbers as the plain
    forward; gradients flow into the prompt through the shared keys/values. ``share_prompts=False``: one call
    per group, whatever the rows (ranks whose forward calls are collectives must make as many).
    """
    n_prompt = input_ids.size(1) - n_completion
    first, inverse = (
        unique_prompts(input_ids[:, :n_prompt], attention_mask[:, :n_prompt])
        if n_prompt > 0
        else (None, None)
    )  # [U], [B]
    # A checkpointed layer would append to the cache again when it recomputes in backward: plain path.
    if not share_prompts or first is None or first.numel() == input_ids.size(0) or checkpointed(model):
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
        input_ids=input_ids[first, :n_prompt],
        attention_mask=attention_mask[first, :n_prompt],
        use_cache=True,
        logits_to_keep=1,
    )
    cache = head.cache
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
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=t - 1,
                ).logits  # [b, t - 1, V]: completion token i predicts token i + 1
            )
        out.append(parts)
    return out


def forwards_are_collective(model: torch.nn.Module) -> bool:
    """Whether each forward call of this model talks to the other ranks, so that every rank (each with its own
    completion lengths) must make as many calls, and a pass computes one padded group instead of length groups.

    True for a DDP that broadcasts its buffers (sasr's trainer turns that off) and under FSDP (each unit
    gathers its weights).
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.broadcast_buffers
    return fsdp.is_sharded(model)


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
    logps, entropy, _, _ = anchored_logprobs(
        model, input_ids, attention_mask, n_completion, temperature, with_entropy
    )
    return logps, entropy


def anchored_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    anchor: torch.Tensor | None = None,
    divergence: tuple[torch.Tensor, TokenDivergence] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``completion_logprobs`` in the same one pass; given ``anchor`` (distributions q [B, T, V], zero rows
    where none is wanted) the differentiable cross term sum_v q_v log pi(v) of each token [B, T]; given
    ``divergence`` (the target's logits over the temperature [B, T, V] and a TokenDivergence) the
    differentiable divergence of pi from the target at each token [B, T] (each None when not asked)."""
    T = n_completion
    P = input_ids.size(1) - T
    collective = forwards_are_collective(model)  # then one forward call, on every rank
    groups = length_groups(attention_mask[:, P:].sum(1), 1 if collective else MAX_GROUPS)
    with fused_lora(getattr(model, "module", model)):  # the peft model inside a DDP wrapper
        logits = _completion_logits(model, input_ids, attention_mask, T, groups, not collective)
    logps, entropies, crosses, divergences = [], [], [], []
    for (rows, t), parts in zip(groups, logits):  # parts: [b, t_i, V], sum t_i = t
        widths = [p.size(1) for p in parts]
        targets = input_ids[rows, P : P + t].split(widths, dim=1)
        softs = anchor[rows, :t].split(widths, dim=1) if anchor is not None else [None] * len(parts)
        out = [_selective(p, y, temperature, with_entropy, 0, q) for p, y, q in zip(parts, targets, softs)]
        if divergence is not None:  # each piece's divergence, the target read where it lies
            target, fn = divergence
            chunk, ids = max(1, CHUNK_ELEMENTS // parts[0].size(-1)), rows.tolist()
            starts = [sum(widths[:k]) for k in range(len(parts))]
            pieces = [
                token_divergence(p, target, fn, temperature, chunk, ids, a) for p, a in zip(parts, starts)
            ]
            divergences.append(torch.nn.functional.pad(torch.cat(pieces, dim=1), (0, T - t)))
        for i, into in ((0, logps), (1, entropies), (2, crosses)):
            if out[0][i] is not None:
                into.append(torch.nn.functional.pad(torch.cat([o[i] for o in out], dim=1), (0, T - t)))
    back = torch.cat([rows for rows, _ in groups]).argsort()  # [B]: group order -> row order
    return (
        torch.cat(logps)[back],
        torch.cat(entropies)[back] if with_entropy else None,
        torch.cat(crosses)[back] if anchor is not None else None,
        torch.cat(divergences)[back] if divergence is not None else None,
    )


@torch.no_grad()
def completion_scaled_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The model's logits over the temperature at each completion position [B, T, V] (float32): its whole
    next-token distributions, unnormalized. One plain pass, no gradient."""
    T = n_completion
    rows = torch.arange(input_ids.size(0), device=input_ids.device)
    with fused_lora(getattr(model, "module", model)):
        (parts,) = _completion_logits(model, input_ids, attention_mask, T, [(rows, T)], False)
    return torch.cat(parts, dim=1).float().div(temperature)  # [B, T, V]


@torch.no_grad()
def completion_distributions(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's whole next-token distribution at each completion position: probs [B, T, V] (float32) and
    sum_v q_v log q_v [B, T] (minus the entropy), one plain pass, no gradient."""
    scaled = completion_scaled_logits(model, input_ids, attention_mask, n_completion, temperature)
    logq = scaled.log_softmax(-1)  # [B, T, V]
    q = logq.exp()
    return q, (q * logq).sum(-1)
