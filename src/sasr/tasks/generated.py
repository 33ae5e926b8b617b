"""Tasks generated locally by `reasoning-gym`: `knights-knaves` and `gsm-symbolic`.

Both draw puzzles from reasoning-gym's generators and keep those whose question hashes into the requested
split, so any number of examples can be drawn and train and test never share a question.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from sasr.errors import SasrError
from sasr.tasks.base import Example, Score, Task, extract_answer, split_of
from sasr.tasks.judges import NumericAnswer

TEST_FRACTION = 0.5  # the question space is unbounded: an even split keeps generation cheap for both


def _draw(dataset_name: str, split: str, n: int, seed: int, **config: Any) -> list[dict]:
    """n distinct reasoning-gym items whose questions fall in ``split``."""
    import reasoning_gym

    batch = max(4 * n, 16)
    out, seen = [], set()
    for round_ in range(50):
        ds = reasoning_gym.create_dataset(
            dataset_name, size=batch, seed=seed * 7919 + round_ * 104729, **config
        )
        for item in ds:
            q = item["question"]
            if q not in seen and split_of(q, TEST_FRACTION) == split:
                seen.add(q)
                out.append(item)
                if len(out) == n:
                    return out
    raise SasrError(
        f"{dataset_name}: could only generate {len(out)} distinct '{split}' examples of {n} asked"
    )


# --- knights and knaves -----------------------------------------------------------------------------------

Statement = (
    tuple  # reasoning-gym's nested tuples: ('telling-truth', i), ('lying', i), ('not', s), ('and', ...)
)


def holds(s: Statement, assign: tuple[bool, ...]) -> bool:
    """Our own evaluator of a statement under an assignment (True = truth-teller)."""
    op = s[0]
    if op == "telling-truth":
        return assign[s[1]]
    if op == "lying":
        return not assign[s[1]]
    if op == "not":
        return not holds(s[1], assign)
    if op == "and":
        return all(holds(x, assign) for x in s[1:])
    if op == "or":
        return any(holds(x, assign) for x in s[1:])
    if op == "->":
        return (not holds(s[1], assign)) or holds(s[2], assign)
    if op == "<=>":
        return holds(s[1], assign) == holds(s[2], assign)
    raise ValueError(f"unknown statement operator {op!r}")


def people_in(s: Statement) -> set[int]:
    if s[0] in ("telling-truth", "lying"):
        return {s[1]}
    return set().union(*(people_in(x) for x in s[1:]))


def brute_force(statements: list[Statement]) -> list[tuple[bool, ...]]:
    """Every assignment under which each person's statement is true iff that person tells the truth."""
    n = len(statements)
    return [
        a
        for a in itertools.product([True, False], repeat=n)
        if all(holds(statements[i], a) == a[i] for i in range(n))
    ]


def render(s: Statement, names: list[str], terms: dict[str, str], top: bool = True) -> str:
    op = s[0]
    if op in ("telling-truth", "lying"):
        return f"{names[s[1]]} is {terms['a_knight'] if op == 'telling-truth' else terms['a_knave']}"
    inner = [render(x, names, terms, top=False) for x in s[1:]]
    if op == "not":
        text = f"it is not true that {inner[0]}"
    elif op in ("and", "or"):
        text = f" {op} ".join(inner)
    elif op == "->":
        text = f"if {inner[0]} then {inner[1]}"
    else:
        text = f"{inner[0]} if and only if {inner[1]}"
    return text if top else f"({text})"


def write_cot(
    statements: list[Statement], names: list[str], terms: dict[str, str]
) -> tuple[str, tuple[bool, ...]]:
    """A depth-first case analysis over the people in order, pruning an assumption as soon as a statement
    whose speaker and subjects are all decided contradicts it. Returns the text and the assignment found."""
    n = len(names)

    def role(knight: bool) -> str:
        return terms["a_knight"] if knight else terms["a_knave"]

    lines = [f"{names[i]} says: {render(statements[i], names, terms)}." for i in range(n)]
    lines.append(
        f"A {terms['knight']} tells the truth and a {terms['knave']} lies, "
        "so each statement is true exactly when its speaker tells the truth. Try the cases in order."
    )
    need = [people_in(s) | {i} for i, s in enumerate(statements)]

    def violation(partial: list[bool]) -> int | None:
        decided = set(range(len(partial)))
        for i in range(n):
            if need[i] <= decided and not need[i] <= set(range(len(partial) - 1)):  # newly checkable
                padded = tuple(partial) + (True,) * (n - len(partial))
                if holds(statements[i], padded) != partial[i]:
                    return i
        return None

    def search(partial: list[bool]) -> tuple[bool, ...] | None:
        if len(partial) == n:
            return tuple(partial)
        for value in (True, False):
            trial = [*partial, value]
            bad = violation(trial)
            case = ", ".join(f"{names[j]} is {role(trial[j])}" for j in range(len(trial)))
            if bad is not None:
                truth = holds(statements[bad], tuple(trial) + (True,) * (n - len(trial)))
                lines.append(
                    f"Suppose {case}. Then {names[bad]}'s statement is {'true' if truth else 'false'}, "
                    f"but {names[bad]} would be {role(trial[bad])}: contradiction."
                )
                continue
            found = search(trial)
            if found is not None:
                return found
        return None

    solution = search([])
    assert solution is not None, "a puzzle with a unique solution always has one"
    case = ", ".join(f"{names[j]} is {role(solution[j])}" for j in range(n))
    lines.append(f"Suppose {case}. Every statement is consistent with this, so it is the solution.")
    return "\n".join(lines), solution


