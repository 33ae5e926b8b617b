"""The training loop on accelerate. ``Trainer.step`` is one optimizer step, read top to bottom:

1. plan: the method decides what the step gathers and what its updates apply (``sasr.methods``);
2. collect: demonstrations and scored rollouts as rows (``sasr.collect``);
3. parts: the method makes weighted losses over those rows;
4. update: for each of the plan's updates, per micro-batch the passes its parts need and their loss
   (``sasr.objective``), backward, an optimizer step (``sasr.learner``);
5. observe: the method reads the gradient norm (and SASR its probe);
6. record: the step's metrics line (``sasr.metrics``).

``Trainer.train`` runs the steps and around them evaluates, logs, guards against non-finite updates, saves
checkpoints and stops on a signal; the run directory's files are ``sasr.run_dir``'s.
"""

from __future__ import annotations

import functools
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, gather_object, set_seed
from tqdm.auto import tqdm

from sasr import checkpoint, fsdp, metrics, models, trackers
from sasr.batch import Apply
from sasr.callbacks import Callbacks
from sasr.collect import Collector
from sasr.collect.examples import check_prompts, demonstration_source, training_examples
from sasr.config import TrainConfig
from sasr.errors import SasrError
from sasr.evaluate import GREEDY, evaluate, settings, summarise
from sasr.inputs import Inputs, function_record, ready_tokenizer
from sasr.learner import Learner, make_optimizer
from sasr.locks import FolderLock
from sasr.losses import ANCHORED_SFT_LOSSES
from sasr.methods import get_method, method_source
from sasr.model_card import model_card
from sasr.process import any_rank, on_stop_signals
from sasr.reference import ReferencePolicy
from sasr.rewards import Rewards
from sasr.rollout import stop_token_ids
from sasr.run_dir import (
    EVAL_COMPLETIONS,
    METRICS,
    RunDir,
    check_hub,
    check_resumable,
    completion_samples,
    hold,
    read_lines,
    resolve,
    strict,
)
from sasr.tasks import get_task
from sasr.tasks.dataset import any_text

# What an evaluation sample keeps (eval_completions.jsonl, with log_completions).
EVAL_SAMPLE_KEYS = ("question", "completion", "reward", "correct", "formatted", "length")


@dataclass
class RunResult:
    """What ``sasr.train`` returns; the run's steps are in ``output_dir``'s metrics.jsonl."""

    output_dir: Path
    counts: dict[str, int]
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    seconds: float


class TrainingStopped(SasrError):
    """A signal asked the run to stop; a checkpoint of ``step`` was saved."""

    def __init__(self, step: int, signal_name: str, run_dir: Path) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint saved")
        self.step, self.signal_name, self.run_dir = step, signal_name, run_dir


def make_accelerator(report_to: list[str] = (), bf16: bool = False) -> Accelerator:
    """accelerate on the GPU if there is one, else the CPU (several CPU processes talk over gloo).

    DDP does not broadcast buffers: a causal LM's buffers are constants (rotary frequencies), and a broadcast
    would make every forward call a collective, so ranks would have to make equally many calls, while the
    training passes make one per length group and each rank's completions have their own lengths
    (transformers' Trainer turns the broadcast off too when activations are recomputed).
    """
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if bf16 else "no",  # autocast over the float32 weights
        kwargs_handlers=[ddp],
        log_with=trackers.names(list(report_to)) or None,
        # The run directory is known only later (its name is broadcast with this accelerator): trackers.start
        # points the logging directory there before any tracker starts.
        project_config=ProjectConfiguration(logging_dir="."),
    )


def _accelerator(c: TrainConfig, sharded: bool) -> Accelerator:
    try:
        return make_accelerator(c.report_to, c.bf16)
    except ValueError as exc:  # another library (e.g. a TRL trainer) set up accelerate differently
        if sharded:  # on GPUs accelerate reads the FSDP settings here
            raise fsdp.refused(exc) from None
        raise SasrError(
            "this Python process already holds an accelerate state with other settings "
            f"({str(exc).splitlines()[0]}); run sasr in a fresh process"
        ) from None


