"""``sasr compare``: every method with the same budget, data and seeds, evaluated on the same questions.

Layout of DIR:
- ``runs/METHOD-sSEED/``: a normal run directory each (weights and checkpoints: never committed);
- ``summaries/METHOD-sSEED.json`` and ``summaries/untrained-sSEED.json``: all the table needs of a run (its
  configuration, the commit it ran at, its status and metrics lines, and one record per held-out question of
  every split). They are small: commit them. The table is assembled from them alone, so a comparison can be
  run in parts, stopped, and finished on another machine;
- ``results.json``, ``results.md`` and the plots.

Re-running skips every run with a summary (of the same configuration), continues a stopped run (same
configuration, a complete checkpoint) from its newest checkpoint, and trains the rest.

This module runs a comparison in order; which runs it needs (``plan``), training and evaluating them
(``run``), their summaries (``summaries``), the table (``table``) and results.md (``markdown``) are modules
of their own.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sasr.config import TrainConfig
from sasr.errors import SasrError
from sasr.experiments.markdown import results_markdown
from sasr.experiments.plan import _needs_budget, _sft_budget, _untrained_config, _waves, run_config
from sasr.experiments.report import plot_compare
from sasr.experiments.run import _train_in_parallel, _trained, _untrained
from sasr.experiments.summaries import EVAL_KEYS, git_commit, included, read_summary, summary_path
from sasr.experiments.table import _untrained_accuracy, assemble
from sasr.locks import FolderLock
from sasr.methods import method_class
from sasr.run_dir import finished


def compare(
    base: TrainConfig,
    methods: list[str],
    seeds: list[int],
    output: Path,
    progress: bool = True,
    command: str | None = None,
    jobs: int = 1,
    landed: bool = False,
    include: Sequence[Path] = (),
) -> dict[str, Any]:
    """Train and evaluate every (method, seed) that has no summary yet; assemble results.json, results.md
    and the plots from the summaries (and from those of the ``include`` folders: see ``summaries.included``).

    ``jobs`` > 1 trains the runs that have not finished in that many parallel ``sasr train`` processes first.
    ``landed``: train and evaluate nothing; the table of the summaries there are (a comparison in progress),
    each method over the seeds it has; it only reads the summaries, so it may run beside the comparison that
    writes them, which holds the folder (a second comparison of the same folder is refused).
    """
    output.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext() if landed else FolderLock(output, "sasr compare"):
        return _compare(base, methods, seeds, output, progress, command, jobs, landed, include)


def _compare(base, methods, seeds, output, progress, command, jobs, landed, include) -> dict[str, Any]:
    specs = {method_class(m).name: m for m in methods}  # a user's method (file.py:Class) by its name
    methods = list(specs)
    extra = included(base, include, seeds, output)  # before any training: a wrong folder fails at once
    commit = git_commit()
    summaries: dict[tuple[str, int], dict] = {}
    for wave in _waves(methods):
        budgets = {m: _sft_budget(m, summaries, seeds) for m in wave}
        configs = {
            (m, s): run_config(base, specs[m], s, output / "runs" / f"{m}-s{s}", budgets[m])
            for m in wave
            for s in seeds
            # a run that takes its SFT budget from seeds that have not all landed cannot have landed either
            if not (landed and budgets[m] is None and _needs_budget(base, m, methods))
        }
        found = {
            key: read_summary(summary_path(output, f"{m}-s{s}"), c.model_dump(mode="json"))
            for key, c in configs.items()
            for m, s in [key]
        }
        if landed:
            summaries.update({key: summary for key, summary in found.items() if summary})
            continue
        pending = {
            f"{m}-s{s}": configs[m, s]
            for (m, s), summary in found.items()
            if summary is None and not finished(output / "runs" / f"{m}-s{s}")
        }
        if jobs > 1 and pending:
            _train_in_parallel(pending, output, jobs, progress)
        for key in sorted(configs, key=lambda ms: (ms[1], wave.index(ms[0]))):
            summaries[key] = found[key] or _trained(configs[key], output, progress, commit)
    for s in seeds:
        if not landed:
            summaries["untrained", s] = _untrained(base, s, output, progress, commit)
        elif summary := read_summary(
            summary_path(output, f"untrained-s{s}"), _untrained_config(base, s), EVAL_KEYS
        ):
            summaries["untrained", s] = summary
    if not any(m == "untrained" for m, _ in summaries):
        raise SasrError(
            f"sasr compare --landed: {output / 'summaries'} holds no evaluation of the untrained model for "
            f"seeds {', '.join(map(str, seeds))} (untrained-sSEED.json), which the table starts from; run "
            "compare without --landed to evaluate it"
        )
    summaries.update(extra)
    rows = [*methods, *dict.fromkeys(m for m, _ in extra)]
    results = assemble(base, rows, seeds, summaries, command)
    (output / "results.json").write_text(json.dumps(results, indent=2))
    plot_compare(
        {
            m: [summaries[m, s]["metrics"] for s in r["seeds"]]
            for m, r in results["methods"].items()
            if m in rows
        },
        output,
        _untrained_accuracy(summaries, seeds),
    )
    (output / "results.md").write_text(results_markdown(results, output))
    return results
