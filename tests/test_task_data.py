"""Tasks from files and generators: targets score right, altered answers wrong, splits disjoint, bad
input named in one sentence."""

import json
import re
from decimal import Decimal

import pytest
from datafiles import write_gsm8k, write_math, write_user_jsonl
from helpers import read_metrics, reward_module

from sasr.errors import SasrError
from sasr.tasks import get_task
from sasr.tasks.generated import brute_force, holds


def altered(task, ex) -> str:
    """The target with its final answer changed to a wrong one."""
    target = task.target(ex)
    if task.name == "knights-knaves":
        first = ex.metadata["names"][0]
        terms = ex.metadata["terms"]
        right = terms["a_knight"] if ex.metadata["solution"][0] else terms["a_knave"]
        wrong = terms["a_knave"] if ex.metadata["solution"][0] else terms["a_knight"]
        return target.replace(f"<answer>{first} is {right}", f"<answer>{first} is {wrong}")
    if task.name == "math":
        return target.rsplit("\\boxed{", 1)[0] + "\\boxed{" + ex.answer + "+1}$."
    return target.rsplit(ex.answer, 1)[0] + str(Decimal(ex.answer) + 1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {
        "gsm8k": write_gsm8k(d / "gsm8k.jsonl"),
        "math": write_math(d / "math.jsonl"),
        "jsonl": write_user_jsonl(d / "mine.jsonl"),
    }


def make(name, files):
    if name in ("gsm8k", "math"):
        return get_task(name, path=str(files[name]))
    if name == "jsonl":
        return get_task(f"jsonl:{files['jsonl']}")
    return get_task(name)


@pytest.mark.parametrize("name", ["arithmetic", "gsm8k", "math", "knights-knaves", "gsm-symbolic", "jsonl"])
def test_every_task_200_per_split(files, name):
    task = make(name, files)
    train, test = task.examples("train", 200, seed=0), task.examples("test", 200, seed=0)
    assert len(train) == 200 and len(test) == 200
    assert not {e.question for e in train} & {e.question for e in test}
    assert task.examples("test", 200, seed=0) == test
    msgs = task.messages(train[0])
    assert msgs[-1]["content"] == train[0].question
    for ex in train + test:
        good = task.score(task.target(ex), ex)
        assert good.correct and good.formatted, (name, task.target(ex))
        bad = task.score(altered(task, ex), ex)
        assert not bad.correct and bad.reward < good.reward, (name, altered(task, ex))


def test_gsm8k_format_details(files):
    task = get_task("gsm8k", path=str(files["gsm8k"]))
    ex = next(e for e in task.examples("train", 200) if int(e.answer) >= 1000)
    assert "<<" not in ex.cot and "####" not in ex.cot and "," not in ex.answer
    n = int(ex.answer)
    for text in [f"Answer: {n:,}", f"Answer: ${n}", f"Answer: {n}.0", f"#### {n:,}.00"]:
        assert task.score(text, ex).correct, text
    assert not task.score(f"Answer: {n + 1}", ex).correct


def test_math_verify_and_filters_and_timeouts(files):
    task = get_task("math", path=str(files["math"]))
    rows = {e.question: e for e in task.examples("train", None) + task.examples("test", None)}
    half = rows["What is $\\frac{1}{4} + \\frac{1}{4}$?"]
    assert task.score("so \\boxed{0.5}", half).correct and task.score("\\boxed{\\frac{2}{4}}", half).correct
    assert not task.score("\\boxed{\\frac{1}{3}}", half).correct
    assert task.score("\\boxed{(x+1)^2}", rows["Expand $(x+1)^2$."]).correct
    level2 = get_task("math", path=str(files["math"]), levels=[2], types=["Prealgebra"]).examples(
        "train", None
    )
    assert level2 and all(
        str(e.metadata["level"]) == "Level 2" and e.metadata["type"] == "Prealgebra" for e in level2
    )
    slow = get_task("math", path=str(files["math"]), timeout_seconds=1)
    ex = task.examples("train", 1)[0]
    s = slow.score("\\boxed{9^{9^{9^{9^{9}}}}}", ex)  # sympy cannot finish this comparison in a second
    assert s.reward == slow.opts["format_reward"] and not s.correct and slow.timeouts == 1


@pytest.mark.parametrize("n_people", [2, 3, 5, 8])
def test_knights_knaves_solutions_and_cot(n_people):
    task = get_task("knights-knaves", n_people=n_people)
    count = 200 if n_people == 3 else 15
    for ex in task.examples("train", count) + task.examples("test", count // 5):
        sols = brute_force(ex.metadata["statements"])
        assert sols == [tuple(ex.metadata["solution"])]  # unique, and reasoning-gym's
        lines = ex.cot.splitlines()
        names, terms = ex.metadata["names"], ex.metadata["terms"]
        roles = ", ".join(
            f"{n} is {terms['a_knight'] if v else terms['a_knave']}" for n, v in zip(names, sols[0])
        )
        assert (
            lines[-1] == f"Suppose {roles}. Every statement is consistent with this, so it is the solution."
        )
        for line in lines:  # every refuted case really is refuted
            if line.endswith("contradiction."):
                assert line.startswith("Suppose ")


def test_knights_knaves_answers_any_order_and_case():
    task = get_task("knights-knaves")
    ex = task.examples("test", 1)[0]
    names, terms, sol = ex.metadata["names"], ex.metadata["terms"], ex.metadata["solution"]
    parts = [
        f"{n.upper()} is {(terms['a_knight'] if v else terms['a_knave']).upper()}" for n, v in zip(names, sol)
    ]
    s = task.score(f"<think>x</think>\n<answer>{'; '.join(reversed(parts))}</answer>", ex)
    assert s.correct and s.formatted and s.reward == 3.0
    assert task.score("no tags at all", ex).reward == -3.0
    missing = task.score(f"<answer>{parts[0]}</answer>", ex)
    assert (
        not missing.correct and not missing.formatted and missing.reward == -1.0 - 2.0
    )  # not everyone named
    custom = get_task("knights-knaves", answer_reward=5.0, format_reward=0.5)
    assert custom.score(custom.target(ex), ex).reward == 5.5
    with pytest.raises(SasrError, match="n_people must be 2..8"):
        get_task("knights-knaves", n_people=9)


def test_our_evaluator_agrees_with_reasoning_gym():
    from reasoning_gym.logic.knights_knaves import KnightsKnavesDataset

    ex = get_task("knights-knaves", n_people=4).examples("train", 30)
    for e in ex:
        for s in e.metadata["statements"]:
            for bits in range(16):
                a = tuple(bool(bits >> i & 1) for i in range(4))
                assert holds(s, a) == bool(KnightsKnavesDataset.test_satisfiability(s, a))


# --- bad input ---------------------------------------------------------------------------------------


def test_broken_jsonl_line_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "q1", "answer": "a #### 1"}\n{"question": "q2", "answer": \n')
    with pytest.raises(SasrError, match=re.escape(f"{f}:2 is not valid JSON")):
        get_task("gsm8k", path=str(f)).examples("train", 5)


def test_missing_field_names_field_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "q1", "answer": "#### 1"}\n\n{"question": "q3"}\n')
    with pytest.raises(SasrError, match=re.escape(f"{f}:3 has no field 'answer'")):
        get_task("gsm8k", path=str(f)).examples("train", 5)
    with pytest.raises(SasrError, match=re.escape(f"{f}:3 has no field 'answer'")):
        get_task(f"jsonl:{f}").examples("train", 5)
    # A file of RL prompts needs no chain of thought; its examples then hold no demonstration.
    f.write_text("".join(f'{{"question": "q{i}", "answer": "{i}"}}\n' for i in range(20)))
    task = get_task(f"jsonl:{f}")
    assert not any(task.has_demonstration(ex) for ex in task.examples("train", 5))


def test_empty_and_missing_files(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    with pytest.raises(SasrError, match="is empty"):
        get_task(f"jsonl:{f}").examples("train", 5)
    with pytest.raises(SasrError, match="does not exist"):
        get_task("gsm8k", path=str(tmp_path / "nope.jsonl")).examples("train", 5)


def test_hub_offline_says_what_to_do():
    with pytest.raises(SasrError, match="cannot load dataset .openai/gsm8k.*--set task.path=FILE"):
        get_task("gsm8k").examples("train", 5)


def test_parquet_and_separate_test_file(tmp_path, files):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in files["gsm8k"].read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows[:100]), tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[100:130]), tmp_path / "test.parquet")
    task = get_task("gsm8k", path=str(tmp_path / "train.parquet"), test_path=str(tmp_path / "test.parquet"))
    assert len(task.examples("train", None)) == 100 and len(task.examples("test", None)) == 30


