"""Checkpoints that resume exactly: written atomically, the newest complete one found, the last K kept.

What a run's state is, and how it is put back, is the trainer's (``Trainer.state_dict``,
``Trainer.load_state_dict``); this module writes and reads it, and puts a checkpoint's trainable weights back
into a model (``load_weights``).

A checkpoint ``DIR/checkpoints/step-000012/`` holds
- ``model/``: ``save_pretrained`` of the trainable part (the LoRA adapter, or the whole model);
- ``optimizer.pt``, ``scheduler.pt``; ``optimizer-NAME.pt`` for each further optimizer a method's updates
  name (``Apply.optimizer``), and ``method.safetensors`` for the method's tensors (``Method.tensors``), when
  it has some;
- ``reference.safetensors``: the reference snapshot, when the reference is one;
- ``trainer_state.json``: the step and the trainer's bookkeeping: the method's state (for SASR: G_warmup,
  g_last, its generator, counts), the evaluation before training, the wall seconds so far and the stretches
  of time they were spent in;
- ``rng_state_RANK.pt``: python, numpy and torch generators of every process;
- ``manifest.json``, written last: every other file's size and sha256.
Under FSDP ``sharded/`` (a torch distributed checkpoint: every rank's shards of the trainable weights, the
optimizer's state and the reference) takes the place of ``model/``, ``optimizer.pt`` and
``reference.safetensors``.
The data position needs no state: each step's examples are a pure function of (seed, step).

It is written to ``.tmp-step-000012`` and renamed once complete, so a killed save leaves only a ``.tmp-*``
folder, which is never picked up and is swept later. A ``step-*`` folder damaged later (a file truncated,
lost or changed) no longer matches its manifest: resuming passes over it, with a warning, to the newest one
that does, and the oldest checkpoints are deleted only once the newest has been read back whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sasr import fsdp
from sasr.errors import SasrError
from sasr.process import any_rank

log = logging.getLogger(__name__)

PREFIX, MANIFEST, STATE = "step-", "manifest.json", "trainer_state.json"
# What a failed write raises: the OS (disk full, permissions), torch.save, safetensors' writer.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
# What reading a damaged file raises: the OS, torch.load (a torn zip or pickle), safetensors' reader.
READ_ERRORS = (OSError, RuntimeError, SafetensorError, EOFError, ValueError, pickle.UnpicklingError)


def is_run_dir(path: Path) -> bool:
    """A run directory with its final model: its config.yaml and final/ (what ``sasr eval`` takes for a run)."""
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "final").is_dir()


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints whose save finished (renamed from ``.tmp-``), oldest first; see ``damage`` for whether
    each is still whole."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE).exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_manifest(folder: Path) -> None:
    """``manifest.json``: each file of the checkpoint (relative path) with its size and sha256."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files
    }
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def damage(path: Path) -> str | None:
    """Why the checkpoint at ``path`` is not whole (a file missing, of another size or content than its
    manifest says), or None. A checkpoint written before manifests existed is taken as it is."""
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        manifest = (
            json.loads((path / MANIFEST).read_text(encoding="utf-8")) if state.get("manifest") else None
        )
    except (OSError, ValueError) as exc:
        return f"{getattr(exc, 'filename', None) or STATE} unreadable"
    for name, want in (manifest or {"files": {}})["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} missing"
        if file.stat().st_size != want["size"]:
            return f"{name} has {file.stat().st_size} bytes, {want['size']} were written"
        if _sha256(file) != want["sha256"]:
            return f"{name} changed since it was written"
    return None


def latest(run_dir: Path) -> Path:
    """The newest checkpoint that is whole; each newer damaged one is named in a warning."""
    found = complete_checkpoints(run_dir)
    for path in reversed(found):
        reason = damage(path)
        if reason is None:
            return path
        log.warning("checkpoint %s is damaged (%s); trying the one before it", path, reason)
    if found:
        raise SasrError(
            f"every checkpoint of '{run_dir}' is damaged (the newest: {found[-1].name}, {damage(found[-1])}); "
            "the run cannot be resumed, train it again with --overwrite"
        )
    raise SasrError(
        f"'{run_dir}' has no complete checkpoint to resume from (looked in {checkpoints_dir(run_dir)})"
    )


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, model, state: dict[str, Any], accelerator, keep: int) -> Path:
    """Write the checkpoint of ``step`` atomically, then drop all but the newest ``keep``.

    ``model``: the unwrapped model (its trainable part goes through ``save_pretrained``); ``state``: the
    trainer's ``state_dict()`` (``optimizer``, ``scheduler``, ``reference`` snapshot or None, and ``trainer``:
    JSON-able bookkeeping), or under FSDP ``scheduler``, ``sharded`` (each rank's shards) and ``trainer``.
    """
    acc = accelerator
    root = checkpoints_dir(run_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    error = None
    if acc.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(state["scheduler"], tmp / "scheduler.pt")
            if "sharded" not in state:
                model.save_pretrained(tmp / "model")
                torch.save(state["optimizer"], tmp / "optimizer.pt")
                for name, optimizer in state.get("optimizers", {}).items():
                    torch.save(optimizer, tmp / f"optimizer-{name}.pt")
                if state.get("method_tensors"):
                    save_file(_contiguous(state["method_tensors"]), tmp / "method.safetensors")
            if state.get("reference") is not None:
                save_file(_contiguous(state["reference"]), tmp / "reference.safetensors")
        except WRITE_ERRORS as exc:
            error = exc
    error = _agree(acc, error)
    if error is None and "sharded" in state:
        try:  # every rank writes its shards
            fsdp.save(tmp / "sharded", state["sharded"])
        except WRITE_ERRORS as exc:
            error = exc
        error = _agree(acc, error)
    if error is None:
        try:
            torch.save(_rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
        except WRITE_ERRORS as exc:
            error = exc
    error = _agree(acc, error)
    if error is None and acc.is_main_process:
        try:
            trainer_state = {"step": step, **state["trainer"], "num_processes": acc.num_processes}
            (tmp / STATE).write_text(json.dumps({**trainer_state, "manifest": True}))
            _write_manifest(tmp)
            if final.exists():  # this step's checkpoint again: a resume fell back past a damaged one
                shutil.rmtree(final)
            tmp.rename(final)  # the checkpoint exists from here on, whole
            reason = damage(final)  # read back before any older checkpoint is deleted
            if reason is not None:
                shutil.rmtree(final, ignore_errors=True)
                error = OSError(f"read back, {reason}")
        except WRITE_ERRORS as exc:
            error = exc
    error = _agree(acc, error)
    if error is not None:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for p in complete_checkpoints(run_dir) if damage(p) is None]
        intact = (
            f"the previous checkpoint {previous[-1]} is intact"
            if previous
            else "no earlier checkpoint exists"
        )
        raise SasrError(f"cannot write the checkpoint of step {step} in {root} ({error}); {intact}")
    if acc.is_main_process:
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tensors.items()}


