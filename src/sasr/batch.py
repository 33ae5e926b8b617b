"""The rows a step trains on, and the weighted parts a method makes of them.

Every step is one batch of rows laid out alike: a left-padded prompt and a right-padded completion. A row is
of one kind:

- ``DEMO``: a demonstration (the task's chain of thought and answer) trained on by itself, as in SFT;
- ``ROLLOUT``: a completion the policy sampled for a prompt (on-policy), one of its prompt's group;
- ``OFFPOLICY``: a demonstration placed inside a prompt's group beside its rollouts (LUFFY, SRFT); it is
  scored and gets an advantage like the rollouts, but the policy did not sample it;
- ``PREFIXED``: a row of a prompt's group whose completion starts with a prefix of the prompt's
  demonstration (``prefix_mask``) and goes on with what the policy sampled after it (Prefix-RFT).

A method turns the rows of a step into ``Part`` s: a loss from the registry in ``sasr.losses`` over a subset
of the rows, with a weight. The loop sums the weighted part losses of one policy pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

DEMO, ROLLOUT, OFFPOLICY, PREFIXED = 0, 1, 2, 3
KIND_NAMES = {DEMO: "demonstration", ROLLOUT: "rollout", OFFPOLICY: "offpolicy", PREFIXED: "prefixed"}
GROUP_KINDS = (ROLLOUT, OFFPOLICY, PREFIXED)  # the rows of a prompt's group


@dataclass
class Sequences:
    """B prompts with a completion each, laid out so that every completion starts at the same column."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, T] right-padded
    completion_mask: torch.Tensor  # [B, T] 1 on the completion's tokens (up to and including EOS)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # [B, P + T]

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


@dataclass
class Rows(Sequences):
    """B rows of one step. Rows of a prompt's group are consecutive (rollouts first, then its other rows)."""

    kind: torch.Tensor  # [B] long: DEMO, ROLLOUT, OFFPOLICY or PREFIXED
    group: (
        torch.Tensor
    )  # [B] long: index of the row's RL prompt in the step; -1 for demonstrations of no prompt
    rewards: torch.Tensor  # [B] float32, 0 for DEMO rows
    advantages: torch.Tensor  # [B] float32, 0 for DEMO rows
    correct: torch.Tensor  # [B] bool
    formatted: torch.Tensor  # [B] bool
    sampler_logprobs: torch.Tensor | None = (
        None  # [B, T] the sampler's log-probs (sampled tokens; 0 elsewhere)
    )
    truncated: torch.Tensor | None = None  # [B] bool: a rollout cut at max_completion_length (None: none)
    prefix_mask: torch.Tensor | None = None  # [B, T] bool: a PREFIXED row's demonstration tokens (None: none)
    prefix_advantages: torch.Tensor | None = None  # [B] float32: the advantage of those tokens (0 elsewhere)
    texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.kind.numel()

    def of_kind(self, *kinds: int) -> torch.Tensor:
        """[B] bool: the rows of these kinds."""
        return torch.isin(self.kind, torch.tensor(kinds, device=self.kind.device))

    def prefix(self) -> torch.Tensor:
        """[B, T] bool: the demonstration-prefix tokens of PREFIXED rows (all False without any)."""
        if self.prefix_mask is not None:
            return self.prefix_mask
        return torch.zeros_like(self.completion_mask, dtype=torch.bool)

    def sampled(self) -> torch.Tensor:
        """[B, T]: the completion tokens the policy sampled (a rollout's, a prefixed row's after its prefix)."""
        on = self.of_kind(ROLLOUT, PREFIXED)[:, None].to(self.completion_mask.dtype)
        return self.completion_mask * on * (~self.prefix()).to(self.completion_mask.dtype)

    def cut(self) -> torch.Tensor:
        """[B] bool: the rows cut at the length limit."""
        return self.truncated if self.truncated is not None else torch.zeros_like(self.correct)

    def groups(self, order: list[int]) -> Rows:
        """The rows of the groups ``order`` (RL prompt indices), renumbered 0, 1, ... in that order."""
        picked = [(self.group == g).nonzero().squeeze(1) for g in order]
        out = self.select(torch.cat(picked))
        out.group = torch.cat([torch.full_like(ix, i) for i, ix in enumerate(picked)])
        return out

    def select(self, rows: torch.Tensor) -> Rows:
        """The rows at indices ``rows`` [b] (long), in that order."""
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                picked[f.name] = value[rows]
            elif f.name == "texts":
                picked[f.name] = [value[i] for i in rows.tolist()] if value else []
            else:
                picked[f.name] = value
        return Rows(**picked)


