"""``sasr compare``: every method with the same budget, data and seeds, evaluated on the same questions.

Layout of DIR:
- ``runs/METHOD-sSEED/``: a normal run directory each (weights and checkpoints: never committed);
- ``summaries/METHOD-sSEED.json`` and ``summaries/untrained-sSEED.json``: all the table needs of a run (its
  configuration, the commit it ran at, its status and metrics lines, and one record per held-out question of
  every split). They are small: commit them. The table is assembled from them alone, so a comparison can be
  run in parts, stopped, and finished on another machine;
- ``results.json``, ``results.md`` and the plots.

Re-running skips every run with a summary (of the same configuration), continues a stopped run (same
configuration, a complete checkpoint) from its newest checkpoint, and trains the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sasr import checkpoint, models
from sasr.config import BOOKKEEPING_KEYS, TrainConfig, build_config, to_yaml
from sasr.errors import SasrError
from sasr.evaluate import evaluate, settings, summarise
from sasr.experiments.labels import included_label, is_included
from sasr.experiments.report import markdown_table, plot_compare
from sasr.experiments.stats import paired_bootstrap
from sasr.locks import FolderLock
from sasr.methods import METHODS, method_class, method_source
from sasr.process import on_stop_signals
from sasr.run_dir import finished, read_lines, read_status
from sasr.tasks import get_task
from sasr.trainer import Trainer
from sasr.trees import dotted

METRICS = ("accuracy", "pass@{k}", "maj@{k}", "distinct_2", "edit_distance", "distinct_answers")
BUDGET = ("sft_steps", "grpo_steps", "mixed_steps", "tokens", "flops", "seconds")
BASELINE = "sasr"  # the method compared with every other one, pairwise
# What an evaluation depends on: the untrained model's summary is reused while these stay the same, and another
# folder's runs (--include) pair with this comparison's only if these are the same (the same questions).
EVAL_KEYS = ("seed", "model", "task", "eval", "grpo.max_prompt_length")


def _differences(saved: dict, wanted: dict, keys: tuple[str, ...] | None = None) -> list[str]:
    """'key: saved there, wanted here' for every option that differs (bookkeeping such as the run directory
    or checkpoint frequency aside). An option missing on one side counts as equal while the other side holds
    its default (it changes nothing): so summaries of an earlier version of sasr stay usable, and a method's
    options filled in by whichever method a comparison listed first do not tell two runs apart."""
    a, b = dotted(saved), dotted(wanted)
    tree = TrainConfig().model_dump(mode="json")
    for name, method in METHODS.items():  # every method's options ("grpo" and "sft" are sections too)
        tree[name] = {**method.Options().model_dump(mode="json"), **tree.get(name, {})}
    defaults = dotted(tree)
    names = sorted((a.keys() | b.keys()) - set(BOOKKEEPING_KEYS))
    if keys is not None:
        names = [n for n in names if any(n == k or n.startswith(k + ".") for k in keys)]
    return [
        f"{n}: {a.get(n)!r} there, {b.get(n)!r} here"
        for n in names
        if a.get(n) != b.get(n) and not _default_on_one_side(n, a, b, defaults)
    ]


def _default_on_one_side(name: str, a: dict, b: dict, defaults: dict) -> bool:
    if name not in defaults or (name in a) == (name in b):
        return False
    return (a if name in a else b)[name] == defaults[name]


def git_commit() -> str:
    """The commit of the sasr source tree that runs ('+dirty' with uncommitted changes), or 'unknown'."""
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=src, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


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


def evaluate_model(
    model_path: str, config: TrainConfig, seed: int, progress: bool = True, splits: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Greedy (+ ``eval.samples`` sampled) evaluation of a model folder or alias on every held-out split of
    the config's task (or on ``splits``): ``{split: {"summary": means, "records": one per question}}``. The
    same numbers for a run's final/ and a copy of it anywhere else."""
    import torch
    from accelerate.utils import set_seed

    task = get_task(config.task.name, **config.task.options())
    splits = list(splits or task.held_out_splits)
    for split in splits:
        task.check_split(split)
    tokenizer = models.load_tokenizer(model_path)
    model = models.load_model(model_path, config.model.dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    out = {}
    for split in splits:
        set_seed(seed)  # each split's samples independent of which splits came before
        examples = task.examples(split, config.task.test_size, seed=config.seed)
        records = evaluate(
            model,
            tokenizer,
            task,
            examples,
            progress=progress,
            desc=f"eval {Path(model_path).name} ({split})",
            **settings(config),
        )
        records = [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in records]
        out[split] = {"summary": summarise(records), "records": records}
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


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


# --- summaries: what the table is assembled from ---------------------------------------------------------


def read_summary(path: Path, config: dict, keys: tuple[str, ...] | None = None) -> dict | None:
    """The summary at ``path`` if there is one; refused in one sentence if it was made with another
    configuration (only ``keys`` compared, when given)."""
    if not path.exists():
        return None
    summary = _load_summary(path, "delete it to redo that run")
    _same_method_file(summary, config["method"], path)
    diff = _differences(summary["config"], config, keys)
    if diff:
        raise SasrError(
            f"summary {path} was made with another configuration ({'; '.join(diff[:3])}); compare with that "
            "configuration, or delete the summary (and its run directory) to redo the run"
        )
    return summary


def _same_method_file(record: dict, method: str, path: Path) -> None:
    """Refuse a summary or run (``record``, at ``path``) of a user's method whose file has changed since."""
    then, now = record.get("method_source"), method_source(method)
    if then and now and then["sha256"] != now["sha256"]:
        raise SasrError(
            f"{path} was made with another version of the method file {method.rpartition(':')[0]} (its sha256 "
            "differs); restore the file, or delete the summary and the run directory to train that run again"
        )


def _load_summary(path: Path, fix: str) -> dict:
    """The summary at ``path``, or one sentence that says it is none and ``fix``."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        summary = None
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        raise SasrError(f"summary {path} is not a sasr compare summary; {fix}")
    return summary


def included(
    base: TrainConfig, folders: Sequence[Path], seeds: list[int], output: Path
) -> dict[tuple[str, int], dict]:
    """The trained runs of other comparison folders, as ``METHOD@FOLDER`` rows of this one: a variant trained
    with options of its own (another rate, no KL...) tabled and paired with this comparison's SASR. Refused
    in one sentence unless each was evaluated as this comparison evaluates (the pairs need the same
    questions), and for this comparison's own folder or two folders of one name (rows of one label)."""
    rows, names = {}, {}
    for folder in folders:
        where = folder.resolve()
        if where == output.resolve():
            raise SasrError(f"--include {folder} is this comparison's own folder: its runs are in the table")
        if names.setdefault(where.name, where) != where:
            raise SasrError(
                f"--include {folder} and {names[where.name]} have one name, which labels their rows "
                f"({included_label('METHOD', where.name)}); rename one"
            )
        # A trained run is evaluated with the trainer's own evaluations off: compare run_config's, not base's.
        wanted = {s: run_config(base, base.method, s, where).model_dump(mode="json") for s in seeds}
        found = 0
        for path in sorted((folder / "summaries").glob("*-s*.json")):
            method, _, seed = path.stem.rpartition("-s")
            if method == "untrained" or not seed.isdecimal() or int(seed) not in seeds:
                continue
            summary = _load_summary(path, "include a folder that sasr compare wrote")
            diff = _differences(summary["config"], wanted[int(seed)], EVAL_KEYS)
            if diff:
                raise SasrError(
                    f"--include {folder}: {path.name} was evaluated otherwise ({'; '.join(diff[:3])}), so not "
                    "on this comparison's questions; include a comparison of the same task, model and eval"
                )
            rows[included_label(method, where.name), int(seed)] = summary
            found += 1
        if not found:
            raise SasrError(
                f"--include {folder}: no run summaries (summaries/METHOD-sSEED.json) of seeds "
                f"{', '.join(map(str, seeds))} there; name the --output folder of a sasr compare"
            )
    return rows


def _write_summary(path: Path, summary: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, separators=(",", ":")) + "\n")
    tmp.replace(path)  # never half a summary
    return summary


