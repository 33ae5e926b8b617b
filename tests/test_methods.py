import json
import math
import re

import pytest
import torch

from sasr.batch import DEMO, ROLLOUT, Apply, Gather, Plan, Rows, cat_rows
from sasr.errors import SasrError
from sasr.losses import PartInputs, nll_part, pg_part
from sasr.methods import METHODS, get_method
from sasr.methods.chord import chord_mu, phi
from sasr.methods.luffy import OFFPOLICY, luffy_pg, srft_entropy_weight, srft_pg
from sasr.methods.prefix_rft import PREFIXED


def drive(method, steps, norms):
    """Run a method's plans with a given gradient norm per step; returns the plans."""
    out = []
    for step in range(1, steps + 1):
        d = method.plan(step)
        method.observe(d, norms(step))
        out.append(d)
    return out


def test_sasr_rule_unit():
    s = get_method("sasr", steps=200, warmup_steps=3, seed=7, gamma=2.0)
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
    drift = get_method("sasr", steps=300, warmup_steps=1, seed=0)
    rising = drive(drift, 300, lambda step: float(step))
    calm = get_method("sasr", steps=300, warmup_steps=1, seed=0)
    falling = drive(calm, 300, lambda step: 1.0 / step)
    assert sum(d.phase == "sft" for d in rising) > 2 * sum(d.phase == "sft" for d in falling)


def test_same_seed_same_branches_and_state_roundtrip():
    a = [d.phase for d in drive(get_method("sasr", steps=50, warmup_steps=2, seed=3), 50, lambda s: 1.0)]
    b = [d.phase for d in drive(get_method("sasr", steps=50, warmup_steps=2, seed=3), 50, lambda s: 1.0)]
    c = [d.phase for d in drive(get_method("sasr", steps=50, warmup_steps=2, seed=4), 50, lambda s: 1.0)]
    assert a == b and a != c
    s = get_method("sasr", steps=50, warmup_steps=2, seed=3)
    first = drive(s, 20, lambda st: 1.0)
    state = json.loads(json.dumps(s.state_dict()))  # must survive JSON
    t = get_method("sasr", steps=50, warmup_steps=2, seed=99)
    t.load_state_dict(state)
    rest = [t.plan(step) for step in range(21, 51)]
    for d in rest:
        t.observe(d, 1.0)
    assert [d.phase for d in first + rest] == a


def test_static_methods():
    assert {d.phase for d in drive(get_method("sft", steps=5), 5, lambda s: 1.0)} == {"sft"}
    assert {d.phase for d in drive(get_method("grpo", steps=5, warmup_steps=3), 5, lambda s: 1.0)} == {"grpo"}
    two = drive(get_method("sft-then-grpo", steps=6, warmup_steps=2), 6, lambda s: 1.0)
    assert [d.phase for d in two] == ["sft", "sft", "grpo", "grpo", "grpo", "grpo"]
    period = drive(get_method("interleave", steps=8, warmup_steps=2, period=3), 8, lambda s: 1.0)
    assert [d.phase for d in period] == ["sft", "sft", "grpo", "grpo", "sft", "grpo", "grpo", "sft"]
    prob = drive(get_method("interleave", steps=2000, warmup_steps=0, prob=0.25), 2000, lambda s: 1.0)
    assert 0.2 < sum(d.phase == "sft" for d in prob) / 2000 < 0.3
    assert all((d.phase == "sft") == (d.info["alpha"] < 0.25) for d in prob)


def test_unknown_method():
    with pytest.raises(
        SasrError,
        match="unknown method 'sarsa'.*valid: " + re.escape(", ".join(sorted(METHODS))),
    ):
        get_method("sarsa", steps=1)


def test_counts():
    s = get_method("sasr", steps=10, warmup_steps=2, seed=1)
    ds = drive(s, 10, lambda st: 1.0)
    assert s.counts["sft"] == sum(d.phase == "sft" for d in ds)
    assert s.counts["grpo"] == 10 - s.counts["sft"]
    assert isinstance(ds[0], Plan)


