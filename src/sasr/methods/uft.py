"""UFT and R3 (arXiv 2505.16984): GRPO on prompts that go on with the start of their own demonstration (a hint
whose length shrinks on a schedule to none), plus a small NLL on the hint's tokens; evaluation never shows a
hint."""

from __future__ import annotations

import random
from typing import Literal

import torch
from pydantic import Field

from sasr import metrics
from sasr.batch import DEMO, PROMPT_EXTENSIONS, ROLLOUT, ROW_SOURCES, Ask, Gather, Part, Plan, Rows, RowSource
from sasr.data import encode_prompts, render_prompts, rows_of_kind
from sasr.methods.base import Method, Options, cosine, register_method

metrics.register("uft_hint_p", "UFT: the chance of each hint part at this step (a cosine to p_end, then 0)")
metrics.register(
    "uft_hint_share", "UFT / R3: the mean share of its demonstration a prompt was shown", metrics.ROLLOUTS
)


def _target_ids(c, example) -> list[int]:
    return c.tokenizer(c.task.target(example), add_special_tokens=False)["input_ids"]


@PROMPT_EXTENSIONS.register("uft_hint")
def hint(c, step: int, example, p: float, chunks: int, uniform: bool, train: bool) -> list[int]:
    """The hint of ``example`` at ``step``: the first k of ``chunks`` equal parts of its demonstration's tokens
    (no EOS), k ~ Binomial(chunks, p) (``uniform``: k uniform on 0..chunks, R3's), drawn from (seed, step,
    example) alone, so every process and a resumed run draw the same; none for a prompt without one."""
    index = c.index_of(example)
    if not c.has_demonstration(index):
        return []
    ids = _target_ids(c, example)
    chunks = min(chunks, len(ids))
    bounds = [round(j / chunks * len(ids)) for j in range(chunks + 1)] if chunks else [0]
    rng = random.Random(f"{c.config.seed}/hint/{step}/{index}")
    k = rng.randint(0, chunks) if uniform else sum(rng.random() < p for _ in range(chunks))
    return ids[: bounds[k]]


def hint_rows(c, step: int, examples: list, **hints) -> tuple[Rows | None, dict[str, float]]:
    """The hints the groups were sampled after, drawn once more: their mean share of each demonstration, and
    with ``train`` one DEMO row per hinted prompt (its prompt, then its hint's tokens as the target, no EOS;
    its ``group`` the prompt's), for their NLL."""
    hints_ = [hint(c, step, ex, **hints) for ex in examples]
    full = [len(_target_ids(c, ex)) for ex in examples]
    stats = {"uft_hint_share": sum(len(h) / max(n, 1) for h, n in zip(hints_, full)) / len(examples)}
    got = [(g, ids) for g, ids in enumerate(hints_) if ids]
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


ROW_SOURCES.add("uft_hint_rows", RowSource("after", hint_rows))


class UFTOptions(Options):
    variant: Literal["uft", "r3"] = Field(
        "uft", description="uft: hint lengths on a schedule and the hint's NLL; r3: uniform lengths, no NLL"
    )
    hint_steps: int | None = Field(
        None, ge=1, description="steps with hints (their 300 of 500); null: 60% of the run's steps"
    )
    p_start: float = Field(0.95, ge=0, le=1, description="the chance of each hint part at step 1")
    p_end: float = Field(0.05, ge=0, le=1, description="... at the last hinted step (a cosine between)")
    hint_chunks: int = Field(5, ge=1, description="the demonstration is shown in up to this many equal parts")
    sft_coef: float = Field(0.001, ge=0, description="weight of the hint tokens' NLL (uft)")
    beta: float = Field(0.001, ge=0, description="KL weight of the RL part (their 0.001)")


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

    def hint_p(self, step: int) -> float:
        """p(t): a cosine from p_start at step 1 to p_end at hint_steps, then 0."""
        o, n = self.opts, self.hint_steps
        return 0.0 if step > n else cosine(step, o.p_start, o.p_end, n)

    def plan(self, step: int) -> Plan:
        o, p = self.opts, self.hint_p(step)
        info = {"uft_hint_p": p} if o.variant == "uft" else {}
        if step > self.hint_steps:
            return self.grpo_plan(step, **info)
        hints = {"p": p, "chunks": o.hint_chunks, "uniform": o.variant == "r3", "train": o.variant == "uft"}
        gather = Gather(
            prompts=self.prompts_per_step,
            rollouts=self.group_size,
            extend_prompts=Ask("uft_hint", hints),
            sources=(Ask("uft_hint_rows", hints),),
        )
        return Plan(step, "mixed" if hints["train"] else "grpo", gather, info=info)  # the hint's NLL: SFT

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        parts = [Part("rl", "pg", rows.kind == ROLLOUT, 1.0, {"beta": self.opts.beta})]
        if plan.gather.sources and plan.gather.sources[0].args["train"]:
            parts.append(Part("hint", "nll", rows.kind == DEMO, self.opts.sft_coef))
        return parts, {}
