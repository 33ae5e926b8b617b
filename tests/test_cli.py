"""Bad input gets one sentence on stderr and exit code 2, with no traceback and nothing written."""

import subprocess
import sys

import pytest

from sasr.cli import main

TINY_ARGS = [
    "--model",
    "tiny",
    "--steps",
    "3",
    "--warmup-steps",
    "1",
    "--quiet",
    "--set",
    "task.test_size=2",
    "--set",
    "grpo.max_completion_length=8",
    "--set",
    "eval.max_new_tokens=8",
    "--set",
    "grpo.num_generations=2",
    "--set",
    "sft.batch_size=2",
    "--set",
    "report_to=none",
]


def run_cli(capsys, *argv):
    code = main(["train", *argv])
    return code, capsys.readouterr()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--method", "sasrr"],
            "unknown method 'sasrr' (did you mean 'sasr'?); valid: sasr, sft, grpo, sft-then-grpo, interleave",
        ),
        (["--task", "gsm9k"], "unknown task 'gsm9k'"),
        (
            ["--model", "smol"],
            "model 'smol' is neither a folder, a hub id (owner/name) nor an alias; aliases: smollm2-135m, tiny, qwen2.5-0.5b-random",
        ),
        (["--set", "grpo.bta=0.1"], "unknown config key 'grpo.bta' (did you mean 'grpo.beta'?)"),
        (["--gamma", "0"], "config key 'sasr.gamma': Input should be greater than 0"),
        (["--set", "hpt.gaet=0.2"], "unknown config key 'hpt.gaet' (did you mean 'hpt.gate'?)"),
        (["--method", "luffy", "--set", "luffy.num_demos=8"], "'luffy.num_demos' (8) must be smaller than"),
        (
            ["--method", "hpt", "--set", "demos.task=gsm-symbolic"],
            "cannot take demonstrations from demos.task",
        ),
        (
            ["--set", "grpo.num_generations=1"],
            "grpo.num_generations': Input should be greater than or equal to 2",
        ),
        (["--steps", "3", "--warmup-steps", "5"], "warmup_steps (5) must be shorter than steps (3)"),
        (["--set", "task.n_people=3"], "task 'arithmetic' has no option 'n_people'"),
    ],
)
def test_bad_input_one_sentence_exit_2(capsys, tmp_path, argv, message):
    out = tmp_path / "run"
    code, cap = run_cli(capsys, *TINY_ARGS, "--output", str(out), *argv)
    assert code == 2
    assert cap.err.startswith("sasr: error: ") and message in cap.err
    assert cap.err.count("\n") == 1 and "Traceback" not in cap.err
    assert not out.exists()  # nothing half-written


def test_existing_output_dir_needs_overwrite(capsys, tmp_path):
    out = tmp_path / "run"
    code, cap = run_cli(capsys, *TINY_ARGS, "--output", str(out))
    assert code == 0 and "1 SFT" in cap.out or "SFT" in cap.out
    assert f"run written to {out}/" in cap.out
    marker = out / "metrics.jsonl"
    before = marker.read_text()
    code, cap = run_cli(capsys, *TINY_ARGS, "--output", str(out))
    assert code == 2 and "already exists; pass --overwrite" in cap.err
    assert marker.read_text() == before  # the earlier run is untouched
    code, cap = run_cli(capsys, *TINY_ARGS, "--output", str(out), "--overwrite", "--seed", "5")
    assert code == 0 and "seed: 5" in (out / "config.yaml").read_text()


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sasr", "train", "--method", "ppo", "--output", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    from sasr.errors import nearest
    from sasr.methods import METHODS

    valid = ", ".join(METHODS)  # every registered method, in the registry's order
    assert proc.stderr.strip().splitlines() == [
        f"sasr: error: unknown method 'ppo'{nearest('ppo', METHODS)}; valid: {valid} (or path/to/file.py:Class)"
    ]
    assert nearest("ppo", METHODS)  # a suggestion is made


