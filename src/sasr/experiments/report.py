"""Plots and tables from run directories: ``sasr report RUN_DIR`` and the figures of ``sasr compare``.

Every figure is saved as PNG, and the numbers drawn are written beside it in ``plots.json`` (figure ->
series -> [[step, value], ...]) so they can be checked or re-plotted without reading pixels.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # figures drawn straight to files: no pyplot, no display backend
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from sasr.errors import SasrError
from sasr.experiments.labels import method_of
from sasr.run_dir import read_lines, read_status

LEGEND_INSIDE = 6  # the most lines whose legend goes over the plot; more get theirs beside it
# One colour per line for up to 16 (tab10, then six more far from its hues), each with its own dash too.
PALETTE = [f"C{i}" for i in range(10)] + ["#000000", "#e6ab02", "#66a61e", "#a6761d", "#1b9e77", "#e7298a"]
DASHES = ("-", "--", "-.", ":")
PHASE_COLOURS = {"sft": "#4C72B0", "grpo": "#DD8452", "mixed": "#55A868"}
Series = dict[str, list[tuple[float, float]]]


def series(rows: Sequence[dict], key: str, fn=None) -> list[tuple[float, float]]:
    """[(step, value)] of the rows that have ``key`` (or ``fn(row)``) not None."""
    out = []
    for r in rows:
        v = fn(r) if fn else r.get(key)
        if v is not None:
            out.append((r["step"], float(v)))
    return out


def _phase_strip(ax, rows: Sequence[dict]) -> None:
    """A pale band behind the data: one cell per step, coloured SFT, GRPO or mixed (both in one step)."""
    for r in rows:
        ax.axvspan(
            r["step"] - 0.5, r["step"] + 0.5, color=PHASE_COLOURS[r["phase"]], alpha=0.12, lw=0, zorder=0
        )


def _draw(ax, data: Series, title: str, ylabel: str = "", legend: bool = False) -> None:
    """Each series as a line; a legend when there are several, or when asked and there is one to show. Each
    line has its own colour (up to 16) and dash, so a comparison of every method tells each apart; more than
    ``LEGEND_INSIDE`` lines get their legend beside the plot rather than over it. Steps are whole numbers."""
    for i, (name, points) in enumerate(data.items()):
        if points:
            xs, ys = zip(*points)
            colour, dash = PALETTE[i % len(PALETTE)], DASHES[i % len(DASHES)]
            ax.plot(xs, ys, marker="o", ms=3, label=name, color=colour, ls=dash, zorder=2)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if (len(data) > 1 or legend) and any(data.values()):
        beside = {"loc": "center left", "bbox_to_anchor": (1.01, 0.5)} if len(data) > LEGEND_INSIDE else {}
        ax.legend(fontsize=7, **beside)


def _save(fig, path: Path, figures: dict[str, Series], name: str, data: dict[str, Series]) -> Path:
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))  # room for a title above and a figure legend below
    fig.savefig(path, dpi=110)
    figures[name] = data
    return path


def _phase_legend(target, **kw) -> None:
    target.legend(
        handles=[Patch(color=c, label=p.upper() if p != "mixed" else p) for p, c in PHASE_COLOURS.items()],
        **kw,
    )


def method_dynamics(method: str, rows: Sequence[dict]) -> Series:
    """The curves that show how a method decides its steps (its class's ``dynamics`` keys), with SASR's drift.
    ``method`` may be a comparison's row of another folder, METHOD@FOLDER (``compare --include``)."""
    from sasr.methods import METHODS, is_spec, method_class

    method = method_of(method)
    try:  # a user's method (file.py:Class) from its file, if it still loads
        keys = method_class(method).dynamics if method in METHODS or is_spec(method) else ()
    except SasrError:
        keys = ()
    data = {key: series(rows, key) for key in keys}
    if any("g_warmup" in r for r in rows):
        data["g_last / G_warmup"] = series(
            rows, "g_last", lambda r: r["g_last"] / r["g_warmup"] if r.get("g_warmup") else None
        )
    return data


def run_config(run_dir: Path) -> dict[str, Any]:
    """A run directory's config.yaml as a dict (empty without one)."""
    import yaml

    config = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}


