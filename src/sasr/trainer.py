"""The training loop on accelerate. Read top to bottom: pick the phase, build the batch, compute the loss,
step, log, save.

Every step is one optimizer step of either SFT (a batch of demonstrations) or GRPO (a batch of prompts,
G sampled completions each). The schedule picks which; the loop never looks at the method's name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from sasr import checkpoint, models
from sasr.config import TrainConfig, to_yaml
from sasr.data import pick, sft_batch
from sasr.errors import SasrError
from sasr.evaluate import GREEDY, evaluate, score_all, summarise
from sasr.losses import completion_logprobs, group_advantages, grpo_loss, masked_mean, sft_loss
from sasr.reference import ReferencePolicy
from sasr.rollout import generate, render_prompts
from sasr.schedules import Decision, get_schedule
from sasr.tasks import get_task

log = logging.getLogger(__name__)


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


def resolve_run_dir(config: TrainConfig, overwrite: bool, resume: bool, acc: Accelerator) -> Path:
    """The run directory (identical on every rank), refused if it exists unless overwrite or resume."""
    name = config.output_dir or f"runs/{config.method}-{config.task.name}-{datetime.now():%Y%m%d-%H%M%S}"
    name = broadcast_object_list([name])[0] if acc.num_processes > 1 else name  # one timestamp for all ranks
    path = Path(name)
    if not resume and path.exists() and any(path.iterdir()) and not overwrite:
        raise SasrError(
            f"output directory '{path}' already exists; pass --overwrite or choose another --output"
        )
    return path


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


def make_accelerator() -> Accelerator:
    """accelerate on the GPU if there is one, else the CPU (several CPU processes talk over gloo).

    DDP does not broadcast buffers: a causal LM's buffers are constants (rotary frequencies), and a broadcast
    would make every forward call a collective, so ranks would have to make equally many calls, while the
    training passes make one per length group and each rank's completions have their own lengths
    (transformers' Trainer turns the broadcast off too when activations are recomputed).
    """
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no", kwargs_handlers=[ddp])


class Trainer:
    def __init__(
        self, config: TrainConfig, overwrite: bool = False, progress: bool = True, resume: bool = False
    ) -> None:
        self.config = c = config
        try:
            self.accelerator = acc = make_accelerator()
        except ValueError as exc:  # another library (e.g. a TRL trainer) set up accelerate differently
            raise SasrError(
                "this Python process already holds an accelerate state with other settings "
                f"({str(exc).splitlines()[0]}); run sasr in a fresh process"
            ) from None
        self.progress = progress and acc.is_main_process
        set_seed(c.seed, device_specific=True)  # sampling differs per rank; schedule draws do not (own RNG)

        # Everything that can fail on bad input fails before the run directory is touched.
        self.run_dir = resolve_run_dir(c, overwrite, resume, acc)
        resume_from = checkpoint.latest(self.run_dir) if resume else None
        self.task = get_task(c.task.name, **c.task.options())
        self.train_examples = self.task.examples("train", c.task.train_size, seed=c.seed)
        self.test_examples = self.task.examples("test", c.task.test_size, seed=c.seed)
        if not self.train_examples:
            raise SasrError(f"task '{c.task.name}' produced no training examples")
        self.schedule = get_schedule(
            c.method,
            steps=c.steps,
            warmup_steps=c.warmup_steps,
            seed=c.seed,
            gamma=c.schedule.gamma,
            interleave_prob=c.schedule.interleave_prob,
            interleave_period=c.schedule.interleave_period,
        )
        self.tokenizer = models.load_tokenizer(c.model.name)
        model = models.load_model(c.model.name, c.model.dtype)
        if c.model.gradient_checkpointing:
            models.enable_activation_checkpointing(model)
        if c.lora.enabled:
            model = apply_lora(model, c)
        self.reference = ReferencePolicy(model, use_lora=c.lora.enabled)
        if not c.lora.enabled and c.method != "sft":  # full fine-tuning: pi_ref is a copy
            self.reference.snapshot()

        params = [p for p in model.parameters() if p.requires_grad]
        # torch's fused kernel makes one pass per tensor: 0.04 s against foreach's 0.31 s a step for SmolLM2-135M's
        # 135M float32 parameters on a 2-core CPU, the same update up to float rounding (CPU, CUDA and MPS have it).
        optimizer = torch.optim.AdamW(
            params, lr=c.optim.learning_rate, betas=(c.optim.adam_beta1, c.optim.adam_beta2),
            weight_decay=c.optim.weight_decay, fused=True,
        )  # fmt: skip
        # Not passed to accelerate.prepare: its wrapper steps the scheduler once per process.
        self.lr_scheduler = get_scheduler(
            c.optim.lr_scheduler_type,
            optimizer,
            num_warmup_steps=c.optim.lr_warmup_steps,
            num_training_steps=c.steps,
        )
        self.model, self.optimizer = acc.prepare(model, optimizer)

        self.eval_before: dict[str, float] | None = None
        self.seconds_before = 0.0  # wall time of the segments before a resume (a checkpoint holds it)
        self.started = time.perf_counter()
        self.start_step = checkpoint.load(self, resume_from) if resume_from else 0
        self.writer = None
        self.stop_signal: str | None = None
        self.rank_log = os.environ.get("SASR_RANK_LOG_DIR")  # diagnostics: each rank's branch sequence
        if acc.is_main_process:
            if not resume:
                if self.run_dir.exists():
                    shutil.rmtree(self.run_dir)
                self.run_dir.mkdir(parents=True)
                (self.run_dir / "config.yaml").write_text(
                    to_yaml(c.model_copy(update={"output_dir": str(self.run_dir)}))
                )
            else:  # forget the lines of steps after the checkpoint: they are redone identically
                _truncate_metrics(self.run_dir / "metrics.jsonl", self.start_step)
                (self.run_dir / "config.yaml").write_text(to_yaml(c))
            self._write_status("running", step=self.start_step)
            if c.logging_tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.start_step + 1)
        acc.wait_for_everyone()

    # --- the loop ---------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Wall seconds of the whole run so far, the segments before a resume included."""
        return self.seconds_before + time.perf_counter() - self.started

    def train(self) -> RunResult:
        c, acc = self.config, self.accelerator
        self.started = time.perf_counter()
        if self.start_step == 0 and c.eval.before and c.task.test_size:
            self.eval_before = self.evaluate("eval before")
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
        with self._catch_signals():
            for step in bar:
                t0 = time.perf_counter()
                decision = self.schedule.decide(step)  # 1. pick the phase
                if decision.phase == "sft":  # 2-3. build the batch, compute the loss
                    loss, stats = self.sft_step(step)
                else:
                    loss, stats = self.grpo_step(step)
                grad_norm, finite = self.optimizer_step(loss, step)  # 4. step
                self.schedule.observe(decision, grad_norm if finite else None)
                if step == self.schedule.warmup_steps and c.grpo.reference == "warmup":
                    self.reference.snapshot()
                nonfinite = 0 if finite else nonfinite + 1

                record = self._record(decision, loss, grad_norm, stats, time.perf_counter() - t0)  # 5. log
                if not finite:
                    record["skipped"] = True
                if c.eval.every and step % c.eval.every == 0 and c.task.test_size:
                    if step == c.steps and c.eval.after:  # the final evaluation's greedy part is this one
                        held_out = after = self.evaluate("eval after", c.eval.samples)
                    else:
                        held_out = self.evaluate(f"eval step {step}")
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
                    checkpoint.save(self, step)
                if stop:
                    self._write_status("stopped", step=step)
                    raise TrainingStopped(step, stop, self.run_dir)
        bar.close()

        if after is None and c.eval.after and c.task.test_size:
            after = self.evaluate("eval after", c.eval.samples)
        seconds = self.elapsed()
        result = RunResult(
            self.run_dir, dict(self.schedule.counts), self.eval_before, after, seconds, history
        )
        if acc.is_main_process:
            if c.save_final:
                self.save_final()
            self._write_summary(result)
            if self.writer:
                self.writer.close()
        acc.wait_for_everyone()
        return result

    def optimizer_step(self, loss: torch.Tensor, step: int) -> tuple[float, bool]:
        """Backward, clip, update. Returns the pre-clip global gradient norm (read after the DDP all-reduce:
        the number SASR's p_t is computed from) and whether loss and norm were finite; if not, the update
        is skipped."""
        c, acc = self.config, self.accelerator
        acc.backward(loss)
        max_norm = c.optim.max_grad_norm if c.optim.max_grad_norm is not None else math.inf
        grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), max_norm))
        finite = math.isfinite(grad_norm) and math.isfinite(loss.item())
        if finite:
            self.optimizer.step()
        else:
            log.warning("step %d: non-finite loss or gradient norm; update skipped", step)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, finite

    @contextlib.contextmanager
    def _catch_signals(self):
        """SIGTERM / SIGINT: finish the current step, save a checkpoint, stop (see ``_stop_requested``)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self.stop_signal = signal.Signals(signum).name

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _stop_requested(self) -> str | None:
        """Whether any rank got a stop signal (all ranks must agree to stop after the same step)."""
        flag = torch.tensor([1.0 if self.stop_signal else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return (self.stop_signal or "SIGTERM") if flag.item() else None

    # --- the two kinds of step -------------------------------------------------------------------------

    def _examples(self, step: int, per_rank: int, kind: str):
        acc = self.accelerator
        idx = pick(
            len(self.train_examples),
            per_rank,
            step,
            self.config.seed,
            kind,
            acc.process_index,
            acc.num_processes,
        )
        return [self.train_examples[i] for i in idx]

    def sft_step(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """NLL of demonstrations, target tokens only."""
        c = self.config
        batch = sft_batch(
            self.tokenizer,
            self.task,
            self._examples(step, c.sft.batch_size, "sft"),
            c.sft.max_length,
            self.accelerator.device,
        )
        T = batch.completion_ids.size(1)
        logps, _ = completion_logprobs(self.model, batch.input_ids, batch.attention_mask, T)  # [B, T]
        loss = sft_loss(logps, batch.completion_mask)
        return loss, {"tokens": batch.completion_mask.sum().item()}

    def _now(self) -> float:
        """perf_counter once the device's queued work has finished, so differences time that work."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def grpo_step(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Sample G completions per prompt, score them, and take the clipped policy-gradient step."""
        g = self.config.grpo
        examples = self._examples(step, g.batch_size, "grpo")
        prompts = render_prompts(self.tokenizer, [self.task.messages(ex) for ex in examples])
        t_rollout = self._now()
        roll = generate(
            self.accelerator.unwrap_model(self.model),
            self.tokenizer,
            prompts,
            num_generations=g.num_generations,
            max_new_tokens=g.max_completion_length,
            max_prompt_length=g.max_prompt_length,
            temperature=g.temperature,
            top_p=g.top_p,
            backend=g.generation_backend,
            cuda_graphs=g.cuda_graphs,
            compile=g.torch_compile,
            **g.generation_kwargs,
        )  # B = prompts x G rows
        rollout_seconds = self._now() - t_rollout
        grouped_examples = [ex for ex in examples for _ in range(g.num_generations)]
        scores = score_all(self.task, roll.texts, grouped_examples)
        device = self.accelerator.device
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32, device=device)  # [B]
        advantages, zero_spread = group_advantages(rewards, g.num_generations, g.advantage, g.scale_rewards)

        T = roll.completion_ids.size(1)
        # The reference pass comes first: it may swap weights in place, which must not touch a live graph.
        # The G rows of a prompt share one pass over it (completion_logprobs finds them).
        t_reference = self._now()
        ref_logps = self.reference.logprobs(roll.input_ids, roll.attention_mask, T, g.temperature)  # [B, T]
        t_policy = self._now()
        logps, entropy = completion_logprobs(
            self.model, roll.input_ids, roll.attention_mask, T, g.temperature, with_entropy=True
        )  # [B, T]
        policy_seconds = self._now() - t_policy
        out = grpo_loss(
            logps,
            logps.detach(),  # pi_old: the policy that sampled, which is this one (one update per batch)
            ref_logps,
            advantages,
            roll.completion_mask,
            beta=g.beta,
            epsilon_low=g.epsilon,
            epsilon_high=g.epsilon_high if g.epsilon_high is not None else g.epsilon,
            loss_type=g.loss_type,
            max_completion_length=g.max_completion_length,
            use_bias_correction_kl=g.use_bias_correction_kl,
        )
        mask = roll.completion_mask
        stats = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            "accuracy": sum(s.correct for s in scores) / len(scores),
            "format_rate": sum(s.formatted for s in scores) / len(scores),
            "kl": out.kl,
            "entropy": masked_mean(entropy, mask).item(),
            "completion_length": mask.sum(1).float().mean().item(),
            # The longest completion: each training pass computes rows up to their length group's longest, at most
            # this (one group, and so 1 - mean / max padding, wherever forwards are collective).
            "completion_length_max": mask.sum(1).max().item(),
            "clip_fraction": out.clip_fraction,
            "zero_spread_fraction": zero_spread.float().mean().item(),
            "tokens": mask.sum().item(),
            # Where the step's time goes before backward (verl logs the same pieces as timing_s/*).
            "rollout_seconds": rollout_seconds,
            "reference_seconds": t_policy - t_reference,
            "policy_forward_seconds": policy_seconds,
        }
        if roll.logprobs is not None:  # how far the sampler's numbers are from the learner's (bf16, kernels)
            stats["sampler_logprob_gap"] = masked_mean((logps.detach() - roll.logprobs).abs(), mask).item()
        return out.loss, stats

    # --- evaluation, logging, saving -------------------------------------------------------------------

    def evaluate(self, desc: str, samples: int = 0) -> dict[str, float]:
        """Held-out evaluation, examples split across ranks, records gathered, then averaged."""
        acc, c = self.accelerator, self.config
        shard = self.test_examples[acc.process_index :: acc.num_processes]
        records = evaluate(
            acc.unwrap_model(self.model),
            self.tokenizer,
            self.task,
            shard,
            samples=samples,
            temperature=c.eval.temperature,
            max_new_tokens=c.eval.max_new_tokens,
            batch_size=c.eval.batch_size,
            max_prompt_length=c.grpo.max_prompt_length,
            progress=self.progress,
            desc=desc,
            backend=c.grpo.generation_backend,
            cuda_graphs=c.grpo.cuda_graphs,
        )
        if acc.num_processes > 1:
            records = gather_object(records)
        return summarise(records)

    def _record(self, d: Decision, loss: torch.Tensor, grad_norm: float, stats: dict, seconds: float) -> dict:
        acc = self.accelerator
        # Mean of each statistic over ranks (the branch, and so the keys, is the same on every rank).
        keys = sorted(stats)
        values = torch.tensor(
            [loss.item(), *(stats[k] for k in keys)], device=acc.device, dtype=torch.float64
        )
        values = acc.reduce(values, reduction="mean").tolist()
        tokens = values[1 + keys.index("tokens")] * acc.num_processes
        record: dict[str, Any] = {
            "step": d.step,
            "phase": d.phase,
            "loss": values[0],
            "grad_norm": grad_norm,
            "lr": self.lr_scheduler.get_last_lr()[0],
            **{k: v for k, v in zip(keys, values[1:]) if k != "tokens"},
            **d.info,
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
        if self.rank_log:  # every rank: its own branch and gradient norm, to check that ranks agree
            line = {"step": record["step"], "phase": record["phase"], "grad_norm": record["grad_norm"]}
            with open(Path(self.rank_log) / f"rank{self.accelerator.process_index}.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
        if not self.accelerator.is_main_process:
            return
        # Strict JSON: a non-finite number (a skipped step) is written as null.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        if self.writer:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(f"train/{k}", v, record["step"])
            self.writer.add_scalar("train/is_sft", float(record["phase"] == "sft"), record["step"])

    def save_final(self) -> None:
        """DIR/final: a plain transformers folder (LoRA merged); DIR/adapter: the LoRA adapter alone."""
        model = self.accelerator.unwrap_model(self.model)
        final = self.run_dir / "final"
        if self.config.lora.enabled:
            model.save_pretrained(self.run_dir / "adapter")
            self.tokenizer.save_pretrained(self.run_dir / "adapter")
            model = model.merge_and_unload()
        model.config.use_cache = True
        model.save_pretrained(final)
        self.tokenizer.save_pretrained(final)

    def _write_status(self, status: str, **extra: Any) -> None:
        if not self.accelerator.is_main_process:
            return
        (self.run_dir / "run.json").write_text(json.dumps({"status": status, **extra}, indent=2))

    def _write_summary(self, r: RunResult) -> None:
        summary = {
            "method": self.config.method,
            "task": self.config.task.name,
            "model": self.config.model.name,
            "steps": self.config.steps,
            "sft_steps": r.counts["sft"],
            "grpo_steps": r.counts["grpo"],
            "eval_before": r.eval_before,
            "eval_after": r.eval_after,
            "seconds": r.seconds,
        }
        self._write_status("finished", **summary)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the metrics lines of steps up to ``last_step`` (a resumed run rewrites the later ones)."""
    if path.exists():
        lines = [
            line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step
        ]
        path.write_text("".join(line + "\n" for line in lines))


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
