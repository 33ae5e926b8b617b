"""Completions sampled from the policy as rows: rollouts of prompts, and continuations of given tokens (a row
whose completion starts with tokens it was given and goes on with what the policy samples)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sasr.batch import ROLLOUT, Rows, cat_rows
from sasr.data import encode_prompts, rows_of_kind
from sasr.rollout import generate, generate_ids

if TYPE_CHECKING:
    from sasr.collect import Collector


def in_chunks(
    c: Collector, model, prompts: list[str], groups: list[int], num: int, starts, kind: int
) -> Rows:
    """``num`` completions of each prompt sampled from ``model``, in chunks of ``grpo.generation_batch_size``
    rows; a row's ``group`` is its prompt's entry in ``groups``. With ``starts`` (token ids, one list per
    prompt), rows of ``kind`` that continue them (``continuations``); else rollouts."""
    g = c.config.grpo
    per_call = len(prompts) if not g.generation_batch_size else max(1, g.generation_batch_size // num)
    stops = torch.tensor(c.stop_ids, device=c.accelerator.device)
    pieces = []
    for s in range(0, len(prompts), per_call):
        chunk, chunk_groups = prompts[s : s + per_call], groups[s : s + per_call]
        if starts is None:
            pieces.append(rollouts(c, model, chunk, chunk_groups, num, stops))
        else:
            pieces.append(continuations(c, model, chunk, starts[s : s + per_call], chunk_groups, num, kind))
    return cat_rows(pieces, c.tokenizer.pad_token_id)


def rollouts(
    c: Collector, model, prompts: list[str], groups: list[int], num: int, stops: torch.Tensor
) -> Rows:
    """ROLLOUT rows: ``num`` completions of each prompt, in one generate call."""
    g = c.config.grpo
    roll = generate(
        model,
        c.tokenizer,
        prompts,
        num_generations=num,
        max_new_tokens=g.max_completion_length,
        max_prompt_length=g.max_prompt_length,
        temperature=g.temperature,
        top_p=g.top_p,
        backend=g.generation_backend,
        cuda_graphs=c.cuda_graphs,
        compile=g.torch_compile,
        **g.generation_kwargs,
    )  # [prompts x num] rows
    ended = (torch.isin(roll.completion_ids, stops) & roll.completion_mask.bool()).any(1)
    cut = ~ended & (roll.completion_mask.sum(1) >= g.max_completion_length)  # [prompts x num]
    return rows_of_kind(
        roll.prompt_ids,
        roll.prompt_mask,
        roll.completion_ids,
        roll.completion_mask,
        roll.texts,
        ROLLOUT,
        [gr for gr in groups for _ in range(num)],
        sampler_logprobs=roll.logprobs,
        truncated=cut,
    )


def continuations(
    c: Collector, model, prompts: list[str], starts: list[list[int]], groups: list[int], num: int, kind: int
) -> Rows:
    """Rows of ``kind``: ``num`` continuations of each prompt followed by its ``starts`` tokens (as tokens, so
    the row holds exactly them), each continuation up to max_completion_length, as a rollout. The given
    tokens are marked (``Rows.given``) and have no sampler log-prob (0)."""
    g, device, pad = c.config.grpo, c.accelerator.device, c.tokenizer.pad_token_id
    prompt_ids, prompt_mask = encode_prompts(c.tokenizer, prompts, g.max_prompt_length, device)
    inputs = [ids[m.bool()].tolist() + pre for ids, m, pre in zip(prompt_ids, prompt_mask, starts)]
    width = max(len(x) for x in inputs)
    gen_ids = torch.tensor([[pad] * (width - len(x)) + x for x in inputs], device=device)
    gen_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in inputs], device=device)
    roll = generate_ids(
        model,
        c.tokenizer,
        gen_ids,
        gen_mask,
        num_generations=num,
        max_new_tokens=g.max_completion_length,
        temperature=g.temperature,
        top_p=g.top_p,
        backend=g.generation_backend,
        cuda_graphs=c.cuda_graphs,
        compile=g.torch_compile,
        **g.generation_kwargs,
    )  # [n x num] continuations
    stops = set(c.stop_ids)
    rows, logps, cut = [], [], []
    for j in range(roll.completion_ids.size(0)):
        pre = starts[j // num]
        cont = roll.completion_ids[j][roll.completion_mask[j].bool()].tolist()
        rows.append(pre + cont)
        cut.append(len(cont) >= g.max_completion_length and not (cont and cont[-1] in stops))
        lp = roll.logprobs[j, : len(cont)].tolist() if roll.logprobs is not None else [0.0] * len(cont)
        logps.append([0.0] * len(pre) + lp)
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows], device=device)  # [n x num, T]
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], device=device)
    lengths = [len(starts[j // num]) for j in range(len(rows))]
    given = torch.arange(T, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    sampler = torch.tensor([lp + [0.0] * (T - len(lp)) for lp in logps], device=device)
    texts = c.tokenizer.batch_decode(ids * mask + pad * (1 - mask), skip_special_tokens=True)
    out = rows_of_kind(
        prompt_ids.repeat_interleave(num, 0),
        prompt_mask.repeat_interleave(num, 0),
        ids,
        mask,
        texts,
        kind,
        [gr for gr in groups for _ in range(num)],
        sampler_logprobs=sampler if roll.logprobs is not None else None,
        truncated=torch.tensor(cut, device=device),
    )
    out.given = given
    return out