def _pad_to(x: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
    extra = width - x.size(1)
    return F.pad(x, (extra, 0) if left else (0, extra), value=value) if extra else x


def cat_rows(pieces: list[Rows], pad_token_id: int) -> Rows:
    """One batch of several pieces: prompts padded on the left and completions on the right to the widest."""
    if len(pieces) == 1:
        return pieces[0]
    P = max(p.prompt_ids.size(1) for p in pieces)
    T = max(p.completion_ids.size(1) for p in pieces)
    sampler, prefix, prefix_adv = None, None, None
    if any(p.prefix_mask is not None for p in pieces):
        prefix = torch.cat([_pad_to(p.prefix().long(), T, 0, left=False) for p in pieces]).bool()
        prefix_adv = torch.cat(
            [
                p.prefix_advantages if p.prefix_advantages is not None else torch.zeros_like(p.rewards)
                for p in pieces
            ]
        )
    if any(p.sampler_logprobs is not None for p in pieces):
        sampler = torch.cat(
            [
                _pad_to(
                    p.sampler_logprobs
                    if p.sampler_logprobs is not None
                    else torch.zeros_like(p.completion_mask),
                    T,
                    0,
                    left=False,
                ).float()
                for p in pieces
            ]
        )
    return Rows(
        prompt_ids=torch.cat([_pad_to(p.prompt_ids, P, pad_token_id, left=True) for p in pieces]),
        prompt_mask=torch.cat([_pad_to(p.prompt_mask, P, 0, left=True) for p in pieces]),
        completion_ids=torch.cat([_pad_to(p.completion_ids, T, pad_token_id, left=False) for p in pieces]),
        completion_mask=torch.cat([_pad_to(p.completion_mask, T, 0, left=False) for p in pieces]),
        kind=torch.cat([p.kind for p in pieces]),
        group=torch.cat([p.group for p in pieces]),
        rewards=torch.cat([p.rewards for p in pieces]),
        advantages=torch.cat([p.advantages for p in pieces]),
        correct=torch.cat([p.correct for p in pieces]),
        formatted=torch.cat([p.formatted for p in pieces]),
        sampler_logprobs=sampler,
        truncated=torch.cat([p.cut() for p in pieces])
        if any(p.truncated is not None for p in pieces)
        else None,
        texts=[t for p in pieces for t in p.texts],
        prefix_mask=prefix,
        prefix_advantages=prefix_adv,
    )


@dataclass
class Part:
    """One term of a step's loss: ``weight`` x the registered loss ``loss`` over the rows in ``rows``.

    ``options`` are the loss function's own keyword arguments (e.g. ``phi=True``, ``shaping_gamma=0.1``); for
    the policy-gradient loss they override the run's ``grpo`` settings (e.g. ``beta=0``).
    """

    name: str  # how metrics name it: loss/<name>, weight/<name>
    loss: str  # a key of sasr.losses.PART_LOSSES
    rows: torch.Tensor  # [B] bool
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hints:
    """UFT's hints: each RL prompt is extended with the first k of ``chunks`` equal parts of its demonstration's
    tokens, k ~ Binomial(chunks, p) (``uniform``: k uniform on 0..chunks, R3's); ``train``: one DEMO row per
    hinted prompt carries the hint's tokens, for their NLL."""

    p: float
    chunks: int = 5
    uniform: bool = False
    train: bool = True


@dataclass
class Plan:
    """What a step needs, decided before anything is sampled; the same on every rank.

    ``phase`` labels the step in the logs and plots: 'sft' (demonstrations only), 'grpo' (rollouts only) or
    'mixed' (both in one step).
    """

    step: int  # 1-based optimizer step
    phase: str
    demos: int = 0  # DEMO rows per process, from the demonstration source
    prompts: int = 0  # RL prompts per process
    rollouts: int = 0  # ROLLOUT rows per prompt (sampled)
    offpolicy: int = 0  # OFFPOLICY rows per prompt: its demonstration, inside its group
    prefixed: int = 0  # PREFIXED rows per prompt: the start of its demonstration, continued by the policy
    prefix_fraction: float = 0.0  # the share of its demonstration's tokens that start is
    prompt_demos: bool = False  # also one DEMO row per RL prompt: its own demonstration (HPT)
    scale_rewards: str | None = None  # overrides grpo.scale_rewards for this step's advantages
    probe: bool = False  # after the update, measure the SFT gradient norm on demonstrations (no update)
    # DEMO rows of these RL examples (indices into the task's training examples), shared out over the
    # processes, in place of ``demos`` drawn from the demonstration source (ReLIFT's buffer)
    demo_pool: tuple[int, ...] = ()
    lr: float | None = None  # this step's learning rate, in place of the schedule's
    max_grad_norm: float | None = None  # this step's gradient clip, in place of optim.max_grad_norm
    weight_decay: float | None = None  # this step's weight decay, in place of optim.weight_decay
    fresh_optimizer: bool = False  # the optimizer's state (AdamW's moments and step count) is cleared first
    hints: Hints | None = None  # UFT: the RL prompts carry a piece of their demonstration
    info: dict[str, float] = field(default_factory=dict)  # what the plan was computed from (p_t, mu, ...)
