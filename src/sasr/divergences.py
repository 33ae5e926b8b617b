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
    """fn(logits / temperature, target) chunk by chunk of one row's tokens, the target read in place (a view of
    the rows ``rows`` of a larger tensor, from token ``start`` on: nothing of it copied). Forward keeps no
    graph; backward recomputes one chunk's graph at a time and writes its gradient into the logits' (memory:
    one [chunk, V] graph)."""

    @staticmethod
    def forward(ctx, logits, target, rows: list[int], start: int, fn, temperature: float, chunk: int):
        # logits [b, w, V]; target [B, T, V], of which rows[i] and tokens start .. start + w -> [b, w]
        out = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
        with torch.no_grad():
            for i, lo, hi in _chunks(logits, chunk):
                q = target[rows[i], start + lo : start + hi]
                out[i, lo:hi] = fn(logits[i, lo:hi].float() / temperature, q.float())
        ctx.save_for_backward(logits, target)
        ctx.rows, ctx.start, ctx.fn, ctx.temperature, ctx.chunk = rows, start, fn, temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, target = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for i, lo, hi in _chunks(logits, ctx.chunk):
            q = target[ctx.rows[i], ctx.start + lo : ctx.start + hi].float()
            with torch.enable_grad():
                x = logits[i, lo:hi].detach().float().requires_grad_()
                (dx,) = torch.autograd.grad(ctx.fn(x / ctx.temperature, q), x, grad_out[i, lo:hi])
            grad[i, lo:hi] = dx
        return grad, None, None, None, None, None, None


def _chunks(logits: torch.Tensor, chunk: int):
    """(row, first token, end) of each chunk of at most ``chunk`` tokens of each row."""
    for i in range(logits.size(0)):
        for lo in range(0, logits.size(1), chunk):
            yield i, lo, min(lo + chunk, logits.size(1))


def token_divergence(
    logits: torch.Tensor,
    target: torch.Tensor,
    fn: TokenDivergence,
    temperature: float,
    chunk: int,
    rows: list[int] | None = None,
    start: int = 0,
) -> torch.Tensor:
    """logits [b, w, V] (differentiable), the target's logits over the temperature [B, T, V] (its rows
    ``rows``, default all, from token ``start`` on) -> fn per token [b, w], ``chunk`` tokens at a time."""
    rows = list(range(logits.size(0))) if rows is None else rows
    return _Chunked.apply(logits, target, rows, start, fn, temperature, chunk)
