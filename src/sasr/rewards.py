"""Reward functions with TRL's contract, and how they make a rollout's reward.

A reward function is called exactly as TRL 1.16's ``GRPOTrainer`` calls one::

    f(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_extra=..., log_metric=...,
      **columns) -> list[float | None]

- ``prompts``: each row's prompt as chat messages (sasr always renders prompts with the chat template, so
  they are conversational, as TRL's are for a conversational dataset);
- ``completions``: each row's completion as a one-message list ``[{"role": "assistant", "content": text}]``;
- ``completion_ids``: each completion's token ids (padding left out);
- ``columns``: every other column of the rows, one list each (a file's own fields; a built-in task's
  ``question``, ``answer`` and ``solution``, the gold answer as TRL's math datasets name it);
- ``trainer_state``: a ``transformers.TrainerState`` whose ``global_step`` counts finished sasr steps;
- ``log_extra(column, values)`` adds a column to the step's samples (``completions.jsonl``), and
  ``log_metric(name, value)`` a number to the step's metrics line.

A function may return None (or NaN) for a row: the row is left out of that function's mean, and a row every
function left out gets no reward and no advantage (as TRL). Numbers may be bools, numpy or torch scalars, as
TRL's ``torch.tensor`` takes them. A function may be ``async``: those run concurrently on one event loop that
lives as long as the process (so an async client made once keeps working). An entry that names a model (a
hub id or a folder, no ``:``) is a reward model, as TRL takes one (``RewardModel``). The reward is the weighted sum of the functions (``reward_weights``, default all 1). The entry ``task`` is the
task's own judge; with no ``reward_funcs`` the judge alone is the reward. Whether a rollout is correct (its
accuracy, and what HPT's gate and SRFT's rollout term read) is always the judge's verdict.

A function with verl's contract instead, ``compute_score(data_source, solution_str, ground_truth,
extra_info=None)`` returning a float or a dict with ``score``, is called as verl calls it, once per completion
(``trl_from_verl``); a function with neither contract is refused when the run starts.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sasr.contracts import (
    PYTHON_OBJECT,
    function_name,
    load_function,
    trl_contract,
    verl_contract,
    verl_score,
)
from sasr.errors import SasrError
from sasr.metrics import metric
from sasr.tasks import Example, Score, Task

TASK = "task"  # the reward_funcs entry that names the task's own judge


def failure(name: str, examples: Sequence[Example], call_one: Callable[[int], Any], batch_exc: Exception):
    """The one-sentence error for a reward function (or judge) ``name`` that raised on a batch: it names the
    first example it raises on alone (``call_one(i)`` scores example i by itself)."""
    for i, ex in enumerate(examples):
        try:
            call_one(i)
        except Exception as exc:
            err = SasrError(
                f"reward function {name} raised {type(exc).__name__}: {exc} on example {i} ({ex.question[:60]!r})"
            )
            err.__cause__ = exc
            return err
    err = SasrError(f"reward function {name} raised {type(batch_exc).__name__}: {batch_exc}")
    err.__cause__ = batch_exc
    return err


def trl_from_verl(fn: Callable) -> Callable:
    """A verl reward function behind TRL's contract: called once per completion as verl calls it (the row's
    ``data_source``, ``ground_truth`` and ``extra_info`` columns; a task without them gives its name and
    the gold ``answer``); a dict's numeric keys go to ``log_metric``, the others to ``log_extra``."""

    @functools.wraps(fn)
    def reward(completions, log_metric, log_extra, answer=None, **columns) -> list[float]:
        n = len(completions)
        sources = columns.get("data_source") or [None] * n
        truths = columns.get("ground_truth") or answer or [None] * n
        infos = columns.get("extra_info") or [None] * n
        values, extras = [], defaultdict(list)
        for c, source, truth, info in zip(completions, sources, truths, infos):
            value, extra = verl_score(fn, source, c[0]["content"], truth, info)
            values.append(value)
            for key, v in extra.items():
                extras[key].append(v)
        for key, vs in extras.items():
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vs)
            if numbers and len(vs) == n:
                log_metric(key, sum(vs) / n)
            elif len(vs) == n:
                log_extra(key, vs)
        return values

    return reward


class RewardModel:
    """A sequence-classification model as a reward function, as TRL takes one: each prompt + completion
    rendered with the model's own chat template and tokenizer, scored in batches on this process's device;
    the reward is the model's single logit."""

    batch_size = 32

    def __init__(self, spec: str, model=None) -> None:
        from accelerate import PartialState
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        source = spec if model is None else model.name_or_path  # a loaded model: its tokenizer by its name
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            if model is None:
                model = AutoModelForSequenceClassification.from_pretrained(spec, num_labels=1)
        except (OSError, ValueError) as exc:
            raise SasrError(
                f"reward '{spec}' is neither module:function nor a sequence-classification model "
                f"({str(exc).splitlines()[0]})"
            ) from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(PartialState().device).eval()
        self.__name__ = (
            str(source).rstrip("/").split("/")[-1]
        )  # TRL names a reward model by its last path part

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        import torch

        texts = [
            self.tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)
        ]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(self.model.device)
            with torch.no_grad():
                scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores


