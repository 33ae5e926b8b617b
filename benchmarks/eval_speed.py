"""Evaluation's speed: a comparison recipe's evaluation of one model (each split: greedy answers, and K samples
of the first questions), with the shared-prefix prefill (``eval.share_prefix``, the default) against the plain
prefill, one after the other on the same weights after a warm-up evaluation. The table says whether each
evaluation's records are the same as the plain prefill's (they may differ where rounding breaks a near-tie);
the last line gives the plain prefill's seconds over each other's.

    python benchmarks/eval_speed.py --model runs/compare-arithmetic/runs/sasr-s3 --config configs/compare_arithmetic.yaml
    python benchmarks/eval_speed.py --model smollm2-135m --config configs/compare_arithmetic.yaml --n 64 --hf
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from sasr import models
from sasr.config import build_config
from sasr.eval.evaluate import evaluate, settings, summarise
from sasr.tasks import get_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="alias, model folder, or run directory (uses DIR/final)")
    ap.add_argument("--config", required=True, help="the comparison's YAML: its task and eval settings")
    ap.add_argument("--n", type=int, help="questions per split (default: the config's task.test_size)")
    ap.add_argument("--hf", action="store_true", help="also transformers' generate (the hf backend)")
    a = ap.parse_args()
    folder = Path(a.model) / "final" if (Path(a.model) / "final").is_dir() else Path(a.model)
    overrides = {"model.name": str(folder) if folder.is_dir() else a.model, "task.test_size": a.n}
    config = build_config(a.config, overrides, [])
    task = get_task(config.task.name, **config.task.options())
    tokenizer = models.load_tokenizer(config.model.name)
    model = models.load_model(config.model.name, config.model.dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    warm = task.examples(task.held_out_splits[0], 8, seed=config.seed)  # oneDNN and allocator warm-up
    evaluate(model, tokenizer, task, warm, progress=False, **settings(config))
    modes = {"plain prefill": {"share_prefix": False}, "shared prefix": {"share_prefix": True}}
    if a.hf:
        modes["transformers generate"] = {"backend": "hf"}
    print(f"{config.model.name}: {config.task.name}, {config.task.test_size} questions per split")
    print(
        "| split | evaluation | seconds | accuracy | pass@k | same records as plain |\n| --- | --- | --- | --- | --- | --- |"
    )
    totals: dict[str, float] = {}
    for split in task.held_out_splits:
        examples = task.examples(split, config.task.test_size, seed=config.seed)
        plain = None
        for mode, options in modes.items():
            set_seed(config.seed)
            start = time.perf_counter()
            records = evaluate(
                model, tokenizer, task, examples, progress=False, **{**settings(config), **options}
            )
            seconds = time.perf_counter() - start
            totals[mode] = totals.get(mode, 0.0) + seconds
            plain = plain or records
            s = summarise(records)
            k = f"pass@{config.eval.samples}"
            print(
                f"| {split} | {mode} | {seconds:.1f} | {s['accuracy']:.3f} | {s.get(k, float('nan')):.3f} | {records == plain} |"
            )
    base = totals["plain prefill"]
    others = ", ".join(f"{m} {base / t:.2f}x" for m, t in totals.items() if m != "plain prefill")
    print(f"plain prefill's seconds over each other's, all splits: {others}")


if __name__ == "__main__":
    main()
