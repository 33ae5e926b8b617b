"""sasr: step-wise adaptive integration of SFT and RL (GRPO) for post-training language models."""

from importlib.metadata import version

from sasr.config import TrainConfig, build_config
from sasr.errors import SasrError
from sasr.tasks import get_task

SASRConfig = TrainConfig  # the name TRL users look for beside SASRTrainer


def train(
    config,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    train_dataset=None,
    eval_dataset=None,
    reward_funcs=None,
):
    """Train with a SASRConfig, a nested dict or a YAML path (and optionally ``datasets.Dataset`` objects as
    the data, reward functions as objects); returns a RunResult. A thin caller of ``SASRTrainer``."""
    from sasr.api import train as _train

    return _train(config, overwrite, progress, resume, train_dataset, eval_dataset, reward_funcs)


def __getattr__(name: str):
    if name in ("SASRTrainer", "CallbackError"):  # imported on first use: torch and transformers are heavy
        from sasr import api, callbacks

        return {"SASRTrainer": api.SASRTrainer, "CallbackError": callbacks.CallbackError}[name]
    raise AttributeError(f"module 'sasr' has no attribute '{name}'")


__all__ = [
    "CallbackError",
    "SASRConfig",
    "SASRTrainer",
    "SasrError",
    "TrainConfig",
    "build_config",
    "get_task",
    "train",
]
__version__ = version("sasr")
