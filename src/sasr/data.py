"""Prompts and demonstrations as token rows (left-padded prompt, right-padded target), and per-step example
picks."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from sasr.batch import DEMO, Rows
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


def render_prompts(
    tokenizer, task: Task, examples: Sequence[Example], template_kwargs: dict[str, Any] | None = None
) -> list[str]:
    """Each example's chat messages (``task.messages``) as a prompt string ending with the assistant turn's
    header, by the tokenizer's chat template; ``template_kwargs`` go to the template (e.g. enable_thinking).
    A language-modelling row's prompt is the start-of-text token alone (BOS, else EOS): all its text trains."""
    start = tokenizer.bos_token or tokenizer.eos_token
    chats = [None if task.is_text(ex) else task.messages(ex) for ex in examples]
    return [
        start if chat is None else prompt
        for chat, prompt in zip(chats, render_chats(tokenizer, chats, template_kwargs))
    ]


def render_chats(
    tokenizer, chats: Sequence[list[dict] | None], template_kwargs: dict[str, Any] | None = None
) -> list[str]:
    """Chats as prompt strings ending with the assistant turn's header (None: '')."""
    return [
        ""
        if chat is None
        else tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
        )
        for chat in chats
    ]


def with_question_text(messages: list[dict], text: str) -> list[dict]:
    """``messages`` with ``text`` at the end of the last user turn (a text part more where it has parts)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    content = messages[last]["content"]
    content = [*content, {"type": "text", "text": text}] if isinstance(content, list) else content + text
    return [*messages[:last], {**messages[last], "content": content}, *messages[last + 1 :]]


def encode_prompts(
    tokenizer, prompts: list[str], max_length: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Left-padded ids and mask [B, P]; over-long prompts keep their last ``max_length`` tokens."""
    side = tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    enc = tokenizer(
        prompts,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_length,
        add_special_tokens=False,  # the chat template already holds them
    )
    tokenizer.truncation_side = side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def encode_targets(
    tokenizer, texts: Sequence[str], limit: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Completions to train on: each text's tokens (at most ``limit`` - 1) then EOS, right-padded. [n, t] x 2"""
    targets = [tokenizer(t, add_special_tokens=False)["input_ids"][: max(limit - 1, 0)] for t in texts]
    targets = [t + [tokenizer.eos_token_id] for t in targets]
    width = max(len(t) for t in targets)
    ids = torch.full((len(targets), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(targets), width), dtype=torch.long)
    for i, t in enumerate(targets):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1
    return ids.to(device), mask.to(device)


def demonstration_rows(
    tokenizer,
    task: Task,
    examples: Sequence[Example],
    max_length: int,
    device: torch.device,
    group: Sequence[int] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> Rows:
    """Demonstrations laid out like rollouts: prompt [B, P] left-padded, target [B, T] right-padded.

    The target is the task's chain of thought + answer, then EOS; only target tokens carry SFT loss. Prompt and
    target share ``max_length`` (the prompt keeps at most half of it). ``group``: each row's RL prompt, if any.
    """
    prompts = render_prompts(tokenizer, task, examples, template_kwargs)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, max_length // 2, device)
    texts = [task.target(ex) for ex in examples]
    ids, mask = encode_targets(tokenizer, texts, max(max_length - prompt_ids.size(1), 1), device)
    return rows_of_kind(prompt_ids, prompt_mask, ids, mask, texts, DEMO, group)


def rows_of_kind(
    prompt_ids,
    prompt_mask,
    ids,
    mask,
    texts: Sequence[str],
    kind: int,
    group: Sequence[int] | None = None,
    sampler_logprobs: torch.Tensor | None = None,
    truncated: torch.Tensor | None = None,
) -> Rows:
    """Rows of one kind from prompt and completion tokens, not yet scored (reward, advantage 0; not correct).
    ``sampler_logprobs`` [B, T] and ``truncated`` [B]: a sampler's, for rollouts."""
    B, device = ids.size(0), ids.device
    return Rows(
        prompt_ids,
        prompt_mask,
        ids,
        mask,
        kind=torch.full((B,), kind, dtype=torch.long, device=device),
        group=torch.tensor(group if group is not None else [-1] * B, dtype=torch.long, device=device),
        rewards=torch.zeros(B, device=device),
        advantages=torch.zeros(B, device=device),
        correct=torch.zeros(B, dtype=torch.bool, device=device),
        formatted=torch.zeros(B, dtype=torch.bool, device=device),
        sampler_logprobs=sampler_logprobs,
        truncated=truncated,
        texts=list(texts),
    )
