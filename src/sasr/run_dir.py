"""Every file of a run directory, written and read here: ``config.yaml``, ``run.json``, the JSON-lines files
(``metrics.jsonl``, ``completions.jsonl``, ``eval_completions.jsonl``, ``ranks/rankN.jsonl``), ``final/`` and
``adapter/`` with their model cards, and the upload of ``final/`` to the Hub. Checkpoints are
``sasr.checkpoint``'s.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from sasr import trackers
from sasr.batch import DEMO, SAMPLE_COLUMNS, Part, Rows, kind_name
from sasr.config import TrainConfig, to_yaml
from sasr.errors import SasrError

log = logging.getLogger(__name__)

CONFIG, STATUS = "config.yaml", "run.json"
METRICS, COMPLETIONS, EVAL_COMPLETIONS = "metrics.jsonl", "completions.jsonl", "eval_completions.jsonl"
STEP_LINES = (METRICS, COMPLETIONS, EVAL_COMPLETIONS)  # one line per step's thing, each with its "step"


def resolve(config: TrainConfig, overwrite: bool, resume: bool, acc: Accelerator) -> Path:
    """The run directory (identical on every rank), refused if it exists unless overwrite or resume."""
    method = config.method_class().name  # a user's file.py:Class by its name
    name = config.output_dir or f"runs/{method}-{config.task.name}-{datetime.now():%Y%m%d-%H%M%S}"
    name = broadcast_object_list([name])[0] if acc.num_processes > 1 else name  # one timestamp for all ranks
    path = Path(name)
    if path.exists() and not path.is_dir():
        raise SasrError(f"output '{path}' is a file, not a directory; choose another --output")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    try:  # a real write, removed at once: permissions alone do not say (root, read-only or virtual file systems)
        os.rmdir(tempfile.mkdtemp(prefix=".sasr-write-check-", dir=parent))
    except OSError as exc:
        raise SasrError(
            f"cannot write the run directory '{path}' in '{parent}' ({exc.strerror}); choose another --output"
        ) from None
    if not resume and path.exists() and any(path.iterdir()) and not overwrite:
        raise SasrError(
            f"output directory '{path}' already exists; pass --overwrite or choose another --output"
        )
    return path


class RunDir:
    """The files of one run. Its writes happen on the main process only (each rank's own line aside);
    ``save_model`` and ``push_to_hub`` are called there (the whole model exists only there under FSDP)."""

    def __init__(self, path: Path, main: bool = True) -> None:
        self.path, self.main = Path(path), main

    def create(self, config: TrainConfig) -> None:
        """A fresh directory (anything there is removed) holding the resolved configuration."""
        if not self.main:
            return
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        (self.path / CONFIG).write_text(to_yaml(config.model_copy(update={"output_dir": str(self.path)})))
        if config.logging_ranks:
            (self.path / "ranks").mkdir()

    def reopen(self, config: TrainConfig, last_step: int) -> None:
        """Continue after ``last_step``: the lines of later steps are forgotten (they are redone identically)."""
        if not self.main:
            return
        for name in STEP_LINES:
            truncate(self.path / name, last_step)
        (self.path / CONFIG).write_text(to_yaml(config))
        if config.logging_ranks:
            (self.path / "ranks").mkdir(exist_ok=True)

    def write_status(self, status: str, **fields: Any) -> None:
        """``run.json``: the run's status ('running', 'stopped', 'failed', 'finished') and what goes with it."""
        if self.main:
            (self.path / STATUS).write_text(json.dumps({"status": status, **fields}, indent=2))

    def append(self, name: str, lines: Iterable[dict[str, Any]]) -> None:
        """Append JSON lines to ``name`` (main process), as ``json.dumps`` writes them (metrics.jsonl's lines
        come ``strict``; the samples keep a NaN reward as NaN)."""
        if self.main:
            with open(self.path / name, "a") as f:
                f.writelines(json.dumps(line) + "\n" for line in lines)

    def append_rank(self, rank: int, line: dict[str, Any]) -> None:
        """This process's own line in ``ranks/rank<rank>.jsonl`` (the folder made by ``create``/``reopen``)."""
        with open(self.path / "ranks" / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def log_samples(
        self, acc: Accelerator, step: int, samples: list[dict[str, Any]], keep: bool, show: int
    ) -> None:
        """The step's samples, every process's gathered on the main one: with ``keep`` (log_completions) appended
        to completions.jsonl and sent to the trackers; the first ``show`` printed."""
        if acc.num_processes > 1:
            samples = gather_object(samples)
        if not self.main:
            return
        if keep:
            self.append(COMPLETIONS, samples)
            trackers.log_samples(acc, step, samples)
        for s in samples[:show]:
            head = f"step {step} [{s['kind']}, reward {s['reward']:.2f}, advantage {s['advantage']:+.2f}]"
            tqdm.write(f"{head} {s['completion'][:300]!r}")

    def save_model(self, model, tokenizer, card, lora: bool) -> None:
        """``final/``: a plain transformers folder (LoRA merged); with LoRA also ``adapter/``, the adapter alone;
        each with its model card (``card(adapter=...)`` -> README.md text)."""
        final = self.path / "final"
        if lora:
            model.save_pretrained(self.path / "adapter")
            tokenizer.save_pretrained(self.path / "adapter")
            (self.path / "adapter" / "README.md").write_text(
                card(adapter=True)
            )  # in place of peft's template
            model = model.merge_and_unload()
        model.config.use_cache = True
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)
        (final / "README.md").write_text(card())

    def push_to_hub(self, repo_id: str | None) -> None:
        """Upload final/ (model, tokenizer, model card) to ``repo_id`` (default: the directory's name)."""
        from huggingface_hub import HfApi

        api = HfApi()
        repo = api.create_repo(repo_id or self.path.name, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo, folder_path=self.path / "final", commit_message="sasr: final model")
        log.warning("pushed %s to https://huggingface.co/%s", self.path / "final", repo)


def completion_samples(
    step: int, rank: int, rows: Rows, parts: list[Part], extra: dict[str, list], tokenizer
) -> list[dict[str, Any]]:
    """A step's group rows as ``completions.jsonl`` lines (TRL's log_completions). ``extra``: the columns
    reward functions added with log_extra, one value per group row; a method's own columns come from
    ``SAMPLE_COLUMNS``."""
    grouped = (rows.kind != DEMO).nonzero().squeeze(1).tolist()
    cut = rows.cut()
    columns = {k: v for k, v in extra.items() if len(v) == len(grouped)}
    return [
        {
            "step": step,
            "rank": rank,
            "group": int(rows.group[i]),
            "kind": kind_name(int(rows.kind[i])),
            "parts": [p.name for p in parts if p.rows[i]],
            "prompt": tokenizer.decode(
                rows.prompt_ids[i][rows.prompt_mask[i].bool()], skip_special_tokens=True
            ),
            "completion": rows.texts[i],
            "reward": float(rows.rewards[i]),
            "advantage": float(rows.advantages[i]),
            "correct": bool(rows.correct[i]),
            "formatted": bool(rows.formatted[i]),
            "truncated": bool(cut[i]),
            **{k: v[j] for k, v in columns.items()},
            **{
                k: v for method_columns in SAMPLE_COLUMNS.values() for k, v in method_columns(rows, i).items()
            },
        }
        for j, i in enumerate(grouped)
    ]


def check_hub() -> None:
    """push_to_hub needs the network: refuse it before anything is written when the hub is offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise SasrError(
            "push_to_hub needs the network, but HF_HUB_OFFLINE is set; unset it or drop push_to_hub"
        )


def strict(line: dict[str, Any]) -> dict[str, Any]:
    """The line with each non-finite float as None: strict JSON (metrics.jsonl's numbers are strict)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in line.items()}


def truncate(path: Path, last_step: int) -> None:
    """Keep the lines of steps up to ``last_step`` (a resumed run rewrites the later ones)."""
    if path.exists():
        lines = [
            line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step
        ]
        path.write_text("".join(line + "\n" for line in lines))


# --- readers (compare, report, eval) ------------------------------------------------------------------------


def read_lines(run: Path, name: str = METRICS) -> list[dict[str, Any]]:
    """The JSON lines of a run's ``name`` file, in order (empty if there is none)."""
    path = Path(run) / name
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_status(run: Path) -> dict[str, Any]:
    """The run's ``run.json`` (empty if there is none)."""
    path = Path(run) / STATUS
    return json.loads(path.read_text()) if path.is_file() else {}


def finished(run: Path) -> bool:
    """Whether the run trained to its end."""
    return read_status(run).get("status") == "finished"
