"""SDFT equal to TRL 1.16's trl.experimental.sdft: the loss of each objective (sampled_token, topk_logits,
full_logits; TRL's own loss functions called on the same logits, value and gradient), and the teacher's prompt
(TRL's context builder's chat, tokenized as its trainer does)."""

from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_config

from sasr import models
from sasr.batch import ROLLOUT, Ask, Rows
from sasr.collect.contexts import with_contexts
from sasr.config import validate
from sasr.errors import SasrError
from sasr.methods import get_method
from sasr.methods.sdft import CONTEXT
from sasr.objective import PassOutputs, micro_loss
from sasr.tasks import get_task
from sasr.trees import dotted


def trl_sdft_loss(student_logits, teacher_logits, ids, mask, old, is_clip):
    """trl/experimental/sdft/sdft_trainer.py (TRL 1.16.0) SDFTTrainer._compute_self_distillation_loss for
    distillation_mode='sampled_token': TRL's loss functions called as it calls them, then its aggregation
    (each row's token mean, then the mean over rows; a row without tokens counts as 0)."""
    from trl.experimental.sdft.loss_utils import (
        apply_importance_sampling_clipping,
        compute_sampled_token_self_distillation_loss,
    )
    from trl.trainer.utils import selective_log_softmax

    per_token = compute_sampled_token_self_distillation_loss(
        student_logits, teacher_logits, ids, distillation_alpha=1.0
    )
    if is_clip is not None and old is not None:
        student = selective_log_softmax(student_logits, ids)
        per_token = apply_importance_sampling_clipping(per_token, student, old, is_clip)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _rows(ids, mask) -> Rows:
    B = ids.size(0)
    ones = torch.ones(B, 2, dtype=torch.long)
    return Rows(
        ones,
        ones,
        ids,
        mask,
        kind=torch.full((B,), ROLLOUT),
        group=torch.arange(B),
        rewards=torch.zeros(B),
        advantages=torch.zeros(B),
        correct=torch.zeros(B, dtype=torch.bool),
        formatted=torch.zeros(B, dtype=torch.bool),
        extras={CONTEXT: torch.ones(B)},
    )


