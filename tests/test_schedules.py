import json

import pytest

from sasr.errors import SasrError
from sasr.schedules import Decision, get_schedule


def drive(schedule, steps, norms):
    """Run a schedule with a given gradient norm per step; returns the decisions."""
    out = []
    for step in range(1, steps + 1):
        d = schedule.decide(step)
        schedule.observe(d, norms(step))
        out.append(d)
    return out


def test_sasr_rule_unit():
    s = get_schedule("sasr", steps=200, warmup_steps=3, seed=7, gamma=2.0)
    decisions = drive(s, 200, lambda step: 1.0 + step / 10)
    assert [d.phase for d in decisions[:3]] == ["sft"] * 3
    g_warmup = 1.3  # the norm observed at step 3, the last warm-up step
    g_last = g_warmup
    for d in decisions[3:]:
        p = g_last / (g_last + 2.0 * g_warmup)
        assert d.info["p_t"] == pytest.approx(p)
        assert d.info["g_last"] == pytest.approx(g_last)
        assert d.info["g_warmup"] == pytest.approx(g_warmup)
        assert (d.phase == "sft") == (d.info["alpha"] < p)
        if d.phase == "sft":
            g_last = 1.0 + d.step / 10
    assert decisions[3].info["p_t"] == pytest.approx(1 / 3)  # p_1 = 1 / (1 + gamma)
    assert {d.phase for d in decisions[3:]} == {"sft", "grpo"}


def test_sasr_responds_to_drift():
    """A growing SFT gradient (drift) raises p_t; a shrinking one lowers it."""
    drift = get_schedule("sasr", steps=300, warmup_steps=1, seed=0)
    rising = drive(drift, 300, lambda step: float(step))
    calm = get_schedule("sasr", steps=300, warmup_steps=1, seed=0)
    falling = drive(calm, 300, lambda step: 1.0 / step)
    assert sum(d.phase == "sft" for d in rising) > 2 * sum(d.phase == "sft" for d in falling)


def test_same_seed_same_branches_and_state_roundtrip():
    a = [d.phase for d in drive(get_schedule("sasr", steps=50, warmup_steps=2, seed=3), 50, lambda s: 1.0)]
    b = [d.phase for d in drive(get_schedule("sasr", steps=50, warmup_steps=2, seed=3), 50, lambda s: 1.0)]
    c = [d.phase for d in drive(get_schedule("sasr", steps=50, warmup_steps=2, seed=4), 50, lambda s: 1.0)]
    assert a == b and a != c
    s = get_schedule("sasr", steps=50, warmup_steps=2, seed=3)
    first = drive(s, 20, lambda st: 1.0)
    state = json.loads(json.dumps(s.state_dict()))  # must survive JSON
    t = get_schedule("sasr", steps=50, warmup_steps=2, seed=99)
    t.load_state_dict(state)
    rest = [t.decide(step) for step in range(21, 51)]
    for d in rest:
        t.observe(d, 1.0)
    assert [d.phase for d in first + rest] == a


def test_static_schedules():
    assert {d.phase for d in drive(get_schedule("sft", steps=5), 5, lambda s: 1.0)} == {"sft"}
    assert {d.phase for d in drive(get_schedule("grpo", steps=5, warmup_steps=3), 5, lambda s: 1.0)} == {
        "grpo"
    }
    two = drive(get_schedule("sft-then-grpo", steps=6, warmup_steps=2), 6, lambda s: 1.0)
    assert [d.phase for d in two] == ["sft", "sft", "grpo", "grpo", "grpo", "grpo"]
    period = drive(get_schedule("interleave", steps=8, warmup_steps=2, interleave_period=3), 8, lambda s: 1.0)
    assert [d.phase for d in period] == ["sft", "sft", "grpo", "grpo", "sft", "grpo", "grpo", "sft"]
    prob = drive(
        get_schedule("interleave", steps=2000, warmup_steps=0, interleave_prob=0.25), 2000, lambda s: 1.0
    )
    assert 0.2 < sum(d.phase == "sft" for d in prob) / 2000 < 0.3
    assert all((d.phase == "sft") == (d.info["alpha"] < 0.25) for d in prob)


def test_unknown_method():
    with pytest.raises(
        SasrError, match="unknown method 'sarsa'.*valid: grpo, interleave, sasr, sft, sft-then-grpo"
    ):
        get_schedule("sarsa", steps=1)


def test_counts():
    s = get_schedule("sasr", steps=10, warmup_steps=2, seed=1)
    ds = drive(s, 10, lambda st: 1.0)
    assert s.counts["sft"] == sum(d.phase == "sft" for d in ds)
    assert s.counts["grpo"] == 10 - s.counts["sft"]
    assert isinstance(ds[0], Decision)
