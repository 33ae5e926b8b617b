"""results.md, written from results.json's content: the budget table, a metrics table per split, SASR's
paired differences and where the time went."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sasr.experiments.labels import is_included
from sasr.experiments.report import markdown_table
from sasr.experiments.table import BASELINE, BUDGET


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def _flops(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def results_markdown(results: dict[str, Any], output: Path) -> str:
    """results.md: the budget table, a metrics table per split, and SASR's paired differences."""
    methods = results["methods"]
    k, splits = results["samples"], results["splits"]
    commits = sorted({c for m in methods.values() for c in m["commits"]})
    n_sampled = f"the first {results['sample_size']} of them" if results["sample_size"] else "each"
    seeds_of = {m: r.get("seeds", results["seeds"]) for m, r in methods.items()}
    partial = bool(results["not_landed"]) or any(landed != results["seeds"] for landed in seeds_of.values())
    one_seed = all(len(landed) == 1 for landed in seeds_of.values())

    def cell(method: str, mean_std: list[float]) -> str:  # one seed: no spread (0.000 would read as measured)
        one = len(seeds_of[method]) == 1
        return f"{mean_std[0]:.3f}" if one else f"{mean_std[0]:.3f} ± {mean_std[1]:.3f}"

    lines = [
        f"# {results['task']}: {', '.join(m for m in methods if m != 'untrained')} on {results['model']}",
        "",
        (
            f"Matched on compute: each run stopped once it had spent {results['max_flops']:.3g} FLOPs (at most "
            f"{results['steps']} optimizer steps; "
            if results.get("max_flops")
            else f"{results['steps']} optimizer steps ("
        )
        + f"{results['warmup_steps']} warm-up where the method has one), "
        f"seeds {', '.join(map(str, results['seeds']))}; per split {splits[next(iter(splits))]['n']} held-out "
        "questions, greedy"
        + (f", and {k} samples of {n_sampled} at the evaluation temperature" if k else "")
        + (
            ". A comparison in progress: each method over the seeds that have landed (the Budget table's "
            "seeds column), mean ± std where it has more than one"
            + (
                f"; no run of {', '.join(results['not_landed'])} has landed yet."
                if results["not_landed"]
                else "."
            )
            if partial
            else ". One seed: no spread over seeds."
            if one_seed
            else ". Mean ± std over seeds."
        )
        + (
            " A row named METHOD@FOLDER holds the runs of another comparison folder (`--include`): trained with "
            "options of its own, evaluated on the same questions."
            if any(is_included(m) for m in methods)
            else ""
        )
        + f" Runs at commit {', '.join(commits)}.",
        "",
        "## Budget",
        "",
        "Tokens: completion tokens in the training passes (demonstrations and rollouts), summed over steps. "
        "FLOPs: 6 N per token through a training pass and 2 N per sampled token, N the model's parameters "
        "(arXiv 2604.23747's count; - for runs from before sasr counted them).",
        "",
        markdown_table(
            ["method", *(["seeds"] if partial else []), "SFT steps", "GRPO steps", "mixed steps", "tokens"]
            + ["FLOPs", "wall s"],
            [
                [m, *([", ".join(map(str, seeds_of[m]))] if partial else [])]
                + [*(f"{r['budget'][b][0]:.1f}" for b in BUDGET[:3]), f"{r['budget']['tokens'][0]:,.0f}"]
                + [_flops(r["budget"]["flops"][0]), f"{r['budget']['seconds'][0]:.0f}"]
                for m, r in methods.items()
            ],
        ),
    ]
    for split, info in splits.items():
        names = list(methods["untrained"]["splits"][split])
        what = "the training distribution" if split == "test" else info["shift"] or split
        lines += [
            "",
            f"## Split `{split}`: {what}",
            "",
            markdown_table(
                ["method", *names],
                [[m, *(cell(m, r["splits"][split][n]) for n in names)] for m, r in methods.items()],
            ),
        ]
    paired = results["paired"]["splits"]
    first = paired[next(iter(paired))] if paired else {}  # the methods paired with SASR (the same per split)
    unpaired = [m for m in methods if m != BASELINE and m not in first] if BASELINE in methods else []
    if first:
        one_seed_pairs = all(len(p.get("seeds", results["seeds"])) == 1 for p in first.values())
        lines += [
            "",
            "## SASR against each method, paired",
            "",
            "Mean difference in greedy accuracy, SASR minus the method, over the same questions; 95% interval "
            + (
                "of a bootstrap over the questions (one seed, so no spread over seeds is in it; "
                if one_seed_pairs
                else "of a two-level bootstrap (seeds drawn with replacement, then each drawn seed's questions; "
            )
            + "10,000 replicates)"
            + (", over the seeds both have (second column)" if partial else "")
            + ". **Bold**: the interval excludes zero."
            + (f" Not paired yet (no seed in common with SASR): {', '.join(unpaired)}." if unpaired else ""),
            "",
            markdown_table(
                ["method", *(["seeds"] if partial else []), *paired],
                [
                    [m, *([", ".join(map(str, first[m].get("seeds", [])))] if partial else [])]
                    + [
                        ("**{} [{}, {}]**" if p["clear_of_zero"] else "{} [{}, {}]").format(
                            *map(_signed, (p["mean"], p["low"], p["high"]))
                        )
                        for split in paired
                        for p in [paired[split][m]]
                    ]
                    for m in first
                ],
            ),
        ]
    t = results["time"]
    wall = t.get("timed_train_wall_seconds", t["timed_train_seconds"])
    if t["eval_timed"] and wall + t["eval_seconds"] > 0:
        everything = t["eval_timed"] == t["runs"]
        train, of = f"{(t['train_seconds'] if everything else t['timed_train_seconds']) / 3600:.2f} h", "time"
        if t.get("most_at_once", 1) > 1:
            train += f" ({wall / 3600:.2f} h of wall clock, up to {t['most_at_once']} runs trained at once)"
            of = "wall clock"
        share = t["eval_seconds"] / (wall + t["eval_seconds"])
        hours = f"evaluation {t['eval_seconds'] / 3600:.2f} h ({share:.0%} of those runs' {of})."
        if everything:
            timing = f"Time: training {train}, {hours}"
        else:
            timing = (
                f"Time: training {t['train_seconds'] / 3600:.2f} h over all {t['runs']} runs; in the "
                f"{t['eval_timed']} that timed their evaluation, training {train} and {hours}"
            )
        lines += ["", timing]
    lines += ["", "Command:", "", f"    {results['command']}", ""]
    figures = [
        ("accuracy_vs_step.png", "held-out accuracy"),
        ("reward_vs_step.png", "train reward"),
        ("dynamics.png", "how each method decides its steps"),
    ]
    lines += [f"![{alt}]({name})" for name, alt in figures if (output / name).exists()]
    return "\n".join(lines) + "\n"
