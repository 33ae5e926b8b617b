"""A step's update from its rows and the method's parts: the rows in micro-batches, each part's whole-step
divisors, one reference pass and one policy pass per micro-batch, the weighted part losses, backward
(gradients reduced across processes once, at the last micro-batch), clip, finite check, optimizer step; on a
step with rollouts ``grpo.num_iterations`` such updates. Rows and parts in, an ``Update`` out.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from sasr import fsdp, metrics
from sasr.batch import OFFPOLICY, PREFIXED, ROLLOUT, Part, Plan, Rows
from sasr.config import TrainConfig
from sasr.logprobs import anchored_logprobs
from sasr.losses import ANCHORED_SFT_LOSSES, PART_LOSSES, Norm, PartInputs, masked_mean
from sasr.process import any_rank
from sasr.reference import ReferencePolicy

log = logging.getLogger(__name__)

# The grpo settings the policy-gradient part takes (a part's options may override them).
PG_SETTINGS = {
    "beta",
    "epsilon",
    "epsilon_high",
    "loss_type",
    "max_completion_length",
    "use_bias_correction_kl",
    "importance_sampling_level",
}


@dataclass(frozen=True)
class Passes:
    """What a step's training passes do, decided once from its plan."""

    temperature: float  # the policy and the reference read the rollouts at the sampler's temperature
    rollouts: bool  # the step has RL prompts: entropy, KL and the sampler gap are measured on them
    reference: bool  # a reference pass over the step's sampled rows
    iterations: int  # updates on these rows; above 1, ratios against the first one's log-probs (pi_old)


def passes(plan: Plan, config: TrainConfig) -> Passes:
    """The passes a step of ``plan`` needs."""
    g, rollouts = config.grpo, bool(plan.prompts)
    return Passes(
        temperature=g.temperature if rollouts else 1.0,
        rollouts=rollouts,
        reference=bool(plan.rollouts),
        iterations=g.num_iterations if rollouts else 1,
    )


SFT_PASSES = Passes(temperature=1.0, rollouts=False, reference=False, iterations=1)


@dataclass
class Update:
    """What one step's update did: the first update's loss and pre-clip gradient norm (the norm SASR reads),
    whether every update was finite (if not, it was skipped), and the passes' statistics."""

    loss: float
    grad_norm: float
    finite: bool
    stats: dict[str, float] = field(default_factory=dict)


def micro_batches(rows: Rows, accumulation: int) -> list[torch.Tensor]:
    """The step's rows in ``accumulation`` micro-batches [b] (indices): demonstrations and RL prompts (each
    with its whole group and own demonstrations) shared out evenly, in order; empty ones left out."""
    if accumulation == 1:
        return [torch.arange(len(rows), device=rows.kind.device)]
    alone = rows.group < 0  # demonstrations of no prompt
    order = torch.cumsum(alone.long(), 0) - 1  # [B]: index among them
    n_alone, n_groups = int(alone.sum()), int(rows.group.max()) + 1 if (~alone).any() else 0
    chunk = torch.where(
        alone,
        order * accumulation // max(n_alone, 1),
        rows.group.clamp(min=0) * accumulation // max(n_groups, 1),
    )  # [B] in 0..accumulation-1
    return [ix for i in range(accumulation) if len(ix := (chunk == i).nonzero().squeeze(1))]


def loss_mask(rows: Rows, mask_truncated: bool) -> torch.Tensor:
    """[B, T]: the tokens that carry loss (with mask_truncated_completions, none of a cut rollout's)."""
    if not mask_truncated:
        return rows.completion_mask
    return rows.completion_mask * (~rows.cut())[:, None].to(rows.completion_mask.dtype)


def make_optimizer(model, config: TrainConfig):
    """AdamW over the trainable parameters and its learning-rate schedule over ``config.steps``."""
    o = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    # torch's fused kernel: one pass per tensor, the same update up to float rounding (docs/performance.md).
    optimizer = torch.optim.AdamW(
        params,
        lr=o.learning_rate,
        betas=(o.adam_beta1, o.adam_beta2),
        weight_decay=o.weight_decay,
        fused=True,
    )
    scheduler = get_scheduler(
        o.lr_scheduler_type, optimizer, num_warmup_steps=o.lr_warmup_steps, num_training_steps=config.steps
    )
    return optimizer, scheduler


