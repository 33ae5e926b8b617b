"""TRL's dataset formats as they are: prompt-only and prompt-completion rows, standard and conversational,
from a file or a datasets.Dataset passed from Python."""

import json

import pytest
from datafiles import arithmetic_rows
from helpers import TINY_ARGS, read_metrics, tiny_config

import sasr
from sasr.cli import main
from sasr.run_dir import read_lines

ARGS = TINY_ARGS


def trl_rows(kind: str, n: int = 40) -> list[dict]:
    """Rows as TRL's docs define each format; prompt-only rows carry the gold answer as `solution`."""
    rows = []
    for ex in arithmetic_rows(n):
        demo = f"{ex.cot}\nAnswer: {ex.answer}"
        turn = [{"role": "user", "content": ex.question}]
        rows.append(
            {
                "standard prompt-only": {"prompt": ex.question, "solution": ex.answer},
                "conversational prompt-only": {"prompt": turn, "solution": ex.answer},
                "standard prompt-completion": {"prompt": ex.question, "completion": demo},
                "conversational prompt-completion": {
                    "prompt": turn,
                    "completion": [{"role": "assistant", "content": demo}],
                },
            }[kind]
        )
    return rows


@pytest.mark.parametrize(
    "kind",
    [
        "standard prompt-only",
        "conversational prompt-only",
        "standard prompt-completion",
        "conversational prompt-completion",
    ],
)
def test_each_trl_format_trains(tmp_path, capsys, kind):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in trl_rows(kind)))
    demos = "completion" in kind  # the completion is the demonstration: SFT steps, then GRPO
    method = ["--method", "sft-then-grpo", "--warmup-steps", "1"] if demos else ["--method", "grpo"]
    out = tmp_path / "run"
    assert (
        main(["train", *ARGS, "--task", f"jsonl:{data}", *method, "--steps", "2", "--output", str(out)]) == 0
    )
    phases = [r["phase"] for r in read_metrics(out)]
    assert phases == (["sft", "grpo"] if demos else ["grpo", "grpo"]), capsys.readouterr().err


def test_the_completion_must_be_the_assistants_turn(tmp_path, capsys):
    rows = trl_rows("conversational prompt-completion")
    rows[0]["completion"] = [{"role": "user", "content": "again"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code = main(["train", *ARGS, "--task", f"jsonl:{data}", "--method", "sft", "--output", str(out)])
    err = capsys.readouterr().err
    assert (
        code == 2
        and "'completion' must be the assistant's turn" in err
        and len(err.strip().splitlines()) == 1
    )
    assert not out.exists()


def test_a_dataset_from_python_trains(tmp_path):
    from datasets import Dataset

    rows = trl_rows("conversational prompt-completion")
    train, test = Dataset.from_list(rows[:32]), Dataset.from_list(rows[32:])
    config = tiny_config(
        tmp_path / "run", method="sft-then-grpo", steps=2, warmup_steps=1, log_completions=True
    )
    result = sasr.train(config, progress=False, train_dataset=train, eval_dataset=test)
    assert [r["phase"] for r in read_metrics(result.output_dir)] == ["sft", "grpo"]
    asked = {s["question"] for s in read_lines(result.output_dir, "eval_completions.jsonl")}
    assert len(asked) == 4 and asked <= {r["prompt"][0]["content"] for r in rows[32:]}  # the eval_dataset's
    assert "name: dataset" in (result.output_dir / "config.yaml").read_text()  # read where it lies, no file


def test_language_modelling_rows_train_sft_as_plain_text(tmp_path, capsys):
    """TRL's language-modelling rows ({"text": ...}): SFT on the whole text after a start-of-text token, no
    chat template and no held-out judge; as demos.task they are the SFT steps of a method with RL steps; a
    method that samples rollouts refuses them as its RL prompts in one sentence."""
    from sasr import models
    from sasr.data import demonstration_rows
    from sasr.tasks import get_task

    rows = [{"text": f"{ex.question}\n{ex.cot}\nAnswer: {ex.answer}"} for ex in arithmetic_rows(40)]
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task, tokenizer = get_task(f"jsonl:{data}"), models.load_tokenizer("tiny")
    examples = task.examples("train", 3)
    demo = demonstration_rows(tokenizer, task, examples, 256, "cpu")
    start = tokenizer.bos_token_id if tokenizer.bos_token else tokenizer.eos_token_id
    assert start is not None and demo.prompt_ids.tolist() == [[start]] * 3
    got = tokenizer.decode(demo.completion_ids[0][demo.completion_mask[0].bool()], skip_special_tokens=True)
    assert got == examples[0].cot and examples[0].cot in {r["text"] for r in rows}

    out = tmp_path / "sft"
    assert (
        main(
            [
                "train",
                *ARGS,
                "--task",
                f"jsonl:{data}",
                "--method",
                "sft",
                "--steps",
                "2",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    run = json.loads((out / "run.json").read_text())
    assert [r["phase"] for r in read_metrics(out)] == ["sft", "sft"] and run["eval_after"] is None

    out = tmp_path / "sasr"
    argv = ["train", *ARGS, "--method", "sft-then-grpo", "--warmup-steps", "1", "--steps", "2"]
    assert main([*argv, "--set", f"demos.task=jsonl:{data}", "--output", str(out)]) == 0
    assert [r["phase"] for r in read_metrics(out)] == ["sft", "grpo"]

    capsys.readouterr()
    out = tmp_path / "grpo"
    code = main(["train", *ARGS, "--task", f"jsonl:{data}", "--method", "grpo", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "method 'grpo' samples rollouts, but task 'jsonl' holds language-modelling rows" in err
    assert not out.exists()
