"""Typed configuration: sections of TRL-style names, YAML files, dotted ``--set a.b=c`` overrides.

Precedence: defaults < ``--config FILE.yaml`` < CLI flags < ``--set``. Every key is checked: an unknown
one names the nearest valid key, a bad value names the key and what it must be.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sasr.errors import SasrError, nearest
from sasr.losses import ADVANTAGE_CENTRES, LOSS_AGGREGATIONS, REWARD_SCALES, SFT_LOSSES, names
from sasr.methods import METHODS, Method, is_spec, load_method, method_class


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def F(default: Any, description: str, **bounds: Any) -> Any:
    """A field with its one-line description (docs/options.md is checked against them)."""
    return Field(default, description=description, **bounds)


class ModelSection(Section):
    name: str = F("smollm2-135m", "hub id, save_pretrained folder, or alias (sasr models)")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = F("float32", "weights' dtype")
    gradient_checkpointing: bool = F(False, "recompute activations in backward: less memory, more time")
    chat_template_kwargs: dict[str, Any] = F(
        {}, "extra arguments of the chat template (e.g. enable_thinking: false)"
    )


class LoraSection(Section):
    enabled: bool = F(True, "train a LoRA adapter; false: full fine-tuning")
    r: int = F(16, "LoRA rank", ge=1)
    alpha: float = F(32.0, "LoRA scale numerator (scale = alpha / r)", gt=0)
    dropout: float = F(0.0, "LoRA dropout", ge=0, lt=1)
    target_modules: str | list[str] = F("all-linear", "layers that get an adapter (peft's target_modules)")


class TaskSection(Section):
    model_config = ConfigDict(extra="allow", validate_assignment=True)  # extra keys are the task's options
    name: str = F("arithmetic", "the task: its data and judge (sasr tasks); its options are task.OPTION")
    train_size: int = F(2000, "examples generated or loaded for training", ge=1)
    test_size: int = F(32, "held-out examples per split (test, and each shifted split the task has)", ge=0)

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimSection(Section):
    learning_rate: float = F(1e-4, "AdamW learning rate", gt=0)
    weight_decay: float = F(0.0, "AdamW weight decay", ge=0)
    adam_beta1: float = F(0.9, "AdamW beta1")
    adam_beta2: float = F(0.999, "AdamW beta2")
    max_grad_norm: float | None = F(1.0, "clip the global gradient norm to this; null: no clipping", gt=0)
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = F("constant", "learning-rate schedule")
    lr_warmup_steps: int = F(0, "learning-rate warm-up steps", ge=0)
    max_nonfinite_steps: int = F(3, "stop after this many non-finite losses or gradients in a row", ge=1)


class SFTSection(Section):
    batch_size: int = F(8, "demonstrations per micro-batch per process", ge=1)
    max_length: int = F(512, "prompt + target tokens; longer ones lose the left of the prompt", ge=8)
    loss: names(SFT_LOSSES) = F(
        "nll",
        "the demonstration tokens' loss (TRL's loss_type): nll; dft (each token's NLL x its own p); asft (dft + "
        "asft_beta x KL(pi_ref || pi) over the whole vocabulary)",
    )
    asft_beta: float = F(0.1, "asft: the weight of the KL to the reference on demonstration tokens", ge=0)


class GRPOSection(Section):
    batch_size: int = F(2, "RL prompts per micro-batch per process", ge=1)
    num_generations: int = F(8, "G: rows per prompt's group", ge=2)
    max_prompt_length: int = F(512, "prompt tokens kept (the last ones)", ge=8)
    max_completion_length: int = F(128, "tokens sampled per completion", ge=1)
    generation_batch_size: int | None = F(
        None, "completions per generate call (whole groups); null: all of the step's at once", ge=1
    )
    temperature: float = F(1.0, "sampling temperature of the rollouts", gt=0)
    top_p: float = F(1.0, "nucleus sampling of the rollouts", gt=0, le=1)
    beta: float = F(0.04, "weight of the k3 KL to the reference policy", ge=0)
    epsilon: float = F(0.2, "clip range below 1 (and above, unless epsilon_high is set)", gt=0)
    epsilon_high: float | None = F(None, "clip range above 1 (DAPO's clip-higher)", gt=0)
    loss_type: names(LOSS_AGGREGATIONS) = F("grpo", "how token losses are aggregated, as TRL names them")
    scale_rewards: names(REWARD_SCALES) = F(
        "group", "what advantages are divided by: group std, batch std, none"
    )
    advantage: names(ADVANTAGE_CENTRES) = F(
        "mean", "group centre; 'median' is our reading of SASR's G+/G- split"
    )
    reference: Literal["initial", "warmup"] = F("initial", "pi_ref: the loaded model, or the end of warm-up")
    use_bias_correction_kl: bool = F(False, "TRL's option: the KL term weighted by the importance ratio")
    importance_sampling_level: Literal["token", "sequence"] = F(
        "token", "importance ratio per token, or per sequence (GSPO), as TRL names it"
    )
    num_iterations: int = F(1, "updates per batch of rollouts (pi_old: the policy that sampled them)", ge=1)
    mask_truncated_completions: bool = F(False, "completions cut at max_completion_length get no loss (TRL)")
    overlong_buffer_len: int = F(
        0, "DAPO's soft overlong penalty over the last N tokens before the limit (verl's name); 0: off", ge=0
    )
    overlong_penalty_factor: float = F(1.0, "the penalty at the limit (verl's name)", ge=0)
    dynamic_sampling: bool = F(
        False, "replace groups whose rewards are all equal with further prompts (DAPO; verl's filter_groups)"
    )
    max_num_gen_batches: int = F(
        4, "dynamic sampling: batches of prompts sampled per step at most, then equal groups fill in", ge=1
    )
    generation_kwargs: dict[str, Any] = F({}, "extra sampling arguments (engine: min_new_tokens, top_k)")
    generation_backend: Literal["sasr", "hf"] = F("sasr", "'sasr': the rollout engine; 'hf': model.generate")
    cuda_graphs: bool = F(True, "sasr backend on a GPU: capture each decode step once, replay it")
    torch_compile: bool = F(
        False, "sasr backend: also torch.compile the decode step (one compile per batch size)"
    )

    @model_validator(mode="after")
    def _engine_takes_kwargs(self) -> GRPOSection:
        if not self.generation_kwargs or self.generation_backend != "sasr":
            return self
        from sasr.rollout.engine import unsupported_kwargs  # only here: importing the config loads no decoder

        problem = unsupported_kwargs(self.generation_kwargs)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _overlong_fits(self) -> GRPOSection:
        if self.overlong_buffer_len >= self.max_completion_length:
            raise ValueError(
                f"grpo.overlong_buffer_len ({self.overlong_buffer_len}) must be below grpo.max_completion_length "
                f"({self.max_completion_length}): the penalty starts that many tokens before the limit"
            )
        return self


class DemosSection(Section):
    model_config = ConfigDict(extra="allow", validate_assignment=True)  # extra keys are the task's options
    task: str | None = F(None, "where demonstrations come from (a task or jsonl:FILE); null: the RL task")
    train_size: int = F(2000, "demonstrations loaded from demos.task", ge=1)
    size: int | None = F(
        None,
        "only N distinct demonstrations (the first N with one, drawn at seed 0: the same for every method "
        "and seed); RL prompts keep task.train_size and those without one are RL prompts only; null: all",
        ge=1,
    )

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CustomRewardSection(Section):
    path: str | None = F(
        None, "verl's custom_reward_function.path: the file (or module) of a verl-contract scorer; null: none"
    )
    name: str = F("compute_score", "verl's custom_reward_function.name: the function in that file")

    def spec(self) -> str | None:
        """``PATH:NAME``, as reward_funcs and task.compute_score name a function; None when unset."""
        return f"{self.path}:{self.name}" if self.path else None


class EvalSection(Section):
    before: bool = F(True, "evaluate the loaded model on the held-out split before training")
    after: bool = F(True, "evaluate the trained model after training")
    every: int = F(0, "also every N steps (greedy), logged as eval_* in that step's line", ge=0)
    samples: int = F(0, "after training: K samples per question for pass@K, maj@K, diversity", ge=0)
    sample_size: int | None = F(None, "only the first N questions get those samples; null: all", ge=1)
    temperature: float = F(1.0, "sampling temperature of those K samples", gt=0)
    max_new_tokens: int = F(128, "tokens generated per evaluation answer", ge=1)
    batch_size: int = F(32, "questions generated together", ge=1)
    share_prefix: bool = F(
        True, "the questions' common start (a system prompt) is prefilled once per batch (sasr backend)"
    )


class TrainConfig(Section):
    """The run's configuration. Besides these keys, each method's options sit under its name (``sasr.gamma``,
    ``chord.variant``), checked by the method's own ``Options``; a comparison's config may hold several."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)  # the extra keys: method sections
    method: str = F("sasr", "what each step trains on (docs/methods.md)")
    steps: int = F(40, "optimizer steps in all, warm-up included", ge=1)
    warmup_steps: int = F(8, "W: SFT steps before the adaptive phase (sasr, interleave, sft-then-grpo)", ge=0)
    max_flops: float | None = F(
        None,
        "stop after the step that brings flops_total to this (methods matched on compute, not steps); steps "
        "stays the schedules' length and the cap; null: run every step",
        gt=0,
    )
    seed: int = F(0, "seeds the data, the sampling and the methods' draws")
    output_dir: str | None = F(None, "the run directory (default runs/METHOD-TASK-TIME)")
    save_final: bool = F(True, "write final/ (and adapter/ with LoRA)")
    save_every: int = F(0, "checkpoint every N steps (0: only when stopped by a signal)", ge=0)
    save_total_limit: int = F(2, "keep the newest K checkpoints", ge=1)
    report_to: list[str] = F(
        ["tensorboard"],
        "experiment trackers (accelerate's: sasr.trackers), offline by default; [none] for none",
    )
    logging_ranks: bool = F(
        False,
        "every rank also logs its phase, gradient norm and memory (weights and optimizer state held, peak "
        "resident) to DIR/ranks/rankN.jsonl",
    )
    log_completions: bool = F(
        False, "keep every sampled group's rows in DIR/completions.jsonl (as TRL's option)"
    )
    num_completions_to_print: int = F(0, "print this many samples of each step with rollouts", ge=0)
    push_to_hub: bool = F(
        False, "upload final/ to the Hugging Face Hub after training (untested here: no network)"
    )
    hub_model_id: str | None = F(None, "the Hub repository, owner/name (default: the run directory's name)")
    reward_funcs: list[str | dict[str, Any]] = F(
        [],
        "reward functions: module:function (TRL's or verl's contract), a reward model's id or folder, 'task' "
        "(the judge); []: the judge alone",
    )
    reward_weights: list[float] | None = F(None, "a weight per reward function (TRL's name); null: all 1")
    custom_reward_function: CustomRewardSection = F(
        CustomRewardSection(),
        "verl's keys: a verl task's compute_score (its judge), else one more of reward_funcs",
    )
    gradient_accumulation_steps: int = F(
        1, "micro-batches per optimizer step: the step's batches are this many times larger", ge=1
    )
    bf16: bool = F(False, "bfloat16 autocast over float32 weights (TRL's default); model.dtype: pure bf16")
    model: ModelSection = F(ModelSection(), "the model")
    lora: LoraSection = F(LoraSection(), "the adapter")
    task: TaskSection = F(TaskSection(), "the RL task")
    optim: OptimSection = F(OptimSection(), "the optimizer")
    sft: SFTSection = F(SFTSection(), "demonstration batches")
    grpo: GRPOSection = F(GRPOSection(), "rollouts and the policy-gradient loss")
    demos: DemosSection = F(DemosSection(), "the demonstration source")
    eval: EvalSection = F(EvalSection(), "held-out evaluation")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # report_to: wandb, as TRL takes it

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, value: list[str]) -> list[str]:
        from sasr.trackers import TRACKERS  # the registry of trackers (it imports this module)

        valid = (*TRACKERS, "all", "none")
        for name in value:
            if name not in valid:
                raise ValueError(f"unknown tracker '{name}'{nearest(name, valid)}; valid: {', '.join(valid)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.method.endswith(".py"):
            raise ValueError(f"method '{self.method}' names a file; add its class: {self.method}:ClassName")
        if not is_spec(self.method) and self.method not in METHODS:
            raise ValueError(
                f"unknown method '{self.method}'{nearest(self.method, METHODS)}; valid: {', '.join(METHODS)} "
                "(or path/to/file.py:Class)"
            )
        method = method_class(self.method)  # a user's method: its file loaded, its class registered
        for key, options in (self.model_extra or {}).items():
            if key not in METHODS:
                raise ValueError(
                    f"unknown config key '{key}'{nearest(key, [*type(self).model_fields, *METHODS])}"
                )
            if not isinstance(options, dict):
                raise ValueError(f"config key '{key}' must hold a mapping of the method's options")
            self.model_extra[key] = METHODS[key].check_options(options).model_dump()
        if method.Options.model_fields and method.name not in self.model_extra:
            self.model_extra[method.name] = self.method_options()  # the resolved config shows them
        method(**self.method_kwargs())  # its own checks of budget and options, before any run
        if self.grpo.num_iterations > 1 and not method.repeatable_updates:
            raise ValueError(
                f"grpo.num_iterations > 1 repeats each update on the same rollouts, which only a clipped ratio "
                f"bounds; method '{self.method}' also trains unclipped parts in its steps: set num_iterations: 1"
            )
        if self.grpo.dynamic_sampling and method.routes_by_outcome:
            raise ValueError(
                f"grpo.dynamic_sampling drops groups whose rewards are all equal, which method '{self.method}' "
                "routes by (an unsolved group goes to SFT): turn dynamic_sampling off"
            )
        if self.demos.task is not None and method.pairs_demos:
            paired = ", ".join(n for n, m in METHODS.items() if m.pairs_demos)
            raise ValueError(
                f"method '{self.method}' trains each RL prompt's own demonstration, so it cannot take "
                f"demonstrations from demos.task; drop demos.task (methods that pair them: {paired})"
            )
        if self.push_to_hub and not self.save_final:
            raise ValueError("push_to_hub uploads final/, so it needs save_final: true")
        if spec := self.custom_reward_function.spec():  # verl's keys, read as verl reads them
            options = self.task.options()
            if self.task.name.startswith("verl:"):
                if options.get("compute_score") not in (None, spec):
                    raise ValueError(
                        f"custom_reward_function names {spec} but task.compute_score names "
                        f"{options['compute_score']}; keep one of them"
                    )
                self.task.model_extra["compute_score"] = spec
            elif spec not in self.reward_funcs:
                self.reward_funcs.append(spec)
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} weights for {len(self.reward_funcs)} reward_funcs; "
                "give one weight per function (the task's judge counts only when listed as 'task')"
            )
        for entry in self.reward_funcs:
            if isinstance(entry, dict) and (
                not isinstance(entry.get("function"), str) or set(entry) - {"function", "kwargs"}
            ):
                raise ValueError(
                    f"reward_funcs entry {entry!r} must be 'module:function' or {{function: module:factory, kwargs: {{...}}}}"
                )
        return self

    def method_kwargs(self) -> dict[str, Any]:
        """What the run's method is built from: its budget, batch sizes and options."""
        return {
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "seed": self.seed,
            # The method plans the whole step; the trainer computes it in gradient_accumulation_steps pieces.
            "demos_per_step": self.sft.batch_size * self.gradient_accumulation_steps,
            "prompts_per_step": self.grpo.batch_size * self.gradient_accumulation_steps,
            "group_size": self.grpo.num_generations,
            **self.method_options(),
        }

    def method_class(self) -> type[Method]:
        """The run's method (a user's loaded from its file)."""
        return method_class(self.method)

    def method_options(self, name: str | None = None) -> dict[str, Any]:
        """The options of a method (default: the run's; a name, or a user's file.py:Class), defaults filled
        in."""
        cls = method_class(name or self.method)
        return cls.check_options((self.model_extra or {}).get(cls.name, {})).model_dump()


