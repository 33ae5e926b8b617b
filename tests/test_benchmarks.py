"""Every benchmark runs on `tiny` for one step, so none can rot unnoticed (their numbers are in
docs/performance.md, measured on real models; nothing here is timed)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return proc.stdout


def test_steps_times_trainer_step_against_trl_for_each_kind_of_step():
    out = bench(
        "steps.py",
        "--model",
        "tiny",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--tokens",
        "8",
        "--prompts",
        "2",
        "--generations",
        "2",
        "--sft-batch",
        "2",
    )
    for kind in ("SFT", "GRPO", "SDFT"):
        ratio = re.search(
            rf"^{kind} step: TRL / sasr time ([0-9.]+)x, peak memory TRL / sasr ([0-9.]+)x$", out, re.M
        )
        assert ratio and float(ratio.group(1)) > 0 and float(ratio.group(2)) > 0, out
    # sasr's GRPO step is broken down into the pieces its metrics line times
    assert re.search(r"of which .*rollout [0-9.]+ s.*rest [0-9.]+ s", out), out
    assert re.search(r"^rollout sasr eager +rows +4: +[0-9]+ tok/s", out, re.M), out


def test_eval_speed_compares_the_two_prefills_on_the_same_records():
    out = bench(
        "eval_speed.py",
        "--model",
        "tiny",
        "--config",
        str(ROOT / "configs" / "compare_arithmetic.yaml"),
        "--n",
        "2",
        "--repeats",
        "1",
    )
    assert re.search(r"^plain prefill / shared prefix: [0-9.]+x$", out, re.M), out
    assert out.count("| True |") == 6, out  # both prefills, all three splits: the same records


def test_fsdp_memory_gives_each_ranks_share_under_both_launchers():
    out = bench("fsdp_memory.py", "--model", "tiny")
    ratio = re.search(r"^DDP / FSDP per rank: weights \+ optimizer state ([0-9.]+)x", out, re.M)
    assert ratio and float(ratio.group(1)) > 1.5, out  # two ranks: each FSDP rank holds about half
