"""A user's own method, from a file of their own: the example hybrid trains, logs its metric and joins a
comparison; a method may take several updates a step with optimizers of its own, ask for a pass of its own and
keep tensors, all resumed bit-exactly; a bad method file gets one sentence."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from helpers import ENV, ROOT, TINY_ARGS, assert_same_run, read_metrics, tiny_config

from sasr.checkpoint import complete_checkpoints
from sasr.cli import main

EXAMPLE = "examples/raft_sft.py:RaftSFT"
SMALL = [*TINY_ARGS, "--set", "task.train_size=64", "--set", "grpo.num_generations=4"]


def test_the_example_hybrid_trains_logs_its_metric_and_joins_a_comparison(tmp_path, monkeypatch, capsys):
    """docs/methods.md's example, as written: two `tiny` steps with its own option, its own loss term and its
    own metric in metrics.jsonl; then `sasr compare` beside sft, its row named by the class."""
    monkeypatch.chdir(ROOT)  # the spec is relative, as the docs write it
    run = tmp_path / "run"
    argv = ["train", "--method", EXAMPLE, "--steps", "2", "--set", "RaftSFT.sft_weight=0.25", *SMALL]
    assert main([*argv, "--output", str(run)]) == 0
    lines = read_metrics(run)
    assert [r["phase"] for r in lines] == ["mixed", "mixed"]
    assert all(0.0 <= r["raft_kept"] <= 1.0 and r["weight/sft"] == 0.25 and "loss/raft" in r for r in lines)
    status = json.loads((run / "run.json").read_text())
    assert status["method_source"]["spec"] == EXAMPLE and len(status["method_source"]["sha256"]) == 64
    out = tmp_path / "cmp"
    cmp = ["compare", "--methods", f"sft,{EXAMPLE}", "--steps", "2", "--seeds", "1", "--samples", "0"]
    assert main([*cmp, *SMALL, "--set", "task.test_size=2", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"untrained", "sft", "RaftSFT"}
    summary = json.loads((out / "summaries" / "RaftSFT-s1.json").read_text())
    assert summary["method_source"] == status["method_source"]
    assert "| RaftSFT |" in (out / "results.md").read_text()
    capsys.readouterr()


CHANGED = "\n# a change to the method's file\n"


def test_a_comparison_refuses_a_method_file_that_changed_since(tmp_path):
    """The summary records the file's sha256: once the file changes, re-running the comparison says so and
    trains nothing (a new process: the changed file's class could not share a name with the old one)."""
    mine = tmp_path / "mine.py"
    shutil.copy(ROOT / "examples" / "raft_sft.py", mine)
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "sasr", "compare", "--methods", f"{mine}:RaftSFT", "--steps", "1"]
    cmd += ["--seeds", "1", "--samples", "0", *SMALL, "--set", "task.test_size=2", "--output", str(out)]
    assert subprocess.run(cmd, env=ENV, capture_output=True, text=True).returncode == 0
    mine.write_text(mine.read_text() + CHANGED)
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "made with another version of the method file" in again.stderr and str(mine) in again.stderr


TWO_UPDATES = '''
import torch

from sasr import metrics
from sasr.batch import DEMO, ROLLOUT, Apply, Gather, Part, Plan
from sasr.losses import NLL_SETTINGS, PART_LOSSES, LossTerm, PartLoss, masked_mean, nll_part, token_mean
from sasr.methods import Method
from sasr.passes import PASSES, Pass

metrics.register_all([("frozen_gap", "mean |log p - log p_frozen| on demonstrations", metrics.PASS),
                      ("updates_seen", "updates the method has seen")])


def frozen(learner, rows, temperature):  # a pass of its own: the reference's log-probs of every row
    T = rows.completion_ids.size(1)
    return learner.reference.logprobs(rows.input_ids, rows.attention_mask, T, temperature)


PASSES.add("frozen", Pass(frozen))


def anchored_nll(x, **settings):
    gap = x.logps - x.passes["frozen"]
    out = nll_part(x, **settings)
    stats = {**out.stats, "frozen_gap": masked_mean(gap.detach().abs(), x.mask).item()}
    return PartLoss(out.loss + 0.1 * token_mean(gap**2, x), stats)


PART_LOSSES.add("anchored_nll", LossTerm(anchored_nll, NLL_SETTINGS, lambda options: ("frozen",)))


class TwoUpdates(Method):
    """Each step an RL update with the run's optimizer, then an SFT update with one of its own."""

    name = "two-updates"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.seen = torch.zeros(2)

    def plan(self, step):
        gather = Gather(demos=self.demos_per_step, prompts=self.prompts_per_step, rollouts=self.group_size)
        updates = (Apply(), Apply(optimizer="second", lr=1e-3, max_grad_norm=0.5))
        return Plan(step, "mixed", gather, updates, info={"updates_seen": float(self.seen.sum())})

    def parts(self, plan, rows):
        return [Part("rl", "pg", rows.kind == ROLLOUT), Part("sft", "anchored_nll", rows.kind == DEMO, update=1)], {}

    def observe(self, plan, grad_norm, probe=None):
        super().observe(plan, grad_norm, probe)
        self.seen += torch.tensor([1.0, 1.0])

    def tensors(self):
        return {"seen": self.seen}

    def load_tensors(self, tensors):
        self.seen = tensors["seen"].clone()
'''


