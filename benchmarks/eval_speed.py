"""Evaluation's speed: a comparison run's evaluation of its final model (each split: greedy answers, and K
samples of the first questions), with the shared-prefix prefill (``eval.share_prefix``, the default) against
the plain prefill, on the same weights after a warm-up evaluation. Each mode runs ``--repeats`` times in
alternating order (plain, shared, shared, plain, ...), since this machine's timings drift by tens of percent
between runs; the table gives each run's seconds, the tokens the model computed (prompt tokens prefilled and
rows decoded, which do not drift), the page faults, and whether the records are the same as the plain
prefill's (they may differ where rounding breaks a near-tie). With both modes, the last line gives the plain
prefill's over the shared prefix's. Like the ``sasr`` command, it keeps freed memory
(``sasr.process.keep_freed_memory``); ``--malloc system`` leaves glibc's malloc as it is, to measure that
setting by running the script both ways.

    python benchmarks/eval_speed.py --model runs/compare-arithmetic/runs/sasr-s3
    python benchmarks/eval_speed.py --model smollm2-135m --config configs/compare_arithmetic.yaml --n 64
    python benchmarks/eval_speed.py --model runs/compare-arithmetic/runs/sasr-s3 --prefill shared --malloc system
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from sasr import models
from sasr.checkpoint import is_run_dir
from sasr.config import build_config
from sasr.evaluate import evaluate, settings, summarise
from sasr.process import keep_freed_memory
from sasr.rollout.engine import RolloutEngine
from sasr.tasks import get_task

MODES = {"plain prefill": "plain", "shared prefix": "shared"}


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
    ap.add_argument(
        "--prefill", choices=["both", *MODES.values()], default="both", help="modes (default both)"
    )
    ap.add_argument(
        "--malloc",
        choices=["kept", "system"],
        default="kept",
        help="kept: keep freed memory (default); system: glibc's defaults",
    )
    a = ap.parse_args()
    if a.malloc == "kept" and not keep_freed_memory():
        ap.error("--malloc kept needs glibc's malloc (Linux): use --malloc system")
    modes = [m for m, key in MODES.items() if a.prefill in ("both", key)]
    run = Path(a.model)
    is_run = is_run_dir(run)
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
        f"{config.model.name}: {config.task.name}, seed {config.seed}, {config.task.test_size} questions per split, "
        f"malloc {a.malloc}"
    )
    print(
        "| split | prefill | seconds | prompt tokens prefilled | rows decoded | page faults (last run) | accuracy "
        "| same records as plain |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    best = dict.fromkeys(modes, 0.0)
    for split in task.held_out_splits:
        examples = task.examples(split, config.task.test_size, seed=config.seed)
        seconds: dict[str, list[float]] = {m: [] for m in modes}
        records, tokens, faults = {}, {}, {}
        for r in range(a.repeats):
            for mode in modes[:: 1 if r % 2 == 0 else -1]:
                set_seed(config.seed)
                counts.update(dict.fromkeys(counts, 0))
                start, faulted = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                records[mode] = evaluate(
                    model,
                    tokenizer,
                    task,
                    examples,
                    progress=False,
                    **{**settings(config), "share_prefix": MODES[mode] == "shared"},
                )
                seconds[mode].append(time.perf_counter() - start)
                faults[mode] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted
                tokens[mode] = dict(counts)
        for mode in modes:
            best[mode] += min(seconds[mode])
            runs = ", ".join(f"{t:.1f}" for t in seconds[mode])
            accuracy = summarise(records[mode])["accuracy"]
            same = records[mode] == records["plain prefill"] if "plain prefill" in records else "-"
            print(
                f"| {split} | {mode} | {runs} (median {statistics.median(seconds[mode]):.1f}) | "
                f"{tokens[mode]['prefill_tokens']:,} | {tokens[mode]['row_steps']:,} | {faults[mode]:,} | "
                f"{accuracy:.3f} | {same} |"
            )
    print("the fastest run of each mode, all splits: " + ", ".join(f"{m} {t:.1f} s" for m, t in best.items()))
    if len(best) == 2:
        print(f"plain prefill / shared prefix: {best['plain prefill'] / best['shared prefix']:.2f}x")


if __name__ == "__main__":
    main()
