"""The peers as their authors' code computes them: each official function transcribed here in our own words
(repository, commit and function named), and sasr's method computed on the same inputs, value and gradient.

Each transcription keeps the official arithmetic and leaves out its framework (verl's DataProto, uids, ranks).
"""

import math
import random

import pytest
import torch
from helpers import tiny_config

from sasr.batch import DEMO, ROLLOUT, Rows
from sasr.config import validate
from sasr.losses import group_advantages
from sasr.methods import get_method
from sasr.methods.prefix_rft import PREFIXED, prefix_group_advantages
from sasr.methods.uft import hint_bounds, hint_p
from sasr.objective import PassOutputs, micro_loss
from sasr.trees import dotted


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1e-6)


def rows_of(kinds: list[int], groups: list[int], advantages, mask) -> Rows:
    B, T = mask.shape
    ones = torch.ones(B, 2, dtype=torch.long)
    return Rows(
        ones,
        ones,
        torch.ones(B, T, dtype=torch.long),
        mask,
        kind=torch.tensor(kinds),
        group=torch.tensor(groups),
        rewards=torch.zeros(B),
        advantages=advantages,
        correct=torch.zeros(B, dtype=torch.bool),
        formatted=torch.zeros(B, dtype=torch.bool),
    )


def settings_of(tmp_path, method: str, **top) -> tuple[dict, dict]:
    config = validate(tiny_config(tmp_path, method=method, **top))
    return config.method_kwargs(), dotted(config.model_dump(mode="json"))


# --- ReLIFT: TheRoadQaQ/ReLIFT at eb95454f45eb84bf8f8efa3728f4839548426f5f --------------------------------


def relift_policy_loss(old_logp, logp, adv, mask, remove_clip: bool, remove_token_mean: bool, clip=0.2):
    """relift/verl/verl/relift/core_algos.py compute_policy_loss: the ratio to the old policy times -A, with no
    clamp when remove_clip (else PPO's with one symmetric range); with remove_token_mean the sum over every
    token of the micro-batch divided by the padded response length, else the token mean."""
    ratio = torch.exp(logp - old_logp)
    per_token = -adv[:, None] * ratio
    if not remove_clip:
        per_token = torch.max(per_token, -adv[:, None] * torch.clamp(ratio, 1 - clip, 1 + clip))
    if remove_token_mean:
        return (per_token * mask).sum() / mask.shape[-1]
    return masked_mean(per_token, mask)


def relift_advantages(rewards: list[float], n: int) -> list[float]:
    """verl's compute_grpo_outcome_advantage with their scripts' grpo_use_std=False: each reward minus its
    group's mean."""
    out = []
    for g in range(0, len(rewards), n):
        group = rewards[g : g + n]
        out += [r - sum(group) / n for r in group]
    return out


def test_relift_rl_update_is_their_unclipped_token_sum_over_the_padded_length(tmp_path):
    kwargs, settings = settings_of(
        tmp_path, "relift", grpo={"num_generations": 4, "max_completion_length": 6}
    )
    relift = get_method("relift", **kwargs)
    plan = relift.plan(1)
    torch.manual_seed(0)
    rewards = [float(random.Random(i).random() < 0.5) for i in range(8)]
    adv = torch.tensor(relift_advantages(rewards, 4))
    ours_adv, _ = group_advantages(torch.tensor(rewards), 4, "mean", plan.gather.scale_rewards)
    torch.testing.assert_close(ours_adv, adv)
    mask = (torch.rand(8, 6) > 0.3).long()
    rows = rows_of([ROLLOUT] * 8, [0] * 4 + [1] * 4, adv, mask)
    parts, _ = relift.parts(plan, rows)
    base, old = (
        -torch.rand(8, 6) * 2,
        -torch.rand(8, 6) * 2,
    )  # the second mini-batch of their step: ratio != 1
    ours, theirs = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss, stats = micro_loss(rows, parts, PassOutputs(ours, torch.rand(8, 6), old=old), settings)
    want = relift_policy_loss(old, theirs, adv, mask, remove_clip=True, remove_token_mean=True)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, ours)[0], torch.autograd.grad(want, theirs)[0])
    assert stats["clip_fraction"] == 0.0
    # their RL-only baseline script (train_rl.sh) clips at 0.2 both ways: relift.remove_clip=false
    kwargs, settings = settings_of(
        tmp_path, "relift", relift={"remove_clip": False}, grpo={"max_completion_length": 6}
    )
    clipped = get_method("relift", **kwargs)
    parts, _ = clipped.parts(plan, rows)
    ours = base.clone().requires_grad_()
    loss, _ = micro_loss(rows, parts, PassOutputs(ours, torch.rand(8, 6), old=old), settings)
    torch.testing.assert_close(loss, relift_policy_loss(old, base, adv, mask, False, True))


