"""``SASRTrainer``: sasr from Python the way TRL's trainers are used (a model, datasets, reward callables, a
peft config, callbacks), the one object the command line, ``sasr.train`` and comparisons train through.

    trainer = SASRTrainer(model=model, args=SASRConfig(method="sasr", steps=100), reward_funcs=[my_reward],
                          train_dataset=ds, peft_config=LoraConfig(r=16), callbacks=[MyCallback()])
    result = trainer.train()

See docs/python.md.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sasr.config import TrainConfig, build_config, validate
from sasr.errors import SasrError
from sasr.inputs import (
    Inputs,
    check_callbacks,
    check_model,
    check_peft_config,
    model_name,
    reward_entries,
)
from sasr.trainer import RunResult, Trainer, eval_keys


def as_config(args: Any) -> TrainConfig:
    """``args`` as a config: a SASRConfig, a nested dict, a YAML path, or None (the defaults)."""
    if args is None:
        return validate({})
    if isinstance(args, TrainConfig):
        return args
    if isinstance(args, dict):
        return validate(args)
    if isinstance(args, (str, Path)):
        return build_config(file=args)
    raise SasrError(
        f"args must be a sasr.SASRConfig, a dict of its keys or a YAML path, not {type(args).__name__} "
        "(a TrainingArguments/GRPOConfig's settings go under SASRConfig's keys: docs/options.md)"
    )


class SASRTrainer:
    """Trains one run of any method. Arguments as TRL's ``GRPOTrainer`` takes them:

    - ``model``: a hub id, a folder, an alias (``sasr models``), or a loaded ``...ForCausalLM`` / ``PeftModel``
      (trained as it is: its own adapters, else ``peft_config``'s, else LoRA as ``args.lora`` says);
    - ``args``: a ``SASRConfig``, a dict of its keys, or a YAML path;
    - ``method``: a method's name, or a ``sasr.methods.Method`` subclass of your own;
    - ``train_dataset`` / ``eval_dataset``: ``datasets.Dataset`` rows in any format the ``jsonl`` task reads
      (TRL's among them), in place of ``args.task``'s data; ``demo_dataset``: the demonstrations' rows;
    - ``reward_funcs``: one or a list of functions (TRL's or verl's contract), ``module:function`` names,
      reward models or their hub ids, mixed; ``processing_class``: the tokenizer;
    - ``peft_config``: a ``peft.LoraConfig`` in place of ``args.lora``;
    - ``callbacks``: ``transformers.TrainerCallback``s (``sasr.callbacks`` says when each event comes).

    Bad input is one ``SasrError`` sentence here, before any model loads or file is written. ``overwrite``
    replaces an existing run directory; ``progress`` shows progress bars (they render in Jupyter).
    """

    def __init__(
        self,
        model: Any = None,
        args: Any = None,
        method: str | type | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        demo_dataset: Any = None,
        reward_funcs: Any = None,
        peft_config: Any = None,
        processing_class: Any = None,
        callbacks: list | None = None,
        overwrite: bool = False,
        progress: bool = True,
    ) -> None:
        if method is not None and isinstance(args, dict):  # checked with the method it will run
            args = {**args, "method": _method_name(method)}
        config = as_config(args)
        given = config.model_dump(mode="json")
        tree = copy.deepcopy(given)
        inputs = Inputs(callbacks=check_callbacks(callbacks), tokenizer=processing_class)
        if isinstance(model, (str, Path)):
            tree["model"]["name"] = str(model)
        elif model is not None:
            check_model(model)
            inputs.model = model
            tree["model"]["name"] = model_name(model)
        if method is not None:
            tree["method"] = _method_name(method)
        if reward_funcs is not None:
            tree["reward_funcs"], inputs.rewards = reward_entries(reward_funcs)
        if peft_config is not None:
            check_peft_config(peft_config, model)
            inputs.peft_config = peft_config
            tree["lora"] = lora_keys(peft_config)
        if train_dataset is not None or eval_dataset is not None or demo_dataset is not None:
            tree = with_datasets(tree, inputs, config, train_dataset, eval_dataset, demo_dataset)
        self.args = config if tree == given else validate(tree)
        self._trainer = Trainer(self.args, overwrite=overwrite, progress=progress, inputs=inputs)
        self._result: RunResult | None = None

    # --- what transformers' Trainer offers under the same names ------------------------------------------

    def train(self, resume_from_checkpoint: bool | str | Path | None = None) -> RunResult:
        """Train the run; ``resume_from_checkpoint`` True continues ``args.output_dir`` from its newest complete
        checkpoint, a path from that checkpoint. A stop (a signal, a callback that raised) keeps the checkpoint
        and raises a ``SasrError``; the same object, or a new one, then resumes."""
        if self._result is not None and not resume_from_checkpoint:
            raise SasrError(
                f"this trainer already trained {self.run_dir}; make a new SASRTrainer for another run"
            )
        self._result = self._trainer.train(resume=resume_from_checkpoint or False)
        return self._result

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy, reward, format rate and length of the model as it is now (greedy), under
        ``eval_`` keys as transformers names them; callbacks get on_evaluate. Writes nothing."""
        t = self._trainer
        if not t.test_examples:
            raise SasrError(
                "there are no held-out examples to evaluate (pass eval_dataset, or a task with a test split)"
            )
        metrics = eval_keys(t.evaluate("evaluate", step=self.global_step))
        t.callbacks.event("on_evaluate", self.global_step, metrics=metrics)
        return metrics

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """The model as a plain transformers folder (LoRA merged), with its tokenizer: after ``train()`` its
        ``final/``, copied to ``output_dir`` if given; before, the model as it is now."""
        t = self._trainer
        final = t.run_dir / "final"
        target = Path(output_dir) if output_dir is not None else final
        if self._result is not None and final.is_dir():
            if target.resolve() != final.resolve():
                shutil.copytree(final, target, dirs_exist_ok=True)
            return target
        model = self.model
        if hasattr(model, "merge_and_unload"):  # merged in a copy: the trainer's model keeps its adapters
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(target)
        t.tokenizer.save_pretrained(target)
        return target

    @property
    def model(self):
        """The policy as it trains (a peft model while LoRA adapters train; after ``train()`` their weights
        are merged into it)."""
        return self._trainer.accelerator.unwrap_model(self._trainer.model)

    @property
    def processing_class(self):
        return self._trainer.tokenizer

    @property
    def state(self):
        """transformers' ``TrainerState`` of the run (global_step, max_steps, log_history)."""
        return self._trainer.callbacks.state

    @property
    def global_step(self) -> int:
        return self.state.global_step

    @property
    def run_dir(self) -> Path:
        return self._trainer.run_dir

    @property
    def accelerator(self):
        return self._trainer.accelerator

    def add_callback(self, callback) -> None:
        self._trainer.callbacks.handler.add_callback(check_callbacks([callback])[0])

    def pop_callback(self, callback):
        return self._trainer.callbacks.handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self._trainer.callbacks.handler.remove_callback(callback)


def _method_name(method: str | type) -> str:
    """A method's name, a user's class registered under its name first."""
    from sasr.methods import register_class

    if isinstance(method, str):
        return method
    return register_class(method, getattr(method, "__qualname__", repr(method))).name


def lora_keys(peft_config: Any) -> dict[str, Any]:
    """``args.lora`` as a peft LoraConfig says (config.yaml tells the truth about the run)."""
    targets = peft_config.target_modules
    targets = sorted(targets) if isinstance(targets, (set, frozenset, list, tuple)) else targets
    return {
        "enabled": True,
        "r": peft_config.r,
        "alpha": float(peft_config.lora_alpha),
        "dropout": float(peft_config.lora_dropout),
        "target_modules": targets or "all-linear",
    }


def with_datasets(
    tree: dict, inputs: Inputs, config: TrainConfig, train: Any, eval_: Any, demos: Any
) -> dict:
    """The config and inputs with ``datasets.Dataset`` objects as the task's data (and the demonstrations'),
    read where they lie (``sasr.tasks.dataset``). Unless ``task.train_size`` was set, the run draws from every
    training row."""
    from sasr.tasks.dataset import DatasetTask, materialise

    if train is None and eval_ is not None:
        raise SasrError("eval_dataset needs a train_dataset beside it")
    task_set, demos_set = config.task.model_fields_set, config.demos.model_fields_set
    train_rows = config.task.train_size if "train_size" in task_set else None
    train = materialise(train, "train_dataset", train_rows, "task.train_size")
    eval_ = materialise(eval_, "eval_dataset", config.task.test_size, "task.test_size")
    demo_rows = config.demos.train_size if "train_size" in demos_set else None
    demos = materialise(demos, "demo_dataset", demo_rows, "demos.train_size")
    options = {k: v for k, v in config.task.options().items() if k not in ("path", "test_path")}
    if train is not None:
        inputs.task = DatasetTask(train, eval_, **options)
        tree["task"] = {k: v for k, v in tree["task"].items() if k not in ("path", "test_path")}
        tree["task"]["name"] = "dataset"
        if train_rows is None:
            tree["task"]["train_size"] = len(train)
    if demos is not None:
        demo_options = {k: v for k, v in config.demos.options().items() if k not in ("path", "test_path")}
        inputs.demo_task = DatasetTask(demos, what="demo_dataset", **demo_options)
        tree["demos"] = {**tree["demos"], "task": "dataset"}
        if demo_rows is None:
            tree["demos"]["train_size"] = len(demos)
    return tree


def train(
    config: Any,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    reward_funcs: list[str | Callable] | None = None,
) -> RunResult:
    """``sasr.train(config)``: one run from a config (a SASRConfig, a dict or a YAML path), through
    ``SASRTrainer``; ``resume=True`` continues ``config.output_dir`` from its newest checkpoint."""
    trainer = SASRTrainer(
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        reward_funcs=reward_funcs,
        overwrite=overwrite,
        progress=progress,
    )
    return trainer.train(resume_from_checkpoint=resume)