# --- the step interface: every method in the registry -------------------------------------------------------


PG = {
    "beta": 0.0,
    "epsilon": 0.2,
    "epsilon_high": None,
    "loss_type": "dapo",
    "max_completion_length": 4,
    "use_bias_correction_kl": False,
}


GROUP_KINDS = {"demonstration_in_group": OFFPOLICY, "demonstration_prefixes": PREFIXED}


def rows_for(plan: Plan, seed: int, T: int = 3) -> Rows:
    """Rows laid out as the collector lays them out for ``plan``, with random correctness (a rank's content)."""
    g, gather = torch.Generator().manual_seed(seed), plan.gather
    kinds, groups = [DEMO] * gather.demos, [-1] * gather.demos
    added = GROUP_KINDS[gather.extend_groups.name] if gather.extend_groups else ROLLOUT
    for i in range(gather.prompts):
        kinds += [ROLLOUT] * gather.rollouts + [added] * gather.group_rows
        groups += [i] * (gather.rollouts + gather.group_rows)
    if any(ask.name == "own_demonstrations" for ask in gather.sources):
        kinds += [DEMO] * gather.prompts
        groups += list(range(gather.prompts))
    B = len(kinds)
    kind = torch.tensor(kinds)
    correct = (torch.rand(B, generator=g) < 0.4) | (kind == OFFPOLICY)
    return Rows(
        torch.ones(B, 2, dtype=torch.long),
        torch.ones(B, 2, dtype=torch.long),
        torch.ones(B, T, dtype=torch.long),
        torch.ones(B, T, dtype=torch.long),
        kind=kind,
        group=torch.tensor(groups),
        rewards=correct.float(),
        advantages=correct.float() - 0.5,
        correct=correct,
        formatted=correct,
    )


def shape(parts):
    return [(p.name, p.loss, sorted(p.options)) for p in parts]


@pytest.mark.parametrize("name", list(METHODS))
def test_contract_same_seed_same_plans_ranks_same_parts_state_roundtrip(name):
    """One contract for every registered method: same seed, same plans and metrics; the plan and the kinds of
    parts do not depend on a rank's data; the state survives a checkpoint (JSON) and continues identically."""
    budget = {
        "steps": 30,
        "warmup_steps": 3,
        "seed": 5,
        "demos_per_step": 3,
        "prompts_per_step": 2,
        "group_size": 4,
    }

    def run(method, steps, start=1):
        out = []
        for step in range(start, start + steps):
            plan = method.plan(step)
            parts0, stats0 = method.parts(plan, rows_for(plan, seed=step))  # rank 0's data
            parts1, stats1 = method.parts(plan, rows_for(plan, seed=1000 + step))  # rank 1's data
            assert shape(parts0) == shape(parts1) and stats0.keys() == stats1.keys()
            assert plan.phase in ("sft", "grpo", "mixed")
            method.observe(plan, 1.0 + step / 10, 2.0 if plan.gather.probe else None)
            out.append((plan.phase, plan.info, shape(parts0), stats0))
        return out

    a, b = run(METHODS[name](**budget), 30), run(METHODS[name](**budget), 30)
    assert a == b
    m = METHODS[name](**budget)
    first = run(m, 12)
    state = json.loads(json.dumps(m.state_dict()))
    other = METHODS[name](**{**budget, "seed": 99})
    other.load_state_dict(state)
    assert first + run(other, 18, start=13) == a
    assert sum(other.counts.values()) == 30


