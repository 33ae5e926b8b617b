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

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

PHASE_COLOURS = {"sft": "#4C72B0", "grpo": "#DD8452"}
Series = dict[str, list[tuple[float, float]]]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: Sequence[dict], key: str, fn=None) -> list[tuple[float, float]]:
    """[(step, value)] of the rows that have ``key`` (or ``fn(row)``) not None."""
    out = []
    for r in rows:
        v = fn(r) if fn else r.get(key)
        if v is not None:
            out.append((r["step"], float(v)))
    return out


def _phase_strip(ax, rows: Sequence[dict]) -> None:
    """A coloured band under the axis: one cell per step, SFT or GRPO."""
    for r in rows:
        ax.axvspan(r["step"] - 0.5, r["step"] + 0.5, ymin=0, ymax=0.04, color=PHASE_COLOURS[r["phase"]], lw=0)


def _draw(ax, data: Series, title: str, ylabel: str = "") -> None:
    for name, points in data.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(data) > 1:
        ax.legend(fontsize=7)


def _save(fig, path: Path, figures: dict[str, Series], name: str, data: dict[str, Series]) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    figures[name] = data
    return path


def plot_run(run_dir: Path, out_dir: Path | None = None) -> dict[str, Any]:
    """The training curves of one run: loss, gradient norm, reward/accuracy, SASR's p_t and drift, KL,
    held-out accuracy; every panel carries the SFT/GRPO phase strip. Returns {figure: series}."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out_dir = Path(out_dir or run_dir / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    panels: dict[str, Series] = {
        "loss": {
            "SFT loss": series(rows, "loss", lambda r: r["loss"] if r["phase"] == "sft" else None),
            "GRPO loss": series(rows, "loss", lambda r: r["loss"] if r["phase"] == "grpo" else None),
        },
        "grad_norm": {"pre-clip gradient norm": series(rows, "grad_norm")},
        "reward": {"train reward": series(rows, "reward_mean"), "train accuracy": series(rows, "accuracy")},
        "sasr": {
            "p_t": series(rows, "p_t"),
            "g_last / G_warmup": series(
                rows, "g_last", lambda r: r["g_last"] / r["g_warmup"] if r.get("g_warmup") else None
            ),
        },
        "kl": {"KL to reference": series(rows, "kl")},
        "held_out": {"held-out accuracy": series(rows, "eval_accuracy")},
    }
    titles = {
        "loss": "loss",
        "grad_norm": "gradient norm (pre-clip)",
        "reward": "GRPO steps: reward and accuracy",
        "sasr": "SASR: p_t and SFT-gradient drift",
        "kl": "KL to the reference policy",
        "held_out": "held-out accuracy (greedy)",
    }
    fig, axes = plt.subplots(3, 2, figsize=(11, 9))
    for ax, (name, data) in zip(axes.flat, panels.items()):
        _draw(ax, data, titles[name])
        _phase_strip(ax, rows)
    fig.legend(
        handles=[Patch(color=c, label=p.upper()) for p, c in PHASE_COLOURS.items()],
        loc="lower center",
        ncol=2,
    )
    fig.suptitle(f"{run_dir.name}")
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


def plot_compare(runs: dict[str, list[Path]], out_dir: Path) -> dict[str, Any]:
    """Comparison figures: held-out accuracy and train reward against step for every method (mean over
    seeds), and SASR's p_t, g_last / G_warmup and KL against step with its phase strip (first seed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Series] = {}
    metrics = {m: [read_metrics(d) for d in dirs] for m, dirs in runs.items()}

    for name, key, title in [
        ("accuracy_vs_step", "eval_accuracy", "held-out accuracy (greedy), mean over seeds"),
        ("reward_vs_step", "reward_mean", "train reward on GRPO steps (moving mean of 3), mean over seeds"),
    ]:
        data = {}
        for method, per_seed in metrics.items():
            curve = _mean_curve([series(rows, key) for rows in per_seed])
            data[method] = _moving_mean(curve) if key == "reward_mean" else curve
        fig, ax = plt.subplots(figsize=(7, 4.2))
        _draw(ax, data, title)
        if len(data) == 1:
            ax.legend(fontsize=7)
        _save(fig, out_dir / f"{name}.png", figures, name, data)

    if "sasr" in metrics and metrics["sasr"]:
        rows = metrics["sasr"][0]
        panels = {
            "p_t": series(rows, "p_t"),
            "g_last / G_warmup": series(
                rows, "g_last", lambda r: r["g_last"] / r["g_warmup"] if r.get("g_warmup") else None
            ),
            "KL to reference": series(rows, "kl"),
        }
        fig, axes = plt.subplots(3, 1, figsize=(7, 7.5), sharex=True)
        for ax, (label, points) in zip(axes, panels.items()):
            _draw(ax, {label: points}, label)
            _phase_strip(ax, rows)
        axes[0].legend(
            handles=[Patch(color=c, label=p.upper()) for p, c in PHASE_COLOURS.items()], fontsize=7
        )
        fig.suptitle("SASR dynamics (first seed)")
        _save(fig, out_dir / "sasr_dynamics.png", figures, "sasr_dynamics", panels)
    (out_dir / "plots.json").write_text(json.dumps(figures))
    return figures


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_run_report(run_dir: Path) -> Path:
    """DIR/report/: training.png, plots.json and report.md (the run's summary and a link to the figure)."""
    run_dir = Path(run_dir)
    plot_run(run_dir)
    status = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    lines = [f"# Run {run_dir.name}", "", f"status: {status.get('status', 'unknown')}", ""]
    for key in ("method", "task", "model", "steps", "sft_steps", "grpo_steps", "seconds"):
        if key in status:
            lines.append(f"- {key}: {status[key]:.0f}" if key == "seconds" else f"- {key}: {status[key]}")
    for when in ("eval_before", "eval_after"):
        if status.get(when):
            ev = status[when]
            lines += ["", f"## {when.replace('_', ' ')}", "", markdown_table(
                ["metric", "value"], [[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in ev.items()]
            )]  # fmt: skip
    lines += ["", "![training curves](training.png)", ""]
    path = run_dir / "report" / "report.md"
    path.write_text("\n".join(lines))
    return path
