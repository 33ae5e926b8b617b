"""The collector on its own: a step's rows built from a real task, tokenizer and `tiny` model, without an
optimizer or a trainer."""

import dataclasses

import pytest
import torch
from accelerate import PartialState
from helpers import reward_module, tiny_config

from sasr import models
from sasr.batch import DEMO, ROLLOUT, Ask, Gather
from sasr.collect import Collector
from sasr.collect.examples import demonstration_source, training_examples
from sasr.collect.groups import rollout_stats
from sasr.config import validate
from sasr.errors import SasrError
from sasr.methods import get_method
from sasr.methods.luffy import OFFPOLICY
from sasr.methods.prefix_rft import PREFIXED
from sasr.methods.uft import hint
from sasr.rewards import Rewards
from sasr.rollout import stop_token_ids
from sasr.tasks import get_task


def collector(tmp_path, **top) -> tuple[Collector, object]:
    """The collector and the method a run of ``top`` would use, built from only what they need."""
    c = validate(tiny_config(tmp_path / "run", **top))
    task = get_task(c.task.name, **c.task.options())
    examples = task.examples("train", c.task.train_size, seed=c.seed)
    tokenizer, model = models.load_tokenizer("tiny"), models.load_model("tiny")
    method = get_method(c.method, **c.method_kwargs())
    demos = demonstration_source(c, task, examples, method)
    col = Collector(
        c,
        task,
        examples,
        demos,
        tokenizer,
        Rewards(task, c.reward_funcs, c.reward_weights),
        stop_token_ids(model, tokenizer),
        PartialState(cpu=True),
        lambda: models.decoding(model),
    )
    return col, method


def test_a_luffy_step_lays_each_demonstration_inside_its_group(tmp_path):
    """Per prompt, its rollouts then its demonstration, one prompt shared by the group, the demonstration's
    tokens those of the task's target; advantages over the whole group (mean-centred, not std-scaled)."""
    grpo = {"num_generations": 4, "max_completion_length": 96}  # room for the whole demonstration
    col, luffy = collector(tmp_path, method="luffy", grpo=grpo)
    plan = luffy.plan(1)
    got = col.collect(1, plan.gather)
    rows = got.rows
    assert rows.kind.tolist() == [ROLLOUT] * 3 + [OFFPOLICY] + [ROLLOUT] * 3 + [OFFPOLICY]
    assert rows.group.tolist() == [0] * 4 + [1] * 4
    assert rows.sampler_logprobs is not None and rows.truncated is not None  # built whole, with the rollouts
    for g in (0, 1):
        group = rows.prompt_ids[4 * g : 4 * g + 4]
        assert (group == group[0]).all()  # one prompt: the policy pass computes it once
        demo = rows.completion_ids[4 * g + 3][rows.completion_mask[4 * g + 3].bool()].tolist()
        assert col.tokenizer.decode(demo, skip_special_tokens=True) == rows.texts[4 * g + 3]
        assert rows.correct[4 * g + 3]  # the judge accepts the demonstration
        adv = rows.advantages[4 * g : 4 * g + 4]
        assert adv.sum().item() == pytest.approx(0.0, abs=1e-6)
        assert adv[3].item() == pytest.approx(
            rows.rewards[4 * g + 3].item() - rows.rewards[4 * g : 4 * g + 4].mean().item()
        )
    assert got.stats["accuracy"] == 0.0  # rollout statistics leave the demonstrations out
    assert got.stats["tokens"] == rows.completion_mask.sum().item()
    assert got.extra == {}  # the judge alone adds no columns (reward functions' log_extra would)


def test_an_hpt_step_adds_each_prompts_own_demonstration_after_the_groups(tmp_path):
    col, _ = collector(tmp_path, method="hpt")
    gather = Gather(prompts=2, rollouts=4, sources=(Ask("own_demonstrations"),))
    rows = col.collect(1, gather).rows
    assert rows.kind.tolist() == [ROLLOUT] * 8 + [DEMO] * 2
    assert rows.group.tolist() == [0] * 4 + [1] * 4 + [0, 1]
    assert rows.rewards[8:].tolist() == [0.0, 0.0]  # demonstrations are not scored


