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
- ``rng_state_RANK.pt``: python, numpy and torch generators of every process.
Under FSDP ``sharded/`` (a torch distributed checkpoint: every rank's shards of the trainable weights, the
optimizer's state and the reference) takes the place of ``model/``, ``optimizer.pt`` and
``reference.safetensors``.
The data position needs no state: each step's examples are a pure function of (seed, step).

It is written to ``.tmp-step-000012`` and renamed once complete, so a folder named ``step-*`` is always
whole; a killed save leaves only a ``.tmp-*`` folder, which is never picked up and is swept later.
"""

from __future__ import annotations

import json
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

PREFIX = "step-"
# What a failed write raises: the OS (disk full, permissions), torch.save, safetensors' writer.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def is_run_dir(path: Path) -> bool:
    """A run directory with its final model: its config.yaml and final/ (what ``sasr eval`` takes for a run)."""
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "final").is_dir()


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer_state.json").exists()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def latest(run_dir: Path) -> Path:
    found = complete_checkpoints(run_dir)
    if not found:
        raise SasrError(
            f"'{run_dir}' has no complete checkpoint to resume from (looked in {checkpoints_dir(run_dir)})"
        )
    return found[-1]


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
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
            tmp.rename(final)  # the checkpoint exists from here on, whole
        except WRITE_ERRORS as exc:
            error = exc
    error = _agree(acc, error)
    if error is not None:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(run_dir)
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
    acc = accelerator
    trainer_state = json.loads((path / "trainer_state.json").read_text())
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