def test_chord_mu_schedule_at_chosen_steps():
    # t steps done; linear 0 -> peak over warm-up, cosine peak -> valley over decay, then valley
    assert chord_mu(0, 0.9, 0.05, 0, 200) == pytest.approx(0.9)
    assert chord_mu(100, 0.9, 0.05, 0, 200) == pytest.approx(0.05 + 0.85 * 0.5)  # cos(pi / 2) = 0
    assert chord_mu(200, 0.9, 0.05, 0, 200) == pytest.approx(0.05)
    assert chord_mu(500, 0.9, 0.05, 0, 200) == pytest.approx(0.05)
    assert chord_mu(5, 0.5, 0.02, 10, 40) == pytest.approx(0.25)  # half-way up the warm-up
    assert chord_mu(20, 0.5, 0.02, 10, 40) == pytest.approx(0.02 + 0.48 * 0.5 * (1 + math.cos(math.pi / 4)))
    chord = get_method("chord", steps=10, mu_decay_steps=4)
    assert [round(chord.plan(s).info["mu"], 6) for s in (1, 3, 5, 9)] == [0.9, 0.475, 0.05, 0.05]
    chord_phi = get_method("chord", steps=10, variant="phi")
    plan = chord_phi.plan(7)
    parts, _ = chord_phi.parts(plan, rows_for(plan, 0))
    assert plan.info["mu"] == 0.1 and [(p.name, p.weight) for p in parts] == [("sft", 0.1), ("grpo", 0.9)]
    assert parts[0].options == {"reweight": phi} and parts[1].options["beta"] == 0.0


def part_inputs(logps, mask=None, adv=(0.0,), off=(False,), correct=(False,), entropy=None):
    logps = torch.tensor(logps, requires_grad=True)
    return logps, PartInputs(
        logps,
        torch.ones_like(logps) if mask is None else torch.tensor(mask),
        entropy,
        None,
        torch.tensor(adv),
        torch.tensor([OFFPOLICY if o else ROLLOUT for o in off]),
        torch.tensor(correct),
    )


def test_chord_phi_weights_tokens_by_p_times_one_minus_p():
    lp = [[math.log(0.5), math.log(0.9), math.log(0.01)]]
    logps, x = part_inputs(lp)
    out = nll_part(x, reweight=phi)
    w = [0.25, 0.09, 0.0099]  # p (1 - p)
    assert out.loss.item() == pytest.approx(-sum(wi * li for wi, li in zip(w, lp[0])) / 3, rel=1e-5)
    out.loss.backward()
    assert logps.grad[0].tolist() == pytest.approx(
        [-wi / 3 for wi in w], rel=1e-5
    )  # the weight is stop-gradient


def test_hpt_routes_unsolved_prompts_to_sft_and_solved_ones_to_rl():
    hpt = get_method("hpt", steps=5, prompts_per_step=3, group_size=4, gate=0.25)
    plan = hpt.plan(1)
    rows = rows_for(plan, 0)
    # prompt 0: 2 of 4 correct (RL); prompt 1: 1 of 4 (0.25 <= gate: SFT); prompt 2: none (SFT)
    rows.correct = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    parts, stats = hpt.parts(plan, rows)
    sft, rl = parts
    assert (sft.name, sft.loss, rl.name, rl.loss) == ("sft", "nll", "rl", "pg")
    assert rl.rows.nonzero().squeeze(1).tolist() == [0, 1, 2, 3]  # prompt 0's rollouts
    assert sft.rows.nonzero().squeeze(1).tolist() == [13, 14]  # the demonstrations of prompts 1 and 2
    assert stats == {"sft_fraction": pytest.approx(2 / 3)}
    assert rl.options == {"beta": 0.0, "loss_type": "dr_grpo"} and plan.gather.scale_rewards == "none"