def test_sft_rows_come_from_the_demonstration_source_and_the_probe_draws_apart(tmp_path):
    col, _ = collector(tmp_path, method="sft", sft={"batch_size": 3})
    rows = col.collect(1, Gather(demos=3)).rows
    assert rows.kind.tolist() == [DEMO] * 3 and rows.group.tolist() == [-1] * 3
    assert rows.sampler_logprobs is None and rows.truncated is None  # demonstrations: nothing sampled or cut
    probe = col.probe_rows(1)
    assert len(probe) == 3 and probe.texts != rows.texts  # the same step, another draw


def test_rollout_stats_read_only_the_rollouts():
    from sasr.data import rows_of_kind

    ids, mask = torch.ones(3, 4, dtype=torch.long), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    cut = torch.tensor([False, True, True])  # the off-policy row's cut does not count
    rows = rows_of_kind(
        ids[:, :1], mask[:, :1], ids, mask, ["a", "b", "c"], ROLLOUT, [0, 0, 0], truncated=cut
    )
    rows = dataclasses.replace(rows, kind=torch.tensor([ROLLOUT, ROLLOUT, OFFPOLICY]))
    stats = rollout_stats(rows, torch.tensor([False]))
    assert stats["completion_length"] == 3.0 and stats["completion_length_max"] == 4
    assert stats["zero_spread_fraction"] == 1.0 and stats["clipped_ratio"] == 0.5


def test_scarce_demonstrations_are_the_same_few_for_every_method_and_seed(tmp_path):
    """demos.size=N: exactly N distinct demonstrations, the same for every method and seed, each one an RL
    prompt of every run; the RL prompts stay task.train_size, distinct."""

    seen = []
    for method in ("sft", "sasr", "chord", "luffy", "hpt", "relift"):
        for seed in (1, 2):
            c = validate(tiny_config(tmp_path / "run", method=method, seed=seed, demos={"size": 5}))
            task = get_task(c.task.name, **c.task.options())
            examples = training_examples(c, task)
            _, demos = demonstration_source(c, task, examples, get_method(c.method, **c.method_kwargs()))
            questions = [ex.question for ex in examples]
            assert len(examples) == c.task.train_size == len(set(questions))
            assert len(demos) == len({ex.question for ex in demos}) == 5
            assert all(any(ex is d for ex in examples) for d in demos)  # the RL prompts' own examples
            seen.append([ex.question for ex in demos])
    assert all(s == seen[0] for s in seen)
    # the seeds still draw different RL prompts besides them
    c1, c2 = (validate(tiny_config(tmp_path / "r", seed=s, demos={"size": 5})) for s in (1, 2))
    task = get_task("arithmetic")
    assert training_examples(c1, task)[5:] != training_examples(c2, task)[5:]
    with pytest.raises(SasrError, match="demos.size is 100, but task 'arithmetic' has only 64"):
        training_examples(validate(tiny_config(tmp_path / "r", demos={"size": 100})), task)


def scarce_collector(tmp_path, method: str, **top) -> tuple[Collector, object, list]:
    """A collector of a run with one demonstration (demos.size=1) and its step drawing ``[paired, alone]``."""

    c = validate(tiny_config(tmp_path / "run", method=method, demos={"size": 1}, **top))
    task = get_task(c.task.name, **c.task.options())
    examples = training_examples(c, task)
    tokenizer, model = models.load_tokenizer("tiny"), models.load_model("tiny")
    m = get_method(c.method, **c.method_kwargs())
    col = Collector(
        c,
        task,
        examples,
        demonstration_source(c, task, examples, m),
        tokenizer,
        Rewards(task, c.reward_funcs, c.reward_weights),
        stop_token_ids(model, tokenizer),
        PartialState(cpu=True),
        lambda: models.decoding(model),
    )
    assert [i for i in range(len(examples)) if col.has_demonstration(i)] == [0]
    col.draw = lambda step, n, kind, pool=None: [examples[0], examples[7]][:n]
    return col, m, examples


