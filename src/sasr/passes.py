"""The forward passes a part loss may need besides the policy's own, by name (``LossTerm.passes`` names them).

``anchor`` is the learner's own: the reference's whole distribution at the demonstration tokens (ASFT), read
inside the policy pass. Any other pass is registered here by the module that needs it (a teacher's log-probs
of the same completion under another prompt, say): ``run(learner, rows, temperature)`` computes per-token
numbers [b, T] over one micro-batch's rows with no gradient; the learner runs it once per micro-batch, keeps it
across ``grpo.num_iterations`` and hands it to the part losses as ``PartInputs.passes[name]``. A pass with
``reads_options`` is called with ``options=`` too: the options of a part that named it.

A ``whole`` pass returns instead a distribution at each token, as logits over the temperature [b, T, V]: the
parts get its log-probabilities of the completion's tokens [b, T] in ``PartInputs.passes[name]``, and a part whose
``LossTerm.divergence`` names it gets the policy's divergence from it, computed inside the policy pass with
gradient, in ``PartInputs.divergence``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sasr.logprobs import completion_logprobs, completion_scaled_logits
from sasr.registry import Registry


@dataclass(frozen=True)
class Pass:
    run: Callable[..., torch.Tensor]  # (learner, rows, temperature) -> [b, T], or [b, T, V] when whole
    whole: bool = False
    reads_options: bool = False


PASSES: Registry[Pass] = Registry(
    "pass",
    "sasr.passes.PASSES",
    "a forward pass a loss term needs besides the policy's (`Pass(run, whole, reads_options)`: per-token "
    "numbers or distributions, no gradient)",
)
ANCHOR = "anchor"  # the learner's own (not in PASSES)


def context_logprobs(
    learner, rows, temperature: float, *, options: dict[str, Any], whole: bool
) -> torch.Tensor:
    """A teacher: the log-probabilities of each row's completion under its prompt ``options["context"]``
    (``Rows.contexts``) [b, T], or the whole distributions there as logits over the temperature [b, T, V]
    (``whole``), computed by ``options["teacher"]``'s weights: the current ones (live), the initial ones (base)
    or the part's moving average of them (ema, ``options["average"]``, a ``sasr.reference.AveragePolicy``)."""
    ids, mask = rows.contexts[options["context"]]
    T = rows.completion_ids.size(1)
    input_ids = torch.cat([ids, rows.completion_ids], dim=1)
    attention = torch.cat([mask, rows.completion_mask], dim=1)
    if options["teacher"] == "live":
        model, weights = learner.accelerator.unwrap_model(learner.model), contextlib.nullcontext()
    else:
        policy = options["average"] if options["teacher"] == "ema" else learner.reference
        model, weights = policy.model, policy.active()
    with weights, learner.accelerator.autocast():
        if whole:
            return completion_scaled_logits(model, input_ids, attention, T, temperature)
        return completion_logprobs(model, input_ids, attention, T, temperature)[0]


def register_context_passes(context: str, kinds: Sequence[str]) -> None:
    """The passes ``CONTEXT_KIND`` (per token) and ``CONTEXT_KIND_whole`` of each weights kind."""
    for kind in kinds:
        for whole in (False, True):
            run = functools.partial(context_logprobs, whole=whole)
            PASSES.add(f"{context}_{kind}{'_whole' if whole else ''}", Pass(run, whole, reads_options=True))
