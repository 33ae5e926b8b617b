"""SDPO equal to TRL 1.16's trl.experimental.sdpo: the teacher prompts TRL's SuccessfulRolloutTeacherContextBuilder
builds from a group's rewards, and the blended loss (1 - w) policy + w distillation, TRL's own methods called on
the same logits. TRL's methods read a few attributes of their trainer; a stand-in of one process holds them."""

from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_config

from sasr import models
from sasr.batch import ROLLOUT, Rows
from sasr.collect.contexts import with_contexts
from sasr.config import validate
from sasr.methods import get_method
from sasr.methods.sdpo import CONTEXT, SDPOOptions
from sasr.objective import PassOutputs, micro_loss
from sasr.tasks import get_task
from sasr.trees import dotted


def one_process_trainer(tokenizer, **args):
    """What TRL's SDPO methods read of their trainer, for one process: its args (TRL's defaults, as sasr's),
    its tokenizer, an accelerator whose gathers return what they are given."""
    from trl.experimental.sdpo import SDPOConfig

    config = SDPOConfig(output_dir="unused", report_to="none", use_cpu=True, bf16=False, **args)
    accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        process_index=0,
        gather=lambda x: x,
        pad_across_processes=lambda x, dim, pad_index: x,
    )
    logged = {}
    return SimpleNamespace(
        args=config,
        accelerator=accelerator,
        model=SimpleNamespace(training=True),
        num_generations=4,
        processing_class=tokenizer,
        _tokenizer=tokenizer,
        chat_template_kwargs={},
        importance_sampling_level="token",
        epsilon_low=config.epsilon,
        epsilon_high=config.epsilon_high if config.epsilon_high is not None else config.epsilon,
        loss_type=config.loss_type,
        max_completion_length=config.max_completion_length,
        _metrics={"train": __import__("collections").defaultdict(list)},
        _log_self_distillation_metric=lambda mode, value: logged.setdefault("distill", value),
    )


