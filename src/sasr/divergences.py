"""Divergences between the policy's whole next-token distribution and a target distribution (a teacher's),
token by token, computed inside the policy pass from its logits without keeping a [N, V] graph.

Shapes: N tokens, V vocabulary, K categories of a support (V, the top k, or k + 1 with a tail bucket).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sasr.errors import SasrError


def divergence(student: torch.Tensor, teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    """Log-probabilities [..., K] on one support -> [...]: KL(teacher || student) at alpha 0 (forward),
    KL(student || teacher) at 1 (reverse), otherwise the generalized Jensen-Shannon divergence
    (1 - alpha) KL(student || m) + alpha KL(teacher || m), m = (1 - alpha) student + alpha teacher."""
    if alpha == 0.0:
        return (teacher.exp() * (teacher - student)).sum(-1)
    if alpha == 1.0:
        return (student.exp() * (student - teacher)).sum(-1)
    mixture = torch.logaddexp(student + math.log(1 - alpha), teacher + math.log(alpha))
    from_student = (student.exp() * (student - mixture)).sum(-1)
    from_teacher = (teacher.exp() * (teacher - mixture)).sum(-1)
    return (1 - alpha) * from_student + alpha * from_teacher


def with_tail(logps: torch.Tensor) -> torch.Tensor:
    """Log-probabilities on a part of the vocabulary [..., k] -> [..., k + 1]: one more category holding the
    mass outside it, log(1 - sum p) (the sum capped just below 1)."""
    inside = torch.logsumexp(logps, -1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logps, torch.log(-torch.expm1(inside))], -1)


@dataclass(frozen=True)
class TokenDivergence:
    """Per token, the divergence of the student from the target, both given as logits already divided by the
    temperature: over every token (``topk`` None), or over the student's ``topk`` most likely tokens,
    renormalized there or with the rest of the mass as one more category (``add_tail``). Both sides are
    normalized over the whole vocabulary before the support is cut."""

    alpha: float
    topk: int | None = None
    add_tail: bool = False

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # logits [n, V], target [n, V] -> [n]
        if self.topk is None:
            return divergence(logits.log_softmax(-1), target.log_softmax(-1), self.alpha)
        if self.topk > logits.size(-1):
            raise SasrError(
                f"distillation_topk is {self.topk}, more than the model's {logits.size(-1)} tokens; set it lower"
            )
        top, where = logits.topk(self.topk, dim=-1)  # [n, k]: the student's own support
        student = top - logits.logsumexp(-1, keepdim=True)
        teacher = target.gather(-1, where) - target.logsumexp(-1, keepdim=True)
        if self.add_tail:
            student, teacher = with_tail(student), with_tail(teacher)
        else:
            student = student - student.logsumexp(-1, keepdim=True)
            teacher = teacher - teacher.logsumexp(-1, keepdim=True)
        return divergence(student, teacher, self.alpha)


class _Chunked(torch.autograd.Function):
    """fn(logits / temperature, target) chunk by chunk of tokens. Forward keeps no graph; backward recomputes
    one chunk's graph at a time and writes its gradient into the logits' (memory: one [chunk, V] graph)."""

    @staticmethod
    def forward(ctx, logits, target, fn, temperature: float, chunk: int):
        # logits [N, V], target [N, V] -> [N]
        with torch.no_grad():
            out = [fn(lg.float() / temperature, q) for lg, q in zip(logits.split(chunk), target.split(chunk))]
        ctx.save_for_backward(logits, target)
        ctx.fn, ctx.temperature, ctx.chunk = fn, temperature, chunk
        return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        logits, target = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for lg, q, g, into in zip(*(t.split(ctx.chunk) for t in (logits, target, grad_out, grad))):
            with torch.enable_grad():
                x = lg.detach().float().requires_grad_()
                (dx,) = torch.autograd.grad(ctx.fn(x / ctx.temperature, q), x, g)
            into.copy_(dx)
        return grad, None, None, None, None


def token_divergence(
    logits: torch.Tensor, target: torch.Tensor, fn: TokenDivergence, temperature: float, chunk: int
) -> torch.Tensor:
    """logits [B, T, V] (differentiable), the target's logits over the temperature [B, T, V] -> fn per token
    [B, T], ``chunk`` tokens at a time."""
    B, T, V = logits.shape
    flat = _Chunked.apply(logits.reshape(B * T, V), target.reshape(B * T, V).float(), fn, temperature, chunk)
    return flat.view(B, T)
