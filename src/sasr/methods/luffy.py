"""LUFFY (arXiv 2504.14945) and SRFT (arXiv 2506.19767): each GRPO group holds its prompt's demonstration
beside its rollouts, an off-policy row whose tokens train with LUFFY's policy shaping; SRFT adds an
entropy-weighted SFT term on the demonstrations and entropy-weighted self-rollout terms."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from sasr import losses, metrics
from sasr.batch import GROUP_ROWS, ROLLOUT, Ask, Gather, Part, Plan, Rows, register_kind
from sasr.data import encode_targets, rows_of_kind
from sasr.errors import SasrError
from sasr.losses import LossTerm, PartInputs, PartLoss
from sasr.methods.base import DrGRPOOptions, Method, register_method

OFFPOLICY = register_kind("offpolicy", grouped=True, sampled=False)  # a demonstration inside its group
metrics.register_all(
    [
        (
            "offpolicy_share",
            "LUFFY, SRFT: the share of the groups' rows that are demonstrations",
            metrics.ROLLOUTS,
        ),
        ("offpolicy_shaped_weight", "LUFFY: mean shaped weight of off-policy tokens", metrics.PASS),
        ("offpolicy_prob", "LUFFY: mean probability the policy gives off-policy tokens", metrics.PASS),
        ("srft_sft_weight", "SRFT: mean weight of the demonstration term", metrics.PASS),
        ("srft_rl_weight", "SRFT: mean weight of the correct rollouts' term", metrics.PASS),
    ]
)


@GROUP_ROWS.register("demonstration_in_group")
def demonstration_in_group(c, model, examples, prompts, rollouts: Rows, k: int):
    """k copies of each prompt's demonstration after its rollouts, with the same prompt tokens (as trained:
    cut at max_completion_length); a prompt without one gets k more rollouts."""
    paired = [i for i, ex in enumerate(examples) if c.has_demonstration(c.index_of(ex))]
    if not paired:
        return None, []
    g, device = c.config.grpo, c.accelerator.device
    targets = [c.task.target(examples[i]) for i in paired]
    ids, mask = encode_targets(c.tokenizer, targets, g.max_completion_length, device)  # [p, t]
    texts = c.tokenizer.batch_decode(ids, skip_special_tokens=True)  # judged as trained: maybe cut
    first = torch.tensor(paired, device=device) * (len(rollouts) // len(examples))  # each one's first rollout
    tokens = (rollouts.prompt_ids[first], rollouts.prompt_mask[first], ids, mask)
    texts_k, groups_k = [t for t in texts for _ in range(k)], [i for i in paired for _ in range(k)]
    return rows_of_kind(*(x.repeat_interleave(k, 0) for x in tokens), texts_k, OFFPOLICY, groups_k), paired


def shape(x: PartInputs, per_token: torch.Tensor, shaping_gamma: float, stats: dict) -> torch.Tensor:
    """The off-policy rows' tokens take -A f(p), f(p) = p / (p + gamma), unclipped, the behaviour probability
    taken as 1 (LUFFY's policy shaping); their reference log-probs are their own (KL 0)."""
    off, adv = (x.kind == OFFPOLICY)[:, None], x.advantages.unsqueeze(1)  # [b, 1]
    p = x.logps.exp()
    off_token = -adv * p / (p + shaping_gamma)  # no ratio to clip: the behaviour probability is 1
    per_token = torch.where(off, off_token, per_token)
    with torch.no_grad():
        off_mask = x.mask * off.to(x.mask.dtype)
        pd = p.detach()
        # d f(p) / d log p: what an off-policy token weighs where an on-policy one weighs 1
        shaped = pd * shaping_gamma / (pd + shaping_gamma) ** 2
        if off.any():  # statistics of the off-policy tokens: none without such rows
            stats["offpolicy_shaped_weight"] = losses.masked_mean(shaped, off_mask).item()
            stats["offpolicy_prob"] = losses.masked_mean(pd, off_mask).item()
    return per_token


def luffy_pg(x: PartInputs, *, loss_type, max_completion_length, shaping_gamma, **clip) -> PartLoss:
    """A group's rows aggregated together: rollouts by GRPO's clipped surrogate (+ beta x KL), off-policy
    demonstrations shaped (``shape``)."""
    per_token, is_clipped = losses.clipped(x, x.advantages.unsqueeze(1), **clip)
    on_mask = x.mask * (x.kind != OFFPOLICY)[:, None].to(x.mask.dtype)
    stats = {"clip_fraction": losses.masked_mean(is_clipped.float(), on_mask).item()}
    per_token = shape(x, per_token, shaping_gamma, stats)
    return PartLoss(losses.aggregate(per_token, x, loss_type, max_completion_length), stats)


def srft_pg(x: PartInputs, *, loss_type, max_completion_length, shaping_gamma, rollout_coef, **_) -> PartLoss:
    """SRFT's RL terms: -w log p on rollouts, w = rollout_coef x exp(H_row) (stop-gradient) on correct rows and
    -1 on wrong ones, nothing clipped; off-policy demonstrations shaped as LUFFY's."""
    h = losses.row_entropy(x)  # [b]
    w_row = torch.where(x.correct, rollout_coef * torch.exp(h), torch.full_like(h, -1.0))
    per_token = -w_row[:, None] * x.logps
    stats: dict[str, float] = {}
    positive = x.correct & (x.kind != OFFPOLICY)
    if positive.any():  # no correct rollout: no weight to report (not 0)
        stats["srft_rl_weight"] = w_row[positive].mean().item()
    stats["clip_fraction"] = 0.0  # no ratio is clipped in this term
    per_token = shape(x, per_token, shaping_gamma, stats)
    return PartLoss(losses.aggregate(per_token, x, loss_type, max_completion_length), stats)


def srft_entropy_weight(coef: float):
    """SRFT's SFT term: each demonstration row weighted by the stop-gradient coef x exp(-H_row)."""

    def reweight(x: PartInputs, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        w_row = coef * torch.exp(-losses.row_entropy(x))  # [b]
        return weight * w_row[:, None], {"srft_sft_weight": w_row.mean().item()}

    return reweight


losses.PART_LOSSES.add("luffy_pg", LossTerm(luffy_pg, losses.PG_SETTINGS))
losses.PART_LOSSES.add("srft_pg", LossTerm(srft_pg, losses.PG_SETTINGS))


class LuffyOptions(DrGRPOOptions):
    num_demos: int = Field(1, ge=0, description="k: demonstrations in each group of num_generations rows")
    shaping_gamma: float = Field(0.1, gt=0, description="off-policy tokens weigh f(p) = p / (p + gamma)")
    beta: float = Field(0.0, ge=0, description="KL weight on the rollouts (LUFFY: none)")


class DemosInGroups(Method):
    """Base of LUFFY and SRFT: each GRPO group holds num_generations - k rollouts and k copies of its prompt's
    demonstration (options ``num_demos`` = k and ``scale_rewards``)."""

    pairs_demos = True
    repeatable_updates = False

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if self.opts.num_demos >= self.group_size:
            raise SasrError(
                f"method option '{self.name}.num_demos' ({self.opts.num_demos}) must be smaller than "
                f"grpo.num_generations ({self.group_size}): a group needs at least one rollout"
            )

    def plan(self, step: int) -> Plan:
        k = self.opts.num_demos
        gather = Gather(
            prompts=self.prompts_per_step,
            rollouts=self.group_size - k,
            group_rows=k,
            extend_groups=Ask("demonstration_in_group") if k else None,
            scale_rewards=self.opts.scale_rewards,
        )
        return Plan(step, "mixed" if k else "grpo", gather)

    def offpolicy_share(self, rows: Rows) -> dict[str, float]:
        """The share of the groups' rows that are demonstrations (below k / G where prompts lack one)."""
        demos, group_rows = int((rows.kind == OFFPOLICY).sum()), int(rows.of_kind(ROLLOUT, OFFPOLICY).sum())
        return {"offpolicy_share": demos / group_rows}


@register_method
class Luffy(DemosInGroups):
    """LUFFY: k demonstrations in each group; their tokens train with the shaped, unclipped off-policy term."""

    name = "luffy"
    paper = "arXiv 2504.14945"
    summary = "k demonstrations inside each GRPO group, trained with policy shaping p / (p + gamma)"
    Options = LuffyOptions
    dynamics = ("offpolicy_share", "offpolicy_shaped_weight")

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        o = self.opts
        options = {"beta": o.beta, "loss_type": o.loss_type, "shaping_gamma": o.shaping_gamma}
        return [Part("rl", "luffy_pg", rows.of_kind(ROLLOUT, OFFPOLICY), 1.0, options)], self.offpolicy_share(
            rows
        )


class SRFTOptions(DrGRPOOptions):
    num_demos: int = Field(1, ge=1, description="k: demonstrations in each group of num_generations rows")
    sft_coef: float = Field(0.5, ge=0, description="demonstration SFT weight: sft_coef * exp(-H)")
    rl_coef: float = Field(0.1, ge=0, description="correct self-rollout weight: rl_coef * exp(+H)")
    shaping_gamma: float = Field(
        0.1, gt=0, description="off-policy demonstration tokens weigh p / (p + gamma)"
    )


@register_method
class SRFT(DemosInGroups):
    """SRFT: entropy-weighted SFT on the demonstrations, the same demonstrations as unclipped off-policy RL
    inside their group, and entropy-weighted self-rollout RL (correct rows pulled up, wrong ones down)."""

    name = "srft"
    paper = "arXiv 2506.19767"
    summary = (
        "LUFFY's groups + entropy-weighted SFT on the demonstrations and entropy-weighted self-rollout terms"
    )
    Options = SRFTOptions
    dynamics = ("srft_sft_weight", "srft_rl_weight")

    def parts(self, plan: Plan, rows: Rows) -> tuple[list[Part], dict[str, float]]:
        o = self.opts
        rl = {
            "beta": 0.0,
            "loss_type": o.loss_type,
            "shaping_gamma": o.shaping_gamma,
            "rollout_coef": o.rl_coef,
        }
        return [
            Part("sft", "nll", rows.kind == OFFPOLICY, 1.0, {"reweight": srft_entropy_weight(o.sft_coef)}),
            Part("rl", "srft_pg", rows.of_kind(ROLLOUT, OFFPOLICY), 1.0, rl),
        ], self.offpolicy_share(rows)
