"""Objects a Python caller hands the trainer in place of the names a config holds (``SASRTrainer``'s
arguments): a loaded model and tokenizer, a peft ``LoraConfig``, reward functions and reward models,
transformers callbacks. Each is checked here, in one sentence, before anything loads or any file is
written; and each is recorded in run.json (``record``) so that a resume or a comparison with other objects is
noticed."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sasr.contracts import PYTHON_OBJECT, callable_identity, object_spec, trl_contract, verl_contract
from sasr.errors import SasrError
from sasr.models import prepare_tokenizer


@dataclass
class Inputs:
    """The objects of a run (None: the config's names are loaded as on the command line).

    ``rewards`` maps a ``reward_funcs`` spec of the config to the object it stands for."""

    model: torch.nn.Module | None = None
    tokenizer: Any = None
    peft_config: Any = None
    rewards: dict[str, Any] = field(default_factory=dict)
    callbacks: list[Any] = field(default_factory=list)
    task: Any = None  # a DatasetTask over the caller's train/eval datasets
    demo_task: Any = None  # a DatasetTask over the caller's demonstrations

    def record(self) -> dict[str, Any]:
        """run.json's ``inputs``: what identifies each object (the reward functions' are the Rewards')."""
        out: dict[str, Any] = {}
        if self.model is not None:
            out["model"] = model_identity(self.model)
        if self.callbacks:
            out["callbacks"] = [type(cb).__name__ for cb in self.callbacks]
        for key, task in (("datasets", self.task), ("demo_datasets", self.demo_task)):
            if task is not None:
                out[key] = {k: dataset_identity(d) for k, d in task.data.items() if d is not None}
        return out


def dataset_identity(dataset: Any) -> dict[str, Any]:
    """What run.json keeps of a ``datasets.Dataset``: its size and columns (what a resume checks) and its
    fingerprint (informational: after a ``map`` with a closure it is random)."""
    return {
        "num_rows": len(dataset),
        "columns": list(dataset.column_names),
        "fingerprint": getattr(dataset, "_fingerprint", None),
    }


def check_model(model: Any) -> None:
    """A causal language model sasr can train: a transformers ``...ForCausalLM`` (or a peft model around one)
    whose weights are real tensors in one place."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, PreTrainedModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    causal = tuple(MODEL_FOR_CAUSAL_LM_MAPPING.values())
    if not isinstance(base, PreTrainedModel) or not isinstance(base, causal):
        raise SasrError(
            "model must be a hub id, a folder, an alias, or a loaded causal language model (a transformers "
            f"...ForCausalLM, or a peft PeftModel around one), not {type(base).__name__}"
        )
    if getattr(base, "hf_device_map", None) or getattr(base, "is_quantized", False):
        raise SasrError(
            f"model {type(base).__name__} is quantized or spread over devices (device_map); sasr trains a model "
            "held whole on one device per process: load it without device_map and quantization_config"
        )
    if any(p.is_meta for p in base.parameters()):
        raise SasrError(f"model {type(base).__name__} has weights on the meta device; load its weights first")


def model_name(model: torch.nn.Module) -> str:
    """The hub id or folder a loaded model came from (``name_or_path``), else its class's name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(getattr(base, "name_or_path", "") or type(base).__name__)


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """What identifies a loaded model: where it came from, its class, and the sha256 of its weights (names,
    dtypes, shapes and bytes, streamed)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return {"name_or_path": model_name(model), "class": type(model).__name__, "sha256": digest.hexdigest()}


def ready_tokenizer(tokenizer: Any, name: str) -> Any:
    """A copy of the caller's tokenizer as sasr uses one: a pad token, left padding (generation), a chat
    template (a processor gives its tokenizer, as TRL takes one)."""
    tokenizer = copy.deepcopy(getattr(tokenizer, "tokenizer", tokenizer))
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise SasrError(
            f"processing_class must be a transformers tokenizer (or a processor holding one), not "
            f"{type(tokenizer).__name__}"
        )
    return prepare_tokenizer(tokenizer, f"the tokenizer of model '{name}'")


def check_peft_config(peft_config: Any, model: Any) -> None:
    """A LoRA config (sasr merges LoRA for decoding and saving), not beside a model that has adapters."""
    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        raise SasrError(
            f"peft_config must be a peft.LoraConfig (sasr merges LoRA adapters to decode and save), not "
            f"{type(peft_config).__name__}"
        )
    if model is not None and hasattr(model, "peft_config"):
        raise SasrError("model already has peft adapters and a peft_config was passed too; pass one of them")


def reward_entries(reward_funcs: Any) -> tuple[list[str | dict], dict[str, Any]]:
    """``reward_funcs`` as TRL takes them (one, or a list of callables, names and models) -> the config's
    entries and the objects their specs stand for."""
    items = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    entries: list[str | dict] = []
    objects: dict[str, Any] = {}
    for i, item in enumerate(items):
        if isinstance(item, (str, dict)):
            entries.append(item)
            continue
        check_reward_object(item, i)
        spec = object_spec(item) if not isinstance(item, torch.nn.Module) else _model_spec(item)
        if spec in objects and objects[spec] is not item:
            spec = f"{spec}#{i}"  # two objects of one name (two closures from one factory)
        entries.append(spec)
        objects[spec] = item
    return entries, objects


def _model_spec(model: torch.nn.Module) -> str:
    return f"{PYTHON_OBJECT}{model_name(model)}"


def check_reward_object(item: Any, i: int) -> None:
    """A reward function with TRL's or verl's contract, or a sequence-classification model."""
    if isinstance(item, torch.nn.Module):
        from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

        if not isinstance(item, tuple(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING.values())):
            raise SasrError(
                f"reward_funcs[{i}] is a {type(item).__name__}; a reward model must be a transformers "
                "...ForSequenceClassification with one label"
            )
        return
    if not callable(item):
        raise SasrError(
            f"reward_funcs[{i}] is of type {type(item).__name__}; give a function, 'module:function', a "
            "reward model or its hub id"
        )
    if not (trl_contract(item) or verl_contract(item)):
        raise SasrError(
            f"reward function {callable_identity(item)['name']} takes neither TRL's arguments (prompts, "
            "completions, ..., **kwargs) nor verl's (data_source, solution_str, ground_truth, extra_info=None)"
        )


def check_callbacks(callbacks: Sequence[Any] | None) -> list[Any]:
    """transformers ``TrainerCallback`` instances (a class is instantiated, as transformers does)."""
    from transformers import TrainerCallback

    out = []
    for cb in callbacks or []:
        cb = cb() if isinstance(cb, type) and issubclass(cb, TrainerCallback) else cb
        if not isinstance(cb, TrainerCallback):
            raise SasrError(
                f"callbacks must be transformers.TrainerCallback instances, not {type(cb).__name__}"
            )
        out.append(cb)
    return out


def function_record(fn: Callable | None, spec: str | dict) -> dict[str, Any]:
    """run.json's entry for one reward: the judge, a reward model by name, or a function's identity."""
    name = spec if isinstance(spec, str) else spec["function"]
    if fn is None:
        return {"spec": name}
    if hasattr(fn, "model") and isinstance(getattr(fn, "model", None), torch.nn.Module):
        return {"spec": name, "model": model_name(fn.model)}
    return {"spec": name, **callable_identity(getattr(fn, "__wrapped__", fn))}
