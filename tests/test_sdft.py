"""SDFT equal to TRL 1.16's trl.experimental.sdft: the loss of the sampled_token objective (TRL's own loss
functions called on the same logits, value and gradient), and the teacher's prompt (TRL's context builder's
chat, tokenized as its trainer does)."""

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

    config = validate(tiny_config(tmp_path, method="sdft", sdft={"distillation_is_clip": is_clip}))
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


def test_the_options_sdft_shares_with_trl_have_trls_defaults():
    """Read from TRL's SDFTConfig; the mode, alpha and teacher sasr defaults to differ on purpose (TRL's
    topk_logits at alpha 0.5 is not in sasr yet)."""
    from trl.experimental.sdft import SDFTConfig

    from sasr.methods.sdft import SDFTOptions

    trl, ours = SDFTConfig(output_dir="unused", report_to="none", use_cpu=True, bf16=False), SDFTOptions()
    shared = (
        "distillation_is_clip",
        "num_loss_tokens_to_skip",
        "teacher_model_kind",
        "teacher_prompt_template",
    )
    assert {k: getattr(ours, k) for k in shared} == {k: getattr(trl, k) for k in shared}
    assert (trl.distillation_mode, trl.distillation_alpha) == ("topk_logits", 0.5)
    assert (ours.distillation_mode, ours.distillation_alpha) == ("sampled_token", 1.0)


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
