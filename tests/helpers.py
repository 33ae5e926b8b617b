"""What several test files share: the `tiny` config, reading a run directory, launching processes (two gloo
ranks, `accelerate launch`), and writing a reward module."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

# Before anything imports huggingface_hub (conftest imports this module first).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "TRACKIO_DIR" not in os.environ:  # not the user's store; removed when the tests end
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="sasr-tests-trackio-")
    atexit.register(shutil.rmtree, os.environ["TRACKIO_DIR"], ignore_errors=True)
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}  # subprocesses: offline, always

TINY = {
    "model": {"name": "tiny"},
    "task": {"name": "arithmetic", "train_size": 64, "test_size": 4},
    "sft": {"batch_size": 2},
    "grpo": {"batch_size": 2, "num_generations": 4, "max_completion_length": 12},
    "eval": {"max_new_tokens": 12},
    "report_to": ["none"],
}


# The same small runs on the command line: `sasr train *TINY_ARGS ...` (2 rollouts of 8 tokens, 2 questions).
TINY_ARGS = [
    "--model",
    "tiny",
    "--quiet",
    *("--set", "grpo.num_generations=2", "--set", "grpo.max_completion_length=8"),
    *("--set", "eval.max_new_tokens=8", "--set", "task.test_size=2", "--set", "sft.batch_size=2"),
    *("--set", "report_to=none"),
]


def tiny_config(output_dir, **top) -> dict:
    """The TINY config with top-level keys and whole sections replaced (sections are merged one level)."""
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    cfg["output_dir"] = str(output_dir)
    return cfg


# --- a run directory ----------------------------------------------------------------------------------------


def read_metrics(run: Path, timings: bool = True) -> list[dict]:
    """The run's metrics lines; without ``timings``, every number that measures time left out."""
    from sasr.run_dir import read_lines

    rows = read_lines(run)
    if timings:
        return rows
    return [
        {k: v for k, v in r.items() if k != "tokens_per_second" and not k.endswith("_seconds")} for r in rows
    ]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def assert_same_run(a: Path, b: Path) -> None:
    """The same metrics (timings aside) and bit-identical final weights."""
    assert read_metrics(a, timings=False) == read_metrics(b, timings=False)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] == wb[k]).all(), f"{k} differs"


# --- processes ----------------------------------------------------------------------------------------------


def launched(config: str) -> list[str]:
    """The command `sasr train` under `accelerate launch` with configs/accelerate/CONFIG.yaml (ddp_cpu:
    two gloo processes, fsdp_cpu: two FSDP processes), as docs/guide.md launches it."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    return [*launcher, str(ACCELERATE_CONFIGS / f"{config}.yaml"), "-m", "sasr", "train"]


def accelerate_launch(config: str, *argv: str, **popen) -> subprocess.Popen:
    """`sasr train ARGV` launched as ``launched(config)`` says, from the repository's root."""
    return subprocess.Popen([*launched(config), *argv], env=ENV, cwd=ROOT, **popen)


def launch_many(
    config: str, steps: list[dict], folder: Path, timeout: float = 900
) -> subprocess.CompletedProcess:
    """``steps`` (tests/launch_many.py: `sasr train` argv lists, run directory copies) run by one
    `accelerate launch` with configs/accelerate/CONFIG.yaml; its output captured."""
    plan = Path(folder) / "launch_many.json"
    plan.write_text(json.dumps(steps))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    script = [str(ACCELERATE_CONFIGS / f"{config}.yaml"), str(ROOT / "tests" / "launch_many.py"), str(plan)]
    return subprocess.run([*launcher, *script], env=ENV, capture_output=True, text=True, timeout=timeout)


def two_gloo_ranks(target, tmp_path, timeout: float = 180.0) -> list:
    """Run ``target(rank, init, out)`` in two spawned processes that meet over gloo (``init``: the
    init_method); fail if they deadlock or either fails. Returns what each rank saved to ``out/rank{rank}.pt``."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=target, args=(r, init, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout  # about 10 s when it works
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, "the two ranks deadlocked"
    assert [p.exitcode for p in procs] == [0, 0]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


# --- reward functions ---------------------------------------------------------------------------------------


def reward_module(folder: Path, source: str, name: str = "myrewards") -> Path:
    """A reward module NAME.py in ``folder`` holding ``source`` (dedented); its path, as ``--reward PATH:fn``
    takes it."""
    path = Path(folder) / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path