def test_a_luffy_prompt_without_a_demonstration_samples_its_whole_group(tmp_path):
    """With scarce demonstrations a group keeps num_generations rows: the paired prompt's rollouts then its
    demonstration, the other prompt's rollouts only; advantages within each group; the logged share of
    demonstrations is what the groups held."""
    col, luffy, _ = scarce_collector(tmp_path, "luffy")
    plan = luffy.plan(1)
    rows = col.collect(1, plan.gather).rows
    assert rows.kind.tolist() == [ROLLOUT] * 3 + [OFFPOLICY] + [ROLLOUT] * 4
    assert rows.group.tolist() == [0] * 4 + [1] * 4
    for g in (0, 1):
        assert (rows.prompt_ids[4 * g : 4 * g + 4] == rows.prompt_ids[4 * g]).all()
        assert rows.advantages[4 * g : 4 * g + 4].sum().item() == pytest.approx(0.0, abs=1e-6)
    assert rows.sampler_logprobs[rows.kind == ROLLOUT].ne(0).any()
    _, route = luffy.parts(plan, rows)
    assert route["offpolicy_share"] == 1 / 8


def test_an_hpt_prompt_without_a_demonstration_is_never_routed_to_sft(tmp_path):
    """HPT gets a DEMO row only for the prompt that has one; the other stays RL however badly it is solved."""
    col, hpt, _ = scarce_collector(tmp_path, "hpt")
    plan = hpt.plan(1)
    rows = col.collect(1, plan.gather).rows
    assert rows.kind.tolist() == [ROLLOUT] * 8 + [DEMO] and rows.group.tolist()[-1] == 0
    rows = dataclasses.replace(rows, correct=torch.zeros_like(rows.correct))  # both groups unsolved
    parts, route = hpt.parts(plan, rows)
    sft, rl = parts
    assert sft.rows.tolist() == [False] * 8 + [True]  # the paired prompt: SFT on its demonstration
    assert rl.rows.tolist() == [False] * 4 + [True] * 4 + [False]  # the other: RL on its rollouts
    assert route["sft_fraction"] == 0.5