# --- building a config from layers ---------------------------------------------------------------------


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _all_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def valid_keys() -> list[str]:
    """Every option's dotted key, the registered methods' (a user's once loaded) too."""
    return _all_keys(TrainConfig) + [
        f"{m}.{o}" for m, cls in METHODS.items() for o in cls.Options.model_fields
    ]


def sections() -> set[str]:
    return {key.split(".")[0] for key in valid_keys() if "." in key}


def option_rows() -> list[tuple[str, Any, str]]:
    """(key, default, description) of every option, the methods' too: docs/options.md's table."""

    def rows(model: type[BaseModel], prefix: str) -> list[tuple[str, Any, str]]:
        out = []
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                out += rows(field.annotation, f"{prefix}{name}.")
            else:
                out.append((prefix + name, field.default, field.description or ""))
        return out

    return rows(TrainConfig, "") + [row for m, cls in METHODS.items() for row in rows(cls.Options, f"{m}.")]


def options_table() -> str:
    """The options as a markdown table (docs/options.md holds it; a test keeps the two equal)."""
    lines = ["| key | default | what it does |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | `{_shown(d)}` | {text} |" for k, d, text in option_rows()]
    return "\n".join(lines)


def _shown(default: Any) -> str:
    """A default as YAML on one line (a text with line breaks double-quoted, its breaks as \\n)."""
    if isinstance(default, str) and "\n" in default:
        return json.dumps(default)
    return yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree['a']['b'] = value for key 'a.b', checking the key exists (task.* may carry task options)."""
    parts, valid = key.split("."), valid_keys()
    if key not in valid and not (parts[0] in ("task", "demos") and len(parts) == 2):
        raise SasrError(f"unknown config key '{key}'{nearest(key, valid)}")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SasrError(f"config key '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_set(item: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', value), the value parsed as YAML (numbers, booleans, lists, null)."""
    if "=" not in item:
        raise SasrError(f"--set '{item}' must look like key=value, e.g. optim.learning_rate=1e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML reads '1e-4' as a string; numbers are what users mean
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in ".eE") else int(value)
    return key.strip(), value


