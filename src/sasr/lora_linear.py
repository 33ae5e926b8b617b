"""LoRA linear layers as one autograd function, for float32 forward and backward passes.

peft computes ``W x + s B (A x)`` as five operations, two of them passes over the ``[N, out]`` output (the
scaling and the sum) that autograd then walks back through. With ``W`` frozen the same function is one
matmul with ``W + s B A`` (built by a small one), and its backward needs only ``x``:

    dx = g W + s (g B) A,    dA = s (g B)^T x,    dB = s g^T (x A^T)

Same values and gradients to float32 rounding. Used where the decode's merge is (float32, one plain LoRA
adapter, see ``sasr.rollout.decode_weights``), when the adapter has no dropout, the base layer is frozen, no layer
is recomputed by activation checkpointing (the recomputation would run outside this block), and nothing runs
under autocast (``bf16``: its inputs would be bfloat16).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

# Weights W + s B A equal the adapted layer only in these (bfloat16 rounds small updates away).
EXACT_DTYPES = (torch.float32, torch.float64)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        # x [..., in], weight [out, in], bias [out] or None, lora_a [r, in], lora_b [out, r]
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return F.linear(x, torch.addmm(weight, lora_b, lora_a, alpha=scaling), bias)  # [..., out]

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g, x2 = grad.reshape(-1, grad.size(-1)), x.reshape(-1, x.size(-1))  # [N, out], [N, in]
        gb = g @ lora_b  # [N, r]
        dx = (g @ weight).addmm_(gb, lora_a, alpha=s).view(x.shape) if ctx.needs_input_grad[0] else None
        d_a = (gb.t() @ x2).mul_(s) if ctx.needs_input_grad[3] else None  # [r, in]
        d_b = (g.t() @ (x2 @ lora_a.t())).mul_(s) if ctx.needs_input_grad[4] else None  # [out, r]
        return dx, None, None, d_a, d_b, None


def mergeable_layers(model) -> dict[str, tuple[torch.nn.Module, str]] | None:
    """{name: (LoRA linear layer, its active adapter)} when every adapter layer of this peft model can be
    merged for decoding, else None (not a peft model, adapters off, DoRA or other variants, several active
    adapters, LoRA bias, half-precision weights)."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is a dependency, but the engine does not need it for plain models
        return None
    if not isinstance(model, PeftModel):
        return None
    layers = {}
    for name, m in model.named_modules():
        if not isinstance(m, BaseTunerLayer):
            continue
        if not isinstance(m, LoraLinear) or m.merged or m.disable_adapters:
            return None
        active = [a for a in m.active_adapters if a in m.lora_A]
        if len(active) != 1:
            return None
        (adapter,) = active
        if adapter in getattr(m, "lora_variant", {}) or getattr(m, "lora_bias", {}).get(adapter, False):
            return None
        if m.get_base_layer().weight.dtype not in EXACT_DTYPES:
            return None
        layers[name] = (m, adapter)
    return layers or None


@contextlib.contextmanager
def replaced_forwards(modules: Iterable[torch.nn.Module], make_forward: Callable) -> Iterator[None]:
    """Inside this block each module computes with ``make_forward(module)`` instead of its ``forward``.

    A forward already replaced on the instance (accelerate's hooks, say) is left alone.
    """
    swapped = []
    try:
        for m in modules:
            if "forward" not in m.__dict__:
                m.forward = make_forward(m)
                swapped.append(m)
        yield
    finally:
        for m in swapped:
            del m.forward


def _forward(layer, adapter: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = layer.get_base_layer()
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return _LoRALinear.apply(x, base.weight, base.bias, a, b, layer.scaling[adapter])


def checkpointed(model) -> bool:
    """Whether a training forward of ``model`` recomputes layers in backward (activation checkpointing)."""
    return model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def mixed_precision(model) -> bool:
    """Whether ``model`` runs under autocast: now, or in its forward (accelerate wraps the forward of a model
    it prepares with mixed precision, keeping the original as ``_original_forward``)."""
    return (
        torch.is_autocast_enabled("cpu")
        or torch.is_autocast_enabled("cuda")
        or hasattr(model, "_original_forward")
    )


def fusable_layers(model) -> dict[str, tuple[torch.nn.Module, str]] | None:
    """The layers of ``mergeable_layers`` if each also has no dropout and a frozen base layer, and no layer is
    recomputed in backward; else None."""
    layers = mergeable_layers(model)
    if layers is None or checkpointed(model) or mixed_precision(model):
        return None
    for layer, adapter in layers.values():
        dropout, base = layer.lora_dropout[adapter], layer.get_base_layer()
        if not (isinstance(dropout, torch.nn.Identity) or getattr(dropout, "p", 1.0) == 0.0):
            return None
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return None
    return layers


@contextlib.contextmanager
def fused_lora(model) -> Iterator[bool]:
    """Within this block each LoRA linear layer of ``model`` (a peft model) runs as one autograd function.

    Yields whether it does; a model it does not apply to runs unchanged.
    """
    layers = fusable_layers(model)
    if layers is None:
        yield False
        return
    adapters = dict(layers.values())  # layer -> its active adapter
    with replaced_forwards(adapters, lambda layer: functools.partial(_forward, layer, adapters[layer])):
        yield True
