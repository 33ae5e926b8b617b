"""Experiment trackers through accelerate's tracking API (``report_to``, as TRL names it), offline by default.

- ``tensorboard``: events in ``DIR/tensorboard/sasr/``;
- ``trackio``: a local project ``sasr`` (``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``), one run per
  run directory; ``trackio show`` opens its dashboard;
- ``wandb``: offline unless ``WANDB_MODE`` says otherwise, files under ``DIR/wandb``;
- ``mlflow``: a file store under ``DIR/mlruns`` (needs ``pip install mlflow``).

Every scalar of a ``metrics.jsonl`` line is logged as ``train/<key>`` at its step, with ``train/is_sft``; with
``log_completions`` a step's samples go to each tracker as a table where it has one (``completions``: a W&B
and a trackio table, a TensorBoard text).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from sasr.trees import dotted

PROJECT = "sasr"
TRACKERS = ("tensorboard", "trackio", "wandb", "mlflow")


def names(report_to: list[str]) -> list[str]:
    """The trackers asked for; 'none' alone means none, 'all' every one."""
    if report_to == ["all"]:
        return list(TRACKERS)
    return [t for t in report_to if t != "none"]


def start(accelerator, report_to: list[str], run_dir: Path, config: dict[str, Any], first_step: int) -> None:
    """Start the trackers on the main process; a resumed run (``first_step`` > 0) continues the same runs."""
    trackers = names(report_to)
    if not trackers:
        return
    accelerator.project_configuration.logging_dir = str(run_dir / "tensorboard")
    init_kwargs = {
        "tensorboard": {
            "purge_step": first_step + 1
        },  # a resumed run rewrites the steps after its checkpoint
        "trackio": {"name": run_dir.name, "resume": "allow"},
        "wandb": {"name": run_dir.name, "dir": str(run_dir), "mode": os.environ.get("WANDB_MODE", "offline")},
        "mlflow": {"logging_dir": str(run_dir / "mlruns"), "run_name": run_dir.name},
    }
    accelerator.init_trackers(
        PROJECT, config=_flat(config), init_kwargs={t: init_kwargs[t] for t in trackers}
    )


def log(accelerator, record: dict[str, Any]) -> None:
    """One step's scalars (a metrics.jsonl line) to every tracker."""
    if not accelerator.trackers:
        return
    values = {
        f"train/{k}": v
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    values["train/is_sft"] = float(record["phase"] == "sft")
    accelerator.log(values, step=record["step"])


SAMPLE_COLUMNS = ("step", "kind", "prompt", "completion", "reward", "advantage", "correct", "truncated")


def log_samples(accelerator, step: int, samples: list[dict[str, Any]]) -> None:
    """A step's samples (completions.jsonl lines) as a ``completions`` table: W&B's and trackio's tables, and a
    markdown table as TensorBoard text."""
    if not accelerator.trackers or not samples:
        return
    columns = [c for c in SAMPLE_COLUMNS if c in samples[0]]
    rows = [[s[c] for c in columns] for s in samples]
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log_table("completions", columns=columns, data=rows, step=step)
        elif tracker.name == "trackio":
            import trackio

            tracker.log({"completions": trackio.Table(columns=columns, data=rows)}, step=step)
        elif tracker.name == "tensorboard":
            text = "\n".join(
                ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
            )
            tracker.writer.add_text("completions", text, global_step=step)


def _cell(value: Any) -> str:
    """A markdown table cell: pipes escaped, line breaks as <br>."""
    return str(value).replace("|", "\\|").replace("\n", "<br>")


def finish(accelerator) -> None:
    """Close the trackers (not ``accelerator.end_training``: that also ends the process group, which the
    ranks still use after training)."""
    for tracker in accelerator.trackers:
        if (
            tracker.name == "trackio"
        ):  # accelerate's finish leaves it trackio's current run, finished again at exit
            import trackio

            trackio.finish()
        else:
            tracker.finish()


def _flat(tree: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys and scalar values: what every tracker takes as its run's configuration."""
    return {
        key: value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
        for key, value in dotted(tree).items()
        if value != {}
    }
