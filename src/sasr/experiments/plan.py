"""Which runs a comparison needs: each (method, seed)'s configuration, the order they can train in, the SFT
steps a method takes from another's runs, and the configuration the untrained model is evaluated with."""

from __future__ import annotations

import statistics
from pathlib import Path

from sasr.config import TrainConfig
from sasr.methods import METHODS, method_class


def run_config(
    base: TrainConfig, method: str, seed: int, run_dir: Path, sft_steps: int | None = None
) -> TrainConfig:
    """One run of the comparison. Compare evaluates each final model (and the untrained one) on every
    held-out split itself, so the trainer's own evaluations before and after are off, and the final model
    is always saved.

    A method with ``sft_budget_from`` (``sft-then-grpo``: SASR) gets ``sft_steps`` SFT steps, the mean over
    seeds of that method's SFT steps (an equal SFT budget), unless the configuration sets its own.
    """
    no_eval = base.eval.model_copy(update={"before": False, "after": False})
    tree = base.model_copy(
        update={
            "method": method,
            "seed": seed,
            "output_dir": str(run_dir),
            "eval": no_eval,
            "save_final": True,
        }
    ).model_dump()
    cls = method_class(method)
    if sft_steps is not None and cls.sft_budget_from:
        tree[cls.name] = cls.with_sft_steps(base.method_options(method), sft_steps)
    return TrainConfig.model_validate(tree)  # re-check (e.g. warm-up vs steps)


def _waves(methods: list[str]) -> list[list[str]]:
    """Methods in the order their runs can train: a method after the one whose SFT steps it takes."""
    first = [m for m in methods if METHODS[m].sft_budget_from not in methods]
    return [first, [m for m in methods if m not in first]]


def _sft_budget(method: str, summaries: dict[tuple[str, int], dict], seeds: list[int]) -> int | None:
    """The SFT steps ``method`` gets: the mean over seeds of its source method's, once all have finished."""
    source = METHODS[method].sft_budget_from
    if not source or any((source, s) not in summaries for s in seeds):
        return None
    return round(statistics.fmean(summaries[source, s]["run"]["sft_steps"] for s in seeds))


def _needs_budget(base: TrainConfig, method: str, methods: list[str]) -> bool:
    """Whether ``method``'s runs take their SFT steps from another method's summaries in this comparison
    (not when that method is not compared, nor when the configuration sets the steps by hand)."""
    source, options = METHODS[method].sft_budget_from, base.method_options(method)
    return source in methods and METHODS[method].with_sft_steps(options, 1) != options


def _untrained_config(base: TrainConfig, seed: int) -> dict:
    """The configuration an evaluation of the untrained model is recorded with."""
    return base.model_copy(update={"seed": seed}).model_dump(mode="json")
