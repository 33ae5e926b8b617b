"""FSDP2 in two gloo processes, launched as a user launches it: the same plans on both ranks, each rank holding
half the weights and optimizer state, a loadable final/, and a bit-identical run after SIGKILL and --resume."""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import (
    ENV,
    accelerate_launch,
    assert_same_run,
    launch_many,
    launched,
    read_metrics,
    two_gloo_ranks,
)
from safetensors.torch import load_file
from test_reliability import ARGS, wait_for
from transformers import AutoModelForCausalLM

from sasr import models
from sasr.cli import main
from sasr.run_dir import read_lines

ROOT = Path(__file__).resolve().parents[1]
# One SFT/GRPO method with LoRA, one hybrid with full fine-tuning (its reference a snapshot of the shards).
CASES = {
    "sasr-lora": ["--method", "sasr"],
    "luffy-full": ["--method", "luffy", "--set", "lora.enabled=false", "--set", "grpo.num_generations=3"],
}
RUN = ["--steps", "12", "--warmup-steps", "3", "--save-every", "3", "--set", "logging_ranks=true"]


def launch(*argv: str, **popen) -> subprocess.Popen:
    return accelerate_launch("fsdp_cpu", *argv, **popen)


def unsharded_mb(full_fine_tuning: bool) -> float:
    """What one process holds without sharding: every weight, and Adam's two moments of the trained ones."""
    model = models.load_model("tiny")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return (weights * 3 if full_fine_tuning else weights) / 2**20  # LoRA's moments are far below a MB