def test_luffy_offpolicy_term_is_shaped_unclipped_and_its_gradient():
    p_off, gamma, a_off, a_on = 0.3, 0.1, 0.75, -0.25
    logps, x = part_inputs(
        [[math.log(p_off), math.log(p_off)], [math.log(0.6), math.log(0.6)]],
        adv=(a_off, a_on),
        off=(True, False),
        correct=(True, False),
    )
    out = luffy_pg(x, **PG, shaping_gamma=gamma)
    f = p_off / (p_off + gamma)
    # dapo: mean over the 4 tokens of -A f(p) (off-policy) and -A * ratio, ratio = 1 (on-policy)
    assert out.loss.item() == pytest.approx((2 * -a_off * f + 2 * -a_on) / 4, rel=1e-6)
    out.loss.backward()
    d_off = -a_off * gamma * p_off / (p_off + gamma) ** 2 / 4  # d/dlog p of -A p/(p + gamma)
    assert logps.grad[0].tolist() == pytest.approx([d_off, d_off], rel=1e-5)
    assert logps.grad[1].tolist() == pytest.approx([-a_on / 4, -a_on / 4], rel=1e-5)
    assert out.stats["offpolicy_shaped_weight"] == pytest.approx(
        gamma * p_off / (p_off + gamma) ** 2, rel=1e-5
    )
    # no clipping: far from the behaviour probability (1) the off-policy gradient still flows
    logps, x = part_inputs([[math.log(1e-3)]], adv=(1.0,), off=(True,), correct=(True,))
    luffy_pg(x, **PG, shaping_gamma=gamma).loss.backward()
    assert logps.grad.item() == pytest.approx(-gamma * 1e-3 / (1e-3 + gamma) ** 2, rel=1e-4)


def test_luffy_without_demonstration_rows_and_empty_parts_give_no_nan():
    logps, x = part_inputs([[-1.0, -2.0]], adv=(0.5,), off=(False,))
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        out = luffy_pg(x, **{**PG, "loss_type": loss_type}, shaping_gamma=0.1)
        # no off-policy row: no shaped weight to report (not 0)
        assert math.isfinite(out.loss.item()) and "offpolicy_shaped_weight" not in out.stats
    empty = torch.zeros(0, 2, requires_grad=True)
    x = PartInputs(
        empty,
        torch.zeros(0, 2),
        None,
        None,
        torch.zeros(0),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.bool),
    )
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        out = pg_part(x, **{**PG, "loss_type": loss_type})
        assert out.loss.item() == 0.0
        out.loss.backward()
    assert nll_part(x).loss.item() == 0.0
    luffy = get_method("luffy", steps=3, group_size=4, num_demos=0)
    assert luffy.plan(1).gather.group_rows == 0 and luffy.plan(1).phase == "grpo"


def test_srft_weights():
    H = torch.tensor([[1.0, 3.0], [0.5, 0.5], [2.0, 2.0]])  # rows' mean entropies 2.0, 0.5, 2.0
    logps, x = part_inputs(
        [[-1.0, -1.0], [-0.5, -0.5], [-2.0, -2.0]],
        adv=(0.0, 0.0, 0.0),
        off=(False, False, False),
        correct=(True, False, True),
        entropy=H,
    )
    sft = nll_part(x, reweight=srft_entropy_weight(0.5))
    w = [0.5 * math.exp(-2.0), 0.5 * math.exp(-0.5), 0.5 * math.exp(-2.0)]
    assert sft.loss.item() == pytest.approx((2 * w[0] * 1.0 + 2 * w[1] * 0.5 + 2 * w[2] * 2.0) / 6, rel=1e-6)
    assert sft.stats["srft_sft_weight"] == pytest.approx(sum(w) / 3, rel=1e-6)
    rl = srft_pg(x, **PG, shaping_gamma=0.1, rollout_coef=0.1)
    w_rl = [0.1 * math.exp(2.0), -1.0, 0.1 * math.exp(2.0)]  # correct rows pulled up, wrong ones pushed down
    assert rl.loss.item() == pytest.approx(sum(-wi * 2 * lp for wi, lp in zip(w_rl, (-1.0, -0.5, -2.0))) / 6)
    assert rl.stats["srft_rl_weight"] == pytest.approx(0.1 * math.exp(2.0), rel=1e-6)
    srft = get_method("srft", steps=3, group_size=4)
    plan = srft.plan(1)
    parts, _ = srft.parts(plan, rows_for(plan, 0))
    assert [(p.name, p.loss, p.options.get("rollout_coef")) for p in parts] == [
        ("sft", "nll", None),
        ("rl", "srft_pg", 0.1),
    ]
    assert parts[0].options["reweight"].__qualname__ == "srft_entropy_weight.<locals>.reweight"
    assert parts[0].rows.tolist() == (rows_for(plan, 0).kind == OFFPOLICY).tolist()