def test_relift_takes_the_newest_failures_and_keeps_the_rest_as_their_trainer_does():
    """relift/verl/verl/relift/trainer.py fit: each step's all-failed prompts go in front of the buffer; once it
    holds sft_data_size, the same step trains an SFT update on the first sft_data_size (the newest) and the
    rest stay. Here: a buffer of 3, failures [5, 9] then [2, 4]: the SFT update takes [2, 4, 5], 9 stays."""
    relift = get_method("relift", steps=10, prompts_per_step=2, group_size=4, buffer_size=3)
    plan = relift.plan(1)
    relift.outcomes(plan, [(5, 0), (7, 2), (9, 0)])
    assert relift.follow_up(plan) is None  # 2 of 3: no SFT update this step
    relift.observe(plan, 1.0)
    plan = relift.plan(2)
    relift.outcomes(plan, [(2, 0), (4, 0)])
    full = relift.follow_up(plan)
    (source,) = full.gather.sources
    assert source.args["pool"] == (2, 4, 5) and [a.optimizer for a in full.updates] == ["main", "sft"]
    relift.observe(full, 1.0)
    assert relift.buffer == [9]


# --- UFT: liumy2010/UFT at ad3c8ec7d258d4e4cf3f359dd75925d0f127a520 -----------------------------------------


def uft_probability(t: int, total_hint: int, upper: float = 0.95, lower: float = 0.05) -> float:
    """verl/utils/dataset/rl_dataset.py __getitem__: the chance of each hint chunk at step t (from 1); none
    after total_training_steps_hint."""
    if t > total_hint:
        return 0.0
    return lower + 0.5 * (upper - lower) * (1 + math.cos(math.pi * t / total_hint))


def uft_separation(steps: int) -> list[int]:
    """The same function: the hint's solution steps cut in at most 5 chunks; the hint is the first
    separation[k] steps."""
    num = min(5, steps)
    separation = [round(i / num * steps) for i in range(num + 1)]
    separation[-1] = steps
    return separation


def test_uft_hint_schedule_and_chunks_are_theirs():
    for t in (1, 2, 150, 299, 300, 301, 500):
        assert hint_p(t, 0.95, 0.05, 300) == pytest.approx(uft_probability(t, 300), abs=1e-12)
    for steps in (1, 2, 3, 4, 7, 12, 107):
        assert hint_bounds(steps, 5) == uft_separation(steps)


def test_uft_loss_is_their_micro_batch_token_means(tmp_path):
    """verl/workers/actor/dp_actor.py update_policy: the clipped surrogate (clip 0.2) as a token mean over the
    micro-batch's response tokens, plus kl_loss_coef (0.001) x the token mean of low_var_kl (k3, clamped to
    [-10, 10]), plus sft_loss_coef (0.001) x the token mean of the hint tokens' NLL."""
    kwargs, settings = settings_of(
        tmp_path, "uft", steps=10, grpo={"num_generations": 4, "max_completion_length": 5}
    )
    uft = get_method("uft", **kwargs)
    plan = uft.plan(1)
    torch.manual_seed(1)
    kinds = [ROLLOUT] * 8 + [DEMO] * 2
    adv = torch.cat([torch.randn(8), torch.zeros(2)])
    mask = (torch.rand(10, 5) > 0.2).long()
    rows = rows_of(kinds, [0] * 4 + [1] * 4 + [0, 1], adv, mask)
    parts, _ = uft.parts(plan, rows)
    base, old = -torch.rand(10, 5) * 2, -torch.rand(10, 5) * 2
    ref = -torch.rand(8, 5) * 2
    ours, theirs = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss, _ = micro_loss(rows, parts, PassOutputs(ours, torch.rand(10, 5), ref=ref, old=old), settings)

    on, hint = mask[:8], mask[8:]
    ratio = torch.exp(theirs[:8] - old[:8])
    pg = masked_mean(torch.max(-adv[:8, None] * ratio, -adv[:8, None] * ratio.clamp(0.8, 1.2)), on)
    delta = ref - theirs[:8]
    kld = torch.clamp(torch.exp(delta) - delta - 1, -10, 10)
    want = pg + 0.001 * masked_mean(kld, on) + 0.001 * masked_mean(-theirs[8:], hint)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, ours)[0], torch.autograd.grad(want, theirs)[0])


