"""Held-out evaluation: greedy accuracy (pass@1), mean reward, format rate, completion length."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from sasr.errors import SasrError
from sasr.rollout import generate, render_prompts
from sasr.tasks import Example, Score, Task


def score_all(task: Task, texts: Sequence[str], examples: Sequence[Example]) -> list[Score]:
    """Score completions against their examples; a reward function that raises stops the run with one
    sentence naming it and the first example it fails on."""
    try:
        return task.score_batch(list(texts), list(examples))
    except SasrError:
        raise
    except Exception as batch_exc:  # a user's judge may raise anything: find the example it fails on
        for i, (text, ex) in enumerate(zip(texts, examples)):
            try:
                task.score_batch([text], [ex])
            except Exception as exc:
                raise SasrError(
                    f"reward function {task.reward_name} raised {type(exc).__name__}: {exc} "
                    f"on example {i} ({ex.question[:60]!r})"
                ) from exc
        raise SasrError(
            f"reward function {task.reward_name} raised {type(batch_exc).__name__}: {batch_exc}"
        ) from batch_exc


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    task: Task,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    max_prompt_length: int = 512,
    progress: bool = True,
    desc: str = "eval",
) -> dict[str, float]:
    """Greedy-decode every example and score it. Returns sums and counts as floats (see ``summarise``)."""
    totals = {"n": 0.0, "correct": 0.0, "reward": 0.0, "formatted": 0.0, "tokens": 0.0}
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        prompts = render_prompts(tokenizer, [task.messages(ex) for ex in chunk])
        roll = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            max_prompt_length=max_prompt_length,
            greedy=True,
        )
        for s in score_all(task, roll.texts, chunk):
            totals["correct"] += s.correct
            totals["reward"] += s.reward
            totals["formatted"] += s.formatted
        totals["tokens"] += roll.completion_mask.sum().item()
        totals["n"] += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return totals


def summarise(totals: dict[str, float]) -> dict[str, float]:
    """Sums and counts -> accuracy, reward_mean, format_rate, completion_length."""
    n = max(totals["n"], 1.0)
    return {
        "n": int(totals["n"]),
        "accuracy": totals["correct"] / n,
        "reward_mean": totals["reward"] / n,
        "format_rate": totals["formatted"] / n,
        "completion_length": totals["tokens"] / n,
    }
