"""Evaluation metrics on hand-computed cases; compare, eval and report end to end on `tiny`."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import torch
from helpers import read_metrics, tiny_config

from sasr.checkpoint import complete_checkpoints
from sasr.cli import main
from sasr.config import TrainConfig
from sasr.evaluate import distinct_n, majority_correct, mean_edit_distance, pass_at_k, summarise
from sasr.experiments.plan import run_config
from sasr.experiments.report import plot_compare
from sasr.experiments.table import most_at_once, wall_seconds


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 0, 1, 0.0),
        (5, 5, 3, 1.0),
        (4, 1, 1, 0.25),
        (4, 1, 2, 0.5),
        (10, 3, 5, 1 - 21 / 252),
        (8, 2, 8, 1.0),
    ],
)
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


@pytest.mark.parametrize(
    "answers, correct, expected",
    [
        (["3", "4", "3", None], [True, False, True, False], True),
        (["4", "4", "3"], [False, False, True], False),  # the right answer is in the minority
        (["3", "4"], [False, True], False),  # a tie goes to the answer seen first
        ([None, None], [False, False], False),
        ([None, "7", None], [False, True, False], True),  # unparsed samples do not vote
    ],
)
def test_majority(answers, correct, expected):
    assert majority_correct(answers, correct) is expected


def test_diversity_on_fixed_strings():
    texts = ["a b c", "a b d"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(texts, 4) == 0.0
    assert distinct_n(["x y", "x y"], 2) == 0.5
    assert mean_edit_distance(["abc", "abd"]) == pytest.approx(1 / 3)
    assert mean_edit_distance(["abc", "abc", "xyz"]) == pytest.approx(2 / 3)
    assert mean_edit_distance(["only one"]) == 0.0


def test_summarise_names_and_means():
    recs = [
        {"correct": 1.0, "reward": 1.0, "formatted": 1.0, "length": 10},
        {"correct": 0.0, "reward": 0.1, "formatted": 1.0, "length": 20},
    ]
    s = summarise(recs)
    assert s == {"n": 2, "accuracy": 0.5, "reward_mean": 0.55, "format_rate": 1.0, "completion_length": 15.0}


SMALL = [
    "--model",
    "tiny",
    "--quiet",
    "--set",
    "task.test_size=4",
    "--set",
    "grpo.num_generations=2",
    "--set",
    "grpo.max_completion_length=8",
    "--set",
    "eval.max_new_tokens=8",
    "--set",
    "sft.batch_size=2",
    "--set",
    "report_to=none",
]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    argv = [
        "compare",
        "--task",
        "arithmetic",
        "--methods",
        "sasr,grpo",
        "--steps",
        "6",
        "--warmup-steps",
        "2",
        "--seeds",
        "1,2",
        "--samples",
        "3",
        "--output",
        str(out),
        *SMALL,
    ]
    assert main(argv) == 0
    return out, argv


def test_compare_writes_every_file(compared):
    out, _ = compared
    for name in [
        "results.md",
        "results.json",
        "accuracy_vs_step.png",
        "reward_vs_step.png",
        "dynamics.png",
    ]:
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"untrained", "sasr", "grpo"}
    sasr = results["methods"]["sasr"]
    assert len(sasr["per_seed"]) == 2 and set(sasr["splits"]) == {
        "test",
        "ood",
        "near",
    }  # arithmetic's shifts
    assert results["splits"]["near"]["shift"].startswith("as many numbers as training questions")
    for split in ("test", "ood", "near"):
        assert {"accuracy", "pass@3", "maj@3", "distinct_2", "edit_distance"} <= sasr["splits"][split].keys()
        assert sasr["per_seed"][0][split]["n"] == 4
    grpo = results["methods"]["grpo"]["budget"]
    assert grpo["grpo_steps"] == [6.0, 0.0] and grpo["sft_steps"][0] == 0 and grpo["tokens"][0] > 0
    assert results["methods"]["untrained"]["budget"]["tokens"] == [0.0, 0.0]
    # FLOPs beside steps and tokens: each seed's the sum of its steps' flops
    per_seed = [json.loads((out / "summaries" / f"grpo-s{s}.json").read_text())["metrics"] for s in (1, 2)]
    flops = [sum(r["flops"] for r in lines) for lines in per_seed]
    assert grpo["flops"][0] == pytest.approx(sum(flops) / 2) and grpo["flops"][0] > 0
    assert results["methods"]["untrained"]["budget"]["flops"] == [0.0, 0.0]
    paired = results["paired"]["splits"]
    assert set(paired) == {"test", "ood", "near"} and set(paired["test"]) == {"untrained", "grpo"}
    assert {"seeds", "mean", "low", "high", "clear_of_zero"} == paired["ood"]["grpo"].keys()
    assert paired["ood"]["grpo"]["seeds"] == [1, 2] and results["not_landed"] == []
    for name in ("untrained-s1", "sasr-s2", "grpo-s1"):
        summary = json.loads((out / "summaries" / f"{name}.json").read_text())
        assert {"commit", "config", "run", "metrics", "eval"} <= summary.keys()
        assert len(summary["eval"]["ood"]["records"]) == 4
    md = (out / "results.md").read_text()
    assert "| sasr |" in md and "| grpo |" in md and "| untrained |" in md and "sasr compare" in md
    assert "| tokens | FLOPs | wall s |" in md and f"| {grpo['flops'][0]:.3g} |" in md
    assert "## Split `ood`: longer expressions" in md and "## SASR against each method, paired" in md
    assert "% of those runs' time)" in md and "that timed their" not in md  # evaluation's share of the time
    assert (
        "two-level bootstrap" in md
        and "Mean ± std over seeds." in md
        and "| sasr | " in md
        and md.count(" ± ") >= 2 * 3 * 5
    )
    for seed in (1, 2):
        for m in ("sasr", "grpo"):
            assert (out / "runs" / f"{m}-s{seed}" / "final" / "config.json").is_file()


def test_compare_plots_have_the_expected_series(compared):
    out, _ = compared
    plots = json.loads((out / "plots.json").read_text())
    assert set(plots["accuracy_vs_step"]) == {"sasr", "grpo"}
    # eval.every defaults to steps // 5 = 1: held-out accuracy at every step, averaged over both seeds, after
    # the untrained model's at step 0
    assert [p[0] for p in plots["accuracy_vs_step"]["sasr"]] == [0, 1, 2, 3, 4, 5, 6]
    assert len(plots["reward_vs_step"]["grpo"]) == 6
    assert set(plots["dynamics"]) == {
        "sasr/p_t",
        "sasr/g_last / G_warmup",
        "sasr/KL to reference",
        "grpo/KL to reference",
    }
    assert plots["dynamics"]["sasr/p_t"][0] == [3, 0.5]  # p_1 = 1 / (1 + gamma) right after warm-up
    for name in ["accuracy_vs_step.png", "reward_vs_step.png", "dynamics.png"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        h, w, _ = matplotlib.image.imread(out / name).shape
        assert h > 200 and w > 300


def test_reward_curve_is_smoothed_over_a_window_that_grows_with_the_budget(tmp_path):
    # rewards alternating 0, 1: a moving mean over an even window is exactly 0.5 once the window is full
    rows = [{"step": i, "phase": "grpo", "reward_mean": float(i % 2)} for i in range(1, 201)]
    long = plot_compare({"grpo": [rows]}, tmp_path / "long")["reward_vs_step"]["grpo"]
    assert [v for _, v in long[7:]] == [0.5] * 193 and long[6][1] != 0.5  # 200 steps: a window of 8
    short = plot_compare({"grpo": [rows[:40]]}, tmp_path / "short")["reward_vs_step"]["grpo"]
    # 40 steps: the window of 3 as before
    assert [v for _, v in short[:4]] == pytest.approx([1.0, 0.5, 2 / 3, 1 / 3])


def test_a_comparison_of_every_method_draws_each_line_its_own_way():
    """13 rows (every method and an included folder's): no two lines share colour and style, and the legend
    sits beside the plot, not over its lines."""
    from matplotlib.figure import Figure

    from sasr.experiments.report import _draw

    ax = Figure().subplots()
    _draw(ax, {f"method {i}": [(1, i / 13), (2, i / 12)] for i in range(13)}, "accuracy")
    styles = {(line.get_color(), line.get_linestyle()) for line in ax.get_lines()}
    assert len(ax.get_lines()) == 13 and len(styles) == 13
    assert ax.get_legend().get_bbox_to_anchor().x0 > ax.bbox.x1  # anchored right of the axes


def test_accuracy_curve_is_the_mean_of_the_seeds_that_evaluated(tmp_path):
    """A seed trained before its recipe evaluated during training has no held-out points: the curve is the
    mean of the other seeds, not empty."""
    curve = [{"step": s, "phase": "sft", "eval_accuracy": a} for s, a in [(50, 0.2), (100, 0.4)]]
    other = [{"step": s, "phase": "sft", "eval_accuracy": a} for s, a in [(50, 0.4), (100, 0.6)]]
    without = [{"step": s, "phase": "sft", "loss": 1.0} for s in (50, 100)]
    plots = plot_compare({"sft": [without, curve, other]}, tmp_path)
    steps, means = zip(*plots["accuracy_vs_step"]["sft"])
    assert steps == (50, 100) and means == pytest.approx((0.3, 0.5))
    assert "accuracy_vs_step" not in plot_compare({"sft": [without]}, tmp_path / "none")


def test_compare_rerun_skips_finished_runs(compared, capsys):
    out, argv = compared
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")} == before


def test_eval_run_dir_equals_hub_style_folder(compared, tmp_path, capsys):
    out, _ = compared
    run = out / "runs" / "sasr-s1"
    copy = tmp_path / "some-org" / "model"
    shutil.copytree(run / "final", copy)
    common = [
        "--task",
        "arithmetic",
        "--n",
        "4",
        "--samples",
        "2",
        "--seed",
        "5",
        "--quiet",
        "--set",
        "eval.max_new_tokens=8",
    ]
    assert main(["eval", "--model", str(run), *common, "--output", str(tmp_path / "a.json")]) == 0
    assert main(["eval", "--model", str(copy), *common, "--output", str(tmp_path / "b.json")]) == 0
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert a == b and set(a) == {"test", "ood", "near"} and a["ood"]["n"] == 4 and "pass@2" in a["test"]
    assert "accuracy" in capsys.readouterr().out


def test_compare_assembles_the_same_table_from_summaries_alone(compared, tmp_path, capsys):
    """The summaries (no run directories, no weights) are enough: another folder, the same table."""
    out, argv = compared
    shutil.copytree(out / "summaries", tmp_path / "elsewhere" / "summaries")
    i = argv.index("--output")
    assert main([*argv[:i], "--output", str(tmp_path / "elsewhere"), *argv[i + 2 :]]) == 0
    assert not (tmp_path / "elsewhere" / "runs").exists()  # nothing trained or evaluated again
    ours = json.loads((tmp_path / "elsewhere" / "results.json").read_text())
    theirs = json.loads((out / "results.json").read_text())
    assert {**ours, "command": None} == {**theirs, "command": None}
    assert json.loads((tmp_path / "elsewhere" / "plots.json").read_text()) == json.loads(
        (out / "plots.json").read_text()
    )
    # A summary written before evaluations were timed: the share is that of the runs that were.
    older = tmp_path / "older" / "summaries"
    shutil.copytree(out / "summaries", older)
    summary = json.loads((older / "grpo-s1.json").read_text())
    del summary["eval_seconds"]
    (older / "grpo-s1.json").write_text(json.dumps(summary))
    assert main([*argv[:i], "--output", str(older.parent), *argv[i + 2 :]]) == 0
    runs = len(list(older.glob("*.json")))
    assert (
        f"over all {runs} runs; in the {runs - 1} that timed their evaluation"
        in (older.parent / "results.md").read_text()
    )


def test_compare_landed_assembles_a_comparison_in_progress_from_its_summaries(compared, tmp_path, capsys):
    """--landed trains and evaluates nothing: each method over the seeds it has a summary of, SASR against a
    method over the seeds both have; a two-stage run whose SFT budget is not known yet has not landed."""
    from sasr.experiments.stats import paired_bootstrap

    out, argv = compared
    i = argv.index("--output")
    landed = tmp_path / "landed"
    shutil.copytree(out / "summaries", landed / "summaries")
    full = [*argv[:i], "--output", str(landed), *argv[i + 2 :], "--landed"]
    assert main(full) == 0  # every run landed: the finished comparison's table
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (landed, out))
    assert {**ours, "command": None} == {**theirs, "command": None}
    m = argv.index("--methods") + 1
    # The summaries were made with SASR listed first (its options filled in on every run): listing another
    # method first reads them all the same.
    assert main([*full[:m], "grpo,sasr", *full[m + 1 :]]) == 0
    reordered = json.loads((landed / "results.json").read_text())
    assert {**reordered, "command": None} == {**theirs, "command": None}
    (landed / "summaries" / "sasr-s2.json").unlink()
    partial = [*full[:m], "sasr,grpo,sft-then-grpo", *full[m + 1 :]]
    assert main(partial) == 0
    assert not (landed / "runs").exists()
    results = json.loads((landed / "results.json").read_text())
    assert {k: v["seeds"] for k, v in results["methods"].items()} == {
        "untrained": [1, 2],
        "sasr": [1],
        "grpo": [1, 2],
    }
    assert results["not_landed"] == ["sft-then-grpo"]  # SASR's seed 2 is missing: its budget is unknown
    sasr = json.loads((out / "summaries" / "sasr-s1.json").read_text())
    assert results["methods"]["sasr"]["splits"]["test"]["accuracy"] == [
        sasr["eval"]["test"]["summary"]["accuracy"],
        0.0,
    ]
    grpo = json.loads((out / "summaries" / "grpo-s1.json").read_text())
    test = results["paired"]["splits"]["test"]["grpo"]
    expected = paired_bootstrap(
        [[x["correct"] for x in sasr["eval"]["test"]["records"]]],
        [[x["correct"] for x in grpo["eval"]["test"]["records"]]],
    )
    assert test == {"seeds": [1], **expected}
    md = (landed / "results.md").read_text()
    assert "A comparison in progress" in md and "no run of sft-then-grpo has landed yet" in md
    assert "| sasr | 1 | " in md and "| grpo | 1, 2 | " in md and "--landed" in md
    assert "one seed, so no spread over seeds" in md  # every pair is over seed 1 alone
    # GRPO landed on seed 2 only: no seed in common with SASR, said in one sentence.
    (landed / "summaries" / "grpo-s1.json").unlink()
    assert main(partial) == 0
    md = (landed / "results.md").read_text()
    assert "Not paired yet (no seed in common with SASR): grpo." in md and "| untrained | 1 | " in md
    # The untrained model on seed 2 only as well: nothing pairs with SASR's seed 1.
    (landed / "summaries" / "untrained-s1.json").unlink()
    assert main(partial) == 0
    results = json.loads((landed / "results.json").read_text())
    assert results["methods"]["untrained"]["seeds"] == [2] and results["splits"]["test"]["n"] == 4
    assert set(results["paired"]["splits"]["test"]) == set()
    md = (landed / "results.md").read_text()
    assert "## SASR against each method, paired" not in md  # nothing to pair yet, no empty table
    capsys.readouterr()
    assert main([*full[:i], "--output", str(tmp_path / "empty"), *full[i + 2 :]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no evaluation of the untrained model" in err


def test_compare_include_tables_a_variant_of_another_folder_paired_with_sasr(compared, tmp_path, capsys):
    """--include: the runs of another comparison (GRPO without KL) as GRPO@FOLDER rows beside this one's,
    paired with its SASR on the same questions; a folder evaluated on other questions, or one with no runs,
    is refused in one sentence."""
    from sasr.experiments.stats import paired_bootstrap

    out, argv = compared
    i, m, s = argv.index("--output"), argv.index("--methods") + 1, argv.index("--seeds") + 1
    variant = tmp_path / "no-kl"
    trained = [*argv[:i], "--output", str(variant), *argv[i + 2 :], "--set", "grpo.beta=0.0"]
    trained[m], trained[s] = "grpo", "1"
    assert main(trained) == 0
    here = tmp_path / "here"
    shutil.copytree(out / "summaries", here / "summaries")
    table = [*argv[:i], "--output", str(here), *argv[i + 2 :], "--landed"]
    assert main([*table, "--include", str(variant)]) == 0
    results, theirs = (json.loads((d / "results.json").read_text()) for d in (here, out))
    assert list(results["methods"]) == ["untrained", "sasr", "grpo", "grpo@no-kl"]
    own = theirs["methods"]  # this comparison's rows, as before
    assert {k: results["methods"][k] for k in own} == own
    no_kl = json.loads((variant / "summaries" / "grpo-s1.json").read_text())
    sasr = json.loads((out / "summaries" / "sasr-s1.json").read_text())
    assert no_kl["config"]["grpo"]["beta"] == 0.0 and sasr["config"]["grpo"]["beta"] != 0.0
    row = results["methods"]["grpo@no-kl"]
    assert row["seeds"] == [1]
    assert row["splits"]["test"]["accuracy"][0] == no_kl["eval"]["test"]["summary"]["accuracy"]
    correct = [[[x["correct"] for x in r["eval"]["test"]["records"]]] for r in (sasr, no_kl)]
    assert results["paired"]["splits"]["test"]["grpo@no-kl"] == {"seeds": [1], **paired_bootstrap(*correct)}
    md = (here / "results.md").read_text()
    assert "| grpo@no-kl | 1 | " in md and "holds the runs of another comparison folder" in md
    assert "grpo@no-kl" in json.loads((here / "plots.json").read_text())["accuracy_vs_step"]
    # The time line is this comparison's own: the included run's time is its folder's.
    assert results["time"] == theirs["time"]
    # Refused in one sentence, the table left as it was: evaluated on other questions; no runs there; this
    # comparison's own folder; two folders of one name (their rows would share labels).
    before = (here / "results.json").read_bytes()
    no_kl["config"]["task"]["test_size"] = 3
    other = tmp_path / "elsewhere" / "no-kl"
    shutil.copytree(variant / "summaries", other / "summaries")
    (other / "summaries" / "grpo-s1.json").write_text(json.dumps(no_kl))
    refusals = {
        "grpo-s1.json was evaluated otherwise (task.test_size: 3 there, 4 here)": [other],
        "no run summaries (summaries/METHOD-sSEED.json) of seeds 1, 2 there": [tmp_path / "nothing"],
        "is this comparison's own folder": [here],
        "have one name, which labels their rows (METHOD@no-kl); rename one": [variant, other],
    }
    capsys.readouterr()
    for message, folders in refusals.items():
        assert main([*table, *(a for f in folders for a in ("--include", str(f)))]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
    assert (here / "results.json").read_bytes() == before


def test_compare_refuses_a_summary_of_another_configuration(compared, tmp_path, capsys):
    out, argv = compared
    shutil.copytree(out / "summaries", tmp_path / "c" / "summaries")
    i = argv.index("--output")
    argv = [*argv[:i], "--output", str(tmp_path / "c"), *argv[i + 2 :]]
    argv[argv.index("--steps") + 1] = "5"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "summaries/sasr-s1.json was made with another configuration (steps: 6 there, 5 here)" in err
    assert not (tmp_path / "c" / "runs").exists()
    # Checkpoint frequency, logging and held-out points during training change no result: the summaries
    # still serve (they evaluated every step).
    argv[argv.index("--steps") + 1] = "6"
    sets = ["--set", "save_every=3", "--set", "save_total_limit=1", "--set", "eval.every=0"]
    assert main([*argv, *sets]) == 0
    assert not (tmp_path / "c" / "runs").exists()
    (tmp_path / "c" / "summaries" / "sasr-s1.json").write_text("{not json")
    argv[argv.index("--steps") + 1] = "6"
    assert main(argv) == 2
    assert "sasr-s1.json is not a sasr compare summary; delete it" in capsys.readouterr().err


def test_eval_refuses_an_unknown_split_in_one_sentence(compared, capsys):
    out, _ = compared
    argv = ["eval", "--model", str(out / "runs" / "sasr-s1"), "--split", "test,validation", "--quiet"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "sasr: error: task 'arithmetic' has no split 'validation'; its splits: train, test, ood, near"
    )


def test_two_stage_baseline_gets_the_mean_of_sasrs_sft_steps_over_seeds():
    from sasr.experiments.plan import _sft_budget

    summaries = {("sasr", s): {"run": {"sft_steps": n}} for s, n in [(1, 3), (2, 6), (3, 6)]}
    assert _sft_budget("sft-then-grpo", summaries, [1, 2, 3]) == 5
    assert _sft_budget("sft-then-grpo", summaries, [1, 2, 4]) is None  # seed 4 has not finished
    assert _sft_budget("grpo", summaries, [1, 2, 3]) is None


def test_report_of_a_run(compared, capsys):
    out, _ = compared
    run = out / "runs" / "sasr-s2"
    assert main(["report", str(run)]) == 0
    png = run / "report" / "training.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    plots = json.loads((run / "report" / "plots.json").read_text())["training"]
    assert {
        "loss/SFT loss",
        "dynamics/p_t",
        "dynamics/g_last / G_warmup",
        "kl/KL to reference",
        "held_out/held-out accuracy",
    } <= plots.keys()
    assert len(plots["loss/SFT loss"]) + len(plots.get("loss/GRPO loss", [])) == 6
    assert "training.png" in (run / "report" / "report.md").read_text()
    assert main(["report", str(out)]) == 2  # not a run directory
    assert "is not a run directory" in capsys.readouterr().err


def test_compare_jobs_trains_in_parallel_processes_with_the_same_results(compared, tmp_path):
    out, argv = compared
    par = tmp_path / "par"
    i = argv.index("--output")
    argv = [*argv[:i], "--output", str(par), *argv[i + 2 :]]
    argv[argv.index("--seeds") + 1] = "1"
    assert main([*argv, "--jobs", "2", "--quiet"]) == 0
    threads = int(os.environ.get("OMP_NUM_THREADS", max(1, torch.get_num_threads() // 2)))
    pair = ("sasr-s1", "grpo-s1")
    for m in ("sasr", "grpo"):
        assert (par / "runs" / f"{m}-s1.log").is_file()  # each run was its own `sasr train` process
        how = json.loads((par / "runs" / f"{m}-s1" / "run.json").read_text())["distributed"]
        assert how["threads"] == threads  # its share of the cores
        ours = read_metrics(par / "runs" / f"{m}-s1")
        serial = read_metrics(out / "runs" / f"{m}-s1")
        assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in serial], rel=1e-5)
    a = json.loads((par / "results.json").read_text())["methods"]["sasr"]["per_seed"][0]["test"]
    b = json.loads((out / "results.json").read_text())["methods"]["sasr"]["per_seed"][0]["test"]
    assert a["accuracy"] == b["accuracy"] and a["pass@3"] == b["pass@3"]
    # Two runs at a time share the wall clock: evaluation's share is of the wall clock, not of the run time.
    t = json.loads((par / "results.json").read_text())["time"]
    (a, b), (c, d) = (json.loads((par / "runs" / m / "run.json").read_text())["segments"][0] for m in pair)
    assert max(a, c) < min(b, d)  # the two runs trained at the same time
    assert t["most_at_once"] == 2 and t["timed_train_wall_seconds"] < t["timed_train_seconds"]
    share = t["eval_seconds"] / (t["timed_train_wall_seconds"] + t["eval_seconds"])
    md = (par / "results.md").read_text()
    assert "up to 2 runs trained at once), evaluation" in md
    assert f"({share:.0%} of those runs' wall clock)" in md
    # one seed has no spread: the tables give means alone, not a std of 0.000
    assert "One seed: no spread over seeds." in md and "±" not in md
    assert "bootstrap over the questions (one seed" in md


def test_a_comparison_run_saves_its_final_model_and_leaves_evaluation_to_compare():
    base = TrainConfig.model_validate({"save_final": False, "eval": {"before": True, "after": True}})
    config = run_config(base, "sasr", 2, Path("runs/sasr-s2"))
    assert config.save_final and not config.eval.before and not config.eval.after
    assert (config.method, config.seed, config.output_dir) == ("sasr", 2, "runs/sasr-s2")


def test_wall_seconds_counts_runs_trained_side_by_side_once():
    runs = [
        {"segments": [[0.0, 10.0], [20.0, 30.0]], "seconds": 20.0},  # stopped at 10, resumed at 20
        {"segments": [[5.0, 25.0]], "seconds": 20.0},  # beside it
        {"segments": [[8.0, 14.0]], "seconds": 6.0},  # inside the second, beside the first until 10
        {"segments": [[40.0, 41.0]], "seconds": 1.0},  # alone
        {"seconds": 7.0},  # a run of a sasr that kept no segments: its own seconds
        {"segments": [[50.0, 52.0]], "seconds": 5.0},  # resumed from such a checkpoint: 3 s not covered
    ]
    assert wall_seconds(runs) == 30.0 + 1.0 + 7.0 + 2.0 + 3.0
    assert most_at_once(runs) == 3  # from 8 to 10
    assert wall_seconds([]) == 0.0 and most_at_once([{"seconds": 7.0}]) == 1
    assert most_at_once([{"segments": [[0.0, 1.0]]}, {"segments": [[1.0, 2.0]]}]) == 1  # one after the other


def test_compare_jobs_reports_a_failed_run(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    argv = [
        "compare",
        "--task",
        "arithmetic",
        "--methods",
        "sft,grpo",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--seeds",
        "1",
        "--output",
        str(tmp_path / "c"),
        "--jobs",
        "2",
        *SMALL,
        "--model",
        str(missing),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "runs failed: sft-s1 (exit 2:" in err and "grpo-s1" in err
    assert "is neither a folder" in err and "sft-s1.log" in err


def _stop_compare_after(
    cmd: list[str], out: Path, steps: dict[str, int], code: int = 2, says: str = ""
) -> str:
    """Start ``sasr compare``, wait until each named run has logged more than ``steps[name]`` steps, SIGTERM it;
    its stderr."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def logged(name: str) -> int:
        metrics = out / "runs" / name / "metrics.jsonl"
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    deadline = time.time() + 120
    while time.time() < deadline and not all(logged(n) > s for n, s in steps.items()):
        time.sleep(0.5)  # every run is training
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(says or "sasr: error: sasr compare: stopped by SIGTERM")
    return err


def test_compare_jobs_passes_sigterm_to_its_runs_and_continues_them(tmp_path):
    out = tmp_path / "c"
    cmd = [
        sys.executable,
        "-m",
        "sasr",
        "compare",
        "--task",
        "arithmetic",
        "--methods",
        "sft,grpo",
        "--steps",
        "400",
        "--warmup-steps",
        "1",
        "--seeds",
        "1",
        "--output",
        str(out),
        "--jobs",
        "2",
        *SMALL,
    ]
    names = ("sft-s1", "grpo-s1")
    _stop_compare_after(cmd, out, dict.fromkeys(names, 0))
    pattern = re.compile(r"stopped by SIGTERM after step (\d+)")
    first = {}
    for n in names:  # each run got the signal, saved a checkpoint and said how to resume
        first[n] = [int(x) for x in pattern.findall((out / "runs" / f"{n}.log").read_text())]
        assert len(first[n]) == 1 and (out / "runs" / n / "checkpoints" / f"step-{first[n][0]:06d}").is_dir()

    # The same command again continues each run from its checkpoint: same log, metrics without a gap; a
    # checkpoint frequency of its own is bookkeeping, not another run.
    _stop_compare_after([*cmd, "--set", "save_every=1000"], out, {n: first[n][0] for n in names})
    for n in names:
        stops = [int(x) for x in pattern.findall((out / "runs" / f"{n}.log").read_text())]
        assert len(stops) == 2 and stops[0] == first[n][0] < stops[1]
        metrics = read_metrics(out / "runs" / n)
        assert [r["step"] for r in metrics] == list(range(1, stops[1] + 1))


def test_compare_in_one_process_stops_in_one_sentence_and_continues(tmp_path):
    out = tmp_path / "c"
    cmd = [
        sys.executable,
        "-m",
        "sasr",
        "compare",
        "--task",
        "arithmetic",
        "--methods",
        "sft",
        "--steps",
        "400",
        "--warmup-steps",
        "1",
        "--seeds",
        "1",
        "--output",
        str(out),
        *SMALL,
    ]
    says = "sasr compare: sft-s1 stopped by SIGTERM after step"
    err = _stop_compare_after(cmd, out, {"sft-s1": 0}, code=143, says=says)
    first = int(re.search(r"after step (\d+)", err).group(1))
    err = _stop_compare_after(cmd, out, {"sft-s1": first}, code=143, says=says)
    second = int(re.search(r"after step (\d+)", err).group(1))
    run = out / "runs" / "sft-s1"
    # continued, not started over (which would have wiped the run directory and its first checkpoint)
    assert [p.name for p in complete_checkpoints(run)] == [f"step-{first:06d}", f"step-{second:06d}"]
    metrics = read_metrics(run)
    assert first < second and [r["step"] for r in metrics] == list(range(1, second + 1))


def test_compare_gives_the_two_stage_baseline_sasrs_sft_steps(tmp_path):
    """Equal SFT budget: sft-then-grpo switches after as many SFT steps as SASR took with the same seed."""
    import yaml

    from sasr.experiments.plan import _waves

    assert _waves(["sft-then-grpo", "grpo", "sasr"]) == [["grpo", "sasr"], ["sft-then-grpo"]]
    assert _waves(["sft-then-grpo", "grpo"]) == [["sft-then-grpo", "grpo"], []]
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--methods",
        "sft-then-grpo,sasr",
        "--steps",
        "8",
        "--warmup-steps",
        "1",
        "--seeds",
        "3",
        "--samples",
        "0",
        "--set",
        "sasr.gamma=4",
        "--output",
        str(out),
        *SMALL,
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())["methods"]
    sasr_sft = results["sasr"]["per_seed"][0]["sft_steps"]
    assert 1 < sasr_sft < 8  # p_1 = 1 / 5: SASR took SFT steps after its warm-up
    assert results["sft-then-grpo"]["per_seed"][0]["sft_steps"] == sasr_sft
    saved = yaml.safe_load((out / "runs" / "sft-then-grpo-s3" / "config.yaml").read_text())
    assert saved["sft-then-grpo"]["switch_step"] == sasr_sft


