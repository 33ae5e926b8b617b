"""`sasr train | eval | compare | report | models | tasks`. Bad input: one sentence on stderr and exit code 2, no
traceback."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

from sasr.errors import SasrError
from sasr.process import exit_code, keep_freed_memory

EXAMPLES = """examples:
  sasr train                                   # SASR, SmolLM2-135M-Instruct + LoRA, task arithmetic
  sasr train --method sft-then-grpo --model tiny --steps 20 --warmup-steps 5
  sasr train --config configs/default.yaml --set grpo.num_generations=4 --set optim.learning_rate=5e-5
"""


def usage() -> str:
    """docs/guide.md's command-line summary, its methods and model aliases from their registries."""
    from sasr.methods import METHODS
    from sasr.models import ALIASES

    methods, aliases = "|".join(METHODS), "|".join(ALIASES)
    return "\n".join(
        [
            f"sasr train [--config FILE.yaml] [--method {methods}|FILE.py:CLASS]",
            f"           [--task NAME] [--model HUB_ID|FOLDER|{aliases}] [--steps N] [--warmup-steps W]",
            "           [--gamma G] [--seed S] [--output DIR] [--overwrite] [--set key=value ...] [--quiet]",
            "           [--reward module:function ...] [--save-every N] [--resume RUN_DIR]",
            'sasr eval | compare | report ...   # see "Evaluate, compare, report"',
            "sasr models     # model aliases",
            "sasr tasks      # tasks and their options",
        ]
    )


