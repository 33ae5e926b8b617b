"""Every number a step's line of ``metrics.jsonl`` holds: its name, how it combines, what it means.

A step is computed in pieces, and each metric says how its pieces make the step's number:

- over a step's micro-batches (``micro``) and over its ``num_iterations`` updates (``iterations``):
  ``sum`` (time spent, a part's share of the loss) or ``mean``;
- over processes (``ranks``): ``mean`` (of the ranks that have it), or ``sum`` (tokens).

Names of a family (one per loss part or reward function) are registered by their prefix. A method module
registers its own metrics (``register``). A reward function's ``log_metric`` may not take a registered name
(``rewards.Rewards`` refuses it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sasr.registry import Registry

if TYPE_CHECKING:  # the registry itself needs neither (sasr.rewards reads it)
    from accelerate import Accelerator

    from sasr.batch import Plan
    from sasr.learner import Update


@dataclass(frozen=True)
class Metric:
    """A metric and how its pieces make the step's number: over the step's micro-batches, its num_iterations
    updates, dynamic sampling's batches of prompts and the processes, each "sum", "mean", "first" or "-"
    (computed once for the whole step: the same on every process, or after their numbers were combined)."""

    name: str  # the key in metrics.jsonl; a family's ends with '/' or '_' and prefixes its members
    meaning: str
    micro: str = "-"
    iterations: str = "-"
    batches: str = "-"
    ranks: str = "-"


def _m(name: str, meaning: str, how: str = "-/-/-/-") -> Metric:
    """``how``: "micro/iterations/batches/ranks"."""
    micro, iterations, batches, ranks = how.split("/")
    return Metric(name, meaning, micro, iterations, batches, ranks)


PASS = "mean/mean/-/mean"  # a statistic of the training passes
ROLLOUTS = "-/-/-/mean"  # a statistic of the step's (chosen) rollouts
TIME = "sum/sum/-/mean"

METRICS: Registry[Metric] = Registry(
    "metric",
    "sasr.metrics.METRICS",
    "a metric: its meaning and how it combines over micro-batches, updates, sampling batches and processes "
    "(`metrics.register`)",
)


def register(name: str, meaning: str, how: str = "-/-/-/-") -> Metric:
    """Register a metric (a method module registers its own); ``how`` as ``_m`` takes it."""
    return METRICS.add(name, _m(name, meaning, how))


def register_all(entries: list[tuple[str, ...]]) -> None:
    """``register`` each (name, meaning) or (name, meaning, how)."""
    for entry in entries:
        register(*entry)


register_all(
    [
        # the loop
        ("step", "the optimizer step, from 1"),
        ("phase", "'sft' (demonstrations only), 'grpo' (rollouts only) or 'mixed' (both in one step)"),
        ("loss", "the step's loss (the first update's, with num_iterations)", "sum/first/-/mean"),
        ("grad_norm", "the global gradient norm before clipping (the first update's)", "-/first/-/-"),
        ("lr", "the learning rate the step used"),
        ("tokens", "completion tokens of the step's rows, every process", "-/-/-/sum"),
        (
            "trained_tokens",
            "completion tokens through a training pass: tokens x updates, + the probe's",
            "-/sum/-/sum",
        ),
        ("generated_tokens", "tokens sampled for the step, every process and batch", "-/-/sum/sum"),
        (
            "scored_tokens",
            "completion tokens a method's further forward pass read (a teacher's: sasr.passes), every process",
            "-/sum/-/sum",
        ),
        (
            "flops",
            "the step's compute: 6 N per trained token + 2 N per generated or scored token (N: parameters)",
        ),
        ("flops_total", "flops summed over the run's steps so far"),
        ("tokens_per_second", "tokens / step_seconds"),
        ("step_seconds", "wall seconds of the step (the main process's), evaluation and saving left out"),
        ("skipped", "true when the update was skipped: a non-finite loss or gradient norm"),
        ("num_iterations", "updates taken on the step's rollouts (written when above 1)"),
        ("probe_grad_norm", "SASR's probe: the SFT gradient norm on demonstrations, no update taken"),
        # the rollouts
        ("reward_mean", "mean reward of the step's rollouts (rows no function scored left out)", ROLLOUTS),
        ("reward_std", "standard deviation of those rewards", ROLLOUTS),
        ("accuracy", "share of rollouts the task's judge calls correct", ROLLOUTS),
        ("format_rate", "share of rollouts in the task's answer format", ROLLOUTS),
        ("completion_length", "mean rollout length in tokens", ROLLOUTS),
        (
            "completion_length_max",
            "the longest rollout (each training pass computes up to its group's)",
            ROLLOUTS,
        ),
        ("clipped_ratio", "share of rollouts cut at max_completion_length", ROLLOUTS),
        (
            "zero_spread_fraction",
            "share of prompts whose group's rewards are all equal (no advantage)",
            ROLLOUTS,
        ),
        ("overlong_penalty", "mean of DAPO's soft overlong penalty over the rollouts", "-/-/mean/mean"),
        (
            "dynamic_sampling_batches",
            "batches of prompts sampled to fill the step (dynamic sampling)",
            ROLLOUTS,
        ),
        ("rollout_seconds", "seconds spent sampling the step's rollouts", "-/-/sum/mean"),
        # the training passes
        ("reference_seconds", "seconds of the reference pass over the rollouts", TIME),
        ("policy_forward_seconds", "seconds of the policy's forward passes", TIME),
        ("kl", "k3 estimate of KL(policy || reference) over the rollouts", PASS),
        ("entropy", "mean token entropy of the policy on the rollouts", PASS),
        (
            "sampler_logprob_gap",
            "mean absolute gap of learner and sampler log-probabilities on rollouts",
            PASS,
        ),
        ("clip_fraction", "share of rollout tokens whose ratio was clipped", PASS),
        ("asft_kl", "sft.loss=asft: KL(pi_ref || pi) per demonstration token, whole vocabulary", PASS),
        # families
        ("loss/", "loss/PART: a part's loss, on steps of several parts", "sum/mean/-/mean"),
        ("weight/", "weight/PART: a part's weight, on steps of several parts", PASS),
        ("update/", "update/NAME/loss, /grad_norm, /lr: a later update of a step of several (Plan.updates)"),
        ("rewards/", "rewards/NAME/mean and /std: each reward function's values", "-/-/mean/mean"),
        ("eval_", "eval_METRIC: held-out greedy evaluation at eval.every (every process's questions)"),
    ]
)

_MEAN = Metric("", "", "mean", "mean", "mean", "mean")  # how a name sasr does not register combines


def families() -> tuple[str, ...]:
    """The registered families' prefixes (a name ending with '/' or '_')."""
    return tuple(name for name in METRICS if name.endswith(("/", "_")))