def build_function(entry: str | dict[str, Any], obj: Any = None) -> Callable:
    """A reward_funcs entry: 'module:function', or {function: 'module:factory', kwargs: {...}}, which calls
    the factory with kwargs (TRL's get_soft_overlong_punishment(max_completion_len=..., ...) and the like);
    ``obj``: the function or reward model a Python caller passed for the entry (``sasr.inputs``).
    A function with verl's contract (``verl_contract``) is called as verl calls it."""
    if obj is not None:
        return RewardModel(entry, obj) if callable(getattr(obj, "forward", None)) else _trl_called(obj, entry)
    if isinstance(entry, dict):
        factory = load_function(entry["function"])
        try:
            return factory(**entry.get("kwargs", {}))
        except TypeError as exc:
            raise SasrError(
                f"reward factory '{entry['function']}' does not take these kwargs ({exc})"
            ) from None
    if entry.startswith(PYTHON_OBJECT):
        raise SasrError(
            f"reward function {entry[len(PYTHON_OBJECT) :]} was passed as a Python object, which a run "
            "directory cannot load again; pass it again: SASRTrainer(..., reward_funcs=[...])"
        )
    if ":" not in entry or Path(entry).is_dir():
        return RewardModel(entry)  # a model id or folder: a reward model, as TRL allows
    return _trl_called(load_function(entry), entry)


def _trl_called(fn: Callable, entry: str) -> Callable:
    """``fn`` as TRL calls a reward function: itself, or a verl function behind TRL's contract."""
    if verl_contract(fn):
        return trl_from_verl(fn)
    if not trl_contract(fn):
        raise SasrError(
            f"reward function '{entry}' takes neither TRL's arguments (completions, ..., **kwargs) nor "
            "verl's (data_source, solution_str, ground_truth, extra_info=None)"
        )
    return fn


def _is_async(fn: Callable) -> bool:
    """Whether calling fn returns a coroutine: an async function, a partial of one, or an instance of a class
    with an async __call__."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        fn = type(fn).__call__
    return inspect.iscoroutinefunction(fn)


_LOOP: asyncio.AbstractEventLoop | None = None


def _event_loop() -> asyncio.AbstractEventLoop:
    """One event loop for every async reward call of the process, run by a daemon thread (as TRL does)."""
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
        threading.Thread(target=_LOOP.run_forever, name="sasr-rewards", daemon=True).start()
    return _LOOP


@dataclass
class RewardCall:
    """What one batch of rollouts gives every reward function (besides its columns)."""

    prompts: list[list[dict[str, str]]]
    texts: list[str]
    completion_ids: list[list[int]]
    trainer_state: Any = None
    extra: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    metrics: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def kwargs(self, columns: dict[str, list]) -> dict[str, Any]:
        completions = [[{"role": "assistant", "content": t}] for t in self.texts]
        return {
            **columns,
            "prompts": self.prompts,
            "completions": completions,
            "completion_ids": self.completion_ids,
            "trainer_state": self.trainer_state,
            "log_extra": lambda column, values: self.extra[column].extend(values),
            "log_metric": lambda name, value: self.metrics[name].append(float(value)),
        }

    def select(self, i: int) -> RewardCall:
        return RewardCall([self.prompts[i]], [self.texts[i]], [self.completion_ids[i]], self.trainer_state)


def columns(task: Task, examples: Sequence[Example]) -> dict[str, list]:
    """Every column of the rows but prompt/completion, as TRL passes a dataset's other columns."""
    rows = [task.columns(ex) for ex in examples]
    keys = dict.fromkeys(k for r in rows for k in r if k not in ("prompt", "completion", "completion_ids"))
    return {k: [r.get(k) for r in rows] for k in keys}