def test_sft_then_grpo_switch_step_and_sasr_probe():
    two = drive(get_method("sft-then-grpo", steps=6, warmup_steps=2, switch_step=4), 6, lambda s: 1.0)
    assert [d.phase for d in two] == ["sft"] * 4 + ["grpo"] * 2
    assert METHODS["sft-then-grpo"].with_sft_steps({"switch_step": None}, 7) == {"switch_step": 7}
    assert METHODS["sft-then-grpo"].with_sft_steps({"switch_step": 3}, 7) == {"switch_step": 3}
    # The probe: every 2nd GRPO step in a row measures g_last without an SFT step.
    s = get_method("sasr", steps=40, warmup_steps=1, seed=0, gamma=50.0, probe_every=2)  # p_t ~ 0.02
    plans = []
    for step in range(1, 41):
        plan = s.plan(step)
        s.observe(plan, 1.0, 4.0 if plan.gather.probe else None)
        plans.append(plan)
    probes = [p.step for p in plans if p.gather.probe]
    assert probes and all(p.phase == "grpo" for p in plans if p.gather.probe)
    after = next(p for p in plans if p.step > probes[0])
    assert after.info["g_last"] == 4.0  # the probe's norm, though no SFT step ran


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_the_pg_part_on_rollouts_is_grpo_loss(loss_type):
    """The part the loop computes equals grpo_loss (itself tested equal to TRL's), value and gradient."""
    from sasr.losses import grpo_loss

    torch.manual_seed(0)
    base = torch.randn(6, 5) - 2.0
    ref = base + 0.1 * torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.2).long()
    adv = torch.randn(6)
    settings = {**PG, "beta": 0.04, "loss_type": loss_type, "max_completion_length": 5}
    a = base.clone().requires_grad_()
    x = PartInputs(a, mask, None, ref, adv, torch.full((6,), ROLLOUT), torch.zeros(6, dtype=torch.bool))
    ours = pg_part(x, **settings)
    ours.loss.backward()
    b = base.clone().requires_grad_()
    theirs = grpo_loss(b, b.detach(), ref, adv, mask, beta=0.04, loss_type=loss_type, max_completion_length=5)
    theirs.loss.backward()
    assert ours.loss.item() == theirs.loss.item() and torch.equal(a.grad, b.grad)
    assert ours.stats["clip_fraction"] == theirs.clip_fraction


def test_offpolicy_rows_with_a_kl_term_stay_finite():
    """A demonstration the policy finds very unlikely (log p = -120) inside a group with beta > 0: its
    reference is itself (KL 0), so neither the loss nor the gradient is NaN."""
    logps, x = part_inputs(
        [[-120.0, -1.0], [-0.5, -0.5]], adv=(1.0, -1.0), off=(True, False), correct=(True, False)
    )
    x.ref_logps = x.logps.detach().clone()
    x.ref_logps[1] -= 0.3  # the rollout's reference differs
    out = luffy_pg(x, **{**PG, "beta": 0.1}, shaping_gamma=0.1)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and torch.isfinite(logps.grad).all()