def test_two_updates_a_step_with_an_optimizer_a_pass_and_tensors_of_its_own_resume_bit_exactly(tmp_path):
    """A method of the user's: an RL update with the run's optimizer, then an SFT update on another optimizer
    (its own rate and clip) whose loss reads a pass of its own (the reference's log-probs), and a tensor state.
    The checkpoint holds the second optimizer and the tensors; a run resumed from step 2 ends identical, and one
    resumed without the second optimizer's state does not."""
    import sasr

    (tmp_path / "two.py").write_text(textwrap.dedent(TWO_UPDATES))
    top = {"method": f"{tmp_path / 'two.py'}:TwoUpdates", "steps": 4, "save_every": 2}
    top["eval"] = {"before": False, "after": False}
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sasr.train(tiny_config(a, **top), progress=False)
    lines = read_metrics(a)
    assert [r["updates_seen"] for r in lines] == [0.0, 2.0, 4.0, 6.0]
    assert all(r["update/second/lr"] == 1e-3 and r["lr"] == 1e-4 for r in lines)
    assert all("update/second/loss" in r and r["update/second/grad_norm"] > 0 for r in lines)
    assert (
        lines[0]["frozen_gap"] < lines[-1]["frozen_gap"]
    )  # the pass is the reference: the policy moves away
    ckpt = complete_checkpoints(a)[0]
    assert (ckpt / "optimizer-second.pt").is_file() and (ckpt / "method.safetensors").is_file()
    for run in (b, c):  # resume from step 2, its one checkpoint
        shutil.copytree(a, run)
        shutil.rmtree(run / "final")
    sasr.train(tiny_config(b, **top), progress=False, resume=True)
    assert_same_run(a, b)
    last = complete_checkpoints(c)[-1]  # as if written without the second optimizer: the check can fail
    (last / "optimizer-second.pt").unlink()
    manifest = json.loads((last / "manifest.json").read_text())
    del manifest["files"]["optimizer-second.pt"]
    (last / "manifest.json").write_text(json.dumps(manifest))
    sasr.train(tiny_config(c, **top), progress=False, resume=True)
    with pytest.raises(AssertionError):
        assert_same_run(a, c)


NOT_A_METHOD = "class Plain:\n    pass\n"
BUILT_IN_NAME = "from sasr.methods import Method\n\nclass Mine(Method):\n    name = 'sft'\n"
TAKEN_LOSS = (
    "from sasr.losses import PART_LOSSES, LossTerm, pg_part\n"
    "from sasr.methods import Method\n\n"
    "PART_LOSSES.add('pg', LossTerm(lambda x, **kw: pg_part(x, **kw)))\n\n"
    "class Mine(Method):\n    pass\n"
)


@pytest.mark.parametrize(
    "source, spec, says",
    [
        (None, "missing.py:Mine", "method file 'missing.py' does not exist"),
        (NOT_A_METHOD, "mine.py:Mine", "method module 'mine.py' has no class 'Mine'"),
        (NOT_A_METHOD, "mine.py:Plain", "'mine.py:Plain' is not a method: a method is a subclass of"),
        (BUILT_IN_NAME, "mine.py:Mine", "takes the name 'sft' of a built-in method; give it another name"),
        (TAKEN_LOSS, "mine.py:Mine", "part loss name 'pg' is taken (by sasr.losses.pg_part)"),
        (NOT_A_METHOD, "mine.py", "method 'mine.py' names a file; add its class: mine.py:ClassName"),
    ],
)
def test_a_bad_method_file_is_one_sentence_and_exit_2(tmp_path, monkeypatch, capsys, source, spec, says):
    monkeypatch.chdir(tmp_path)
    if source is not None:
        (tmp_path / "mine.py").write_text(source)
    out = tmp_path / "run"
    assert main(["train", "--method", spec, *SMALL, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err
    assert not out.exists()
