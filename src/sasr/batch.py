"""The typed hand-offs of a step: the plan a method makes (what the collector gathers, what the learner
applies, what the record shows), the rows the collector builds, and the weighted parts a method makes of them;
with the registries of row kinds and of the row makers a method may ask the collector for.

Every step is one batch of rows laid out alike: a left-padded prompt and a right-padded completion. A row is
of one registered kind (``ROW_KINDS``): here ``DEMO``, a demonstration trained on by itself as in SFT, and
``ROLLOUT``, a completion the policy sampled for a prompt, one of its prompt's group; a method module may
register more (a demonstration placed inside a group; a row that continues given tokens).

A method turns the rows of a step into ``Part`` s: a registered loss (``sasr.losses.PART_LOSSES``) over a
subset of the rows, with a weight. The learner sums the weighted part losses of one policy pass per update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F

from sasr.registry import Registry

# --- row kinds ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowKind:
    """A kind of row: its code in ``Rows.kind``, whether it belongs to a prompt's group (scored, with an
    advantage) and whether the policy sampled (some of) its completion."""

    name: str
    code: int
    grouped: bool
    sampled: bool


ROW_KINDS: Registry[RowKind] = Registry(
    "row kind", "sasr.batch.ROW_KINDS", "a kind of row: in a group or not, sampled or not (`register_kind`)"
)


def register_kind(name: str, grouped: bool, sampled: bool) -> int:
    """Register a row kind (once per name) and return its code."""
    held = ROW_KINDS.get(name)
    if held is not None:
        return held.code
    return ROW_KINDS.add(name, RowKind(name, len(ROW_KINDS), grouped, sampled)).code


def kind_name(code: int) -> str:
    return next(k.name for k in ROW_KINDS.values() if k.code == code)


def kinds(grouped: bool | None = None, sampled: bool | None = None) -> tuple[int, ...]:
    """The codes of the kinds that are grouped / sampled as asked (None: either)."""
    return tuple(
        k.code
        for k in ROW_KINDS.values()
        if (grouped is None or k.grouped == grouped) and (sampled is None or k.sampled == sampled)
    )


DEMO = register_kind("demonstration", grouped=False, sampled=False)
ROLLOUT = register_kind("rollout", grouped=True, sampled=True)

# --- rows ---------------------------------------------------------------------------------------------------


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

    kind: torch.Tensor  # [B] long: a ROW_KINDS code
    group: torch.Tensor  # [B] long: index of the row's RL prompt in the step; -1 for rows of no prompt
    rewards: torch.Tensor  # [B] float32, 0 for rows outside the groups
    advantages: torch.Tensor  # [B] float32, 0 for rows outside the groups
    correct: torch.Tensor  # [B] bool
    formatted: torch.Tensor  # [B] bool
    sampler_logprobs: torch.Tensor | None = (
        None  # [B, T] the sampler's log-probs (sampled tokens; 0 elsewhere)
    )
    truncated: torch.Tensor | None = None  # [B] bool: a rollout cut at max_completion_length (None: none)
    given: torch.Tensor | None = None  # [B, T] bool: tokens of a sampled row it was given, not sampled
    # per-row numbers a method adds ([B] or [B, T]; 0 where a row has none), by name
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    # other prompts of the same completions, by name: left-padded ids and mask [B, P'] (a row without one of
    # its own holds its prompt), for a pass that reads the completion under another context
    contexts: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.kind.numel()

    def of_kind(self, *codes: int) -> torch.Tensor:
        """[B] bool: the rows of these kinds."""
        return torch.isin(self.kind, torch.tensor(codes, device=self.kind.device))

    def sampled_rows(self) -> torch.Tensor:
        """[B] bool: the rows whose completion the policy sampled, all or part of."""
        return self.of_kind(*kinds(sampled=True))

    def grouped(self) -> torch.Tensor:
        """[B] bool: the rows of the prompts' groups."""
        return self.of_kind(*kinds(grouped=True))

    def given_tokens(self) -> torch.Tensor:
        """[B, T] bool: the tokens of sampled rows that were given, not sampled (all False without any)."""
        if self.given is not None:
            return self.given
        return torch.zeros_like(self.completion_mask, dtype=torch.bool)

    def sampled(self) -> torch.Tensor:
        """[B, T]: the completion tokens the policy sampled."""
        on = self.sampled_rows()[:, None].to(self.completion_mask.dtype)
        return self.completion_mask * on * (~self.given_tokens()).to(self.completion_mask.dtype)

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
            elif f.name == "extras":
                picked[f.name] = {k: v[rows] for k, v in value.items()}
            elif f.name == "texts":
                picked[f.name] = [value[i] for i in rows.tolist()] if value else []
            elif f.name == "contexts":
                picked[f.name] = {k: (ids[rows], mask[rows]) for k, (ids, mask) in value.items()}
            else:
                picked[f.name] = value
        return Rows(**picked)


