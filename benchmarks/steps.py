"""sasr's GRPO, SFT and SDFT steps against TRL's GRPOTrainer / SFTTrainer / experimental SDFTTrainer at
identical settings, and sasr's rollout engine against ``model.generate``.

Each side runs in its own subprocess (so each peak memory is its own), on the same model, prompts,
G, number of generated tokens (min_new_tokens = max_completion_length, so both sample exactly as many),
beta, loss type, LoRA or full fine-tuning, dtype. After --warmup untimed steps, --steps steps are timed; the
table gives medians and peak memory (resident on CPU, allocated on CUDA), and the last line the ratio TRL / sasr.

The rollout worker times, in one process, ``model.generate`` and the engine (eager; with CUDA graphs; with
torch.compile too under --compile) at --rollout-rows rows x --tokens tokens, and on CUDA the fraction of
the memory-bandwidth roofline reached: every decode step must read the weights and each row's KV cache.

    python benchmarks/steps.py --model smollm2-135m --steps 3 --tokens 128          # the CPU setting
    python benchmarks/steps.py --device cuda --compile                              # GPU: Qwen2.5-0.5B shape
    python benchmarks/steps.py --model tiny --steps 3 --tokens 32                   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORKERS = ("rollout", "sasr-grpo", "trl-grpo", "sasr-sft", "trl-sft", "sasr-sdft", "trl-sdft")
KINDS = ("sft", "grpo", "sdft")
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # HBM bytes/s by card name (SXM parts)


def sdft_alpha(a) -> float:
    """SDFT's alpha on both sides: 1 (the only one sampled_token takes), else TRL's default 0.5."""
    return 1.0 if a.sdft_mode == "sampled_token" else 0.5


def sasr_config(a, method: str, out: str) -> dict:
    return {
        "method": method,
        "steps": a.warmup + a.steps,
        "warmup_steps": 0 if method != "sft" else 1,
        "model": {"name": a.model, "gradient_checkpointing": a.gradient_checkpointing, "dtype": a.dtype},
        "lora": {"enabled": not a.full},
        "task": {"name": "arithmetic", "train_size": 256, "test_size": 0},
        "optim": {"learning_rate": 1e-5, "max_grad_norm": 1.0},
        "sft": {"batch_size": a.sft_batch},
        "grpo": {
            "batch_size": a.prompts,
            "num_generations": a.generations,
            "max_completion_length": a.tokens,
            "beta": a.beta,
            "loss_type": a.loss_type,
            "generation_kwargs": {"min_new_tokens": a.tokens},
            "cuda_graphs": not a.no_graphs,
        },
        "sdft": {
            "distillation_mode": a.sdft_mode,
            "distillation_alpha": sdft_alpha(a),
        },
        "eval": {"before": False, "after": False},
        "save_final": False,
        "report_to": ["none"],
        "output_dir": out,
    }


def run_sasr(a, kind: str) -> tuple[list[float], list[dict[str, float]]]:
    """Times ``Trainer.step``, the whole optimizer step as ``sasr train`` takes it."""
    from sasr.config import validate
    from sasr.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(validate(sasr_config(a, kind, out)), progress=False)
        times, pieces = [], []
        for step in range(1, a.warmup + a.steps + 1):
            _sync(a)
            t0 = time.perf_counter()
            line = trainer.step(step)
            _sync(a)
            times.append(time.perf_counter() - t0)
            timed = {k: v for k, v in line.items() if k.endswith("_seconds") and k != "step_seconds"}
            # what the step's line does not time itself: backward, the optimizer, scoring, the rows' layout
            timed["rest_seconds"] = times[-1] - sum(timed.values())
            pieces.append(timed)
    return times[a.warmup :], pieces[a.warmup :]


def run_trl(a, kind: str) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from sasr import models
    from sasr.tasks import Example, get_task

    task = get_task("arithmetic")
    examples = task.examples("train", 256, seed=0)
    tok = models.load_tokenizer(a.model)
    model = models.load_model(a.model, a.dtype)
    peft = (
        None
        if a.full
        else LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    )

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(a)
            times.append(time.perf_counter() - self.t0)

    common = dict(
        max_steps=a.warmup + a.steps,
        learning_rate=1e-5,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=a.device == "cpu",
        bf16=a.dtype == "bfloat16",
        dataloader_num_workers=0,
        gradient_checkpointing=a.gradient_checkpointing,
    )
    sampling = dict(  # TRL's sampling trainers (GRPO, SDFT) sample exactly as sasr does
        per_device_train_batch_size=a.prompts * a.generations,
        num_generations=a.generations,
        max_completion_length=a.tokens,
        generation_kwargs={"min_new_tokens": a.tokens},
        temperature=1.0,
        top_k=0,
    )
    shared = dict(model=model, processing_class=tok, peft_config=peft, callbacks=[Timer()])
    with tempfile.TemporaryDirectory() as out:
        if kind == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            data = Dataset.from_list([{"prompt": task.messages(ex), "answer": ex.answer} for ex in examples])

            def reward(completions, answer, **kw):  # the task's own judge, as sasr uses it
                texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
                return [task.score(t, Example("", "", a)).reward for t, a in zip(texts, answer)]

            args = GRPOConfig(output_dir=out, beta=a.beta, loss_type=a.loss_type, **sampling, **common)
            trainer = GRPOTrainer(reward_funcs=reward, args=args, train_dataset=data, **shared)
        elif kind == "sdft":  # the teacher: the base model shown the demonstration; the loss of --sdft-mode
            from trl.experimental.sdft import SDFTConfig, SDFTTrainer

            data = Dataset.from_list(
                [{"prompt": task.messages(ex), "privileged_context": task.target(ex)} for ex in examples]
            )
            args = SDFTConfig(
                output_dir=out,
                distillation_mode=a.sdft_mode,
                distillation_alpha=sdft_alpha(a),
                teacher_model_kind="base",
                **sampling,
                **common,
            )
            trainer = SDFTTrainer(args=args, train_dataset=data, **shared)
        else:
            from trl import SFTConfig, SFTTrainer

            data = Dataset.from_list(
                [
                    {
                        "prompt": task.messages(ex),
                        "completion": [{"role": "assistant", "content": task.target(ex)}],
                    }
                    for ex in examples
                ]
            )
            args = SFTConfig(
                output_dir=out, per_device_train_batch_size=a.sft_batch, max_length=512, **common
            )
            trainer = SFTTrainer(args=args, train_dataset=data, **shared)
        trainer.train()
    return times[a.warmup :]


def _sync(a) -> None:
    if a.device == "cuda":
        import torch

        torch.cuda.synchronize()


def _peak_mb(a) -> float:
    if a.device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second: the card's practical peak."""
    import torch

    x = torch.empty(2**29, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 2 * 10 / (time.perf_counter() - t0)


def run_rollout(a) -> dict:
    """Tokens/s of model.generate and of the engine variants; on CUDA the bandwidth roofline fraction."""
    import torch

    from sasr import models
    from sasr.data import render_prompts
    from sasr.rollout import generate
    from sasr.rollout.engine import kv_cache_bytes
    from sasr.tasks import get_task

    tok = models.load_tokenizer(a.model)
    model = models.load_model(a.model, a.dtype).to(a.device).eval()
    task = get_task("arithmetic")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    variants = {"generate": {"backend": "hf"}, "sasr eager": {"cuda_graphs": False}}
    if a.device == "cuda":
        variants["sasr graphs"] = {"cuda_graphs": True}
        if a.compile:
            variants["sasr graphs+compile"] = {"cuda_graphs": True, "compile": True}
    out = {}
    for rows in [int(r) for r in a.rollout_rows.split(",")]:
        prompts = render_prompts(tok, task, task.examples("test", rows, seed=0))
        P = len(tok(prompts[0]).input_ids)
        # KV bytes read per decode step, averaged over the T steps: each row reads P + t cached positions.
        step_bytes = weight_bytes + kv_cache_bytes(model, rows, P + a.tokens / 2)
        for name, opts in variants.items():
            times = []
            for _ in range(a.warmup + a.steps):
                _sync(a)
                t0 = time.perf_counter()
                generate(
                    model,
                    tok,
                    prompts,
                    max_new_tokens=a.tokens,
                    temperature=1.0,
                    min_new_tokens=a.tokens,
                    **opts,
                )
                _sync(a)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times[a.warmup :])
            out[f"{name} @{rows}"] = {
                "tok_s": rows * a.tokens / med,
                "median": med,
                "step_bytes": step_bytes,
                "rows": rows,
            }
    if a.device == "cuda":
        name = torch.cuda.get_device_name()
        copy_bw = _copy_bandwidth()
        bw = next((v for k, v in BANDWIDTH.items() if k in name), copy_bw)
        out["_device"] = {
            "name": name,
            "bandwidth": bw,
            "copy_bandwidth": copy_bw,
            "weight_bytes": weight_bytes,
        }
    return out


