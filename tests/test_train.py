"""End-to-end runs on the `tiny` model: every method, the SASR rule read back from real metrics."""

import json
import math

import pytest
import torch
import yaml
from helpers import read_metrics, weights
from transformers import AutoModelForCausalLM, AutoTokenizer

from sasr import metrics
from sasr.methods import METHODS
from sasr.run_dir import read_lines

REQUIRED = {"step", "phase", "loss", "grad_norm", "lr", "step_seconds"}
GRPO_KEYS = {
    "reward_mean",
    "reward_std",
    "accuracy",
    "kl",
    "completion_length",
    "completion_length_max",
    "clip_fraction",
    "rollout_seconds",
}
SASR_KEYS = {"p_t", "alpha", "g_last", "g_warmup"}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_writes_a_loadable_final(run_tiny, method):
    result, rows = run_tiny(method, method=method, steps=5, warmup_steps=2)
    out = result.output_dir
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert r.keys() >= REQUIRED and r["phase"] in ("sft", "grpo", "mixed")
        assert [k for k in r if metrics.metric(k) is None] == [], "a key sasr writes is not in sasr.metrics"
        # No rollout trains with the clipped objective when HPT routes every prompt to SFT, nor in SDFT and SDPO
        # at its default weight 1 (their ratio cap has its own *_is_clip_fraction): no clip_fraction
        unclipped = r.get("sft_fraction") == 1.0 or method in ("sdft", "sdpo")
        expected = GRPO_KEYS - ({"clip_fraction"} if unclipped else set())
        assert (r.keys() >= expected) == (r["phase"] != "sft")
        if method == "hpt":  # a part with no rows has no value: loss/rl only where a prompt went to RL
            assert ("loss/rl" in r) == (r["sft_fraction"] < 1.0)
        assert (r.keys() >= SASR_KEYS) == (method == "sasr" and r["step"] > 2)
        # a teacher's forward pass over the rollouts counts in the FLOPs (one pass, one update)
        assert r.get("scored_tokens", 0) == (r["trained_tokens"] if method in ("sdft", "sdpo") else 0)
        if r["phase"] != "sft":
            assert 1 <= r["completion_length"] <= r["completion_length_max"] <= 12  # max_completion_length
    phases = [r["phase"] for r in rows]
    expected = {
        "sft": ["sft"] * 5,
        "grpo": ["grpo"] * 5,
        "sft-then-grpo": ["sft", "sft", "grpo", "grpo", "grpo"],
    }
    if method in expected:
        assert phases == expected[method]
    assert result.counts == {p: phases.count(p) for p in ("sft", "grpo", "mixed")}
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "finished" and status["sft_steps"] == phases.count("sft")
    assert "method: " + method in (out / "config.yaml").read_text()
    # final/ is a plain transformers folder: LoRA merged, loadable without peft; the adapter beside it.
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert (out / "adapter" / "adapter_config.json").exists()
    # Each folder has a model card: YAML metadata naming the base model, then the run in words.
    for folder, library in (("final", "transformers"), ("adapter", "peft")):
        _, meta, text = (out / folder / "README.md").read_text().split("---\n", 2)
        meta = yaml.safe_load(meta)
        assert meta["base_model"] == "tiny" and meta["library_name"] == library and method in meta["tags"]
        assert f"method `{method}`" in text and "| after |" in text and "```yaml" in text


def test_sasr_rule_from_a_real_run(run_tiny):
    steps, warmup = 24, 3
    result, rows = run_tiny("a", method="sasr", steps=steps, warmup_steps=warmup, sasr={"gamma": 0.5})
    g_warmup = rows[warmup - 1]["grad_norm"]  # the pre-clip norm of the last warm-up step
    g_last = g_warmup
    for r in rows[warmup:]:
        assert r["g_warmup"] == pytest.approx(g_warmup)
        assert r["g_last"] == pytest.approx(g_last)  # only SFT steps move it
        assert r["p_t"] == pytest.approx(g_last / (g_last + 0.5 * g_warmup))
        assert (r["phase"] == "sft") == (r["alpha"] < r["p_t"])
        if r["phase"] == "sft":
            g_last = r["grad_norm"]
    assert rows[warmup]["p_t"] == pytest.approx(1 / 1.5)
    adaptive = {r["phase"] for r in rows[warmup:]}
    assert adaptive == {"sft", "grpo"}, "24 steps at p ~ 2/3 should see both branches"
    # Same seed, same branch sequence; another seed, another one.
    _, again = run_tiny("b", method="sasr", steps=steps, warmup_steps=warmup, sasr={"gamma": 0.5})
    assert [r["phase"] for r in again] == [r["phase"] for r in rows]
    assert [r["alpha"] for r in again[warmup:]] == [r["alpha"] for r in rows[warmup:]]
    _, other = run_tiny("c", method="sasr", steps=steps, warmup_steps=warmup, seed=1, sasr={"gamma": 0.5})
    assert [r.get("alpha") for r in other] != [r.get("alpha") for r in rows]