def _pad_to(x: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
    extra = width - x.size(1)
    return F.pad(x, (extra, 0) if left else (0, extra), value=value) if extra else x


def _cat_extra(pieces: list[Rows], name: str, T: int) -> torch.Tensor:
    """One method's per-row numbers over the pieces: 0 where a piece has none; [B, T] ones padded on the
    right to T."""
    token_level = next(p.extras[name] for p in pieces if name in p.extras).dim() == 2
    out = []
    for p in pieces:
        if name in p.extras:
            x = p.extras[name]
        else:
            x = (
                torch.zeros_like(p.completion_mask, dtype=torch.float32)
                if token_level
                else torch.zeros_like(p.rewards)
            )
        out.append(_pad_to(x, T, 0, left=False) if token_level else x)
    return torch.cat(out)


def cat_rows(pieces: list[Rows], pad_token_id: int) -> Rows:
    """One batch of several pieces: prompts padded on the left and completions on the right to the widest."""
    if len(pieces) == 1:
        return pieces[0]
    P = max(p.prompt_ids.size(1) for p in pieces)
    T = max(p.completion_ids.size(1) for p in pieces)
    given = None
    if any(p.given is not None for p in pieces):
        given = torch.cat([_pad_to(p.given_tokens().long(), T, 0, left=False) for p in pieces]).bool()
    sampler = None
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
    extras = {
        name: _cat_extra(pieces, name, T) for name in dict.fromkeys(k for p in pieces for k in p.extras)
    }
    contexts = {
        name: _cat_context(pieces, name, pad_token_id)
        for name in dict.fromkeys(k for p in pieces for k in p.contexts)
    }
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
        given=given,
        extras=extras,
        texts=[t for p in pieces for t in p.texts],
        contexts=contexts,
    )