def part_norms(
    parts: list[Part], mask: torch.Tensor, num_processes: int = 1, all_reduce=None, micro_batches: int = 1
) -> dict[str, Norm]:
    """Each part's row count on this process and loss-token count per process over every process (``mask``
    [B, T]: the loss mask; ``all_reduce`` sums a tensor over processes): the divisors of its loss when its rows
    are computed in micro-batches or on several processes."""
    local = torch.tensor(
        [float((mask[p.rows]).sum()) for p in parts], device=mask.device, dtype=torch.float64
    )
    total = all_reduce(local) if num_processes > 1 else local
    return {
        p.name: Norm(int(p.rows.sum()), float(t) / num_processes, micro_batches)
        for p, t in zip(parts, total.tolist())
    }


class Learner:
    """Takes a step's update on ``model`` with ``optimizer`` and ``lr_scheduler``."""

    def __init__(
        self,
        config: TrainConfig,
        model,
        optimizer,
        lr_scheduler,
        reference: ReferencePolicy,
        accelerator: Accelerator,
        sharded: bool,
    ) -> None:
        self.config, self.model, self.optimizer, self.lr_scheduler = config, model, optimizer, lr_scheduler
        self.reference, self.accelerator, self.sharded = reference, accelerator, sharded

    def update(self, plan: Plan, rows: Rows, parts: list[Part]) -> Update:
        """Backward over the step's micro-batches, then one optimizer update; ``grpo.num_iterations`` updates on
        a step with rollouts, the ratio taken against the policy that sampled them (pi_old, the first
        iteration's log-probs). Statistics: timings add up over updates, the rest average (``sasr.metrics``)."""
        how = passes(plan, self.config)
        micro, norms = self.pieces(rows, parts)
        cache: list[dict[str, torch.Tensor]] = [{} for _ in micro]  # per micro-batch: reference, pi_old
        first: Update | None = None
        finite_all, pieces = True, []
        if plan.fresh_optimizer:  # a new stage that starts as a separate run would (its own moments)
            self.optimizer.state.clear()
        for group in self.optimizer.param_groups:
            if plan.lr is not None:  # this step's own rate; the schedule's step below sets the next one
                group["lr"] = plan.lr
            group["weight_decay"] = (
                self.config.optim.weight_decay if plan.weight_decay is None else plan.weight_decay
            )
        for _ in range(how.iterations):
            loss, piece = self.backward(how, rows, parts, micro, norms, cache)
            grad_norm, finite = self.optimizer_step(loss, plan.step, plan.max_grad_norm)
            finite_all &= finite
            first = first or Update(loss, grad_norm, finite)
            pieces.append(piece)
        stats = metrics.combine(pieces, "iterations")
        stats["trained_tokens"] = rows.completion_mask.sum().item() * how.iterations
        self.lr_scheduler.step()
        if how.iterations > 1:
            stats["num_iterations"] = how.iterations
        return Update(first.loss, first.grad_norm, finite_all, stats)

    def probe(self, rows: Rows) -> float | None:
        """The SFT gradient norm of ``rows`` (demonstrations, as an SFT step computes them), the weights left as
        they are; None if it is not finite."""
        parts = [Part("sft", "nll", torch.ones_like(rows.correct))]
        micro, norms = self.pieces(rows, parts)
        self.backward(SFT_PASSES, rows, parts, micro, norms, [{} for _ in micro])
        norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), math.inf))
        self.optimizer.zero_grad(set_to_none=True)
        return norm if math.isfinite(norm) else None

    def optimizer_step(
        self, loss: float, step: int, max_grad_norm: float | None = None
    ) -> tuple[float, bool]:
        """Clip (at ``max_grad_norm``, else optim.max_grad_norm) and update from the gradients ``backward``
        accumulated. Returns the pre-clip global gradient norm (read after the DDP all-reduce: the number SASR's
        p_t is computed from) and whether loss and norm were finite; if not, the update is skipped."""
        c, acc = self.config, self.accelerator
        max_norm = max_grad_norm if max_grad_norm is not None else c.optim.max_grad_norm
        max_norm = max_norm if max_norm is not None else math.inf
        grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), max_norm))
        # Every rank skips or takes the update together (a rank's own loss may be non-finite alone).
        finite = not any_rank(acc, not (math.isfinite(grad_norm) and math.isfinite(loss)))
        if finite:
            self.optimizer.step()
        else:
            log.warning("step %d: non-finite loss or gradient norm; update skipped", step)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, finite

    def pieces(self, rows: Rows, parts: list[Part]) -> tuple[list[torch.Tensor], dict[str, Norm]]:
        """The step's micro-batches, and the whole-step divisors of each part's loss when the step is computed
        in pieces (several micro-batches or processes; none when it is one piece)."""
        micro = micro_batches(rows, self.config.gradient_accumulation_steps)
        in_pieces = len(micro) > 1 or self.accelerator.num_processes > 1
        return micro, self.norms(rows, parts, len(micro)) if in_pieces else {}

    def norms(self, rows: Rows, parts: list[Part], micro: int) -> dict[str, Norm]:
        acc = self.accelerator
        mask = loss_mask(rows, self.config.grpo.mask_truncated_completions)
        reduce = functools.partial(acc.reduce, reduction="sum")
        return part_norms(parts, mask, acc.num_processes, reduce, micro)

    def backward(
        self,
        how: Passes,
        rows: Rows,
        parts: list[Part],
        micro: list[torch.Tensor],
        norms: dict[str, Norm],
        cache: list[dict],
    ) -> tuple[float, dict[str, float]]:
        """Forward and backward over each micro-batch, the gradients all-reduced once, at the last. Returns the
        step's loss and statistics (the loss parts and timings add up; other numbers average)."""
        loss, pieces = 0.0, []
        for m, idx in enumerate(micro):
            last = m == len(micro) - 1
            with contextlib.nullcontext() if last else self.no_sync():
                part_loss, piece = self.loss(how, rows, parts, idx, norms, cache[m])
                self.accelerator.backward(part_loss)
            loss += part_loss.item()
            pieces.append(piece)
        return loss, metrics.combine(pieces, "micro")

    def anchor(
        self, sub: Rows, parts: list[Part], idx: torch.Tensor, full: bool, temperature: float
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """ASFT's anchor for the micro-batch ``sub``: pi_ref's whole distribution q [b, T, V] at the completion
        positions of the rows an SFT part trains, and sum q log q [b, T]; zero on the other rows, (None, None)
        when no row is an SFT part's."""
        demo = torch.zeros(len(sub), dtype=torch.bool, device=sub.kind.device)
        for part in parts:
            if part.loss == "nll":
                demo |= part.rows if full else part.rows[idx]
        if not demo.any():
            return None, None
        on = demo.nonzero().squeeze(1)
        rows = sub if len(on) == len(sub) else sub.select(on)
        T = sub.completion_ids.size(1)
        with self.accelerator.autocast():
            q_on, negentropy_on = self.reference.distributions(
                rows.input_ids, rows.attention_mask, T, temperature
            )
        if len(on) == len(sub):
            return q_on, negentropy_on
        q = q_on.new_zeros(len(sub), *q_on.shape[1:]).index_copy_(0, on, q_on)
        return q, negentropy_on.new_zeros(len(sub), T).index_copy_(0, on, negentropy_on)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Within this block backward accumulates gradients without reducing them across processes."""
        return fsdp.no_sync(self.model) if self.sharded else self.accelerator.no_sync(self.model)

    def loss(
        self,
        how: Passes,
        rows: Rows,
        parts: list[Part],
        idx: torch.Tensor,
        norms: dict[str, Norm],
        cache: dict,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum of the weighted part losses over the micro-batch ``idx`` of the step's rows, from one reference
        pass (over its rollouts, once: cached) and one policy pass (over every row)."""
        g, device = self.config.grpo, self.accelerator.device
        full = len(idx) == len(rows)
        sub = rows if full else rows.select(idx)
        T = sub.completion_ids.size(1)
        on = sub.of_kind(ROLLOUT, PREFIXED)  # the rows the policy sampled (all or part of)
        stats: dict[str, float] = {}
        on_rows = on.nonzero().squeeze(1)
        if how.reference and len(on_rows) and "ref" not in cache:
            # The reference pass comes first: it may swap weights in place, which must not touch a live graph.
            with metrics.timer(stats, "reference_seconds", device):
                ref_rows = sub if len(on_rows) == len(sub) else sub.select(on_rows)
                with self.accelerator.autocast():
                    cache["ref"] = self.reference.logprobs(
                        ref_rows.input_ids, ref_rows.attention_mask, T, how.temperature
                    )  # [b, T] rollouts
        if self.config.sft.loss in ANCHORED_SFT_LOSSES and "anchor" not in cache:
            with metrics.timer(stats, "reference_seconds", device):
                cache["anchor"] = self.anchor(sub, parts, idx, full, how.temperature)
        ref, (anchor, anchor_negentropy) = cache.get("ref"), cache.get("anchor", (None, None))
        t_policy = metrics.now(device)
        # The G rows of a prompt share one pass over it (anchored_logprobs finds them).
        logps, entropy, cross = anchored_logprobs(
            self.model,
            sub.input_ids,
            sub.attention_mask,
            T,
            how.temperature,
            with_entropy=how.rollouts,
            anchor=anchor,
        )  # [b, T]
        anchor_kl = None if cross is None else anchor_negentropy - cross  # [b, T] KL(pi_ref || pi)
        if how.iterations > 1 and "old" not in cache:
            cache["old"] = logps.detach()  # pi_old: the weights that sampled the rollouts
        ref_logps = None  # [b, T]: the reference on sampled rows; elsewhere the policy itself (KL 0)
        if ref is not None:
            ref_logps = ref if len(on_rows) == len(sub) else logps.detach().index_copy(0, on_rows, ref)
        if how.rollouts:
            stats["policy_forward_seconds"] = metrics.now(device) - t_policy
        if how.rollouts and len(
            on_rows
        ):  # statistics of the sampled tokens: none in a micro-batch without any
            mask = sub.sampled()
            stats["entropy"] = masked_mean(entropy, mask).item()
            # k3 KL to the reference over every rollout, whichever part trains on it
            if ref_logps is not None:
                delta = ref_logps - logps.detach()
                stats["kl"] = masked_mean(torch.exp(delta) - delta - 1, mask).item()
            if sub.sampler_logprobs is not None:  # how far the sampler's numbers are from the learner's
                gap = (logps.detach() - sub.sampler_logprobs).abs()
                stats["sampler_logprob_gap"] = masked_mean(gap, mask).item()
        total = None
        grpo_settings = g.model_dump(include=PG_SETTINGS)
        carries = loss_mask(sub, g.mask_truncated_completions)
        old = cache.get("old")
        for part in parts:
            rows_in = part.rows if full else part.rows[idx]
            pidx = rows_in.nonzero().squeeze(1)  # [b]
            x = PartInputs(
                logps[pidx],
                carries[pidx],
                None if entropy is None else entropy[pidx],
                None if ref_logps is None else ref_logps[pidx],
                sub.advantages[pidx].nan_to_num(0.0),  # a row no reward function scored: no advantage
                sub.kind[pidx] == OFFPOLICY,
                sub.correct[pidx],
                old_logps=None if old is None else old[pidx],
                norm=norms.get(part.name),
                anchor_kl=None if anchor_kl is None else anchor_kl[pidx],
                prefix=None if sub.prefix_mask is None else sub.prefix_mask[pidx],
                prefix_advantages=None if sub.prefix_advantages is None else sub.prefix_advantages[pidx],
            )
            if part.loss == "pg":
                options = {**grpo_settings, **part.options}
            elif part.loss == "nll":
                options = {"loss_type": self.config.sft.loss, "asft_beta": self.config.sft.asft_beta}
                options.update(part.options)
            else:
                options = part.options
            out = PART_LOSSES[part.loss](x, **options)
            term = out.loss if part.weight == 1.0 else part.weight * out.loss
            total = term if total is None else total + term
            if len(pidx):  # a part with no rows here has no value here, not 0 (sasr.metrics.combine)
                stats.update(out.stats)
                if len(parts) > 1:
                    stats[f"loss/{part.name}"] = out.loss.item()
            if len(parts) > 1:
                stats[f"weight/{part.name}"] = part.weight
        return total, stats