def _untrained_config(base: TrainConfig, seed: int) -> dict:
    """The configuration an evaluation of the untrained model is recorded with."""
    return base.model_copy(update={"seed": seed}).model_dump(mode="json")


def _untrained(base: TrainConfig, seed: int, output: Path, progress: bool, commit: str) -> dict:
    tree = _untrained_config(base, seed)
    path = output / "summaries" / f"untrained-s{seed}.json"
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
        Trainer(config, overwrite=not resume, progress=progress, resume=resume).train()
    started = time.perf_counter()
    evals = evaluate_model(str(run_dir / "final"), config, config.seed, progress)
    status, metrics = read_status(run_dir), read_lines(run_dir)
    summary = {"commit": commit, "config": tree, "run": status, "metrics": metrics, "eval": evals}
    if source := method_source(config.method):  # a user's method file: refused once it changes
        summary["method_source"] = source
    summary["eval_seconds"] = time.perf_counter() - started
    return _write_summary(output / "summaries" / f"{run_dir.name}.json", summary)


def compare(
    base: TrainConfig,
    methods: list[str],
    seeds: list[int],
    output: Path,
    progress: bool = True,
    command: str | None = None,
    jobs: int = 1,
    landed: bool = False,
    include: Sequence[Path] = (),
) -> dict[str, Any]:
    """Train and evaluate every (method, seed) that has no summary yet; assemble results.json, results.md
    and the plots from the summaries (and from those of the ``include`` folders: see ``included``).

    ``jobs`` > 1 trains the runs that have not finished in that many parallel ``sasr train`` processes first.
    ``landed``: train and evaluate nothing; the table of the summaries there are (a comparison in progress),
    each method over the seeds it has; it only reads the summaries, so it may run beside the comparison that
    writes them, which holds the folder (a second comparison of the same folder is refused).
    """
    output.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext() if landed else FolderLock(output, "sasr compare"):
        return _compare(base, methods, seeds, output, progress, command, jobs, landed, include)