def _agree(acc, error: Exception | None) -> Exception | None:
    """Every rank learns whether any rank failed, so none waits forever on a barrier."""
    if any_rank(acc, error is not None) and error is None:
        error = OSError("another process failed to write its part")
    return error


def load(
    path: Path, accelerator, sharded: bool = False
) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Read what ``save`` wrote and restore this process's random generators. Returns (step, the trainable
    weights, the trainer's state) for ``Trainer.load_state_dict``; for an FSDP run (``sharded``) no weights,
    and the trainer's state names the sharded checkpoint to read."""
    try:
        return _load(path, accelerator, sharded)
    except READ_ERRORS as exc:
        raise SasrError(
            f"checkpoint {path} cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "delete it to resume from the one before it"
        ) from None


def _load(path: Path, accelerator, sharded: bool) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    acc = accelerator
    trainer_state = json.loads((path / STATE).read_text())
    if (path / "sharded").is_dir() != sharded:
        how = "with" if not sharded else "without"
        raise SasrError(
            f"checkpoint {path} was written {how} FSDP; resume it with the accelerate config it was trained with"
        )
    if trainer_state["num_processes"] != acc.num_processes:
        raise SasrError(
            f"checkpoint {path} was written by {trainer_state['num_processes']} processes; resume with the same "
            f"number (now {acc.num_processes})"
        )
    device = (
        "cpu" if acc.device.type == "cpu" else str(acc.device)
    )  # safetensors refuses a CPU rank's 'cpu:0'
    state = {"scheduler": torch.load(path / "scheduler.pt", weights_only=False), "trainer": trainer_state}
    if sharded:
        weights, state["sharded"] = {}, path / "sharded"
    else:
        weights = load_file(next((path / "model").glob("*.safetensors")), device=device)
        reference = path / "reference.safetensors"
        state["optimizer"] = torch.load(path / "optimizer.pt", map_location=device, weights_only=False)
        state["reference"] = load_file(reference, device=device) if reference.exists() else None
        state["optimizers"] = {
            p.stem.removeprefix("optimizer-"): torch.load(p, map_location=device, weights_only=False)
            for p in sorted(path.glob("optimizer-*.pt"))
        }
        tensors = path / "method.safetensors"
        state["method_tensors"] = load_file(tensors, device=device) if tensors.exists() else {}
    _set_rng_state(torch.load(path / f"rng_state_{acc.process_index}.pt", weights_only=False))
    return int(trainer_state["step"]), weights, state


def load_weights(model, weights: dict[str, torch.Tensor], lora: bool, source: Path) -> None:
    """Put a checkpoint's trainable weights (``load``'s) into the unwrapped ``model``; refuse weights it lacks."""
    if lora:
        from peft import set_peft_model_state_dict

        unexpected = set_peft_model_state_dict(model, weights).unexpected_keys
    else:  # strict=False: save_pretrained leaves out tied weights (lm_head = embeddings)
        unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:
        raise SasrError(f"checkpoint {source} does not fit this model (unexpected weights: {unexpected[:3]})")