def test_uft_hints_are_the_start_of_each_prompts_demonstration_on_a_schedule(tmp_path):
    """UFT: p(t) = 0.05 + 0.45 (1 + cos(pi t / hint_steps)), then 0; a prompt's hint is its demonstration's
    first k solution steps (lines) of at most 5 chunks, k ~ Binomial(chunks, p(t)) drawn from (seed, step,
    prompt) alone; the rollouts continue the prompt + hint (sampler log-probs for the sampled tokens only) and
    are judged with the hint before them; one DEMO row per hinted prompt carries exactly the hint's tokens (no
    EOS) for the NLL part; R3 draws k uniformly at every step and trains no NLL; hint_unit: token cuts the
    demonstration's tokens into equal parts instead."""
    col, uft = collector(tmp_path, method="uft", steps=10, uft={"hint_steps": 5})
    assert [round(uft.plan(t).info["uft_hint_p"], 4) for t in (1, 5, 6)] == [0.8641, 0.05, 0.0]
    plan = uft.plan(1)
    hints = plan.gather.extend_prompts.args
    assert hints["train"] and hints["unit"] == "step" and plan.phase == "mixed"
    assert uft.plan(6).gather.extend_prompts is None
    ex = col.examples[3]
    lines = col.task.target(ex).splitlines(keepends=True)
    steps = [
        col.tokenizer("".join(lines[:k]), add_special_tokens=False)["input_ids"]
        for k in range(len(lines) + 1)
    ]
    draws = [hint(col, step, ex, **hints) for step in range(1, 41)]
    assert all(h in steps for h in draws) and hint(col, 7, ex, **hints) == draws[6]  # whole steps; pure
    assert sum(len(h) for h in draws) / (40 * len(steps[-1])) > 0.6  # about p = 0.86 of the steps
    low = {**hints, "p": 0.05}
    assert sum(len(hint(col, s, ex, **low)) for s in range(1, 41)) / (40 * len(steps[-1])) < 0.2

    got = col.collect(1, plan.gather)
    rows, examples = got.rows, [col.examples[i] for i in got.prompts]
    shown = [hint(col, 1, e, **hints) for e in examples]
    on = rows.kind == ROLLOUT
    for g, h in enumerate(shown):  # each rollout's prompt ends with its prompt's hint
        prompt = rows.prompt_ids[on & (rows.group == g)][0]
        assert prompt[prompt != col.tokenizer.pad_token_id].tolist()[-len(h) :] == h or not h
    demo = rows.kind == DEMO
    assert demo.sum() == sum(1 for h in shown if h)
    for row in demo.nonzero().squeeze(1).tolist():
        target = rows.completion_ids[row][rows.completion_mask[row].bool()].tolist()
        assert target == shown[rows.group[row]]  # the hint itself, no EOS
    parts, _ = uft.parts(plan, rows)
    assert [(p.name, p.loss, p.weight) for p in parts] == [("rl", "pg", 1.0), ("hint", "nll", 0.001)]
    assert parts[0].options["loss_type"] == "bnpo"
    full = [len(col.tokenizer(col.task.target(e), add_special_tokens=False)["input_ids"]) for e in examples]
    assert got.stats["uft_hint_share"] == pytest.approx(sum(len(h) / n for h, n in zip(shown, full)) / 2)

    col, r3 = collector(tmp_path, method="uft", steps=10, uft={"variant": "r3"})
    plan = r3.plan(9)  # R3 shows hints at every step, past hint_steps too
    hints = plan.gather.extend_prompts.args
    assert hints["uniform"] and not hints["train"] and plan.phase == "grpo" and "uft_hint_p" not in plan.info
    assert not (col.collect(9, plan.gather).rows.kind == DEMO).any()
    ex = col.examples[3]  # the same example, of this run
    lengths = {len(hint(col, s, ex, **hints)) for s in range(1, 80)}
    assert lengths == {len(h) for h in steps}  # every number of steps, none to all

    ids = steps[-1]
    bounds = [round(j / 5 * len(ids)) for j in range(6)]
    by_token = {**hints, "unit": "token"}
    assert {len(hint(col, s, ex, **by_token)) for s in range(1, 80)} == set(bounds)


SEEN = """
def seen(completions, log_extra, **kw):
    log_extra("seen", [c[0]["content"] for c in completions])
    return [0.0] * len(completions)
"""


def test_a_shown_hint_is_judged_with_the_completion(tmp_path):
    """A prompt extension marked judged (UFT's hint) is read by the judge and the reward functions before
    the completion, as UFT's reward reads the prompt's hint with the response."""
    module = reward_module(tmp_path, SEEN, "seen")
    col, uft = collector(tmp_path, method="uft", steps=10, reward_funcs=[f"{module}:seen", "task"])
    plan = uft.plan(1)
    got = col.collect(1, plan.gather)
    examples = [col.examples[i] for i in got.prompts]
    shown = [col.tokenizer.decode(hint(col, 1, ex, **plan.gather.extend_prompts.args)) for ex in examples]
    on = (got.rows.kind == ROLLOUT).nonzero().squeeze(1).tolist()
    assert any(shown) and len(got.extra["seen"]) == len(on)
    for j, i in enumerate(on):
        assert got.extra["seen"][j] == shown[got.rows.group[i]] + got.rows.texts[i]


