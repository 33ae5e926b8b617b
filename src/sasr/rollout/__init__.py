"""Sampling G completions per prompt (and greedy decoding for evaluation).

Two backends behind one function: ``sasr`` (the rollout engine in ``sasr.rollout.engine``: static KV cache, finished
rows dropped, sampling log-probs kept, CUDA graphs on a GPU) and ``hf`` (transformers' ``model.generate``,
for models or generation arguments the engine does not handle).

Prompts are chat messages rendered with the tokenizer's chat template and left-padded, so every row's
completion starts at the same column. A completion ends at its first EOS (kept, so the model learns to stop).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sasr.batch import Sequences
from sasr.data import encode_prompts
from sasr.errors import SasrError
from sasr.rollout import engine


@dataclass
class Rollouts(Sequences):
    """Sampled completions: ``Sequences`` with the decoded texts and the sampler's log-probs."""

    texts: list[str]  # decoded completions, special tokens dropped
    logprobs: torch.Tensor | None = None  # [B, T] log-prob of each sampled token when it was sampled (sasr)


def stop_token_ids(model, tokenizer) -> tuple[int, ...]:
    """The tokens that end a completion: the tokenizer's EOS and every end-of-turn token the model's generation
    config names (Qwen2.5's instruct models stop at <|im_end|> and <|endoftext|>)."""
    config = getattr(model, "generation_config", None)
    named = getattr(config, "eos_token_id", None)
    named = list(named) if isinstance(named, (list, tuple)) else [named]
    return tuple(dict.fromkeys(int(i) for i in [tokenizer.eos_token_id, *named] if i is not None))


def completion_mask(ids: torch.Tensor, eos_token_id: int | tuple[int, ...]) -> torch.Tensor:
    """1 for every token up to and including the first stop token of each row, 0 after. [B, T] -> [B, T]"""
    is_eos = torch.isin(ids, torch.tensor(eos_token_id, device=ids.device))
    seen_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()  # EOS count strictly before each position
    return (seen_before == 0).long()


def _hf_generate(
    model, prompt_ids, prompt_mask, max_new_tokens, eos, pad, params, generation_kwargs, engine_opts
):
    sampling = (
        {"do_sample": False}
        if params.greedy
        else {
            "do_sample": True,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
        }
    )
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
        use_cache=True,
        **{**sampling, **generation_kwargs},  # the caller's generate arguments win (e.g. top_k)
    )
    model.train(was_training)
    return out[:, prompt_ids.size(1) :], None


def _sasr_generate(
    model, prompt_ids, prompt_mask, max_new_tokens, eos, pad, params, generation_kwargs, engine_opts
):
    if problem := engine.unsupported_kwargs(generation_kwargs):
        raise SasrError(problem)
    params = dataclasses.replace(
        params,
        top_k=generation_kwargs.get("top_k", params.top_k),
        min_new_tokens=generation_kwargs.get("min_new_tokens", 0),
    )
    engine_ = engine.engine_for(model, cuda_graphs=engine_opts["cuda_graphs"], compile=engine_opts["compile"])
    return engine_.decode(
        prompt_ids,
        prompt_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        params=params,
        share_prefix=engine_opts["share_prefix"],
    )


GENERATION_BACKENDS = {"sasr": _sasr_generate, "hf": _hf_generate}


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_generations: int = 1,
    max_new_tokens: int = 128,
    max_prompt_length: int = 512,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    backend: str = "sasr",
    cuda_graphs: bool = True,
    compile: bool = False,
    share_prefix: bool = False,
    **generation_kwargs,
) -> Rollouts:
    """``num_generations`` completions per prompt, grouped consecutively: rows g*i .. g*i+g-1 share prompt i.

    ``share_prefix`` (sasr backend): the prompts' common first tokens are prefilled once, for many distinct
    prompts with one system prompt (evaluation). The logits equal the plain prefill's up to float rounding, so
    a near-tie may decode differently.
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, max_prompt_length, device)
    return generate_ids(
        model,
        tokenizer,
        prompt_ids,
        prompt_mask,
        num_generations=num_generations,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        greedy=greedy,
        backend=backend,
        cuda_graphs=cuda_graphs,
        compile=compile,
        share_prefix=share_prefix,
        **generation_kwargs,
    )


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    num_generations: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    backend: str = "sasr",
    cuda_graphs: bool = True,
    compile: bool = False,
    share_prefix: bool = False,
    **generation_kwargs,
) -> Rollouts:
    """``generate`` from prompts already tokenized: left-padded ``prompt_ids``, ``prompt_mask`` [n, P]."""
    device = prompt_ids.device
    prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)  # [B, P], B = prompts x G
    prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    params = engine.SamplingParams(temperature=temperature, top_p=top_p, greedy=greedy)
    stop = stop_token_ids(model, tokenizer)
    completion_ids, logprobs = GENERATION_BACKENDS[backend](
        model,
        prompt_ids,
        prompt_mask,
        max_new_tokens,
        stop if len(stop) > 1 else stop[0],
        tokenizer.pad_token_id,
        params,
        generation_kwargs,
        {"cuda_graphs": cuda_graphs, "compile": compile, "share_prefix": share_prefix},
    )
    if completion_ids.size(1) == 0:  # nothing generated at all: keep one pad column so shapes stay valid
        completion_ids = torch.full_like(prompt_ids[:, :1], tokenizer.pad_token_id)
        logprobs = None if logprobs is None else torch.zeros(completion_ids.shape, device=device)
    mask = completion_mask(completion_ids, stop)
    texts = tokenizer.batch_decode(
        completion_ids * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True
    )
    return Rollouts(prompt_ids, prompt_mask, completion_ids, mask, texts, logprobs)
