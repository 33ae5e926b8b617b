"""Prefix-RFT (arXiv 2507.01679): rows of each group continue a prefix of the prompt's demonstration; advantages
centred within each (prompt, prefix) subgroup; the prefix tokens train off-policy, highest entropy only."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from sasr import losses, metrics
from sasr.batch import GROUP_ROWS, ROLLOUT, SAMPLE_COLUMNS, Ask, Gather, Part, Plan, Rows, register_kind
from sasr.errors import SasrError, unknown
from sasr.losses import Advantages, LossTerm, PartInputs, PartLoss
from sasr.methods.base import Method, Options, cosine, register_method

LossType = losses.names(losses.LOSS_AGGREGATIONS)
PREFIXED = register_kind("prefixed", grouped=True, sampled=True)  # a demonstration's start, then sampled
metrics.register_all(
    [
        ("prefix_fraction", "Prefix-RFT: the share of its demonstration a prefixed row starts with"),
        ("prefix_share", "Prefix-RFT: the share of group rows that continue a prefix", metrics.ROLLOUTS),
        ("prefix_accuracy", "Prefix-RFT: the share of prefixed rows judged correct", metrics.ROLLOUTS),
        ("prefix_kept", "Prefix-RFT: the share of prefix tokens that train (highest entropy)", metrics.PASS),
        ("prefix_clip_fraction", "Prefix-RFT: share of prefix tokens whose ratio was clipped", metrics.PASS),
    ]
)


@GROUP_ROWS.register("demonstration_prefixes")
def demonstration_prefixes(c, model, examples, prompts, rollouts: Rows, k: int, fraction: float):
    """k continuations of each prompt followed by the first int(fraction x L), at least 1 and at most L - 1, of
    the L tokens of its demonstration; a prompt without one (or one under 2 tokens) gets k more rollouts."""
    starts = {}
    for i, ex in enumerate(examples):
        if c.has_demonstration(c.index_of(ex)):
            ids = c.tokenizer(c.task.target(ex), add_special_tokens=False)["input_ids"]
            m = min(max(int(fraction * len(ids)), 1), len(ids) - 1)
            if m >= 1:
                starts[i] = ids[:m]
    got = list(starts)
    if not got:
        return None, []
    return c.sample(model, [prompts[i] for i in got], got, k, [starts[i] for i in got], PREFIXED), got


@SAMPLE_COLUMNS.register("prefix")
def _sample_columns(rows: Rows, i: int) -> dict[str, Any]:  # a prefixed row's line in completions.jsonl
    n = int(rows.given_tokens()[i].sum())
    return {"prefix_tokens": n, "prefix_advantage": float(rows.extras["prefix_advantages"][i])} if n else {}


def prefix_group_advantages(rewards, subgroup, num_generations: int, rows_per_prefix: int, scale="none"):
    """Each row's reward centred within its (prompt, prefix) subgroup, and the prefix tokens' advantage (that
    advantage - the on-policy subgroup's mean reward) / rows_per_prefix. rewards, subgroup [B], B = prompts x G
    grouped consecutively; subgroup 0: on-policy rows, j >= 1: rows continuing the prompt's j-th prefix. A
    subgroup of one row is centred on 0 (with ``scale='group'`` divided by 1); NaN rewards: out, advantage 0.
    -> advantages [B], prefix advantages [B] (0 on on-policy rows), zero_spread [prompts] (bool)."""
    if scale not in ("none", "group"):
        raise unknown("scale_rewards", scale, ("none", "group"))
    B, device = rewards.numel(), rewards.device
    prompt = torch.arange(B, device=device) // num_generations  # [B]
    S = int(subgroup.max()) + 1
    key = prompt * S + subgroup  # [B]: the row's (prompt, prefix) subgroup
    scored = ~rewards.isnan()
    r = rewards.nan_to_num(0.0)
    slots = (B // num_generations) * S
    count = torch.zeros(slots, device=device).index_add_(0, key, scored.float())
    total = torch.zeros(slots, device=device).index_add_(0, key, r * scored)
    mean = torch.where(count > 1, total / count.clamp(min=1), torch.zeros_like(total))  # [prompts x S]
    adv = r - mean[key]
    if scale == "group":
        sq = torch.zeros(slots, device=device).index_add_(0, key, adv**2 * scored)
        std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.ones_like(sq))
        adv = adv / (std[key] + losses.ADVANTAGE_EPS)
    on_mean = mean.view(-1, S)[:, 0]  # [prompts]
    prefix_adv = torch.where(subgroup > 0, (adv - on_mean[prompt]) / rows_per_prefix, torch.zeros_like(adv))
    zero = torch.zeros_like(adv)
    adv, prefix_adv = torch.where(scored, adv, zero), torch.where(scored, prefix_adv, zero)
    moved = (adv.abs() + prefix_adv.abs()).view(-1, num_generations).amax(dim=1)  # [prompts]
    return adv, prefix_adv, torch.isclose(moved, torch.zeros_like(moved))


@losses.ADVANTAGES.register("prefix_subgroups")
def _prefix_subgroups(rewards, rows: Rows, group_size: int, centre: str, scale: str, gather: Gather):
    subgroup = (rows.kind == PREFIXED).long()
    adv, prefix_adv, zero = prefix_group_advantages(rewards, subgroup, group_size, gather.group_rows, scale)
    return Advantages(adv, zero, {"prefix_advantages": prefix_adv})


def prefix_pg(x: PartInputs, *, loss_type: str, max_completion_length: int, prefix: dict, **clip) -> PartLoss:
    """Policy gradient over a group's rows, aggregated together. The prefix tokens of prefixed rows take the
    row's prefix advantage and their own clip range (``prefix``'s prefix_epsilon and prefix_epsilon_high; None:
    the rollouts'), and with its prefix_entropy_top only that share of the prefix tokens at hand, the
    highest-entropy ones, keeps its advantage; what the policy sampled after the prefix trains as a rollout does."""
    pre = None if x.given is None else x.given & x.mask.bool()  # [b, T]: the prefix tokens with loss
    if pre is None or not pre.any():
        return losses.pg_part(x, loss_type=loss_type, max_completion_length=max_completion_length, **clip)
    adv = torch.where(pre, x.extras["prefix_advantages"][:, None], x.advantages.unsqueeze(1))  # [b, T]
    stats: dict[str, float] = {}
    if prefix["prefix_entropy_top"] is not None:
        if x.entropy is None:
            raise ValueError("prefix_entropy_top needs the policy pass's entropy")
        kept = losses.top_entropy(x.entropy, pre, prefix["prefix_entropy_top"])
        adv = adv.masked_fill(pre & ~kept, 0.0)
        stats["prefix_kept"] = (kept.sum() / pre.sum()).item()
    per_token, is_clipped = losses.clipped(x, adv, **clip)
    on_mask = x.mask * (~pre).to(x.mask.dtype)
    stats["clip_fraction"] = losses.masked_mean(is_clipped.float(), on_mask).item()
    high = clip["epsilon_high"] or clip["epsilon"]  # clip ranges are > 0: None alone is falsy
    low_pre, high_pre = prefix["prefix_epsilon"] or clip["epsilon"], prefix["prefix_epsilon_high"] or high
    if (low_pre, high_pre) != (clip["epsilon"], high):
        pre_token, is_clipped = losses.clipped(
            x, adv, **{**clip, "epsilon": low_pre, "epsilon_high": high_pre}
        )
        per_token = torch.where(pre, pre_token, per_token)
    stats["prefix_clip_fraction"] = losses.masked_mean(is_clipped.float(), pre).item()
    return PartLoss(losses.aggregate(per_token, x, loss_type, max_completion_length), stats)


losses.PART_LOSSES.add("prefix_pg", LossTerm(prefix_pg, losses.PG_SETTINGS))
PREFIX_OPTIONS = {"prefix_epsilon", "prefix_epsilon_high", "prefix_entropy_top"}  # what its loss term reads


class PrefixRFTOptions(Options):
    num_prefixed: int | None = Field(
        None,
        ge=1,
        description="rows of each group continuing one prefix (their layout: null, half the group)",
    )
    prefix_start: float = Field(
        0.95, ge=0, le=1, description="the prefix's share of the demonstration at step 1"
    )
    prefix_end: float = Field(
        0.05, ge=0, le=1, description="... at prefix_steps and after (a cosine between)"
    )
    prefix_steps: int | None = Field(None, ge=1, description="steps of the cosine; null: the whole run")
    prefix_entropy_top: float = Field(
        0.2, gt=0, le=1, description="rho: the share of prefix tokens, highest entropy first, that train"
    )
    prefix_epsilon: float | None = Field(
        None, gt=0, description="the prefix tokens' clip range below 1; null: grpo.epsilon"
    )
    prefix_epsilon_high: float | None = Field(
        None, gt=0, description="... above 1; null: the rollouts' (grpo.epsilon_high, else epsilon)"
    )
    loss_type: LossType = Field("token_sum", description="aggregation of the RL part (their dr_grpo mode)")
    scale_rewards: Literal["none", "group"] = Field(
        "none", description="what advantages are divided by: nothing (their dr_grpo), or the subgroup's std"
    )
    beta: float = Field(0.0, ge=0, description="KL weight (Prefix-RFT: none)")


@register_method
class PrefixRFT(Method):
    """Prefix-RFT: in each group, ``num_prefixed`` rows start with the first l(t) of the prompt's demonstration
    (l on a cosine from 0.95 to 0.05) and go on with what the policy samples (the module's docstring)."""

    name = "prefix-rft"
    paper = "arXiv 2507.01679"
    summary = "rows of each group continue a shrinking prefix of the demonstration; prefix tokens off-policy"
    Options = PrefixRFTOptions
    pairs_demos = True
    dynamics = ("prefix_fraction", "prefix_accuracy")

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.n = self.opts.num_prefixed or self.group_size // 2
        if not 1 <= self.n < self.group_size:  # one sentence, at the config's validation
            raise SasrError(
                f"method option 'prefix-rft.num_prefixed' ({self.n}) must be at least 1 and smaller than "
                f"grpo.num_generations ({self.group_size}): a group needs on-policy rollouts"
            )

    def fraction(self, step: int) -> float:
        """l(t): a cosine from prefix_start at step 1 to prefix_end at prefix_steps, then prefix_end."""
        o = self.opts
        n = o.prefix_steps or self.steps
        return o.prefix_end if step > n else cosine(step, o.prefix_start, o.prefix_end, n)

    def plan(self, step: int) -> Plan:
        n, l_t = self.n, self.fraction(step)
        gather = Gather(
            prompts=self.prompts_per_step,
            rollouts=self.group_size - n,
            group_rows=n,
            extend_groups=Ask("demonstration_prefixes", {"fraction": l_t}),
            advantage="prefix_subgroups",
            scale_rewards=self.opts.scale_rewards,
        )
        return Plan(step, "mixed", gather, info={"prefix_fraction": l_t})

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        o = self.opts
        options = {"beta": o.beta, "loss_type": o.loss_type, "prefix": o.model_dump(include=PREFIX_OPTIONS)}
        prefixed = rows.kind == PREFIXED
        stats = {"prefix_share": prefixed.sum().item() / rows.grouped().sum().item()}
        if prefixed.any():  # no prompt with a demonstration: no prefixed row to report on
            stats["prefix_accuracy"] = rows.correct[prefixed].float().mean().item()
        return [Part("rl", "prefix_pg", rows.of_kind(ROLLOUT, PREFIXED), 1.0, options)], stats