def test_user_fields_and_judges(tmp_path):
    f = write_user_jsonl(tmp_path / "d.jsonl", 60, fields=("prompt", "reasoning", "final"))
    task = get_task(
        f"jsonl:{f}", question_field="prompt", solution_field="reasoning", answer_field="final", judge="exact"
    )
    ex = task.examples("train", 1)[0]
    assert task.score(task.target(ex), ex).correct
    with pytest.raises(SasrError, match="unknown judge 'fuzzy'"):
        get_task(f"jsonl:{f}", judge="fuzzy")


REWARDS = """
def good(prompts, completions, answer, **kw):  # TRL's contract: completions as message lists
    return [1.0 if c[0]["content"].strip().endswith(a) else 0.0 for c, a in zip(completions, answer)]

def raises(prompts, completions, answer, **kw):
    out = []
    for c in completions:
        if "Answer: 1" in c[0]["content"]:
            raise ValueError("cannot read this one")
        out.append(0.0)
    return out

def short(prompts, completions, **kw):
    return [1.0]

def text(prompts, completions, **kw):
    return ["yes"] * len(completions)
"""


@pytest.fixture
def reward_file(tmp_path):
    return reward_module(tmp_path, REWARDS)


def test_reward_functions(tmp_path, reward_file):
    from sasr.rewards import RewardCall, Rewards, score_all

    f = write_user_jsonl(tmp_path / "d.jsonl", 60)
    task = get_task(f"jsonl:{f}")
    exs = task.examples("train", 4)
    texts = ["Answer: 7", "Answer: 8", "Answer: 1", "Answer: 9"]

    def score(spec: str, texts: list[str] = texts):
        call = RewardCall([task.messages(e) for e in exs], texts, [[1]] * 4)
        return Rewards(task, [spec]).score(score_all(task, texts, exs), call, exs)

    assert score(f"{reward_file}:good", [task.target(e) for e in exs])[0] == [1.0] * 4
    with pytest.raises(
        SasrError,
        match=re.escape(
            f"reward function {reward_file}:raises raised ValueError: cannot read this one on example 2"
        ),
    ):
        score(f"{reward_file}:raises")
    with pytest.raises(SasrError, match="returned 1 values for 4 completions"):
        score(f"{reward_file}:short")
    with pytest.raises(SasrError, match="returned 'yes', not a finite number or None, for completion 0"):
        score(f"{reward_file}:text")
    with pytest.raises(SasrError, match="has no function 'nothing'"):
        score(f"{reward_file}:nothing")
    with pytest.raises(SasrError, match="cannot import reward module 'no_such_mod'"):
        score("no_such_mod:f")


