"""SASRTrainer: the object a TRL user's script builds (a loaded model, datasets, reward callables, a peft
config, callbacks) trains as the command line does; its callbacks see transformers' events and can stop the
run; a run directory records the objects and a resume checks them; bad objects get one sentence."""

from __future__ import annotations

import inspect
import json
import re
import runpy
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same_run, read_metrics, reward_module, tiny_config
from test_trl_formats import trl_rows
from transformers import TrainerCallback, TrainingArguments

import sasr
from sasr import cli
from sasr.checkpoint import complete_checkpoints
from sasr.locks import FolderLock
from sasr.run_dir import read_status

DOCS = Path(__file__).resolve().parents[1] / "docs" / "python.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOCS.read_text(), re.S)


def test_the_docs_script_prints_its_output_and_trains_as_the_command_line_does(tmp_path, monkeypatch, capsys):
    """docs/python.md's script, run as it is, prints the output the page shows; the same run on the command
    line (its rows in JSONL files, its reward function in a module) writes the same metrics and weights."""
    monkeypatch.chdir(tmp_path)
    ns = runpy.run_path(str(_write(tmp_path / "script.py", _blocks("python")[0])), run_name="__main__")
    printed = "".join(
        line for line in capsys.readouterr().out.splitlines(True) if not line.startswith("[INFO]")
    )
    assert printed == _blocks("text")[0], "docs/python.md's output block is not what its script prints"
    trainer = ns["trainer"]
    assert trainer.state.global_step == trainer.state.max_steps == 4
    assert trainer.state.log_history == read_metrics(tmp_path / "runs/python-example")
    saved = Path("runs/python-example-model")
    assert (saved / "config.json").is_file() and (saved / "model.safetensors").is_file()

    ns["train"].to_json(tmp_path / "train.jsonl", lines=True)
    ns["test"].to_json(tmp_path / "test.jsonl", lines=True)
    module = reward_module(tmp_path, inspect.getsource(ns["ends_with_answer"]), "docs_rewards")
    args = ns["args"]
    sets = {
        "task.test_path": tmp_path / "test.jsonl",
        "task.train_size": 128,
        "task.test_size": 4,
        "lora.r": 8,
        "lora.alpha": 16,
        "grpo.batch_size": 2,
        "grpo.num_generations": 2,
        "grpo.max_completion_length": 8,
        "sft.batch_size": 2,
        "eval.max_new_tokens": 8,
        "report_to": "none",
        "reward_funcs": f"[{module}:ends_with_answer, task]",
    }
    argv = ["train", "--model", "tiny", "--task", f"jsonl:{tmp_path / 'train.jsonl'}", "--quiet"]
    argv += ["--method", args.method, "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)]
    argv += ["--output", str(tmp_path / "cli")] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert cli.main(argv) == 0
    assert_same_run(tmp_path / "runs/python-example", tmp_path / "cli")
    inputs = read_status(tmp_path / "runs/python-example")["inputs"]
    assert inputs["reward_funcs"][0]["name"] == "__main__.ends_with_answer"
    assert "python:__main__.ends_with_answer" in (tmp_path / "runs/python-example/config.yaml").read_text()
    assert inputs["model"]["class"] == "LlamaForCausalLM" and len(inputs["model"]["sha256"]) == 64
    assert inputs["datasets"]["train"]["num_rows"] == 128


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class Recorder(TrainerCallback):
    """Records each event with the state's step; stops or raises where told."""

    def __init__(self, stop_at: int | None = None, raise_at: int | None = None) -> None:
        self.events: list[str] = []
        self.stop_at, self.raise_at = stop_at, raise_at

    def _note(self, name: str, state) -> None:
        self.events.append(f"{name} {state.global_step}")

    def on_train_begin(self, args, state, control, **kw):
        self._note("train_begin", state)
        self.args = args

    def on_step_begin(self, args, state, control, **kw):
        self._note("step_begin", state)

    def on_step_end(self, args, state, control, **kw):
        self._note("step_end", state)
        if state.global_step == self.raise_at:
            raise ValueError("boom")
        if state.global_step == self.stop_at:
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self._note("evaluate", state)
        assert "eval_accuracy" in metrics

    def on_log(self, args, state, control, logs=None, **kw):
        self._note("log", state)

    def on_save(self, args, state, control, **kw):
        self._note("save", state)

    def on_train_end(self, args, state, control, **kw):
        self._note("train_end", state)


def notebook_reward(body: str):
    """A reward function as a notebook defines it (module __main__, no source file), returning ``body``."""
    ns = {"__name__": "__main__"}
    exec(f"def score(completions, **kwargs):\n    return [{body} for _ in completions]", ns)
    return ns["score"]


FIRST = notebook_reward("0.5")


def _trainer(out: Path, callback, steps: int = 3, reward=FIRST, **top):
    config = tiny_config(out, method="sft-then-grpo", steps=steps, warmup_steps=1, **top)
    return sasr.SASRTrainer(
        args=config, reward_funcs=[reward], callbacks=[callback], progress=False, overwrite=True
    )


def test_a_callback_sees_transformers_events_and_stops_the_run_as_finished(tmp_path):
    recorder = Recorder(stop_at=2)
    trainer = _trainer(tmp_path / "run", recorder)
    result = trainer.train()
    assert recorder.events == [
        "train_begin 0",
        "evaluate 0",
        *("step_begin 0", "step_end 1", "log 1"),
        *("step_begin 1", "step_end 2", "log 2"),
        "evaluate 2",
        "train_end 2",
    ]
    status = read_status(result.output_dir)
    assert status["status"] == "finished"
    assert status["stopped_early"] == {"step": 2, "by": "Recorder.on_step_end"}
    assert len(read_metrics(result.output_dir)) == 2 and (result.output_dir / "final").is_dir()
    assert isinstance(recorder.args, TrainingArguments) and recorder.args.max_steps == 3
    assert recorder.args.output_dir == str(result.output_dir) and trainer.state.max_steps == 3


def test_a_callback_that_raises_stops_the_run_with_its_checkpoint_and_resume_checks_the_reward(
    tmp_path, capsys
):
    """A raise at step 1 of 2: one sentence, checkpoint step-1 kept, run.json failed, the lock released; a
    resume with another reward function is refused in one sentence; with the same one it finishes."""
    out = tmp_path / "run"
    trainer = _trainer(out, Recorder(raise_at=1), steps=2, eval={"before": False, "after": False})
    with pytest.raises(sasr.CallbackError) as err:
        trainer.train()
    message = str(err.value)
    assert message.startswith("callback Recorder.on_step_end raised ValueError: boom at step 1;")
    assert "checkpoint step-000001 is kept" in message and "\n" not in message
    assert [p.name for p in complete_checkpoints(out)] == ["step-000001"]
    status = read_status(out)
    assert status["status"] == "failed" and status["callback"] == "Recorder.on_step_end"
    assert len(read_metrics(out)) == 1
    FolderLock(out, "a test").acquire().release()  # released: another command may take it

    config = tiny_config(
        out, method="sft-then-grpo", steps=2, warmup_steps=1, eval={"before": False, "after": False}
    )
    assert "python:__main__.score" in (out / "config.yaml").read_text()
    other = sasr.SASRTrainer(args=config, reward_funcs=[notebook_reward("1.0")], progress=False)
    with pytest.raises(
        sasr.SasrError, match=r"reward function 0 was __main__.score \(sha256 \w+\) and is now"
    ):
        other.train(resume_from_checkpoint=True)
    assert cli.main(["train", "--resume", str(out), "--quiet"]) == 2  # only Python can pass it again
    assert "was passed as a Python object" in capsys.readouterr().err
    assert len(read_metrics(out)) == 1
    same = sasr.SASRTrainer(args=config, reward_funcs=[FIRST], progress=False)
    same.train(resume_from_checkpoint=True)
    assert [m["step"] for m in read_metrics(out)] == [1, 2] and read_status(out)["status"] == "finished"


def test_a_dataset_view_draws_the_examples_a_file_gives(tmp_path):
    """The Arrow view of a Dataset and the jsonl task on the same rows in a file give equal examples: one
    dataset split by hash, two datasets as two splits, the scarce demonstrations first; without training."""
    from datasets import Dataset

    from sasr.collect.examples import training_examples
    from sasr.config import validate
    from sasr.tasks import get_task
    from sasr.tasks.dataset import DatasetTask, materialise

    rows = trl_rows("conversational prompt-completion") + trl_rows("conversational prompt-only")
    rows = [{**r, "answer": str(i)} for i, r in enumerate(rows * 4)]
    data = Dataset.from_list(rows)
    data.to_json(tmp_path / "all.jsonl", lines=True)
    view, file = DatasetTask(data), get_task(f"jsonl:{tmp_path / 'all.jsonl'}")
    for split, n, seed in (("train", None, 0), ("train", 7, 3), ("test", 5, 1)):
        assert _plain(view.examples(split, n, seed)) == _plain(file.examples(split, n, seed))
    head, tail = Dataset.from_list(rows[:50]), Dataset.from_list(rows[50:])
    head.to_json(tmp_path / "a.jsonl", lines=True)
    tail.to_json(tmp_path / "b.jsonl", lines=True)
    two = get_task(f"jsonl:{tmp_path / 'a.jsonl'}", test_path=str(tmp_path / "b.jsonl"))
    assert _plain(DatasetTask(head, tail).examples("test", 9, 2)) == _plain(two.examples("test", 9, 2))
    config = validate({"task": {"name": "x", "train_size": 40}, "demos": {"size": 3}, "seed": 2})
    drawn = training_examples(config, view)
    assert _plain(drawn) == _plain(training_examples(config, file))
    assert [ex.metadata["index"] for ex in drawn] == list(range(40))
    stream = materialise(data.to_iterable_dataset(), "train_dataset", 30, "task.train_size")
    assert stream.to_list() == data.select(range(30)).to_list()  # an IterableDataset's first rows, as Arrow


def _plain(examples) -> list[tuple]:
    return [(e.question, e.cot, e.answer, json.dumps(e.metadata["row"], sort_keys=True)) for e in examples]


def test_a_million_row_dataset_is_read_where_it_lies():
    """A million rows (an Arrow table built without Python lists) with an eval set, 20,000 of them drawn: the
    view holds row numbers and flags, not rows (traced Python allocations stay under 16 MB, where the rows
    as Python objects would take hundreds), and reads any row."""
    import pyarrow as pa
    from datasets import Dataset

    from sasr.tasks.dataset import DatasetTask

    n = 1_000_000
    numbers = pa.array(np.arange(n, dtype=np.int64)).cast(pa.string())
    table = pa.table({"question": pa.compute.binary_join_element_wise("q", numbers, ""), "answer": numbers})
    data = Dataset(table)
    tracemalloc.start()
    view = DatasetTask(data, data.select(range(10))).examples("train", 20_000, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(view) == 20_000 and peak < 16 * 2**20, f"{peak / 2**20:.0f} MB"
    last = view[-1]
    assert last.question == f"q{int(view.rows[-1])}" and last.metadata["index"] == 19_999
    assert view.rows.max() > 900_000  # drawn from the whole million


@pytest.mark.parametrize(
    "kwargs, sentence",
    [
        ({"reward_funcs": [lambda x: x]}, "reward function test_python_api.<lambda> takes neither TRL's"),
        ({"reward_funcs": [lambda a, b, c: 0]}, "takes neither TRL's arguments"),
        ({"reward_funcs": [3]}, r"reward_funcs\[0\] is of type int; give a function"),
        ({"model": "torch.nn.Linear"}, "not Linear"),
        ({"train_dataset": "foo-bar"}, "has none of the columns sasr reads .* its columns are bar, foo"),
        (
            {"train_dataset": [{"question": "q", "answer": "1"}]},
            r"must be a datasets.Dataset, not list \(Dataset.from_list",
        ),
        ({"train_dataset": "dict"}, "is a DatasetDict; pass one split of it"),
        ({"train_dataset": "stream"}, "is an IterableDataset, which may not end; set task.train_size"),
        ({"callbacks": [object()]}, "callbacks must be transformers.TrainerCallback instances, not object"),
        (
            {"args": "grpo-config"},
            "args must be a sasr.SASRConfig, a dict of its keys or a YAML path, not GRPOConfig",
        ),
        ({"peft_config": "prefix"}, "peft_config must be a peft.LoraConfig"),
    ],
    ids=[
        "lambda",
        "three-args",
        "int",
        "linear",
        "columns",
        "list",
        "datasetdict",
        "stream",
        "callback",
        "grpoconfig",
        "peft",
    ],
)
def test_bad_objects_are_refused_in_one_sentence_before_anything_loads(tmp_path, kwargs, sentence):
    import torch
    from datasets import Dataset, DatasetDict

    stand_ins = {
        "torch.nn.Linear": torch.nn.Linear(2, 2),
        "foo-bar": Dataset.from_list([{"foo": 1, "bar": 2}]),
        "dict": DatasetDict({"train": Dataset.from_list([{"question": "q", "answer": "1"}])}),
        "stream": Dataset.from_list([{"question": "q", "answer": "1"}]).to_iterable_dataset(),
    }
    if kwargs.get("args") == "grpo-config":
        from trl import GRPOConfig

        kwargs = {
            "args": GRPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False)
        }
    if kwargs.get("peft_config") == "prefix":
        from peft import PrefixTuningConfig

        kwargs = {"peft_config": PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")}
    kwargs = {k: stand_ins.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    kwargs.setdefault("args", {**tiny_config(tmp_path / "run"), "task": {"test_size": 4}})
    with pytest.raises(sasr.SasrError, match=sentence) as err:
        sasr.SASRTrainer(**kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_method_class_of_ones_own_is_taken_as_it_is(tmp_path):
    """``method=`` takes a Method subclass defined in the caller's code: registered under its name, its
    options in the config, nothing written before train()."""
    from sasr.contracts import load_module

    RaftSFT = load_module(
        str(Path(__file__).parents[1] / "examples" / "raft_sft.py"), "method", once=True
    ).RaftSFT
    trainer = sasr.SASRTrainer(args=tiny_config(tmp_path / "run", steps=2), method=RaftSFT, progress=False)
    assert trainer.args.method == RaftSFT.name and trainer._trainer.method.name == RaftSFT.name
    assert not (tmp_path / "run").exists()