PARITY = """
def parity(prompts, completions, **kw):
    return [float(len(c[0]["content"]) % 2) for c in completions]
"""


def test_a_prefix_rft_group_continues_the_start_of_its_demonstration(tmp_path):
    """Per prompt: its G - n rollouts, then n = G/2 rows that start with the first int(l x L) of its
    demonstration's L tokens (exactly those tokens, marked as given, with no sampler log-prob) and go on with what
    the policy sampled after them (up to max_completion_length, as a rollout); judged on the whole; advantages
    within each (prompt, prefix) subgroup, the prefix tokens' (advantage - the rollouts' mean) / n; only the
    sampled tokens count as generated. A prompt without a demonstration samples its whole group."""
    grpo = {"num_generations": 4, "max_completion_length": 48}
    parity = reward_module(tmp_path, PARITY, "parity")  # rewards that differ, so the centring shows
    col, m = collector(tmp_path, method="prefix-rft", grpo=grpo, steps=10, reward_funcs=[f"{parity}:parity"])
    plan = m.plan(1)
    got = col.collect(1, plan.gather)
    rows = got.rows
    assert rows.kind.tolist() == ([ROLLOUT] * 2 + [PREFIXED] * 2) * 2
    examples = [col.examples[i] for i in got.prompts]
    for g, ex in enumerate(examples):
        assert (rows.prompt_ids[4 * g : 4 * g + 4] == rows.prompt_ids[4 * g]).all()  # one prompt per group
        ids = col.tokenizer(col.task.target(ex), add_special_tokens=False)["input_ids"]
        m_ = int(0.95 * len(ids))
        on, pre = rows.rewards[4 * g : 4 * g + 2], rows.rewards[4 * g + 2 : 4 * g + 4]
        for row in (4 * g + 2, 4 * g + 3):
            completion = rows.completion_ids[row][rows.completion_mask[row].bool()].tolist()
            assert completion[:m_] == ids[:m_] and rows.given[row].sum() == m_
            assert rows.given[row, :m_].all() and not rows.given[rows.kind == ROLLOUT].any()
            assert m_ < len(completion) <= m_ + 48  # then up to max_completion_length sampled, as a rollout
            assert (rows.sampler_logprobs[row, :m_] == 0).all() and rows.sampler_logprobs[row, m_:][
                rows.completion_mask[row, m_:].bool()
            ].ne(0).all()
            assert rows.texts[row] == col.tokenizer.decode(completion, skip_special_tokens=True)
            centred = rows.rewards[row] - pre.mean()
            assert rows.advantages[row].item() == pytest.approx(centred.item(), abs=1e-6)
            assert rows.extras["prefix_advantages"][row].item() == pytest.approx(
                (centred - on.mean()).item() / 2, abs=1e-6
            )
        assert rows.advantages[4 * g : 4 * g + 2].tolist() == pytest.approx(
            (on - on.mean()).tolist(), abs=1e-6
        )
    assert rows.rewards.unique().numel() > 1
    assert got.stats["generated_tokens"] == rows.sampled().sum().item() < rows.completion_mask.sum().item()
    assert got.stats["accuracy"] == rows.correct[rows.kind == ROLLOUT].float().mean().item()

    col, m, examples = scarce_collector(tmp_path, "prefix-rft")
    rows = col.collect(1, m.plan(1).gather).rows
    assert rows.kind.tolist() == [ROLLOUT] * 2 + [PREFIXED] * 2 + [ROLLOUT] * 4
    _, stats = m.parts(m.plan(1), rows)
    assert stats["prefix_share"] == 2 / 8
    col.draw = lambda step, n, kind, pool=None: [examples[7], examples[8]][:n]  # no demonstration at all
    rows = col.collect(2, m.plan(2).gather).rows
    assert rows.kind.tolist() == [ROLLOUT] * 8 and rows.given is None
    assert "prefix_accuracy" not in m.parts(m.plan(2), rows)[1]
