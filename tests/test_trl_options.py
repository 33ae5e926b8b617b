"""What TRL and verl users expect: TRL's reward-function contract, gradient accumulation, bf16 autocast, the
options that decide whether GRPO trains on hard prompts, and the loss normalised over every process."""

from __future__ import annotations

import json
import math
import re
import textwrap

import pytest
import torch
from helpers import read_metrics, reward_module, two_gloo_ranks

from sasr.cli import main
from sasr.errors import SasrError
from sasr.rewards import RewardCall, Rewards
from sasr.run_dir import read_lines
from sasr.tasks import get_task

# --- data and reward functions ----------------------------------------------------------------------------


def chat_rows(n: int) -> list[dict]:
    """A conversational dataset as TRL takes it: messages, plus a gold `solution` column (LaTeX answer)."""
    return [
        {
            "messages": [
                {"role": "system", "content": "Think in <think></think>, then answer in \\boxed{}."},
                {"role": "user", "content": f"What is {i} / {i + 1}?"},
                {
                    "role": "assistant",
                    "content": f"<think>divide</think>\n\\boxed{{\\frac{{{i}}}{{{i + 1}}}}}",
                },
            ],
            "solution": f"\\frac{{{i}}}{{{i + 1}}}",
            "answer": f"\\frac{{{i}}}{{{i + 1}}}",
            "level": i % 3,
        }
        for i in range(1, n + 1)
    ]


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(60)))
    return path


REWARDS = textwrap.dedent(
    """
    import asyncio

    SEEN = {}

    def level_reward(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, level, **kw):
        SEEN.update(prompts=prompts, completions=completions, completion_ids=completion_ids, step=trainer_state.global_step)
        log_extra("level_seen", list(level))
        log_metric("mean_level", sum(level) / len(level))
        return [float(x) for x in level]

    def only_even(completions, level, **kw):
        return [1.0 if x % 2 == 0 else None for x in level]

    def never(completions, **kw):
        return [None] * len(completions)

    async def slow_length(completions, **kw):
        await asyncio.sleep(0.01)
        return [len(c[0]["content"]) % 5 for c in completions]

    def length_mod(completions, **kw):
        return [float(len(c[0]["content"]) % 5) for c in completions]

    def easy_constant(completions, easy, **kw):  # easy prompts: always 1 (no spread); others: varied
        return [1.0 if e else float(len(c[0]["content"]) % 5) for c, e in zip(completions, easy)]

    def mixed_types(completions, **kw):  # what TRL's torch.tensor takes: bools, numpy, torch, NaN
        import numpy as np
        import torch
        kinds = [True, np.float32(0.5), torch.tensor(2.0), float("nan")]
        return [kinds[i % 4] for i in range(len(completions))]

    class Client:  # an async client made once, bound to the loop it first ran on
        def __init__(self):
            self.loop = None

        async def score(self, text):
            loop = asyncio.get_running_loop()
            if self.loop is None:
                self.loop = loop
            assert loop is self.loop, "called from another event loop"
            return 1.0

    CLIENT = Client()

    async def client_reward(completions, **kw):
        return await asyncio.gather(*(CLIENT.score(c[0]["content"]) for c in completions))

    """
)


@pytest.fixture
def reward_file(tmp_path):
    return reward_module(tmp_path, REWARDS)


