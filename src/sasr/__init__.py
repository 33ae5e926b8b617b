"""sasr: step-wise adaptive integration of SFT and RL (GRPO) for post-training language models."""

from importlib.metadata import version

from sasr.config import TrainConfig, build_config
from sasr.errors import SasrError
from sasr.tasks import get_task


def train(
    config,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    train_dataset=None,
    eval_dataset=None,
):
    """Train with a TrainConfig, a nested dict or a YAML path (and optionally ``datasets.Dataset`` objects as
    the data); returns a RunResult. See sasr.trainer."""
    from sasr.trainer import train as _train

    return _train(config, overwrite, progress, resume, train_dataset, eval_dataset)


__all__ = ["SasrError", "TrainConfig", "build_config", "get_task", "train"]
__version__ = version("sasr")