def worker(a) -> None:
    if a.worker == "rollout":
        print("RESULT " + json.dumps(run_rollout(a)))
        return
    side, kind = a.worker.split("-")
    times, pieces = run_sasr(a, kind) if side == "sasr" else (run_trl(a, kind), [])
    # sasr's step piece by piece (medians): rollout, reference and policy forward, the rest (backward, optimizer)
    breakdown = {k: statistics.median(p[k] for p in pieces) for k in (pieces[0] if pieces else {})}
    result = {
        "times": times,
        "median": statistics.median(times),
        "peak_mb": _peak_mb(a),
        "breakdown": breakdown,
    }
    print("RESULT " + json.dumps(result))


def print_rollout(res: dict) -> None:
    dev = res.pop("_device", None)
    base = {}
    for key, r in res.items():
        name, rows = key.split(" @")
        base.setdefault(rows, r["tok_s"]) if name == "generate" else None
        line = f"rollout {name:<20} rows {rows:>4}: {r['tok_s']:9.0f} tok/s ({r['tok_s'] / base[rows]:.2f}x generate)"
        if dev:
            roof = (
                r["rows"] * dev["bandwidth"] / r["step_bytes"]
            )  # tokens/s if every step ran at full bandwidth
            line += f", {r['tok_s'] / roof:6.1%} of the bandwidth roofline ({roof:.0f} tok/s)"
        print(line, flush=True)
    if dev:
        print(
            f"device {dev['name']}: roofline bandwidth {dev['bandwidth'] / 1e12:.2f} TB/s, measured copy "
            f"{dev['copy_bandwidth'] / 1e12:.2f} TB/s, weights {dev['weight_bytes'] / 1e9:.2f} GB"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default smollm2-135m on cpu, qwen2.5-0.5b-random on cuda")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", help="both sides (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--rollout-rows", default=None, help="rollout batch sizes (default prompts x generations)")
    p.add_argument("--compile", action="store_true", help="also time the engine with torch.compile (cuda)")
    p.add_argument("--no-graphs", action="store_true", help="sasr's GRPO step without CUDA graphs")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128, help="generated tokens per completion (fixed)")
    p.add_argument("--sft-batch", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--loss-type", default="grpo")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument(
        "--sdft-mode",
        default="topk_logits",
        choices=["sampled_token", "topk_logits", "full_logits"],
        help="SDFT's distillation_mode on both sides (TRL's and sasr's default: topk_logits, k 100, alpha 0.5)",
    )
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="on both sides (TRL's default is on)"
    )
    p.add_argument("--only", default=",".join(WORKERS), help="comma list of " + ",".join(WORKERS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.model = a.model or ("qwen2.5-0.5b-random" if a.device == "cuda" else "smollm2-135m")
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    a.rollout_rows = a.rollout_rows or str(a.prompts * a.generations)
    if a.worker:
        return worker(a)

    results = {}
    for name in a.only.split(","):
        cmd = [sys.executable, __file__, "--worker", name, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line.removeprefix("RESULT "))
        if name == "rollout":
            print_rollout(results[name])
            continue
        print(
            f"{name:<10} median {results[name]['median']:8.2f} s/step   peak {results[name]['peak_mb']:8.0f} MB   "
            f"steps {', '.join(f'{t:.2f}' for t in results[name]['times'])}",
            flush=True,
        )
        if results[name]["breakdown"]:
            print(
                "           of which "
                + ", ".join(
                    f"{k.removesuffix('_seconds')} {v:.2f} s" for k, v in results[name]["breakdown"].items()
                ),
                flush=True,
            )
    setting = (
        f"model={a.model} {'full' if a.full else 'LoRA'} prompts={a.prompts} G={a.generations} "
        f"tokens={a.tokens} beta={a.beta} loss={a.loss_type} device={a.device} dtype={a.dtype} "
        f"gradient_checkpointing={a.gradient_checkpointing}"
    )
    print(setting)
    for kind in KINDS:
        if f"sasr-{kind}" in results and f"trl-{kind}" in results:
            s, t = results[f"sasr-{kind}"], results[f"trl-{kind}"]
            print(
                f"{kind.upper()} step: TRL / sasr time {t['median'] / s['median']:.2f}x, "
                f"peak memory TRL / sasr {t['peak_mb'] / s['peak_mb']:.2f}x"
            )


if __name__ == "__main__":
    main()