@pytest.mark.parametrize(
    "dont_self, threshold, think, feedback",
    [
        (True, 1.0, False, None),
        (False, 1.0, True, None),
        (True, 0.5, False, None),
        (True, 1.0, False, "always"),
        (False, 1.0, False, "without_solution"),
    ],
)
def test_the_teacher_prompts_are_trls(tmp_path, dont_self, threshold, think, feedback):
    """Four groups of four rollouts (rewards [1,0,0,1], [0,0,0,0], [1,1,1,1], [0,0.5,0,0]); one completion
    thinks aloud; with environment feedback, the prompts' privileged_context column (blank for one prompt):
    the teacher tokens of every row, which rows distil, and the success and feedback fractions equal TRL's."""
    from trl.experimental.sdpo.sdpo_trainer import SDPOTrainer, SuccessfulRolloutTeacherContextBuilder

    tokenizer = models.load_tokenizer("tiny")
    task = get_task("arithmetic")
    examples = task.examples("train", 4, seed=0)
    rewards = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0.5, 0, 0], dtype=torch.float32)
    texts = [f"attempt {i}: Answer: {i}" for i in range(16)]
    texts[3] = "<think>hmm</think> Answer: 3"
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    T = max(map(len, encoded))
    ids = torch.tensor([e + [tokenizer.pad_token_id] * (T - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (T - len(e)) for e in encoded])

    told = {
        "include_environment_feedback": feedback is not None,
        "environment_feedback_only_without_solution": feedback == "without_solution",
    }
    notes = ["the answer is off by 2", "  ", "check the product", "recount the signs"]  # one blank
    trainer = one_process_trainer(
        tokenizer,
        success_reward_threshold=threshold,
        dont_reprompt_on_self_success=dont_self,
        remove_thinking_from_demonstration=think,
        **told,
    )
    trainer._tokenize_prompts_untruncated = lambda prompts: SDPOTrainer._tokenize_prompts_untruncated(
        trainer, prompts
    )
    builder = SuccessfulRolloutTeacherContextBuilder(trainer)
    prompts = [task.messages(ex) for ex in examples for _ in range(4)]
    feedbacks = [note for note in notes for _ in range(4)]
    want = builder.build({"completion_ids": ids, "completion_mask": mask}, prompts, rewards, feedbacks)
    P = want["teacher_input_ids"].size(1) - T
    want_prompts = [
        r[:P][m[:P].bool()].tolist()
        for r, m in zip(want["teacher_input_ids"], want["teacher_attention_mask"])
    ]

    ones = torch.ones(16, 1, dtype=torch.long)
    rows = Rows(
        ones,
        ones,
        ids,
        mask,
        kind=torch.full((16,), ROLLOUT),
        group=torch.arange(16) // 4,
        rewards=rewards,
        advantages=torch.zeros(16),
        correct=torch.zeros(16, dtype=torch.bool),
        formatted=torch.zeros(16, dtype=torch.bool),
        texts=tokenizer.batch_decode(
            ids * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True
        ),
    )
    config = validate(
        tiny_config(
            tmp_path,
            method="sdpo",
            sdpo={
                "success_reward_threshold": threshold,
                "dont_reprompt_on_self_success": dont_self,
                "remove_thinking_from_demonstration": think,
                **told,
            },
        )
    )
    method = get_method("sdpo", **config.method_kwargs())
    columns = {ex.question: {"privileged_context": note} for ex, note in zip(examples, notes)}
    with_notes = SimpleNamespace(messages=task.messages, columns=lambda ex: columns[ex.question])
    collector = SimpleNamespace(config=config, tokenizer=tokenizer, task=with_notes)
    ask = method.plan(1).gather.contexts
    got, stats = with_contexts(collector, 1, ask, examples, rows)
    got_ids, got_mask = got.contexts[CONTEXT]
    flagged = got.extras[CONTEXT].bool().tolist()
    own = [r[m.bool()].tolist() for r, m in zip(rows.prompt_ids, rows.prompt_mask)]
    # a row TRL does not reprompt keeps TRL's original prompt; sasr keeps the row's own (the same rendering)
    mine = [i[m.bool()].tolist() if f else None for i, m, f in zip(got_ids, got_mask, flagged)]
    assert flagged == want["self_distillation_mask"].bool().tolist()
    assert [m for m in mine if m is not None] == [w for w, f in zip(want_prompts, flagged) if f]
    assert all(o == [1] for o, f in zip(own, flagged) if not f)
    metrics = builder.last_metrics
    assert stats["sdpo_success_group_fraction"] == metrics["self_distillation/success_group_fraction"]
    assert stats["sdpo_success_sample_fraction"] == metrics["self_distillation/success_sample_fraction"]
    assert stats["sdpo_feedback_used_fraction"] == metrics["self_distillation/feedback_used_fraction"]
    assert (stats["sdpo_feedback_used_fraction"] > 0) == (feedback is not None)


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_the_blended_loss_is_trls_in_value_and_gradient(tmp_path, weight, loss_type):
    """(1 - w) x TRL's _compute_policy_loss + w x its _compute_self_distillation_loss, on the same random
    logits, advantages and masks (one row without a teacher), against sasr's SDPO parts through micro_loss."""
    from trl.experimental.sdpo.sdpo_trainer import DistillationLogits, SDPOTrainer

    torch.manual_seed(1)
    B, T, V = 8, 6, 40
    student = (3 * torch.randn(B, T, V)).requires_grad_()
    teacher = torch.randn(B, T, V)
    ids = torch.randint(V, (B, T))
    mask = (torch.arange(T)[None, :] < torch.tensor([6, 4, 2, 6, 1, 5, 3, 6])[:, None]).long()
    taught = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.float32)
    advantages = torch.randn(B)

    tok = models.load_tokenizer("tiny")
    trl = one_process_trainer(tok, distillation_weight=weight, loss_type=loss_type, max_completion_length=T)
    inputs = {"completion_ids": ids, "completion_mask": mask, "advantages": advantages}
    logits = DistillationLogits(ids, mask, mask * taught[:, None].long(), student, teacher)
    policy = SDPOTrainer._compute_policy_loss(trl, inputs, student) if weight < 1 else 0.0
    distill = (
        SDPOTrainer._compute_self_distillation_loss(trl, trl.model, inputs, logits) if weight > 0 else 0.0
    )
    want = (1 - weight) * policy + weight * distill
    (want_grad,) = torch.autograd.grad(want, student, retain_graph=True)

    config = validate(
        tiny_config(
            tmp_path,
            method="sdpo",
            sdpo={"distillation_weight": weight, "loss_type": loss_type},
            grpo={"max_completion_length": T},
        )
    )
    method = get_method("sdpo", **config.method_kwargs())
    ones = torch.ones(B, 1, dtype=torch.long)
    rows = Rows(
        ones,
        ones,
        ids,
        mask,
        kind=torch.full((B,), ROLLOUT),
        group=torch.arange(B) // 4,
        rewards=torch.zeros(B),
        advantages=advantages,
        correct=torch.zeros(B, dtype=torch.bool),
        formatted=torch.zeros(B, dtype=torch.bool),
        extras={CONTEXT: taught},
    )
    parts, _ = method.parts(method.plan(1), rows)
    s = torch.log_softmax(student, -1).gather(-1, ids[..., None]).squeeze(-1)
    t = torch.log_softmax(teacher, -1).gather(-1, ids[..., None]).squeeze(-1)
    out = PassOutputs(s, others={f"{CONTEXT}_ema": t})  # the default teacher's pass
    got, _ = micro_loss(rows, parts, out, dotted(config.model_dump(mode="json")), rollouts=False)
    (got_grad,) = torch.autograd.grad(got, student)
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)


def test_the_options_sdpo_shares_with_trl_have_trls_defaults():
    """Read from TRL's SDPOConfig: every option sasr shares with it has TRL's default."""
    trl = one_process_trainer(models.load_tokenizer("tiny")).args
    ours = SDPOOptions()
    shared = set(SDPOOptions.model_fields) & set(vars(trl)) - {"epsilon_high"}
    assert {k: getattr(ours, k) for k in shared} == {k: getattr(trl, k) for k in shared}
    assert {"distillation_mode", "teacher_model_kind", "teacher_update_rate", "reprompt_template"} <= shared
    assert (ours.epsilon_high or ours.epsilon) == trl.epsilon_high  # null: epsilon, TRL's post-init fill


def test_steps_without_a_teacher_are_said_as_trls_diagnostic_says_them(tmp_path, caplog):
    """No row shown a success: a warning at the first such step in a row, then every 3rd
    (diagnostics_warning_interval), counted again after a step that had a teacher."""
    config = validate(tiny_config(tmp_path, method="sdpo", sdpo={"diagnostics_warning_interval": 3}))
    method = get_method("sdpo", **config.method_kwargs())
    warned = []
    for step, taught in enumerate([0, 0, 0, 0, 0, 0, 1, 0], start=1):
        caplog.clear()
        method.watch(torch.full((4,), float(taught)))
        warned += [step] if "SDPO distils nothing" in caplog.text else []
    assert warned == [1, 3, 6, 8]
