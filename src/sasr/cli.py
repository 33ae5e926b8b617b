"""`sasr train | models | tasks`. Bad input: one sentence on stderr and exit code 2, no traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from sasr.errors import SasrError

EXAMPLES = """examples:
  sasr train                                   # SASR, SmolLM2-135M-Instruct + LoRA, task arithmetic
  sasr train --method sft-then-grpo --model tiny --steps 20 --warmup-steps 5
  sasr train --config configs/default.yaml --set grpo.num_generations=4 --set optim.learning_rate=5e-5
"""


def _train_parser(sub) -> None:
    from sasr.config import METHODS

    p = sub.add_parser(
        "train",
        help="train a model with SASR or a baseline",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of options (see configs/)")
    p.add_argument("--method", help=f"one of {', '.join(METHODS)} (default sasr)")
    p.add_argument("--task", help="task name (see `sasr tasks`; default arithmetic)")
    p.add_argument("--reward", help="jsonl tasks: reward function module:function (TRL signature)")
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
    from sasr.config import build_config, resume_config
    from sasr.trainer import Trainer, TrainingStopped

    overrides = {
        "method": args.method,
        "task.name": args.task,
        "task.reward": args.reward,
        "model.name": args.model,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "schedule.gamma": args.gamma,
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
    trainer = Trainer(config, overwrite=args.overwrite, progress=not args.quiet, resume=bool(args.resume))
    try:
        result = trainer.train()
    except TrainingStopped as stop:
        if trainer.accelerator.is_main_process:
            print(
                f"sasr: {stop}; resume with: sasr train --resume {stop.run_dir}",
                file=sys.stderr,
            )
        return 130 if stop.signal_name == "SIGINT" else 143
    if trainer.accelerator.is_main_process:
        print(summary_text(config, result))
    return 0


def summary_text(config, result) -> str:
    def line(name: str, ev: dict | None) -> str:
        if ev is None:
            return f"  {name:<7} (not evaluated)"
        return (
            f"  {name:<7} accuracy {ev['accuracy']:.3f}  reward {ev['reward_mean']:.3f}  "
            f"format {ev['format_rate']:.3f}  length {ev['completion_length']:.1f}  (n={ev['n']})"
        )

    return "\n".join(
        [
            f"sasr: {config.method} on task '{config.task.name}' with model '{config.model.name}' "
            f"finished in {result.seconds:.0f} s",
            f"  steps   {config.steps}: {result.counts['sft']} SFT, {result.counts['grpo']} GRPO",
            "  held-out evaluation (greedy):",
            line("before", result.eval_before),
            line("after", result.eval_after),
            f"  run written to {result.output_dir}/ (final model in {result.output_dir}/final)",
        ]
    )


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sasr", description="Step-wise adaptive SFT + GRPO post-training.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    sub.add_parser("models", help="list model aliases")
    sub.add_parser("tasks", help="list tasks and their options")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    handlers = {"train": cmd_train, "models": cmd_models, "tasks": cmd_tasks}
    try:
        return handlers[args.command](args)
    except SasrError as exc:
        print(f"sasr: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sasr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