@pytest.fixture(scope="module", params=list(CASES))
def straight(request, tmp_path_factory):
    """The uninterrupted 12-step FSDP run of each case."""
    out = tmp_path_factory.mktemp(request.param) / "run"
    proc = launch(*ARGS, *CASES[request.param], *RUN, "--output", str(out), stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return request.param, out


def test_ranks_plan_alike_and_each_holds_half(straight):
    case, run = straight
    ranks = [read_lines(run / "ranks", f"rank{i}.jsonl") for i in (0, 1)]
    assert [x["phase"] for x in ranks[0]] == [x["phase"] for x in ranks[1]]
    assert len(ranks[0]) == 12 and {x["phase"] for x in ranks[0]} == (
        {"sft", "grpo"} if case == "sasr-lora" else {"mixed"}
    )
    assert [x["grad_norm"] for x in ranks[0]] == [x["grad_norm"] for x in ranks[1]]
    whole = unsharded_mb(full_fine_tuning=case == "luffy-full")
    for rank in ranks:  # each rank's shards of the weights and optimizer state: about half the whole
        assert 0.45 * whole < rank[-1]["state_mb"] < 0.6 * whole
    how = json.loads((run / "run.json").read_text())["distributed"]
    assert how.pop("threads") >= 1
    assert how == {"kind": "FSDP", "num_processes": 2, "device": "cpu"}


def test_final_is_an_ordinary_model_folder(straight):
    case, run = straight
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    trained = sum(p.numel() for p in model.parameters())
    assert trained == sum(p.numel() for p in models.load_model("tiny").parameters())  # merged, whole
    assert (run / "adapter" / "adapter_config.json").exists() == (case == "sasr-lora")
    ids = torch.tensor([[1, 2, 3]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_sigkill_then_resume_is_bit_identical(straight, tmp_path):
    case, reference = straight
    run = tmp_path / "run"
    # A new session: SIGKILL reaches the launcher and both ranks at once, as when a machine goes down.
    proc = launch(
        *ARGS, *CASES[case], *RUN, "--output", str(run), stderr=subprocess.DEVNULL, start_new_session=True
    )
    wait_for(lambda: (run / "checkpoints" / "step-000006").exists(), proc, timeout=300)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()
    resumed = launch("--resume", str(run), "--quiet", stderr=subprocess.PIPE, text=True)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert_same_run(reference, run)


def test_an_fsdp_checkpoint_resumed_without_fsdp_is_refused(straight, tmp_path, capsys):
    _, reference = straight
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert "was written with FSDP; resume it with the accelerate config" in capsys.readouterr().err


V2 = {"FSDP_VERSION": "2"}


@pytest.mark.parametrize(
    "env, extra, message",
    [
        (
            {"FSDP_VERSION": "1"},
            [],
            "sasr shards with FSDP2, but the accelerate config asks for FSDP version 1",
        ),
        (V2, [], "an FSDP config needs at least 2 processes"),
        (
            V2,
            ["--set", "bf16=true"],
            "mixed precision (bf16, or mixed_precision in the accelerate config) is not",
        ),
        (
            {**V2, "ACCELERATE_MIXED_PRECISION": "bf16"},
            [],
            "set mixed_precision: 'no' and model.dtype=bfloat16",
        ),
        ({**V2, "FSDP_ACTIVATION_CHECKPOINTING": "true"}, [], "set model.gradient_checkpointing=true"),
        (V2, ["--set", "grpo.torch_compile=true"], "grpo.torch_compile is not supported with FSDP"),
        ({**V2, "FSDP_AUTO_WRAP_POLICY": "BY_MOOD"}, [], "accelerate refused the FSDP settings"),
    ],
)
def test_fsdp_settings_sasr_cannot_run_are_one_sentence(env, extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = ["train", *ARGS, *extra, "--steps", "2", "--warmup-steps", "1", "--output", str(tmp_path / "run")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# The other methods, each with one setting whose path differs under FSDP: micro-batches (gradient sync only at
# the last), dynamic sampling (ranks decode different numbers of batches), the reference of the warm-up's end.
OTHERS = {
    "sft": ["--set", "gradient_accumulation_steps=2"],
    "grpo": ["--set", "grpo.dynamic_sampling=true", "--set", "grpo.max_num_gen_batches=3"],
    "sft-then-grpo": ["--set", "grpo.reference=warmup", "--set", "lora.enabled=false"],
    "interleave": ["--set", "gradient_accumulation_steps=2", "--set", "lora.enabled=false"],
    "chord": ["--set", "grpo.num_generations=3"],
    "hpt": ["--set", "grpo.num_generations=3", "--set", "lora.enabled=false"],
    "srft": ["--set", "grpo.num_generations=3", "--set", "gradient_accumulation_steps=2"],
    "sdft": ["--set", "sdft.teacher_model_kind=ema", "--set", "lora.enabled=false"],  # an average of shards
}


def test_every_other_method_trains_sharded(tmp_path):
    """Each other method trains 4 steps under FSDP: the ranks take the same phases and read the same
    gradient norm. One launch runs them all."""
    steps = []
    for method, extra in OTHERS.items():
        argv = [*ARGS, "--method", method, *extra, "--steps", "4", "--warmup-steps", "2"]
        argv += ["--set", "logging_ranks=true", "--set", "save_final=false"]
        steps.append({"argv": [*argv, "--output", str(tmp_path / method)]})
    proc = launch_many("fsdp_cpu", steps, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in OTHERS:
        run = tmp_path / method
        r0, r1 = (read_lines(run / "ranks", f"rank{i}.jsonl") for i in (0, 1))
        assert len(r0) == 4 and [x["phase"] for x in r0] == [x["phase"] for x in r1], method
        assert [x["grad_norm"] for x in r0] == [x["grad_norm"] for x in r1], method
        assert json.loads((run / "run.json").read_text())["status"] == "finished", method


def test_sharded_steps_compute_what_data_parallel_steps_do(straight, tmp_path):
    """The same run under DDP: the same losses and gradient norms, to float rounding (reduce-scatter and
    all-reduce add the ranks' gradients in different orders)."""
    case, run = straight
    ddp = tmp_path / "ddp"
    cmd = launched("ddp_cpu")
    proc = subprocess.run(
        [*cmd, *ARGS, *CASES[case], *RUN, "--output", str(ddp)], env=ENV, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded, plain = read_metrics(run, timings=False), read_metrics(ddp, timings=False)
    assert [r["phase"] for r in sharded] == [r["phase"] for r in plain]
    for a, b in zip(sharded, plain):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-7)
    got, want = (load_file(r / "final" / "model.safetensors") for r in (run, ddp))  # the trained weights
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)
    # and a DDP run's checkpoint is not resumed under FSDP
    shutil.rmtree(ddp / "final")
    again = launch("--resume", str(ddp), "--quiet", stderr=subprocess.PIPE, text=True)
    _, err = again.communicate(timeout=600)
    assert again.returncode != 0 and "was written without FSDP; resume it with the accelerate config" in err


def _gathered_rank(rank: int, init: str, out: str) -> None:
    """One rank of test_ranks_decode_for_different_lengths_within_one_gathering."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from sasr import fsdp

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = models.load_model("tiny")
    ids = torch.randint(5, 500, (2, 7), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        want = model(ids).logits
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    with torch.no_grad(), fsdp.gathered(model):
        for _ in range(rank + 1):  # rank 1 decodes one more step than rank 0: no collective may happen here
            got = model(ids).logits
    model(ids).logits.float().pow(2).mean().backward()  # then a sharded step, in lockstep again
    grad = next(p.grad for p in model.parameters() if p.grad is not None).full_tensor()
    torch.save({"diff": (got - want).abs().max().item(), "grad": grad}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_decode_for_different_lengths_within_one_gathering(tmp_path):
    """Within ``fsdp.gathered`` a forward talks to no other rank, so ranks may decode different numbers of
    tokens (their completions end at different lengths), and compute the unsharded model's numbers."""
    ranks = two_gloo_ranks(_gathered_rank, tmp_path)
    assert all(r["diff"] < 1e-5 for r in ranks)
    torch.testing.assert_close(ranks[0]["grad"], ranks[1]["grad"])  # the reduced gradient, the same on both
