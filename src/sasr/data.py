"""Batches: SFT demonstrations as (left-padded prompt, right-padded target) and per-step example picks."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from sasr.rollout import Rollouts, encode_prompts, render_prompts
from sasr.tasks import Example, Task


def pick(n_total: int, per_rank: int, step: int, seed: int, kind: str, rank: int, world: int) -> list[int]:
    """Indices for this rank at this step: one global draw from (seed, kind, step), split by rank.

    Being a pure function of the step, the data position needs no state to resume.
    """
    rng = random.Random(f"{seed}/{kind}/{step}")
    need = per_rank * world
    idx = (
        [rng.randrange(n_total) for _ in range(need)] if need > n_total else rng.sample(range(n_total), need)
    )
    return idx[rank * per_rank : (rank + 1) * per_rank]


def sft_batch(
    tokenizer, task: Task, examples: Sequence[Example], max_length: int, device: torch.device
) -> Rollouts:
    """Demonstrations laid out like rollouts: prompt [B, P] left-padded, target [B, T] right-padded.

    The target is the task's chain of thought + answer, then EOS; only target tokens carry SFT loss.
    """
    prompts = render_prompts(tokenizer, [task.messages(ex) for ex in examples])
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, max_length // 2, device)
    room = max(max_length - prompt_ids.size(1), 1)
    targets = [
        tokenizer(task.target(ex), add_special_tokens=False)["input_ids"][: room - 1] for ex in examples
    ]
    targets = [t + [tokenizer.eos_token_id] for t in targets]
    width = max(len(t) for t in targets)
    ids = torch.full((len(targets), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(targets), width), dtype=torch.long)
    for i, t in enumerate(targets):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1
    texts = [task.target(ex) for ex in examples]
    return Rollouts(prompt_ids, prompt_mask, ids.to(device), mask.to(device), texts)
