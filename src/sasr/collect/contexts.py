"""Other prompts of a step's group rows (``Gather.contexts``): a method's maker (``sasr.batch.CONTEXTS``)
gives a chat per row, once the rows are scored; here each is rendered by the chat template as the student's
prompt is, keeping its last ``grpo.max_prompt_length`` tokens (``max_tokens`` in the ask's arguments: as many),
and laid out beside the rows' own prompts (``Rows.contexts``, under the maker's name), for a pass that reads the
same completions under them.
``Rows.extras`` gets the same name: 1 where a row got a prompt of its own, 0 where it keeps its prompt."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from sasr.batch import CONTEXTS, Ask, Rows
from sasr.tasks import Example

if TYPE_CHECKING:
    from sasr.collect import Collector


def with_contexts(c: Collector, step: int, ask: Ask, examples: list[Example], rows: Rows):
    """``rows`` with the other prompt ``ask``'s maker gives them, and the maker's statistics."""
    args = dict(ask.args)
    limit = args.pop("max_tokens", c.config.grpo.max_prompt_length)  # the prompts' own limit unless asked
    name, chats, stats = CONTEXTS[ask.name](c, step, examples, rows, **args)
    tok = c.tokenizer
    kwargs = c.config.model.chat_template_kwargs
    own = [ids[mask.bool()].tolist() for ids, mask in zip(rows.prompt_ids, rows.prompt_mask)]
    prompts = []
    for i, chat in enumerate(chats):
        if chat is None:
            prompts.append(own[i])
            continue
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kwargs)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"][-limit:])
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left-padded
        if p:
            ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    device = rows.prompt_ids.device
    contexts = {**rows.contexts, name: (ids.to(device), mask.to(device))}
    given = torch.tensor([chat is not None for chat in chats], dtype=torch.float32, device=device)
    extras = {**rows.extras, name: given}  # [B] 1 where the row got a prompt of its own
    return dataclasses.replace(rows, contexts=contexts, extras=extras), stats
