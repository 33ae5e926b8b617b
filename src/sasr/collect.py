"""A step's rows, as its plan asks: demonstrations from their source, then each RL prompt's group (rollouts
sampled in chunks, its off-policy demonstrations), scored, penalised, dynamically sampled, with advantages,
then the RL prompts' own demonstrations. A plan in, rows out; no gradient here.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import TrainerState

from sasr import metrics
from sasr.batch import DEMO, OFFPOLICY, PREFIXED, ROLLOUT, Hints, Plan, Rows, cat_rows
from sasr.config import TrainConfig
from sasr.data import demonstration_rows, encode_prompts, encode_targets, pick, render_prompts, rows_of_kind
from sasr.errors import SasrError
from sasr.losses import group_advantages, prefix_group_advantages
from sasr.methods import METHODS, Method
from sasr.rewards import RewardCall, Rewards, score_all
from sasr.rollout import generate, generate_ids
from sasr.tasks import Example, Task, get_task


@dataclass
class Collected:
    """A step's rows and what collecting them measured."""

    rows: Rows
    stats: dict[str, float]  # rollout statistics, the reward functions' numbers, ``tokens``
    extra: dict[str, list]  # the reward functions' log_extra columns, one value per group row
    prompts: list[int] = dataclasses.field(default_factory=list)  # each group's RL example (its index)


@dataclass
class Groups:
    """One batch of RL prompts' groups, scored."""

    examples: list[Example]
    rows: Rows
    spread: torch.Tensor  # [prompts] bool: the group's rewards differ
    stats: dict[str, float]
    extra: dict[str, list]


SCARCE_SEED = 0  # demos.size's demonstrations are drawn with this seed, whatever the run's


def _scarce(task: Task, n_total: int, size: int) -> list[Example]:
    """``demos.size``: the first ``size`` training examples with a demonstration, drawn at SCARCE_SEED."""
    have = [ex for ex in task.examples("train", n_total, seed=SCARCE_SEED) if task.has_demonstration(ex)]
    if len(have) < size:
        raise SasrError(
            f"demos.size is {size}, but task '{task.name}' has only {len(have)} training examples with a "
            "demonstration; lower demos.size"
        )
    return have[:size]


def training_examples(config: TrainConfig, task: Task) -> list[Example]:
    """The RL prompts: ``task.train_size`` training examples of the run's seed. With ``demos.size`` and no
    ``demos.task``, the scarce demonstrations come first and the seed's draw (without them) fills the rest,
    so every run holds the same demonstrated prompts."""
    c = config
    examples = task.examples("train", c.task.train_size, seed=c.seed)
    if c.demos.size is None or c.demos.task is not None:
        return examples
    scarce = _scarce(task, c.task.train_size, c.demos.size)
    known = {ex.question for ex in scarce}
    return scarce + [ex for ex in examples if ex.question not in known][: len(examples) - len(scarce)]


def check_prompts(config: TrainConfig, task: Task, examples: list[Example], method: Method) -> None:
    """A method that samples rollouts needs prompts with an answer to judge, which plain text rows lack."""
    if method.uses_reference and any(task.is_text(ex) for ex in examples):
        raise SasrError(
            f"method '{config.method}' samples rollouts, but task '{task.name}' holds language-modelling rows "
            "(text alone: no prompt, no answer to judge); train on them with --method sft, or as another "
            "method's demonstrations with demos.task"
        )


def demonstration_source(
    config: TrainConfig, task: Task, examples: list[Example], method: Method
) -> tuple[Task, list[Example]]:
    """The demonstrations SFT parts draw from: the RL task's examples that hold one (the first
    ``demos.size`` of them where set: ``training_examples`` put the scarce ones first), or ``demos.task``'s."""
    c = config
    if c.demos.task is not None:
        if method.pairs_demos:
            paired = ", ".join(n for n, m in METHODS.items() if m.pairs_demos)
            raise SasrError(
                f"method '{c.method}' trains each RL prompt's own demonstration, so it cannot take "
                f"demonstrations from demos.task; drop demos.task (methods that pair them: {paired})"
            )
        task = get_task(c.demos.task, **c.demos.options())
        if c.demos.size is not None:
            return task, _scarce(task, c.demos.train_size, c.demos.size)
        examples = task.examples("train", c.demos.train_size, seed=c.seed)
    if not examples:
        raise SasrError(f"demonstration task '{task.name}' produced no examples")
    have = [ex for ex in examples if task.has_demonstration(ex)][: c.demos.size]
    if method.uses_demos and not have:
        raise SasrError(
            f"method '{c.method}' trains on demonstrations, but no example of task '{task.name}' has one; "
            "name the field that holds them (task.demo_field) or give demos.task"
        )
    return task, have