def metric(name: str) -> Metric | None:
    """The registered metric ``name`` is, by its own name or its family's prefix (None: not sasr's)."""
    if name in METRICS:
        return METRICS[name]
    family = next((f for f in families() if name.startswith(f)), None)
    return METRICS[family] if family else None


def batches_add(name: str) -> bool:
    """Whether ``name`` adds up over dynamic sampling's batches of prompts (time, tokens) or averages."""
    return (metric(name) or _MEAN).batches == "sum"


def combine(pieces: list[dict[str, float]], over: str) -> dict[str, float]:
    """A step's statistics from those of its pieces (``over``: "micro" for micro-batches, "iterations" for
    updates): summed metrics add up, the others average over the pieces that have a value. A piece without a
    value (a part with no rows in it) counts for nothing, not as 0. A name sasr does not register averages."""
    have: dict[str, int] = {}
    for piece in pieces:
        for name in piece:
            have[name] = have.get(name, 0) + 1
    total: dict[str, float] = {}
    for piece in pieces:
        for name, value in piece.items():
            known = metric(name)
            add = known is not None and getattr(known, over) == "sum"
            total[name] = total.get(name, 0.0) + (value if add else value / have[name])
    return total


def now(device: torch.device) -> float:
    """perf_counter once the device's queued work has finished, so differences time that work."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


@contextmanager
def timer(stats: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    """Time the block into ``stats[name]`` (a registered ``*_seconds`` metric)."""
    start = now(device)
    yield
    stats[name] = now(device) - start


def record(
    acc: Accelerator,
    plan: Plan,
    update: Update,
    stats: dict[str, float],
    seconds: float,
    parameters: int,
    flops_before: float,
    probe: float | None = None,
) -> dict[str, Any]:
    """A step's metrics line: its plan's keys (``Plan.info``), the first update's loss, gradient norm and rate,
    ``stats`` combined over ranks, the step's FLOPs (``parameters``: N; ``flops_before``: the run's so far),
    the probe's gradient norm, and whether the update was skipped."""
    from accelerate.utils import gather_object

    # Mean of each statistic over ranks. The plan, and so sasr's own keys, is the same on every rank; a
    # reward function's log_metric may name a number on some ranks only: the mean over those that have it.
    keys = sorted(stats)
    if acc.num_processes > 1:
        keys = sorted({k for ks in gather_object([keys]) for k in ks})
    values = torch.tensor(
        [update.loss, *(stats.get(k, math.nan) for k in keys)], device=acc.device, dtype=torch.float64
    )
    if acc.num_processes > 1:
        have = (~values.isnan()).double()
        totals = acc.reduce(torch.cat([values.nan_to_num(0.0) * have, have]), reduction="sum")
        n = len(values)
        values = (totals[:n] / totals[n:]).tolist()  # NaN where no rank has the key
    else:
        values = values.tolist()
    summed = {
        k: v * acc.num_processes for k, v in zip(keys, values[1:]) if (metric(k) or _MEAN).ranks == "sum"
    }
    tokens = summed.pop("tokens")
    line = {
        "step": plan.step,
        "phase": plan.phase,
        "loss": values[0],
        "grad_norm": update.grad_norm,
        "lr": update.lr,
        **{k: v for k, v in zip(keys, values[1:]) if k != "tokens" and k not in summed},
        **plan.info,
        **{k: round(v) for k, v in summed.items()},
        "tokens": round(tokens),
        "tokens_per_second": tokens / seconds,
        "step_seconds": seconds,
    }
    generated, scored = line.get("generated_tokens", 0), line.get("scored_tokens", 0)
    line["flops"] = flops(parameters, line["trained_tokens"], generated, scored)
    line["flops_total"] = flops_before + line["flops"]
    if probe is not None:
        line["probe_grad_norm"] = probe
    if not update.finite:
        line["skipped"] = True
    return line


