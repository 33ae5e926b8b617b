"""A step's groups: each RL prompt's rollouts (and the rows a method adds to its group), scored, penalised,
with advantages; dynamic sampling's further prompts; the statistics of what was sampled."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import TrainerState

from sasr import metrics
from sasr.batch import GROUP_ROWS, PROMPT_EXTENSIONS, ROLLOUT, Gather, Rows, cat_rows
from sasr.data import encode_prompts, render_chats, render_prompts, with_question_text
from sasr.losses import ADVANTAGES
from sasr.rewards import RewardCall, score_all
from sasr.tasks import Example

if TYPE_CHECKING:
    from sasr.collect import Collector


@dataclass
class Groups:
    """One batch of RL prompts' groups, scored."""

    examples: list[Example]
    rows: Rows
    spread: torch.Tensor  # [prompts] bool: the group's rewards differ
    stats: dict[str, float]
    extra: dict[str, list]


def step_groups(c: Collector, model, step: int, gather: Gather) -> Groups:
    """The step's RL prompts and their groups. With ``grpo.dynamic_sampling``, groups whose rewards are all
    equal (no advantage: nothing to learn) are dropped and further prompts sampled in their place, up to
    ``grpo.max_num_gen_batches`` batches of prompts; if those run out, equal groups fill the batch."""
    g, n, pool = c.config.grpo, gather.prompts, c.prompt_pool(gather)
    first = sample_groups(c, model, c.draw(step, n, "grpo", pool), gather, step)
    if not g.dynamic_sampling:
        first.stats.update(rollout_stats(first.rows, first.spread))
        return first
    batches = [first]
    while sum(int(b.spread.sum()) for b in batches) < n and len(batches) < g.max_num_gen_batches:
        more = c.draw(step, n, f"grpo-more{len(batches)}", pool)  # new prompts, reproducibly drawn
        batches.append(sample_groups(c, model, more, gather, step))
    # the reward functions' numbers over every sampled batch; rollout time and tokens in all
    stats = {
        k: sum(b.stats[k] for b in batches) / (1 if metrics.batches_add(k) else len(batches))
        for k in first.stats
        if all(k in b.stats for b in batches)
    }
    # every group with spread, in the order sampled; then equal groups only to fill the batch
    ranked = [(not sp, b, i) for b, batch in enumerate(batches) for i, sp in enumerate(batch.spread.tolist())]
    chosen = sorted(sorted(ranked)[:n], key=lambda x: (x[1], x[2]))
    pieces, examples, offset = [], [], 0
    for b, batch in enumerate(batches):
        keep = [i for _, bb, i in chosen if bb == b]
        if keep:
            piece = batch.rows.groups(keep)
            pieces.append(dataclasses.replace(piece, group=piece.group + offset))
            examples += [batch.examples[i] for i in keep]
            offset += len(keep)
    rows = cat_rows(pieces, c.tokenizer.pad_token_id)
    spread = torch.tensor([not z for z, _, _ in chosen])
    stats["dynamic_sampling_batches"] = len(batches)
    stats.update(rollout_stats(rows, spread))
    # the reward functions' extra columns are per sampled batch, not per chosen group: left out
    return Groups(examples, rows, spread, stats, {})


def prompt_texts(
    c: Collector, step: int, examples: list[Example], gather: Gather
) -> tuple[list[str], list[str], list[str] | None]:
    """Each example's prompt as its rollouts are sampled from it (its chat, extended as
    ``gather.extend_prompts`` says if it asks), the text of shown answer tokens the judge reads with the
    completion ('' elsewhere), and the example's own prompt where the rows keep it (else None)."""
    kwargs, none = c.config.model.chat_template_kwargs, [""] * len(examples)
    if gather.extend_prompts is None:
        return render_prompts(c.tokenizer, c.task, examples, kwargs), none, None
    extension, args = PROMPT_EXTENSIONS[gather.extend_prompts.name], gather.extend_prompts.args
    made = [extension.make(c, step, ex, **args) for ex in examples]
    own = render_prompts(c.tokenizer, c.task, examples, kwargs) if extension.sample_only else None
    if extension.where == "chat":
        return render_chats(c.tokenizer, made, kwargs), none, own
    if extension.where == "question":
        chats = [with_question_text(c.task.messages(ex), text) for ex, text in zip(examples, made)]
        return render_chats(c.tokenizer, chats, kwargs), none, own
    plain = own if own is not None else render_prompts(c.tokenizer, c.task, examples, kwargs)
    shown = [c.tokenizer.decode(ids) for ids in made]
    return [p + s for p, s in zip(plain, shown)], shown if extension.judged else none, own


def under_own_prompts(c: Collector, rows: Rows, own: list[str]) -> Rows:
    """Rows sampled under other prompts, given each their group's own prompt ``own[group]`` instead; the
    sampler's log-probs, of the other prompt, are dropped."""
    texts = [own[g] for g in rows.group.tolist()]
    ids, mask = encode_prompts(c.tokenizer, texts, c.config.grpo.max_prompt_length, rows.prompt_ids.device)
    return dataclasses.replace(rows, prompt_ids=ids, prompt_mask=mask, sampler_logprobs=None)