def test_list_commands(capsys):
    assert main(["models"]) == 0 and "smollm2-135m" in capsys.readouterr().out
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "arithmetic:" in out and "task.max_terms = 4" in out


def test_summary_reports_counts_and_evaluation(capsys, tmp_path):
    code, cap = run_cli(capsys, *TINY_ARGS, "--output", str(tmp_path / "r"), "--method", "sft-then-grpo")
    assert code == 0
    assert "steps   3: 1 SFT, 2 GRPO" in cap.out
    assert "before  accuracy" in cap.out and "after   accuracy" in cap.out


def test_summary_of_an_empty_test_split_is_a_sentence():
    from types import SimpleNamespace

    from sasr.cli import summary_text
    from sasr.config import build_config

    result = SimpleNamespace(
        seconds=1.0,
        counts={"sft": 2, "grpo": 0, "mixed": 0},
        eval_before={"n": 0},
        eval_after=None,
        output_dir="runs/x",
    )
    text = summary_text(build_config(sets=["steps=2", "warmup_steps=1"]), result)
    assert "before  (no held-out examples: the task's test split is empty)" in text and "2 SFT" in text


def test_broken_models_and_files_are_one_sentence_and_write_nothing(tmp_path, capsys):
    """A folder that is not a loadable model, and data or config files that are not UTF-8."""
    import shutil

    from sasr.models import random_folder

    tiny = random_folder("tiny")
    cases = {}
    (tmp_path / "no-tokenizer").mkdir()
    shutil.copy(tiny / "config.json", tmp_path / "no-tokenizer")
    cases["no-tokenizer"] = (["--model", str(tmp_path / "no-tokenizer")], "has no tokenizer")
    shutil.copytree(tiny, tmp_path / "no-weights")
    (tmp_path / "no-weights" / "model.safetensors").unlink()
    cases["no-weights"] = (["--model", str(tmp_path / "no-weights")], "no file named model.safetensors")
    shutil.copytree(tiny, tmp_path / "broken-weights")
    (tmp_path / "broken-weights" / "model.safetensors").write_bytes(b"not a safetensors file")
    cases["broken-weights"] = (["--model", str(tmp_path / "broken-weights")], "cannot load model")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(
        b'{"question": "q", "solution": "s", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n'
    )
    cases["latin-data"] = (["--model", "tiny", "--task", f"jsonl:{latin}"], f"{latin}:2 is not UTF-8 text")
    config = tmp_path / "latin.yaml"
    config.write_bytes(b'steps: 3\nmethod: "caf\xe9"\n')
    cases["latin-config"] = (["--config", str(config)], "is not UTF-8 text")
    for name, (argv, message) in cases.items():
        out = tmp_path / f"run-{name}"
        assert main(["train", *argv, "--output", str(out), "--quiet"]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sasr: error:") and message in err[0], (name, err)
        assert not out.exists(), name


def test_an_output_that_is_a_file_or_cannot_be_written_is_refused_before_anything_runs(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, cap = run_cli(capsys, *TINY_ARGS, "--output", str(afile))
    assert code == 2 and cap.err.strip() == (
        f"sasr: error: output '{afile}' is a file, not a directory; choose another --output"
    )
    assert afile.read_text() == "mine"
    code, cap = run_cli(capsys, *TINY_ARGS, "--output", "/proc/sasr-run")  # not writable, even by root
    assert code == 2 and cap.err.startswith(
        "sasr: error: cannot write the run directory '/proc/sasr-run' in '/proc'"
    )
    assert cap.err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--steps", "abc"], "sasr train: error: argument --steps: invalid int value: 'abc'"),
        (["train", "--method"], "sasr train: error: argument --method: expected one argument"),
        (["frobnicate"], "sasr: error: argument command: invalid choice: 'frobnicate'"),
    ],
)
def test_a_malformed_command_line_is_one_sentence(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith(message) and "--help" in err
