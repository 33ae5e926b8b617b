"""The rollout engine gives what model.generate gives: same greedy tokens, log-probs a plain forward agrees with."""

from __future__ import annotations

import pytest
import torch

from sasr import models
from sasr.config import validate
from sasr.engine import SamplingParams, engine_for, exponential_race, sample
from sasr.errors import SasrError
from sasr.losses import completion_logprobs
from sasr.rollout import generate, render_prompts
from sasr.tasks import get_task


@pytest.fixture(scope="module")
def smol():
    """SmolLM2-135M-Instruct and arithmetic prompts of different lengths."""
    model, tok = models.load_model("smollm2-135m"), models.load_tokenizer("smollm2-135m")
    task = get_task("arithmetic")
    prompts = render_prompts(tok, [task.messages(ex) for ex in task.examples("test", 4, seed=1)])
    prompts[1] = prompts[1].replace(
        "Compute", "Please compute, showing your work,"
    )  # longer: real left padding
    return model, tok, prompts


def _plain_logprobs(model, roll, temperature: float) -> torch.Tensor:
    logps, _ = completion_logprobs(
        model, roll.input_ids, roll.attention_mask, roll.completion_ids.size(1), temperature
    )
    return logps


def test_greedy_tokens_equal_generate_and_finished_rows_are_dropped(smol):
    model, tok, prompts = smol
    hf = generate(model, tok, prompts, max_new_tokens=40, greedy=True, backend="hf")
    ours = generate(model, tok, prompts, max_new_tokens=40, greedy=True, backend="sasr")
    assert torch.equal(ours.completion_ids, hf.completion_ids)
    assert ours.texts == hf.texts
    lengths = ours.completion_mask.sum(1)
    assert lengths.min() < lengths.max(), (
        "the prompts should stop at different lengths to exercise compaction"
    )
    stats = engine_for(model).stats
    B, T = ours.completion_ids.shape
    # Every step computes only unfinished rows, so the work is the sum of lengths, not B x T.
    assert stats["row_steps"] == int(lengths.sum()) - B  # the first token of each row comes from the prefill
    assert stats["row_steps"] < B * (T - 1)