def group_rows(c: Collector, model, examples: list[Example], prompts: list[str], gather: Gather) -> Rows:
    """Each prompt's group: ``gather.rollouts`` rollouts, then ``gather.group_rows`` rows from
    ``gather.extend_groups`` (as many more rollouts for a prompt it gives none), its rows together."""
    n, r, k = len(examples), gather.rollouts, gather.group_rows
    rows = c.sample(model, prompts, list(range(n)), r)  # [n x r]
    if not k:
        return rows
    added, got = None, []
    if gather.extend_groups is not None:
        make = GROUP_ROWS[gather.extend_groups.name]
        added, got = make(c, model, examples, prompts, rows, k, **gather.extend_groups.args)
    alone = [i for i in range(n) if i not in got]
    more = c.sample(model, [prompts[i] for i in alone], alone, k) if alone else None
    rows = cat_rows([p for p in (rows, added, more) if p is not None], c.tokenizer.pad_token_id)
    # each group's rows together: its rollouts, then the others
    return rows.select(torch.argsort(rows.group * 2 + (rows.kind != ROLLOUT), stable=True))


def sample_groups(c: Collector, model, examples: list[Example], gather: Gather, step: int) -> Groups:
    """One batch of prompts' groups from ``model`` (``Collector.decoder()``'s), scored, with advantages over
    each whole group."""
    g, device = c.config.grpo, c.accelerator.device
    stats: dict[str, float] = {}
    prompts, shown, own = prompt_texts(c, step, examples, gather)
    with metrics.timer(stats, "rollout_seconds", device):
        rows = group_rows(c, model, examples, prompts, gather)
    if own is not None:
        rows = under_own_prompts(c, rows, own)
    stats["generated_tokens"] = rows.sampled().sum().item()
    size = gather.rollouts + gather.group_rows
    grouped = [ex for ex in examples for _ in range(size)]
    judged = [
        shown[g] + text for g, text in zip(rows.group.tolist(), rows.texts)
    ]  # a shown start, then the rest
    scores = score_all(c.task, judged, grouped)
    lengths = rows.completion_mask.sum(1)  # [B]
    call = RewardCall(
        prompts=[c.task.messages(ex) for ex in grouped],
        texts=judged,
        completion_ids=[ids[:length].tolist() for ids, length in zip(rows.completion_ids, lengths.tolist())],
        trainer_state=TrainerState(global_step=step - 1, max_steps=c.config.steps),
    )
    values, reward_stats = c.rewards.score(scores, call, grouped)
    rewards = torch.tensor(values, dtype=torch.float32, device=device)  # [B]; NaN: no function scored it
    if g.overlong_buffer_len:  # DAPO's soft overlong penalty on what the policy sampled
        expected = g.max_completion_length - g.overlong_buffer_len
        excess = (rows.sampled().sum(1).float() - expected).clamp(min=0) / g.overlong_buffer_len
        penalty = -g.overlong_penalty_factor * excess * rows.sampled_rows()
        rewards = rewards + penalty
        reward_stats["overlong_penalty"] = penalty[rows.kind == ROLLOUT].mean().item()
    scale = gather.scale_rewards or g.scale_rewards
    adv = ADVANTAGES[gather.advantage](rewards, rows, size, g.advantage, scale, gather)
    rows = dataclasses.replace(
        rows,
        rewards=rewards,
        advantages=adv.advantages,
        extras={**rows.extras, **adv.extras},
        correct=torch.tensor([s.correct for s in scores], dtype=torch.bool, device=device),
        formatted=torch.tensor([s.formatted for s in scores], dtype=torch.bool, device=device),
    )
    return Groups(examples, rows, ~adv.zero_spread, {**stats, **reward_stats}, call.extra)


def outcomes(rows: Rows, prompts: list[int], accelerator: Accelerator) -> list[tuple[int, int]]:
    """(RL example index, rollouts the judge calls correct) for each group of the step's rows, every
    process's in rank order (a collective with several processes)."""
    on = rows.kind == ROLLOUT
    solved = torch.zeros(len(prompts), dtype=torch.long, device=rows.kind.device)
    solved.index_add_(0, rows.group[on], rows.correct[on].long())
    mine = list(zip(prompts, solved.tolist()))
    return gather_object(mine) if accelerator.num_processes > 1 else mine


def rollout_stats(rows: Rows, spread: torch.Tensor) -> dict[str, float]:
    """Statistics of the step's sampled rows (a reward left out by every function is left out here)."""
    on = rows.kind == ROLLOUT
    rewards = rows.rewards[on]
    scored = rewards[~rewards.isnan()]
    lengths = rows.completion_mask[on].sum(1)
    stats: dict[str, Any] = {
        "reward_mean": scored.mean().item() if scored.numel() else math.nan,
        "reward_std": scored.std().item() if scored.numel() > 1 else 0.0,
        "accuracy": rows.correct[on].sum().item() / int(on.sum()),
        "format_rate": rows.formatted[on].sum().item() / int(on.sum()),
        "completion_length": lengths.float().mean().item(),
        # the longest: each training pass computes rows up to their length group's longest
        "completion_length_max": lengths.max().item(),
        "clipped_ratio": rows.cut()[on].float().mean().item(),  # cut at the limit (TRL's name)
        "zero_spread_fraction": (~spread).float().mean().item(),
    }
    return stats