def test_paired_bootstrap_on_cases_computed_by_hand():
    from sasr.experiments.stats import paired_bootstrap

    # One seed, differences [0, 1]: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so
    # the 2.5% and 97.5% points are 0 and 1.
    assert paired_bootstrap([[1, 1]], [[1, 0]]) == {
        "mean": 0.5,
        "low": 0.0,
        "high": 1.0,
        "clear_of_zero": False,
    }
    # One seed, 400 questions: d = +1 on 60, -1 on 20, 0 on 320. mean 0.1, sd sqrt(0.2 - 0.01): the normal
    # interval 0.1 +- 1.96 * sqrt(0.19 / 400) = [0.0573, 0.1427].
    a, b = [1] * 60 + [0] * 340, [0] * 60 + [1] * 20 + [0] * 320
    p = paired_bootstrap([a], [b])
    assert p["mean"] == pytest.approx(0.1) and p["clear_of_zero"]
    assert p["low"] == pytest.approx(0.0573, abs=0.004) and p["high"] == pytest.approx(0.1427, abs=0.004)
    # Two seeds whose questions agree within a seed (d = 0 on one, 0.2 on the other): only the seed draw
    # varies, giving 0, 0.1, 0.2 with probabilities 1/4, 1/2, 1/4.
    p = paired_bootstrap([[0.0] * 10, [0.2] * 10], [[0.0] * 10, [0.0] * 10])
    assert (p["mean"], p["low"], p["high"]) == pytest.approx((0.1, 0.0, 0.2))
    # Two identical methods: the interval is [0, 0], which covers zero.
    same = [[1, 0, 1, 1], [0, 0, 1, 0]]
    assert paired_bootstrap(same, same) == {"mean": 0.0, "low": 0.0, "high": 0.0, "clear_of_zero": False}
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([[1, 0]], [[1]])


