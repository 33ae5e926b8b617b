"""The rollout engine gives what model.generate gives: same greedy tokens, log-probs a plain forward agrees with."""

from __future__ import annotations

import gc

import pytest
import torch

from sasr import models
from sasr.config import validate
from sasr.data import render_prompts
from sasr.errors import SasrError
from sasr.logprobs import completion_logprobs
from sasr.rollout import generate
from sasr.rollout.decode_weights import can_pack, decode_weights, mergeable_layers, packs
from sasr.rollout.engine import (
    SamplingParams,
    _DecodeState,
    engine_for,
    exponential_race,
    inverse_cdf,
    sample,
)
from sasr.tasks import get_task


@pytest.fixture(scope="module")
def smol():
    """SmolLM2-135M-Instruct and arithmetic prompts of different lengths."""
    model, tok = models.load_model("smollm2-135m"), models.load_tokenizer("smollm2-135m")
    task = get_task("arithmetic")
    prompts = render_prompts(tok, task, task.examples("test", 4, seed=1))
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


def test_a_finished_decode_frees_its_cache_without_waiting_for_the_cyclic_collector(smol):
    # A cache held by a reference cycle lives until Python's next cyclic collection; an evaluation of 256 rows
    # allocates a new 1.8 GB cache per call, so each cycle-held one added to the peak (docs/performance.md).
    model, tok, prompts = smol
    gc.collect()
    gc.disable()
    try:
        roll = generate(model, tok, prompts, max_new_tokens=40, greedy=True, backend="sasr")
        lengths = roll.completion_mask.sum(1)
        assert lengths.min() < lengths.max(), "rows should finish apart so that compaction takes views"
        alive = [o for o in gc.get_objects() if isinstance(o, _DecodeState)]
    finally:
        gc.enable()
    assert alive == []


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
    assert engine_for(model).stats["prefill_rows"] == 2