def _model(
    c: TrainConfig, tokenizer, acc: Accelerator, sharded: bool, inputs: Inputs
) -> tuple[torch.nn.Module, list[int], int]:
    """The policy as it trains (activation checkpointing, LoRA, FSDP shards as set), the tokens that end its
    completions (EOS, end-of-turn) and the base model's parameter count. A caller's model object is used as it
    is (a peft model with its own adapters, or ``inputs.peft_config``'s added)."""
    model = inputs.model if inputs.model is not None else models.load_model(c.model.name, c.model.dtype)
    model.config.use_cache = False
    stop_ids = stop_token_ids(model, tokenizer)
    # N of the FLOPs count: the base model's parameters, before our adapter and without a caller's own
    parameters = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    if c.model.gradient_checkpointing:
        models.enable_activation_checkpointing(model)
    if inputs.peft_config is not None or (c.lora.enabled and not hasattr(model, "peft_config")):
        model = models.apply_lora(model, c.lora, inputs.peft_config)
    if sharded:  # in place, before the optimizer and the reference snapshot take its parameters
        model = fsdp.shard(model, acc)
    return model, stop_ids, parameters


class Trainer:
    """One run: built from a config (and a Python caller's objects, ``inputs``), checked and loaded at once;
    ``train`` takes the run directory's lock and trains."""

    def __init__(
        self,
        config: TrainConfig,
        overwrite: bool = False,
        progress: bool = True,
        inputs: Inputs | None = None,
    ) -> None:
        self.config = c = config
        self.inputs = inputs = inputs or Inputs()
        self.overwrite = overwrite
        self.sharded = fsdp.requested()
        if self.sharded:
            fsdp.check(c)
        self.accelerator = acc = _accelerator(c, self.sharded)
        self.progress = progress and acc.is_main_process
        set_seed(c.seed, device_specific=True)  # sampling differs per rank; method draws do not (own RNG)

        # Everything that can fail on bad input fails before the run directory is touched.
        if self.sharded:
            fsdp.plugin(acc)  # a config sasr cannot run is refused here
        # CUDA graphs replay against the weights' addresses, which FSDP frees and allocates anew at each gathering.
        self.cuda_graphs = c.grpo.cuda_graphs and not self.sharded
        if c.push_to_hub:
            check_hub()
        self.run_dir = resolve(c, acc)
        self.files = RunDir(self.run_dir, acc.is_main_process)
        train_examples, demos, rewards = self._data(c)
        if inputs.tokenizer is not None:
            self.tokenizer = ready_tokenizer(inputs.tokenizer, c.model.name)
        else:
            self.tokenizer = models.load_tokenizer(c.model.name)
        self.record = {  # run.json's inputs, a caller's model hashed before LoRA goes into it
            "reward_funcs": [function_record(f, e) for f, e in zip(rewards.funcs, c.reward_funcs)],
            **inputs.record(),
        }
        model, stop_ids, self.parameters = _model(c, self.tokenizer, acc, self.sharded, inputs)
        args = (train_examples, demos, self.tokenizer, rewards, stop_ids, acc, self.decoder, self.cuda_graphs)
        self.collector = Collector(c, self.task, *args)
        self._learner(model)
        self.callbacks = Callbacks(inputs.callbacks, self)
        self.lock: FolderLock | None = None
        self._reset()

    def _data(self, c: TrainConfig):
        """The task, the method, and what the collector draws from: (RL examples, demonstrations, rewards)."""
        self.task = task = self.inputs.task or get_task(c.task.name, **c.task.options())
        train_examples = training_examples(c, task)
        self.test_examples = task.examples("test", c.task.test_size, seed=c.seed)
        if any_text(task, self.test_examples):
            self.test_examples = []  # plain text has no answer to judge: no held-out evaluation
        if not train_examples:
            raise SasrError(f"task '{c.task.name}' produced no training examples")
        self.method = get_method(c.method, **c.method_kwargs(), processes=self.accelerator.num_processes)
        rewards = Rewards(task, c.reward_funcs, c.reward_weights, self.inputs.rewards)
        check_prompts(c, task, train_examples, self.method)
        demos = demonstration_source(c, task, train_examples, self.method, self.inputs.demo_task)
        return train_examples, demos, rewards

    def _learner(self, model) -> None:
        """The reference policy, the optimizer and its schedule, the model as it trains, the learner."""
        c, acc = self.config, self.accelerator
        self.reference = ReferencePolicy(model, use_lora=c.lora.enabled)
        self.method.attach(model, c.lora.enabled)
        anchored = c.sft.loss in ANCHORED_SFT_LOSSES  # ASFT's KL on demonstrations reads pi_ref too
        if not c.lora.enabled and (self.method.uses_reference or anchored):  # full fine-tuning: a copy
            self.reference.snapshot()
        optimizer, self.lr_scheduler = make_optimizer(model, c)
        # The scheduler is not passed to accelerate.prepare: its wrapper steps it once per process.
        if self.sharded:  # not prepared: accelerate would wrap it in DDP on a CPU, and on GPUs shard it again
            self.model, self.optimizer = model, AcceleratedOptimizer(optimizer, device_placement=False)
        else:
            self.model, self.optimizer = acc.prepare(model, optimizer)
        self.learner = Learner(
            c, self.model, self.optimizer, self.lr_scheduler, self.reference, acc, self.sharded
        )

    def _reset(self) -> None:
        """The bookkeeping of a run at step 0."""
        self.eval_before: dict[str, float] | None = None
        self.seconds_before = 0.0  # wall time of the segments before a resume (a checkpoint holds it)
        self.segments_before: list[list[float]] = []  # their [start, end] Unix times
        self.started, self.started_at = time.perf_counter(), time.time()
        self.finished_at: float | None = None  # when training (with its last evaluation) ended
        self.start_step, self.flops_total = 0, 0.0
        self.stop_signal: str | None = None
        self.stopped_by: str | None = None  # the callback whose should_training_stop ended the run

    def _start(self, resume_from: Path | None, resume: bool) -> None:
        """The run's bookkeeping from zero or from ``resume_from``'s checkpoint; its files and trackers."""
        c, acc = self.config, self.accelerator
        self._reset()
        if resume_from:
            self.start_step, weights, state = checkpoint.load(resume_from, acc, self.sharded)
            self.load_state_dict(weights, state, resume_from)
        if acc.is_main_process:
            if resume:
                self.files.reopen(c, self.start_step)
            else:
                self.files.create(c)
            self._write_status("running", step=self.start_step)
            trackers.start(acc, c.report_to, self.run_dir, c.model_dump(mode="json"), self.start_step)
        acc.wait_for_everyone()

    # --- one step, and the loop ---------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, Any]:
        """One step of training (its updates, each num_iterations times on rollouts); returns its metrics line
        (held-out evaluation is ``train``'s)."""
        c, t0 = self.config, time.perf_counter()
        plan = self.method.plan(step)  # 1. plan: what to gather, what to apply
        got = self.collector.collect(step, plan.gather)  # 2. collect: demonstrations, rollouts [B rows]
        if self.method.observes_outcomes and plan.gather.prompts:  # every process's (example, solved)
            self.method.outcomes(plan, self.collector.outcomes(got))
            grown = self.method.follow_up(plan)  # more rows and updates the outcomes call for
            if grown is not None:
                got, plan = self.collector.more(got, step, plan.gather, grown.gather), grown
        parts, route = self.method.parts(plan, got.rows)  # 3. parts: weighted losses over those rows
        if plan.gather.prompts and (c.log_completions or c.num_completions_to_print):
            samples = completion_samples(
                step, self.accelerator.process_index, got.rows, parts, got.extra, self.tokenizer
            )
            self.files.log_samples(
                self.accelerator, step, samples, c.log_completions, c.num_completions_to_print
            )
        update = self.learner.update(plan, got.rows, parts)  # 4. update(s)
        probe_rows = self.collector.probe_rows(step) if plan.gather.probe else None
        probe = self.learner.probe(probe_rows) if probe_rows is not None else None
        self.method.observe(plan, update.grad_norm if update.finite else None, probe)  # 5. observe
        if step == self.method.reference_step and c.grpo.reference == "warmup":
            self.reference.snapshot()
        stats = {**got.stats, **route, **update.stats}
        if probe_rows is not None:  # the probe's forward and backward pass is compute too
            stats["trained_tokens"] += probe_rows.completion_mask.sum().item()
        seconds = time.perf_counter() - t0
        line = metrics.record(  # 6. record: the step's metrics line
            self.accelerator, plan, update, stats, seconds, self.parameters, self.flops_total, probe
        )
        self.flops_total = line["flops_total"]
        return line

    def train(self, resume: bool | str | Path = False) -> RunResult:
        """Train from the start step to the end: ``resume`` True continues the run directory from its newest
        complete checkpoint, a path from that checkpoint. The run directory's lock is held meanwhile and
        released however it ends."""
        acc = self.accelerator
        self.lock = hold(self.run_dir, self.overwrite, bool(resume), acc)
        try:
            if resume:
                check_resumable(self.run_dir, self.config, self.record)
                source = checkpoint.latest(self.run_dir) if resume is True else Path(resume)
            self._start(source if resume else None, bool(resume))
            return self._train()
        finally:
            self.release()

    def release(self) -> None:
        """Let another command use the run directory (idempotent)."""
        if self.lock is not None:
            self.lock.release()

    def _train(self) -> RunResult:
        c = self.config
        self.started, self.started_at = time.perf_counter(), time.time()
        history = read_lines(self.run_dir)[: self.start_step] if self.start_step else []
        self.callbacks.begin(self.run_dir, self.progress, self.start_step, history)
        self._event("on_train_begin", self.start_step)
        if self.start_step == 0 and c.eval.before and self.test_examples:
            self.eval_before = self.evaluate("eval before", step=0)
            self._event("on_evaluate", 0, metrics=eval_keys(self.eval_before))
        after: dict[str, float] | None = None
        nonfinite = 0
        self.steps_done = c.steps  # fewer when max_flops stops the run first
        steps = range(self.start_step + 1, c.steps + 1)
        bar = tqdm(
            steps,
            desc=self.method.name,
            disable=not self.progress,
            unit="step",
            initial=self.start_step,
            total=c.steps,
        )
        with on_stop_signals(self._on_signal):
            for step in bar:
                events = self.callbacks
                events.event("on_step_begin", step - 1)
                if events.raised:
                    self._callback_failed(step - 1)
                line = self.step(step)
                nonfinite = nonfinite + 1 if line.get("skipped") else 0
                control = events.event("on_step_end", step)
                after = self._held_out(step, line, control) or after
                self._log(line)
                if not events.raised:
                    events.state.log_history.append(line)
                    events.event("on_log", step, logs=line)
                bar.set_postfix(metrics.postfix(line), refresh=False)
                if c.max_flops and self.flops_total >= c.max_flops:  # every rank: the same reduced counts
                    self.steps_done = step
                    break

                if nonfinite >= c.optim.max_nonfinite_steps:  # guard, save, stop
                    self._write_status("failed", step=step)
                    raise SasrError(
                        f"{nonfinite} non-finite losses or gradient norms in a row (last at step {step}); "
                        "lower optim.learning_rate or set optim.max_grad_norm"
                    )
                self._save_or_stop(step, control)
                if control.should_training_stop:  # a callback's early stop: finished, as max_flops does
                    self.steps_done, self.stopped_by = step, events.handler.stopped_by or "a callback"
                    break
        bar.close()
        return self._finish(after)

    def _held_out(self, step: int, line: dict[str, Any], control) -> dict[str, float] | None:
        """The evaluation ``eval.every`` or a callback asks for after ``step``, its greedy numbers added to the
        step's line; returns it when it is the evaluation after training."""
        c, events = self.config, self.callbacks
        due = c.eval.every and step % c.eval.every == 0
        if not (due or control.should_evaluate) or not self.test_examples or events.raised:
            return None
        final = step == c.steps and c.eval.after  # the final evaluation's greedy part is this one
        held_out = self.evaluate(
            *(("eval after", c.eval.samples) if final else (f"eval step {step}", 0)), step
        )
        line.update({f"eval_{k}": v for k, v in held_out.items() if k != "n" and k in GREEDY})
        control.should_evaluate = False
        events.event("on_evaluate", step, metrics=eval_keys(held_out))
        return held_out if final else None

    def _save_or_stop(self, step: int, control) -> None:
        """A checkpoint of ``step`` when one is due, asked for, or the run stops here (a signal, a callback
        that raised); then the stop."""
        c, acc, events = self.config, self.accelerator, self.callbacks
        stop = self._stop_requested()
        due = c.save_every and step % c.save_every == 0 and step < c.steps
        if stop or events.raised or due or control.should_save:
            model = acc.unwrap_model(self.model)
            checkpoint.save(self.run_dir, step, model, self.state_dict(), acc, c.save_total_limit)
            control.should_save = False
            if not events.raised:
                events.event("on_save", step)
        if events.raised:
            self._callback_failed(step, saved=True)
        if stop:
            self._write_status("stopped", step=step)
            raise TrainingStopped(step, stop, self.run_dir)

    def _event(self, name: str, step: int, **kwargs: Any) -> None:
        """A callback event outside the steps; a raise fails the run with nothing more to save."""
        self.callbacks.event(name, step, **kwargs)
        if self.callbacks.raised:
            self._callback_failed(step, saved=None)

    def _callback_failed(self, step: int, saved: bool | None = False) -> None:
        """A callback raised after ``step``: that step's checkpoint is written (unless it was, or ``saved`` is
        None: before any step), run.json says failed, and ``CallbackError`` names the callback."""
        c, acc = self.config, self.accelerator
        if saved is False and step > self.start_step:
            model = acc.unwrap_model(self.model)
            checkpoint.save(self.run_dir, step, model, self.state_dict(), acc, c.save_total_limit)
        kept = checkpoint.complete_checkpoints(self.run_dir)
        kept_text = f"its checkpoint {kept[-1].name} is kept" if kept else "it has no checkpoint yet"
        error = self.callbacks.error(step, kept_text)
        r = self.callbacks.raised
        self._write_status("failed", step=step, callback=f"{r.name}.{r.event}", error=str(r.error))
        raise error

    def _finish(self, after: dict[str, float] | None) -> RunResult:
        """The last evaluation (unless the last step's was it), the final model, run.json, the trackers."""
        c, acc = self.config, self.accelerator
        if after is None and c.eval.after and self.test_examples:
            after = self.evaluate("eval after", c.eval.samples, self.steps_done)
            self._event("on_evaluate", self.steps_done, metrics=eval_keys(after))
        seconds, self.finished_at = self.elapsed(), time.time()
        result = RunResult(self.run_dir, dict(self.method.counts), self.eval_before, after, seconds)
        unwrapped = acc.unwrap_model(self.model)
        whole = models.whole_model(unwrapped, c, self.sharded, acc.is_main_process) if c.save_final else None
        self._save_final(whole, result)
        if acc.is_main_process:
            if c.push_to_hub:
                self.files.push_to_hub(c.hub_model_id)
            early = {"max_flops_step": self.steps_done} if self.steps_done < c.steps else {}
            if self.stopped_by:
                early = {"stopped_early": {"step": self.steps_done, "by": self.stopped_by}}
            self._write_status("finished", **summary(c, result), **early)
            trackers.finish(acc)
        acc.wait_for_everyone()
        self.callbacks.event("on_train_end", self.steps_done)
        if self.callbacks.raised:  # the run is whole: its status stays finished
            raise self.callbacks.error(self.steps_done, "its final model is written")
        return result

    def _save_final(self, whole, result: RunResult) -> None:
        """``final/`` (and ``adapter/``) from the main process; a failed write stops every process in one
        sentence, the checkpoints left as they were."""
        c, acc, error = self.config, self.accelerator, None
        if acc.is_main_process and c.save_final:
            card = functools.partial(model_card, c, result.counts, result.eval_before, result.eval_after)
            try:
                self.files.save_model(whole, self.tokenizer, card, c.lora.enabled)
            except (
                Exception
            ) as exc:  # also the tokenizers library's bare Exception ("File too large (os error 27)")
                error = exc
        if any_rank(acc, error is not None):
            saved = checkpoint.complete_checkpoints(self.run_dir)
            kept = f"its checkpoint {saved[-1].name} is intact" if saved else "it has no checkpoint"
            raise SasrError(
                f"cannot write the final model in {self.run_dir / 'final'} ({error or 'on the main process'}); "
                f"{kept}: free space and run sasr train --resume {self.run_dir}"
            )

    # --- resume state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beside the weights (``checkpoint`` writes it). Under FSDP the weights, the
        optimizers' states, the reference and the method's tensors are each rank's shards, under ``sharded``.
        Further optimizers (``Apply.optimizer``) and the method's tensors are there only when it has some."""
        reference = self.reference.snapshot_
        trainer = {
            "method": self.method.state_dict(),
            "eval_before": self.eval_before,
            "seconds": self.elapsed(),
            "segments": self.segments(),
            "reference": reference is not None,
            "flops_total": self.flops_total,
        }
        if (
            self.callbacks.state.stateful_callbacks
        ):  # EarlyStoppingCallback's patience, as transformers keeps it
            trainer["callbacks"] = self.callbacks.state_dict()
        extra = {"optimizers": self.learner.optimizer_states(), "method_tensors": self.method.tensors()}
        extra = {k: v for k, v in extra.items() if v}
        if extra.get("optimizers"):
            trainer["optimizers"] = sorted(extra["optimizers"])
        if self.sharded:
            sharded = fsdp.training_state(self.model, self.optimizer.optimizer)
            if reference is not None:
                sharded["reference"] = reference
            sharded.update(extra)
            return {"scheduler": self.lr_scheduler.state_dict(), "sharded": sharded, "trainer": trainer}
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.lr_scheduler.state_dict(),
            "reference": reference,
            "trainer": trainer,
            **extra,
        }

    def load_state_dict(self, weights: dict[str, torch.Tensor], state: dict[str, Any], source: Path) -> None:
        """Put back the trainable weights and what ``state_dict`` returned (read by ``checkpoint.load``)."""
        model = self.accelerator.unwrap_model(self.model)
        for name in state["trainer"].get("optimizers", []):  # made before their states are read into them
            self.learner.optimizer_for(Apply(optimizer=name))
        if self.sharded:  # read into the shards this run holds, of the same shapes
            if state["trainer"].get("reference") and self.reference.snapshot_ is None:
                self.reference.snapshot()  # a template the checkpoint's reference is read into
            template = self.state_dict()["sharded"]
            fsdp.load(state["sharded"], template)
            fsdp.load_training_state(model, self.optimizer.optimizer, template)
            state = {**state, **{k: template[k] for k in ("optimizers", "method_tensors") if k in template}}
        else:
            checkpoint.load_weights(model, weights, self.config.lora.enabled, source)
            self.optimizer.load_state_dict(state["optimizer"])
        self.learner.load_optimizer_states(state.get("optimizers", {}))
        self.method.load_tensors(state.get("method_tensors", {}))
        self.lr_scheduler.load_state_dict(state["scheduler"])
        if state.get("reference") is not None:
            self.reference.snapshot_ = state["reference"]
        self.method.load_state_dict(state["trainer"]["method"])
        self.eval_before = state["trainer"]["eval_before"]
        self.seconds_before = state["trainer"].get("seconds", 0.0)
        self.segments_before = state["trainer"].get("segments", [])
        self.flops_total = state["trainer"].get("flops_total", 0.0)  # 0: a checkpoint from before FLOPs
        self.callbacks.load_state_dict(state["trainer"].get("callbacks", {}))

    def elapsed(self) -> float:
        """Wall seconds of the whole run so far, the segments before a resume included."""
        return self.seconds_before + time.perf_counter() - self.started

    def segments(self) -> list[list[float]]:
        """[start, end] Unix times of each stretch this run trained (a resume starts a new one), so runs
        trained side by side can be told from runs trained one after another."""
        return [*self.segments_before, [self.started_at, self.finished_at or time.time()]]

    def _on_signal(self, name: str) -> None:
        """SIGTERM / SIGINT: finish the current step, save a checkpoint, stop (see ``_stop_requested``)."""
        self.stop_signal = name

    def _stop_requested(self) -> str | None:
        """The stop signal if any rank got one (all ranks must agree to stop after the same step)."""
        return (self.stop_signal or "SIGTERM") if any_rank(self.accelerator, bool(self.stop_signal)) else None

    # --- decoding, evaluation, logging ------------------------------------------------------------------------

    def decoder(self):
        """The model the rollout engine and the evaluation decode with (``models.decoding``)."""
        return models.decoding(self.accelerator.unwrap_model(self.model))

    def evaluate(self, desc: str, samples: int = 0, step: int = 0) -> dict[str, float]:
        """Held-out evaluation after ``step`` steps, examples split across ranks, records gathered, then
        averaged; with ``log_completions`` its greedy answers go to DIR/eval_completions.jsonl."""
        acc, c = self.accelerator, self.config
        shard = self.test_examples[acc.process_index :: acc.num_processes]
        how = {**settings(c, samples), "cuda_graphs": self.cuda_graphs, "keep_text": c.log_completions}
        with self.decoder() as model:
            records = evaluate(
                model, self.tokenizer, self.task, shard, progress=self.progress, desc=desc, **how
            )
        if acc.num_processes > 1:
            records = gather_object(records)
        if c.log_completions:  # the evaluation's greedy answers, as samples
            lines = ({"eval": desc, "step": step, **{k: r[k] for k in EVAL_SAMPLE_KEYS}} for r in records)
            self.files.append(EVAL_COMPLETIONS, lines)
        return summarise(records)

    def _log(self, line: dict) -> None:
        if self.config.logging_ranks:
            self.files.append_rank(
                self.accelerator.process_index, rank_line(line, self.model, self.optimizer)
            )
        if self.accelerator.is_main_process:
            clean = strict(line)  # a non-finite number (a skipped step) is written as null
            self.files.append(METRICS, [clean])
            trackers.log(self.accelerator, clean)

    def _write_status(self, status: str, **extra: Any) -> None:
        how = distributed(self.accelerator, self.sharded)
        self.files.write_status(
            status, **extra, segments=self.segments(), distributed=how, inputs=self.record
        )