def _flatten(tree: dict[str, Any], prefix: str = "", known: set[str] | None = None) -> list[tuple[str, Any]]:
    known = sections() if known is None else known
    out = []
    for k, v in tree.items():
        if isinstance(v, dict) and prefix + k in known:
            out += _flatten(v, f"{prefix}{k}.", known)
        else:
            out.append((prefix + k, v))
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise SasrError(f"config file '{path}' is a directory; pass a YAML file")
    if not path.is_file():
        raise SasrError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise SasrError(f"config file '{path}' is not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SasrError(f"config file '{path}'{where} is not valid YAML") from exc
    if not isinstance(data, dict):
        raise SasrError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


def build_config(
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> TrainConfig:
    """Defaults < YAML file < overrides (dotted keys, from CLI flags) < --set items."""
    tree: dict[str, Any] = {}
    layers: list[tuple[str, Any]] = []
    data = load_yaml(file) if file is not None else {}
    named = [v for k, v in map(parse_set, sets or []) if k == "method"]
    for spec in (data.get("method"), (overrides or {}).get("method"), *named):
        if isinstance(spec, str) and is_spec(spec):  # a user's method: its options are keys from here on
            load_method(spec)
    layers += _flatten(data)
    layers += [(k, v) for k, v in (overrides or {}).items() if v is not None]
    layers += [parse_set(s) for s in sets or []]
    for key, value in layers:
        set_dotted(tree, key, value)
    return validate(tree)


def validate(tree: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a nested dict, or a SasrError naming the first bad key."""
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            raise SasrError(f"unknown config key '{key}'{nearest(key, valid_keys())}") from None
        if not key:
            raise SasrError(msg) from None
        raise SasrError(f"config key '{key}': {msg} (got {err.get('input')!r})") from None


# Keys that say only where, how often and what a run writes: they change neither its optimisation nor its
# results (output_dir last: the resume error below lists the others). eval.every adds held-out points to the
# metrics lines and leaves the training as it was (tested); their time counts in the run's seconds.
BOOKKEEPING_KEYS = (
    "eval.every",
    "save_every",
    "save_total_limit",
    "save_final",
    "report_to",
    "logging_ranks",
    "log_completions",
    "num_completions_to_print",
    "output_dir",
)
# Keys a resumed run may change: they alter neither the optimisation so far nor what it means.
RESUME_SAFE_KEYS = ("steps", *BOOKKEEPING_KEYS)
RESUME_SAFE_SECTIONS = ("eval.",)


def resume_config(
    run_dir: str | Path, overrides: dict[str, Any] | None = None, sets: list[str] | None = None
) -> TrainConfig:
    """The saved config of ``run_dir`` with only resume-safe changes applied, or one sentence naming the
    keys that differ."""
    saved_file = Path(run_dir) / "config.yaml"
    if not saved_file.is_file():
        raise SasrError(f"'{run_dir}' is not a run directory (no config.yaml); nothing to resume")
    wanted = build_config(saved_file, overrides, sets).model_copy(update={"output_dir": str(run_dir)})
    unsafe_changes(run_dir, saved_file, wanted)
    return wanted


def unsafe_changes(run_dir: str | Path, saved_file: Path, wanted: TrainConfig) -> None:
    """One sentence naming the keys ``wanted`` changes that a resumed run may not change (none: returns)."""
    saved = build_config(saved_file)
    old = dict(_flatten(saved.model_dump(mode="json")))
    new = dict(_flatten(wanted.model_dump(mode="json")))
    unsafe = [
        k
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k) and k not in RESUME_SAFE_KEYS and not k.startswith(RESUME_SAFE_SECTIONS)
    ]
    if unsafe:
        diff = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in unsafe)
        raise SasrError(
            f"cannot resume '{run_dir}' with a different configuration ({diff}); a resumed run may change only "
            f"{', '.join(k for k in RESUME_SAFE_KEYS[:-1] if not k.startswith(RESUME_SAFE_SECTIONS))} and eval.*"
        )


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
