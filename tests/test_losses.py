"""The GRPO loss against TRL 1.16's GRPOTrainer on identical log-probs, advantages and masks."""

import pytest
import torch
from helpers import two_gloo_ranks

from sasr.batch import DEMO, ROLLOUT
from sasr.errors import SasrError
from sasr.logprobs import completion_logprobs, selective_log_softmax
from sasr.losses import group_advantages, grpo_loss, sft_loss

B, T = 8, 6


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, T, generator=g) * 3).requires_grad_(True)
    # A policy that moved after sampling, so ratios leave [1 - eps, 1 + eps] and clipping is exercised.
    old = (logps.detach() + torch.randn(B, T, generator=g) * 0.5).clamp(max=0)
    ref = (logps.detach() + torch.randn(B, T, generator=g) * 0.3).clamp(max=0)
    adv = torch.randn(B, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return logps, old, ref, adv, mask


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from sasr import models

    model = models.load_model("tiny")
    tok = models.load_tokenizer("tiny")
    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        per_device_train_batch_size=B,
        num_generations=4,
        max_completion_length=T,
        beta=0.04,
        epsilon=0.2,
        epsilon_high=0.28,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "hi"}] * B),
        processing_class=tok,
    )
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    yield trainer
    # TRL's trainer leaves a process-wide accelerate state (bf16 by default); later runs in this process
    # must start from a clean one, as a fresh `sasr train` does.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta, bias_correction", [(0.04, False), (0.04, True), (0.0, False)])
def test_grpo_loss_matches_trl(trl_trainer, loss_type, beta, bias_correction, level):
    logps, old, ref, adv, mask = _inputs()
    trainer = trl_trainer
    trainer.importance_sampling_level = level  # "sequence": GSPO
    trainer.loss_type = trainer.args.loss_type = loss_type
    trainer.beta = beta
    trainer.args.use_bias_correction_kl = bias_correction
    trl_logps = logps.detach().clone().requires_grad_(True)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (trl_logps, torch.zeros(B, T), None)
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    expected = trainer._compute_loss(trainer.model, inputs)
    expected.backward()

    ours = grpo_loss(
        logps,
        old,
        ref,
        adv,
        mask,
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.28,
        loss_type=loss_type,
        max_completion_length=T,
        use_bias_correction_kl=bias_correction,
        importance_sampling_level=level,
    )
    ours.loss.backward()
    torch.testing.assert_close(ours.loss, expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logps.grad, trl_logps.grad, rtol=1e-6, atol=1e-7)
    assert 0 < ours.clip_fraction < 1  # clipping really happened on both sides of the comparison


def test_kl_zero_when_policy_is_reference():
    logps, _, _, adv, mask = _inputs(1)
    out = grpo_loss(logps, logps.detach(), logps.detach(), adv, mask, beta=0.5)
    assert out.kl == 0.0
    _, _, ref, _, _ = _inputs(2)
    assert grpo_loss(logps, logps.detach(), ref, adv, mask, beta=0.5).kl > 0