def _call(task, examples, texts):
    return RewardCall(
        prompts=[task.messages(e) for e in examples],
        texts=texts,
        completion_ids=[[1] * (len(t) // 4 + 1) for t in texts],
        trainer_state=None,
    )


# --- 1. TRL's reward-function contract --------------------------------------------------------------------


def test_every_trl_reward_function_works_unchanged_on_a_chat_task(chat_file):
    """Every function in trl.rewards, called as TRL's GRPOTrainer calls it, on conversational rows."""
    import trl.rewards as R

    funcs = [
        "trl.rewards:accuracy_reward",
        "trl.rewards:reasoning_accuracy_reward",
        "trl.rewards:think_format_reward",
        {"function": "trl.rewards:get_cosine_scaled_reward", "kwargs": {"max_len": 64}},
        {"function": "trl.rewards:get_repetition_penalty_reward", "kwargs": {"ngram_size": 2}},
        {
            "function": "trl.rewards:get_soft_overlong_punishment",
            "kwargs": {"max_completion_len": 40, "soft_punish_cache": 10},
        },
    ]
    assert set(R._import_structure) == {"accuracy_rewards", "format_rewards", "other_rewards"}
    listed = {name for names in R._import_structure.values() for name in names}
    assert listed == {
        "accuracy_reward",
        "get_cosine_scaled_reward",
        "reasoning_accuracy_reward",
        "think_format_reward",
        "get_repetition_penalty_reward",
        "get_soft_overlong_punishment",
    }  # a new function in TRL would need a line above
    task = get_task(f"jsonl:{chat_file}", judge="math")
    rewards = Rewards(task, funcs)
    ex = task.examples("train", 2)
    right = task.target(ex[0])  # "<think>divide</think>\n\\boxed{i/(i+1)}"
    wrong = "no tags here \\boxed{7}"
    values, stats = rewards.score(task.score_batch([right, wrong], ex), _call(task, ex, [right, wrong]), ex)
    per = {n: (stats[f"rewards/{n}/mean"], stats[f"rewards/{n}/std"]) for n in rewards.names}
    assert rewards.names == [
        "accuracy_reward",
        "reasoning_accuracy_reward",
        "think_format_reward",
        "cosine_scaled_reward",
        "repetition_penalty_reward",
        "soft_overlong_punishment_reward",
    ]
    assert per["accuracy_reward"] == (0.5, pytest.approx(math.sqrt(0.5)))  # right: 1, wrong: 0
    assert per["think_format_reward"][0] == 0.5
    assert per["cosine_scaled_reward"][1] > 0  # a right and a wrong one are scaled apart
    assert all(math.isfinite(v) for v in values) and values[0] > values[1]


def test_the_contract_columns_state_none_async_weights_and_logs(chat_file, reward_file):
    task = get_task(f"jsonl:{chat_file}")
    funcs = [f"{reward_file}:level_reward", f"{reward_file}:only_even", f"{reward_file}:slow_length", "task"]
    rewards = Rewards(task, funcs, [1.0, 10.0, 0.5, 2.0])
    ex = task.examples("train", 4)
    texts = ["Answer: 3", "abcdefg", "x", "Answer: 1/2"]
    call = _call(task, ex, texts)
    from transformers import TrainerState

    call.trainer_state = TrainerState(global_step=7, max_steps=10)
    values, stats = rewards.score(task.score_batch(texts, ex), call, ex)
    judge = [s.reward for s in task.score_batch(texts, ex)]
    levels = [e.metadata["row"]["level"] for e in ex]
    for v, lv, t, j in zip(values, levels, texts, judge):  # weighted sum; None left out
        assert v == pytest.approx(lv + (10.0 if lv % 2 == 0 else 0.0) + 0.5 * (len(t) % 5) + 2.0 * j)
    assert stats["rewards/only_even/mean"] == 1.0  # the mean over the rows it scored
    assert stats["mean_level"] == pytest.approx(sum(levels) / 4)  # log_metric
    assert call.extra["level_seen"] == levels  # log_extra
    # The function saw TRL's formats: message lists, token ids, the trainer state.
    seen = rewards.funcs[0].__globals__["SEEN"]
    assert seen["prompts"][0] == task.messages(ex[0]) and seen["prompts"][0][-1]["role"] == "user"
    assert seen["completions"][1] == [{"role": "assistant", "content": "abcdefg"}]
    assert seen["completion_ids"] == call.completion_ids and seen["step"] == 7

    nothing = Rewards(task, [f"{reward_file}:never"])
    values, stats = nothing.score(task.score_batch(texts, ex), _call(task, ex, texts), ex)
    assert all(math.isnan(v) for v in values) and math.isnan(stats["rewards/never/mean"])


def test_reward_values_as_trl_takes_them_and_one_event_loop_for_async_clients(chat_file, reward_file):
    task = get_task(f"jsonl:{chat_file}")
    ex = task.examples("train", 4)
    texts = ["a", "b", "c", "d"]
    values, _ = Rewards(task, [f"{reward_file}:mixed_types"]).score(
        task.score_batch(texts, ex), _call(task, ex, texts), ex
    )
    assert values[:3] == [1.0, 0.5, 2.0] and math.isnan(values[3])  # NaN: not scored, as None
    rewards = Rewards(task, [f"{reward_file}:client_reward"])
    for _ in range(3):  # a client bound to its first loop keeps working: the loop lives on
        values, _ = rewards.score(task.score_batch(texts, ex), _call(task, ex, texts), ex)
        assert values == [1.0] * 4


@pytest.mark.parametrize("name", ["accuracy", "rollout_seconds", "mu", "g_last", "loss/sft", "eval_accuracy"])
def test_a_reward_function_may_not_log_a_metric_sasr_writes(chat_file, tmp_path, name):
    """Every name of sasr.metrics is refused, so no log_metric silently replaces a timer or a method's number."""
    source = f"def f(completions, log_metric, **kw):\n    log_metric({name!r}, 1.0)\n    return [0.0] * len(completions)\n"
    path = reward_module(tmp_path, source, "shadow_" + re.sub(r"\W", "_", name))
    task = get_task(f"jsonl:{chat_file}")
    ex, texts = task.examples("train", 2), ["a", "b"]
    with pytest.raises(SasrError, match=f"log_metric named '{re.escape(name)}', one of sasr's own metrics"):
        Rewards(task, [f"{path}:f"]).score(task.score_batch(texts, ex), _call(task, ex, texts), ex)


def test_advantages_leave_out_rows_no_function_scored():
    from sasr.losses import group_advantages

    rewards = torch.tensor([1.0, float("nan"), 3.0, 5.0, float("nan"), float("nan")])
    adv, zero = group_advantages(rewards, 3, scale="none")
    assert adv.tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # group 1: mean of 1 and 3; unscored: 0
    assert zero.tolist() == [False, True]  # one scored row: no spread


def test_bad_reward_settings_get_one_sentence_and_no_run_directory(tmp_path, capsys, chat_file, reward_file):
    out = tmp_path / "run"
    base = ["train", "--model", "tiny", "--task", f"jsonl:{chat_file}", "--output", str(out), "--quiet"]
    cases = [
        (
            ["--reward", f"{reward_file}:length_mod", "--set", "reward_weights=[1, 2]"],
            "reward_weights has 2 weights for 1 reward_funcs; give one weight per function",
        ),
        (["--reward", f"{reward_file}:missing"], "has no function 'missing'"),
        (
            ["--set", "grpo.overlong_buffer_len=200", "--set", "grpo.max_completion_length=64"],
            "grpo.overlong_buffer_len (200) must be below grpo.max_completion_length (64)",
        ),
        (["--set", "grpo.importance_sampling_level=sentence"], "importance_sampling_level"),
        (["--set", "push_to_hub=true"], "push_to_hub needs the network, but HF_HUB_OFFLINE is set"),
        (
            ["--method", "chord", "--set", "grpo.num_iterations=2"],
            "method 'chord' also trains unclipped parts",
        ),
        (["--method", "hpt", "--set", "grpo.dynamic_sampling=true"], "which method 'hpt' routes by"),
        (
            ["--set", "push_to_hub=true", "--set", "save_final=false"],
            "push_to_hub uploads final/, so it needs",
        ),
    ]
    for extra, says in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("sasr: error:") and says in err, err
        assert not out.exists()


# --- training runs on tiny: each option's effect ------------------------------------------------------------


TRAIN_ARGS = [
    "train",
    "--model",
    "tiny",
    "--quiet",
    "--set",
    "report_to=none",
    "--set",
    "eval.before=false",
    "--set",
    "task.test_size=0",
    "--set",
    "grpo.max_completion_length=8",
]


def _train(tmp_path, name, *argv):
    out = tmp_path / name
    code = main([*TRAIN_ARGS, "--output", str(out), *argv])
    assert code == 0
    return out, read_metrics(out)


def test_a_chat_task_trains_with_trl_reward_functions_logged_each(tmp_path, chat_file, reward_file):
    out, rows = _train(
        tmp_path,
        "chat",
        "--task",
        f"jsonl:{chat_file}",
        "--method",
        "sasr",
        "--steps",
        "4",
        "--warmup-steps",
        "1",
        "--reward",
        "trl.rewards:think_format_reward",
        "--reward",
        f"{reward_file}:level_reward",
        "--set",
        "grpo.num_generations=2",
        "--set",
        "sft.batch_size=2",
        "--set",
        "log_completions=true",
        "--set",
        "sasr.gamma=100",  # p_t near 0: GRPO steps after the warm-up
    )
    grpo = [r for r in rows if r["phase"] == "grpo"]
    assert grpo, [r["phase"] for r in rows]
    for r in grpo:
        assert {"rewards/think_format_reward/mean", "rewards/level_reward/std", "mean_level"} <= r.keys()
        assert r["reward_mean"] == pytest.approx(
            r["rewards/think_format_reward/mean"] + r["rewards/level_reward/mean"]
        )
    samples = read_lines(out, "completions.jsonl")
    assert samples and all("level_seen" in s for s in samples)  # log_extra's column
    for s in samples:  # each function's own value beside the weighted sum
        assert s["reward"] == pytest.approx(s["rewards/think_format_reward"] + s["rewards/level_reward"])


def test_gradient_accumulation_equals_one_batch_of_the_same_size(tmp_path, reward_file):
    """2 micro-batches of (2 demonstrations, 1 prompt) give the update and gradient norm of one batch of (4, 2):
    the same rows, computed in two pieces, the loss divided by the whole step's counts; for every loss_type,
    and for SRFT, whose weighted parts take subsets of the rows."""
    from safetensors.torch import load_file

    data = tmp_path / "d.jsonl"
    rows = [
        {"question": e.question, "solution": e.cot, "answer": e.answer}
        for e in get_task("arithmetic").examples("train", 60)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [
        "--task",
        f"jsonl:{data}",
        "--steps",
        "5",
        "--warmup-steps",
        "1",
        "--reward",
        f"{reward_file}:length_mod",
        "--set",
        "lora.enabled=false",
        "--set",
        "grpo.num_generations=4",
        "--set",
        "grpo.beta=0.1",
    ]
    for method, loss_type in [
        ("interleave", "grpo"),
        ("interleave", "dapo"),
        ("interleave", "dr_grpo"),
        ("hpt", "dapo"),
    ]:
        one, a = _train(
            tmp_path,
            f"one-{method}-{loss_type}",
            *common,
            "--method",
            method,
            "--set",
            f"grpo.loss_type={loss_type}",
            "--set",
            "sft.batch_size=4",
            "--set",
            "grpo.batch_size=2",
        )
        acc, b = _train(
            tmp_path,
            f"acc-{method}-{loss_type}",
            *common,
            "--method",
            method,
            "--set",
            f"grpo.loss_type={loss_type}",
            "--set",
            "sft.batch_size=2",
            "--set",
            "grpo.batch_size=1",
            "--set",
            "gradient_accumulation_steps=2",
        )
        assert [r["phase"] for r in a] == [r["phase"] for r in b]
        assert (
            {"sft", "grpo"} <= {r["phase"] for r in a}
            if method == "interleave"
            else {"mixed"} == {r["phase"] for r in a}
        )
        if method == "srft":  # weighted parts over subsets of the rows: demonstrations, and the groups
            assert all(r["weight/sft"] > 0 and "loss/rl" in r for r in a)
        assert [r["reward_mean"] for r in a if "reward_mean" in r] == [
            r["reward_mean"] for r in b if "reward_mean" in r
        ]
        for x, y in zip(a, b):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6)
            assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        wa, wb = (
            load_file(one / "final" / "model.safetensors"),
            load_file(acc / "final" / "model.safetensors"),
        )
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_rollouts_of_a_step_can_be_generated_in_chunks(tmp_path, monkeypatch):
    import sasr.collect.sampling

    calls = []

    def counted(model, tokenizer, prompts, **kw):
        calls.append(len(prompts))
        return generate(model, tokenizer, prompts, **kw)

    from sasr.rollout import generate

    monkeypatch.setattr(sasr.collect.sampling, "generate", counted)
    _, rows = _train(
        tmp_path,
        "chunks",
        "--method",
        "grpo",
        "--steps",
        "2",
        "--set",
        "grpo.batch_size=3",
        "--set",
        "grpo.num_generations=2",
        "--set",
        "grpo.generation_batch_size=2",  # one prompt's group per generate call: 3 calls a step
    )
    assert all(r["completion_length"] > 0 for r in rows) and len(rows) == 2
    assert calls == [1, 1, 1] * 2  # each call one prompt's group of 2 completions


def test_bf16_autocast_trains_float32_weights(tmp_path):
    """In its own process: accelerate's precision is process-wide, as in a fresh `sasr train`."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    common = ["--method", "sft", "--steps", "2", "--set", "lora.enabled=false"]
    fp32, a = _train(tmp_path, "fp32", *common)
    bf16 = tmp_path / "bf16"
    argv = [*TRAIN_ARGS, "--output", str(bf16), *common, "--set", "bf16=true"]
    subprocess.run([sys.executable, "-m", "sasr", *argv], check=True, capture_output=True)
    b = read_metrics(bf16)
    assert all(w.dtype == torch.float32 for w in load_file(bf16 / "final" / "model.safetensors").values())
    assert a[0]["loss"] != b[0]["loss"] and b[0]["loss"] == pytest.approx(
        a[0]["loss"], rel=0.02
    )  # autocast ran


def test_mask_truncated_completions_leaves_cut_rollouts_out_of_the_loss(tmp_path, reward_file):
    """tiny never ends a completion within 8 tokens: every rollout is cut, so none carries loss."""
    data = tmp_path / "d.jsonl"
    rows = [
        {"question": e.question, "answer": e.answer} for e in get_task("arithmetic").examples("train", 40)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [
        "--method",
        "grpo",
        "--steps",
        "2",
        "--task",
        f"jsonl:{data}",
        "--reward",
        f"{reward_file}:length_mod",
    ]
    _, kept = _train(tmp_path, "kept", *common)
    _, masked = _train(tmp_path, "masked", *common, "--set", "grpo.mask_truncated_completions=true")
    assert all(r["clipped_ratio"] == 1.0 for r in kept + masked)
    assert all(r["grad_norm"] > 0 for r in kept)  # rewards differ: the cut rollouts train
    assert all(r["loss"] == 0 and r["grad_norm"] == 0 for r in masked)


def test_soft_overlong_penalty(tmp_path):
    """Every completion is 8 tokens, the limit; the buffer is the last 4: the full penalty, -factor."""
    _, rows = _train(
        tmp_path,
        "overlong",
        "--method",
        "grpo",
        "--steps",
        "1",
        "--set",
        "grpo.overlong_buffer_len=4",
        "--set",
        "grpo.overlong_penalty_factor=0.5",
    )
    assert rows[0]["overlong_penalty"] == -0.5 and rows[0]["reward_mean"] == -0.5  # the judge gave 0


def test_num_iterations_updates_against_the_sampling_policy(tmp_path, reward_file):
    data = tmp_path / "d.jsonl"
    rows = [
        {"question": e.question, "answer": e.answer} for e in get_task("arithmetic").examples("train", 40)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [
        "--task",
        f"jsonl:{data}",
        "--method",
        "grpo",
        "--steps",
        "3",
        "--reward",
        f"{reward_file}:length_mod",
        "--set",
        "optim.learning_rate=0.05",
        "--set",
        "lora.enabled=false",
    ]
    _, once = _train(tmp_path, "once", *common)
    _, thrice = _train(tmp_path, "thrice", *common, "--set", "grpo.num_iterations=3")
    assert all(r["clip_fraction"] == 0 for r in once)  # one update per batch: the ratio is 1
    assert any(r["clip_fraction"] > 0 for r in thrice)  # later updates move away from pi_old and clip
    assert all(r["num_iterations"] == 3 for r in thrice)
    assert once[0]["grad_norm"] == pytest.approx(
        thrice[0]["grad_norm"], rel=1e-5
    )  # the first update is alike


def test_dynamic_sampling_lets_no_equal_group_through_while_prompts_remain(tmp_path, reward_file):
    data = tmp_path / "d.jsonl"
    exs = get_task("arithmetic").examples("train", 80)
    rows = [{"question": e.question, "answer": e.answer, "easy": i % 2 == 0} for i, e in enumerate(exs)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [
        "--task",
        f"jsonl:{data}",
        "--method",
        "grpo",
        "--steps",
        "4",
        "--reward",
        f"{reward_file}:easy_constant",
        "--set",
        "grpo.batch_size=4",
        "--set",
        "grpo.num_generations=4",
    ]
    _, plain = _train(tmp_path, "plain", *common)
    _, dyn = _train(
        tmp_path,
        "dyn",
        *common,
        "--set",
        "grpo.dynamic_sampling=true",
        "--set",
        "grpo.max_num_gen_batches=10",
    )
    assert sum(r["zero_spread_fraction"] for r in plain) > 0  # easy prompts: equal rewards
    assert all(r["zero_spread_fraction"] == 0 for r in dyn)
    assert all(r["dynamic_sampling_batches"] >= 2 for r in dyn) and all(r["reward_std"] > 0 for r in dyn)
    # A limit of one batch: nothing more to sample, so equal groups fill the batch.
    _, capped = _train(
        tmp_path,
        "capped",
        *common,
        "--set",
        "grpo.dynamic_sampling=true",
        "--set",
        "grpo.max_num_gen_batches=1",
    )
    assert sum(r["zero_spread_fraction"] for r in capped) > 0


# --- 5. the loss normalised over every process -------------------------------------------------------------


def _rank_gradients(rank: int, init: str, out: str) -> None:
    """One gloo process: its half of the rows, the part's Norm from the all-reduced token count, backward, then
    DDP's mean of the gradients (an all-reduce and a division), as the trainer does."""
    import torch.distributed as dist

    from sasr.losses import Norm, PartInputs

    world = 2
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    logps, mask, adv = _batch()
    half = slice(rank * 4, rank * 4 + 4)
    grads = {}
    for name in ("dapo", "nll"):
        x = logps.clone().requires_grad_(True)
        tokens = mask[half].sum().double()
        dist.all_reduce(tokens)
        inputs = PartInputs(
            x[half],
            mask[half],
            None,
            None,
            adv[half],
            torch.zeros(4, dtype=torch.bool),
            torch.zeros(4, dtype=torch.bool),
            norm=Norm(rows=4, tokens=float(tokens) / world),
        )
        _part_loss(name, inputs).backward()
        grad = x.grad.clone()
        dist.all_reduce(grad)
        grads[name] = grad / world
    torch.save(grads, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _part_loss(name: str, inputs):
    """The dapo policy-gradient part or the SFT part over ``inputs``: the two token means under test."""
    from sasr.losses import nll_part, pg_part

    if name == "nll":
        return nll_part(inputs).loss
    options = dict(
        beta=0.0, epsilon=0.2, epsilon_high=None, max_completion_length=6, use_bias_correction_kl=False
    )
    return pg_part(inputs, loss_type="dapo", **options).loss


def _batch():
    g = torch.Generator().manual_seed(3)
    logps = -torch.rand(8, 6, generator=g)
    lengths = torch.tensor([6, 1, 2, 5, 6, 6, 3, 4])  # the two halves hold 14 and 19 tokens
    mask = (torch.arange(6)[None] < lengths[:, None]).float()
    return logps, mask, torch.randn(8, generator=g)


def test_dapo_and_sft_token_means_over_two_gloo_processes_equal_one_process(tmp_path):
    from sasr.losses import PartInputs

    ranks = two_gloo_ranks(_rank_gradients, tmp_path)
    logps, mask, adv = _batch()
    no = torch.zeros(8, dtype=torch.bool)
    for name in ("dapo", "nll"):
        x = logps.clone().requires_grad_(True)
        inputs = PartInputs(x, mask, None, None, adv, no, no)  # one process, the whole batch, no Norm
        _part_loss(name, inputs).backward()
        for rank in (0, 1):
            torch.testing.assert_close(ranks[rank][name], x.grad)
        # A per-process token mean (what DDP gave before) is a different number: the test can tell them apart.
        per_process = torch.zeros_like(x.grad)
        for half in (slice(0, 4), slice(4, 8)):
            per_process[half] = x.grad[half] * (mask.sum() / mask[half].sum()) / 2
        assert not torch.allclose(per_process, x.grad)


def test_the_reward_contract_is_refused_a_non_number(chat_file, tmp_path):
    bad = reward_module(
        tmp_path, "def text(completions, **kw):\n    return ['yes'] * len(completions)\n", "bad"
    )
    task = get_task(f"jsonl:{chat_file}")
    ex = task.examples("train", 2)
    rewards = Rewards(task, [f"{bad}:text"])
    with pytest.raises(SasrError, match="returned 'yes', not a finite number or None, for completion 0"):
        rewards.score(task.score_batch(["a", "b"], ex), _call(task, ex, ["a", "b"]), ex)


# --- 6. defaults ------------------------------------------------------------------------------------------

# sasr key -> TRL 1.16 GRPOConfig attribute, for every option the preset sets
PRESET_TO_TRL = {
    "bf16": "bf16",
    "model.gradient_checkpointing": "gradient_checkpointing",
    "optim.learning_rate": "learning_rate",
    "optim.lr_scheduler_type": "lr_scheduler_type",
    "optim.lr_warmup_steps": "warmup_steps",
    "optim.max_grad_norm": "max_grad_norm",
    "optim.weight_decay": "weight_decay",
    "grpo.num_generations": "num_generations",
    "grpo.max_completion_length": "max_completion_length",
    "grpo.temperature": "temperature",
    "grpo.top_p": "top_p",
    "grpo.loss_type": "loss_type",
    "grpo.beta": "beta",
    "grpo.use_bias_correction_kl": "use_bias_correction_kl",
    "grpo.scale_rewards": "scale_rewards",
    "grpo.epsilon": "epsilon",
    "grpo.importance_sampling_level": "importance_sampling_level",
    "grpo.num_iterations": "num_iterations",
    "grpo.mask_truncated_completions": "mask_truncated_completions",
}


def test_the_trl_preset_reproduces_trls_defaults():
    from pathlib import Path

    from trl import GRPOConfig

    from sasr.config import build_config

    trl = GRPOConfig(output_dir="/tmp/unused", use_cpu=True)
    ours = build_config(Path(__file__).parents[1] / "configs" / "presets" / "trl.yaml", {"method": "grpo"})
    for key, attr in PRESET_TO_TRL.items():
        value = ours
        for part in key.split("."):
            value = getattr(value, part)
        expected = getattr(trl, attr)
        assert value == getattr(expected, "value", expected), key
    # TRL's per_device_train_batch_size counts completions: one prompt's group per process
    assert ours.grpo.batch_size * ours.grpo.num_generations == trl.per_device_train_batch_size
    assert not ours.lora.enabled  # TRL trains every weight unless given a peft_config
