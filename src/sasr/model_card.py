"""The model card of a run's ``final/`` (and ``adapter/``): Hugging Face's format, YAML metadata then text."""

from __future__ import annotations

import shlex
import sys
from typing import Any

import yaml

from sasr.config import TrainConfig

# Aliases that stand for a model on the hub (the others are random test models or local files).
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
SHOWN = ("accuracy", "reward_mean", "format_rate", "completion_length")


def command_line() -> str:
    """How this process was started, as a shell would repeat it."""
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    if sys.argv[0].endswith("sasr"):
        return f"sasr {args}"
    if sys.argv[0].endswith("__main__.py"):
        return f"python -m sasr {args}"
    return f"python {shlex.quote(sys.argv[0])} {args} (sasr through its Python API)"


def model_card(
    config: TrainConfig,
    counts: dict[str, int],
    eval_before: dict[str, float] | None,
    eval_after: dict[str, float] | None,
    adapter: bool = False,
) -> str:
    """README.md text for ``final/`` (``adapter=False``: LoRA merged, a plain transformers model) or
    ``adapter/`` (the peft adapter alone)."""
    base = HUB_IDS.get(config.model.name, config.model.name)
    meta: dict[str, Any] = {
        "base_model": base,
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": "text-generation",
        "tags": list(
            dict.fromkeys(
                ["sasr", config.method, "sft", "grpo", "reinforcement-learning", f"task:{config.task.name}"]
            )
        ),
    }
    steps = ", ".join(f"{n} {phase}" for phase, n in counts.items() if n)
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {base} post-trained with sasr ({config.method})",
        "",
        f"This {'LoRA adapter' if adapter else 'model'} was trained from `{base}` with "
        f"sasr's method `{config.method}` (SFT and GRPO) on the task `{config.task.name}` "
        f"for {config.steps} optimizer steps ({steps}), seed {config.seed}"
        + (f", LoRA r {config.lora.r}" if config.lora.enabled else ", full fine-tuning")
        + ".",
        "",
    ]
    if adapter:
        lines += [
            "Load it on its base model with `PeftModel.from_pretrained(base_model, this_folder)`; the merged model "
            "is in `../final`.",
            "",
        ]
    rows = [(name, ev) for name, ev in (("before", eval_before), ("after", eval_after)) if ev and ev.get("n")]
    if rows:
        lines += [
            f"## Held-out evaluation (greedy, {rows[-1][1]['n']} questions)",
            "",
            "| | " + " | ".join(SHOWN) + " |",
            "| --- |" + " --- |" * len(SHOWN),
        ]
        lines += [
            f"| {name} | " + " | ".join(f"{ev.get(k, float('nan')):.3f}" for k in SHOWN) + " |"
            for name, ev in rows
        ]
        lines.append("")
    lines += [
        "## How it was trained",
        "",
        "```",
        command_line(),
        "```",
        "",
        "The run's full configuration:",
        "",
    ]
    lines += ["```yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)