COMMITTED = sorted(
    p.parent.name for p in (Path(__file__).parents[1] / "docs" / "results").glob("*/summaries")
)


@pytest.mark.parametrize("name", COMMITTED)
def test_the_committed_comparisons_reassemble_from_their_summaries(name, tmp_path):
    """Every table in docs/results/ is what the current code assembles from its committed summaries alone,
    by the command it records: nothing trained or evaluated again, the same results.json."""
    import shlex

    root = Path(__file__).parents[1]
    committed = root / "docs" / "results" / name
    results = json.loads((committed / "results.json").read_text())
    shutil.copytree(committed / "summaries", tmp_path / "summaries")
    argv = shlex.split(results["command"])[1:]  # after "sasr"
    argv[argv.index("--output") + 1] = str(tmp_path)
    argv[argv.index("--config") + 1] = str(root / argv[argv.index("--config") + 1])
    for i in [i + 1 for i, a in enumerate(argv) if a == "--include"]:  # another folder: from the repo root
        argv[i] = str(root / argv[i])
    assert main(argv) == 0
    assert not (tmp_path / "runs").exists()
    ours = json.loads((tmp_path / "results.json").read_text())
    assert {**ours, "command": None} == {**results, "command": None}


def test_a_run_report_draws_every_held_out_evaluation_at_whole_steps(tmp_path):
    """`sasr report` of a `tiny` run evaluated before, every 2 steps and after: the held-out panel holds step 0,
    2 and 4 (the last, after training) and its steps are whole numbers; a comparison's accuracy curves start at
    the untrained model's accuracy."""
    from matplotlib.figure import Figure

    import sasr
    from sasr.experiments.report import _draw, plot_run

    out = tmp_path / "run"
    top = {"steps": 4, "warmup_steps": 1, "eval": {"before": True, "after": True, "every": 2}}
    sasr.train(tiny_config(out, **top), progress=False)
    status = json.loads((out / "run.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4  # one line per optimizer step: the evaluations before and after are in run.json
    held = plot_run(out)["training"]["held_out/held-out accuracy"]
    assert [s for s, _ in held] == [0, 2, 4]
    assert held[0][1] == status["eval_before"]["accuracy"] and held[-1][1] == status["eval_after"]["accuracy"]
    assert held[1][1] == metrics[1]["eval_accuracy"]
    ax = Figure().subplots()
    _draw(ax, {"a": [(0, 0.1), (1, 0.2), (2, 0.3)]}, "short run")  # few steps: ticks stay whole numbers
    assert all(float(t).is_integer() for t in ax.get_xticks())
    curve = [{"step": s, "phase": "sft", "eval_accuracy": a} for s, a in [(50, 0.2), (100, 0.4)]]
    plots = plot_compare({"sft": [curve]}, tmp_path / "compare", untrained=0.05)
    assert plots["accuracy_vs_step"]["sft"][0] == (0, 0.05)
