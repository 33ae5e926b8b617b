"""Exact resume after SIGKILL, graceful stop, guards, several processes, and bad resume input."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    ACCELERATE_CONFIGS,
    ENV,
    TINY_ARGS,
    assert_same_run,
    launch_many,
    launched,
    read_metrics,
)

from sasr.checkpoint import complete_checkpoints, latest
from sasr.cli import main
from sasr.run_dir import read_lines

ARGS = [*TINY_ARGS, "--set", "grpo.reference=warmup"]


def cli(*argv, **popen):
    return subprocess.Popen([sys.executable, "-m", "sasr", "train", *argv], env=ENV, **popen)


def wait_for(predicate, proc, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.005)
    raise AssertionError("timed out waiting")


def killed_after_checkpoint(run: Path, step: int, *extra: str) -> None:
    """Start the 12-step run with a checkpoint every 3 steps and SIGKILL it once ``step``'s exists."""
    proc = cli(
        *ARGS,
        *extra,
        "--steps",
        "12",
        "--warmup-steps",
        "3",
        "--output",
        str(run),
        "--save-every",
        "3",
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: (run / "checkpoints" / f"step-{step:06d}").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference run: 12 steps of SASR."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *ARGS, "--steps", "12", "--warmup-steps", "3", "--output", str(out)]) == 0
    return out


def test_sigkill_then_resume_is_bit_identical(tmp_path, straight, capsys):
    run = tmp_path / "run"
    killed_after_checkpoint(run, 6)
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # not mistaken for finished
    assert not (run / "final").exists()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(straight, run)
    kept = [p.name for p in complete_checkpoints(run)]
    assert len(kept) <= 2 and not list((run / "checkpoints").glob(".tmp-*"))


def test_sigterm_saves_and_says_how_to_resume(tmp_path, straight):
    run = tmp_path / "run"
    proc = cli(
        *ARGS, "--steps", "12", "--warmup-steps", "3", "--output", str(run), stderr=subprocess.PIPE, text=True
    )
    wait_for(
        lambda: (
            (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2
        ),
        proc,
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert f"resume with: sasr train --resume {run}" in err and "Traceback" not in err
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "stopped"
    assert latest(run).name == f"step-{status['step']:06d}"
    before = json.loads((latest(run) / "trainer_state.json").read_text())["seconds"]
    assert before > 0
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(straight, run)
    status = json.loads((run / "run.json").read_text())
    assert status["seconds"] > before  # wall time counts every segment
    (a, b), (c, d) = status["segments"]  # the stopped stretch, then the resumed one
    assert a < b <= c < d and (b - a) + (d - c) == pytest.approx(status["seconds"], abs=0.5)


def test_half_written_checkpoints_are_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-000004").mkdir(parents=True)
    (root / "step-000004" / "trainer_state.json").write_text("{}")
    (root / ".tmp-step-000008").mkdir()  # killed while saving
    (root / "step-000006").mkdir()  # no trainer_state.json: not complete
    assert latest(tmp_path).name == "step-000004"


def test_resume_bad_input(tmp_path, straight, capsys):
    code = main(["train", "--resume", str(tmp_path)])
    assert code == 2 and "is not a run directory (no config.yaml)" in capsys.readouterr().err
    assert main(["train", "--resume", str(straight)]) == 2  # finished without --save-every: no checkpoint
    assert "has no complete checkpoint to resume from" in capsys.readouterr().err
    code = main(["train", "--resume", str(straight), "--set", "grpo.beta=0.5", "--seed", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "different configuration (grpo.beta 0.04 -> 0.5, seed 0 -> 3)" in err


def test_resume_may_extend_the_step_count(tmp_path, straight):
    run = tmp_path / "run"
    assert (
        main(
            ["train", *ARGS, "--steps", "6", "--warmup-steps", "3", "--output", str(run), "--save-every", "3"]
        )
        == 0
    )
    # step 6 is the last: no checkpoint is written after it, so extend from the one of step 3
    assert latest(run).name == "step-000003"
    assert main(["train", "--resume", str(run), "--steps", "12", "--quiet"]) == 0
    assert_same_run(straight, run)


def limited_resume(run: Path, max_file_bytes: int) -> subprocess.CompletedProcess:
    """`sasr train --resume RUN` where the OS refuses to grow any file past ``max_file_bytes``."""

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run(
        [sys.executable, "-m", "sasr", "train", "--resume", str(run), "--quiet"],
        env=ENV,
        preexec_fn=small_files,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, straight):
    run = tmp_path / "run"
    killed_after_checkpoint(run, 3)

    limited = limited_resume(run, 40_000)  # files over 40 kB refused: the next checkpoint cannot be written
    assert limited.returncode == 2, limited.stderr
    last = limited.stderr.strip().splitlines()[-1]
    assert last.startswith("sasr: error: cannot write the checkpoint of step") and "is intact" in last
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # the earlier checkpoint still works
    assert_same_run(straight, run)


def test_out_of_memory_is_one_sentence_that_names_the_knobs(tmp_path):
    def little_memory():  # 6 GiB of address space: the SFT batch below needs ~20 GB of logits
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    cmd = [
        sys.executable,
        "-m",
        "sasr",
        "train",
        "--model",
        "tiny",
        "--method",
        "sft",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--output",
        str(tmp_path / "run"),
        "--quiet",
        "--set",
        "sft.batch_size=2048",
        "--set",
        "task.test_size=0",
    ]
    done = subprocess.run(cmd, env=ENV, preexec_fn=little_memory, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("sasr: error: out of memory (") and "sft.batch_size" in lines[-1]
    assert not any("Traceback" in line for line in lines)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] != "finished"
    assert not (tmp_path / "run" / "final").exists()


def test_non_finite_steps_are_skipped_then_stop(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            *ARGS,
            "--method",
            "sft",
            "--steps",
            "10",
            "--output",
            str(run),
            "--set",
            "optim.learning_rate=1e30",
            "--set",
            "optim.max_grad_norm=null",
        ]
    )
    assert code == 2
    assert "3 non-finite losses or gradient norms in a row (last at step 4)" in capsys.readouterr().err
    rows = read_metrics(run, timings=False)
    assert [r.get("skipped", False) for r in rows] == [False, True, True, True]
    assert rows[1]["loss"] is None  # strict JSON: null, not NaN
    assert json.loads((run / "run.json").read_text())["status"] == "failed"


def test_zero_spread_groups_give_no_nan(run_tiny):
    _, rows = run_tiny(method="grpo", steps=2)  # the random model never earns a reward
    for r in rows:
        assert r["zero_spread_fraction"] == 1.0 and r["reward_std"] == 0.0
        assert r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"]  # not NaN


def test_every_accelerate_config_shipped_is_one_a_test_launches():
    """configs/accelerate/ holds only configs whose path has run (here: ddp_cpu.yaml above, fsdp_cpu.yaml in
    tests/test_fsdp.py)."""
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    shipped = sorted(p.name for p in ACCELERATE_CONFIGS.glob("*.yaml"))
    assert shipped == ["ddp_cpu.yaml", "fsdp_cpu.yaml"]
    assert all(f'"{name}"' in tests for name in shipped)


def test_the_trainers_ddp_lets_ranks_make_different_numbers_of_forward_calls():
    """Length groups under DDP rely on it (tests/test_losses.py runs two such ranks)."""
    from sasr.trainer import make_accelerator

    assert make_accelerator().ddp_handler.to_kwargs() == {"broadcast_buffers": False}


def test_two_processes_take_the_same_branches(tmp_path):
    run = tmp_path / "run"
    ranks = run / "ranks"
    cmd = [
        *launched("ddp_cpu"),
        *ARGS,
        "--steps",
        "10",
        "--warmup-steps",
        "2",
        "--output",
        str(run),
    ]
    proc = subprocess.run(
        [*cmd, "--set", "logging_ranks=true", "--set", "report_to=tensorboard"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert list(
        (run / "tensorboard" / "sasr").glob("events.out.tfevents.*")
    )  # a tracker, closed with ranks alive
    assert proc.returncode == 0, proc.stderr[-2000:]
    r0 = read_lines(ranks, "rank0.jsonl")
    r1 = read_lines(ranks, "rank1.jsonl")
    assert len(r0) == 10 and [x["phase"] for x in r0] == [x["phase"] for x in r1]
    assert {x["phase"] for x in r0} == {"sft", "grpo"}
    # Each rank saw different data, yet both read the same (all-reduced, global) gradient norm.
    assert [x["grad_norm"] for x in r0] == [x["grad_norm"] for x in r1]
    assert len(read_metrics(run, timings=False)) == 10  # only rank 0 wrote the run directory
    assert proc.stdout.count("finished in") == 1
    how = json.loads((run / "run.json").read_text())["distributed"]
    assert how.pop("threads") >= 1
    assert how == {"kind": "MULTI_CPU", "num_processes": 2, "device": "cpu"}  # a reader can tell how it ran


MIXED = ("chord", "hpt", "luffy", "srft", "uft", "prefix-rft", "sdft", "sdpo")


def test_two_processes_plan_the_same_mixed_steps_and_resume(tmp_path):
    """For each method that mixes parts in a step (and SDFT and SDPO, whose teacher reads another prompt): two gloo ranks with different data take the same parts in
    every step (else the all-reduce of the step's statistics would fail) and read the same global gradient
    norm; stopped and resumed, the run ends as it would have. One launch runs every method."""
    steps = []
    for method in MIXED:
        argv = [*ARGS, "--method", method, "--set", "grpo.num_generations=3", "--steps", "4"]
        argv += ["--save-every", "2", "--set", "eval.before=false"]
        argv += (
            ["--set", "uft.hint_steps=4"] if method == "uft" else []
        )  # hints (and their NLL) in every step
        argv += ["--set", "sdft.teacher_model_kind=ema"] if method == "sdft" else []  # its average resumes
        argv += ["--set", "logging_ranks=true", "--set", "log_completions=true"]
        a, b = tmp_path / f"a-{method}", tmp_path / f"b-{method}"
        steps.append({"argv": [*argv, "--output", str(a)]})
        # Resumed from the checkpoint of step 2 (as after a SIGKILL there): the same steps 3-4 and weights.
        steps.append({"copy": [str(a), str(b)], "drop": ["final"]})
        steps.append({"argv": ["--resume", str(b), "--quiet"]})
    proc = launch_many("ddp_cpu", steps, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in MIXED:
        a, b = tmp_path / f"a-{method}", tmp_path / f"b-{method}"
        r0, r1 = (read_lines(a / "ranks", f"rank{i}.jsonl") for i in (0, 1))
        phase = "grpo" if method in ("sdft", "sdpo") else "mixed"  # their steps hold rollouts only
        assert [x["phase"] for x in r0] == [x["phase"] for x in r1] == [phase] * 4, method
        assert [x["grad_norm"] for x in r0] == [x["grad_norm"] for x in r1], method
        assert_same_run(a, b)
        # The samples of both ranks, every field; after the resume the same ones again.
        samples = read_lines(a, "completions.jsonl")
        assert len(samples) == 4 * 2 * 2 * 3, method  # steps x ranks x prompts x G
        assert {s["rank"] for s in samples} == {0, 1}
        assert {"prompt", "completion", "reward", "advantage", "truncated", "kind", "parts"} <= samples[
            0
        ].keys()
        others = {"luffy": {"offpolicy"}, "srft": {"offpolicy"}, "prefix-rft": {"prefixed"}}.get(
            method, set()
        )
        assert {s["kind"] for s in samples} == {"rollout", *others}, method
        if method == "prefix-rft":  # what a prefixed row started with, and the advantage of those tokens
            prefixed = [s for s in samples if s["kind"] == "prefixed"]
            assert all(s["prefix_tokens"] > 0 and "prefix_advantage" in s for s in prefixed)
        assert (a / "completions.jsonl").read_text() == (b / "completions.jsonl").read_text(), method


@pytest.mark.parametrize("method", ["chord", "hpt", "luffy", "srft", "prefix-rft"])
def test_sigkill_then_resume_is_bit_identical_for_the_mixed_methods(tmp_path, method):
    extra = ["--method", method, "--set", "grpo.num_generations=3"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert (
        main(["train", *ARGS, *extra, "--steps", "12", "--warmup-steps", "3", "--output", str(straight)]) == 0
    )
    killed_after_checkpoint(run, 6, *extra)
    assert not (run / "final").exists()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(straight, run)


def test_relift_gathers_both_processes_failures_into_one_buffer_and_resumes(tmp_path):
    """Two gloo ranks: every step's failed prompts of both ranks join one buffer, the same on each (4 a step:
    2 ranks x 2 prompts, all failing on `tiny`); with buffer_size 5 both add the SFT update from step 2 on, on
    the newest 5 shared 3 + 2; resumed from the checkpoint before the first SFT update, the run ends as it
    would have."""
    a, b = tmp_path / "a", tmp_path / "b"
    launch = [*launched("ddp_cpu"), *ARGS, "--method", "relift", "--steps", "4", "--save-every", "1"]
    settings = ["relift.buffer_size=5", "grpo.num_generations=3", "eval.before=false", "logging_ranks=true"]
    straight = subprocess.run(
        [*launch, *(x for s in settings for x in ("--set", s)), "--output", str(a)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    r0, r1 = (read_lines(a / "ranks", f"rank{i}.jsonl") for i in (0, 1))
    assert [x["phase"] for x in r0] == [x["phase"] for x in r1] == ["grpo", "mixed", "mixed", "mixed"]
    assert [r["relift_buffer"] for r in read_metrics(a)] == [0, 4, 3, 2]
    shutil.copytree(a, b)
    shutil.rmtree(b / "final")
    for later in complete_checkpoints(b)[1:]:  # keep step 1's: the buffer holds 4, the next step adds SFT
        shutil.rmtree(later)
    again = subprocess.run(
        [*launched("ddp_cpu"), "--resume", str(b), "--quiet"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_run(a, b)


# --- a damaged run directory ----------------------------------------------------------------------------------


def test_a_damaged_run_directory_loses_no_finished_step(tmp_path, straight, capsys, caplog):
    """Killed after step 9's checkpoint (6 and 9 kept), then damaged: a torn last line in metrics.jsonl, a
    non-UTF-8 line in completions.jsonl, step 9's weights cut in half. The report names the bad lines and draws
    the rest; resume passes over step 9's checkpoint with one warning, takes over the dead process's lock, and
    with the final model unwritable (the OS refuses files over 1 MB) stops in one sentence keeping step 9's new
    checkpoint; resumed again, the run ends bit-identical to the one never interrupted."""
    run = tmp_path / "run"
    killed_after_checkpoint(run, 9, "--set", "log_completions=true")
    dead = json.loads((run / ".sasr.lock").read_text())["pid"]
    torn = len((run / "metrics.jsonl").read_bytes().splitlines()) + 1
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "loss": 0.5, "gr')  # torn by the kill
    good_lines = len((run / "completions.jsonl").read_bytes().splitlines())
    with open(run / "completions.jsonl", "ab") as f:
        f.write(b"\xff\xfe not text\n")
    weights = next((run / "checkpoints" / "step-000009" / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    assert main(["report", str(run)]) == 0
    warned = [r.getMessage() for r in caplog.records if "damaged line" in r.getMessage()]
    assert any(f"metrics.jsonl: damaged line {torn} " in w for w in warned), warned
    assert any(f"completions.jsonl: damaged line {good_lines + 1} " in w for w in warned), warned
    assert (run / "report" / "index.html").is_file()
    caplog.clear()

    assert latest(run).name == "step-000006"
    msg = caplog.records[-1].getMessage()
    assert "step-000009 is damaged (model/" in msg and "bytes, " in msg and "trying the one before it" in msg
    stopped = limited_resume(run, 1_000_000)
    assert stopped.returncode == 2, stopped.stderr[-2000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("sasr: error: cannot write the final model in ") and "step-000009 is intact" in last
    )
    assert not (run / "final").exists() and not list(run.glob(".tmp-*"))
    assert json.loads((run / ".sasr.lock").read_text())["pid"] not in (dead, None)  # taken over, then let go
    assert [p.name for p in complete_checkpoints(run)] == ["step-000006", "step-000009"]
    assert latest(run).name == "step-000009"  # rewritten whole by the resumed run

    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(straight, run)
    for checkpoint in complete_checkpoints(run):  # every checkpoint damaged: nothing to resume from
        next((checkpoint / "model").glob("*.safetensors")).write_bytes(b"")
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "every checkpoint of" in err and "is damaged" in err and "train it again with --overwrite" in err


def test_a_run_or_comparison_in_use_is_refused_naming_its_process(tmp_path, capsys):
    """Two `sasr train --output race` started together: one trains, the other is refused in one sentence naming
    the first's process, as is a --resume of the run while it trains and a second `sasr compare` of a folder;
    metrics.jsonl holds one run's steps once."""
    race = tmp_path / "race"
    # 20 steps: long enough that the winner is still training when the resume below reaches the lock, even on
    # a loaded machine (with 8 it had at times released the lock, though its process had not yet exited)
    argv = [*ARGS, "--steps", "20", "--warmup-steps", "2", "--save-every", "2", "--output", str(race)]
    procs = [cli(*argv, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    end = time.time() + 300
    while all(p.poll() is None for p in procs) and time.time() < end:
        time.sleep(0.05)
    loser = next(p for p in procs if p.poll() is not None)
    winner = procs[1 - procs.index(loser)]
    assert loser.returncode == 2
    err = loser.stderr.read().strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sasr: error: '{race}' is in use by process {winner.pid} on ")
    if winner.poll() is None:  # still training: its run cannot be resumed by another process
        code = main(["train", "--resume", str(race), "--quiet"])
        refused = capsys.readouterr().err
        assert winner.poll() is not None or (code == 2 and f"is in use by process {winner.pid}" in refused)
    assert winner.wait(timeout=300) == 0
    assert [r["step"] for r in read_metrics(race)] == list(range(1, 21))

    from sasr.locks import FolderLock

    held = tmp_path / "held"
    with FolderLock(held, "a test"):
        code = main(["compare", "--methods", "sft", "--model", "tiny", "--steps", "1", "--output", str(held)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"is in use by process {os.getpid()} on " in err[0]
        assert "(a test, since " in err[0]
    assert not (held / "summaries").exists()  # refused before anything was written


def test_eval_of_a_run_needs_its_run_json_or_a_task(tmp_path, straight, capsys):
    """A run directory without run.json is not evaluated on a guessed task; a damaged one is one sentence."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    (run / "run.json").unlink()
    assert main(["eval", "--model", str(run), "--n", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no run.json to say what it was trained on; pass --task NAME" in err[0]
    assert main(["eval", "--model", str(run), "--n", "2", "--task", "arithmetic", "--quiet"]) == 0
    capsys.readouterr()
    (run / "run.json").write_text('{"status": "fini')
    assert main(["eval", "--model", str(run), "--n", "2"]) == 2
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(f"{run / 'run.json'} is damaged" in e for e in err)