def test_relift_buffers_failed_prompts_and_adds_an_sft_update_to_the_step_that_fills_it():
    """ReLIFT over a few steps: each step's all-failed prompts (every process's, in order) go in front of the
    buffer; the step that brings it to buffer_size also takes an SFT update on the newest buffer_size, with an
    optimizer of its own at its own rate and clip, the rest staying; RL updates centre advantages without
    scaling them, sum tokens over the maximum length with no clip, and clip the gradient at 0.7. With
    ``schedule: step`` the buffer instead makes the next step SFT on all of it, which empties it."""
    relift = get_method(
        "relift",
        steps=10,
        prompts_per_step=2,
        group_size=4,
        buffer_size=3,
        sft_learning_rate=1e-6,
        processes=2,
    )
    assert (
        get_method("relift", steps=10, prompts_per_step=2, processes=2).size == 4
    )  # one RL batch, all processes
    plan = relift.plan(1)
    assert (plan.phase, plan.gather.scale_rewards, plan.info["relift_buffer"]) == ("grpo", "none", 0.0)
    assert plan.updates == (Apply(max_grad_norm=0.7),)
    parts, stats = relift.parts(plan, rows_for(plan, seed=1))
    inf = float("inf")
    assert [(p.name, p.loss, p.options) for p in parts] == [
        ("grpo", "pg", {"beta": 0.0, "epsilon_high": inf, "loss_type": "token_sum", "epsilon": inf})
    ]
    assert 0.0 <= stats["relift_failed"] <= 1.0
    relift.outcomes(plan, [(5, 0), (7, 2), (9, 0), (3, 1)])  # two processes' groups: 5 and 9 failed
    assert relift.follow_up(plan) is None
    relift.observe(plan, 1.0)
    second = relift.plan(2)
    relift.outcomes(second, [(1, 4), (2, 0)])
    grown = relift.follow_up(second)
    (source,) = grown.gather.sources
    assert relift.buffer == [2, 5, 9] and source.args["pool"] == (2, 5, 9) and grown.phase == "mixed"
    assert grown.updates == (Apply(max_grad_norm=0.7), Apply(optimizer="sft", lr=1e-6, max_grad_norm=1.0))
    assert grown.info == {"relift_buffer": 2.0, "relift_sft_prompts": 3.0} and grown.gather.prompts == 2
    rows = rows_for(grown, seed=3)
    rows = cat_rows([rows, rows_for(Plan(2, "sft", Gather(demos=3)), seed=3)], 0)
    parts, _ = relift.parts(grown, rows)
    assert [(p.name, p.loss, p.update) for p in parts] == [("grpo", "pg", 0), ("sft", "nll", 1)]
    assert parts[1].rows.tolist() == [False] * 8 + [True] * 3
    relift.observe(grown, 1.0)
    assert relift.buffer == [] and relift.counts["mixed"] == 1
    relift.outcomes(relift.plan(3), [(8, 0)])
    state = json.loads(json.dumps(relift.state_dict()))
    again = get_method("relift", steps=10, prompts_per_step=2, group_size=4, buffer_size=3)
    again.load_state_dict(state)
    assert again.buffer == [8] and again.counts == relift.counts

    step = get_method("relift", steps=10, prompts_per_step=2, group_size=4, buffer_size=2, schedule="step")
    first = step.plan(1)
    step.outcomes(first, [(5, 0), (9, 0), (7, 0)])
    assert step.follow_up(first) is None
    step.observe(first, 1.0)
    sft = step.plan(2)
    (source,) = sft.gather.sources
    assert (sft.phase, source.args["pool"], sft.gather.prompts) == ("sft", (5, 9, 7), 0)
    parts, _ = step.parts(sft, rows_for(Plan(2, "sft", Gather(demos=3)), seed=3))
    assert [(p.name, p.loss, p.update, p.rows.tolist()) for p in parts] == [("sft", "nll", 0, [True] * 3)]
    step.observe(sft, 1.0)
    assert step.buffer == [] and step.plan(3).phase == "grpo"


