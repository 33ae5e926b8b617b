"""The training loop on accelerate. Read top to bottom: plan the step, build its rows, compute the loss,
step, log, save.

Every step is one optimizer step over rows of three kinds (``sasr.batch``): demonstrations, rollouts the
policy sampled for RL prompts (G per prompt, scored by the task's judge), and demonstrations placed inside a
prompt's group. The method (``sasr.methods``) plans which rows a step needs and makes weighted parts of them;
the loop computes every part from one reference pass and one policy pass and sums them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import (
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    gather_object,
    set_seed,
)
from tqdm.auto import tqdm
from transformers import get_scheduler

from sasr import checkpoint, fsdp, models, trackers
from sasr.batch import DEMO, KIND_NAMES, Plan, Rows
from sasr.collect import Collector, demonstration_source
from sasr.config import TrainConfig
from sasr.errors import SasrError
from sasr.eval.evaluate import GREEDY, evaluate, settings, summarise
from sasr.learner import Learner
from sasr.methods import get_method
from sasr.model_card import model_card
from sasr.process import any_rank, on_stop_signals
from sasr.reference import ReferencePolicy
from sasr.rewards import Rewards
from sasr.rollout import stop_token_ids
from sasr.run_dir import COMPLETIONS, EVAL_COMPLETIONS, METRICS, RunDir, resolve, strict
from sasr.tasks import get_task

log = logging.getLogger(__name__)

# What an evaluation sample keeps (eval_completions.jsonl, with log_completions).
EVAL_SAMPLE_KEYS = ("question", "completion", "reward", "correct", "formatted", "length")


@dataclass
class RunResult:
    output_dir: Path
    counts: dict[str, int]
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


class TrainingStopped(Exception):
    """A signal asked the run to stop; a checkpoint of ``step`` was saved."""

    def __init__(self, step: int, signal_name: str, run_dir: Path) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint saved")
        self.step, self.signal_name, self.run_dir = step, signal_name, run_dir


def apply_lora(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


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


class Trainer:
    def __init__(
        self, config: TrainConfig, overwrite: bool = False, progress: bool = True, resume: bool = False
    ) -> None:
        self.config = c = config
        self.sharded = fsdp.requested()
        if self.sharded:
            fsdp.check(c)
        try:
            self.accelerator = acc = make_accelerator(c.report_to, c.bf16)
        except ValueError as exc:  # another library (e.g. a TRL trainer) set up accelerate differently
            if self.sharded:  # on GPUs accelerate reads the FSDP settings here
                raise fsdp.refused(exc) from None
            raise SasrError(
                "this Python process already holds an accelerate state with other settings "
                f"({str(exc).splitlines()[0]}); run sasr in a fresh process"
            ) from None
        self.progress = progress and acc.is_main_process
        set_seed(c.seed, device_specific=True)  # sampling differs per rank; method draws do not (own RNG)

        # Everything that can fail on bad input fails before the run directory is touched.
        if self.sharded:
            fsdp.plugin(acc)  # a config sasr cannot run is refused here
        # CUDA graphs replay against the weights' addresses, which FSDP frees and allocates anew at each gathering.
        self.cuda_graphs = c.grpo.cuda_graphs and not self.sharded
        if c.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise SasrError(
                "push_to_hub needs the network, but HF_HUB_OFFLINE is set; unset it or drop push_to_hub"
            )
        self.run_dir = resolve(c, overwrite, resume, acc)
        self.files = RunDir(self.run_dir, acc.is_main_process)
        resume_from = checkpoint.latest(self.run_dir) if resume else None
        self.task = get_task(c.task.name, **c.task.options())
        self.train_examples = self.task.examples("train", c.task.train_size, seed=c.seed)
        self.test_examples = self.task.examples("test", c.task.test_size, seed=c.seed)
        if not self.train_examples:
            raise SasrError(f"task '{c.task.name}' produced no training examples")
        self.method = get_method(c.method, **c.method_kwargs())
        self.rewards = Rewards(self.task, c.reward_funcs, c.reward_weights)
        demos = demonstration_source(c, self.task, self.train_examples, self.method)
        self.tokenizer = models.load_tokenizer(c.model.name)
        model = models.load_model(c.model.name, c.model.dtype)
        self.stop_ids = stop_token_ids(model, self.tokenizer)  # what ends a completion (EOS, end-of-turn)
        if c.model.gradient_checkpointing:
            models.enable_activation_checkpointing(model)
        if c.lora.enabled:
            model = apply_lora(model, c)
        if self.sharded:  # in place, before the optimizer and the reference snapshot take its parameters
            model = fsdp.shard(model, acc)
        self.collector = Collector(
            c,
            self.task,
            self.train_examples,
            demos,
            self.tokenizer,
            self.rewards,
            self.stop_ids,
            acc,
            self.decoder,
            self.cuda_graphs,
        )
        self.reference = ReferencePolicy(model, use_lora=c.lora.enabled)
        if not c.lora.enabled and self.method.uses_reference:  # full fine-tuning: pi_ref is a copy
            self.reference.snapshot()

        params = [p for p in model.parameters() if p.requires_grad]
        # torch's fused kernel: one pass per tensor, the same update up to float rounding (docs/performance.md).
        optimizer = torch.optim.AdamW(
            params,
            lr=c.optim.learning_rate,
            betas=(c.optim.adam_beta1, c.optim.adam_beta2),
            weight_decay=c.optim.weight_decay,
            fused=True,
        )
        # Not passed to accelerate.prepare: its wrapper steps the scheduler once per process.
        self.lr_scheduler = get_scheduler(
            c.optim.lr_scheduler_type,
            optimizer,
            num_warmup_steps=c.optim.lr_warmup_steps,
            num_training_steps=c.steps,
        )
        if self.sharded:  # not prepared: accelerate would wrap it in DDP on a CPU, and on GPUs shard it again
            self.model, self.optimizer = model, AcceleratedOptimizer(optimizer, device_placement=False)
        else:
            self.model, self.optimizer = acc.prepare(model, optimizer)
        self.learner = Learner(
            c, self.model, self.optimizer, self.lr_scheduler, self.reference, acc, self.sharded
        )

        self.eval_before: dict[str, float] | None = None
        self.seconds_before = 0.0  # wall time of the segments before a resume (a checkpoint holds it)
        self.segments_before: list[list[float]] = []  # their [start, end] Unix times
        self.started, self.started_at = time.perf_counter(), time.time()
        self.finished_at: float | None = None  # when training (with its last evaluation) ended
        self.start_step = 0
        if resume_from:
            self.start_step, weights, state = checkpoint.load(resume_from, acc, self.sharded)
            self.load_state_dict(weights, state, resume_from)
        self.stop_signal: str | None = None
        if acc.is_main_process:
            if resume:
                self.files.reopen(c, self.start_step)
            else:
                self.files.create(c)
            self._write_status("running", step=self.start_step)
            trackers.start(acc, c.report_to, self.run_dir, c.model_dump(mode="json"), self.start_step)
        acc.wait_for_everyone()

    # --- the loop ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beside the weights (``checkpoint`` writes it). Under FSDP the weights, the
        optimizer's state and the reference are each rank's shards, under ``sharded``."""
        reference = self.reference.snapshot_
        trainer = {
            "method": self.method.state_dict(),
            "eval_before": self.eval_before,
            "seconds": self.elapsed(),
            "segments": self.segments(),
            "reference": reference is not None,
        }
        if self.sharded:
            sharded = fsdp.training_state(self.model, self.optimizer.optimizer)
            if reference is not None:
                sharded["reference"] = reference
            return {"scheduler": self.lr_scheduler.state_dict(), "sharded": sharded, "trainer": trainer}
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.lr_scheduler.state_dict(),
            "reference": reference,
            "trainer": trainer,
        }

    def load_state_dict(self, weights: dict[str, torch.Tensor], state: dict[str, Any], source: Path) -> None:
        """Put back the trainable weights and what ``state_dict`` returned (read by ``checkpoint.load``)."""
        from peft import set_peft_model_state_dict

        model = self.accelerator.unwrap_model(self.model)
        unexpected = []
        if self.sharded:  # read into the shards this run holds, of the same shapes
            if state["trainer"].get("reference") and self.reference.snapshot_ is None:
                self.reference.snapshot()  # a template the checkpoint's reference is read into
            template = self.state_dict()["sharded"]
            fsdp.load(state["sharded"], template)
            fsdp.load_training_state(model, self.optimizer.optimizer, template)
        elif self.config.lora.enabled:
            unexpected = set_peft_model_state_dict(model, weights).unexpected_keys
        else:  # strict=False: save_pretrained leaves out tied weights (lm_head = embeddings)
            unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise SasrError(
                f"checkpoint {source} does not fit this model (unexpected weights: {unexpected[:3]})"
            )
        if not self.sharded:
            self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        if state.get("reference") is not None:
            self.reference.snapshot_ = state["reference"]
        self.method.load_state_dict(state["trainer"]["method"])
        self.eval_before = state["trainer"]["eval_before"]
        self.seconds_before = state["trainer"].get("seconds", 0.0)
        self.segments_before = state["trainer"].get("segments", [])

    def elapsed(self) -> float:
        """Wall seconds of the whole run so far, the segments before a resume included."""
        return self.seconds_before + time.perf_counter() - self.started

    def segments(self) -> list[list[float]]:
        """[start, end] Unix times of each stretch this run trained (a resume starts a new one), so runs
        trained side by side can be told from runs trained one after another."""
        return [*self.segments_before, [self.started_at, self.finished_at or time.time()]]

    def train(self) -> RunResult:
        c, acc = self.config, self.accelerator
        self.started, self.started_at = time.perf_counter(), time.time()
        if self.start_step == 0 and c.eval.before and c.task.test_size:
            self.eval_before = self.evaluate("eval before", step=0)
        history: list[dict[str, Any]] = []
        after: dict[str, float] | None = None
        nonfinite = 0
        bar = tqdm(
            range(self.start_step + 1, c.steps + 1),
            desc=c.method,
            disable=not self.progress,
            unit="step",
            initial=self.start_step,
            total=c.steps,
        )
        with on_stop_signals(self._on_signal):
            for step in bar:
                t0 = time.perf_counter()
                plan = self.method.plan(step)  # 1. plan: which rows the step needs
                got = self.collector.collect(step, plan)  # 2. build them: demonstrations, scored rollouts
                rows, stats, extra = got.rows, got.stats, got.extra
                parts, route = self.method.parts(plan, rows)  # the weighted parts the method makes of them
                if plan.prompts and (c.log_completions or c.num_completions_to_print):
                    self.log_completions(step, rows, parts, extra)
                # 3. backward: one reference and one policy pass per micro-batch; 4. step (num_iterations times)
                update = self.learner.update(plan, rows, parts)
                stats.update(route, **update.stats)
                probe = self.learner.probe(self.collector.probe_rows(step)) if plan.probe else None
                self.method.observe(plan, update.grad_norm if update.finite else None, probe)
                if step == self.method.reference_step and c.grpo.reference == "warmup":
                    self.reference.snapshot()
                nonfinite = 0 if update.finite else nonfinite + 1

                record = self._record(plan, update.loss, update.grad_norm, stats, time.perf_counter() - t0)
                if probe is not None:
                    record["probe_grad_norm"] = probe
                if not update.finite:
                    record["skipped"] = True
                if c.eval.every and step % c.eval.every == 0 and c.task.test_size:
                    if step == c.steps and c.eval.after:  # the final evaluation's greedy part is this one
                        held_out = after = self.evaluate("eval after", c.eval.samples, step)
                    else:
                        held_out = self.evaluate(f"eval step {step}", step=step)
                    record.update({f"eval_{k}": v for k, v in held_out.items() if k != "n" and k in GREEDY})
                history.append(record)
                self._log(record)
                bar.set_postfix(self._postfix(record), refresh=False)

                if nonfinite >= c.optim.max_nonfinite_steps:  # 6. guard, save, stop
                    self._write_status("failed", step=step)
                    raise SasrError(
                        f"{nonfinite} non-finite losses or gradient norms in a row (last at step {step}); "
                        "lower optim.learning_rate or set optim.max_grad_norm"
                    )
                stop = self._stop_requested()
                if stop or (c.save_every and step % c.save_every == 0 and step < c.steps):
                    checkpoint.save(
                        self.run_dir,
                        step,
                        acc.unwrap_model(self.model),
                        self.state_dict(),
                        acc,
                        c.save_total_limit,
                    )
                if stop:
                    self._write_status("stopped", step=step)
                    raise TrainingStopped(step, stop, self.run_dir)
        bar.close()

        if after is None and c.eval.after and c.task.test_size:
            after = self.evaluate("eval after", c.eval.samples, c.steps)
        seconds, self.finished_at = self.elapsed(), time.time()
        result = RunResult(self.run_dir, dict(self.method.counts), self.eval_before, after, seconds, history)
        whole = self.whole_model() if c.save_final else None  # under FSDP gathered on rank 0
        if acc.is_main_process:
            if c.save_final:
                self.save_final(result, whole)
            if c.push_to_hub:
                self.files.push_to_hub(c.hub_model_id)
            self._write_summary(result)
            trackers.finish(acc)
        acc.wait_for_everyone()
        return result

    def _on_signal(self, name: str) -> None:
        """SIGTERM / SIGINT: finish the current step, save a checkpoint, stop (see ``_stop_requested``)."""
        self.stop_signal = name

    def _stop_requested(self) -> str | None:
        """The stop signal if any rank got one (all ranks must agree to stop after the same step)."""
        return (self.stop_signal or "SIGTERM") if any_rank(self.accelerator, bool(self.stop_signal)) else None

    # --- the rows of a step, and its loss ---------------------------------------------------------------

    @contextlib.contextmanager
    def decoder(self):
        """The model the rollout engine decodes with: unwrapped, its weights whole (gathered under FSDP), and,
        under ``bf16``, called without the autocast accelerate wraps its forward in (the decode runs with the
        weights as they are)."""
        model = self.accelerator.unwrap_model(self.model)
        wrapped = model.__dict__.get("forward") if "_original_forward" in model.__dict__ else None
        if wrapped is not None:
            model.forward = model._original_forward
        try:
            with fsdp.gathered(model):
                yield model
        finally:
            if wrapped is not None:
                model.forward = wrapped

    # --- evaluation, logging, saving -------------------------------------------------------------------

    def evaluate(self, desc: str, samples: int = 0, step: int = 0) -> dict[str, float]:
        """Held-out evaluation after ``step`` steps, examples split across ranks, records gathered, then
        averaged; with ``log_completions`` its greedy answers go to DIR/eval_completions.jsonl."""
        acc, c = self.accelerator, self.config
        shard = self.test_examples[acc.process_index :: acc.num_processes]
        with self.decoder() as model:
            records = evaluate(
                model,
                self.tokenizer,
                self.task,
                shard,
                progress=self.progress,
                desc=desc,
                keep_text=c.log_completions,
                **{**settings(c, samples), "cuda_graphs": self.cuda_graphs},
            )
        if acc.num_processes > 1:
            records = gather_object(records)
        if c.log_completions and acc.is_main_process:  # the evaluation's greedy answers, as samples
            self.files.append(
                EVAL_COMPLETIONS,
                ({"eval": desc, "step": step, **{k: r[k] for k in EVAL_SAMPLE_KEYS}} for r in records),
            )
        return summarise(records)

    def _record(self, plan: Plan, loss: float, grad_norm: float, stats: dict, seconds: float) -> dict:
        acc = self.accelerator
        # Mean of each statistic over ranks. The plan, and so sasr's own keys, is the same on every rank; a
        # reward function's log_metric may name a number on some ranks only: the mean over those that have it.
        keys = sorted(stats)
        if acc.num_processes > 1:
            keys = sorted({k for ks in gather_object([keys]) for k in ks})
        values = torch.tensor(
            [loss, *(stats.get(k, math.nan) for k in keys)], device=acc.device, dtype=torch.float64
        )
        if acc.num_processes > 1:
            have = (~values.isnan()).double()
            totals = acc.reduce(torch.cat([values.nan_to_num(0.0) * have, have]), reduction="sum")
            n = len(values)
            values = (totals[:n] / totals[n:]).tolist()  # NaN where no rank has the key
        else:
            values = values.tolist()
        tokens = values[1 + keys.index("tokens")] * acc.num_processes
        record: dict[str, Any] = {
            "step": plan.step,
            "phase": plan.phase,
            "loss": values[0],
            "grad_norm": grad_norm,
            "lr": self.lr_scheduler.get_last_lr()[0],
            **{k: v for k, v in zip(keys, values[1:]) if k != "tokens"},
            **plan.info,
            "tokens": round(tokens),  # completion tokens of the training passes, every rank
            "tokens_per_second": tokens / seconds,
            "step_seconds": seconds,
        }
        return record

    @staticmethod
    def _postfix(r: dict) -> dict[str, str]:
        out = {"phase": r["phase"], "loss": f"{r['loss']:.3f}"}
        if "p_t" in r:
            out["p_t"] = f"{r['p_t']:.2f}"
        if "reward_mean" in r:
            out["reward"] = f"{r['reward_mean']:.2f}"
            out["acc"] = f"{r['accuracy']:.2f}"
        return out

    def _log(self, record: dict) -> None:
        if self.config.logging_ranks:  # every rank: its phase and gradient norm (ranks agree), what it holds
            line = {
                "step": record["step"],
                "phase": record["phase"],
                "grad_norm": record["grad_norm"],
                "state_mb": fsdp.held_bytes(self.model, self.optimizer) / 2**20,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
            self.files.append_rank(self.accelerator.process_index, line)
        if not self.accelerator.is_main_process:
            return
        clean = strict(record)  # a non-finite number (a skipped step) is written as null
        self.files.append(METRICS, [clean])
        trackers.log(self.accelerator, clean)

    def log_completions(self, step: int, rows: Rows, parts, extra: dict[str, list] | None = None) -> None:
        """The step's group rows as samples (TRL's log_completions): appended to DIR/completions.jsonl, and the
        first ``num_completions_to_print`` printed. Every rank's samples, gathered on the main process.
        ``extra``: columns reward functions added with log_extra, one value per group row."""
        c, acc, tok = self.config, self.accelerator, self.tokenizer
        grouped = (rows.kind != DEMO).nonzero().squeeze(1).tolist()
        cut = rows.cut()
        columns = {k: v for k, v in (extra or {}).items() if len(v) == len(grouped)}
        samples = [
            {
                "step": step,
                "rank": acc.process_index,
                "group": int(rows.group[i]),
                "kind": KIND_NAMES[int(rows.kind[i])],
                "parts": [p.name for p in parts if p.rows[i]],
                "prompt": tok.decode(
                    rows.prompt_ids[i][rows.prompt_mask[i].bool()], skip_special_tokens=True
                ),
                "completion": rows.texts[i],
                "reward": float(rows.rewards[i]),
                "advantage": float(rows.advantages[i]),
                "correct": bool(rows.correct[i]),
                "formatted": bool(rows.formatted[i]),
                "truncated": bool(cut[i]),
                **{k: v[j] for k, v in columns.items()},
            }
            for j, i in enumerate(grouped)
        ]
        if acc.num_processes > 1:
            samples = gather_object(samples)
        if not acc.is_main_process:
            return
        if c.log_completions:
            self.files.append(COMPLETIONS, samples)
            trackers.log_samples(acc, step, samples)
        for sample in samples[: c.num_completions_to_print]:
            tqdm.write(
                f"step {step} [{sample['kind']}, reward {sample['reward']:.2f}, advantage {sample['advantage']:+.2f}]"
                f" {sample['completion'][:300]!r}"
            )

    def whole_model(self) -> torch.nn.Module | None:
        """The trained model with its whole weights: the model itself, or under FSDP a copy built on rank 0 from
        the gathered weights (None on the other ranks; a collective)."""
        c, model = self.config, self.accelerator.unwrap_model(self.model)
        if not self.sharded:
            return model
        weights = fsdp.full_state_dict(model)
        if not self.accelerator.is_main_process:
            return None
        whole = models.load_model(c.model.name, c.model.dtype)
        if c.lora.enabled:
            whole = apply_lora(whole, c)
        whole.load_state_dict(weights)
        return whole

    def save_final(self, result: RunResult, model: torch.nn.Module) -> None:
        """DIR/final and, with LoRA, DIR/adapter, each with its model card. ``model``: ``whole_model()``'s."""
        card = functools.partial(
            model_card, self.config, result.counts, result.eval_before, result.eval_after
        )
        self.files.save_model(model, self.tokenizer, card, self.config.lora.enabled)

    def _write_status(self, status: str, **extra: Any) -> None:
        if not self.accelerator.is_main_process:
            return
        acc = self.accelerator
        how = {
            "kind": "FSDP" if self.sharded else str(acc.distributed_type.value),
            "num_processes": acc.num_processes,
            "device": acc.device.type,
            "threads": torch.get_num_threads(),
        }
        self.files.write_status(status, **extra, segments=self.segments(), distributed=how)

    def _write_summary(self, r: RunResult) -> None:
        summary = {
            "method": self.config.method,
            "task": self.config.task.name,
            "model": self.config.model.name,
            "steps": self.config.steps,
            **{f"{phase}_steps": n for phase, n in r.counts.items()},
            "eval_before": r.eval_before,
            "eval_after": r.eval_after,
            "seconds": r.seconds,
        }
        self._write_status("finished", **summary)


def train(
    config: TrainConfig | dict | str | Path,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
) -> RunResult:
    """Python API: ``sasr.train(config)`` with a TrainConfig, a nested dict, or a YAML path.
    ``resume=True`` continues ``config.output_dir`` from its newest checkpoint."""
    from sasr.config import build_config, validate

    if isinstance(config, (str, Path)):
        config = build_config(file=config)
    elif isinstance(config, dict):
        config = validate(config)
    return Trainer(config, overwrite=overwrite, progress=progress, resume=resume).train()