class Collector:
    """Builds each step's rows. ``decoder()`` gives the model the rollout engine samples with."""

    def __init__(
        self,
        config: TrainConfig,
        task: Task,
        examples: list[Example],
        demos: tuple[Task, list[Example]],
        tokenizer,
        rewards: Rewards,
        stop_ids: list[int],
        accelerator: Accelerator,
        decoder: Callable[[], AbstractContextManager],
        cuda_graphs: bool = False,
    ) -> None:
        self.config, self.task, self.examples = config, task, examples
        self.demo_task, self.demo_examples = demos
        self.tokenizer, self.rewards, self.stop_ids = tokenizer, rewards, stop_ids
        self.accelerator, self.decoder, self.cuda_graphs = accelerator, decoder, cuda_graphs
        self.index = {id(ex): i for i, ex in enumerate(examples)}  # an RL example's index, for outcomes
        # the RL examples with a demonstration to pair (a method that pairs them has no demos.task)
        self.paired = {self.index[id(ex)] for ex in self.demo_examples if id(ex) in self.index}

    def draw(self, step: int, per_rank: int, kind: str, pool: list[Example] | None = None) -> list[Example]:
        """This rank's ``per_rank`` examples of the step, drawn for ``kind`` (a pure function of the step)."""
        acc, pool = self.accelerator, self.examples if pool is None else pool
        idx = pick(len(pool), per_rank, step, self.config.seed, kind, acc.process_index, acc.num_processes)
        return [pool[i] for i in idx]

    def demonstrations(self, examples: list[Example], task: Task, group: list[int] | None = None) -> Rows:
        """DEMO rows of ``examples``; ``group``: each row's RL prompt, if any."""
        c = self.config
        return demonstration_rows(
            self.tokenizer,
            task,
            examples,
            c.sft.max_length,
            self.accelerator.device,
            group,
            c.model.chat_template_kwargs,
        )

    def probe_rows(self, step: int) -> Rows:
        """A step's worth of demonstrations for SASR's probe: the SFT steps' batch, drawn apart from it."""
        n = self.config.sft.batch_size * self.config.gradient_accumulation_steps
        return self.demonstrations(self.draw(step, n, "probe", self.demo_examples), self.demo_task)

    def collect(self, step: int, plan: Plan) -> Collected:
        """The step's rows: demonstrations, then each RL prompt's group (rollouts, then its demonstrations
        in the group), then the RL prompts' own demonstrations."""
        pieces, stats, extra, prompts = [], {}, {}, []
        if plan.demos:
            examples = self.draw(step, plan.demos, "sft", self.demo_examples)
            pieces.append(self.demonstrations(examples, self.demo_task))
        if plan.demo_pool:
            pieces.append(
                self.demonstrations([self.examples[i] for i in self.share(plan.demo_pool)], self.task)
            )
        if plan.prompts:
            with self.decoder() as model:  # one gathering of the weights for every rollout of the step
                groups = self.groups(model, step, plan)
            pieces.append(groups.rows)
            stats, extra = groups.stats, groups.extra
            prompts = [self.index[id(ex)] for ex in groups.examples]
            if plan.hints is not None:  # UFT: the hints the groups were sampled after, drawn once more
                hints = [self.hint(step, ex, plan.hints) for ex in groups.examples]
                stats["uft_hint_share"] = self.hint_share(groups.examples, hints)
                hint_rows = self.hint_rows(groups.examples, hints) if plan.hints.train else None
                if hint_rows is not None:  # the hints' own tokens, for their NLL
                    pieces.append(hint_rows)
            if plan.prompt_demos:  # a prompt without a demonstration is an RL prompt only
                have = [g for g, i in enumerate(prompts) if i in self.paired]
                if have:
                    pieces.append(self.demonstrations([groups.examples[g] for g in have], self.task, have))
        rows = cat_rows(pieces, self.tokenizer.pad_token_id)
        stats["tokens"] = rows.completion_mask.sum().item()
        return Collected(rows, stats, extra, prompts)

    def hint(self, step: int, example: Example, hints: Hints) -> list[int]:
        """The hint of ``example`` at ``step``: the first k of ``hints.chunks`` equal parts of its demonstration's
        tokens (no EOS), k drawn from (seed, step, example) alone, so every process and a resumed run draw the
        same; none for a prompt without a demonstration."""
        index = self.index[id(example)]
        if index not in self.paired:
            return []
        ids = self.tokenizer(self.task.target(example), add_special_tokens=False)["input_ids"]
        chunks = min(hints.chunks, len(ids))
        bounds = [round(j / chunks * len(ids)) for j in range(chunks + 1)] if chunks else [0]
        rng = random.Random(f"{self.config.seed}/hint/{step}/{index}")
        k = rng.randint(0, chunks) if hints.uniform else sum(rng.random() < hints.p for _ in range(chunks))
        return ids[: bounds[k]]

    def hint_share(self, examples: list[Example], hints: list[list[int]]) -> float:
        """The mean share of their demonstration's tokens the prompts were shown (``hints``, one each)."""
        full = [
            len(self.tokenizer(self.task.target(ex), add_special_tokens=False)["input_ids"])
            for ex in examples
        ]
        return sum(len(h) / max(n, 1) for h, n in zip(hints, full)) / len(examples)

    def hint_rows(self, examples: list[Example], hints: list[list[int]]) -> Rows | None:
        """One DEMO row per hinted prompt: its prompt, then its hint's tokens as the target (no EOS); its
        ``group`` the prompt's. None when no prompt has a hint."""
        c, device = self.config, self.accelerator.device
        got = [(g, ids) for g, ids in enumerate(hints) if ids]
        if not got:
            return None
        prompts = render_prompts(
            self.tokenizer, self.task, [examples[g] for g, _ in got], c.model.chat_template_kwargs
        )
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, c.grpo.max_prompt_length, device)
        width = max(len(ids) for _, ids in got)
        ids = torch.full((len(got), width), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(got), width), dtype=torch.long, device=device)
        for i, (_, hint) in enumerate(got):
            ids[i, : len(hint)] = torch.tensor(hint, device=device)
            mask[i, : len(hint)] = 1
        texts = [self.tokenizer.decode(hint) for _, hint in got]
        return rows_of_kind(prompt_ids, prompt_mask, ids, mask, texts, DEMO, [g for g, _ in got])

    def share(self, pool: tuple[int, ...]) -> list[int]:
        """This process's share of ``pool``, every process at least one (a short pool is repeated)."""
        acc = self.accelerator
        n = max(len(pool), acc.num_processes)
        return [pool[i % len(pool)] for i in range(acc.process_index, n, acc.num_processes)]

    def groups(self, model, step: int, plan: Plan) -> Groups:
        """The step's RL prompts and their groups. With ``grpo.dynamic_sampling``, groups whose rewards are all
        equal (no advantage: nothing to learn) are dropped and further prompts sampled in their place, up to
        ``grpo.max_num_gen_batches`` batches of prompts; if those run out, equal groups fill the batch."""
        g, n = self.config.grpo, plan.prompts
        first = self.sample_groups(model, self.draw(step, n, "grpo"), plan, step)
        if not g.dynamic_sampling:
            first.stats.update(rollout_stats(first.rows, first.spread))
            return first
        batches = [first]
        while sum(int(b.spread.sum()) for b in batches) < n and len(batches) < g.max_num_gen_batches:
            more = self.draw(step, n, f"grpo-more{len(batches)}")  # new prompts, reproducibly drawn
            batches.append(self.sample_groups(model, more, plan, step))
        # the reward functions' numbers over every sampled batch; rollout time and tokens in all
        stats = {
            k: sum(b.stats[k] for b in batches) / (1 if metrics.batches_add(k) else len(batches))
            for k in first.stats
            if all(k in b.stats for b in batches)
        }
        # every group with spread, in the order sampled; then equal groups only to fill the batch
        ranked = [
            (not sp, b, i) for b, batch in enumerate(batches) for i, sp in enumerate(batch.spread.tolist())
        ]
        chosen = sorted(sorted(ranked)[:n], key=lambda x: (x[1], x[2]))
        pieces, examples, offset = [], [], 0
        for b, batch in enumerate(batches):
            keep = [i for _, bb, i in chosen if bb == b]
            if keep:
                piece = batch.rows.groups(keep)
                pieces.append(dataclasses.replace(piece, group=piece.group + offset))
                examples += [batch.examples[i] for i in keep]
                offset += len(keep)
        rows = cat_rows(pieces, self.tokenizer.pad_token_id)
        spread = torch.tensor([not z for z, _, _ in chosen])
        stats["dynamic_sampling_batches"] = len(batches)
        stats.update(rollout_stats(rows, spread))
        # the reward functions' extra columns are per sampled batch, not per chosen group: left out
        return Groups(examples, rows, spread, stats, {})

    def sample(
        self, model, prompts: list[str], groups: list[int], num: int, prefixes: list[list[int]] | None = None
    ) -> Rows:
        """``num`` completions of each prompt sampled from ``model``, in chunks of
        ``grpo.generation_batch_size`` rows; a row's ``group`` is its prompt's entry in ``groups``. With
        ``prefixes`` (token ids, one per prompt), PREFIXED rows: each completion starts with its prompt's prefix
        and goes on with what is sampled after it, the whole within ``grpo.max_completion_length``."""
        g = self.config.grpo
        per_call = len(prompts) if not g.generation_batch_size else max(1, g.generation_batch_size // num)
        stops = torch.tensor(self.stop_ids, device=self.accelerator.device)
        pieces = []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start : start + per_call]
            if prefixes is not None:
                chunk_groups = [groups[start + i] for i in range(len(chunk))]
                pieces.append(
                    self.sample_after(model, chunk, prefixes[start : start + per_call], chunk_groups, num)
                )
                continue
            roll = generate(
                model,
                self.tokenizer,
                chunk,
                num_generations=num,
                max_new_tokens=g.max_completion_length,
                max_prompt_length=g.max_prompt_length,
                temperature=g.temperature,
                top_p=g.top_p,
                backend=g.generation_backend,
                cuda_graphs=self.cuda_graphs,
                compile=g.torch_compile,
                **g.generation_kwargs,
            )  # [chunk x num] rows
            ended = (torch.isin(roll.completion_ids, stops) & roll.completion_mask.bool()).any(1)
            cut = ~ended & (roll.completion_mask.sum(1) >= g.max_completion_length)  # [chunk x num]
            pieces.append(
                rows_of_kind(
                    roll.prompt_ids,
                    roll.prompt_mask,
                    roll.completion_ids,
                    roll.completion_mask,
                    roll.texts,
                    ROLLOUT,
                    [groups[start + i] for i in range(len(chunk)) for _ in range(num)],
                    sampler_logprobs=roll.logprobs,
                    truncated=cut,
                )
            )
        return cat_rows(pieces, self.tokenizer.pad_token_id)

    def prefix_ids(self, example: Example, fraction: float) -> list[int]:
        """The first int(fraction x L) of the L tokens of ``example``'s demonstration, at least 1 and at most
        L - 1 (something is left to sample); none for a demonstration shorter than 2 tokens."""
        ids = self.tokenizer(self.task.target(example), add_special_tokens=False)["input_ids"]
        m = min(max(int(fraction * len(ids)), 1), len(ids) - 1)
        return ids[:m] if m >= 1 else []

    def sample_after(
        self, model, prompts: list[str], prefixes: list[list[int]], groups: list[int], num: int
    ) -> Rows:
        """PREFIXED rows: ``num`` continuations of each prompt followed by its prefix's tokens (as tokens, so
        the row holds exactly the prefix); each continuation up to max_completion_length, as a rollout (the
        prefix is the prompt's, as in their code). The prefix tokens have no sampler log-prob (0, outside
        ``Rows.sampled``)."""
        g, device, pad = self.config.grpo, self.accelerator.device, self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, g.max_prompt_length, device)
        inputs = [ids[m.bool()].tolist() + pre for ids, m, pre in zip(prompt_ids, prompt_mask, prefixes)]
        width = max(len(x) for x in inputs)
        gen_ids = torch.tensor([[pad] * (width - len(x)) + x for x in inputs], device=device)
        gen_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in inputs], device=device)
        roll = generate_ids(
            model,
            self.tokenizer,
            gen_ids,
            gen_mask,
            num_generations=num,
            max_new_tokens=g.max_completion_length,
            temperature=g.temperature,
            top_p=g.top_p,
            backend=g.generation_backend,
            cuda_graphs=self.cuda_graphs,
            compile=g.torch_compile,
            **g.generation_kwargs,
        )  # [n x num] continuations
        stops = set(self.stop_ids)
        rows, logps, cut = [], [], []
        for j in range(roll.completion_ids.size(0)):
            pre = prefixes[j // num]
            cont = roll.completion_ids[j][roll.completion_mask[j].bool()].tolist()
            rows.append(pre + cont)
            cut.append(len(cont) >= g.max_completion_length and not (cont and cont[-1] in stops))
            lp = roll.logprobs[j, : len(cont)].tolist() if roll.logprobs is not None else [0.0] * len(cont)
            logps.append([0.0] * len(pre) + lp)
        T = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows], device=device)  # [n x num, T]
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], device=device)
        lengths = [len(prefixes[j // num]) for j in range(len(rows))]
        prefix_mask = torch.arange(T, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        sampler = torch.tensor([lp + [0.0] * (T - len(lp)) for lp in logps], device=device)
        texts = self.tokenizer.batch_decode(ids * mask + pad * (1 - mask), skip_special_tokens=True)
        out = rows_of_kind(
            prompt_ids.repeat_interleave(num, 0),
            prompt_mask.repeat_interleave(num, 0),
            ids,
            mask,
            texts,
            PREFIXED,
            [gr for gr in groups for _ in range(num)],
            sampler_logprobs=sampler if roll.logprobs is not None else None,
            truncated=torch.tensor(cut, device=device),
        )
        return dataclasses.replace(
            out, prefix_mask=prefix_mask, prefix_advantages=torch.zeros_like(out.rewards)
        )

    def sample_groups(self, model, examples: list[Example], plan: Plan, step: int) -> Groups:
        """Each prompt's group: ``plan.rollouts`` completions sampled from ``model`` (``decoder()``'s), then
        ``plan.offpolicy`` copies of its demonstration (a prompt without one gets as many more rollouts
        instead); all scored, advantages computed over the whole group."""
        c, g = self.config, self.config.grpo
        device = self.accelerator.device
        prompts = render_prompts(self.tokenizer, self.task, examples, c.model.chat_template_kwargs)
        if plan.hints is not None:  # UFT: each prompt goes on with its hint; what is sampled follows it
            prompts = [
                p + self.tokenizer.decode(self.hint(step, ex, plan.hints)) for p, ex in zip(prompts, examples)
            ]
        n, r, k = len(examples), plan.rollouts, plan.offpolicy + plan.prefixed
        stats: dict[str, float] = {}
        with metrics.timer(stats, "rollout_seconds", device):
            rows = self.sample(model, prompts, list(range(n)), r)  # [n x r]
            paired = [i for i, ex in enumerate(examples) if self.index[id(ex)] in self.paired]
            prefixes = {}
            if plan.prefixed:  # Prefix-RFT: the paired prompts' prefixes (a demonstration too short: none)
                prefixes = {i: p for i in paired if (p := self.prefix_ids(examples[i], plan.prefix_fraction))}
                paired = list(prefixes)
                if paired:
                    more = self.sample(
                        model,
                        [prompts[i] for i in paired],
                        paired,
                        plan.prefixed,
                        [prefixes[i] for i in paired],
                    )
                    rows = cat_rows([rows, more], self.tokenizer.pad_token_id)
            alone = [i for i in range(n) if i not in paired] if k else []
            if alone:  # the demonstrations' places in their groups, sampled
                more = self.sample(model, [prompts[i] for i in alone], alone, k)
                rows = cat_rows([rows, more], self.tokenizer.pad_token_id)
        stats["generated_tokens"] = rows.sampled().sum().item()
        # each paired prompt's demonstration k times after its rollouts, with the same prompt tokens: one group
        if plan.offpolicy and paired:
            targets = [self.task.target(examples[i]) for i in paired]
            ids, mask = encode_targets(self.tokenizer, targets, g.max_completion_length, device)  # [p, t]
            texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)  # judged as trained: maybe cut
            first = torch.tensor(paired, device=device) * r  # each paired prompt's first rollout row
            demos = rows_of_kind(
                *(
                    x.repeat_interleave(k, 0)
                    for x in (rows.prompt_ids[first], rows.prompt_mask[first], ids, mask)
                ),
                [t for t in texts for _ in range(k)],
                OFFPOLICY,
                [i for i in paired for _ in range(k)],
            )
            rows = cat_rows([rows, demos], self.tokenizer.pad_token_id)
        if alone or (k and paired):  # each group's rows together: its rollouts, then the others
            rows = rows.select(torch.argsort(rows.group * 2 + (rows.kind != ROLLOUT), stable=True))
        grouped = [ex for ex in examples for _ in range(r + k)]
        scores = score_all(self.task, rows.texts, grouped)
        lengths = rows.completion_mask.sum(1)  # [B]
        sampled = rows.sampled().sum(1)  # [B]: what the policy sampled (a prefixed row's after its prefix)
        call = RewardCall(
            prompts=[self.task.messages(ex) for ex in grouped],
            texts=rows.texts,
            completion_ids=[
                ids[:length].tolist() for ids, length in zip(rows.completion_ids, lengths.tolist())
            ],
            trainer_state=TrainerState(global_step=step - 1, max_steps=c.steps),
        )
        values, reward_stats = self.rewards.score(scores, call, grouped)
        rewards = torch.tensor(values, dtype=torch.float32, device=device)  # [B]; NaN: no function scored it
        if g.overlong_buffer_len:  # DAPO's soft overlong penalty on the sampled rows
            expected = g.max_completion_length - g.overlong_buffer_len
            excess = (sampled.float() - expected).clamp(min=0) / g.overlong_buffer_len
            penalty = -g.overlong_penalty_factor * excess * rows.of_kind(ROLLOUT, PREFIXED)
            rewards = rewards + penalty
            reward_stats["overlong_penalty"] = penalty[rows.kind == ROLLOUT].mean().item()
        scale = plan.scale_rewards or g.scale_rewards
        prefix_adv = None
        if plan.prefixed:  # centred within each (prompt, prefix) subgroup; the prefix tokens' own advantage
            subgroup = (rows.kind == PREFIXED).long()
            advantages, prefix_adv, zero_spread = prefix_group_advantages(
                rewards, subgroup, r + k, plan.prefixed, scale
            )
        else:
            advantages, zero_spread = group_advantages(rewards, r + k, g.advantage, scale)
        rows = dataclasses.replace(
            rows,
            rewards=rewards,
            advantages=advantages,
            prefix_advantages=prefix_adv if prefix_adv is not None else rows.prefix_advantages,
            correct=torch.tensor([s.correct for s in scores], dtype=torch.bool, device=device),
            formatted=torch.tensor([s.formatted for s in scores], dtype=torch.bool, device=device),
        )
        return Groups(examples, rows, ~zero_spread, {**stats, **reward_stats}, call.extra)


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
