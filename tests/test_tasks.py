import pytest

from sasr.errors import SasrError
from sasr.tasks import extract_answer, get_task


def test_arithmetic_chain_of_thought_is_right():
    task = get_task("arithmetic", min_terms=3, max_terms=3, parentheses=1.0)
    for ex in task.examples("train", 50):
        expr = ex.question.removeprefix("Compute ").rstrip(".")
        assert eval(expr) == int(ex.answer)  # our own generated integer expression
        for line in ex.cot.splitlines():  # every step is a true equation
            lhs, rhs = line.split(" = ")
            assert eval(lhs) == int(rhs)
        assert ex.cot.splitlines()[-1].endswith(f"= {ex.answer}")


def test_messages_hold_format_instruction_and_question():
    task = get_task("arithmetic")
    ex = task.examples("test", 1)[0]
    msgs = task.messages(ex)
    assert msgs[0]["role"] == "system" and "Answer:" in msgs[0]["content"]
    assert msgs[-1] == {"role": "user", "content": ex.question}


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}} done", r"\frac{1}{2}"),
        ("<answer> 42 </answer>", "42"),
        ("work...\nAnswer: 7", "7"),
        ("The answer is: 9", "9"),
        ("#### 1,234", "1,234"),
        (r"Answer: 3 then \boxed{5}", "5"),  # the last one wins
        (r"\boxed{5} ... #### 6", "6"),
        ("<answer>1</answer> <answer>2</answer>", "2"),
        ("no answer here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_score_edge_cases():
    task = get_task("arithmetic")
    ex = task.examples("train", 1)[0]
    assert task.score("", ex).reward == 0.0
    assert not task.score("Answer: seven", ex).formatted
    assert task.score(f"Answer: {ex.answer}", ex).correct


def test_bad_task_name_and_option():
    with pytest.raises(
        SasrError, match="unknown task 'arithmetics' \\(did you mean 'arithmetic'\\?\\); valid: "
    ):
        get_task("arithmetics")
    with pytest.raises(
        SasrError, match="task 'arithmetic' has no option 'max_term' \\(did you mean 'max_terms'"
    ):
        get_task("arithmetic", max_term=3)
    with pytest.raises(SasrError, match="has no split .validation.; its splits: train, test, ood, near"):
        get_task("arithmetic").examples("validation", 1)


def _terms(question: str) -> list[int]:
    import re

    return [int(x) for x in re.findall(r"\d+", question)]


def test_arithmetic_ood_split_is_longer_larger_disjoint_and_deterministic():
    task = get_task("arithmetic")  # training: 2..4 numbers of 1..20
    train = task.examples("train", 500, seed=0)
    ood = task.examples("ood", 200, seed=0)
    assert ood == task.examples("ood", 200, seed=0) and ood != task.examples("ood", 200, seed=1)
    assert not {e.question for e in ood} & {e.question for e in train + task.examples("test", 200, seed=0)}
    assert max(len(_terms(e.question)) for e in train) == 4
    assert {len(_terms(e.question)) for e in ood} == {5}  # one more number than any training question
    assert max(max(_terms(e.question)) for e in train) <= 20 < max(max(_terms(e.question)) for e in ood) <= 40
    for ex in ood[:20]:  # still exact: the chain of thought evaluates to the answer
        assert eval(ex.question.removeprefix("Compute ").rstrip(".")) == int(ex.answer)
    assert task.held_out_splits == ("test", "ood", "near")


def test_arithmetic_near_split_shifts_only_the_operands_and_is_disjoint_and_deterministic():
    """near: the training number of numbers (2 to 4), each question holding at least one number above the
    training range (21..30 by default), so none is a training or test question."""
    task = get_task("arithmetic")
    train, test = task.examples("train", 2000, seed=0), task.examples("test", 200, seed=0)
    near = task.examples("near", 256, seed=0)
    assert len(near) == 256 and near == task.examples("near", 256, seed=0)
    assert near != task.examples("near", 256, seed=1)
    assert not {e.question for e in near} & {e.question for e in train + test}
    assert {len(_terms(e.question)) for e in near} == {len(_terms(e.question)) for e in train} == {2, 3, 4}
    assert all(20 < max(_terms(e.question)) <= 30 for e in near)
    assert min(min(_terms(e.question)) for e in near) == 1  # the rest from training's range too
    for ex in near[:50]:
        assert eval(ex.question.removeprefix("Compute ").rstrip(".")) == int(ex.answer)
    wider = get_task("arithmetic", near_value_scale=2).examples("near", 50)
    assert max(max(_terms(e.question)) for e in wider) > 30
    with pytest.raises(SasrError, match="near_value_scale .1.0. leaves no operand above max_value .20."):
        get_task("arithmetic", near_value_scale=1.0).examples("near", 5)
    assert len(get_task("arithmetic", near_value_scale=1.0).examples("train", 5)) == 5  # only near needs it


def test_knights_knaves_ood_split_has_more_people():
    task = get_task("knights-knaves", n_people=2)
    train, ood = task.examples("train", 20, seed=0), task.examples("ood", 10, seed=0)
    assert {len(e.metadata["names"]) for e in train} == {2}
    assert {len(e.metadata["names"]) for e in ood} == {3}
    assert ood == task.examples("ood", 10, seed=0)
    assert {
        len(e.metadata["names"])
        for e in get_task("knights-knaves", n_people=2, ood_n_people=4).examples("ood", 3)
    } == {4}
    with pytest.raises(SasrError, match="ood_n_people must be above n_people"):
        get_task("knights-knaves", n_people=3, ood_n_people=3)


def test_a_task_without_a_shifted_split_says_which_splits_it_has(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "1+1?", "solution": "1+1=2", "answer": "2"}\n')
    task = get_task(f"jsonl:{path}")
    assert task.held_out_splits == ("test",)
    with pytest.raises(SasrError, match=r"task 'jsonl' has no split 'ood'; its splits: train, test"):
        task.examples("ood", 1)
