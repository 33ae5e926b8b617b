"""Training and evaluating a comparison's runs: each in this process, or several ``sasr train`` processes at
a time (``--jobs``); a stopped run continues from its checkpoint. Each ends in its summary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from sasr import checkpoint
from sasr.api import SASRTrainer
from sasr.config import TrainConfig, build_config, to_yaml
from sasr.errors import SasrError
from sasr.evaluate import evaluate_model
from sasr.experiments.plan import _untrained_config
from sasr.experiments.summaries import (
    EVAL_KEYS,
    _differences,
    _same_method_file,
    _write_summary,
    read_summary,
    summary_path,
)
from sasr.methods import method_source
from sasr.process import on_stop_signals
from sasr.run_dir import finished, read_lines, read_status


def _resumable(run_dir: Path, config: TrainConfig) -> bool:
    """A stopped run of ``config`` (bookkeeping aside) with a complete checkpoint: continue it rather than
    start over."""
    saved = run_dir / "config.yaml"
    if not checkpoint.complete_checkpoints(run_dir) or not saved.is_file():
        return False
    try:
        return not _differences(build_config(saved).model_dump(mode="json"), config.model_dump(mode="json"))
    except SasrError:  # an unreadable saved config: train again
        return False


def _train_in_parallel(configs: dict[str, TrainConfig], output: Path, jobs: int, progress: bool) -> None:
    """``sasr train`` for each pending run (name -> config), ``jobs`` processes at a time (a small model
    leaves a GPU mostly idle: several runs share it). Each run logs to runs/METHOD-sSEED.log.

    Each process gets its share of the CPU threads (unless OMP_NUM_THREADS is set): ``jobs`` processes of
    all threads each would oversubscribe the cores."""
    import torch

    runs = output / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    lanes = min(jobs, len(configs))
    env = {"OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // lanes)), **os.environ}

    live: set[subprocess.Popen] = set()
    stopped: list[str] = []

    def forward(name: str) -> None:  # each run saves a checkpoint and stops; compare then stops too
        stopped.append(name)
        for proc in list(live):
            proc.send_signal(signal.Signals[name])

    def one(name: str) -> tuple[str, int, Path]:
        config_file, log_file = runs / f"{name}.yaml", runs / f"{name}.log"
        if stopped:
            return name, -1, log_file
        config = configs[name]
        config_file.write_text(to_yaml(config))
        resume = _resumable(runs / name, config)
        # a resumed run keeps its saved configuration but for the bookkeeping compare sets
        keep = ["--set", "save_final=true", "--set", f"save_every={config.save_every}"]
        keep += ["--set", f"eval.every={config.eval.every}"]  # bookkeeping, as its summary will record it
        start = (
            ["--resume", str(runs / name), *keep] if resume else ["--config", str(config_file), "--overwrite"]
        )
        cmd = [sys.executable, "-m", "sasr", "train", *start, "--quiet"]
        with log_file.open("a" if resume else "w") as log:  # a continued run's log goes on
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
            live.add(proc)
            code = proc.wait()
            live.discard(proc)
        return name, code, log_file

    bar = tqdm(total=len(configs), desc=f"compare: {jobs} runs at a time", disable=not progress)
    failed = []
    try:
        with on_stop_signals(forward), ThreadPoolExecutor(jobs) as pool:
            for name, code, log_file in pool.map(one, configs):
                bar.update(1)
                if code > 0 and not stopped:
                    lines = log_file.read_text().strip().splitlines()
                    failed.append(
                        f"{name} (exit {code}: {lines[-1] if lines else 'no output'}; log {log_file})"
                    )
    finally:
        bar.close()
    if stopped:
        raise SasrError(
            f"sasr compare: stopped by {stopped[0]}; the runs in progress stopped too (their logs say where); "
            "re-running the same command continues each of them from its checkpoint"
        )
    if failed:
        raise SasrError("sasr compare: runs failed: " + "; ".join(failed))


def _untrained(base: TrainConfig, seed: int, output: Path, progress: bool, commit: str) -> dict:
    tree = _untrained_config(base, seed)
    path = summary_path(output, f"untrained-s{seed}")
    if summary := read_summary(path, tree, EVAL_KEYS):
        return summary
    started = time.perf_counter()
    evals = evaluate_model(base.model.name, base.model_copy(update={"seed": seed}), seed, progress)
    summary = {"commit": commit, "config": tree, "run": None, "metrics": [], "eval": evals}
    return _write_summary(path, {**summary, "eval_seconds": time.perf_counter() - started})


def _trained(config: TrainConfig, output: Path, progress: bool, commit: str) -> dict:
    """Train the run (or continue it) unless it finished, evaluate its final model, write its summary."""
    run_dir = Path(config.output_dir)
    tree = config.model_dump(mode="json")
    if finished(run_dir):
        diff = _differences(build_config(run_dir / "config.yaml").model_dump(mode="json"), tree)
        _same_method_file(read_status(run_dir), config.method, run_dir / "run.json")
        if diff:
            raise SasrError(
                f"run directory {run_dir} finished with another configuration ({'; '.join(diff[:3])}); "
                "delete it to train that run again"
            )
    else:
        resume = _resumable(run_dir, config)
        if progress:
            verb = "continuing" if resume else "training"
            print(f"sasr compare: {verb} {run_dir.name} -> {run_dir}", file=sys.stderr)
        SASRTrainer(args=config, overwrite=not resume, progress=progress).train(resume_from_checkpoint=resume)
    started = time.perf_counter()
    evals = evaluate_model(str(run_dir / "final"), config, config.seed, progress)
    status, metrics = read_status(run_dir), read_lines(run_dir)
    summary = {"commit": commit, "config": tree, "run": status, "metrics": metrics, "eval": evals}
    if source := method_source(config.method):  # a user's method file: refused once it changes
        summary["method_source"] = source
    summary["eval_seconds"] = time.perf_counter() - started
    return _write_summary(summary_path(output, run_dir.name), summary)
