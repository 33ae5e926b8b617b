"""The forward passes a part loss may need besides the policy's own, by name (``LossTerm.passes`` names them).

``anchor`` is the learner's own: the reference's whole distribution at the demonstration tokens (ASFT), read
inside the policy pass. Any other pass is registered here by the module that needs it (a teacher's log-probs
of the same completion under another prompt, say): ``run(learner, rows, temperature)`` computes per-token
numbers [b, T] over one micro-batch's rows with no gradient; the learner runs it once per micro-batch, keeps it
across ``grpo.num_iterations`` and hands it to the part losses as ``PartInputs.passes[name]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sasr.registry import Registry


@dataclass(frozen=True)
class Pass:
    run: Callable[..., torch.Tensor]  # (learner, rows, temperature) -> [b, T]


PASSES: Registry[Pass] = Registry(
    "pass",
    "sasr.passes.PASSES",
    "a forward pass a loss term needs besides the policy's (`Pass(run)`: per-token numbers, no gradient)",
)
ANCHOR = "anchor"  # the learner's own (not in PASSES)
