"""``DIR/report/index.html``: one run on one page, to open in a browser. The summary, the training curves,
and beside them what the model wrote: a few samples of every step that kept them (``log_completions``), each
with its reward, advantage, verdict, whether it was cut short, and the loss parts that trained on it.

Plain HTML and CSS (no script, nothing fetched): it opens from the file system, offline.
"""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path
from typing import Any

from sasr.run_dir import COMPLETIONS, EVAL_COMPLETIONS, read_lines, read_status

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: .25em .6em; }
th { background: #f4f4f4; text-align: left; } img { max-width: 100%; border: 1px solid #eee; }
.sample { border: 1px solid #ddd; border-radius: 4px; margin: .6em 0; padding: .4em .8em; }
.sample.right { border-left: 5px solid #2a9d47; } .sample.wrong { border-left: 5px solid #c0392b; }
.meta { color: #555; font-size: .9em; } pre { white-space: pre-wrap; margin: .3em 0; background: #fafafa; }
details summary { cursor: pointer; color: #555; }
"""


def _grouped(run_dir: Path, name: str, key: str) -> dict[Any, list[dict[str, Any]]]:
    """The JSON lines of the run's ``name`` grouped by their ``key``, in order (empty if there is no file)."""
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in read_lines(run_dir, name):
        groups[row[key]].append(row)
    return groups


def _number(x: Any) -> float:
    """A reward to sort by: NaN (no function scored it) below every number."""
    return float("-inf") if x is None or x != x else float(x)


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _sample(s: dict[str, Any], advantage: bool = True) -> str:
    verdict = "right" if s.get("correct") else "wrong"
    meta = (
        f"{html.escape(s.get('kind', ''))} &middot; reward {s['reward']:.3f}"
        + (f" &middot; advantage {s['advantage']:+.3f}" if advantage else "")
        + f" &middot; {verdict}"
        + (" &middot; cut at the length limit" if s.get("truncated") else "")
    )
    if s.get("parts"):
        meta += " &middot; trained by " + html.escape(", ".join(s["parts"]))
    return (
        f'<div class="sample {verdict}"><div class="meta">{meta}</div>'
        f"<details><summary>prompt</summary><pre>{html.escape(s.get('prompt', ''))}</pre></details>"
        f"<pre>{html.escape(s.get('completion', ''))}</pre></div>"
    )


def write_html(run_dir: Path, per_step: int = 4) -> Path:
    """Write DIR/report/index.html (beside training.png, which ``plot_run`` draws) and return its path.
    ``per_step``: samples shown of each step, the best and the worst rewarded first."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>sasr run {html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Run {html.escape(run_dir.name)}</h1>",
    ]
    keys = ("status", "method", "task", "model", "steps", "sft_steps", "grpo_steps", "mixed_steps", "seconds")
    rows = [(k, f"{status[k]:.0f}" if k == "seconds" else status[k]) for k in keys if k in status]
    parts.append(_table(rows))
    for when in ("eval_before", "eval_after"):
        if status.get(when):
            parts.append(f"<h2>Evaluation {when.removeprefix('eval_')} training</h2>")
            parts.append(
                _table([(k, f"{v:.3f}" if isinstance(v, float) else v) for k, v in status[when].items()])
            )
    parts.append('<h2>Training curves</h2><img src="training.png" alt="training curves">')
    steps = _grouped(run_dir, COMPLETIONS, "step")
    parts.append("<h2>What the model wrote</h2>")
    if not steps:
        parts.append("<p>No samples: train with <code>log_completions=true</code> to keep them.</p>")
    for step, samples in sorted(steps.items()):
        ranked = sorted(samples, key=lambda s: -_number(s["reward"]))  # unscored (NaN) last
        best = (per_step + 1) // 2
        shown = (
            ranked if len(ranked) <= per_step else ranked[:best] + ranked[len(ranked) - (per_step - best) :]
        )
        rewards = [s["reward"] for s in samples if s["reward"] == s["reward"]] or [float("nan")]
        parts.append(
            f"<h3>Step {step}</h3><p class='meta'>{len(samples)} samples, mean reward "
            f"{sum(rewards) / len(rewards):.3f}; {len(shown)} shown (best and worst rewarded)</p>"
        )
        parts += [_sample(s) for s in shown]
    evals = _grouped(run_dir, EVAL_COMPLETIONS, "eval")
    if evals:
        parts.append("<h2>Held-out answers (greedy)</h2>")
    for desc, answers in evals.items():
        right = sum(a["correct"] for a in answers)
        parts.append(
            f"<h3>{html.escape(desc)}</h3><p class='meta'>{right:.0f} of {len(answers)} right; first {per_step} shown</p>"
        )
        parts += [
            _sample({**a, "prompt": a["question"], "kind": "held-out", "advantage": 0.0}, advantage=False)
            for a in answers[:per_step]
        ]
    parts.append("</body></html>")
    out = run_dir / "report" / "index.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
