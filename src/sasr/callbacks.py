"""transformers ``TrainerCallback``s at sasr's events, with transformers' own ``TrainingArguments``,
``TrainerState`` and ``TrainerControl``, so that a callback written for ``transformers.Trainer`` or TRL runs
unchanged (``EarlyStoppingCallback`` included).

Events, in the order ``Trainer.train`` sends them: on_train_begin; on_evaluate (the evaluation before
training); per step on_step_begin, on_step_end, on_evaluate (when one is due), on_log (the step's metrics
line), on_save (when a checkpoint is written); on_train_end. sasr evaluates before it logs (the evaluation's
numbers go into the step's line), so on_evaluate comes before on_log where transformers sends on_log first.

A callback that raises stops the run as a signal does (its step's checkpoint kept), in one sentence naming
the callback, the event and the error; with several processes the ranks agree on it, and on
``control.should_training_stop``, ``should_save`` and ``should_evaluate``, after every event.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler, ExportableState

from sasr.config import TrainConfig
from sasr.errors import SasrError


class CallbackError(SasrError):
    """A user's callback raised; the run stopped with its last checkpoint kept."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class Raised:
    """Which callback raised at which event, and what."""

    name: str
    event: str
    error: BaseException


class Handler(CallbackHandler):
    """transformers' handler without its flow callback (sasr's loop decides when to log, evaluate and save),
    each callback's call guarded: the first that raises is kept and the event's later callbacks are skipped."""

    def __init__(self, callbacks, model, processing_class, optimizer, lr_scheduler) -> None:
        self.callbacks = []
        for cb in callbacks:
            self.add_callback(cb)
        self.model, self.processing_class = model, processing_class
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.train_dataloader = self.eval_dataloader = None
        self.raised: Raised | None = None
        self.stopped_by: str | None = None  # the first callback.event that set should_training_stop

    def call_event(self, event, args, state, control, **kwargs):
        for callback in self.callbacks:
            try:
                result = getattr(callback, event)(
                    args,
                    state,
                    control,
                    model=self.model,
                    processing_class=self.processing_class,
                    optimizer=self.optimizer,
                    lr_scheduler=self.lr_scheduler,
                    train_dataloader=None,
                    eval_dataloader=None,
                    **kwargs,
                )
            except Exception as exc:  # a user's code: any exception stops the run cleanly
                self.raised = Raised(type(callback).__name__, event, exc)
                return control
            if result is not None:
                control = result
            if control.should_training_stop and self.stopped_by is None:
                self.stopped_by = f"{type(callback).__name__}.{event}"
        return control


def training_arguments(c: TrainConfig, run_dir: Path, progress: bool) -> TrainingArguments:
    """The run's settings under transformers' names, as callbacks read them. Built after sasr's Accelerator,
    whose state it reuses (``use_configured_state``); it creates no folder."""
    o = c.optim
    return TrainingArguments(
        output_dir=str(run_dir),
        run_name=run_dir.name,
        max_steps=c.steps,
        seed=c.seed,
        learning_rate=o.learning_rate,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        lr_scheduler_type=o.lr_scheduler_type,
        warmup_steps=o.lr_warmup_steps,
        max_grad_norm=o.max_grad_norm or 0.0,
        per_device_train_batch_size=c.grpo.batch_size,
        gradient_accumulation_steps=c.gradient_accumulation_steps,
        logging_steps=1,
        eval_strategy="steps" if c.eval.every else "no",
        eval_steps=c.eval.every or None,
        save_strategy="steps" if c.save_every else "no",
        save_steps=c.save_every or 500,
        save_total_limit=c.save_total_limit,
        metric_for_best_model="eval_accuracy",
        greater_is_better=True,
        report_to="none",
        disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(),
        accelerator_config={"use_configured_state": True},
    )


class Callbacks:
    """The run's callbacks, its ``TrainerState`` and ``TrainerControl``; ``event`` sends one event."""

    def __init__(self, callbacks: list, trainer: Any) -> None:
        c, acc = trainer.config, trainer.accelerator
        self.acc = acc
        self.handler = Handler(callbacks, None, trainer.tokenizer, trainer.optimizer, trainer.lr_scheduler)
        self.args: TrainingArguments | None = None
        self.state = TrainerState(
            max_steps=c.steps,
            logging_steps=1,
            eval_steps=c.eval.every or 500,
            save_steps=c.save_every or 500,
            train_batch_size=c.grpo.batch_size,
            is_local_process_zero=acc.is_local_main_process,
            is_world_process_zero=acc.is_main_process,
            stateful_callbacks=[cb for cb in callbacks if isinstance(cb, ExportableState)],
        )
        self.control = TrainerControl()
        self.trainer = trainer

    @property
    def active(self) -> bool:
        return bool(self.handler.callbacks)

    def begin(self, run_dir: Path, progress: bool, start_step: int, log_history: list[dict]) -> None:
        """Before on_train_begin: the arguments, and the state at the start step (a resume's lines so far)."""
        if not self.active:
            return
        self.args = self.args or training_arguments(self.trainer.config, run_dir, progress)
        self.state.global_step = start_step
        self.state.log_history = list(log_history)
        self.handler.model = self.acc.unwrap_model(self.trainer.model)

    def event(self, name: str, step: int, **kwargs: Any) -> TrainerControl:
        """Send ``name``; a callback that raised (on any process) ends it in ``CallbackError``."""
        if not self.active:
            return self.control
        self.state.global_step = step
        self.state.total_flos = self.trainer.flops_total
        self.control = self.handler.call_event(name, self.args, self.state, self.control, **kwargs)
        self._agree()
        return self.control

    def _agree(self) -> None:
        """Every process takes the same decisions: a raise anywhere, and any process's stop/save/evaluate."""
        flags = [
            self.handler.raised is not None,
            self.control.should_training_stop,
            self.control.should_save,
            self.control.should_evaluate,
        ]
        if self.acc.num_processes > 1:
            t = torch.tensor([float(f) for f in flags], device=self.acc.device)
            flags = [bool(v) for v in self.acc.reduce(t, reduction="sum").tolist()]
        raised, stop, save, evaluate = flags
        self.control.should_training_stop, self.control.should_save = stop, save
        self.control.should_evaluate = evaluate
        if raised and self.handler.raised is None:
            self.handler.raised = Raised("a callback", "an event", RuntimeError("on another process"))

    @property
    def raised(self) -> Raised | None:
        return self.handler.raised

    def error(self, step: int, kept: str) -> CallbackError:
        r = self.handler.raised
        return CallbackError(
            f"callback {r.name}.{r.event} raised {type(r.error).__name__}: {r.error} at step {step}; the run "
            f"stopped and {kept}: fix the callback and resume (SASRTrainer(...).train(resume_from_checkpoint=True) "
            "or sasr train --resume)",
            step,
        )

    def state_dict(self) -> dict[str, Any]:
        """The stateful callbacks' states (EarlyStoppingCallback's patience), by class name, as transformers
        keeps them in a checkpoint."""
        return {type(cb).__name__: cb.state() for cb in self.state.stateful_callbacks}

    def load_state_dict(self, states: dict[str, Any]) -> None:
        for cb in self.state.stateful_callbacks:
            saved = states.get(type(cb).__name__)
            if saved:
                for key, value in saved.get("args", {}).items():
                    setattr(cb, key, value)
                for key, value in saved.get("attributes", {}).items():
                    setattr(cb, key, value)