def flops(parameters: int, trained_tokens: float, generated_tokens: float, scored_tokens: float = 0) -> float:
    """A step's compute as the 2026 re-evaluation of mixed-policy methods counts it (arXiv 2604.23747): a
    forward and backward pass costs 6 N per token, sampling 2 N per token; a method's further forward pass (a
    teacher's) 2 N per token it reads."""
    return 6.0 * parameters * trained_tokens + 2.0 * parameters * (generated_tokens + scored_tokens)


def postfix(line: dict[str, Any]) -> dict[str, str]:
    """What the progress bar shows of a step's line."""
    out = {"phase": line["phase"], "loss": f"{line['loss']:.3f}"}
    if "p_t" in line:
        out["p_t"] = f"{line['p_t']:.2f}"
    if "reward_mean" in line:
        out["reward"] = f"{line['reward_mean']:.2f}"
        out["acc"] = f"{line['accuracy']:.2f}"
    return out


def table() -> str:
    """The metrics as a markdown table (docs/guide.md holds it; a test keeps the two equal)."""
    lines = [
        "| metric | what it is | micro-batches / updates / sampling batches / processes |",
        "| --- | --- | --- |",
    ]
    for m in METRICS.values():
        key = f"{m.name}NAME" if m.name in families() else m.name
        lines.append(f"| `{key}` | {m.meaning} | {m.micro} / {m.iterations} / {m.batches} / {m.ranks} |")
    return "\n".join(lines)