def distributed(acc: Accelerator, sharded: bool) -> dict[str, Any]:
    """How the run is spread (run.json's ``distributed``)."""
    kind = "FSDP" if sharded else str(acc.distributed_type.value)
    return {
        "kind": kind,
        "num_processes": acc.num_processes,
        "device": acc.device.type,
        "threads": torch.get_num_threads(),
    }


def eval_keys(held_out: dict[str, float]) -> dict[str, float]:
    """An evaluation's numbers as transformers' on_evaluate gets them: ``eval_``-prefixed."""
    return {f"eval_{k}": v for k, v in held_out.items()}


def summary(c: TrainConfig, r: RunResult) -> dict[str, Any]:
    """What run.json holds once the run finished (a user's method file: its sha256 too)."""
    source = method_source(c.method)
    return {
        "method": c.method,
        **({"method_source": source} if source else {}),
        "task": c.task.name,
        "model": c.model.name,
        "steps": c.steps,
        **{f"{phase}_steps": n for phase, n in r.counts.items()},
        "eval_before": r.eval_before,
        "eval_after": r.eval_after,
        "seconds": r.seconds,
    }


def rank_line(line: dict[str, Any], model, optimizer) -> dict[str, Any]:
    """A rank's own line (ranks/rankN.jsonl): its phase and gradient norm (ranks agree), what it holds."""
    return {
        "step": line["step"],
        "phase": line["phase"],
        "grad_norm": line["grad_norm"],
        "state_mb": fsdp.held_bytes(model, optimizer) / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
