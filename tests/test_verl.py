"""verl's data and reward contract, unchanged: a parquet file in verl's gsm8k preprocessing layout and a
compute_score function train GRPO and a hybrid; bad input gets one sentence and exit code 2."""

import pytest
from datafiles import VERL_SCORE, write_verl_gsm8k
from helpers import TINY_ARGS, read_metrics, reward_module

from sasr.cli import main
from sasr.errors import SasrError
from sasr.run_dir import read_lines
from sasr.tasks import get_task

ARGS = [*TINY_ARGS, "--steps", "2"]


@pytest.fixture
def verl_files(tmp_path):
    return write_verl_gsm8k(tmp_path / "train.parquet"), reward_module(tmp_path, VERL_SCORE, "gsm8k_score")


def test_a_verl_row_keeps_its_prompt_ground_truth_and_columns(verl_files):
    data, score = verl_files
    task = get_task(f"verl:{data}", compute_score=f"{score}:compute_score", demo_field="target")
    ex = task.examples("train", 4)[0]
    assert task.messages(ex) == ex.metadata["messages"] and task.messages(ex)[0]["role"] == "user"  # as it is
    columns = task.columns(ex)
    assert {"data_source", "ability", "extra_info", "ground_truth", "target"} <= columns.keys()
    assert columns["data_source"] == "openai/gsm8k" and ex.question.startswith(
        columns["extra_info"]["question"]
    )
    assert task.target(ex).endswith(f"#### {ex.answer}") and task.has_demonstration(ex)
    right, wrong = task.score(f"so #### {ex.answer}", ex), task.score("#### 0.5", ex)
    assert (right.reward, right.correct, wrong.reward, wrong.correct) == (1.0, True, 0.0, False)  # > 0.5
    assert right.formatted and not task.score("no final answer", ex).formatted


def test_grpo_and_a_hybrid_train_on_verl_data_with_a_verl_reward(verl_files, tmp_path, capsys):
    data, score = verl_files
    task = ["--task", f"verl:{data}", "--set", f"task.compute_score={score}:compute_score"]
    for method in ("grpo", "luffy"):
        out = tmp_path / method
        argv = [
            "train",
            *ARGS,
            *task,
            "--method",
            method,
            "--set",
            "task.demo_field=target",
            "--output",
            str(out),
        ]
        assert main(argv) == 0, capsys.readouterr().err
        lines = read_metrics(out)
        assert len(lines) == 2 and all(0.0 <= r["accuracy"] <= 1.0 for r in lines)
    # as a reward function: a dict's numbers are logged as metrics, its other values beside each sample
    out = tmp_path / "logged"
    argv = [
        "train",
        *ARGS,
        *task,
        "--method",
        "grpo",
        "--reward",
        f"{score}:compute_score",
        "--output",
        str(out),
    ]
    assert main([*argv, "--set", "log_completions=true"]) == 0, capsys.readouterr().err
    assert all(0.0 <= r["has_answer"] <= 1.0 and "rewards/compute_score/mean" in r for r in read_metrics(out))
    samples = read_lines(out, "completions.jsonl")
    assert samples and all(isinstance(s["pred"], str) for s in samples)


def test_a_verl_function_scores_a_built_in_task_with_its_answer(tmp_path):
    from sasr.rewards import RewardCall, Rewards, score_all

    score = reward_module(tmp_path, VERL_SCORE, "plain")
    task = get_task("arithmetic")
    exs = task.examples("train", 2)
    texts = [f"it is {exs[0].answer}", "no idea"]
    call = RewardCall([task.messages(e) for e in exs], texts, [[1], [1]])
    values, _ = Rewards(task, [f"{score}:plain_score"]).score(score_all(task, texts, exs), call, exs)
    assert values == [1.0, 0.0 if exs[1].answer not in "no idea" else 1.0]