def run_method(run_dir: Path) -> str:
    """The method a run directory was trained with (from its config.yaml)."""
    return run_config(run_dir).get("method", "")


def held_out(run_dir: Path, rows: Sequence[dict]) -> list[tuple[float, float]]:
    """Every held-out greedy accuracy of a run: before training at step 0 and after it at its last step (from
    run.json), and those during training (``eval.every``, in its metrics lines)."""
    status, points = read_status(run_dir), dict(series(rows, "eval_accuracy"))
    if (status.get("eval_before") or {}).get("accuracy") is not None:
        points[0] = float(status["eval_before"]["accuracy"])
    last = status.get("max_flops_step") or max((r["step"] for r in rows), default=None)
    if (status.get("eval_after") or {}).get("accuracy") is not None and last is not None:
        points[last] = float(status["eval_after"]["accuracy"])
    return sorted(points.items())


def plot_run(run_dir: Path, out_dir: Path | None = None) -> dict[str, Any]:
    """The training curves of one run: loss, gradient norm, reward/accuracy, the method's own dynamics (SASR's
    p_t and drift, CHORD's mu, HPT's routed fraction...), KL, held-out accuracy; every panel carries the phase
    strip. Returns {figure: series}."""
    run_dir = Path(run_dir)
    rows = read_lines(run_dir)
    method = run_method(run_dir)
    out_dir = Path(out_dir or run_dir / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    panels: dict[str, Series] = {
        "loss": {
            f"{phase if phase == 'mixed' else phase.upper()} loss": series(
                rows, "loss", lambda r, phase=phase: r["loss"] if r["phase"] == phase else None
            )
            for phase in PHASE_COLOURS
            if any(r["phase"] == phase for r in rows)
        }
        | {  # the parts of mixed steps, each before its weight
            f"part {key.removeprefix('loss/')}": series(rows, key)
            for key in sorted({k for r in rows for k in r if k.startswith("loss/")})
        },
        "grad_norm": {"pre-clip gradient norm": series(rows, "grad_norm")},
        "reward": {"train reward": series(rows, "reward_mean"), "train accuracy": series(rows, "accuracy")},
        "dynamics": method_dynamics(method, rows),
        "kl": {"KL to reference": series(rows, "kl")},
        "held_out": {"held-out accuracy": held_out(run_dir, rows)},
    }
    titles = {
        "loss": "loss",
        "grad_norm": "gradient norm (pre-clip)",
        "reward": "steps with rollouts: reward and accuracy",
        "dynamics": f"{method}: how it decides its steps",
        "kl": "KL to the reference policy",
        "held_out": "held-out accuracy (greedy)",
    }
    fig = Figure(figsize=(11, 9))
    axes = fig.subplots(3, 2)
    for ax, (name, data) in zip(axes.flat, panels.items()):
        _draw(ax, data, titles[name], legend=True)
        _phase_strip(ax, rows)
    _phase_legend(fig, loc="lower center", ncol=len(PHASE_COLOURS))
    config = run_config(run_dir)
    model, task = config.get("model", {}).get("name", "?"), config.get("task", {}).get("name", "?")
    fig.suptitle(f"{run_dir.name}: {method or '?'} on task {task}, model {model}")
    figures: dict[str, Series] = {}
    _save(
        fig,
        out_dir / "training.png",
        figures,
        "training",
        {f"{k}/{s}": v for k, d in panels.items() for s, v in d.items()},
    )
    (out_dir / "plots.json").write_text(json.dumps(figures))
    return figures


def _mean_curve(runs: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Mean over seeds at each step that every seed has."""
    by_step: dict[float, list[float]] = defaultdict(list)
    for points in runs:
        for step, v in points:
            by_step[step].append(v)
    return [(s, statistics.fmean(v)) for s, v in sorted(by_step.items()) if len(v) == len(runs)]


def _moving_mean(points: list[tuple[float, float]], window: int = 3) -> list[tuple[float, float]]:
    return [
        (points[i][0], statistics.fmean(v for _, v in points[max(0, i - window + 1) : i + 1]))
        for i in range(len(points))
    ]


def plot_compare(
    metrics: dict[str, list[list[dict]]], out_dir: Path, untrained: float | None = None
) -> dict[str, Any]:
    """Comparison figures from each method's metrics lines per seed: held-out accuracy (when the runs
    evaluated during training; from ``untrained``'s accuracy at step 0 when given) and train reward against
    step for every method (mean over seeds), and each method's dynamics and KL against step over its phase
    strip (first seed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Series] = {}

    steps = max(
        (r.get("step", 0) for per_seed in metrics.values() for rows in per_seed for r in rows), default=0
    )
    # about 25 independent points whatever the budget: a long run reads as a trend
    window = max(3, steps // 25)
    for name, key, title in [
        (
            "accuracy_vs_step",
            "eval_accuracy",
            "held-out accuracy (greedy), mean over the seeds that evaluated",
        ),
        (
            "reward_vs_step",
            "reward_mean",
            f"train reward (moving mean of {window} steps with rollouts), mean over seeds",
        ),
    ]:
        data = {}
        for method, per_seed in metrics.items():
            runs = [series(rows, key) for rows in per_seed]
            if key == "eval_accuracy":  # a run trained before its recipe evaluated during training has none
                runs = [points for points in runs if points]
            curve = _mean_curve(runs)
            if key == "eval_accuracy" and curve and untrained is not None and curve[0][0] > 0:
                curve = [(0, untrained), *curve]  # every method starts from the untrained model
            data[method] = _moving_mean(curve, window) if key == "reward_mean" else curve
        if not any(data.values()):
            continue
        fig = Figure(figsize=(9.5 if len(data) > LEGEND_INSIDE else 7, 4.2))  # room for a legend beside
        ax = fig.subplots()
        _draw(ax, data, title)
        if len(data) == 1:
            ax.legend(fontsize=7)
        _save(fig, out_dir / f"{name}.png", figures, name, data)

    shown = {m: per_seed[0] for m, per_seed in metrics.items() if per_seed and per_seed[0]}
    if shown:  # each method's own dynamics and KL, over its phase strip (first seed)
        fig = Figure(figsize=(7, 2.2 * len(shown) + 0.8))
        axes = fig.subplots(len(shown), 1, sharex=True, squeeze=False)
        data = {}
        for ax, (method, rows) in zip(axes[:, 0], shown.items()):
            curves = {**method_dynamics(method, rows), "KL to reference": series(rows, "kl")}
            _draw(ax, curves, method, legend=True)
            _phase_strip(ax, rows)
            data.update({f"{method}/{k}": v for k, v in curves.items()})
        _phase_legend(fig, loc="lower center", ncol=len(PHASE_COLOURS), title="phase of each step (strip)")
        fig.suptitle("how each method decides its steps (first seed)")
        _save(fig, out_dir / "dynamics.png", figures, "dynamics", data)
    (out_dir / "plots.json").write_text(json.dumps(figures))
    return figures


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_run_report(run_dir: Path) -> Path:
    """DIR/report/: training.png, plots.json, report.md (the run's summary and a link to the figure) and
    index.html (the same with samples of what the model wrote, for a browser)."""
    from sasr.experiments.html_report import write_html

    run_dir = Path(run_dir)
    plot_run(run_dir)
    write_html(run_dir)
    status = read_status(run_dir)
    lines = [f"# Run {run_dir.name}", "", f"status: {status.get('status', 'unknown')}", ""]
    for key in ("method", "task", "model", "steps", "sft_steps", "grpo_steps", "seconds"):
        if key in status:
            lines.append(f"- {key}: {status[key]:.0f}" if key == "seconds" else f"- {key}: {status[key]}")
    for when in ("eval_before", "eval_after"):
        if status.get(when):
            ev = status[when]
            lines += [
                "",
                f"## {when.replace('_', ' ')}",
                "",
                markdown_table(
                    ["metric", "value"],
                    [[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in ev.items()],
                ),
            ]
    lines += ["", "![training curves](training.png)", ""]
    path = run_dir / "report" / "report.md"
    path.write_text("\n".join(lines))
    return path