# --- Prefix-RFT: ZeroYuHuang/prefix_rft at 5f5d2a1fb18f0efb6d5ac51839b2750490cefaf8 -------------------------


def prefix_rft_advantages(rewards: list[float], prefixed: list[bool], G: int, n: int):
    """recipe/prefix_rft/core_algos.py compute_dr_grpo_prefix_outcome_advantage: group by prompt, then by
    prefix (the on-policy rows share one id); each subgroup's mean (0 for a subgroup of one); a row's score is
    its reward minus its subgroup's mean; its prefix tokens take (that score - the on-policy mean) / n."""
    scores, prefix_scores = [], []
    for g in range(0, len(rewards), G):
        r, p = rewards[g : g + G], prefixed[g : g + G]
        means = {}
        for key in (False, True):
            members = [x for x, q in zip(r, p) if q == key]
            means[key] = sum(members) / len(members) if len(members) > 1 else 0.0
        for x, q in zip(r, p):
            score = x - means[q]
            scores.append(score)
            prefix_scores.append((score - means[False]) / n if q else 0.0)
    return scores, prefix_scores


@pytest.mark.parametrize("n", [1, 4])
def test_prefix_rft_advantages_are_their_dr_grpo_prefix_estimator(n):
    rng = random.Random(n)
    G = 8
    for _ in range(50):
        prompts = rng.randint(1, 3)
        rewards = [float(rng.random() < 0.5) for _ in range(prompts * G)]
        prefixed = [i % G >= G - n for i in range(prompts * G)]
        adv, pre, _ = prefix_group_advantages(torch.tensor(rewards), torch.tensor(prefixed).long(), G, n)
        scores, prefix_scores = prefix_rft_advantages(rewards, prefixed, G, n)
        assert adv.tolist() == pytest.approx(scores, abs=1e-6)
        assert pre.tolist() == pytest.approx(prefix_scores, abs=1e-6)


def test_prefix_rft_groups_half_their_rows_on_one_prefix_and_sums_tokens_as_their_dr_grpo(tmp_path):
    """Their trainer repeats each prompt variant (one empty, one with a prefix) rollout.n times: half the group
    continues one prefix, centred within that subgroup; their dr_grpo mode sums a micro-batch's token losses
    and divides by the maximum response length (core_algos.py agg_loss), sasr's token_sum at one micro-batch a
    step."""
    kwargs, settings = settings_of(tmp_path, "prefix-rft", steps=10, grpo={"num_generations": 8})
    m = get_method("prefix-rft", **kwargs)
    plan = m.plan(1)
    assert (plan.gather.rollouts, plan.gather.group_rows) == (4, 4)
    torch.manual_seed(2)
    mask = (torch.rand(8, 5) > 0.2).long()
    adv = torch.randn(8)
    rows = rows_of([ROLLOUT] * 4 + [PREFIXED] * 4, [0] * 8, adv, mask)
    rows.given = torch.zeros(8, 5, dtype=torch.bool)  # no prefix tokens in these rows: the rollouts' terms
    parts, _ = m.parts(plan, rows)
    base = -torch.rand(8, 5) * 2
    ours, theirs = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss, _ = micro_loss(rows, parts, PassOutputs(ours, torch.rand(8, 5)), settings)
    want = (-adv[:, None] * torch.exp(theirs - theirs.detach()) * mask).sum() / settings[
        "grpo.max_completion_length"
    ]
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, ours)[0], torch.autograd.grad(want, theirs)[0])