def test_on_policy_gradient_is_advantage_weighted_score():
    """With pi_old = pi (rho = 1 in value) and beta = 0, d loss / d logp = -A / |o_i| on unmasked tokens."""
    logps, _, _, adv, mask = _inputs(3)
    grpo_loss(logps, logps.detach(), None, adv, mask, beta=0.0).loss.backward()
    expected = -adv[:, None] * mask / mask.sum(1, keepdim=True) / B
    torch.testing.assert_close(logps.grad, expected.float())


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 0.0, 3.0])
    adv, zero = group_advantages(rewards, 4)
    g0 = torch.tensor([1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv[:4], (g0 - g0.mean()) / (g0.std() + 1e-4))
    assert torch.all(adv[4:8] == 0) and zero.tolist() == [False, True, False]  # zero spread: no NaN
    med, _ = group_advantages(rewards, 4, centre="median")
    g2 = torch.tensor([1.0, 1.0, 0.0, 3.0])
    torch.testing.assert_close(med[8:], (g2 - g2.median()) / (g2.std() + 1e-4))
    raw, _ = group_advantages(rewards, 4, scale="none")
    torch.testing.assert_close(raw[:4], g0 - 0.25)


@pytest.mark.parametrize(
    "dtype,temperature", [(torch.float32, 1.0), (torch.float32, 0.7), (torch.bfloat16, 0.7)]
)
def test_selective_log_softmax_equals_a_full_log_softmax_in_value_and_gradient(dtype, temperature):
    """Chunked, and backward keeps only the logits themselves: no float32 copy, no [B, T, V] log-softmax."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(8, 6, 1000)).to(dtype).requires_grad_(True)
    ids = torch.randint(0, 1000, (8, 6))
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ours, entropy = selective_log_softmax(logits, ids, temperature, with_entropy=True, chunk=5)
    full = torch.log_softmax(logits.float() / temperature, -1)  # [B, T, V]
    torch.testing.assert_close(ours, full.gather(-1, ids[..., None]).squeeze(-1))
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1), rtol=1e-4, atol=1e-4)
    weights = torch.randn(8, 6)  # a loss that weighs tokens differently, as GRPO's does
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (g_full,) = torch.autograd.grad((full.gather(-1, ids[..., None]).squeeze(-1) * weights).sum(), logits)
    torch.testing.assert_close(g_ours, g_full)
    assert sum(saved) < 1.01 * logits.numel() * logits.element_size()  # the logits (+ ids, one lse per token)
    assert selective_log_softmax(logits, ids)[1] is None


def test_completion_logprobs_match_a_full_forward():
    from sasr import models

    model = models.load_model("tiny")
    ids = torch.randint(0, 1000, (3, 10))
    attn = torch.ones_like(ids)
    logps, ent = completion_logprobs(model, ids, attn, 4, with_entropy=True)
    logits = model(input_ids=ids).logits
    full = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)[:, -4:]
    torch.testing.assert_close(logps, full, rtol=1e-5, atol=1e-5)
    assert ent.shape == (3, 4) and torch.all(ent > 0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_pass_equals_the_plain_forward_in_value_and_gradient(checkpointing):
    """GRPO rows of one prompt compute it once: the same log-probs and LoRA gradients as one pass per row."""
    from peft import LoraConfig, get_peft_model

    from sasr import models
    from sasr.data import render_prompts
    from sasr.rollout import generate
    from sasr.tasks import get_task

    torch.manual_seed(0)
    tok, task = models.load_tokenizer("tiny"), get_task("arithmetic")
    base = models.load_model("tiny")
    if checkpointing:  # falls back to the plain pass (a checkpointed layer would re-append to the cache)
        models.enable_activation_checkpointing(base)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    prompts = render_prompts(tok, task, task.examples("test", 2, seed=3))
    prompts[0] += " Show every step."  # prompts of different lengths: real left padding
    roll = generate(model, tok, prompts, num_generations=3, max_new_tokens=12, temperature=1.0)  # B = 6
    assert not bool(roll.attention_mask[:, :2].all())  # some rows are padded
    model.train()
    T = roll.completion_ids.size(1)
    calls = []
    base.register_forward_hook(lambda module, args, out: calls.append(1))
    # Interleaved, no row repeats the prompt of the row before: one plain pass. Grouped: prompts, completions.
    interleaved = torch.tensor([0, 3, 1, 4, 2, 5])
    results = []
    for order, passes in ((interleaved, 1), (torch.arange(6), 1 if checkpointing else 2)):
        model.zero_grad()
        calls.clear()
        logps, ent = completion_logprobs(
            model, roll.input_ids[order], roll.attention_mask[order], T, 0.7, True
        )
        assert len(calls) == passes
        (logps * roll.completion_mask[order]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        back = order.argsort()  # rows in roll's order again
        results.append((logps.detach()[back], ent[back], grads))
    (plain, plain_ent, plain_grads), (shared, shared_ent, shared_grads) = results
    mask = roll.completion_mask.bool()
    torch.testing.assert_close(shared[mask], plain[mask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shared_ent[mask], plain_ent[mask], rtol=1e-4, atol=1e-5)
    for name, g in plain_grads.items():
        torch.testing.assert_close(
            shared_grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name
        )


@pytest.mark.parametrize("shared", [True, False])
def test_rows_computed_in_length_groups_equal_one_padded_pass(monkeypatch, shared):
    """Rows of similar completion length run together up to their longest: same log-probs, entropy and LoRA
    gradients as one pass padded to the longest row, with and without shared prompts."""
    from peft import LoraConfig, get_peft_model

    import sasr.logprobs as logprobs
    from sasr import models
    from sasr.data import encode_prompts, render_prompts
    from sasr.tasks import get_task

    torch.manual_seed(0)
    tok, task = models.load_tokenizer("tiny"), get_task("arithmetic")
    model = get_peft_model(
        models.load_model("tiny"),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    prompts = render_prompts(tok, task, task.examples("test", 2, seed=3))
    prompts[0] += " Show every step."  # real left padding
    prompt_ids, prompt_mask = encode_prompts(tok, prompts, 512, torch.device("cpu"))
    rows = torch.tensor(
        [0, 0, 0, 1, 1, 1] if shared else [0, 1, 0, 1, 0, 1]
    )  # shared: G = 3 consecutive rows
    lengths = torch.tensor([16, 3, 14, 2, 16, 5])
    T = int(lengths.max())
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()  # [6, T] right-padded
    completion = torch.randint(10, 1000, (6, T)).masked_fill(completion_mask == 0, tok.pad_token_id)
    ids = torch.cat([prompt_ids[rows], completion], 1)
    attn = torch.cat([prompt_mask[rows], completion_mask], 1)
    assert len(logprobs.length_groups(lengths)) > 1
    results = []
    for max_groups in (logprobs.MAX_GROUPS, 1):
        monkeypatch.setattr(logprobs, "MAX_GROUPS", max_groups)
        model.zero_grad()
        logps, ent = completion_logprobs(model, ids, attn, T, 0.7, with_entropy=True)
        (logps * completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((logps.detach(), ent.detach(), grads))
    (grouped, grouped_ent, grouped_grads), (padded, padded_ent, padded_grads) = results
    mask = completion_mask.bool()
    torch.testing.assert_close(grouped[mask], padded[mask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grouped_ent[mask], padded_ent[mask], rtol=1e-4, atol=1e-5)
    # lengths 3, 2 and 5 form a group computed to 5 positions: the rest of those rows is never computed
    assert (grouped[[1, 3, 5], 5:] == 0).all() and (grouped_ent[[1, 3, 5], 5:] == 0).all()
    for name, g in padded_grads.items():
        torch.testing.assert_close(
            grouped_grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name
        )


def test_length_groups_cut_only_where_it_saves_work():
    from sasr.logprobs import length_groups

    assert [(r.tolist(), t) for r, t in length_groups(torch.tensor([64] * 8))] == [(list(range(8)), 64)]
    assert [(r.tolist(), t) for r, t in length_groups(torch.tensor([60, 64, 62, 61]))] == [([0, 1, 2, 3], 64)]
    groups = length_groups(torch.tensor([5, 64, 6, 63, 4, 64, 7, 62]))  # two clear lengths: two groups
    assert [(r.tolist(), t) for r, t in groups] == [([1, 3, 5, 7], 64), ([0, 2, 4, 6], 7)]
    assert length_groups(torch.tensor([0, 0]))[0][1] == 1  # an empty row still computes one position
    three = torch.tensor([100] * 8 + [50] * 8 + [5] * 8)
    assert [t for _, t in length_groups(three)] == [100, 50, 5]
    assert len(length_groups(three, max_groups=2)) == 2


def test_sft_loss_ignores_prompt_tokens():
    """Prompt tokens carry no SFT loss: changing the prompt part of the log-probs changes nothing."""
    from sasr import models
    from sasr.data import demonstration_rows
    from sasr.tasks import get_task

    tok = models.load_tokenizer("tiny")
    task = get_task("arithmetic")
    exs = task.examples("train", 3, seed=0)
    batch = demonstration_rows(tok, task, exs, 512, torch.device("cpu"))
    # The masked targets are exactly the task targets followed by EOS, and nothing of the prompt.
    for i, ex in enumerate(exs):
        kept = batch.completion_ids[i][batch.completion_mask[i].bool()].tolist()
        assert tok.decode(kept[:-1]) == task.target(ex) and kept[-1] == tok.eos_token_id
    model = models.load_model("tiny")
    T = batch.completion_ids.size(1)
    logps, _ = completion_logprobs(model, batch.input_ids, batch.attention_mask, T)
    loss = sft_loss(logps, batch.completion_mask)
    manual = -(logps * batch.completion_mask).sum() / batch.completion_mask.sum()
    torch.testing.assert_close(loss, manual)
    # Gradient flows to target positions only.
    leaf = logps.detach().requires_grad_(True)
    sft_loss(leaf, batch.completion_mask).backward()
    assert torch.all(leaf.grad[batch.completion_mask == 0] == 0)
    assert torch.all(leaf.grad[batch.completion_mask == 1] < 0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_layers_give_peft_s_values_and_gradients(monkeypatch, dropout):
    """LoRA layers as one autograd function: the same log-probs and gradients as peft's own layers."""
    from peft import LoraConfig, get_peft_model

    import sasr.lora_linear as lora_linear
    from sasr import models

    torch.manual_seed(0)
    model = get_peft_model(
        models.load_model("tiny"),
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False
        ),
    ).train()
    ids = torch.randint(0, 1000, (4, 12))
    attn = torch.ones_like(ids)
    calls = []
    fused_apply = lora_linear._LoRALinear.apply
    monkeypatch.setattr(lora_linear._LoRALinear, "apply", lambda *a: calls.append(1) or fused_apply(*a))

    def run():
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks, if any
        logps, _ = completion_logprobs(model, ids, attn, 5)
        (logps * torch.linspace(-1, 1, 5)).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused, fused_grads = run()
    assert bool(calls) == (dropout == 0.0)  # dropout on the adapter's input only: not one matrix
    monkeypatch.setattr(lora_linear, "fusable_layers", lambda model: None)  # peft's own layers
    plain, plain_grads = run()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for name, g in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6 + 1e-5 * g.abs().max().item())
    models.enable_activation_checkpointing(model)
    assert lora_linear.fusable_layers(model) is None  # recomputation in backward would run peft's layers