@pytest.mark.parametrize(
    ("case", "sentence"),
    [
        ("no prompt", "a verl row needs 'prompt', a list of {role, content} chat messages"),
        ("no ground truth", "a verl row needs 'reward_model' with a 'ground_truth'"),
        ("dict without score", "returned a dict without 'score'"),
        ("neither contract", "must take verl's arguments"),
        ("demo not the assistant's", "'target' is a conversation whose last turn is not the assistant's"),
        (
            "reward of neither contract",
            "takes neither TRL's arguments (completions, ..., **kwargs) nor verl's",
        ),
    ],
)
def test_bad_verl_input_is_one_sentence_and_exit_code_2(tmp_path, capsys, case, sentence):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = write_verl_gsm8k(tmp_path / "train.parquet")
    score = reward_module(tmp_path, VERL_SCORE, "bad_score")
    rows = pq.read_table(data).to_pylist()
    fn = "compute_score"
    if case == "no prompt":
        rows = [{k: v for k, v in r.items() if k != "prompt"} for r in rows]
    elif case == "no ground truth":
        rows = [{**r, "reward_model": {"style": "rule"}} for r in rows]
    elif case == "dict without score":
        fn = "no_score"
    elif case == "neither contract":
        fn = "neither"
    elif case == "demo not the assistant's":
        rows = [{**r, "target": [{"role": "user", "content": "hi"}]} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), data)
    out = tmp_path / "run"
    argv = ["train", *ARGS, "--task", f"verl:{data}", "--set", f"task.compute_score={score}:{fn}"]
    if case == "reward of neither contract":
        argv = [*argv[:-1], f"task.compute_score={score}:compute_score", "--reward", f"{score}:neither"]
    code = main([*argv, "--set", "task.demo_field=target", "--method", "luffy", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and sentence in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "metrics.jsonl").exists()


def test_a_reward_model_gives_each_completion_its_score(tmp_path):
    """TRL lets a sequence-classification model be a reward function: each prompt + completion, rendered with
    the model's chat template, gets the model's logit; sasr takes its folder in reward_funcs the same way."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    from sasr import models
    from sasr.inputs import reward_entries
    from sasr.rewards import RewardCall, Rewards, score_all

    tok = AutoTokenizer.from_pretrained(models.resolve("tiny"))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        rm = AutoModelForSequenceClassification.from_config(config).eval()
    folder = tmp_path / "tiny-rm"
    rm.save_pretrained(folder)
    tok.save_pretrained(folder)
    task = get_task("arithmetic")
    exs = task.examples("train", 3)
    texts = ["4", "a longer completion here", "Answer: 7"]
    call = RewardCall([task.messages(e) for e in exs], texts, [[1]] * 3)
    values, stats = Rewards(task, [str(folder)]).score(score_all(task, texts, exs), call, exs)
    for ex, text, value in zip(exs, texts, values):
        chat = tok.apply_chat_template(
            [*task.messages(ex), {"role": "assistant", "content": text}], tokenize=False
        )
        with torch.no_grad():
            want = rm(**tok(chat, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
        assert value == pytest.approx(want, abs=1e-5)
    assert len(set(values)) == 3 and "rewards/tiny-rm/mean" in stats
    loaded = AutoModelForSequenceClassification.from_pretrained(folder)  # passed as an object from Python
    entries, objects = reward_entries([loaded])
    again, more = Rewards(task, entries, objects=objects).score(score_all(task, texts, exs), call, exs)
    assert again == pytest.approx(values, abs=1e-6) and "rewards/tiny-rm/mean" in more
    with pytest.raises(SasrError, match="is neither module:function nor a sequence-classification model"):
        Rewards(task, [str(tmp_path / "not-a-model")])


def test_a_verl_hub_id_is_read_through_datasets_and_offline_says_what_to_do(tmp_path, capsys):
    """verl:ORG/NAME is a hub dataset (its train and test splits); offline, one sentence names the way out."""
    out = tmp_path / "run"
    code = main(
        ["train", *ARGS, "--task", "verl:someone/verl-gsm8k", "--method", "grpo", "--output", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot load dataset 'someone/verl-gsm8k' split 'train' from the hub" in err
    assert "--task verl:FILE" in err and not out.exists()


def test_verls_custom_reward_function_keys_name_the_scorer(verl_files, tmp_path, capsys):
    """custom_reward_function.path and .name (verl's keys, name defaulting to compute_score): a verl task's
    judge, else one more reward function; both naming different scorers is refused in one sentence."""
    import yaml

    from sasr.config import build_config

    data, score = verl_files
    recipe = tmp_path / "verl.yaml"
    recipe.write_text(
        yaml.safe_dump({"task": {"name": f"verl:{data}"}, "custom_reward_function": {"path": str(score)}})
    )
    c = build_config(recipe)
    assert c.task.options()["compute_score"] == f"{score}:compute_score" and c.reward_funcs == []
    out = tmp_path / "run"
    assert main(["train", *ARGS, "--config", str(recipe), "--method", "grpo", "--output", str(out)]) == 0
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in read_metrics(out))
    assert (
        "compute_score"
        in get_task(f"verl:{data}", **build_config(out / "config.yaml").task.options()).reward_name
    )
    other = build_config(
        None, {"custom_reward_function.path": str(score), "custom_reward_function.name": "plain_score"}
    )
    assert other.reward_funcs == [f"{score}:plain_score"]  # the built-in task keeps its judge
    capsys.readouterr()
    code = main(
        [
            "train",
            *ARGS,
            "--config",
            str(recipe),
            "--set",
            f"task.compute_score={score}:plain_score",
            "--method",
            "grpo",
            "--output",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "custom_reward_function names" in err and "keep one of them" in err, err
