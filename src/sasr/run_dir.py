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
from sasr.locks import LOCK, FolderLock
from sasr.process import any_rank

log = logging.getLogger(__name__)

CONFIG, STATUS = "config.yaml", "run.json"
METRICS, COMPLETIONS, EVAL_COMPLETIONS = "metrics.jsonl", "completions.jsonl", "eval_completions.jsonl"
STEP_LINES = (METRICS, COMPLETIONS, EVAL_COMPLETIONS)  # one line per step's thing, each with its "step"


def resolve(config: TrainConfig, acc: Accelerator) -> Path:
    """The run directory (identical on every rank), one that can be written; whether an existing one may be
    used is ``hold``'s to say, under the lock."""
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
    return path


def refuse_existing(path: Path, overwrite: bool, resume: bool) -> None:
    if not resume and not overwrite and path.is_dir() and any(p.name != LOCK for p in path.iterdir()):
        raise SasrError(
            f"output directory '{path}' already exists; pass --overwrite or choose another --output"
        )


def hold(path: Path, overwrite: bool, resume: bool, acc: Accelerator) -> FolderLock | None:
    """The run directory's lock, the main process's, taken once the run's input has passed every check and
    before anything is read from or written to the directory; every process refuses together, naming the
    process that holds it. The directory is checked again under the lock (another run may have filled it)."""
    lock, refused = None, None
    if acc.is_main_process:
        try:
            lock = FolderLock(path, "sasr train --resume" if resume else "sasr train").acquire()
            refuse_existing(path, overwrite, resume)
        except SasrError as exc:
            refused = exc
            if lock:
                lock.release()
    if any_rank(acc, refused is not None):
        raise refused or SasrError(
            f"'{path}' is in use or was filled meanwhile (the main process says which)"
        )
    return lock


class RunDir:
    """The files of one run. Its writes happen on the main process only (each rank's own line aside);
    ``save_model`` and ``push_to_hub`` are called there (the whole model exists only there under FSDP)."""

    def __init__(self, path: Path, main: bool = True) -> None:
        self.path, self.main = Path(path), main

    def create(self, config: TrainConfig) -> None:
        """A fresh directory (anything there is removed) holding the resolved configuration."""
        if not self.main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        for old in self.path.iterdir():  # all but the lock this run holds
            if old.name != LOCK:
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
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
        each with its model card (``card(adapter=...)`` -> README.md text). Each is written beside its place
        and renamed into it once whole, so a failed write leaves no half folder."""
        folders = {"final": self.path / ".tmp-final"}
        try:
            if lora:
                folders["adapter"] = self.path / ".tmp-adapter"
                model.save_pretrained(folders["adapter"])
                tokenizer.save_pretrained(folders["adapter"])
                (folders["adapter"] / "README.md").write_text(
                    card(adapter=True)
                )  # in place of peft's template
                model = model.merge_and_unload()
            model.config.use_cache = True
            model.save_pretrained(folders["final"])
            tokenizer.save_pretrained(folders["final"])
            (folders["final"] / "README.md").write_text(card())
        except BaseException:
            for tmp in folders.values():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        for name, tmp in folders.items():
            shutil.rmtree(self.path / name, ignore_errors=True)
            tmp.rename(self.path / name)

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
    """Keep the lines of steps up to ``last_step`` (a resumed run rewrites the later ones); damaged lines go,
    named in one warning."""
    if path.exists():
        kept = [raw for raw, line in _lines(path) if line is not None and line.get("step", 0) <= last_step]
        path.write_bytes(b"".join(raw.rstrip(b"\r\n") + b"\n" for raw in kept))


# --- readers (compare, report, eval) ------------------------------------------------------------------------


def _lines(path: Path) -> list[tuple[bytes, dict[str, Any] | None]]:
    """(raw bytes, the JSON object or None where the line is damaged) for each non-blank line of ``path``; the
    damaged ones (not UTF-8, not JSON, not an object: a torn write, a hand edit) named in one warning."""
    out, damaged = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw.decode("utf-8"))
            except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
                line = None
            if not isinstance(line, dict):
                line = None
                damaged.append(number)
            out.append((raw, line))
    if damaged:
        where = ", ".join(map(str, damaged[:5])) + (
            f" and {len(damaged) - 5} more" if len(damaged) > 5 else ""
        )
        log.warning("%s: damaged line %s (not a JSON object) skipped", path, where)
    return out


def read_lines(run: Path, name: str = METRICS) -> list[dict[str, Any]]:
    """The JSON lines of a run's ``name`` file, in order (empty if there is none); a damaged line is named in
    one warning and skipped."""
    path = Path(run) / name
    if not path.is_file():
        return []
    return [line for _, line in _lines(path) if line is not None]


def read_status(run: Path) -> dict[str, Any]:
    """The run's ``run.json`` (empty if there is none); one sentence if it is damaged."""
    path = Path(run) / STATUS
    if not path.is_file():
        return {}
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        status = exc
    if not isinstance(status, dict):
        raise SasrError(
            f"{path} is damaged (not the JSON object sasr writes); restore it, or delete it and pass --task "
            "where a command asks for the run's task"
        )
    return status


def finished(run: Path) -> bool:
    """Whether the run trained to its end."""
    return read_status(run).get("status") == "finished"


def check_resumable(run: Path, config: TrainConfig, record: dict[str, Any]) -> None:
    """A run continues only with its own configuration (resume-safe keys aside) and the same objects: the
    same reward functions' code and the same model weights as run.json recorded; else one sentence naming the
    first difference."""
    from sasr.config import unsafe_changes

    saved_file = Path(run) / CONFIG
    if not saved_file.is_file():
        raise SasrError(f"'{run}' is not a run directory (no config.yaml); nothing to resume")
    unsafe_changes(run, saved_file, config)
    was = read_status(run).get("inputs")
    if not was:  # a run from before sasr recorded its inputs
        return
    for i, (old, new) in enumerate(zip(was.get("reward_funcs", []), record.get("reward_funcs", []))):
        if old.get("sha256") != new.get("sha256") or old.get("spec") != new.get("spec"):
            name = old.get("name") or old.get("spec")
            raise SasrError(
                f"cannot resume '{run}': reward function {i} was {name} (sha256 {str(old.get('sha256'))[:12]}) "
                f"and is now {new.get('name') or new.get('spec')} (sha256 {str(new.get('sha256'))[:12]}); pass "
                "the same function, or start a new run"
            )
    for key in ("datasets", "demo_datasets"):
        for name, old in (was.get(key) or {}).items():
            new = (record.get(key) or {}).get(name, {})
            if (old["num_rows"], old["columns"]) != (new.get("num_rows"), new.get("columns")):
                raise SasrError(
                    f"cannot resume '{run}': its {key[:-1]} '{name}' had {old['num_rows']} rows of columns "
                    f"{', '.join(old['columns'])}, and the one passed now has {new.get('num_rows', 'no')} rows; "
                    "pass the same dataset"
                )
    old_model, new_model = was.get("model"), record.get("model")
    if old_model and old_model.get("sha256") != (new_model or {}).get("sha256"):
        raise SasrError(
            f"cannot resume '{run}': it trained the model object {old_model['name_or_path']} (weights sha256 "
            f"{old_model['sha256'][:12]}), and another model is passed now; pass the same model as it was loaded"
        )