def test_prefix_rft_keeps_the_highest_entropy_fifth_of_prefix_tokens_as_their_reshaper():
    """recipe/prefix_rft/dp_actor.py reshape_func 'entropy': the prefix tokens of the micro-batch sorted by
    entropy, the lowest int(len x ratio) (ratio 0.8: keep the top 20%) get advantage 0."""
    from sasr.losses import top_entropy

    torch.manual_seed(3)
    entropy, tokens = torch.rand(4, 9), torch.rand(4, 9) > 0.4
    kept = top_entropy(entropy, tokens, 0.2)
    values = entropy[tokens]
    dropped = torch.sort(values).indices[: int(len(values) * 0.8)]
    theirs = torch.ones_like(values, dtype=torch.bool)
    theirs[dropped] = False
    assert torch.equal(kept[tokens], theirs) and not kept[~tokens].any()


def prefix_rft_policy_loss(old_logp, logp, adv_tokens, mask, low, high, max_tokens, clip_c=3.0):
    """recipe/prefix_rft/core_algos.py compute_policy_loss with enable_clip (prefix tokens clipped as the
    generated ones), PPO's dual clip (a negative advantage's loss bounded at clip_c), and agg_loss 'dr_grpo':
    the micro-batch's token sum over max_tokens."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.max(-adv_tokens * ratio, -adv_tokens * ratio.clamp(1 - low, 1 + high))
    per_token = torch.where(adv_tokens < 0, torch.min(-adv_tokens * clip_c, clipped), clipped)
    return (per_token * mask).sum() / max_tokens


def test_prefix_rft_loss_is_their_policy_loss_after_the_entropy_reshaper(tmp_path):
    """Rollouts and prefixed rows of one group with ratios off 1: the prefix tokens take (score - on-policy
    mean) / n, their lowest-entropy 80% zeroed, then one clipped surrogate for all tokens (clip 0.2 / 0.28)."""
    from sasr.losses import top_entropy

    kwargs, settings = settings_of(
        tmp_path,
        "prefix-rft",
        steps=10,
        grpo={"num_generations": 4, "epsilon_high": 0.28, "max_completion_length": 6},
    )
    m = get_method("prefix-rft", **kwargs)
    plan = m.plan(1)
    torch.manual_seed(4)
    mask = (torch.rand(4, 6) > 0.1).long()
    adv, prefix_adv = torch.randn(4), torch.cat([torch.zeros(2), torch.randn(2)])
    rows = rows_of([ROLLOUT] * 2 + [PREFIXED] * 2, [0] * 4, adv, mask)
    rows.given = torch.zeros(4, 6, dtype=torch.bool)
    rows.given[2:, :3] = True
    rows.extras = {"prefix_advantages": prefix_adv}
    parts, _ = m.parts(plan, rows)
    base = -torch.rand(4, 6) * 2
    old = base + 0.4 * (torch.rand(4, 6) - 0.5)
    entropy = torch.rand(4, 6)
    ours, theirs = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss, _ = micro_loss(rows, parts, PassOutputs(ours, entropy, old=old), settings)

    prefix = rows.given & mask.bool()
    adv_tokens = torch.where(prefix, prefix_adv[:, None], adv[:, None].expand(4, 6))
    adv_tokens = adv_tokens.masked_fill(prefix & ~top_entropy(entropy, prefix, 0.2), 0.0)
    want = prefix_rft_policy_loss(
        old, theirs, adv_tokens, mask, 0.2, 0.28, settings["grpo.max_completion_length"]
    )
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, ours)[0], torch.autograd.grad(want, theirs)[0])


# --- LUFFY: ElliottYan/LUFFY at 01f4ae066249e6965ce0d5512ccdf99a12895c74 ----------------------------------


def test_luffys_advantage_is_centred_on_the_whole_group_and_not_scaled(tmp_path):
    """luffy/verl/verl/trainer/ppo/core_algos.py compute_grpo_outcome_advantage with exp_scripts/train.sh's
    algorithm.grpo_use_std=False: each reward minus its group's mean, the group's demonstration included (one
    uid per prompt for its 7 rollouts and its demonstration): ``relift_advantages`` is that arithmetic too."""
    kwargs, _ = settings_of(tmp_path, "luffy", grpo={"num_generations": 4})
    plan = get_method("luffy", **kwargs).plan(1)
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    ours, _ = group_advantages(torch.tensor(rewards), 4, "mean", plan.gather.scale_rewards)
    assert ours.tolist() == pytest.approx(relift_advantages(rewards, 4))