def test_sft_then_grpo_gives_each_stage_its_own_optimiser_settings():
    """The SFT stage: a linear warm-up over its first sft_warmup_ratio, then a cosine from the peak to
    sft_lr_floor x peak at the switch; the RL stage: a constant rate; each its own weight decay and clip."""
    two = get_method(
        "sft-then-grpo",
        steps=14,
        switch_step=10,
        sft_learning_rate=1e-3,
        sft_warmup_ratio=0.2,
        sft_lr_floor=0.1,
        sft_weight_decay=0.01,
        sft_max_grad_norm=2.0,
        rl_learning_rate=1e-5,
        rl_max_grad_norm=0.5,
    )
    plans = [two.plan(s) for s in range(1, 15)]
    assert [p.phase for p in plans] == ["sft"] * 10 + ["grpo"] * 4
    lrs = [p.updates[0].lr for p in plans]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)  # warm-up over ceil(0.2 x 10) = 2
    halfway = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))  # step 6: 4 of the 8 cosine steps
    assert lrs[5] == pytest.approx(halfway) and lrs[9] == pytest.approx(1e-4)  # the floor at the switch
    assert all(a > b for a, b in zip(lrs[1:9], lrs[2:10]))
    assert lrs[10:] == [1e-5] * 4
    applied = [p.updates[0] for p in plans]
    assert {(a.weight_decay, a.max_grad_norm) for a in applied[:10]} == {(0.01, 2.0)}
    assert {(a.weight_decay, a.max_grad_norm) for a in applied[10:]} == {(None, 0.5)}
    assert not any(a.fresh_optimizer for a in applied)
    fresh = get_method("sft-then-grpo", steps=6, switch_step=3, rl_fresh_optimizer=True)
    assert [fresh.plan(s).updates[0].fresh_optimizer for s in range(1, 7)] == [False] * 3 + [True] + [
        False
    ] * 2
    plain = get_method("sft-then-grpo", steps=4, switch_step=2)  # no stage settings: the run's own
    assert {
        (a.lr, a.weight_decay, a.max_grad_norm) for p in map(plain.plan, range(1, 5)) for a in p.updates
    } == {(None, None, None)}


def test_prefix_rft_plans_a_prefix_on_a_cosine_in_every_group():
    """The prefix's share l(t) falls on a cosine from 0.95 (step 1) to 0.05 (prefix_steps) and stays there;
    each group holds num_generations - n rollouts and n rows continuing the prefix; n must leave rollouts."""
    m = get_method("prefix-rft", steps=20, group_size=8, prefix_steps=11)
    assert [round(m.fraction(t), 4) for t in (1, 6, 11, 15)] == [0.95, 0.5, 0.05, 0.05]
    plan = m.plan(6)
    g = plan.gather
    assert (g.rollouts, g.group_rows, g.extend_groups.args["fraction"], plan.phase) == (
        4,
        4,
        plan.info["prefix_fraction"],
        "mixed",
    )  # half the group continues the prefix (their layout)
    assert get_method("prefix-rft", steps=20, group_size=8, num_prefixed=1).plan(6).gather.rollouts == 7
    assert get_method("prefix-rft", steps=20).fraction(20) == pytest.approx(0.05)  # default: the whole run
    with pytest.raises(SasrError, match="num_prefixed"):
        get_method("prefix-rft", steps=20, group_size=4, num_prefixed=4)


def test_a_steps_loss_from_given_log_probs_with_no_model_is_the_papers_arithmetic(tmp_path):
    """``sasr.objective.micro_loss`` is the loss the learner computes, from per-token log-probs alone: here a
    LUFFY step's (two groups of three rollouts and one demonstration), equal in value and gradient to LUFFY's
    formula written out by hand: rollout tokens -A x ratio (ratio 1 in value), demonstration tokens
    -A p / (p + 0.1), summed and divided by rows x max_completion_length (dr_grpo)."""
    from helpers import tiny_config

    from sasr.config import validate
    from sasr.objective import PassOutputs, micro_loss
    from sasr.trees import dotted

    config = validate(tiny_config(tmp_path, method="luffy", grpo={"num_generations": 4}))
    luffy = get_method("luffy", **config.method_kwargs())
    plan = luffy.plan(1)
    rows = rows_for(plan, seed=0, T=5)
    rows.completion_mask = (torch.rand(8, 5, generator=torch.Generator().manual_seed(1)) > 0.2).long()
    parts, _ = luffy.parts(plan, rows)
    torch.manual_seed(0)
    base = -torch.rand(8, 5) * 3
    sampled = rows.kind == ROLLOUT
    ref = base[sampled] + 0.1 * torch.randn(int(sampled.sum()), 5)
    logps = base.clone().requires_grad_()
    out = PassOutputs(logps, torch.rand(8, 5), ref)
    settings = dotted(config.model_dump(mode="json"))
    loss, stats = micro_loss(rows, parts, out, settings)

    by_hand = base.clone().requires_grad_()
    adv, p = rows.advantages[:, None], by_hand.exp()
    per_token = torch.where(
        (rows.kind == OFFPOLICY)[:, None], -adv * p / (p + 0.1), -adv * torch.exp(by_hand - by_hand.detach())
    )
    want = (per_token * rows.completion_mask).sum() / (8 * config.grpo.max_completion_length)
    torch.testing.assert_close(loss, want)
    (ours,) = torch.autograd.grad(loss, logps)
    (theirs,) = torch.autograd.grad(want, by_hand)
    torch.testing.assert_close(ours, theirs)
    assert stats["clip_fraction"] == 0.0 and stats["kl"] > 0 and "offpolicy_shaped_weight" in stats