def test_kl_to_the_loaded_model(run_tiny):
    """pi_ref = the loaded model (LoRA switched off): equal to the policy at step 1 (LoRA B starts at zero),
    apart from it once SFT steps have moved the adapter."""
    _, rows = run_tiny("g", method="grpo", steps=1, grpo={"beta": 0.1})
    assert rows[0]["kl"] == 0.0
    _, rows = run_tiny("s", method="sft-then-grpo", steps=3, warmup_steps=2, optim={"learning_rate": 5e-2})
    assert rows[2]["kl"] > 0.0


@pytest.mark.parametrize("reference", ["initial", "warmup"])
def test_full_finetuning_and_reference_choice(run_tiny, reference):
    _, rows = run_tiny(
        method="sft-then-grpo",
        steps=4,
        warmup_steps=2,
        lora={"enabled": False},
        grpo={"reference": reference},
        optim={"learning_rate": 1e-2},
    )
    first_grpo = rows[2]
    if reference == "warmup":
        assert first_grpo["kl"] == 0.0  # the snapshot was taken right after the last warm-up step
    else:
        assert first_grpo["kl"] > 0.0  # two SFT steps moved the policy away from the loaded model


def test_final_model_equals_trained_weights(run_tiny):
    """The merged final/ computes what the trained LoRA model computed."""
    from peft import PeftModel

    from sasr import models

    result, _ = run_tiny(method="sft", steps=3, optim={"learning_rate": 1e-2})
    merged = AutoModelForCausalLM.from_pretrained(result.output_dir / "final")
    base = models.load_model("tiny")
    lora = PeftModel.from_pretrained(base, result.output_dir / "adapter")
    ids = torch.randint(0, 1000, (2, 8))
    torch.testing.assert_close(merged(ids).logits, lora(ids).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged(ids).logits, models.load_model("tiny")(ids).logits)


