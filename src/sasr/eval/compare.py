"""``sasr compare``: every method with the same budget, data and seeds, evaluated the same way.

Layout of DIR: ``runs/METHOD-sSEED/`` (a normal run directory each; its ``run.json`` holds the evaluation
after training), ``runs/untrained-sSEED/eval.json``, ``results.json``, ``results.md`` and the plots.
Re-running skips the runs and evaluations that already finished, and continues a stopped run (same
configuration, a complete checkpoint) from its newest checkpoint instead of training it again.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sasr import checkpoint, models
from sasr.config import TrainConfig, build_config, to_yaml
from sasr.errors import SasrError
from sasr.eval.evaluate import evaluate, settings, summarise
from sasr.eval.report import markdown_table, plot_compare
from sasr.methods import METHODS
from sasr.process import on_stop_signals
from sasr.tasks import get_task
from sasr.trainer import Trainer

METRICS = ("accuracy", "pass@{k}", "maj@{k}", "distinct_2", "edit_distance", "distinct_answers")
STEP_KEYS = ("sft_steps", "grpo_steps", "mixed_steps")


def _finished(run_dir: Path) -> bool:
    status = run_dir / "run.json"
    return status.exists() and json.loads(status.read_text()).get("status") == "finished"


def _resumable(run_dir: Path, config: TrainConfig) -> bool:
    """A stopped run of exactly ``config`` with a complete checkpoint: continue it rather than start over."""
    saved = run_dir / "config.yaml"
    if not checkpoint.complete_checkpoints(run_dir) or not saved.is_file():
        return False
    try:
        return build_config(saved).model_dump(mode="json") == config.model_dump(mode="json")
    except SasrError:  # an unreadable saved config: train again
        return False


def evaluate_model(model_path: str, config: TrainConfig, seed: int, progress: bool = True) -> dict:
    """Greedy (+ ``eval.samples`` sampled) evaluation of a model folder or alias on the config's
    held-out split; the same numbers for a run's final/ and a copy of it anywhere else."""
    import torch
    from accelerate.utils import set_seed

    set_seed(seed)
    task = get_task(config.task.name, **config.task.options())
    examples = task.examples("test", config.task.test_size, seed=config.seed)
    tokenizer = models.load_tokenizer(model_path)
    model = models.load_model(model_path, config.model.dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    records = evaluate(
        model,
        tokenizer,
        task,
        examples,
        progress=progress,
        desc=f"eval {Path(model_path).name}",
        **settings(config),
    )
    return summarise(records)


def evaluate_cached(model_path: str, config: TrainConfig, seed: int, out_file: Path, progress: bool) -> dict:
    """``evaluate_model``, read from ``out_file`` when an earlier compare wrote it."""
    if out_file.exists():
        return json.loads(out_file.read_text())
    result = evaluate_model(model_path, config, seed, progress)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_config(base: TrainConfig, method: str, seed: int, run_dir: Path) -> TrainConfig:
    """One run of the comparison. The untrained model is evaluated once per seed by compare itself; the
    trainer's own evaluation after training (greedy + eval.samples) is the final model's evaluation.

    A method with ``sft_budget_from`` (``sft-then-grpo``: SASR) gets as many SFT steps as that method's run
    of the same seed took, once it has finished (an equal SFT budget).
    """
    no_before = base.eval.model_copy(update={"before": False})
    tree = base.model_copy(
        update={"method": method, "seed": seed, "output_dir": str(run_dir), "eval": no_before}
    ).model_dump()
    source = METHODS[method].sft_budget_from
    source_run = run_dir.parent / f"{source}-s{seed}"
    if source and _finished(source_run):
        sft_steps = json.loads((source_run / "run.json").read_text())["sft_steps"]
        tree[method] = METHODS[method].with_sft_steps(base.method_options(method), sft_steps)
    return TrainConfig.model_validate(tree)  # re-check (e.g. warm-up vs steps)


def _waves(methods: list[str]) -> list[list[str]]:
    """Methods in the order their runs can train: a method after the one whose SFT steps it takes."""
    first = [m for m in methods if METHODS[m].sft_budget_from not in methods]
    return [first, [m for m in methods if m not in first]]


def _train_in_parallel(
    base: TrainConfig, pending: list[tuple[str, int]], output: Path, jobs: int, progress: bool
):
    """``sasr train`` for each pending (method, seed), ``jobs`` processes at a time (a small model leaves a
    GPU mostly idle: several runs share it). Each run logs to runs/METHOD-sSEED.log."""
    runs = output / "runs"
    runs.mkdir(parents=True, exist_ok=True)

    live: set[subprocess.Popen] = set()
    stopped: list[str] = []

    def forward(name: str) -> None:  # each run saves a checkpoint and stops; compare then stops too
        stopped.append(name)
        for proc in list(live):
            proc.send_signal(signal.Signals[name])

    def one(method: str, seed: int) -> tuple[str, int, Path]:
        name = f"{method}-s{seed}"
        config_file, log_file = runs / f"{name}.yaml", runs / f"{name}.log"
        if stopped:
            return name, -1, log_file
        config = run_config(base, method, seed, runs / name)
        config_file.write_text(to_yaml(config))
        resume = _resumable(runs / name, config)
        start = ["--resume", str(runs / name)] if resume else ["--config", str(config_file), "--overwrite"]
        cmd = [sys.executable, "-m", "sasr", "train", *start, "--quiet"]
        with log_file.open("a" if resume else "w") as log:  # a continued run's log goes on
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            live.add(proc)
            code = proc.wait()
            live.discard(proc)
        return name, code, log_file

    bar = tqdm(total=len(pending), desc=f"compare: {jobs} runs at a time", disable=not progress)
    failed = []
    try:
        with on_stop_signals(forward), ThreadPoolExecutor(jobs) as pool:
            for name, code, log_file in pool.map(lambda ms: one(*ms), pending):
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


def compare(
    base: TrainConfig,
    methods: list[str],
    seeds: list[int],
    output: Path,
    progress: bool = True,
    command: str | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Train and evaluate every (method, seed); write results.json, results.md and plots into ``output``.

    ``jobs`` > 1 trains the runs that have not finished in that many parallel ``sasr train`` processes first.
    """
    output.mkdir(parents=True, exist_ok=True)
    k = base.eval.samples
    rows: dict[str, list[dict]] = {m: [] for m in ["untrained", *methods]}
    run_dirs: dict[str, list[Path]] = {m: [] for m in methods}
    pending = [(m, s) for s in seeds for m in methods if not _finished(output / "runs" / f"{m}-s{s}")]
    waves = _waves(methods)
    if jobs > 1 and pending:
        for wave in waves:
            if runs := [(m, s) for m, s in pending if m in wave]:
                _train_in_parallel(base, runs, output, jobs, progress)
    for seed in seeds:
        untrained = evaluate_cached(
            base.model.name,
            base.model_copy(update={"seed": seed}),
            seed,
            output / "runs" / f"untrained-s{seed}" / "eval.json",
            progress,
        )
        rows["untrained"].append({**untrained, "seconds": 0.0, **dict.fromkeys(STEP_KEYS, 0)})
        for method in [m for wave in waves for m in wave]:
            run_dir = output / "runs" / f"{method}-s{seed}"
            config = run_config(base, method, seed, run_dir)
            if not _finished(run_dir):
                resume = _resumable(run_dir, config)
                if progress:
                    verb = "continuing" if resume else "training"
                    print(f"sasr compare: {verb} {method} seed {seed} -> {run_dir}", file=sys.stderr)
                Trainer(config, overwrite=not resume, progress=progress, resume=resume).train()
            status = json.loads((run_dir / "run.json").read_text())
            ev = status.get("eval_after") or {}
            if not ev or (k and f"pass@{k}" not in ev):  # a run trained without the evaluation compare needs
                ev = evaluate_cached(str(run_dir / "final"), config, seed, run_dir / "eval.json", progress)
            rows[method].append(
                {**ev, "seconds": status["seconds"], **{k: status.get(k, 0) for k in STEP_KEYS}}
            )
            run_dirs[method].append(run_dir)

    metric_names = [m.format(k=k) for m in METRICS] if k else ["accuracy", "format_rate", "completion_length"]
    results = {
        "command": command or "(Python API) sasr.eval.compare.compare",
        "task": base.task.name,
        "model": base.model.name,
        "steps": base.steps,
        "warmup_steps": base.warmup_steps,
        "seeds": seeds,
        "samples": k,
        "methods": {
            m: {
                **{name: _mean_std([r[name] for r in rs]) for name in [*metric_names, "seconds", *STEP_KEYS]},
                "per_seed": rs,
            }
            for m, rs in rows.items()
        },
    }
    (output / "results.json").write_text(json.dumps(results, indent=2))
    plot_compare(run_dirs, output)

    header = ["method", *metric_names, "wall s", "SFT steps", "GRPO steps", "mixed steps"]
    table = []
    for m, res in results["methods"].items():
        cells = [m] + [f"{res[n][0]:.3f} ± {res[n][1]:.3f}" for n in metric_names]
        cells += [f"{res['seconds'][0]:.0f}", *(f"{res[k][0]:.1f}" for k in STEP_KEYS)]
        table.append(cells)
    md = [
        f"# {base.task.name}: {', '.join(methods)} on {base.model.name}",
        "",
        f"{base.steps} optimizer steps ({base.warmup_steps} warm-up where the method has one), seeds "
        f"{', '.join(map(str, seeds))}; {base.task.test_size} held-out questions"
        + (f", {k} samples each at temperature {base.eval.temperature}" if k else "")
        + ". Mean ± std over seeds.",
        "",
        markdown_table(header, table),
        "",
        "Command:",
        "",
        f"    {results['command']}",
        "",
        "![held-out accuracy](accuracy_vs_step.png) ![train reward](reward_vs_step.png)",
        "![how each method decides its steps](dynamics.png)",
    ]
    (output / "results.md").write_text("\n".join(md) + "\n")
    return results