class Rewards:
    """The task's judge plus the configured reward functions; ``score`` gives each row's reward and verdict."""

    def __init__(
        self,
        task: Task,
        funcs: Sequence[str | dict],
        weights: Sequence[float] | None = None,
        objects: dict[str, Any] | None = None,
    ) -> None:
        self.task, objects = task, objects or {}
        self.funcs = [
            None if f == TASK else build_function(f, objects.get(f) if isinstance(f, str) else None)
            for f in funcs
        ]  # None: the judge
        self.names = [task.name if f is None else function_name(f) for f in self.funcs]  # as logged
        self.specs = [e if isinstance(e, str) else e["function"] for e in funcs]  # as errors name them
        if weights is not None and len(weights) != len(self.funcs):
            raise SasrError(
                f"reward_weights has {len(weights)} weights for {len(self.funcs)} reward_funcs; give one per function"
            )
        self.weights = list(weights) if weights is not None else [1.0] * len(self.funcs)

    @property
    def custom(self) -> bool:
        """Whether the reward is more than the task's judge alone."""
        return bool(self.funcs)

    def score(
        self, scores: list[Score], call: RewardCall, examples: Sequence[Example]
    ) -> tuple[list[float], dict[str, float]]:
        """Each row's reward (NaN where every function returned None) and the per-function statistics
        ``rewards/NAME/mean`` and ``/std`` (over the rows the function scored), from the judge's ``scores``.
        Each function's values go to ``call.extra`` as the column ``rewards/NAME`` of the samples."""
        if not self.custom:
            return [s.reward for s in scores], {}
        cols = columns(self.task, examples)
        per_func: list[list[float]] = [[]] * len(self.funcs)
        pending = []
        for i, fn in enumerate(self.funcs):
            if fn is None:
                per_func[i] = [s.reward for s in scores]
            elif _is_async(fn):
                pending.append(i)
            else:
                per_func[i] = self._checked(i, self._call(i, call, cols, examples), len(scores))
        if pending:

            async def gather() -> list:
                return await asyncio.gather(*(self.funcs[i](**call.kwargs(cols)) for i in pending))

            try:
                outputs = asyncio.run_coroutine_threadsafe(gather(), _event_loop()).result()
            except SasrError:
                raise
            except Exception as exc:
                names = ", ".join(self.specs[i] for i in pending)
                raise SasrError(f"reward function {names} raised {type(exc).__name__}: {exc}") from exc
            for i, out in zip(pending, outputs):
                per_func[i] = self._checked(i, out, len(scores))
        rewards, stats = [], {}
        for row in zip(*per_func):
            scored = [w * r for w, r in zip(self.weights, row) if not math.isnan(r)]
            rewards.append(sum(scored) if scored else math.nan)
        for name, values in zip(self.names, per_func):
            kept = [v for v in values if not math.isnan(v)]
            mean = sum(kept) / len(kept) if kept else math.nan
            var = sum((v - mean) ** 2 for v in kept) / (len(kept) - 1) if len(kept) > 1 else 0.0
            stats[f"rewards/{name}/mean"], stats[f"rewards/{name}/std"] = mean, math.sqrt(var)
        for name, values in call.metrics.items():
            if metric(name) is not None:  # a name sasr writes itself (a step's, a family's or a method's)
                raise SasrError(
                    f"a reward function's log_metric named '{name}', one of sasr's own metrics; choose another name"
                )
            stats[name] = sum(values) / len(values)
        for name, values in zip(self.names, per_func):  # each function's value, beside each sample
            call.extra[f"rewards/{name}"] = [None if math.isnan(v) else v for v in values]
        return rewards, stats

    def _call(self, i: int, call: RewardCall, cols: dict[str, list], examples: Sequence[Example]) -> Any:
        """Call function i; if it raises, find the first row it raises on and say so in one sentence."""
        fn = self.funcs[i]
        try:
            return fn(**call.kwargs(cols))
        except Exception as batch_exc:

            def one(j: int) -> Any:
                return fn(**call.select(j).kwargs({k: [v[j]] for k, v in cols.items()}))

            raise failure(self.specs[i], examples, one, batch_exc) from batch_exc

    def _checked(self, i: int, out: Any, n: int) -> list[float]:
        """A function's output as floats (None -> NaN), or one sentence on what is wrong with it."""
        name = self.specs[i]
        if not isinstance(out, (list, tuple)) or len(out) != n:
            got = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
            raise SasrError(f"reward function {name} returned {got} values for {n} completions")
        values = []
        for j, r in enumerate(out):
            try:
                value = math.nan if r is None else float(r)  # bools, numpy and torch scalars too
            except (TypeError, ValueError):
                value = None
            if value is None or isinstance(r, str) or math.isinf(value):
                raise SasrError(
                    f"reward function {name} returned {r!r}, not a finite number or None, for completion {j}"
                )
            values.append(value)  # NaN: not scored, as None
        return values


def score_all(task: Task, texts: Sequence[str], examples: Sequence[Example]) -> list[Score]:
    """Score completions against their examples; a reward function that raises stops the run with one
    sentence naming it and the first example it fails on."""
    try:
        return task.score_batch(list(texts), list(examples))
    except SasrError:
        raise
    except Exception as batch_exc:  # a user's judge may raise anything: find the example it fails on

        def one(i: int) -> list[Score]:
            return task.score_batch([texts[i]], [examples[i]])

        raise failure(task.reward_name, examples, one, batch_exc) from batch_exc