@pytest.mark.parametrize("old, is_clip", [(False, 2.0), (True, 2.0), (True, None), (True, 1.2)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_sampled_token_loss_is_trls_in_value_and_gradient(tmp_path, old, is_clip, temperature):
    """On random logits (B=6, T=7, V=50; one row without tokens), sasr's part loss through micro_loss and
    TRL's functions give the same value and the same gradient with respect to the student's logits."""
    torch.manual_seed(0)
    B, T, V = 6, 7, 50
    student = (3 * torch.randn(B, T, V)).requires_grad_()
    teacher = torch.randn(B, T, V)
    ids = torch.randint(V, (B, T))
    lengths = torch.tensor([7, 5, 1, 0, 3, 6])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    s_logits, t_logits = student / temperature, teacher / temperature
    s = torch.log_softmax(s_logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    t = torch.log_softmax(t_logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    old_logps = (s.detach() - torch.randn(B, T).abs()) if old else None  # some ratios above the clip

    want = trl_sdft_loss(s_logits, t_logits, ids, mask, old_logps, is_clip)
    (want_grad,) = torch.autograd.grad(want, student, retain_graph=True)

    sampled = {
        "distillation_mode": "sampled_token",
        "distillation_alpha": 1.0,
        "distillation_is_clip": is_clip,
    }
    config = validate(tiny_config(tmp_path, method="sdft", sdft=sampled))
    method = get_method("sdft", **config.method_kwargs())
    rows = _rows(ids, mask)
    parts, _ = method.parts(method.plan(1), rows)
    out = PassOutputs(s, old=old_logps, others={f"{CONTEXT}_base": t})
    got, stats = micro_loss(rows, parts, out, dotted(config.model_dump(mode="json")), rollouts=False)
    (got_grad,) = torch.autograd.grad(got, student)
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    if old and is_clip is not None:
        assert stats["sdft_is_clip_fraction"] > 0  # the cap was met


def trl_distribution_loss(student_logits, teacher_logits, ids, mask, old, is_clip, mode, **how):
    """SDFTTrainer._compute_self_distillation_loss (TRL 1.16.0, trl/experimental/sdft/sdft_trainer.py) for
    distillation_mode topk_logits / full_logits: compute_topk_self_distillation_loss or
    compute_full_logit_self_distillation_loss, the IS clip on the student's sampled-token log-probs, each
    row's token mean, the mean over rows."""
    from trl.experimental.sdft.loss_utils import (
        apply_importance_sampling_clipping,
        compute_full_logit_self_distillation_loss,
        compute_topk_self_distillation_loss,
    )
    from trl.trainer.utils import selective_log_softmax

    if mode == "topk_logits":
        per_token = compute_topk_self_distillation_loss(student_logits, teacher_logits, **how)
    else:
        per_token = compute_full_logit_self_distillation_loss(
            student_logits, teacher_logits, distillation_alpha=how["distillation_alpha"]
        )
    if is_clip is not None and old is not None:
        student = selective_log_softmax(student_logits, ids)
        per_token = apply_importance_sampling_clipping(per_token, student, old, is_clip)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


@pytest.mark.parametrize(
    "mode, alpha, add_tail",
    [
        ("full_logits", 0.0, False),
        ("full_logits", 0.5, False),
        ("full_logits", 1.0, False),
        ("topk_logits", 0.0, False),
        ("topk_logits", 0.3, False),
        ("topk_logits", 1.0, False),
        ("topk_logits", 0.5, True),
        ("topk_logits", 1.0, True),
    ],
)
@pytest.mark.parametrize("temperature, old", [(1.0, False), (0.7, True)])
def test_the_distribution_losses_are_trls_in_value_and_gradient(
    tmp_path, mode, alpha, add_tail, temperature, old
):
    """topk_logits (k = 5) and full_logits on random logits (B=6, T=7, V=50; one row without tokens): the
    divergence computed chunk by chunk as the policy pass computes it (chunks of 4 tokens, across rows), then
    the part loss, give TRL's value and gradient with respect to the student's logits."""
    from sasr.divergences import token_divergence
    from sasr.losses import PART_LOSSES
    from sasr.objective import options

    torch.manual_seed(1)
    B, T, V = 6, 7, 50
    student = (3 * torch.randn(B, T, V)).requires_grad_()
    teacher = 3 * torch.randn(B, T, V)
    ids = torch.randint(V, (B, T))
    lengths = torch.tensor([7, 5, 1, 0, 3, 6])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    s_logits, t_logits = student / temperature, teacher / temperature
    s = torch.log_softmax(s_logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    old_logps = (s.detach() - torch.randn(B, T).abs()) if old else None
    how = {"distillation_alpha": alpha}
    if mode == "topk_logits":
        how |= {"distillation_topk": 5, "distillation_add_tail": add_tail}
    want = trl_distribution_loss(s_logits, t_logits, ids, mask, old_logps, 2.0, mode, **how)
    (want_grad,) = torch.autograd.grad(want, student)

    sdft = {"distillation_mode": mode, "distillation_topk": 5, "distillation_add_tail": add_tail}
    config = validate(tiny_config(tmp_path, method="sdft", sdft={**sdft, "distillation_alpha": alpha}))
    method = get_method("sdft", **config.method_kwargs())
    rows = _rows(ids, mask)
    parts, _ = method.parts(method.plan(1), rows)
    settings = dotted(config.model_dump(mode="json"))
    name, fn = PART_LOSSES[parts[0].loss].divergence(options(parts[0], settings))
    divergence = token_divergence(student, t_logits, fn, temperature, chunk=4)
    t = t_logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    out = PassOutputs(s, old=old_logps, others={name: t}, divergence=divergence)
    got, stats = micro_loss(rows, parts, out, settings, rollouts=False)
    (got_grad,) = torch.autograd.grad(got, student)
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    assert stats["sdft_distillation_loss"] > 0


def test_the_divergence_in_the_policy_pass_is_a_plain_forwards_in_every_weights_gradient():
    """On a real model, anchored_logprobs' divergence (length groups, shared prompts, chunks) equals the
    TokenDivergence of a plain forward's logits, in value and in the gradient of every weight."""
    from sasr.divergences import TokenDivergence
    from sasr.logprobs import anchored_logprobs

    torch.manual_seed(0)
    policy = models.load_model("tiny")
    prompt = torch.randint(3, 1000, (1, 6)).repeat(4, 1)  # one prompt, four completions (shared prompt)
    ids = torch.cat([prompt, torch.randint(3, 1000, (4, 9))], 1)
    attn = torch.ones_like(ids)
    attn[1, -6:] = 0  # completions of other lengths: other length groups
    attn[3, -2:] = 0
    T, V = 9, policy.config.vocab_size
    target = 2 * torch.randn(4, T, V)
    fn = TokenDivergence(0.5, topk=7, add_tail=True)
    _, _, _, ours = anchored_logprobs(policy, ids, attn, T, 0.8, divergence=(target, fn))
    weights = torch.rand(4, T) * attn[:, -T:]
    grads = torch.autograd.grad((weights * ours).sum(), list(policy.parameters()))

    logits = policy(input_ids=ids, attention_mask=attn).logits[:, -T - 1 : -1]
    plain = fn(logits.reshape(-1, V).float() / 0.8, target.reshape(-1, V)).view(4, T)
    real = attn[:, -T:].bool()
    torch.testing.assert_close(ours[real], plain[real], rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, torch.autograd.grad((weights * plain).sum(), list(policy.parameters()))):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lora", [True, False])
def test_the_ema_teacher_is_trls(lora):
    """teacher_model_kind=ema: after each of 3 steps that move the student, the averaged weights sasr swaps in
    compute exactly the logits of TRL 1.16's ema teacher: under LoRA, PEFTAdapterEMACallback's second adapter
    (trl/experimental/sdft/teacher_sync.py, started at zero, on_step_end), otherwise a copy of the initial model
    synced by SyncTeacherModelCallback (trl/trainer/callbacks.py, SyncRefModelCallback._sync_target_model)."""
    import copy

    from transformers import TrainerControl, TrainerState
    from trl.experimental.sdft.teacher_sync import PEFTAdapterEMACallback, SyncTeacherModelCallback

    from sasr.config import LoraSection
    from sasr.reference import AveragePolicy

    torch.manual_seed(0)
    base = models.load_model("tiny")
    student = models.apply_lora(base, LoraSection(enabled=True, r=4)) if lora else base
    theirs = copy.deepcopy(student)  # TRL's student, moved as ours is
    if lora:
        callback = PEFTAdapterEMACallback(theirs, update_rate=0.3)
        callback.on_train_begin(None, TrainerState(), TrainerControl())
        teacher = theirs
    else:
        teacher = copy.deepcopy(theirs)  # TRL loads the initial model again as the teacher
        callback = SyncTeacherModelCallback(teacher)
    ours = AveragePolicy(student, lora, rate=0.3)
    ids = torch.randint(3, 1000, (2, 8))
    for step in (1, 2, 3):
        with torch.no_grad():
            for model in (student, theirs):
                torch.manual_seed(step)
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.1 * torch.randn_like(p))
        ours.update()
        state = TrainerState(global_step=step)
        args = SimpleNamespace(teacher_sync_steps=1, teacher_update_rate=0.3)
        if lora:
            callback.on_step_end(args, state, TrainerControl(), model=theirs)
        else:  # on_step_end's arithmetic (its wrapper asks accelerate whether DeepSpeed gathers the weights)
            callback._sync_target_model(theirs, teacher, args.teacher_update_rate)
        with torch.no_grad(), ours.active():
            got = student(input_ids=ids).logits
        if lora:
            theirs.set_adapter("teacher")
        with torch.no_grad():
            want = teacher(input_ids=ids).logits
        if lora:
            theirs.set_adapter("default")
        assert torch.equal(got, want), step
    with torch.no_grad():
        assert not torch.equal(student(input_ids=ids).logits, want)  # the teacher trails the student


def test_the_options_sdft_shares_with_trl_have_trls_defaults():
    """Read from TRL's SDFTConfig: every option sasr shares with it has TRL's default."""
    from trl.experimental.sdft import SDFTConfig

    from sasr.methods.sdft import SDFTOptions

    trl, ours = SDFTConfig(output_dir="unused", report_to="none", use_cpu=True, bf16=False), SDFTOptions()
    shared = set(SDFTOptions.model_fields) & set(vars(trl))
    assert {k: getattr(ours, k) for k in shared} == {k: getattr(trl, k) for k in shared}
    assert {"distillation_mode", "distillation_topk", "distillation_alpha", "teacher_model_kind"} <= shared


def test_the_teacher_prompt_is_trls(tmp_path):
    """The teacher's chat is the one TRL's DemonstrationTeacherContextBuilder composes (system turn kept, the
    last user turn rewritten by the template), and its tokens those TRL's trainer feeds: the chat template with
    the generation prompt, its last max_prompt_length tokens."""
    from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder

    task = get_task("arithmetic")
    examples = task.examples("train", 3, seed=0)
    tokenizer = models.load_tokenizer("tiny")
    for template, limit in (
        ("{prompt}\n\n{privileged_context}", 512),
        ("Q: {prompt}\nA: {privileged_context}", 40),
    ):
        trl = DemonstrationTeacherContextBuilder(
            SimpleNamespace(args=SimpleNamespace(teacher_prompt_template=template))
        )
        chats = [trl._compose_teacher_prompt(task.messages(ex), task.target(ex)) for ex in examples]
        tokens = tokenizer.apply_chat_template(
            chats, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        want = [ids[-limit:] for ids in tokens["input_ids"]]

        config = validate(tiny_config(tmp_path, method="sdft", grpo={"max_prompt_length": limit}))
        collector = SimpleNamespace(
            config=config,
            tokenizer=tokenizer,
            task=task,
            has_demonstration=lambda i: True,
            index_of=lambda ex: 0,
        )
        B = len(examples)
        rows = _rows(torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.long))
        rows.extras = {}
        ask = Ask(CONTEXT, {"template": template, "skip": False})
        got, stats = with_contexts(collector, 1, ask, examples, rows)
        ids, mask = got.contexts[CONTEXT]
        assert [i[m.bool()].tolist() for i, m in zip(ids, mask)] == want
        assert got.extras[CONTEXT].tolist() == [1.0] * B and stats == {"sdft_no_demonstration": 0.0}
    assert max(len(t) for t in tokens["input_ids"]) > limit  # the cut happened (the start is gone, as in TRL)
    assert all(len(w) == limit for w in want)

    collector.has_demonstration = lambda i: False
    with pytest.raises(SasrError, match="set sdft.skip_prompts_without_demonstration=true"):
        with_contexts(collector, 1, ask, examples, rows)
    skipped, stats = with_contexts(
        collector, 1, Ask(CONTEXT, {"template": template, "skip": True}), examples, rows
    )
    assert skipped.extras[CONTEXT].tolist() == [0.0] * B and stats == {"sdft_no_demonstration": 1.0}
    ids, mask = skipped.contexts[CONTEXT]
    assert (ids == rows.prompt_ids).all()  # a row without a demonstration keeps its own prompt


def test_with_few_demonstrations_sdft_refuses_or_draws_only_the_prompts_that_have_one(run_tiny):
    """demos.size=3: the RL prompts without a demonstration stop the run in one sentence by default; with
    sdft.prompts_with_demonstration_only every prompt drawn is one of the three, and each row has a teacher."""
    import json

    from sasr.errors import SasrError

    top = {"method": "sdft", "steps": 3, "demos": {"size": 3}, "log_completions": True}
    top["eval"] = {"before": False, "after": False}
    with pytest.raises(SasrError, match="sdft.prompts_with_demonstration_only=true"):
        run_tiny("refused", **top)
    result, lines = run_tiny("only", **top, sdft={"prompts_with_demonstration_only": True})
    assert [r["sdft_no_demonstration"] for r in lines] == [0.0] * 3
    samples = (result.output_dir / "completions.jsonl").read_text().splitlines()
    assert len({json.loads(s)["prompt"] for s in samples}) <= 3


def test_generate_from_teacher_samples_under_trls_generation_prompt_and_trains_under_the_students(tmp_path):
    """generate_from_teacher: the rollouts are sampled from the chat TRL's select_generation_prompts gives
    (the teacher's), while the rows keep the prompt alone, as TRL's batch keeps the student's prompt ids."""
    from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder

    from sasr.collect.groups import prompt_texts, under_own_prompts

    task = get_task("arithmetic")
    examples = task.examples("train", 2, seed=0)
    tokenizer = models.load_tokenizer("tiny")
    config = validate(tiny_config(tmp_path, method="sdft", sdft={"generate_from_teacher": True}))
    method = get_method("sdft", **config.method_kwargs())
    collector = SimpleNamespace(
        config=config, tokenizer=tokenizer, task=task, has_demonstration=lambda i: True, index_of=lambda ex: 0
    )
    sampled, judged, own = prompt_texts(collector, 1, examples, method.plan(1).gather)
    trl = DemonstrationTeacherContextBuilder(
        SimpleNamespace(args=SimpleNamespace(teacher_prompt_template="{prompt}\n\n{privileged_context}"))
    )
    chats = trl.select_generation_prompts(
        [task.messages(ex) for ex in examples], [task.target(ex) for ex in examples]
    )
    assert sampled == [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats
    ]
    assert own == [
        tokenizer.apply_chat_template(task.messages(ex), tokenize=False, add_generation_prompt=True)
        for ex in examples
    ]
    assert judged == ["", ""]
    rows = _rows(torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2, dtype=torch.long))
    rows.group, rows.sampler_logprobs = torch.tensor([0, 0, 1, 1]), torch.zeros(4, 2)
    rows = under_own_prompts(collector, rows, own)
    want = [tokenizer(own[g], add_special_tokens=False)["input_ids"] for g in (0, 0, 1, 1)]
    assert [i[m.bool()].tolist() for i, m in zip(rows.prompt_ids, rows.prompt_mask)] == want
    assert rows.sampler_logprobs is None  # the sampler's were under the teacher's prompt


def test_a_top_k_wider_than_the_vocabulary_is_one_sentence():
    from sasr.divergences import TokenDivergence

    with pytest.raises(SasrError, match="distillation_topk is 60, more than the model's 50 tokens"):
        TokenDivergence(0.5, topk=60)(torch.randn(2, 50), torch.randn(2, 50))