def test_a_repeated_prompt_is_prefilled_once_and_decodes_like_a_single_one(smol):
    model, tok, prompts = smol
    single = generate(model, tok, prompts[:2], max_new_tokens=24, greedy=True)
    shapes = []
    hook = model.register_forward_hook(
        lambda module, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        grouped = generate(model, tok, prompts[:2], num_generations=3, max_new_tokens=24, greedy=True)
    finally:
        hook.remove()
    assert torch.equal(grouped.completion_ids, single.completion_ids.repeat_interleave(3, dim=0))
    assert shapes[0][0] == 2 and shapes[0][1] > 1  # the prefill: 2 prompts through the model, not 6 rows
    assert shapes[1] == (6, 1)  # then every row decodes


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampling_logprobs_equal_a_plain_forward(smol, temperature, top_p):
    model, tok, prompts = smol
    torch.manual_seed(0)
    roll = generate(
        model, tok, prompts, num_generations=3, max_new_tokens=24, temperature=temperature, top_p=top_p
    )
    mask = roll.completion_mask.bool()
    assert roll.logprobs.shape == roll.completion_ids.shape
    diff = (roll.logprobs - _plain_logprobs(model, roll, temperature))[mask].abs().max().item()
    assert diff < 1e-4
    assert (roll.logprobs[~mask] == 0).all()  # after EOS: nothing sampled


def test_min_new_tokens_holds_eos_back(smol):
    model, tok, prompts = smol
    roll = generate(model, tok, prompts[:2], max_new_tokens=20, greedy=True, min_new_tokens=20)
    assert roll.completion_ids.size(1) == 20
    assert not (roll.completion_ids[:, :19] == tok.eos_token_id).any()
    assert roll.completion_mask.sum().item() == 2 * 20


def test_sample_follows_the_distribution_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].expand(20000, 4)
    torch.manual_seed(0)
    for draw in (lambda p: exponential_race(p), lambda p: torch.multinomial(p, 1).squeeze(1)):
        freq = torch.bincount(draw(probs[None].expand(20000, 4).contiguous()), minlength=4).float() / 20000
        assert torch.allclose(freq, probs, atol=0.015)
    token, logprob = sample(logits, SamplingParams(top_p=0.7), eos_token_id=3, eos_bias=torch.tensor(0.0))
    assert set(token.tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.7: the tail is never drawn
    assert torch.allclose(logprob, probs.log()[token], atol=1e-6)  # log-prob of the unfiltered distribution
    token, _ = sample(logits, SamplingParams(top_k=1), eos_token_id=3, eos_bias=torch.tensor(0.0))
    assert (token == 0).all()
    token, _ = sample(
        logits, SamplingParams(greedy=True), eos_token_id=0, eos_bias=torch.tensor(float("-inf"))
    )
    assert (token == 1).all()  # EOS held back


def test_unsupported_generation_kwargs_name_the_fix():
    with pytest.raises(SasrError, match=r"\['repetition_penalty'\] are not supported.*generation_backend=hf"):
        validate({"grpo": {"generation_kwargs": {"repetition_penalty": 1.1}}})
    cfg = validate({"grpo": {"generation_kwargs": {"repetition_penalty": 1.1}, "generation_backend": "hf"}})
    assert cfg.grpo.generation_backend == "hf"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_equal_eager(smol, dtype):
    _, tok, prompts = smol
    model = models.load_model("smollm2-135m", dtype=dtype).cuda()
    eager = generate(model, tok, prompts, max_new_tokens=40, greedy=True, cuda_graphs=False)
    graphed = generate(model, tok, prompts, max_new_tokens=40, greedy=True, cuda_graphs=True)
    assert engine_for(model).stats["graph_captures"] >= 1
    T = min(eager.completion_ids.size(1), graphed.completion_ids.size(1))  # graphs stop in steps of 4
    if dtype == "float32":
        assert torch.equal(graphed.completion_ids[:, :T], eager.completion_ids[:, :T])
        assert graphed.texts == eager.texts
    else:  # bf16 kernels may differ in the last bit; a tie may flip a token, the log-probs must still agree
        assert (graphed.completion_ids[:, :T] == eager.completion_ids[:, :T]).float().mean() > 0.9
    torch.manual_seed(0)
    roll = generate(model, tok, prompts, num_generations=4, max_new_tokens=32, temperature=1.0)
    mask = roll.completion_mask.bool()
    diff = (roll.logprobs - _plain_logprobs(model, roll, 1.0))[mask].abs()
    assert diff.mean() < (1e-4 if dtype == "float32" else 5e-2)


def test_one_engine_per_option_set_and_hf_takes_top_k():
    model, tok = models.load_model("tiny"), models.load_tokenizer("tiny")
    eager, graphed = engine_for(model, cuda_graphs=False), engine_for(model, cuda_graphs=True)
    assert eager is not graphed  # evaluating with other options keeps the GRPO engine (and its graphs)
    assert engine_for(model, cuda_graphs=False) is eager and engine_for(model, cuda_graphs=True) is graphed
    roll = generate(model, tok, ["Hi"], num_generations=2, max_new_tokens=4, backend="hf", top_k=5)
    assert roll.completion_ids.shape[0] == 2 and roll.logprobs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the KV pool exists only under CUDA graphs")
def test_kv_pool_evicts_the_oldest_shape_and_stays_correct(smol, monkeypatch):
    import sasr.engine as engine

    _, tok, prompts = smol
    model = models.load_model("smollm2-135m", dtype="float32").cuda()
    lengths = (24, 24 + engine.LENGTH_QUANTUM)  # two cache shapes
    eager = {
        n: generate(model, tok, prompts, max_new_tokens=n, greedy=True, cuda_graphs=False) for n in lengths
    }
    pooled = engine_for(model, cuda_graphs=True)
    for n in lengths:
        generate(model, tok, prompts, max_new_tokens=n, greedy=True, cuda_graphs=True)
    sizes = [s.nbytes for s in pooled._states.values()]
    assert len(sizes) == 2  # under the default cap both shapes stay
    monkeypatch.setattr(engine, "POOL_BYTES", max(sizes))  # now room for one shape at a time
    pooled._states.clear()
    for n in (lengths[0], *lengths):  # each new shape evicts the other
        graphed = generate(model, tok, prompts, max_new_tokens=n, greedy=True, cuda_graphs=True)
        assert (
            len(pooled._states) == 1 and sum(s.nbytes for s in pooled._states.values()) <= engine.POOL_BYTES
        )
        T = min(graphed.completion_ids.size(1), eager[n].completion_ids.size(1))
        assert torch.equal(graphed.completion_ids[:, :T], eager[n].completion_ids[:, :T])
