"""UFT and R3 (arXiv 2505.16984): GRPO on prompts that go on with the start of their own demonstration (a hint
whose length shrinks on a schedule to none), plus a small NLL on the hint's tokens; evaluation never shows a
hint (docs/methods.md)."""

from __future__ import annotations

import math
import random
from typing import Literal

import torch
from pydantic import Field

from sasr import batch, metrics
from sasr.batch import DEMO, ROLLOUT, Ask, Gather, Part, Plan, Rows
from sasr.data import encode_prompts, render_prompts, rows_of_kind
from sasr.losses import LOSS_AGGREGATIONS, names
from sasr.methods.base import Method, Options, register_method

metrics.register("uft_hint_p", "UFT: the chance of each hint chunk at this step (a cosine to p_end, then 0)")
metrics.register(
    "uft_hint_share",
    "UFT / R3: the mean share of its demonstration's tokens a prompt was shown",
    metrics.ROLLOUTS,
)


def hint_p(step: int, start: float, end: float, steps: int) -> float:
    """p(t) = end + (start - end) (1 + cos(pi t / steps)) / 2 for t = 1 .. steps, then 0 (their schedule)."""
    return 0.0 if step > steps else end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / steps))


def hint_bounds(units: int, chunks: int) -> list[int]:
    """Where the hint may end, in units (solution steps or tokens): min(chunks, units) chunks of them."""
    num = min(chunks, units)
    if not num:
        return [0]
    bounds = [round(j / num * units) for j in range(num + 1)]
    bounds[-1] = units
    return bounds


def _units(c, example, unit: str) -> list[str] | list[int]:
    """The demonstration as solution steps (its lines, each with its newline) or as tokens."""
    target = c.task.target(example)
    if unit == "step":
        return target.splitlines(keepends=True)
    return c.tokenizer(target, add_special_tokens=False)["input_ids"]


def hint(c, step: int, example, p: float, chunks: int, uniform: bool, train: bool, unit: str) -> list[int]:
    """The hint of ``example`` at ``step``, as tokens: the first k of its demonstration's chunks (no EOS), k ~
    Binomial(chunks, p) (``uniform``: k's end uniform over the chunk ends, R3's), drawn from (seed, step,
    example) alone, so every process and a resumed run draw the same; none for a prompt without one."""
    index = c.index_of(example)
    if not c.has_demonstration(index):
        return []
    units = _units(c, example, unit)
    bounds = hint_bounds(len(units), chunks)
    rng = random.Random(f"{c.config.seed}/hint/{step}/{index}")
    end = rng.choice(bounds) if uniform else bounds[sum(rng.random() < p for _ in range(len(bounds) - 1))]
    if unit == "step":
        return c.tokenizer("".join(units[:end]), add_special_tokens=False)["input_ids"] if end else []
    return units[:end]


# the hint counts as the answer's start: the judge reads it with the completion, as their reward does
batch.PROMPT_EXTENSIONS.add("uft_hint", batch.PromptExtension(hint, judged=True))


def hint_rows(c, step: int, examples: list, **hints) -> tuple[Rows | None, dict[str, float]]:
    """The hints the groups were sampled after, drawn once more: their mean share of each demonstration's
    tokens, and with ``train`` one DEMO row per hinted prompt (its prompt, then its hint's tokens as the
    target, no EOS; its ``group`` the prompt's), for their NLL."""
    shown = [hint(c, step, ex, **hints) for ex in examples]
    full = [len(_units(c, ex, "token")) for ex in examples]
    stats = {"uft_hint_share": sum(min(len(h) / max(n, 1), 1.0) for h, n in zip(shown, full)) / len(examples)}
    got = [(g, ids) for g, ids in enumerate(shown) if ids]
    if not hints["train"] or not got:
        return None, stats
    cfg, device = c.config, c.accelerator.device
    prompts = render_prompts(
        c.tokenizer, c.task, [examples[g] for g, _ in got], cfg.model.chat_template_kwargs
    )
    prompt_ids, prompt_mask = encode_prompts(c.tokenizer, prompts, cfg.grpo.max_prompt_length, device)
    width = max(len(ids) for _, ids in got)
    ids = torch.full((len(got), width), c.tokenizer.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(got), width), dtype=torch.long, device=device)
    for i, (_, h) in enumerate(got):
        ids[i, : len(h)] = torch.tensor(h, device=device)
        mask[i, : len(h)] = 1
    texts = [c.tokenizer.decode(h) for _, h in got]
    return rows_of_kind(prompt_ids, prompt_mask, ids, mask, texts, DEMO, [g for g, _ in got]), stats