def test_tensorboard_events_hold_every_step(run_tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, rows = run_tiny(
        method="sasr",
        steps=4,
        warmup_steps=2,
        report_to=["tensorboard"],
        log_completions=True,
        sasr={"gamma": 100},
    )
    acc = EventAccumulator(str(result.output_dir / "tensorboard" / "sasr"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/grad_norm", "train/is_sft", "train/p_t"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("train/grad_norm")] == pytest.approx([r["grad_norm"] for r in rows])
    # The samples of the steps with rollouts, as a text table
    texts = acc.Tensors("completions/text_summary")
    assert [e.step for e in texts] == [r["step"] for r in rows if r["phase"] == "grpo"] and texts
    table = texts[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| step | kind | prompt | completion | reward |") and "rollout" in table


def test_trackio_and_wandb_offline_receive_every_step(run_tiny):
    """The run's scalars read back from trackio's local store; wandb writes an offline run."""
    from trackio.sqlite_storage import SQLiteStorage

    result, rows = run_tiny(
        "tracked", method="luffy", steps=3, report_to=["trackio", "wandb"], log_completions=True
    )
    logs = SQLiteStorage.get_logs("sasr", result.output_dir.name)
    tables = [log for log in logs if "completions" in log]  # the samples, as a trackio table per step
    assert len(tables) == 3 and tables[0]["completions"]["_type"] == "trackio.table"
    samples = read_lines(result.output_dir, "completions.jsonl")
    assert len(tables[0]["completions"]["_value"]) == sum(s["step"] == 1 for s in samples)
    logs = [log for log in logs if "train/loss" in log]
    assert [log["step"] for log in logs] == [1, 2, 3]
    assert [log["train/loss"] for log in logs] == pytest.approx([r["loss"] for r in rows])
    assert [log["train/offpolicy_shaped_weight"] for log in logs] == pytest.approx(
        [r["offpolicy_shaped_weight"] for r in rows]
    )
    offline = list((result.output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    from trackio import context_vars

    assert context_vars.current_run.get() is None  # finished: nothing left for trackio to finish at exit
    import wandb

    wandb.teardown()  # wandb's service process outlives its runs; the test leaves no process behind


def test_gradient_checkpointing_gives_the_same_step(run_tiny):
    _, plain = run_tiny("plain", method="sft", steps=2)
    _, ckpt = run_tiny("ckpt", method="sft", steps=2, model={"name": "tiny", "gradient_checkpointing": True})
    for a, b in zip(plain, ckpt):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("method", ["sasr", "luffy"])
def test_held_out_points_during_training_change_no_training(run_tiny, method):
    """eval.every only adds eval_* to some lines (so compare matches a summary without regard to it): the
    same steps and bit-identical final weights with held-out accuracy every 2 steps as with none."""
    plain, _ = run_tiny(f"{method}-plain", method=method, steps=4, warmup_steps=2)
    curve, _ = run_tiny(f"{method}-curve", method=method, steps=4, warmup_steps=2, eval={"every": 2})
    lines, with_points = (read_metrics(r.output_dir, timings=False) for r in (plain, curve))
    assert [r["step"] for r in with_points if "eval_accuracy" in r] == [2, 4]
    assert not any(k.startswith("eval_") for r in lines for k in r)
    assert [{k: v for k, v in r.items() if not k.startswith("eval_")} for r in with_points] == lines
    a, b = weights(plain.output_dir), weights(curve.output_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", METHODS)
def test_resume_from_a_checkpoint_is_bit_identical_for_every_method(tmp_path, method):
    """Every method's state (its generator, counts, g_last...) survives a checkpoint: a run resumed from step 2
    ends with the same metrics and weights as one that never stopped."""
    import shutil

    from helpers import assert_same_run, read_metrics, tiny_config

    import sasr

    top = {
        "method": method,
        "steps": 4,
        "warmup_steps": 1,
        "save_every": 2,
        "sasr": {"gamma": 0.5},
        "eval": {"before": False, "after": False},
    }
    a, b = tmp_path / "a", tmp_path / "b"
    sasr.train(tiny_config(a, **top), progress=False)
    shutil.copytree(a, b)
    shutil.rmtree(b / "final")
    sasr.train(tiny_config(b, **top), progress=False, resume=True)
    assert len(read_metrics(b)) == 4
    assert_same_run(a, b)


def test_demonstrations_from_another_source(tmp_path, run_tiny):
    """RL prompts need only an answer when demonstrations come from elsewhere (demos.task)."""
    from sasr.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(30))
    )
    task = {"name": f"jsonl:{prompts}", "train_size": 20, "test_size": 2}
    _, rows = run_tiny("grpo", method="grpo", steps=2, task=task)
    assert [r["phase"] for r in rows] == ["grpo", "grpo"]
    _, rows = run_tiny(
        "chord", method="chord", steps=2, task=task, demos={"task": "arithmetic", "train_size": 16}
    )
    assert [r["phase"] for r in rows] == ["mixed", "mixed"] and rows[0]["loss/sft"] > 0
    # Without a demonstration source, a method that needs demonstrations says so before training.
    code = main(
        [
            "train",
            "--model",
            "tiny",
            "--task",
            f"jsonl:{prompts}",
            "--method",
            "sft",
            "--quiet",
            "--output",
            str(tmp_path / "sft"),
        ]
    )
    assert code == 2 and not (tmp_path / "sft").exists()


def test_a_conversational_dataset_trains_sft_and_grpo_steps(tmp_path, run_tiny):
    from sasr import models
    from sasr.data import render_prompts
    from sasr.tasks import get_task

    path = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + 1?"},
                {"role": "assistant", "content": f"{i} + 1 = {i + 1}.\nAnswer: {i + 1}"},
            ]
        }
        for i in range(40)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"name": f"jsonl:{path}", "train_size": 30, "test_size": 2}
    _, metrics = run_tiny("chat", method="sft-then-grpo", steps=2, warmup_steps=1, task=task)
    assert [r["phase"] for r in metrics] == ["sft", "grpo"] and metrics[0]["loss"] > 0
    # chat_template_kwargs reach the template (e.g. enable_thinking for models whose template reads it)
    tok = models.load_tokenizer("tiny")
    tok.chat_template = "{% if enable_thinking %}<think>{% endif %}{{ messages[-1]['content'] }}"
    chat = get_task(f"jsonl:{path}")
    exs = chat.examples("train", 2)
    assert render_prompts(tok, chat, exs, {"enable_thinking": True})[0].startswith("<think>")
    assert not render_prompts(tok, chat, exs)[0].startswith("<think>")


def test_report_page_shows_the_curves_and_what_the_model_wrote(run_tiny, capsys):
    """`sasr report` writes index.html: the summary, the figure, and samples of every step with rollouts, the
    best and worst rewarded, their text escaped."""
    from html import escape
    from html.parser import HTMLParser

    from sasr.cli import main

    result, rows = run_tiny("page", method="grpo", steps=2, log_completions=True, eval={"before": True})
    assert main(["report", str(result.output_dir)]) == 0
    page = result.output_dir / "report" / "index.html"
    assert "index.html (open it in a browser)" in capsys.readouterr().out

    class Outline(HTMLParser):
        def __init__(self):
            super().__init__()
            self.samples, self.images, self.headings, self._in = 0, [], [], None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "div" and "sample" in attrs.get("class", ""):
                self.samples += 1
            if tag == "img":
                self.images.append(attrs["src"])
            self._in = tag

        def handle_data(self, data):
            if self._in in ("h1", "h2", "h3") and data.strip():
                self.headings.append(data.strip())

    outline = Outline()
    outline.feed(page.read_text())
    assert outline.images == ["training.png"] and (page.parent / "training.png").is_file()
    assert {"Step 1", "Step 2", "What the model wrote", "Training curves"} <= set(outline.headings)
    assert outline.samples == 2 * 4 + 2 * 4  # 4 of each step's 2 x 4 rollouts; 4 answers of each evaluation
    answers = read_lines(result.output_dir, "eval_completions.jsonl")
    assert [a["eval"] for a in answers] == ["eval before"] * 4 + ["eval after"] * 4
    assert {"question", "completion", "reward", "correct", "step"} <= answers[0].keys()
    assert [a["step"] for a in answers] == [0] * 4 + [2] * 4
    samples = read_lines(result.output_dir, "completions.jsonl")
    best = max((s for s in samples if s["step"] == 1), key=lambda s: s["reward"])
    assert escape(best["completion"]) in page.read_text()


def test_dft_reaches_every_demonstration_part(run_tiny):
    """sft.loss=dft weights each demonstration token by its own p < 1: the same first step's loss is below
    plain NLL's, for SFT steps and for CHORD's SFT part alike."""
    for method, key in (("sft", "loss"), ("chord", "loss/sft")):
        _, nll = run_tiny(f"{method}-nll", method=method, steps=1, eval={"before": False, "after": False})
        _, dft = run_tiny(
            f"{method}-dft",
            method=method,
            steps=1,
            eval={"before": False, "after": False},
            sft={"loss": "dft"},
        )
        assert 0 < dft[0][key] < nll[0][key], method


def test_asft_anchors_every_demonstration_part_to_the_reference(run_tiny):
    """sft.loss=asft: at step 1 the policy is still the reference (LoRA's B starts at 0: KL 0, the loss is
    DFT's), then it is above 0; with full fine-tuning the reference is a copy; CHORD's SFT part takes it too."""
    off = {"before": False, "after": False}
    _, dft = run_tiny("sft-dft", method="sft", steps=1, eval=off, sft={"loss": "dft"})
    _, asft = run_tiny("sft-asft", method="sft", steps=3, eval=off, sft={"loss": "asft", "asft_beta": 0.5})
    assert asft[0]["asft_kl"] == pytest.approx(0.0, abs=1e-6)
    assert asft[0]["loss"] == pytest.approx(dft[0]["loss"], abs=1e-6)  # KL 0 up to rounding
    assert asft[1]["asft_kl"] > 1e-8 and asft[2]["asft_kl"] > 1e-8  # the policy has moved off pi_ref
    _, full = run_tiny(
        "sft-asft-full", method="sft", steps=2, eval=off, sft={"loss": "asft"}, lora={"enabled": False}
    )
    assert full[0]["asft_kl"] == pytest.approx(0.0, abs=1e-6) and full[1]["asft_kl"] > 1e-8
    _, chord = run_tiny("chord-asft", method="chord", steps=2, eval=off, sft={"loss": "asft"})
    assert all("asft_kl" in r and "loss/sft" in r for r in chord)


def test_max_flops_stops_each_method_at_the_same_compute(run_tiny, tmp_path):
    """max_flops: a run stops after the step whose flops_total reaches it, its final model evaluated and
    saved and run.json saying where it stopped; SFT steps cost less than GRPO steps, so at one budget the SFT
    run takes more of them."""
    from sasr.run_dir import read_status

    quiet = {"before": False, "after": True}
    _, grpo = run_tiny("grpo-all", method="grpo", steps=4, eval={"before": False, "after": False})
    budget = grpo[1]["flops_total"]  # what two GRPO steps cost
    stopped = {}
    for method in ("grpo", "sft"):
        result, lines = run_tiny(f"{method}-budget", method=method, steps=40, max_flops=budget, eval=quiet)
        assert lines[-1]["flops_total"] >= budget > lines[-2]["flops_total"]
        status = read_status(result.output_dir)
        assert status["status"] == "finished" and status["max_flops_step"] == len(lines) < 40
        assert result.eval_after is not None and (result.output_dir / "final").is_dir()
        stopped[method] = len(lines)
    assert stopped["grpo"] == 2 and stopped["sft"] > 2


def test_flops_equal_the_formula_on_the_logged_token_counts(run_tiny):
    """6 N per trained token (num_iterations passes, and SASR's probe) + 2 N per generated token, N the tiny
    model's parameters; flops_total their running sum."""
    from sasr import models

    n = sum(p.numel() for p in models.load_model("tiny").parameters())
    quiet = {"before": False, "after": False}
    _, grpo = run_tiny("grpo", method="grpo", steps=2, grpo={"num_iterations": 2}, eval=quiet)
    _, probed = run_tiny("sasr", method="sasr", steps=4, warmup_steps=2, sasr={"probe_every": 1}, eval=quiet)
    for rows in (grpo, probed):
        total = 0.0
        for r in rows:
            assert r["flops"] == 6 * n * r["trained_tokens"] + 2 * n * r.get("generated_tokens", 0)
            total += r["flops"]
            assert r["flops_total"] == total
    for r in grpo:  # two updates on the step's rows; every rollout's tokens sampled once
        assert r["trained_tokens"] == 2 * r["tokens"]
        assert r["generated_tokens"] == round(r["completion_length"] * 2 * 4)  # 2 prompts x G = 4
    probe = [r for r in probed if "probe_grad_norm" in r]
    assert probe and all(r["trained_tokens"] > r["tokens"] for r in probe)  # the probe's tokens count too
    assert all(r["trained_tokens"] == r["tokens"] for r in probed if r["phase"] == "sft")


def test_unscored_rollouts_stay_nan_in_the_samples_and_the_report_reads_them(run_tiny, tmp_path):
    """A row no reward function scored keeps reward NaN in completions.jsonl (only metrics.jsonl is strict
    JSON), and `sasr report` still draws its page."""
    from helpers import reward_module

    from sasr.cli import main
    from sasr.run_dir import read_lines

    fn = reward_module(
        tmp_path, "def half(completions, **kw):\n    return [None, 1.0] * (len(completions) // 2)\n"
    )
    result, _ = run_tiny(
        "unscored", method="grpo", steps=1, log_completions=True, reward_funcs=[f"{fn}:half"]
    )
    rewards = [s["reward"] for s in read_lines(result.output_dir, "completions.jsonl")]
    assert (
        rewards and all(math.isnan(r) for r in rewards[::2]) and rewards[1::2] == [1.0] * (len(rewards) // 2)
    )
    assert main(["report", str(result.output_dir)]) == 0
    assert (result.output_dir / "report" / "index.html").is_file()


def test_relift_adds_an_sft_update_to_the_step_that_fills_its_buffer_and_resumes_across_it(tmp_path):
    """On `tiny` every rollout fails, so each RL update puts its 2 prompts at the front of the buffer: with
    buffer_size 3, steps 2, 3 and 5 also take an SFT update (its own optimizer, the SFT rate) on the newest 3,
    which leave it; a run resumed from step 2 (buffer and both optimizers in the checkpoint) ends identical."""
    import shutil

    from helpers import assert_same_run, read_metrics, tiny_config

    import sasr
    from sasr.checkpoint import complete_checkpoints

    top = {
        "method": "relift",
        "steps": 5,
        "save_every": 2,
        "relift": {"buffer_size": 3, "sft_learning_rate": 1e-6},
        "eval": {"before": False, "after": False},
    }
    a, b = tmp_path / "a", tmp_path / "b"
    sasr.train(tiny_config(a, **top), progress=False)
    lines = read_metrics(a)
    assert [r["phase"] for r in lines] == ["grpo", "mixed", "mixed", "grpo", "mixed"]
    assert [r["relift_buffer"] for r in lines] == [0, 2, 1, 0, 2]
    assert all(r["relift_failed"] == 1.0 and r["lr"] == 1e-4 for r in lines)
    sft = [r for r in lines if r["phase"] == "mixed"]
    assert all(r["relift_sft_prompts"] == 3 and r["update/sft/lr"] == 1e-6 for r in sft)
    assert all(r["update/sft/grad_norm"] > 0 for r in sft) and lines[1]["tokens"] > lines[0]["tokens"]
    shutil.copytree(a, b)
    shutil.rmtree(b / "final")
    steps = [p.name for p in complete_checkpoints(b)]
    assert steps == ["step-000002", "step-000004"]
    shutil.rmtree(b / "checkpoints" / steps[-1])  # resume from step 2: the buffer, then the SFT step
    sasr.train(tiny_config(b, **top), progress=False, resume=True)
    assert_same_run(a, b)


def test_with_scarce_demonstrations_relift_buffers_only_prompts_it_can_teach(run_tiny):
    """demos.size=2 of 8 RL prompts: every rollout of `tiny` fails, but only the two demonstrated prompts
    (indices 0 and 1: the scarce ones come first) join ReLIFT's buffer, as the step's draws say; the buffer
    (default size: the step's 2 prompts) fills only when two of them have been drawn."""
    from sasr.data import pick

    top = {"method": "relift", "steps": 6, "task": {"train_size": 8}, "demos": {"size": 2}}
    _, lines = run_tiny("relift-scarce", **top, eval={"before": False, "after": False})
    drawn = [pick(8, 2, step, 0, "grpo", 0, 1) for step in range(1, 7)]
    buffer, planned, updates = 0, [], []
    for idx in drawn:
        planned.append(buffer)
        buffer += sum(i < 2 for i in idx)
        updates.append(buffer >= 2)
        buffer = buffer - 2 if buffer >= 2 else buffer
    assert [r["relift_buffer"] for r in lines] == planned
    assert [r["phase"] == "mixed" for r in lines] == updates
    assert all(r["relift_failed"] == 1.0 for r in lines)  # every prompt failed; few could be taught
    assert 0 < sum(updates) < 6


def test_the_two_stage_baseline_trains_each_stage_at_its_own_rate(run_tiny):
    """Each step's line gives the rate it trained at: the SFT stage's cosine (1 of 2 steps: half the peak,
    then the floor 0 at the switch), then the RL stage's constant."""
    stages = {"switch_step": 2, "sft_learning_rate": 1e-3, "rl_learning_rate": 1e-5, "sft_weight_decay": 0.1}
    quiet = {"before": False, "after": False}
    _, lines = run_tiny("two", method="sft-then-grpo", steps=3, eval=quiet, **{"sft-then-grpo": stages})
    assert [r["phase"] for r in lines] == ["sft", "sft", "grpo"]
    assert [r["lr"] for r in lines] == [pytest.approx(5e-4), pytest.approx(0.0, abs=1e-15), 1e-5]


def test_the_rl_stage_can_start_with_a_fresh_optimizer(run_tiny):
    """With rl_fresh_optimizer, AdamW's state is cleared at the first RL step: the checkpoint after 4 steps
    (2 SFT, 2 RL) holds a step count of 2, where the continued state counts all 4."""
    quiet = {"before": False, "after": False}

    def adam_steps(name: str, fresh: bool) -> set[float]:
        options = {"switch_step": 2, "rl_fresh_optimizer": fresh}
        result, _ = run_tiny(
            name, method="sft-then-grpo", steps=5, save_every=4, eval=quiet, **{"sft-then-grpo": options}
        )
        state = torch.load(
            result.output_dir / "checkpoints" / "step-000004" / "optimizer.pt", weights_only=False
        )["state"]
        return {float(s["step"]) for s in state.values()}

    assert adam_steps("fresh", True) == {2.0} and adam_steps("continued", False) == {4.0}


def test_each_line_gives_the_rate_its_step_trained_at(run_tiny):
    """A linear schedule from 1e-3 over 4 steps: the steps train at 1e-3, 7.5e-4, 5e-4, 2.5e-4."""
    quiet = {"before": False, "after": False}
    optim = {"learning_rate": 1e-3, "lr_scheduler_type": "linear"}
    _, lines = run_tiny("lr", method="sft", steps=4, optim=optim, eval=quiet)
    assert [r["lr"] for r in lines] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