def _forward_shapes(model, **kwargs):
    """generate(..., **kwargs) and the [rows, columns] of every forward call, in order."""
    shapes = []
    hook = model.register_forward_hook(
        lambda module, args, kw, out: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        roll = generate(model, max_new_tokens=24, **kwargs)
    finally:
        hook.remove()
    return roll, shapes


@pytest.mark.parametrize("case", ["system prompt", "padding past the prefix", "one prompt inside another"])
def test_a_shared_prefix_is_prefilled_once_and_decodes_like_the_plain_prefill(smol, case):
    model, tok, prompts = smol
    if case == "padding past the prefix":  # a prompt longer by more than the prefix: padding inside the rest
        prompts = [*prompts[:3], prompts[3].replace("Compute", "Compute, without a calculator and " * 8)]
    elif case == "one prompt inside another":  # the shared part is capped so each row keeps a token
        prompts = ["12 + 7 =", "12 + 7 = 19, and 19 * 2 ="]
    args = {"tokenizer": tok, "prompts": prompts, "num_generations": 2, "greedy": True}
    plain, plain_calls = _forward_shapes(model, **args)
    shared, shared_calls = _forward_shapes(model, **args, share_prefix=True)
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    torch.testing.assert_close(shared.logprobs, plain.logprobs, atol=1e-4, rtol=0)
    mask = shared.completion_mask.bool()  # and against a forward over prompt + completion
    torch.testing.assert_close(
        shared.logprobs[mask], _plain_logprobs(model, shared, 1.0)[mask], atol=1e-4, rtol=0
    )
    U, P = plain_calls[0]
    (one, C), (rows, W) = shared_calls[:2]  # the prefix once, then each prompt's rest
    assert shared_calls[2:] == plain_calls[1:]  # the same decode steps after
    ids = tok(prompts).input_ids
    shortest = min(map(len, ids))
    common = next((i for i, column in enumerate(zip(*ids)) if len(set(column)) > 1), shortest)
    assert (one, rows, U) == (1, len(prompts), len(prompts))
    assert C == min(common, shortest - 1) > 0 and W < P
    assert engine_for(model).stats["prefill_tokens"] == C + U * W < U * P


def test_shared_prefix_samples_like_the_plain_prefill(smol):
    model, tok, prompts = smol
    runs = []
    for share in (False, True):
        torch.manual_seed(0)
        runs.append(generate(model, tok, prompts, num_generations=3, max_new_tokens=24, share_prefix=share))
    assert torch.equal(runs[1].completion_ids, runs[0].completion_ids)  # the same draws from the same logits
    torch.testing.assert_close(runs[1].logprobs, runs[0].logprobs, atol=1e-4, rtol=0)


def test_prompts_without_a_common_start_are_prefilled_as_before(smol):
    model, tok, _ = smol
    prompts = ["12 + 7 =", "Twelve plus seven is"]
    plain, plain_calls = _forward_shapes(model, tokenizer=tok, prompts=prompts, greedy=True)
    shared, shared_calls = _forward_shapes(
        model, tokenizer=tok, prompts=prompts, greedy=True, share_prefix=True
    )
    assert torch.equal(shared.completion_ids, plain.completion_ids) and shared_calls == plain_calls
    assert engine_for(model).stats["prefill_tokens"] == 2 * plain_calls[0][1]


def test_eager_decode_steps_attend_only_to_written_columns(smol, monkeypatch):
    import sasr.rollout.engine as engine

    model, tok, prompts = smol
    widths = []
    update = engine.StaticKVCache.update

    def record(self, k, v, layer_idx, *args, **kwargs):
        keys, values = update(self, k, v, layer_idx, *args, **kwargs)
        if layer_idx == 0 and k.size(2) == 1:  # decode steps, not the prefill
            widths.append(keys.size(2))
        return keys, values

    monkeypatch.setattr(engine.StaticKVCache, "update", record)
    roll = generate(model, tok, prompts[:2], max_new_tokens=6, greedy=True, min_new_tokens=6)
    P = roll.prompt_ids.size(1)
    assert widths == [P + 1, P + 2, P + 3, P + 4, P + 5]  # the prompt and the tokens so far, not all P + 6


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
    for draw in (
        exponential_race,
        inverse_cdf,
        lambda p: inverse_cdf(p, block=3),
    ):  # block=3: tokens 0-2, 3-5
        freq = torch.bincount(draw(probs[None].expand(20000, 4).contiguous()), minlength=4).float() / 20000
        assert torch.allclose(freq, probs, atol=0.015)
    # A peaked distribution over a real vocabulary with forbidden tokens (probability 0) in every block.
    vocab = torch.full((49152,), 1e-7)
    vocab[[7, 30000]] = torch.tensor([0.9, 0.05])
    vocab[::5] = 0.0
    draws = inverse_cdf((vocab / vocab.sum())[None].expand(20000, -1).contiguous())
    assert (vocab[draws] > 0).all()
    assert abs((draws == 7).float().mean().item() - 0.9 * vocab.sum().reciprocal().item()) < 0.015
    broken = probs[None].repeat(3, 1)
    broken[1] = float("nan")  # a diverged model's row
    with pytest.raises(SasrError, match="NaN, infinite or all zero.*lower optim.learning_rate"):
        inverse_cdf(broken)
    token, logprob = sample(logits, SamplingParams(top_p=0.7), eos_token_id=3, eos_bias=torch.tensor(0.0))
    assert set(token.tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.7: the tail is never drawn
    assert torch.allclose(logprob, probs.log()[token], atol=1e-6)  # log-prob of the unfiltered distribution
    token, _ = sample(logits, SamplingParams(top_k=1), eos_token_id=3, eos_bias=torch.tensor(0.0))
    assert (token == 0).all()
    token, _ = sample(
        logits, SamplingParams(greedy=True), eos_token_id=0, eos_bias=torch.tensor(float("-inf"))
    )
    assert (token == 1).all()  # EOS held back


def _lora(dtype: str = "float32"):
    """SmolLM2 with a LoRA adapter whose B is not zero, so the adapter changes what the model computes."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # the same adapter in every dtype
    model = get_peft_model(
        models.load_model("smollm2-135m", dtype=dtype),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def test_a_lora_model_decodes_merged_with_the_adapter_s_results(smol):
    _, tok, prompts = smol
    model = _lora()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora_calls = []
    hooks = [
        m.register_forward_hook(lambda *_: lora_calls.append(1))
        for n, m in model.named_modules()
        if n.endswith("lora_A.default")
    ]
    ours = generate(model, tok, prompts, max_new_tokens=40, greedy=True)
    assert not lora_calls  # every adapted layer ran as one merged matrix
    for h in hooks:
        h.remove()
    hf = generate(model, tok, prompts, max_new_tokens=40, greedy=True, backend="hf")  # through the adapter
    assert torch.equal(ours.completion_ids, hf.completion_ids)
    torch.manual_seed(0)
    roll = generate(model, tok, prompts, num_generations=3, max_new_tokens=24, temperature=1.0)
    mask = roll.completion_mask.bool()
    assert (roll.logprobs - _plain_logprobs(model, roll, 1.0))[mask].abs().max().item() < 1e-4
    # The trained weights are untouched and stay trainable; the adapter is on again.
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert mergeable_layers(model) is not None


def test_lora_is_not_merged_where_rounding_would_lose_the_update():
    model = _lora("bfloat16")
    assert mergeable_layers(model) is None  # bf16: W + sBA would round small updates away
    assert mergeable_layers(model.get_base_model()) is None  # no adapter at all
    with model.disable_adapter():
        assert mergeable_layers(model) is None  # the base model is what is asked for


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_weights_compute_the_same_function_and_are_undone(smol, dtype):
    _, tok, prompts = smol
    model = _lora(dtype).eval()
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    real = batch["attention_mask"].bool()  # padded positions compute nothing anyone reads
    with torch.no_grad():
        exact = _lora("float32").eval()(**batch).logits.log_softmax(-1)  # [B, L, V] through the adapter
        plain = model(**batch).logits.float().log_softmax(-1)
        with decode_weights(model, rows=4, keep_buffers=False) as weights:
            linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
            packed = [m for m in linears if "forward" in m.__dict__]
            fast = model(**batch).logits.float().log_softmax(-1)
    assert weights.merged == (dtype == "float32")  # bf16 keeps the adapter's own path
    assert can_pack(model) == packs(getattr(torch, dtype))  # bfloat16: where this CPU's oneDNN reorders it
    assert packs(torch.float32) == torch.backends.mkldnn.is_available()
    if can_pack(model):  # every linear layer, the vocabulary's included
        assert len(packed) == len(linears)
    assert not any("forward" in m.__dict__ for m in linears)  # undone

    def error(logps):  # |log-prob error| of the exact model's likeliest token, real positions
        top = exact.argmax(-1, keepdim=True)
        return (logps.gather(-1, top) - exact.gather(-1, top)).squeeze(-1)[real].abs()

    if dtype == "float32":
        assert error(fast).max().item() < 1e-3
    else:  # bf16 is off by ~0.03 anyway: the decode's weights may not add to that
        assert error(fast).mean() <= 1.25 * error(plain).mean()


def _random(config_cls, **shape):
    """A small random model of this architecture, with random biases and norm weights too."""
    from transformers import AutoModelForCausalLM

    tok = models.load_tokenizer("tiny")
    config = config_cls(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **shape,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2 if "norm" in name else 0.1)
    return model, tok


@pytest.mark.parametrize("arch", ["qwen2", "llama-biases", "llama-llama3-rope"])
def test_the_engine_decodes_what_other_architectures_compute(smol, arch):
    from transformers import LlamaConfig, Qwen2Config

    shape = {
        "qwen2": (Qwen2Config, {}),  # q/k/v biases
        "llama-biases": (LlamaConfig, {"attention_bias": True, "mlp_bias": True}),
        "llama-llama3-rope": (
            LlamaConfig,
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 10000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                }
            },
        ),
    }[arch]
    model, tok = _random(shape[0], **shape[1])
    prompts = smol[2]
    ours = generate(model, tok, prompts, max_new_tokens=16, greedy=True)
    hf = generate(model, tok, prompts, max_new_tokens=16, greedy=True, backend="hf")
    assert torch.equal(ours.completion_ids, hf.completion_ids)
    torch.manual_seed(0)
    roll = generate(model, tok, prompts, num_generations=2, max_new_tokens=16, temperature=1.0)
    diff = (roll.logprobs - _plain_logprobs(model, roll, 1.0))[roll.completion_mask.bool()].abs().max()
    assert diff.item() < 1e-4


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_of_a_merged_lora_model_follow_its_updates(smol):
    _, tok, prompts = smol
    model = _lora().cuda()
    for _ in range(2):  # the second round runs after an update: the graphs must read the new merged weights
        eager = generate(model, tok, prompts, max_new_tokens=40, greedy=True, cuda_graphs=False)
        graphed = generate(model, tok, prompts, max_new_tokens=40, greedy=True, cuda_graphs=True)
        T = min(eager.completion_ids.size(1), graphed.completion_ids.size(1))
        assert torch.equal(graphed.completion_ids[:, :T], eager.completion_ids[:, :T])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)


def test_one_engine_per_option_set_and_hf_takes_top_k():
    model, tok = models.load_model("tiny"), models.load_tokenizer("tiny")
    eager, graphed = engine_for(model, cuda_graphs=False), engine_for(model, cuda_graphs=True)
    assert eager is not graphed  # evaluating with other options keeps the GRPO engine (and its graphs)
    assert engine_for(model, cuda_graphs=False) is eager and engine_for(model, cuda_graphs=True) is graphed
    roll = generate(model, tok, ["Hi"], num_generations=2, max_new_tokens=4, backend="hf", top_k=5)
    assert roll.completion_ids.shape[0] == 2 and roll.logprobs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the KV pool exists only under CUDA graphs")
def test_kv_pool_evicts_the_oldest_shape_and_stays_correct(smol, monkeypatch):
    import sasr.rollout.engine as engine

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


@pytest.mark.parametrize("backend", ["sasr", "hf"])
def test_every_end_of_turn_token_of_the_generation_config_stops_a_completion(backend):
    """A model whose generation config names several end tokens (as Qwen2.5's instruct models do) stops at any
    of them: here a second stop token chosen as the one tiny emits greedily at its third step (or earlier)."""
    model, tok = models.load_model("tiny"), models.load_tokenizer("tiny")
    task = get_task("arithmetic")
    prompts = render_prompts(tok, task, task.examples("test", 2, seed=1))
    plain = generate(model, tok, prompts, max_new_tokens=8, greedy=True, backend=backend)
    assert plain.completion_mask.sum(1).tolist() == [8, 8]  # tiny never says EOS in 8 tokens
    third = int(plain.completion_ids[0, 2])
    assert third != tok.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, third]
    stopped = generate(model, tok, prompts, max_new_tokens=8, greedy=True, backend=backend)
    expected = [
        int((row == third).nonzero()[0]) + 1 if (row == third).any() else 8 for row in plain.completion_ids
    ]
    assert expected[0] <= 3 and stopped.completion_mask.sum(1).tolist() == expected  # at its first stop token
    for row, n in enumerate(expected):
        assert torch.equal(stopped.completion_ids[row, :n], plain.completion_ids[row, :n])