def _compare(base, methods, seeds, output, progress, command, jobs, landed, include) -> dict[str, Any]:
    specs = {method_class(m).name: m for m in methods}  # a user's method (file.py:Class) by its name
    methods = list(specs)
    extra = included(base, include, seeds, output)  # before any training: a wrong folder fails at once
    commit = git_commit()
    summaries: dict[tuple[str, int], dict] = {}
    for wave in _waves(methods):
        budgets = {m: _sft_budget(m, summaries, seeds) for m in wave}
        configs = {
            (m, s): run_config(base, specs[m], s, output / "runs" / f"{m}-s{s}", budgets[m])
            for m in wave
            for s in seeds
            # a run that takes its SFT budget from seeds that have not all landed cannot have landed either
            if not (landed and budgets[m] is None and _needs_budget(base, m, methods))
        }
        found = {
            key: read_summary(output / "summaries" / f"{m}-s{s}.json", c.model_dump(mode="json"))
            for key, c in configs.items()
            for m, s in [key]
        }
        if landed:
            summaries.update({key: summary for key, summary in found.items() if summary})
            continue
        pending = {
            f"{m}-s{s}": configs[m, s]
            for (m, s), summary in found.items()
            if summary is None and not finished(output / "runs" / f"{m}-s{s}")
        }
        if jobs > 1 and pending:
            _train_in_parallel(pending, output, jobs, progress)
        for key in sorted(configs, key=lambda ms: (ms[1], wave.index(ms[0]))):
            summaries[key] = found[key] or _trained(configs[key], output, progress, commit)
    for s in seeds:
        if not landed:
            summaries["untrained", s] = _untrained(base, s, output, progress, commit)
        elif summary := read_summary(
            output / "summaries" / f"untrained-s{s}.json", _untrained_config(base, s), EVAL_KEYS
        ):
            summaries["untrained", s] = summary
    if not any(m == "untrained" for m, _ in summaries):
        raise SasrError(
            f"sasr compare --landed: {output / 'summaries'} holds no evaluation of the untrained model for "
            f"seeds {', '.join(map(str, seeds))} (untrained-sSEED.json), which the table starts from; run "
            "compare without --landed to evaluate it"
        )
    summaries.update(extra)
    rows = [*methods, *dict.fromkeys(m for m, _ in extra)]
    results = assemble(base, rows, seeds, summaries, command)
    (output / "results.json").write_text(json.dumps(results, indent=2))
    plot_compare(
        {
            m: [summaries[m, s]["metrics"] for s in r["seeds"]]
            for m, r in results["methods"].items()
            if m in rows
        },
        output,
        _untrained_accuracy(summaries, seeds),
    )
    (output / "results.md").write_text(results_markdown(results, output))
    return results


