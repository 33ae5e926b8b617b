"""A step's updates from its rows and the method's parts. For each update the plan lists (``Plan.updates``):
the rows in micro-batches, each part's whole-step divisors, per micro-batch the passes its parts need (the
reference's, the anchor's, then the policy's) and the pure loss of ``sasr.objective``, backward (gradients
reduced across processes once, at the last micro-batch), clip, finite check, a step of that update's optimizer;
on a step with rollouts ``grpo.num_iterations`` such updates. Rows and parts in, an ``Update`` out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from sasr import fsdp, metrics
from sasr.batch import Apply, Gather, Part, Plan, Rows
from sasr.config import TrainConfig
from sasr.errors import SasrError
from sasr.logprobs import anchored_logprobs, selective_log_softmax
from sasr.losses import PART_LOSSES, Norm
from sasr.objective import PassOutputs, loss_mask, micro_loss, options
from sasr.passes import ANCHOR, PASSES
from sasr.process import any_rank
from sasr.reference import ReferencePolicy
from sasr.trees import dotted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Passes:
    """What a step's training passes do, decided once from what it gathered."""

    temperature: float  # the policy and the reference read the rollouts at the sampler's temperature
    rollouts: bool  # the step has RL prompts: entropy, KL and the sampler gap are measured on them
    reference: bool  # a reference pass over the step's sampled rows
    iterations: int  # updates on these rows; above 1, ratios against the first one's log-probs (pi_old)


def passes(gather: Gather, config: TrainConfig) -> Passes:
    """The passes a step that gathers ``gather`` needs."""
    g, rollouts = config.grpo, bool(gather.prompts)
    return Passes(
        temperature=g.temperature if rollouts else 1.0,
        rollouts=rollouts,
        reference=bool(gather.rollouts),
        iterations=g.num_iterations if rollouts else 1,
    )


SFT_PASSES = Passes(temperature=1.0, rollouts=False, reference=False, iterations=1)


@dataclass
class Update:
    """What a step's updates did: the first update's loss, pre-clip gradient norm (the norm SASR reads) and
    learning rate, whether every update was finite (a non-finite one was skipped), and the passes'
    statistics (a later update's: ``merged``)."""

    loss: float
    grad_norm: float
    finite: bool
    lr: float = math.nan
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


