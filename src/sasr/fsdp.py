"""Fully sharded data parallel (torch's FSDP2) from an ``accelerate launch`` FSDP config, on GPUs and in CPU
processes over gloo.

accelerate shards a model in ``prepare`` only when its state is FSDP, which it never is on a CPU
(``Accelerator(cpu=True)`` drops the FSDP plugin and wraps the model in DDP). sasr therefore shards the model
itself, on every device, with the function ``prepare`` calls on GPUs (``fsdp2_prepare_model``) and the plugin
the launcher's settings describe. The model is then never passed to ``prepare`` (on a CPU it would be wrapped
in DDP), and the optimizer is wrapped in accelerate's ``AcceleratedOptimizer`` directly (on GPUs ``prepare``
refuses an FSDP2 optimizer without its model).

What sharding changes for the trainer:
- every forward call gathers weights from the other ranks, so ranks make the same number of calls;
- the rollout engine decodes from whole weights: ``gathered`` all-gathers every unit once for the whole
  rollout (each rank then holds the full model while it decodes, as one GPU without FSDP would), so ranks may
  decode for different numbers of tokens;
- weights written in place (the reference swap) are written to the shards, with no unit left gathered;
- checkpoints are torch distributed checkpoints (each rank writes its shards); ``final/`` is gathered.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

from sasr.errors import SasrError


def requested() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch`` with ``distributed_type: FSDP``); a version
    other than FSDP2 is refused (read before accelerate, which fails on it without a GPU)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    version = os.environ.get("FSDP_VERSION", "1")  # accelerate's default
    if version != "2":
        raise SasrError(
            f"sasr shards with FSDP2, but the accelerate config asks for FSDP version {version}; "
            "set fsdp_config.fsdp_version: 2"
        )
    return True


def check(config) -> None:
    """Refuse, in one sentence, the settings sasr does not honour under FSDP (before accelerate reads them)."""
    env = os.environ
    if config.bf16 or env.get("ACCELERATE_MIXED_PRECISION", "no") not in ("no", ""):
        raise SasrError(
            "mixed precision (bf16, or mixed_precision in the accelerate config) is not supported with FSDP; "
            "set mixed_precision: 'no' and model.dtype=bfloat16 to train in bfloat16"
        )
    if env.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        raise SasrError(
            "fsdp_activation_checkpointing is not read by sasr; drop it from the accelerate config and set "
            "model.gradient_checkpointing=true"
        )
    if config.grpo.torch_compile:
        raise SasrError("grpo.torch_compile is not supported with FSDP; set grpo.torch_compile=false")


def refused(exc: ValueError) -> SasrError:
    """accelerate's complaint about the launcher's FSDP settings, as one sentence."""
    return SasrError(
        f"accelerate refused the FSDP settings ({str(exc).splitlines()[0]}); fix the accelerate config"
    )


def plugin(accelerator):
    """The launcher's FSDP settings: accelerate's own plugin on GPUs, read from the same environment on a CPU."""
    from accelerate import FullyShardedDataParallelPlugin

    settings = getattr(accelerator.state, "fsdp_plugin", None)
    if settings is None:
        try:
            settings = FullyShardedDataParallelPlugin()
        except ValueError as exc:
            raise refused(exc) from None
    if accelerator.num_processes < 2:
        raise SasrError(
            "an FSDP config needs at least 2 processes; set num_processes in the accelerate config"
        )
    return settings


def shard(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Shard ``model`` in place as accelerate does on GPUs: each decoder layer (the model's
    ``_no_split_modules``, or the config's classes) one FSDP unit, the embeddings, final norm and head another,
    the rest the root (with untied embeddings the input embeddings are a unit of their own). Rank 0's weights
    are broadcast to every rank, so LoRA's random initialisation and a model loaded on rank 0 only agree
    everywhere."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    settings = plugin(accelerator)
    settings.cpu_ram_efficient_loading = True  # the broadcast from rank 0
    # fsdp2_prepare_model reads these of an Accelerator; the mesh is the default one, over every process.
    view = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=settings),
        mixed_precision=accelerator.mixed_precision,
        device=accelerator.device,
        is_main_process=accelerator.is_main_process,
        torch_device_mesh=None,
    )
    return fsdp2_prepare_model(view, model)


def units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP units of ``model`` (none if it is not sharded)."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(units(model))


def _reshards_after_forward(unit) -> bool:
    # FSDP2 has a setter for this and no getter: read the state its setter writes.
    return any(g.post_forward_mesh_info is not None for g in unit._get_fsdp_state()._fsdp_param_groups)


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Within this block every unit holds its whole weights and forward calls talk to no other rank; after it
    the weights are sharded again. Memory: the whole model on each rank for the block's length."""
    found = units(model)
    if not found:
        yield
        return
    before = [(u, _reshards_after_forward(u)) for u in found]
    for unit in found:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, reshard in before:
            unit.set_reshard_after_forward(reshard, recurse=False)
            unit.reshard()


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered copy of the weights (a forward without backward leaves the units that do not
    reshard after forward gathered: the root, and the head with the final norm), so that weights written in
    place are the ones the next forward gathers."""
    for unit in units(model):
        unit.reshard()


@contextlib.contextmanager
def no_sync(model: torch.nn.Module) -> Iterator[None]:
    """Gradients accumulate on each rank within this block and are reduced at the next backward outside it."""
    root = units(model)[0]  # modules() lists the root first; the setting recurses
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def save(path: Path, state: dict) -> None:
    """Write ``state`` (sharded tensors and plain values) as a torch distributed checkpoint: each rank its own
    shards, rank 0 the metadata. A collective: a rank that fails to write raises OSError on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(state, checkpoint_id=path)
    except CheckpointException as exc:  # a BaseException, raised on every rank alike
        raise OSError(str(exc).splitlines()[0]) from None


def load(path: Path, state: dict) -> None:
    """Read a checkpoint ``save`` wrote into ``state``'s tensors in place (the same shapes and sharding)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, checkpoint_id=path)
    except (CheckpointException, OSError, RuntimeError) as exc:  # a BaseException, raised on every rank alike
        raise SasrError(f"cannot read the sharded checkpoint {path} ({str(exc).splitlines()[0]})") from None


def training_state(model: torch.nn.Module, optimizer) -> dict:
    """The trainable weights and the optimizer's state, sharded as they are (torch's state-dict API, which
    names both by parameter)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": weights, "optimizer": optim}


def load_training_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(strict=False),  # the frozen weights were not saved
    )


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight whole, on rank 0 (in CPU memory); empty on the other ranks. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def held_bytes(model: torch.nn.Module, optimizer) -> int:
    """Bytes of weights and optimizer state this process holds (its shards under FSDP, everything otherwise)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    tensors = {id(p): local(p) for p in model.parameters()}  # tied weights once
    for state in optimizer.state.values():
        tensors.update({id(v): local(v) for v in state.values() if isinstance(v, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def optimizer_state(model: torch.nn.Module, optimizer, sharded: bool) -> dict:
    """An optimizer's state as a checkpoint holds it: its ``state_dict()``, or under FSDP its shards named by
    parameter (torch's state-dict API)."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict, sharded: bool) -> None:
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state)