def _untrained_accuracy(summaries: dict[tuple[str, int], dict], seeds: list[int]) -> float | None:
    """The untrained model's held-out (test) greedy accuracy, the mean over the seeds evaluated."""
    evals = [summaries["untrained", s].get("eval", {}) for s in seeds if ("untrained", s) in summaries]
    found = [e["test"]["summary"]["accuracy"] for e in evals if "test" in e]
    return statistics.fmean(found) if found else None


# --- the table ---------------------------------------------------------------------------------------------


def _budget(summary: dict) -> dict[str, float | None]:
    """Steps of each kind, completion tokens trained on, FLOPs (None for a run from before sasr counted
    them), wall seconds."""
    run, lines = summary["run"] or {}, summary["metrics"]
    tokens = sum(r.get("tokens", r["tokens_per_second"] * r["step_seconds"]) for r in lines)
    flops = sum(r["flops"] for r in lines) if all("flops" in r for r in lines) else None
    return {
        **{k: float(run.get(k, 0)) for k in BUDGET if k not in ("tokens", "flops", "seconds")},
        "tokens": float(tokens),
        "flops": flops,
        "seconds": float(run.get("seconds", 0.0)),
    }


def _mean_std_known(values: list[float | None]) -> tuple[float, float] | tuple[None, None]:
    """_mean_std, or (None, None) if any value is unknown."""
    return (None, None) if any(v is None for v in values) else _mean_std(values)