# --- training on these tasks ------------------------------------------------------------------------


def _train(capsys, tmp_path, *argv):
    from sasr.cli import main

    code = main(
        [
            "train",
            "--model",
            "tiny",
            "--steps",
            "3",
            "--warmup-steps",
            "1",
            "--quiet",
            "--output",
            str(tmp_path / "run"),
            "--set",
            "grpo.num_generations=2",
            "--set",
            "grpo.max_completion_length=8",
            "--set",
            "eval.max_new_tokens=8",
            "--set",
            "task.test_size=2",
            "--set",
            "sft.batch_size=2",
            "--set",
            "report_to=none",
            *argv,
        ]
    )
    return code, capsys.readouterr()


@pytest.mark.parametrize("task", ["knights-knaves", "gsm8k"])
def test_train_on_tasks(capsys, tmp_path, files, task):
    extra = ["--set", f"task.path={files['gsm8k']}"] if task == "gsm8k" else ["--set", "task.n_people=3"]
    code, cap = _train(capsys, tmp_path, "--task", task, "--method", "sft-then-grpo", *extra)
    assert code == 0, cap.err
    assert f"task '{task}'" in cap.out and "1 SFT, 2 GRPO" in cap.out
    rows = read_metrics(tmp_path / "run")
    assert [r["phase"] for r in rows] == ["sft", "grpo", "grpo"]


def test_reward_that_raises_stops_training(capsys, tmp_path, reward_file):
    f = write_user_jsonl(tmp_path / "d.jsonl", 60)
    always = reward_module(
        tmp_path, "def boom(prompts, completions, **kw):\n    raise KeyError('label')\n", "always"
    )
    code, cap = _train(
        capsys,
        tmp_path,
        "--task",
        f"jsonl:{f}",
        "--reward",
        f"{always}:boom",
        "--method",
        "grpo",
        "--set",
        "eval.before=false",
    )
    assert code == 2
    assert f"reward function {always}:boom raised KeyError: 'label' on example 0" in cap.err
    assert cap.err.count("\n") == 1
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == "running"  # never mistaken for a finished run
    assert not (tmp_path / "run" / "final").exists()


def _conversations(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Answer with 'Answer: <integer>'."},
                    {"role": "user", "content": f"What is {i} + {i + 1}?"},
                    {"role": "assistant", "content": f"{i} + {i + 1} = {2 * i + 1}.\nAnswer: {2 * i + 1}"},
                ]
            }
        )
    return rows


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_conversational_rows_give_prompts_and_demonstrations(tmp_path, suffix):
    """TRL's conversational format: the turns before the last assistant turn are the prompt, that turn the
    demonstration; the answer is read from it when the row has no answer field."""
    path = tmp_path / f"chat{suffix}"
    rows = _conversations(60)
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    task = get_task(f"jsonl:{path}")
    train, test = task.examples("train", None), task.examples("test", None)
    assert len(train) + len(test) == 60 and train and test
    assert not {ex.question for ex in train} & {ex.question for ex in test}
    ex = train[0]
    i = int(ex.question.split()[2])
    assert task.messages(ex) == rows[i]["messages"][:2]  # system + user: the prompt
    assert task.target(ex) == rows[i]["messages"][2]["content"] and ex.answer == str(2 * i + 1)
    assert task.score(task.target(ex), ex).correct
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
        )
        + "\n"
    )
    with pytest.raises(
        SasrError,
        match=re.escape(f"{bad}:1 has no field 'answer' and its last assistant turn no final answer"),
    ):
        get_task(f"jsonl:{bad}").examples("train", None)
