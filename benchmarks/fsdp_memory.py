"""Memory per process of FSDP against DDP: the same run, two processes each, launched with the shipped
accelerate configs (configs/accelerate/fsdp_cpu.yaml, ddp_cpu.yaml).

Each run logs, for every rank and step (``logging_ranks``), the MB of weights and optimizer state the rank
holds and its peak resident memory. The table gives both at the last step for each rank, and the last line the
ratios DDP / FSDP. Full fine-tuning (where sharding pays: weights, gradients and Adam's moments are all whole
on every DDP rank), SASR with an SFT step and a GRPO step, so the peak includes a rollout's gathered weights.

    python benchmarks/fsdp_memory.py                          # SmolLM2-135M-Instruct, the CPU setting
    python benchmarks/fsdp_memory.py --model tiny             # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def settings(a) -> dict[str, object]:
    return {
        "lora.enabled": "false",
        "logging_ranks": "true",
        "report_to": "none",
        "save_final": "false",
        "eval.before": "false",
        "eval.after": "false",
        "task.test_size": 0,
        "sft.batch_size": a.batch,
        "grpo.batch_size": 1,
        "grpo.num_generations": 4,
        "grpo.max_completion_length": a.tokens,
    }


def run(kind: str, a, out: Path) -> list[dict]:
    """Launch the run with ``kind``'s config; the last line of each rank's log."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / f"{kind}_cpu.yaml"),
        "-m",
        "sasr",
        "train",
        "--model",
        a.model,
        "--method",
        "sasr",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--quiet",
        "--output",
        str(out),
        *(x for key, value in settings(a).items() for x in ("--set", f"{key}={value}")),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, env=env, check=True)
    return [json.loads((out / "ranks" / f"rank{r}.jsonl").read_text().splitlines()[-1]) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4, help="SFT rows per rank")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per rollout")
    a = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("ddp", "fsdp"):
            rows[kind] = run(kind, a, Path(tmp) / kind)
    print(f"\n{a.model}, full fine-tuning, 2 processes (gloo), SFT then GRPO step")
    print("| run | rank | weights + optimizer state (MB) | peak resident (MB) |")
    print("| --- | --- | --- | --- |")
    for kind, ranks in rows.items():
        for r, line in enumerate(ranks):
            print(f"| {kind} | {r} | {line['state_mb']:.0f} | {line['peak_rss_mb']:.0f} |")
    state = rows["ddp"][0]["state_mb"] / rows["fsdp"][0]["state_mb"]
    peak = max(x["peak_rss_mb"] for x in rows["ddp"]) / max(x["peak_rss_mb"] for x in rows["fsdp"])
    print(f"DDP / FSDP per rank: weights + optimizer state {state:.2f}x, peak resident {peak:.2f}x")


if __name__ == "__main__":
    main()
