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
    with pytest.raises(SasrError, match="unknown split"):
        get_task("arithmetic").examples("validation", 1)
