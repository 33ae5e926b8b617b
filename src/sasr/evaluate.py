"""Held-out evaluation: greedy accuracy, and with K samples pass@k, maj@k and the diversity of reasoning.

``evaluate`` returns one record per example (so records from several processes can be gathered);
``summarise`` averages them. Metrics:
- greedy: ``accuracy`` (pass@1 of greedy decoding), ``reward_mean``, ``format_rate``, ``completion_length``;
- K samples at a temperature: ``sample_accuracy`` (mean over samples), ``pass@K`` (the unbiased estimator
  of Chen et al. 2021 with n = K), ``maj@K`` (the most frequent final answer is right), and diversity among
  the K samples of a prompt: ``distinct_1..4`` (distinct word n-grams / all n-grams), ``edit_distance``
  (mean pairwise Levenshtein distance / longer length), ``distinct_answers`` (number of different final answers).

``evaluate_model`` does both for a model folder or alias on a task's held-out splits (``sasr eval``, and each
model of ``sasr compare``).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import Levenshtein
import torch
from tqdm.auto import tqdm

from sasr import models
from sasr.data import render_prompts
from sasr.rewards import score_all
from sasr.rollout import generate
from sasr.tasks import Example, Task, extract_answer, get_task

if TYPE_CHECKING:
    from sasr.config import TrainConfig

# --- the metrics, as plain functions ----------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """maj@k: the most frequent extracted answer (first seen wins ties; None never votes) is a correct one."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return any(ok for a, ok in zip(answers, correct) if a == winner)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all n-grams of the texts (1.0: no n-gram repeats); 0 when none exist."""
    grams = [tuple(ws[i : i + n]) for t in texts for ws in [t.split()] for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_edit_distance(texts: Sequence[str]) -> float:
    """Mean over pairs of the character Levenshtein distance divided by the longer text's length."""
    pairs = list(itertools.combinations(texts, 2))
    if not pairs:
        return 0.0
    return sum(Levenshtein.distance(a, b) / max(len(a), len(b), 1) for a, b in pairs) / len(pairs)


# --- generation ------------------------------------------------------------------------------


def settings(config, samples: int | None = None) -> dict[str, Any]:
    """``evaluate``'s keyword arguments from a run's config (``samples``: default eval.samples)."""
    e, g = config.eval, config.grpo
    return {
        "samples": e.samples if samples is None else samples,
        "sample_size": e.sample_size,
        "temperature": e.temperature,
        "max_new_tokens": e.max_new_tokens,
        "batch_size": e.batch_size,
        "share_prefix": e.share_prefix,
        "max_prompt_length": g.max_prompt_length,
        "backend": g.generation_backend,
        "cuda_graphs": g.cuda_graphs,
        "chat_template_kwargs": config.model.chat_template_kwargs,
    }


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    task: Task,
    examples: Sequence[Example],
    *,
    samples: int = 0,
    sample_size: int | None = None,
    temperature: float = 1.0,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    max_prompt_length: int = 512,
    progress: bool = True,
    desc: str = "eval",
    backend: str = "sasr",
    cuda_graphs: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
    keep_text: bool = False,
    share_prefix: bool = True,
) -> list[dict[str, Any]]:
    """One record per example: greedy result, and with ``samples`` = K > 0 the sampled metrics (for the first
    ``sample_size`` examples only, when given). ``keep_text``: also the question and the greedy completion.
    ``share_prefix`` (sasr backend; hf ignores it): the questions' common start (the system prompt) is prefilled
    once per batch; its logits equal the plain prefill's up to float rounding."""
    records: list[dict[str, Any]] = []
    per_batch = max(1, batch_size // max(samples, 1))  # prompts per generate call when sampling
    sampled = list(examples[:sample_size]) if samples > 0 else []
    bar = tqdm(total=len(examples) + len(sampled), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        prompts = render_prompts(tokenizer, task, chunk, chat_template_kwargs)
        roll = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            max_prompt_length=max_prompt_length,
            greedy=True,
            backend=backend,
            cuda_graphs=cuda_graphs,
            share_prefix=share_prefix,
        )
        lengths = roll.completion_mask.sum(1).tolist()
        for s, n_tok, ex, text in zip(score_all(task, roll.texts, chunk), lengths, chunk, roll.texts):
            record = {
                "correct": float(s.correct),
                "reward": s.reward,
                "formatted": float(s.formatted),
                "length": n_tok,
            }
            if keep_text:
                record.update(question=ex.question, completion=text)
            records.append(record)
        bar.update(len(chunk))
    if sampled:
        for start in range(0, len(sampled), per_batch):
            chunk = sampled[start : start + per_batch]
            prompts = render_prompts(tokenizer, task, chunk, chat_template_kwargs)
            roll = generate(
                model,
                tokenizer,
                prompts,
                num_generations=samples,
                max_new_tokens=max_new_tokens,
                max_prompt_length=max_prompt_length,
                temperature=temperature,
                backend=backend,
                cuda_graphs=cuda_graphs,
                share_prefix=share_prefix,
            )
            grouped = [ex for ex in chunk for _ in range(samples)]
            scores = score_all(task, roll.texts, grouped)
            for i in range(len(chunk)):
                texts = roll.texts[i * samples : (i + 1) * samples]
                group = scores[i * samples : (i + 1) * samples]
                answers = [extract_answer(t) for t in texts]
                ok = [s.correct for s in group]
                rec = records[start + i]
                rec["sample_accuracy"] = sum(ok) / samples
                rec[f"pass@{samples}"] = pass_at_k(samples, sum(ok), samples)
                rec[f"maj@{samples}"] = float(majority_correct(answers, ok))
                for n in range(1, 5):
                    rec[f"distinct_{n}"] = distinct_n(texts, n)
                rec["edit_distance"] = mean_edit_distance(texts)
                rec["distinct_answers"] = len({a for a in answers if a is not None})
            bar.update(len(chunk))
    bar.close()
    return records


GREEDY = ("accuracy", "reward_mean", "format_rate", "completion_length")  # what greedy decoding gives


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean of every metric over the examples that have it; ``n`` the number of examples (and
    ``n_sampled`` the number with sampled metrics, when fewer)."""
    out: dict[str, float] = {"n": len(records)}
    if not records:
        return out
    names = dict(zip(("correct", "reward", "formatted", "length"), GREEDY))
    keys = dict.fromkeys(k for r in records for k, v in r.items() if not isinstance(v, str))  # numbers
    for key in keys:
        values = [r[key] for r in records if key in r]
        out[names.get(key, key)] = sum(values) / len(values)
    n_sampled = sum("sample_accuracy" in r for r in records)
    if 0 < n_sampled < len(records):
        out["n_sampled"] = n_sampled
    return out


# --- a model on a task's held-out splits ------------------------------------------------------------------


def evaluate_model(
    model_path: str, config: TrainConfig, seed: int, progress: bool = True, splits: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Greedy (+ ``eval.samples`` sampled) evaluation of a model folder or alias on every held-out split of
    the config's task (or on ``splits``): ``{split: {"summary": means, "records": one per question}}``. The
    same numbers for a run's final/ and a copy of it anywhere else."""
    from accelerate.utils import set_seed

    task = get_task(config.task.name, **config.task.options())
    splits = list(splits or task.held_out_splits)
    for split in splits:
        task.check_split(split)
    tokenizer = models.load_tokenizer(model_path)
    model = models.load_model(model_path, config.model.dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    out = {}
    for split in splits:
        set_seed(seed)  # each split's samples independent of which splits came before
        examples = task.examples(split, config.task.test_size, seed=config.seed)
        records = evaluate(
            model,
            tokenizer,
            task,
            examples,
            progress=progress,
            desc=f"eval {Path(model_path).name} ({split})",
            **settings(config),
        )
        records = [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in records]
        out[split] = {"summary": summarise(records), "records": records}
    return out