def _train_parser(sub) -> None:
    from sasr.methods import METHODS

    p = sub.add_parser(
        "train",
        help="train a model with SASR or a baseline",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of options (see configs/)")
    p.add_argument("--method", help=f"one of {', '.join(METHODS)}, or path/to/file.py:Class (default sasr)")
    p.add_argument("--task", help="task name (see `sasr tasks`; default arithmetic)")
    p.add_argument(
        "--reward",
        action="append",
        metavar="MODULE:FUNCTION",
        help="a reward function with TRL's contract (repeat for several; 'task': the task's judge)",
    )
    p.add_argument("--model", help="hub id, local folder, or alias (see `sasr models`; default smollm2-135m)")
    p.add_argument("--steps", type=int, help="total optimizer steps, warm-up included")
    p.add_argument("--warmup-steps", type=int, help="W: SFT steps before the adaptive phase")
    p.add_argument("--gamma", type=float, help="SASR gamma in p_t = g_last / (g_last + gamma * G_warmup)")
    p.add_argument("--seed", type=int)
    p.add_argument("--output", help="run directory (default runs/METHOD-TASK-TIME)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--save-every", type=int, help="write a checkpoint every N steps (kept: save_total_limit)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its newest complete checkpoint")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any option, e.g. grpo.beta=0"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_train(args: argparse.Namespace) -> int:
    from sasr.api import SASRTrainer
    from sasr.config import build_config, resume_config
    from sasr.run_dir import refuse_existing
    from sasr.trainer import TrainingStopped

    overrides = {
        "method": args.method,
        "task.name": args.task,
        "reward_funcs": args.reward,
        "model.name": args.model,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "sasr.gamma": args.gamma,
        "seed": args.seed,
        "output_dir": args.output,
        "save_every": args.save_every,
    }
    if args.resume:
        if args.config or args.output:
            raise SasrError(
                "--resume takes its configuration and directory from the run; drop --config/--output"
            )
        config = resume_config(args.resume, overrides, args.set)
    else:
        config = build_config(args.config, overrides, args.set)
        if config.output_dir:  # before the model loads
            refuse_existing(Path(config.output_dir), args.overwrite, resume=False)
    trainer = SASRTrainer(args=config, overwrite=args.overwrite, progress=not args.quiet)
    try:
        result = trainer.train(resume_from_checkpoint=bool(args.resume))
    except TrainingStopped as stop:
        if trainer.accelerator.is_main_process:
            print(
                f"sasr: {stop}; resume with: sasr train --resume {stop.run_dir}",
                file=sys.stderr,
            )
        return exit_code(stop.signal_name)
    if trainer.accelerator.is_main_process:
        print(summary_text(config, result))
    return 0


def summary_text(config, result) -> str:
    def line(name: str, ev: dict | None) -> str:
        if ev is None:
            return f"  {name:<7} (not evaluated)"
        if not ev.get("n"):
            return f"  {name:<7} (no held-out examples: the task's test split is empty)"
        return (
            f"  {name:<7} accuracy {ev['accuracy']:.3f}  reward {ev['reward_mean']:.3f}  "
            f"format {ev['format_rate']:.3f}  length {ev['completion_length']:.1f}  (n={ev['n']})"
        )

    return "\n".join(
        [
            f"sasr: {config.method} on task '{config.task.name}' with model '{config.model.name}' "
            f"finished in {result.seconds:.0f} s",
            f"  steps   {config.steps}: "
            + ", ".join(f"{n} {p.upper() if p != 'mixed' else p}" for p, n in result.counts.items() if n),
            "  held-out evaluation (greedy):",
            line("before", result.eval_before),
            line("after", result.eval_after),
            f"  run written to {result.output_dir}/ (final model in {result.output_dir}/final)",
        ]
    )


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model or a run directory on a task's held-out split")
    p.add_argument(
        "--model", required=True, help="hub id, folder, alias, or a run directory (uses DIR/final)"
    )
    p.add_argument("--task", help="task name (default: the run's task, else arithmetic)")
    p.add_argument(
        "--n", type=int, default=None, help="held-out examples (default: the run's test_size, else 100)"
    )
    p.add_argument(
        "--samples", type=int, default=0, help="K samples per question for pass@K, maj@K, diversity"
    )
    p.add_argument(
        "--split",
        help="comma list of splits (default: every held-out split of the task: test, and its shifted ones)",
    )
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--output", help="also write the numbers as JSON to this file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. task.n_people=3")
    p.add_argument("--quiet", action="store_true")


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from sasr.checkpoint import is_run_dir
    from sasr.config import build_config, load_yaml
    from sasr.evaluate import evaluate_model
    from sasr.run_dir import STATUS, read_status

    run = Path(args.model)
    is_run = is_run_dir(run)
    if (run / "final").is_dir() and args.task is None:  # a run directory: its task is in its run.json
        if not (run / STATUS).is_file():
            raise SasrError(
                f"'{run}' looks like a run directory but has no {STATUS} to say what it was trained on; "
                "pass --task NAME (and its --set task.* options) to evaluate it anyway"
            )
        read_status(run)  # one sentence if it is damaged
    run_task = load_yaml(run / "config.yaml").get("task", {}).get("name") if is_run else None
    use_run_config = is_run and args.task in (None, run_task)  # the run's task options and test split
    overrides = {
        "model.name": str(run / "final") if is_run else args.model,
        "task.name": args.task,
        "task.test_size": args.n if args.n is not None else (None if use_run_config else 100),
        "eval.samples": args.samples,
        "eval.temperature": args.temperature,
        "seed": args.seed,
    }
    config = build_config(run / "config.yaml" if use_run_config else None, overrides, args.set)
    splits = [s.strip() for s in args.split.split(",") if s.strip()] if args.split else None
    evals = evaluate_model(config.model.name, config, config.seed, progress=not args.quiet, splits=splits)
    result = {split: ev["summary"] for split, ev in evals.items()}
    print(eval_table(config.model.name, config, result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
        print(f"written to {args.output}")
    return 0


def eval_table(model: str, config, result: dict[str, dict]) -> str:
    """One column per split."""
    splits = list(result)
    lines = [
        f"sasr eval: {model} on task '{config.task.name}' "
        + ", ".join(f"{s}: {result[s]['n']} questions" for s in splits),
        f"  {'':<18} " + " ".join(f"{s:>10}" for s in splits),
    ]
    for key in dict.fromkeys(k for s in splits for k in result[s] if k != "n"):
        cells = (f"{result[s][key]:>10.4f}" if key in result[s] else f"{'':>10}" for s in splits)
        lines.append(f"  {key:<18} " + " ".join(cells))
    return "\n".join(lines)


def _compare_parser(sub) -> None:
    from sasr.methods import METHODS

    p = sub.add_parser("compare", help="train and evaluate several methods over seeds; table and plots")
    p.add_argument("--task", help="task name")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma list of {', '.join(METHODS)} or path/to/file.py:Class (default all)",
    )
    p.add_argument("--steps", type=int, help="optimizer steps of every run")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--seeds", default="1,2,3", help="comma list of seeds (default 1,2,3)")
    p.add_argument("--model", help="model for every run")
    p.add_argument("--samples", type=int, default=None, help="K samples per question (default 4)")
    p.add_argument("--config", help="YAML file of options shared by every run")
    p.add_argument("--output", required=True, help="comparison directory (re-running skips finished runs)")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once, each its own process (default 1)"
    )
    p.add_argument(
        "--landed",
        action="store_true",
        help="train and evaluate nothing: the table of the runs whose summaries are in OUTPUT/summaries "
        "(a comparison in progress; each method over the seeds it has)",
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="DIR",
        help="also table the runs of another comparison folder DIR, evaluated on the same questions (a variant "
        "trained with options of its own), as rows METHOD@NAME (NAME: DIR's own name), each paired with SASR",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", action="store_true")


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sasr.config import build_config
    from sasr.experiments.compare import compare
    from sasr.methods import method_class
    from sasr.trainer import TrainingStopped

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        method_class(m)  # an unknown name, or a user's file.py:Class that does not load: one sentence
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SasrError(f"--seeds must be a comma list of integers, got '{args.seeds}'") from None
    overrides = {
        "method": methods[0] if methods else None,  # the shared configuration is checked as one of them
        "task.name": args.task,
        "model.name": args.model,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "eval.samples": 4 if args.samples is None else args.samples,
    }
    base = build_config(args.config, overrides, args.set)
    if "every" not in base.eval.model_fields_set:  # curves of held-out accuracy unless the config says
        base = base.model_copy(
            update={"eval": base.eval.model_copy(update={"every": max(1, base.steps // 5)})}
        )
    for m in methods:  # fail on a bad budget before the first run, not in the middle
        build_config(args.config, {**overrides, "method": m}, args.set)
    command = "sasr " + " ".join(shlex.quote(a) for a in args.argv)
    if args.jobs < 1:
        raise SasrError(f"--jobs must be at least 1, got {args.jobs}")
    try:
        compare(
            base,
            methods,
            seeds,
            Path(args.output),
            progress=not args.quiet,
            command=command,
            jobs=args.jobs,
            landed=args.landed,
            include=[Path(d) for d in args.include],
        )
    except TrainingStopped as stop:  # a run trained in this process
        print(
            f"sasr compare: {stop.run_dir.name} {stop}; re-running the same command continues it from there",
            file=sys.stderr,
        )
        return exit_code(stop.signal_name)
    print((Path(args.output) / "results.md").read_text())
    return 0


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="a run's page: curves and samples (DIR/report/index.html)")
    p.add_argument("run_dir")


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sasr.experiments.report import write_run_report

    run = Path(args.run_dir)
    if not (run / "metrics.jsonl").is_file():
        raise SasrError(f"'{run}' is not a run directory (no metrics.jsonl)")
    path = write_run_report(run)
    print(
        f"report written to {path.parent / 'index.html'} (open it in a browser), {path} and {path.parent / 'training.png'}"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from sasr.models import ALIASES

    print("model aliases (any hub id or save_pretrained folder works too):")
    for name, text in ALIASES.items():
        print(f"  {name:<14} {text}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from sasr.tasks import TASKS

    for name, cls in TASKS.items():
        print(f"{name}: {cls.description}")
        for key, value in cls.options.items():
            print(f"    task.{key} = {value!r}")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line ends in one sentence (and exit code 2), as every other bad input does."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sasr", description="Step-wise adaptive SFT + GRPO post-training.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _train_parser(sub)
    _eval_parser(sub)
    _compare_parser(sub)
    _report_parser(sub)
    sub.add_parser("models", help="list model aliases")
    sub.add_parser("tasks", help="list tasks and their options")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keep_freed_memory()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in results.md so a comparison can be rerun exactly
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    handlers = {
        "train": cmd_train,
        "eval": cmd_eval,
        "compare": cmd_compare,
        "report": cmd_report,
        "models": cmd_models,
        "tasks": cmd_tasks,
    }
    try:
        return handlers[args.command](args)
    except SasrError as exc:
        print(f"sasr: error: {exc}", file=sys.stderr)
        return 2
    except (
        OSError
    ) as exc:  # a write the machine refused midway: the run's checkpoints are whole (see checkpoint)
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS):
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(
            f"sasr: error: cannot write{where} ({exc.strerror}); free space or raise the limit, then continue "
            "with sasr train --resume RUN_DIR (its newest whole checkpoint)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("sasr: interrupted", file=sys.stderr)
        return exit_code("SIGINT")
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not any(s in message for s in ("out of memory", "can't allocate memory")) and not isinstance(
            exc, MemoryError
        ):
            raise
        print(
            f"sasr: error: out of memory ({message[:160]}); lower grpo.batch_size, grpo.num_generations, "
            "sft.batch_size, eval.batch_size or the length limits, set model.gradient_checkpointing=true, "
            "or run fewer compare --jobs at once",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