class KnightsKnaves(Task):
    name = "knights-knaves"
    description = "Knights-and-Knaves logic puzzles (reasoning-gym), Logic-RL-style reward"
    options = {
        "n_people": 3,  # 2..8
        "depth_constraint": 2,
        "width_constraint": 2,
        "format_reward": 1.0,  # Logic-RL: +1 well-formed, -1 not
        "format_penalty": -1.0,
        "answer_reward": 2.0,  # +2 every person right
        "wrong_answer_penalty": -1.5,  # parsed, but someone wrong
        "unparsable_penalty": -2.0,  # no answer that names everyone
        "ood_n_people": 0,  # people per puzzle of the ood split; 0: n_people + 1
    }
    splits = ("train", "test", "ood")
    shifts = {"ood": "puzzles with more people than any training puzzle"}
    system_prompt = (
        "Reason inside <think> </think>, then give the answer inside <answer> </answer> as "
        "'NAME is a ROLE' for every person, separated by commas."
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if not 2 <= int(self.opts["n_people"]) <= 8:
            raise SasrError(
                f"task 'knights-knaves' option n_people must be 2..8, got {self.opts['n_people']}"
            )
        ood = self.ood_people
        if not self.opts["ood_n_people"] and ood > 8:  # 8 people: nothing larger to shift to
            self.splits = ("train", "test")
        elif not int(self.opts["n_people"]) < ood <= 8:
            raise SasrError(
                f"task 'knights-knaves' option ood_n_people must be above n_people and at most 8, got {ood}"
            )

    @property
    def ood_people(self) -> int:
        return int(self.opts["ood_n_people"]) or int(self.opts["n_people"]) + 1

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        self.check_split(split)
        o = self.opts
        items = _draw(  # ood: more people than any training puzzle, drawn from the test half of the hash
            "knights_knaves",
            "test" if split == "ood" else split,
            n,
            seed,
            n_people=self.ood_people if split == "ood" else int(o["n_people"]),
            depth_constraint=int(o["depth_constraint"]),
            width_constraint=int(o["width_constraint"]),
        )
        out = []
        for item in items:
            md = item["metadata"]
            statements = [_as_tuple(s) for s in md["statements"]]
            cot, _ = write_cot(statements, md["names"], md["knight_knave_terms"])
            meta = {
                "names": md["names"],
                "solution": list(md["solution"]),
                "terms": md["knight_knave_terms"],
                "statements": statements,
            }
            out.append(Example(item["question"], cot, item["answer"], meta))
        return out

    def target(self, example: Example) -> str:
        return f"<think>\n{example.cot}\n</think>\n<answer>{example.answer}</answer>"

    def parse(self, answer: str, example: Example) -> list[bool] | None:
        """The role of every person named in the answer, in any order and capitalisation, or None."""
        terms = example.metadata["terms"]
        knight, knave = terms["knight"].lower(), terms["knave"].lower()
        roles = []
        for name in example.metadata["names"]:
            said = re.findall(rf"\b{re.escape(name)}\s+is\s+(?:a|an)\s+(\w+)", answer, re.I)
            said = {w.lower() for w in said} & {knight, knave}
            if len(said) != 1:
                return None
            roles.append(said.pop() == knight)
        return roles

    def score(self, completion: str, example: Example) -> Score:
        o = self.opts
        tags_ok = completion.count("<answer>") == 1 and completion.count("</answer>") == 1
        if "<think>" in completion:
            tags_ok = (
                tags_ok
                and completion.count("</think>") == 1
                and completion.index("</think>") < completion.index("<answer>")
            )
        got = extract_answer(completion) if tags_ok else None
        roles = self.parse(got, example) if got is not None else None
        formatted = tags_ok and roles is not None
        correct = roles is not None and roles == example.metadata["solution"]
        if roles is None:
            answer_part = o["unparsable_penalty"]
        else:
            answer_part = o["answer_reward"] if correct else o["wrong_answer_penalty"]
        reward = (o["format_reward"] if formatted else o["format_penalty"]) + answer_part
        return Score(float(reward), correct, formatted)


def _as_tuple(s: Any) -> Statement:
    return tuple(_as_tuple(x) if isinstance(x, (list, tuple)) else x for x in s)


# --- GSM-symbolic -----------------------------------------------------------------------------------------


class GSMSymbolic(NumericAnswer, Task):
    name = "gsm-symbolic"
    description = "GSM-symbolic word problems (reasoning-gym); its answer_cot is the chain of thought"
    options = {"correct_reward": 1.0, "format_reward": 0.1}
    system_prompt = "Solve the problem step by step. End with 'Answer: <number>'."

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        self.check_split(split)
        out = []
        for item in _draw("gsm_symbolic", split, n, seed):
            cot = item["metadata"]["answer_cot"].strip()
            cot = re.sub(r"\n?####[^\n]*$", "", cot).strip()
            out.append(Example(item["question"], cot, str(item["answer"]).strip()))
        return out
