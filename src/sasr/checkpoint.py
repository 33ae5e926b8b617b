"""Checkpoints that resume exactly: written atomically, the newest complete one found, the last K kept.

A checkpoint ``DIR/checkpoints/step-000012/`` holds
- ``model/``: ``save_pretrained`` of the trainable part (the LoRA adapter, or the whole model);
- ``optimizer.pt``, ``scheduler.pt``;
- ``reference.safetensors``: the reference snapshot, when the reference is one;
- ``trainer_state.json``: the step, the method's state (for SASR: G_warmup, g_last, its generator, counts),
  the evaluation before training, the wall seconds so far;
- ``rng_state_RANK.pt``: python, numpy and torch generators of every process.
The data position needs no state: each step's examples are a pure function of (seed, step).

It is written to ``.tmp-step-000012`` and renamed once complete, so a folder named ``step-*`` is always
whole; a killed save leaves only a ``.tmp-*`` folder, which is never picked up and is swept later.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sasr.errors import SasrError

if TYPE_CHECKING:
    from sasr.trainer import Trainer

PREFIX = "step-"
# What a failed write raises: the OS (disk full, permissions), torch.save, safetensors' writer.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


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


def save(trainer: Trainer, step: int) -> Path:
    """Write the checkpoint of ``step`` atomically, then drop all but the newest ``save_total_limit``."""
    acc = trainer.accelerator
    root = checkpoints_dir(trainer.run_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    error = None
    if acc.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            model = acc.unwrap_model(trainer.model)
            model.save_pretrained(tmp / "model")
            torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(trainer.lr_scheduler.state_dict(), tmp / "scheduler.pt")
            if trainer.reference.snapshot_ is not None:
                save_file(
                    {k: v.contiguous() for k, v in trainer.reference.snapshot_.items()},
                    tmp / "reference.safetensors",
                )
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
            state = {
                "step": step,
                "method": trainer.method.state_dict(),
                "eval_before": trainer.eval_before,
                "seconds": trainer.elapsed(),
                "num_processes": acc.num_processes,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            tmp.rename(final)  # the checkpoint exists from here on, whole
        except WRITE_ERRORS as exc:
            error = exc
    error = _agree(acc, error)
    if error is not None:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(trainer.run_dir)
        keep = (
            f"the previous checkpoint {previous[-1]} is intact"
            if previous
            else "no earlier checkpoint exists"
        )
        raise SasrError(f"cannot write the checkpoint of step {step} in {root} ({error}); {keep}")
    if acc.is_main_process:
        for old in complete_checkpoints(trainer.run_dir)[: -trainer.config.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _agree(acc, error: Exception | None) -> Exception | None:
    """Every rank learns whether any rank failed, so none waits forever on a barrier."""
    failed = torch.tensor([1.0 if error is not None else 0.0], device=acc.device)
    if acc.num_processes > 1:
        failed = acc.reduce(failed, reduction="sum")
    if failed.item() and error is None:
        error = OSError("another process failed to write its part")
    return error


def load(trainer: Trainer, path: Path) -> int:
    """Restore everything ``save`` wrote; returns the step the checkpoint was taken after."""
    from peft import set_peft_model_state_dict

    acc = trainer.accelerator
    state = json.loads((path / "trainer_state.json").read_text())
    if state["num_processes"] != acc.num_processes:
        raise SasrError(
            f"checkpoint {path} was written by {state['num_processes']} processes; resume with the same number "
            f"(now {acc.num_processes})"
        )
    model = acc.unwrap_model(trainer.model)
    weights_file = next((path / "model").glob("*.safetensors"))
    device = (
        "cpu" if acc.device.type == "cpu" else str(acc.device)
    )  # safetensors refuses 'cpu:0' (a CPU rank)
    weights = load_file(weights_file, device=device)
    if trainer.config.lora.enabled:
        unexpected = set_peft_model_state_dict(model, weights).unexpected_keys
    else:  # strict=False: save_pretrained leaves out tied weights (lm_head = embeddings)
        unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:
        raise SasrError(f"checkpoint {path} does not fit this model (unexpected weights: {unexpected[:3]})")
    trainer.optimizer.load_state_dict(
        torch.load(path / "optimizer.pt", map_location=device, weights_only=False)
    )
    trainer.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if (path / "reference.safetensors").exists():
        trainer.reference.snapshot_ = load_file(path / "reference.safetensors", device=device)
    trainer.method.load_state_dict(state["method"])
    trainer.eval_before = state["eval_before"]
    trainer.seconds_before = state.get("seconds", 0.0)
    _set_rng_state(torch.load(path / f"rng_state_{acc.process_index}.pt", weights_only=False))
    return int(state["step"])
