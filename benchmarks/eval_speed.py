"""Evaluation's speed: a comparison run's evaluation of its final model (each split: greedy answers, and K
samples of the first questions), with the shared-prefix prefill (``eval.share_prefix``, the default) against
the plain prefill, on the same weights after a warm-up evaluation. Each mode runs ``--repeats`` times in
alternating order (plain, shared, shared, plain, ...), since this machine's timings drift by tens of percent
between runs; the table gives each run's seconds, the tokens the model computed (prompt tokens prefilled and
rows decoded, which do not drift), and whether the records are the same as the plain prefill's (they may
differ where rounding breaks a near-tie). The last line gives the plain prefill's over the shared prefix's.

    python benchmarks/eval_speed.py --model runs/compare-arithmetic/runs/sasr-s3
    python benchmarks/eval_speed.py --model smollm2-135m --config configs/compare_arithmetic.yaml --n 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from sasr import models
from sasr.config import build_config
from sasr.eval.evaluate import evaluate, settings, summarise
from sasr.rollout.engine import RolloutEngine
from sasr.tasks import get_task

MODES = {"plain prefill": False, "shared prefix": True}


def counting_tokens() -> dict[str, int]:
    """Sums of the engine's per-decode counts of prefilled prompt tokens and decoded rows, from now on."""
    counts = {"prefill_tokens": 0, "row_steps": 0}
    decode = RolloutEngine.decode

    def counted(engine, *args, **kwargs):
        out = decode(engine, *args, **kwargs)
        for key in counts:
            counts[key] += engine.stats[key]
        return out

    RolloutEngine.decode = counted
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a run directory (its final/ and config), alias or folder")
    ap.add_argument("--config", help="YAML of the task and eval settings (default: the run's config.yaml)")
    ap.add_argument("--n", type=int, help="questions per split (default: the config's task.test_size)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode (default 2)")
    a = ap.parse_args()
    run = Path(a.model)
    is_run = (run / "config.yaml").is_file() and (run / "final").is_dir()
    overrides = {"model.name": str(run / "final") if is_run else a.model, "task.test_size": a.n}
    config = build_config(a.config or (run / "config.yaml" if is_run else None), overrides, [])
    task = get_task(config.task.name, **config.task.options())
    tokenizer = models.load_tokenizer(config.model.name)
    model = models.load_model(config.model.name, config.model.dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    warm = task.examples(task.held_out_splits[0], 8, seed=config.seed)  # oneDNN and allocator warm-up
    evaluate(model, tokenizer, task, warm, progress=False, **settings(config))
    counts = counting_tokens()
    print(
        f"{config.model.name}: {config.task.name}, seed {config.seed}, {config.task.test_size} questions per split"
    )
    print(
        "| split | prefill | seconds | prompt tokens prefilled | rows decoded | accuracy | same records as plain |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    best = dict.fromkeys(MODES, 0.0)
    for split in task.held_out_splits:
        examples = task.examples(split, config.task.test_size, seed=config.seed)
        seconds: dict[str, list[float]] = {m: [] for m in MODES}
        records, tokens = {}, {}
        for r in range(a.repeats):
            for mode in list(MODES)[:: 1 if r % 2 == 0 else -1]:
                set_seed(config.seed)
                counts.update(dict.fromkeys(counts, 0))
                start = time.perf_counter()
                records[mode] = evaluate(
                    model,
                    tokenizer,
                    task,
                    examples,
                    progress=False,
                    **{**settings(config), "share_prefix": MODES[mode]},
                )
                seconds[mode].append(time.perf_counter() - start)
                tokens[mode] = dict(counts)
        for mode in MODES:
            best[mode] += min(seconds[mode])
            runs = ", ".join(f"{t:.1f}" for t in seconds[mode])
            accuracy = summarise(records[mode])["accuracy"]
            same = records[mode] == records["plain prefill"]
            print(
                f"| {split} | {mode} | {runs} (median {statistics.median(seconds[mode]):.1f}) | "
                f"{tokens[mode]['prefill_tokens']:,} | {tokens[mode]['row_steps']:,} | {accuracy:.3f} | {same} |"
            )
    ratio = best["plain prefill"] / best["shared prefix"]
    print(f"plain prefill / shared prefix, the fastest run of each, all splits: {ratio:.2f}x")


if __name__ == "__main__":
    main()