def make_optimizer(model, config: TrainConfig, lr: float | None = None):
    """AdamW over the trainable parameters (at ``lr``, default optim.learning_rate) and its learning-rate
    schedule over ``config.steps``."""
    o = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    # torch's fused kernel: one pass per tensor, the same update up to float rounding (docs/performance.md).
    optimizer = torch.optim.AdamW(
        params,
        lr=o.learning_rate if lr is None else lr,
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


def update_rows(rows: Rows, parts: list[Part]) -> tuple[Rows, list[Part]]:
    """The rows one of several updates of a step trains (those its parts cover), its parts re-indexed."""
    covered = torch.stack([p.rows for p in parts]).any(0)
    idx = covered.nonzero().squeeze(1)
    return rows.select(idx), [dataclasses.replace(p, rows=p.rows[idx]) for p in parts]


def merged(stats: dict[str, float], later: Update, name: str) -> dict[str, float]:
    """A later update's numbers as the step's line holds them: its loss, norm and rate, and any statistic the
    first update also has, as ``update/NAME/KEY``; the others as they are; its trained tokens added."""
    own = {"loss": later.loss, "grad_norm": later.grad_norm, "lr": later.lr}
    out = {f"update/{name}/{k}": v for k, v in own.items()}
    for key, value in later.stats.items():
        if key in ("trained_tokens", "scored_tokens"):
            out[key] = stats.get(key, 0) + value
        else:
            out[key if key not in stats else f"update/{name}/{key}"] = value
    return out


class Learner:
    """Takes a step's updates on ``model``: with ``optimizer`` and ``lr_scheduler``, or with another
    optimizer state an update names (``Apply.optimizer``), made at its first use and saved with the run."""

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
        self.settings = dotted(config.model_dump(mode="json"))  # what part losses read (LossTerm.settings)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}  # further optimizer states, by name

    def update(self, plan: Plan, rows: Rows, parts: list[Part]) -> Update:
        """Every update of ``plan`` in order, each over the rows its parts train (all of them when the step
        takes one update); then the schedule steps once. Statistics: timings add up over iterations, the rest
        average (``sasr.metrics``)."""
        how, done = passes(plan.gather, self.config), []
        for u, apply in enumerate(plan.updates):
            mine = [p for p in parts if p.update == u]
            here, mine = (rows, mine) if len(plan.updates) == 1 else update_rows(rows, mine)
            done.append(self.one_update(how, apply, here, mine, plan.step))
        self.lr_scheduler.step()
        first = done[0]
        for apply, later in zip(plan.updates[1:], done[1:]):
            first.stats.update(merged(first.stats, later, apply.optimizer))
        first.finite = all(u.finite for u in done)
        return first

    def optimizer_for(self, apply: Apply) -> torch.optim.Optimizer:
        if apply.optimizer == "main":
            return self.optimizer
        if apply.optimizer not in self.optimizers:
            self.optimizers[apply.optimizer] = make_optimizer(self.model, self.config, apply.lr)[0]
        return self.optimizers[apply.optimizer]

    def one_update(self, how: Passes, apply: Apply, rows: Rows, parts: list[Part], step: int) -> Update:
        """Backward over the rows' micro-batches, then one step of ``apply``'s optimizer; ``grpo.num_iterations``
        of them on a step with rollouts, the ratio taken against the policy that sampled them (pi_old, the first
        iteration's log-probs)."""
        optimizer = self.optimizer_for(apply)
        micro, norms = self.pieces(rows, parts)
        # per micro-batch, for the later iterations: reference, pi_old, other passes (a teacher's [b, T, V] too)
        cache: list[dict[str, torch.Tensor]] = [{} for _ in micro]
        first: Update | None = None
        finite_all, pieces = True, []
        if apply.fresh_optimizer:  # a new stage that starts as a separate run would (its own moments)
            optimizer.state.clear()
        for group in optimizer.param_groups:
            if apply.lr is not None:  # this step's own rate; the schedule's step sets the next one
                group["lr"] = apply.lr
            group["weight_decay"] = (
                self.config.optim.weight_decay if apply.weight_decay is None else apply.weight_decay
            )
        lr = optimizer.param_groups[0]["lr"]
        for _ in range(how.iterations):
            loss, piece = self.backward(how, rows, parts, micro, norms, cache)
            grad_norm, finite = self.optimizer_step(optimizer, loss, step, apply.max_grad_norm)
            finite_all &= finite
            first = first or Update(loss, grad_norm, finite, lr)
            pieces.append(piece)
        stats = metrics.combine(pieces, "iterations")
        stats["trained_tokens"] = rows.completion_mask.sum().item() * how.iterations
        passes = {n for p in parts for n in PART_LOSSES[p.loss].passes(options(p, self.settings))} - {ANCHOR}
        if passes:  # a further forward pass over the rows (a teacher's), once per update: sasr.passes
            stats["scored_tokens"] = rows.completion_mask.sum().item() * len(passes)
        if how.iterations > 1:
            stats["num_iterations"] = how.iterations
        return Update(first.loss, first.grad_norm, finite_all, lr, stats)

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
        self, optimizer, loss: float, step: int, max_grad_norm: float | None = None
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
            optimizer.step()
        else:
            log.warning("step %d: non-finite loss or gradient norm; update skipped", step)
        optimizer.zero_grad(set_to_none=True)
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
            if how.iterations == 1:  # nothing reads this micro-batch's passes again
                cache[m].clear()
            loss += part_loss.item()
            pieces.append(piece)
        return loss, metrics.combine(pieces, "micro")

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
        """Sum of the weighted part losses over the micro-batch ``idx`` of the step's rows, from its passes:
        the reference's over its sampled rows and the anchor's (each once: cached), and the policy's."""
        full = len(idx) == len(rows)
        sub = rows if full else rows.select(idx)
        mine = parts if full else [dataclasses.replace(p, rows=p.rows[idx]) for p in parts]
        stats: dict[str, float] = {}
        out = self.forward(how, sub, mine, cache, stats)
        total, more = micro_loss(sub, mine, out, self.settings, norms, how.rollouts)
        return total, {**stats, **more}

    def forward(self, how: Passes, sub: Rows, parts: list[Part], cache: dict, stats: dict) -> PassOutputs:
        """The micro-batch's passes: the reference first (it may swap weights in place, which must not touch a
        live graph), the anchor and the registered passes (sasr.passes) the parts need, then the policy over
        every row."""
        device, T = self.accelerator.device, sub.completion_ids.size(1)
        on_rows = sub.sampled_rows().nonzero().squeeze(1)
        if how.reference and len(on_rows) and "ref" not in cache:
            with metrics.timer(stats, "reference_seconds", device):
                ref_rows = sub if len(on_rows) == len(sub) else sub.select(on_rows)
                with self.accelerator.autocast():
                    cache["ref"] = self.reference.logprobs(
                        ref_rows.input_ids, ref_rows.attention_mask, T, how.temperature
                    )  # [s, T] sampled rows
        needs = {p.name: PART_LOSSES[p.loss].passes(options(p, self.settings)) for p in parts}
        anchored = [p.rows for p in parts if ANCHOR in needs[p.name]]
        if anchored and ANCHOR not in cache:
            with metrics.timer(stats, "reference_seconds", device):
                cache[ANCHOR] = self.anchor(sub, torch.stack(anchored).any(0), how.temperature)
        asking = {n: p for p in parts for n in needs[p.name] if n != ANCHOR}  # pass -> a part that names it
        others = sorted(asking)
        for name in others:  # a method's own passes (sasr.passes), once per micro-batch
            if name not in cache:
                how_run = (
                    {"options": options(asking[name], self.settings)} if PASSES[name].reads_options else {}
                )
                with torch.no_grad():
                    cache[name] = PASSES[name].run(self, sub, how.temperature, **how_run)
        divergence = self.divergence(parts, cache)
        anchor, anchor_negentropy = cache.get(ANCHOR, (None, None))
        t_policy = metrics.now(device)
        # The G rows of a prompt share one pass over it (anchored_logprobs finds them).
        logps, entropy, cross, diverged = anchored_logprobs(
            self.model,
            sub.input_ids,
            sub.attention_mask,
            T,
            how.temperature,
            with_entropy=how.rollouts,
            anchor=anchor,
            divergence=divergence,
        )  # [b, T]
        if how.iterations > 1 and "old" not in cache:
            cache["old"] = logps.detach()  # pi_old: the weights that sampled the rollouts
        if how.rollouts:
            stats["policy_forward_seconds"] = metrics.now(device) - t_policy
        anchor_kl = None if cross is None else anchor_negentropy - cross  # [b, T] KL(pi_ref || pi)
        extra = {name: self.tokens_of(name, sub, cache) for name in others}
        return PassOutputs(logps, entropy, cache.get("ref"), cache.get("old"), anchor_kl, extra, diverged)

    def divergence(self, parts: list[Part], cache: dict) -> tuple[torch.Tensor, Any] | None:
        """The whole pass's distributions [b, T, V] and the TokenDivergence the parts ask of the policy pass
        (one per micro-batch), or None."""
        asked = {PART_LOSSES[p.loss].divergence(options(p, self.settings)) for p in parts} - {None}
        if len(asked) > 1:
            raise SasrError(f"the parts of one step ask for {len(asked)} divergences; one pass computes one")
        if not asked:
            return None
        (name, fn), *_ = asked
        return cache[name], fn

    @staticmethod
    def tokens_of(name: str, sub: Rows, cache: dict) -> torch.Tensor:
        """Pass ``name``'s per-token numbers [b, T]: a whole pass's log-probabilities of the completion tokens."""
        if not PASSES[name].whole:
            return cache[name]
        key = f"{name}:tokens"
        if key not in cache:  # its logits are over the temperature already
            cache[key], _ = selective_log_softmax(cache[name], sub.completion_ids)
        return cache[key]

    def anchor(
        self, sub: Rows, demo: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """ASFT's anchor for the micro-batch ``sub``: pi_ref's whole distribution q [b, T, V] at the completion
        positions of the rows ``demo`` [b] (the parts that need it), and sum q log q [b, T]; zero on the other
        rows, (None, None) when there are none."""
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

    # --- the optimizer states besides the run's (saved in checkpoints) ----------------------------------------

    def optimizer_states(self) -> dict[str, dict]:
        """The further optimizers' states, by name (sharded as they are under FSDP)."""
        return {n: fsdp.optimizer_state(self.model, o, self.sharded) for n, o in self.optimizers.items()}

    def load_optimizer_states(self, states: dict[str, dict]) -> None:
        for name, state in states.items():
            optimizer = self.optimizer_for(Apply(optimizer=name))
            fsdp.load_optimizer_state(self.model, optimizer, state, self.sharded)