def test_questa_ends_each_question_with_the_start_of_its_demonstration_50_then_25_percent():
    """QuestA's hinted question, as foreverlasting1202/QuestA's add_prefix.py writes it: the question, then
    '\\n\\n## Hint.' and the solution's first p of characters (after </think>), no hint under 10 characters;
    p = 0.5 before the middle of the run and 0.25 after; the rendered prompt holds the hint in the user turn."""
    from types import SimpleNamespace

    from sasr import models
    from sasr.collect.groups import prompt_texts
    from sasr.config import TrainConfig
    from sasr.tasks import Example, get_task

    method = get_method("questa", steps=10, seed=0)
    plans = [method.plan(step) for step in range(1, 11)]
    assert [p.info["questa_hint_ratio"] for p in plans] == [0.5] * 5 + [0.25] * 5
    assert {p.phase for p in plans} == {"grpo"}

    task = get_task("arithmetic")
    examples = [  # demonstrations: 48 characters after </think>; 19, whose half is under 10; none
        Example(
            "Compute (12 + 34) * 2 - 10.",
            "<think>scratch</think>12 + 34 = 46\n46 * 2 = 92\n92 - 10 = 82",
            "82",
        ),
        Example("Compute 1 + 1.", "1 + 1 = 2", "2"),
        Example("Compute 2 + 2.", "2 + 2 = 4", "4"),
    ]
    tokenizer = models.load_tokenizer("tiny")
    c = SimpleNamespace(
        config=TrainConfig(),
        tokenizer=tokenizer,
        task=task,
        has_demonstration=lambda i: i < 2,
        index_of=examples.index,
    )
    for plan, shown in ((plans[0], "12 + 34 = 46\n46 * 2 = 92"), (plans[-1], "12 + 34 = 46")):
        prompts, judged, own = prompt_texts(c, plan.step, examples, plan.gather)
        hinted = [*task.messages(examples[0])[:-1], {"role": "user", "content": examples[0].question}]
        hinted[-1]["content"] += "\n\n## Hint." + shown
        want = tokenizer.apply_chat_template(hinted, tokenize=False, add_generation_prompt=True)
        plain = [
            tokenizer.apply_chat_template(task.messages(ex), tokenize=False, add_generation_prompt=True)
            for ex in examples[1:]
        ]
        assert prompts == [want, *plain] and judged == ["", "", ""]  # the judge reads the completion alone
        assert own is None  # the rows keep the hinted prompt


def test_a_hint_in_the_question_joins_a_text_turn_or_a_turn_of_parts():
    from sasr.data import with_question_text

    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert with_question_text(chat, " h")[1] == {"role": "user", "content": "q h"}
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
    assert with_question_text(parts, " h")[0]["content"][-1] == {"type": "text", "text": " h"}
    assert chat[1]["content"] == "q"  # the example's own chat is left as it was
