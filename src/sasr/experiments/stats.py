"""Paired statistics for a comparison: every method is scored on the same held-out examples of each seed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def paired_bootstrap(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Mean of a - b over seeds and examples, with a two-level bootstrap percentile interval.

    ``a[s][i]`` and ``b[s][i]`` are two methods' scores on example i of seed s (the same example for both).
    Each bootstrap replicate draws the seeds with replacement, then, independently for every seed drawn,
    that seed's examples with replacement (so the interval holds both the training noise between seeds and
    the sampling noise of a finite test set); the statistic is the mean over the drawn seeds of the mean
    paired difference. Returns ``mean``, ``low``, ``high`` and ``clear_of_zero`` (the interval excludes 0).
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap needs the same seeds on both sides, got {len(a)} and {len(b)}")
    diffs = []
    for s, (x, y) in enumerate(zip(a, b)):
        if len(x) != len(y) or not len(x):
            raise ValueError(f"seed {s}: {len(x)} and {len(y)} scores; paired scores need the same examples")
        diffs.append(np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64))
    rng = np.random.default_rng(seed)
    n_seeds = len(diffs)
    picked = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # [n_boot, S]: the seeds of each replicate
    means = np.empty((n_boot, n_seeds))
    for s, d in enumerate(diffs):
        rows, slots = np.nonzero(picked == s)  # every slot that drew seed s gets its own example resample
        draws = rng.integers(0, len(d), size=(len(rows), len(d)))
        means[rows, slots] = d[draws].mean(1)
    replicates = means.mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    mean = float(np.mean([d.mean() for d in diffs]))
    return {
        "mean": mean,
        "low": float(low),
        "high": float(high),
        "clear_of_zero": bool(low > 0 or high < 0),
    }