batch.ROW_SOURCES.add("uft_hint_rows", batch.RowSource("after", hint_rows))


class UFTOptions(Options):
    variant: Literal["uft", "r3"] = Field(
        "uft", description="uft: hint lengths on a schedule and the hint's NLL; r3: uniform lengths, no NLL"
    )
    hint_steps: int | None = Field(
        None, ge=1, description="steps with hints (their 300 of 500); null: 60% of the run's steps"
    )
    p_start: float = Field(0.95, ge=0, le=1, description="p(t) starts near this (their upper_prob)")
    p_end: float = Field(0.05, ge=0, le=1, description="... and falls on a cosine to this at hint_steps")
    hint_chunks: int = Field(5, ge=1, description="the demonstration is shown in up to this many chunks")
    hint_unit: Literal["step", "token"] = Field(
        "step",
        description="chunks of the demonstration's solution steps (its lines, theirs) or of its tokens",
    )
    sft_coef: float = Field(0.001, ge=0, description="weight of the hint tokens' NLL (uft)")
    beta: float = Field(0.001, ge=0, description="KL weight of the RL part (their 0.001)")
    loss_type: names(LOSS_AGGREGATIONS) = Field(
        "bnpo", description="the RL part's aggregation (theirs: bnpo)"
    )


@register_method
class UFT(Method):
    """UFT (and R3): GRPO on prompts extended with the start of their own demonstration (a hint whose length
    shrinks on a schedule to none), plus a small NLL on the hint's tokens; evaluation never shows a hint."""

    name = "uft"
    paper = "arXiv 2505.16984"
    summary = (
        "GRPO on prompts with the start of their demonstration as a hint (shrinking to none) + its NLL; R3"
    )
    Options = UFTOptions
    pairs_demos = True
    repeatable_updates = False
    dynamics = ("uft_hint_p", "uft_hint_share")

    @property
    def hint_steps(self) -> int:
        return self.opts.hint_steps or max(1, round(0.6 * self.steps))

    def plan(self, step: int) -> Plan:
        o, r3 = self.opts, self.opts.variant == "r3"
        p = hint_p(step, o.p_start, o.p_end, self.hint_steps)
        info = {} if r3 else {"uft_hint_p": p}
        if step > self.hint_steps and not r3:  # their R3 shows hints at every step
            return self.grpo_plan(step, **info)
        hints = {"p": p, "chunks": o.hint_chunks, "uniform": r3, "train": not r3, "unit": o.hint_unit}
        gather = Gather(
            prompts=self.prompts_per_step,
            rollouts=self.group_size,
            extend_prompts=Ask("uft_hint", hints),
            sources=(Ask("uft_hint_rows", hints),),
        )
        return Plan(step, "grpo" if r3 else "mixed", gather, info=info)  # the hint's NLL: SFT

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        o = self.opts
        parts = [Part("rl", "pg", rows.kind == ROLLOUT, 1.0, {"beta": o.beta, "loss_type": o.loss_type})]
        if plan.gather.sources and plan.gather.sources[0].args["train"]:
            parts.append(Part("hint", "nll", rows.kind == DEMO, o.sft_coef))
        return parts, {}
