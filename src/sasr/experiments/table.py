"""results.json's content, assembled from the summaries alone: per method its budget and the mean ± std over
seeds of every metric, SASR's paired differences, and where the comparison's time went."""

from __future__ import annotations

import statistics
from typing import Any

from sasr.config import TrainConfig
from sasr.experiments.labels import is_included
from sasr.experiments.stats import paired_bootstrap
from sasr.tasks import get_task

METRICS = ("accuracy", "pass@{k}", "maj@{k}", "distinct_2", "edit_distance", "distinct_answers")
BUDGET = ("sft_steps", "grpo_steps", "mixed_steps", "tokens", "flops", "seconds")
BASELINE = "sasr"  # the method compared with every other one, pairwise


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean_std_known(values: list[float | None]) -> tuple[float, float] | tuple[None, None]:
    """_mean_std, or (None, None) if any value is unknown."""
    return (None, None) if any(v is None for v in values) else _mean_std(values)


def _budget(summary: dict) -> dict[str, float | None]:
    """Steps of each kind, completion tokens trained on, FLOPs (None for a run from before sasr counted
    them), wall seconds."""
    run, lines = summary["run"] or {}, summary["metrics"]
    tokens = sum(r.get("tokens", r["tokens_per_second"] * r["step_seconds"]) for r in lines)
    flops = sum(r["flops"] for r in lines) if all("flops" in r for r in lines) else None
    return {
        **{k: float(run.get(k, 0)) for k in BUDGET if k not in ("tokens", "flops", "seconds")},
        "tokens": float(tokens),
        "flops": flops,
        "seconds": float(run.get("seconds", 0.0)),
    }


def assemble(
    base: TrainConfig, methods: list[str], seeds: list[int], summaries: dict, command: str | None = None
) -> dict[str, Any]:
    """results.json's content, from the summaries alone: per method its budget and, per split, the mean ±
    std over seeds of every metric; for SASR against every other method, the paired accuracy difference.

    A method is taken over the seeds it has a summary of (all of ``seeds`` once a comparison has finished;
    a method with none is left out), and SASR against a method over the seeds both have."""
    k = base.eval.samples
    task = get_task(base.task.name, **base.task.options())
    has = {m: [s for s in seeds if (m, s) in summaries] for m in ["untrained", *methods]}
    names = [m for m, landed in has.items() if landed]
    splits = list(summaries["untrained", has["untrained"][0]]["eval"])
    wanted = [m.format(k=k) for m in METRICS] if k else ["accuracy", "format_rate", "completion_length"]
    out_methods = {}
    for m in names:
        runs = [summaries[m, s] for s in has[m]]
        budgets = [_budget(r) for r in runs]
        out_methods[m] = {
            "seeds": has[m],
            "budget": {b: _mean_std_known([x[b] for x in budgets]) for b in BUDGET},
            "splits": {
                split: {
                    name: _mean_std([r["eval"][split]["summary"][name] for r in runs])
                    for name in wanted
                    if name in runs[0]["eval"][split]["summary"]
                }
                for split in splits
            },
            "per_seed": [
                {"seed": s, **b, **{split: r["eval"][split]["summary"] for split in splits}}
                for s, r, b in zip(has[m], runs, budgets)
            ],
            "commits": sorted({r["commit"] for r in runs}),
        }
    paired: dict[str, dict[str, dict]] = {}
    if BASELINE in names:
        both = {m: [s for s in has[BASELINE] if s in has[m]] for m in names if m != BASELINE}
        for split in splits:

            def correct(m: str, seeds: list[int], split: str = split) -> list[list[float]]:
                return [[x["correct"] for x in summaries[m, s]["eval"][split]["records"]] for s in seeds]

            paired[split] = {
                m: {"seeds": common, **paired_bootstrap(correct(BASELINE, common), correct(m, common))}
                for m, common in both.items()
                if common
            }
    e = base.eval
    # where this comparison's time went: an included run's time is its own folder's
    own = [x for (m, _), x in summaries.items() if not is_included(m)]
    timed = [x["run"] for x in own if "eval_seconds" in x and x["run"]]
    return {
        "command": command or "(Python API) sasr.experiments.compare.compare",
        "task": base.task.name,
        "model": base.model.name,
        "steps": base.steps,
        "warmup_steps": base.warmup_steps,
        "max_flops": base.max_flops,
        "seeds": seeds,
        "samples": k,
        "sample_size": e.sample_size,
        "splits": {
            split: {
                "n": summaries["untrained", has["untrained"][0]]["eval"][split]["summary"]["n"],
                "shift": task.shifts.get(split, ""),
            }
            for split in splits
        },
        "methods": out_methods,
        "not_landed": [m for m in methods if m not in out_methods],
        "paired": {"baseline": BASELINE, "metric": "accuracy", "level": 0.95, "splits": paired},
        "time": {  # where the comparison's time went (evaluation timed by summaries that record it)
            "train_seconds": sum(
                r["budget"]["seconds"][0] * len(r["seeds"])
                for m, r in out_methods.items()
                if not is_included(m)
            ),
            "eval_seconds": sum(x.get("eval_seconds", 0.0) for x in own),
            "eval_timed": sum("eval_seconds" in x for x in own),
            "runs": len(own),
            # training seconds of the runs whose evaluation was timed: the share over those runs alone
            "timed_train_seconds": sum(r.get("seconds") or 0.0 for r in timed),
            # runs trained side by side (--jobs N) share the wall clock: count the time any of them trained
            "timed_train_wall_seconds": wall_seconds(timed),
            "most_at_once": most_at_once(timed),
        },
    }


def wall_seconds(runs: list[dict]) -> float:
    """Seconds in which any of ``runs`` (their run.json) was training: the union of their segments, so runs
    trained side by side count once. Seconds a run's segments do not cover (sasr before 0202e1e kept none, and
    a run resumed from such a checkpoint lacks its first ones) count as if trained alone."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(tuple(s) for r in runs for s in r.get("segments", [])):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    uncovered = (
        (r.get("seconds") or 0.0) - sum(max(0.0, b - a) for a, b in r.get("segments", [])) for r in runs
    )
    return total + sum(max(0.0, x) for x in uncovered)


def most_at_once(runs: list[dict]) -> int:
    """The most of ``runs`` that were training at the same moment (by their segments; 1 without any)."""
    events = sorted((t, d) for r in runs for a, b in r.get("segments", []) for t, d in ((a, 1), (b, -1)))
    now = most = 0
    for _, d in events:  # an end sorts before a start at the same time: touching stretches do not overlap
        now += d
        most = max(most, now)
    return max(most, 1)


def _untrained_accuracy(summaries: dict[tuple[str, int], dict], seeds: list[int]) -> float | None:
    """The untrained model's held-out (test) greedy accuracy, the mean over the seeds evaluated."""
    evals = [summaries["untrained", s].get("eval", {}) for s in seeds if ("untrained", s) in summaries]
    found = [e["test"]["summary"]["accuracy"] for e in evals if "test" in e]
    return statistics.fmean(found) if found else None
