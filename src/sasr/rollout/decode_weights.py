"""The weights a decode reads: LoRA merged into each layer's matrix, and on a CPU prepacked for oneDNN.

Both are views for the length of one rollout; the trained weights are never written.

- **Merged LoRA.** peft computes an adapted layer as ``W x + s B (A x)``: two more small matmuls (and on CUDA
  more kernels) per layer per token. The adapter does not change during a rollout, so the decode uses
  ``W + s B A`` in the base layer's place with the adapter switched off. Only for float32 and float64
  weights: in bfloat16, ``W + s B A`` rounds away every update smaller than half a unit in the last place of
  ``W`` (most of them early in training), so rollouts would sample from a policy other than the one being
  trained; such models decode through the adapter as before.
- **Prepacked linears (CPU).** A decode step multiplies a few rows by every weight matrix. MKL's general
  matmul repacks the whole matrix on every call, which at 16 rows costs as much as the product; a matrix
  reordered once for oneDNN (what ``torch.compile`` does on CPUs with weight freezing) runs faster
  (measured in docs/performance.md).

Memory: a second copy of the weights while a rollout runs (the packed matrices; merged LoRA layers add
theirs), freed after it on a CPU; the merged matrices stay between rollouts under CUDA graphs.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sasr.lora_linear import mergeable_layers, replaced_forwards

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# model -> {layer name: merged weight}, kept between rollouts where CUDA graphs hold the buffers' addresses.
_BUFFERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@functools.cache
def packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN reorders a ``dtype`` matrix on this CPU (bfloat16 needs AVX512-BW/VL/DQ or AVX-NE-CONVERT,
    which some CPUs lack: tried once on a small matrix)."""
    if dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), 1)
    except (AttributeError, RuntimeError):
        return False
    return True


def can_pack(model) -> bool:
    """oneDNN prepacking applies: a CPU model in a dtype this CPU's oneDNN reorders (``packs``)."""
    p = next(model.parameters())
    return p.device.type == "cpu" and packs(p.dtype)


@contextlib.contextmanager
def _merged(model, layers: dict[str, tuple[torch.nn.Module, str]], keep_buffers: bool) -> Iterator[None]:
    buffers = _BUFFERS.setdefault(model, {}) if keep_buffers else {}
    originals: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, (layer, adapter) in layers.items():
                weight = layer.get_base_layer().weight  # [out, in]
                merged = buffers.get(name)
                if merged is None or merged.shape != weight.shape or merged.device != weight.device:
                    merged = buffers[name] = torch.empty_like(weight)
                torch.add(weight.data, layer.get_delta_weight(adapter).to(weight.dtype), out=merged)
                originals.append((weight, weight.data))
                weight.data = merged
        with model.disable_adapter():
            yield
    finally:
        for weight, original in originals:
            weight.data = original


def _packed(model, rows: int) -> contextlib.AbstractContextManager:
    """Every ``nn.Linear`` computes with its weight reordered for oneDNN, tuned for ``rows`` rows."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and packs(m.weight.dtype)]

    def packed_forward(m: torch.nn.Linear):
        packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows)
        return functools.partial(packed_linear, packed, m.bias)

    return replaced_forwards(linears, packed_forward)


def packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` with W reordered by ``mkldnn._reorder_linear_weight``. [..., in] -> [..., out]"""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@dataclass(frozen=True)
class DecodeWeights:
    merged: bool  # LoRA is merged: the model runs without its adapter matmuls


@contextlib.contextmanager
def decode_weights(model, *, rows: int, keep_buffers: bool, pack: bool = True) -> Iterator[DecodeWeights]:
    """Within this block the model computes the same function from weights laid out for decoding.

    ``keep_buffers`` keeps the merged matrices for the next call at the same addresses (needed when CUDA graphs
    were captured against them); ``pack`` allows oneDNN prepacking of every linear layer on a CPU, for ``rows``
    rows per step.
    """
    layers = mergeable_layers(model)
    with contextlib.ExitStack() as stack:
        if layers is not None:
            stack.enter_context(_merged(model, layers, keep_buffers))
        if pack and can_pack(model):  # after the merge: it packs the merged matrices
            stack.enter_context(_packed(model, rows))
        yield DecodeWeights(merged=layers is not None)