def _cat_context(pieces: list[Rows], name: str, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One other-prompt over the pieces, left-padded to the widest; a piece without it gives its own prompt."""
    held = [p.contexts.get(name, (p.prompt_ids, p.prompt_mask)) for p in pieces]
    width = max(ids.size(1) for ids, _ in held)
    ids = torch.cat([_pad_to(i, width, pad_token_id, left=True) for i, _ in held])
    return ids, torch.cat([_pad_to(m, width, 0, left=True) for _, m in held])


# --- what a method makes of a step's rows -----------------------------------------------------------------


@dataclass
class Part:
    """One term of a step's loss: ``weight`` x the registered loss ``loss`` over the rows in ``rows``, taken
    in the step's update number ``update`` (``Plan.updates``).

    ``options`` are the loss function's own keyword arguments; they override the run's settings the loss
    reads (``sasr.losses.PartLoss.settings``: e.g. ``beta=0`` for a policy-gradient part).
    """

    name: str  # how metrics name it: loss/<name>, weight/<name>
    loss: str  # a name in sasr.losses.PART_LOSSES
    rows: torch.Tensor  # [B] bool
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    update: int = 0


# --- the plan: what the collector gathers, what the learner applies, what the record shows -----------------


@dataclass(frozen=True)
class Ask:
    """A registered row maker (``ROW_SOURCES``, ``GROUP_ROWS``, ``PROMPT_EXTENSIONS`` or ``CONTEXTS``) and its
    arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Gather:
    """What the collector builds for a step, per process."""

    demos: int = 0  # DEMO rows from the demonstration source
    prompts: int = 0  # RL prompts
    paired_only: bool = False  # RL prompts drawn only from those with a demonstration of their own
    rollouts: int = 0  # ROLLOUT rows sampled per prompt
    group_rows: int = 0  # rows per prompt that ``extend_groups`` adds to its group (rollouts where it cannot)
    extend_groups: Ask | None = None  # a GROUP_ROWS maker
    extend_prompts: Ask | None = None  # a PROMPT_EXTENSIONS maker: tokens each prompt goes on with
    contexts: Ask | None = None  # a CONTEXTS maker: other prompts of the groups' rows, once scored
    sources: tuple[Ask, ...] = ()  # ROW_SOURCES makers: rows before or after the groups, in this order
    advantage: str = "group"  # the advantage estimator (sasr.losses.ADVANTAGES)
    scale_rewards: str | None = None  # in place of grpo.scale_rewards
    probe: bool = False  # after the update: demonstrations for an SFT gradient norm with no update


@dataclass(frozen=True)
class Apply:
    """What the learner applies in one update of a step (None: the run's own setting)."""

    optimizer: str = "main"  # the optimizer state to step: the run's, or another the method names
    lr: float | None = None  # in place of the schedule's rate
    max_grad_norm: float | None = None  # in place of optim.max_grad_norm
    weight_decay: float | None = None  # in place of optim.weight_decay
    fresh_optimizer: bool = False  # clear the optimizer's state first (AdamW's moments and step count)


@dataclass
class Plan:
    """A step decided before anything is sampled; the same on every rank.

    ``phase`` labels the step in the logs and plots: 'sft' (demonstrations only), 'grpo' (rollouts only) or
    'mixed' (both in one step). ``info``: what the plan was computed from (p_t, mu, ...), for the record.
    """

    step: int  # 1-based optimizer step
    phase: str
    gather: Gather = field(default_factory=Gather)
    updates: tuple[Apply, ...] = (Apply(),)
    info: dict[str, float] = field(default_factory=dict)


# --- the makers a method may ask the collector for ----------------------------------------------------------


@dataclass(frozen=True)
class RowSource:
    """Rows outside the groups: ``make(collector, step, examples, **args) -> (rows or None, statistics)``,
    ``examples`` the step's groups' RL examples in group order (``[]`` before the groups)."""

    when: Literal["before", "after"]
    make: Callable[..., tuple[Rows | None, dict[str, float]]]


# Rows a group adds beside its rollouts: make(collector, model, examples, prompts, rollouts, k, **args) ->
# (rows or None, the prompts (indices into examples) that got k of them; the others get k more rollouts).
GroupRows = Callable[..., "tuple[Rows | None, list[int]]"]


@dataclass(frozen=True)
class PromptExtension:
    """What a prompt shows besides its own chat when its rollouts are sampled: ``make(collector, step,
    example, **args)`` returns, by ``where``: ``answer``, tokens the prompt goes on with after the assistant
    turn's header; ``question``, text at the end of the question (the last user turn); ``chat``, a whole chat in
    place of the example's. ``judged``: the judge and the reward functions read the answer's tokens with the
    completion (its start, shown). ``sample_only``: the rollouts are sampled under the extended prompt but the
    rows keep the example's own (trained off-policy: the sampler's log-probs are dropped)."""

    make: Callable[..., list[int] | str | list[dict]]
    judged: bool = False
    where: Literal["answer", "question", "chat"] = "answer"
    sample_only: bool = False


# Other prompts of a step's group rows, made once they are scored: make(collector, step, examples, rows,
# **args) -> (name, one chat (messages) per row or None where the row keeps its own prompt, statistics);
# ``examples`` the groups' RL examples, ``rows`` the group rows (``Rows.group`` indexes examples).
ContextMaker = Callable[..., "tuple[str, list[list[dict] | None], dict[str, float]]"]

# Columns a method adds to a group row's line of completions.jsonl: columns(rows, i) -> {name: value}.
SampleColumns = Callable[[Rows, int], dict[str, Any]]

ROW_SOURCES: Registry[RowSource] = Registry(
    "row source",
    "sasr.batch.ROW_SOURCES",
    "rows outside the groups, before or after them (`RowSource`; a plan asks with `Gather.sources`)",
)
GROUP_ROWS: Registry[GroupRows] = Registry(
    "group rows maker",
    "sasr.batch.GROUP_ROWS",
    "the rows each group adds beside its rollouts (a plan asks with `Gather.extend_groups`)",
)
PROMPT_EXTENSIONS: Registry[PromptExtension] = Registry(
    "prompt extension",
    "sasr.batch.PROMPT_EXTENSIONS",
    "what a prompt shows when its rollouts are sampled: tokens after the assistant header, text at the end of "
    "the question, or another chat (`PromptExtension.where`; `Gather.extend_prompts`)",
)
CONTEXTS: Registry[ContextMaker] = Registry(
    "context maker",
    "sasr.batch.CONTEXTS",
    "other prompts of the groups' rows, for a pass that reads their completions under them (`Gather.contexts`)",
)
SAMPLE_COLUMNS: Registry[SampleColumns] = Registry(
    "sample columns", "sasr.batch.SAMPLE_COLUMNS", "columns of a group row's line in completions.jsonl"
)