def _flops(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def assemble(
    base: TrainConfig, methods: list[str], seeds: list[int], summaries: dict, command: str | None = None
) -> dict[str, Any]:
    """results.json's content, from the summaries alone: per method its budget and, per split, the mean ±
    std over seeds of every metric; for SASR against every other method, the paired accuracy difference.

    A method is taken over the seeds it has a summary of (all of ``seeds`` once a comparison has finished;
    a method with none is left out), and SASR against a method over the seeds both have."""
    k = base.eval.samples
    task = get_task(base.task.name, **base.task.options())
    has = {m: [s for s in seeds if (m, s) in summaries] for m in ["untrained", *methods]}
    names = [m for m, landed in has.items() if landed]
    splits = list(summaries["untrained", has["untrained"][0]]["eval"])
    wanted = [m.format(k=k) for m in METRICS] if k else ["accuracy", "format_rate", "completion_length"]
    out_methods = {}
    for m in names:
        runs = [summaries[m, s] for s in has[m]]
        budgets = [_budget(r) for r in runs]
        out_methods[m] = {
            "seeds": has[m],
            "budget": {b: _mean_std_known([x[b] for x in budgets]) for b in BUDGET},
            "splits": {
                split: {
                    name: _mean_std([r["eval"][split]["summary"][name] for r in runs])
                    for name in wanted
                    if name in runs[0]["eval"][split]["summary"]
                }
                for split in splits
            },
            "per_seed": [
                {"seed": s, **b, **{split: r["eval"][split]["summary"] for split in splits}}
                for s, r, b in zip(has[m], runs, budgets)
            ],
            "commits": sorted({r["commit"] for r in runs}),
        }
    paired: dict[str, dict[str, dict]] = {}
    if BASELINE in names:
        both = {m: [s for s in has[BASELINE] if s in has[m]] for m in names if m != BASELINE}
        for split in splits:

            def correct(m: str, seeds: list[int], split: str = split) -> list[list[float]]:
                return [[x["correct"] for x in summaries[m, s]["eval"][split]["records"]] for s in seeds]

            paired[split] = {
                m: {"seeds": common, **paired_bootstrap(correct(BASELINE, common), correct(m, common))}
                for m, common in both.items()
                if common
            }
    e = base.eval
    # where this comparison's time went: an included run's time is its own folder's
    own = [x for (m, _), x in summaries.items() if not is_included(m)]
    timed = [x["run"] for x in own if "eval_seconds" in x and x["run"]]
    return {
        "command": command or "(Python API) sasr.experiments.compare.compare",
        "task": base.task.name,
        "model": base.model.name,
        "steps": base.steps,
        "warmup_steps": base.warmup_steps,
        "max_flops": base.max_flops,
        "seeds": seeds,
        "samples": k,
        "sample_size": e.sample_size,
        "splits": {
            split: {
                "n": summaries["untrained", has["untrained"][0]]["eval"][split]["summary"]["n"],
                "shift": task.shifts.get(split, ""),
            }
            for split in splits
        },
        "methods": out_methods,
        "not_landed": [m for m in methods if m not in out_methods],
        "paired": {"baseline": BASELINE, "metric": "accuracy", "level": 0.95, "splits": paired},
        "time": {  # where the comparison's time went (evaluation timed by summaries that record it)
            "train_seconds": sum(
                r["budget"]["seconds"][0] * len(r["seeds"])
                for m, r in out_methods.items()
                if not is_included(m)
            ),
            "eval_seconds": sum(x.get("eval_seconds", 0.0) for x in own),
            "eval_timed": sum("eval_seconds" in x for x in own),
            "runs": len(own),
            # training seconds of the runs whose evaluation was timed: the share over those runs alone
            "timed_train_seconds": sum(r.get("seconds") or 0.0 for r in timed),
            # runs trained side by side (--jobs N) share the wall clock: count the time any of them trained
            "timed_train_wall_seconds": wall_seconds(timed),
            "most_at_once": most_at_once(timed),
        },
    }


def wall_seconds(runs: list[dict]) -> float:
    """Seconds in which any of ``runs`` (their run.json) was training: the union of their segments, so runs
    trained side by side count once. Seconds a run's segments do not cover (sasr before 0202e1e kept none, and
    a run resumed from such a checkpoint lacks its first ones) count as if trained alone."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(tuple(s) for r in runs for s in r.get("segments", [])):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    uncovered = (
        (r.get("seconds") or 0.0) - sum(max(0.0, b - a) for a, b in r.get("segments", [])) for r in runs
    )
    return total + sum(max(0.0, x) for x in uncovered)


def most_at_once(runs: list[dict]) -> int:
    """The most of ``runs`` that were training at the same moment (by their segments; 1 without any)."""
    events = sorted((t, d) for r in runs for a, b in r.get("segments", []) for t, d in ((a, 1), (b, -1)))
    now = most = 0
    for _, d in events:  # an end sorts before a start at the same time: touching stretches do not overlap
        now += d
        most = max(most, now)
    return max(most, 1)


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def results_markdown(results: dict[str, Any], output: Path) -> str:
    """results.md: the budget table, a metrics table per split, and SASR's paired differences."""
    methods = results["methods"]
    k, splits = results["samples"], results["splits"]
    commits = sorted({c for m in methods.values() for c in m["commits"]})
    n_sampled = f"the first {results['sample_size']} of them" if results["sample_size"] else "each"
    seeds_of = {m: r.get("seeds", results["seeds"]) for m, r in methods.items()}
    partial = bool(results["not_landed"]) or any(landed != results["seeds"] for landed in seeds_of.values())
    one_seed = all(len(landed) == 1 for landed in seeds_of.values())

    def cell(method: str, mean_std: list[float]) -> str:  # one seed: no spread (0.000 would read as measured)
        one = len(seeds_of[method]) == 1
        return f"{mean_std[0]:.3f}" if one else f"{mean_std[0]:.3f} ± {mean_std[1]:.3f}"

    lines = [
        f"# {results['task']}: {', '.join(m for m in methods if m != 'untrained')} on {results['model']}",
        "",
        (
            f"Matched on compute: each run stopped once it had spent {results['max_flops']:.3g} FLOPs (at most "
            f"{results['steps']} optimizer steps; "
            if results.get("max_flops")
            else f"{results['steps']} optimizer steps ("
        )
        + f"{results['warmup_steps']} warm-up where the method has one), "
        f"seeds {', '.join(map(str, results['seeds']))}; per split {splits[next(iter(splits))]['n']} held-out "
        "questions, greedy"
        + (f", and {k} samples of {n_sampled} at the evaluation temperature" if k else "")
        + (
            ". A comparison in progress: each method over the seeds that have landed (the Budget table's "
            "seeds column), mean ± std where it has more than one"
            + (
                f"; no run of {', '.join(results['not_landed'])} has landed yet."
                if results["not_landed"]
                else "."
            )
            if partial
            else ". One seed: no spread over seeds."
            if one_seed
            else ". Mean ± std over seeds."
        )
        + (
            " A row named METHOD@FOLDER holds the runs of another comparison folder (`--include`): trained with "
            "options of its own, evaluated on the same questions."
            if any(is_included(m) for m in methods)
            else ""
        )
        + f" Runs at commit {', '.join(commits)}.",
        "",
        "## Budget",
        "",
        "Tokens: completion tokens in the training passes (demonstrations and rollouts), summed over steps. "
        "FLOPs: 6 N per token through a training pass and 2 N per sampled token, N the model's parameters "
        "(arXiv 2604.23747's count; - for runs from before sasr counted them).",
        "",
        markdown_table(
            ["method", *(["seeds"] if partial else []), "SFT steps", "GRPO steps", "mixed steps", "tokens"]
            + ["FLOPs", "wall s"],
            [
                [m, *([", ".join(map(str, seeds_of[m]))] if partial else [])]
                + [*(f"{r['budget'][b][0]:.1f}" for b in BUDGET[:3]), f"{r['budget']['tokens'][0]:,.0f}"]
                + [_flops(r["budget"]["flops"][0]), f"{r['budget']['seconds'][0]:.0f}"]
                for m, r in methods.items()
            ],
        ),
    ]
    for split, info in splits.items():
        names = list(methods["untrained"]["splits"][split])
        what = "the training distribution" if split == "test" else info["shift"] or split
        lines += [
            "",
            f"## Split `{split}`: {what}",
            "",
            markdown_table(
                ["method", *names],
                [[m, *(cell(m, r["splits"][split][n]) for n in names)] for m, r in methods.items()],
            ),
        ]
    paired = results["paired"]["splits"]
    first = paired[next(iter(paired))] if paired else {}  # the methods paired with SASR (the same per split)
    unpaired = [m for m in methods if m != BASELINE and m not in first] if BASELINE in methods else []
    if first:
        one_seed_pairs = all(len(p.get("seeds", results["seeds"])) == 1 for p in first.values())
        lines += [
            "",
            "## SASR against each method, paired",
            "",
            "Mean difference in greedy accuracy, SASR minus the method, over the same questions; 95% interval "
            + (
                "of a bootstrap over the questions (one seed, so no spread over seeds is in it; "
                if one_seed_pairs
                else "of a two-level bootstrap (seeds drawn with replacement, then each drawn seed's questions; "
            )
            + "10,000 replicates)"
            + (", over the seeds both have (second column)" if partial else "")
            + ". **Bold**: the interval excludes zero."
            + (f" Not paired yet (no seed in common with SASR): {', '.join(unpaired)}." if unpaired else ""),
            "",
            markdown_table(
                ["method", *(["seeds"] if partial else []), *paired],
                [
                    [m, *([", ".join(map(str, first[m].get("seeds", [])))] if partial else [])]
                    + [
                        ("**{} [{}, {}]**" if p["clear_of_zero"] else "{} [{}, {}]").format(
                            *map(_signed, (p["mean"], p["low"], p["high"]))
                        )
                        for split in paired
                        for p in [paired[split][m]]
                    ]
                    for m in first
                ],
            ),
        ]
    t = results["time"]
    wall = t.get("timed_train_wall_seconds", t["timed_train_seconds"])
    if t["eval_timed"] and wall + t["eval_seconds"] > 0:
        everything = t["eval_timed"] == t["runs"]
        train, of = f"{(t['train_seconds'] if everything else t['timed_train_seconds']) / 3600:.2f} h", "time"
        if t.get("most_at_once", 1) > 1:
            train += f" ({wall / 3600:.2f} h of wall clock, up to {t['most_at_once']} runs trained at once)"
            of = "wall clock"
        share = t["eval_seconds"] / (wall + t["eval_seconds"])
        hours = f"evaluation {t['eval_seconds'] / 3600:.2f} h ({share:.0%} of those runs' {of})."
        if everything:
            timing = f"Time: training {train}, {hours}"
        else:
            timing = (
                f"Time: training {t['train_seconds'] / 3600:.2f} h over all {t['runs']} runs; in the "
                f"{t['eval_timed']} that timed their evaluation, training {train} and {hours}"
            )
        lines += ["", timing]
    lines += ["", "Command:", "", f"    {results['command']}", ""]
    figures = [
        ("accuracy_vs_step.png", "held-out accuracy"),
        ("reward_vs_step.png", "train reward"),
        ("dynamics.png", "how each method decides its steps"),
    ]
    lines += [f"![{alt}]({name})" for name, alt in figures if (output / name).exists()]
    return "\n".join(lines) + "\n"