def _lengths_batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of 5 prompt tokens (each its own) and completions of the given lengths, padded to 16."""
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor(lengths)
    mask = torch.cat(
        [torch.ones(len(lengths), 5, dtype=torch.long), (torch.arange(16)[None] < n[:, None]).long()], 1
    )
    return torch.randint(10, 1000, mask.shape, generator=g), mask


def test_a_ddp_model_that_broadcasts_buffers_makes_one_forward_call_per_pass(tmp_path):
    """A DDP forward that broadcasts buffers is a collective: ranks with different lengths must make as many
    calls. Without the broadcast (sasr's trainer) the length groups stay."""
    import torch.distributed as dist

    from sasr import models

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = models.load_model("tiny")
        ids, mask = _lengths_batch([16, 2, 15, 3], seed=0)
        calls = []
        model.register_forward_hook(lambda *_: calls.append(1))
        plain, _ = completion_logprobs(model, ids, mask, 16)
        assert len(calls) == 2  # the bare model: two length groups
        real = mask[:, 5:].bool()
        for broadcast, n_calls in ((True, 1), (False, 2)):
            calls.clear()
            ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast)
            wrapped, _ = completion_logprobs(ddp, ids, mask, 16)
            assert len(calls) == n_calls
            torch.testing.assert_close(wrapped[real], plain[real], rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_an_fsdp_model_makes_one_forward_call_per_pass(tmp_path):
    """FSDP gathers each unit's weights in every forward (a collective), so a pass over rows of several lengths
    and shared prompts is one call (ranks must make as many); its log-probs are the unsharded model's."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from sasr import models

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        plain = models.load_model("tiny")
        sharded = copy.deepcopy(plain)
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(5, 500, (2, 6), generator=g).repeat_interleave(3, 0)  # 2 prompts x 3 rows
        completions = torch.randint(5, 500, (6, 40), generator=g)
        ids = torch.cat([prompts, completions], 1)  # [6, 46]
        mask = torch.ones_like(ids)
        mask[::2, 6 + 4 :] = 0  # every other completion 4 tokens long, the rest 40: length groups pay
        calls = []
        sharded.register_forward_pre_hook(lambda *_: calls.append(1))
        got, _ = completion_logprobs(sharded, ids, mask, 40)
        want, _ = completion_logprobs(plain, ids, mask, 40)
        assert len(calls) == 1
        m = mask[:, 6:].bool()
        torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


RANK_LENGTHS = ([16, 2, 15, 3], [16, 16, 15, 14])  # two length groups on rank 0, one on rank 1


def _ddp_rank(rank: int, init: str, out: str) -> None:
    """One rank of test_ranks_with_different_numbers_of_length_groups_train_together."""
    import torch.distributed as dist

    from sasr import models

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = models.load_model("tiny")
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    ids, mask = _lengths_batch(RANK_LENGTHS[rank], seed=rank)
    logps, _ = completion_logprobs(ddp, ids, mask, 16)
    (logps * mask[:, 5:]).sum().backward()  # DDP averages the two ranks' gradients
    grads = {n: p.grad for n, p in model.named_parameters()}
    torch.save({"calls": len(calls), "grads": grads}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_with_different_numbers_of_length_groups_train_together(tmp_path):
    """Two gloo processes make different numbers of forward calls (length groups) under DDP, as sasr's trainer
    configures it, and still get the average of their plain gradients (a broadcast of buffers deadlocks here)."""
    from sasr import models

    ranks = two_gloo_ranks(_ddp_rank, tmp_path)
    assert [r["calls"] for r in ranks] == [2, 1]
    model = models.load_model("tiny")
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for rank, lengths in enumerate(RANK_LENGTHS):  # each rank's batch in one process, no DDP
        model.zero_grad()
        ids, mask = _lengths_batch(lengths, seed=rank)
        logps, _ = completion_logprobs(model, ids, mask, 16)
        (logps * mask[:, 5:]).sum().backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad / 2
    for r in ranks:
        for n, g in expected.items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-4, atol=1e-5)


def test_a_registered_centre_is_used_with_and_without_unscored_rows(monkeypatch):
    """group_advantages reads the centre from ADVANTAGE_CENTRES on both paths: a new entry (here each
    group's best reward) needs no other change, also when some rows were not scored (NaN)."""
    from sasr.losses import ADVANTAGE_CENTRES, Centre

    best = Centre(
        lambda g: g.max(dim=1, keepdim=True).values, lambda g: g.nan_to_num(-1e9).amax(1, keepdim=True)
    )
    monkeypatch.setitem(ADVANTAGE_CENTRES, "best", best)
    scored = torch.tensor([1.0, 2.0, 4.0, 0.0, 0.0, 3.0])
    adv, _ = group_advantages(scored, 3, "best", "none")
    assert adv.tolist() == [-3.0, -2.0, 0.0, -3.0, -3.0, 0.0]
    unscored = torch.tensor([1.0, float("nan"), 4.0, 0.0, 0.0, 3.0])
    adv, _ = group_advantages(unscored, 3, "best", "none")
    assert adv.tolist() == [-3.0, 0.0, 0.0, -3.0, -3.0, 0.0]  # the unscored row: no advantage


def test_dft_weights_each_demonstration_token_by_its_own_probability():
    """DFT (TRL's loss_type="dft"): -sum sg(p) log p / tokens; the gradient of each token's log-prob is
    -sg(p) / tokens, so confident tokens weigh more and the weight itself is not trained."""
    from sasr.losses import PartInputs, nll_part

    logps = torch.tensor([[-0.5, -1.0, -3.0], [-2.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    no = torch.zeros(2, dtype=torch.bool)
    x = PartInputs(logps, mask, None, None, torch.zeros(2), no, no)
    out = nll_part(x, loss_type="dft")
    p = torch.tensor([[0.5, 1.0, 3.0], [2.0, 0.0, 0.0]]).neg().exp()
    want = (p * torch.tensor([[0.5, 1.0, 3.0], [2.0, 0.0, 0.0]]) * mask).sum() / 4
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    torch.testing.assert_close(logps.grad, -p * mask / 4)
    plain = nll_part(PartInputs(logps.detach(), mask, None, None, torch.zeros(2), no, no))
    assert plain.loss.item() == pytest.approx((0.5 + 1.0 + 3.0 + 2.0) / 4)  # nll, the default, unchanged
    with pytest.raises(SasrError, match="unknown sft.loss .dtf.*valid: asft, dft, nll"):
        nll_part(x, loss_type="dtf")


def test_bnpo_in_micro_batches_is_the_mean_of_their_own_token_means():
    """TRL's bnpo divides each micro-batch's token sum by its own token count and by the number of
    micro-batches: a mean of means, unlike dapo's one token mean over the whole step."""
    from sasr.losses import Norm, PartInputs, pg_part

    logps, _, _, adv, mask = _inputs(5)
    options = dict(
        beta=0.0, epsilon=0.2, epsilon_high=None, max_completion_length=T, use_bias_correction_kl=False
    )
    no = torch.zeros(B, dtype=torch.bool)
    halves = (slice(0, B // 2), slice(B // 2, B))
    norm = Norm(rows=B, tokens=float(mask.sum()), micro_batches=2)

    def loss(loss_type: str, rows: slice, piece: Norm | None) -> torch.Tensor:
        x = PartInputs(logps[rows], mask[rows], None, None, adv[rows], no[rows], no[rows], norm=piece)
        return pg_part(x, loss_type=loss_type, **options).loss

    bnpo = sum(loss("bnpo", h, norm) for h in halves)
    assert bnpo.item() == pytest.approx(sum(loss("bnpo", h, None).item() for h in halves) / 2, rel=1e-6)
    dapo = sum(loss("dapo", h, norm) for h in halves)
    assert dapo.item() == pytest.approx(loss("dapo", slice(0, B), None).item(), rel=1e-6)
    assert mask[halves[0]].sum() != mask[halves[1]].sum() and bnpo.item() != pytest.approx(dapo.item())


def test_token_sum_is_the_peers_loss_remove_token_mean():
    """The official LUFFY and HPT scripts (verl, loss_remove_token_mean=True) divide the RL term's token sum by
    the padded completion length only: it grows with the rows, where dr_grpo divides by them too."""
    from sasr.losses import Norm, PartInputs, pg_part

    logps, _, _, adv, mask = _inputs(6)
    options = dict(
        beta=0.0, epsilon=0.2, epsilon_high=None, max_completion_length=T, use_bias_correction_kl=False
    )
    no = torch.zeros(B, dtype=torch.bool)

    def loss(loss_type: str, rows: slice = slice(0, B), norm: Norm | None = None) -> torch.Tensor:
        x = PartInputs(logps[rows], mask[rows], None, None, adv[rows], no[rows], no[rows], norm=norm)
        return pg_part(x, loss_type=loss_type, **options).loss

    on_policy = -adv[:, None] * mask  # rho = 1: each token's surrogate is -A
    assert loss("token_sum").item() == pytest.approx(on_policy.sum().item() / T, rel=1e-6)
    assert loss("token_sum").item() == pytest.approx(B * loss("dr_grpo").item(), rel=1e-6)
    norm = Norm(rows=B, tokens=float(mask.sum()), micro_batches=2)  # in two micro-batches: the same sum
    halves = loss("token_sum", slice(0, B // 2), norm) + loss("token_sum", slice(B // 2, B), norm)
    assert halves.item() == pytest.approx(loss("token_sum").item(), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_cross_term_to_a_target_distribution_equals_a_full_log_softmax_in_value_and_gradient(temperature):
    """The fused pass's cross term sum_v q_v log p_v (ASFT's KL to pi_ref, less q's own entropy), in chunks,
    beside the selected log-probs: equal to the plain [B, T, V] computation, value and gradient together."""
    from sasr.logprobs import _selective

    torch.manual_seed(0)
    logits = (3 * torch.randn(4, 5, 300)).requires_grad_(True)
    ids = torch.randint(0, 300, (4, 5))
    q = torch.softmax(torch.randn(4, 5, 300), -1)
    q[1] = 0  # a row that wants no anchor
    logps, _, cross = _selective(logits, ids, temperature, False, 3, q)
    full = torch.log_softmax(logits / temperature, -1)
    torch.testing.assert_close(cross, (q * full).sum(-1))
    torch.testing.assert_close(logps, full.gather(-1, ids[..., None]).squeeze(-1))
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    (ours,) = torch.autograd.grad((a * logps + b * cross).sum(), logits)
    (plain,) = torch.autograd.grad(
        (a * full.gather(-1, ids[..., None]).squeeze(-1) + b * (q * full).sum(-1)).sum(), logits
    )
    torch.testing.assert_close(ours, plain)


def test_asft_is_dft_plus_beta_times_the_kl_to_the_reference_as_llama_factory_computes_it():
    """sft.loss=asft on a real model: DFT's loss plus asft_beta x KL(pi_ref || pi_theta) over the whole
    vocabulary, token mean over the demonstration tokens (LLaMA-Factory's _asft_cross_entropy: F.kl_div of
    log pi_theta against pi_ref, summed over the vocabulary); equal in value and in every weight's gradient."""
    import torch.nn.functional as F

    from sasr import models
    from sasr.logprobs import anchored_logprobs, completion_distributions
    from sasr.losses import PartInputs, nll_part

    torch.manual_seed(0)
    policy, reference = models.load_model("tiny"), models.load_model("tiny")
    with torch.no_grad():
        for w in reference.parameters():
            w.add_(0.05 * torch.randn_like(w))  # a reference the policy has moved away from
    ids = torch.randint(3, 1000, (3, 12))
    attn = torch.ones_like(ids)
    attn[2, -3:] = 0  # a shorter demonstration
    T = 5
    q, negentropy = completion_distributions(reference, ids, attn, T)
    logps, _, cross, _ = anchored_logprobs(policy, ids, attn, T, anchor=q)
    mask = attn[:, -T:].float()
    no, kind = torch.zeros(3, dtype=torch.bool), torch.full((3,), DEMO)
    x = PartInputs(logps, mask, None, None, torch.zeros(3), kind, no, anchor_kl=negentropy - cross)
    out = nll_part(x, loss_type="asft", asft_beta=0.1)
    ours = torch.autograd.grad(out.loss, list(policy.parameters()))

    logits = policy(input_ids=ids, attention_mask=attn).logits[:, -T - 1 : -1].float()  # [B, T, V]
    ref_logits = reference(input_ids=ids, attention_mask=attn).logits[:, -T - 1 : -1].float().detach()
    log_p = logits.log_softmax(-1)
    token = log_p.gather(-1, ids[:, -T:, None]).squeeze(-1)
    dft = -(token.detach().exp() * token * mask).sum() / mask.sum()
    kl = F.kl_div(log_p, ref_logits.softmax(-1), reduction="none").sum(-1)  # [B, T]
    want = dft + 0.1 * (kl * mask).sum() / mask.sum()
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert out.stats["asft_kl"] == pytest.approx(((kl * mask).sum() / mask.sum()).item(), rel=1e-4)
    for g, w in zip(ours, torch.autograd.grad(want, list(policy.parameters()))):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert out.stats["asft_kl"] > 0


def test_prefix_rft_advantages_are_centred_within_each_prompt_and_prefix_subgroup():
    """Prefix-RFT (their dr_grpo_prefix): a row's reward minus its (prompt, prefix) subgroup's mean, a subgroup
    of one centred on 0; the prefix tokens' advantage is (that - the on-policy rows' mean) / rows per prefix."""
    from sasr.methods.prefix_rft import prefix_group_advantages

    # one prompt, G = 4: three on-policy rows, one continuing the prefix
    rewards, subgroup = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 1])
    adv, pre, zero = prefix_group_advantages(rewards, subgroup, 4, 1)
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 1.0])  # the lone prefixed row: 1 - 0
    assert pre.tolist() == pytest.approx([0.0, 0.0, 0.0, 1 - 1 / 3])
    assert zero.tolist() == [False]
    # two prompts, G = 4: two on-policy rows and two continuations of the prefix each
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    subgroup = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    adv, pre, zero = prefix_group_advantages(rewards, subgroup, 4, 2)
    assert adv.tolist() == pytest.approx([-0.5, 0.5, 0.0, 0.0, 0, 0, 0, 0])
    assert pre.tolist() == pytest.approx([0, 0, (0 - 0.5) / 2, (0 - 0.5) / 2, 0, 0, 0, 0])
    assert zero.tolist() == [False, True]
    # scale_rewards=group: each subgroup's unbiased std (a subgroup of one: 1); an unscored row: advantage 0
    rewards = torch.tensor([0.0, 1.0, float("nan"), 1.0])
    adv, pre, _ = prefix_group_advantages(rewards, torch.tensor([0, 0, 0, 1]), 4, 1, scale="group")
    std = torch.tensor([0.0, 1.0]).std().item()
    assert adv.tolist() == pytest.approx([-0.5 / std, 0.5 / std, 0.0, 1.0], rel=1e-3)
    assert pre.tolist() == pytest.approx([0, 0, 0, 1.0 - 0.5], rel=1e-3)
    with pytest.raises(SasrError, match="scale_rewards"):
        prefix_group_advantages(rewards, subgroup[:4], 4, 1, scale="batch")


def test_prefix_tokens_train_with_their_own_advantage_clip_and_entropy_mask():
    """Prefix-RFT's loss on a rollout row and a prefixed row: the sampled tokens take the row's advantage and
    the rollouts' clip, the prefix tokens their own advantage and clip range, and of the prefix tokens only
    the highest-entropy share rho keeps its advantage; equal in value and gradient to the formula by hand."""
    from sasr.losses import PartInputs
    from sasr.methods.prefix_rft import PREFIXED, prefix_pg

    T = 5
    logps = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -0.2], [-0.3, -2.5, -1.0, -0.7, -1.2]], requires_grad=True)
    old = logps.detach() + torch.tensor([[0.3, -0.4, 0.1, 0.0, 0.5], [0.5, -0.5, 0.25, -0.3, 0.4]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    prefix = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    entropy = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [0.9, 0.1, 2.0, 0.5, 0.5]])
    adv, prefix_adv = torch.tensor([-0.7, 1.0]), torch.tensor([0.0, -0.6])
    no, kind = torch.zeros(2, dtype=torch.bool), torch.tensor([ROLLOUT, PREFIXED])
    x = PartInputs(
        logps,
        mask,
        entropy,
        None,
        adv,
        kind,
        no,
        old_logps=old,
        given=prefix,
        extras={"prefix_advantages": prefix_adv},
    )
    out = prefix_pg(
        x,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dr_grpo",
        max_completion_length=T,
        use_bias_correction_kl=False,
        # of the 3 prefix tokens int(3 x 0.5) = 1 is dropped: the lowest entropy
        prefix={"prefix_epsilon": 0.1, "prefix_epsilon_high": 0.1, "prefix_entropy_top": 0.5},
    )
    logps2 = logps.detach().clone().requires_grad_(True)
    total = 0.0
    for i in range(2):
        for t in range(T):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logps2[i, t] - old[i, t])
            if prefix[i, t]:
                a, lo, hi = (0.0 if (i, t) == (1, 1) else prefix_adv[i].item()), 0.1, 0.1
            else:
                a, lo, hi = adv[i].item(), 0.2, 0.28
            total = total - torch.min(ratio * a, torch.clamp(ratio, 1 - lo, 1 + hi) * a)
    expected = total / (2 * T)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(out.loss, logps)
    (want,) = torch.autograd.grad(expected, logps2)
    assert torch.allclose(grad, want, atol=1e-7)
    assert grad[1, 1] == 0  # the dropped prefix token trains nothing
    assert out.stats["prefix_kept"] == pytest.approx(2 / 3)
    # the kept prefix tokens' ratios exp(-0.5) and exp(-0.25), below 1 - 0.1 with a negative advantage: clipped
    assert out.stats["prefix_clip_fraction"] == pytest.approx(2 / 3)
    # of the 6 sampled tokens, exp(-0.3) < 1 - 0.2 with A < 0 and exp(0.3) > 1 + 0.28 with A > 0: clipped
    assert out.stats["clip_fraction"] == pytest.approx(2 / 6)


def test_the_entropy_mask_ranks_the_prefix_tokens_of_every_row_at_hand_together():
    """rho is a share of all the prefix tokens the part holds (their micro-batch), not of each row's: here the
    two tokens of the first row are the lowest of four and both drop. A part whose prefix tokens carry no loss
    (cut rows with mask_truncated_completions) gives no prefix statistics and no NaN."""
    from sasr.losses import PartInputs
    from sasr.methods.prefix_rft import PREFIXED, prefix_pg

    logps = torch.full((2, 3), -1.0, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.long)
    prefix = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    entropy = torch.tensor([[0.1, 0.2, 1.0], [0.9, 0.8, 1.0]])
    no, kind = torch.zeros(2, dtype=torch.bool), torch.full((2,), PREFIXED)
    options = dict(beta=0.0, epsilon=0.2, epsilon_high=None, loss_type="dr_grpo", max_completion_length=3)
    prefix_options = {"prefix_epsilon": None, "prefix_epsilon_high": None, "prefix_entropy_top": 0.5}

    def run(mask):
        extras = {"prefix_advantages": torch.ones(2)}
        x = PartInputs(logps, mask, entropy, None, torch.ones(2), kind, no, given=prefix, extras=extras)
        return prefix_pg(x, use_bias_correction_kl=False, prefix=prefix_options, **options)

    out = run(mask)
    (grad,) = torch.autograd.grad(out.loss, logps)
    assert (grad[0, :2] == 0).all() and (grad[1, :2] != 0).all() and (grad[:, 2] != 0).all()
    assert out.stats["prefix_kept"] == 0.5 and out.stats["prefix_clip_fraction"] == 0.0
    none = run(mask * (~prefix).long())  # the prefix tokens masked out of the loss
    assert "prefix_kept" not in none.stats and "prefix_clip_fraction" not in none.stats
    assert torch.isfinite(none.loss)
