"""Prove a refactor changed no behaviour: train a matrix of `tiny` runs with two checkouts and compare them.

    python tools/same_runs.py --baseline 7cdc5ba --out /tmp/same      # baseline commit against this work tree
    python tools/same_runs.py --baseline 7cdc5ba --candidate HEAD --out /tmp/same --cases grpo,sasr-probe

Each checkout is a git commit (checked out once as a worktree under ``--out``) or the work tree itself; its
runs use its own ``src/`` (on PYTHONPATH) with this Python. A commit's runs are kept under ``--out`` and not
redone, so comparing several extraction commits against one baseline trains the baseline once. Compared,
exactly: every metrics line without its timings, ``completions.jsonl``, ``eval_completions.jsonl``,
``run.json`` without times, each checkpoint's state (trainer state, optimizer, scheduler, RNG, reference) and
the bit pattern of every final and checkpoint weight. The ``resume`` case resumes, with the candidate, a
checkpoint the baseline wrote, and is compared against the baseline's uninterrupted run. A case of a method
the baseline does not have stops the tool with the baseline's error: leave it out with ``--cases``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--model",
    "tiny",
    "--quiet",
    "--steps",
    "6",
    "--warmup-steps",
    "2",
    "--set",
    "task.train_size=64",
    "--set",
    "task.test_size=4",
    "--set",
    "sft.batch_size=2",
    "--set",
    "grpo.batch_size=2",
    "--set",
    "grpo.num_generations=4",
    "--set",
    "grpo.max_completion_length=12",
    "--set",
    "eval.max_new_tokens=12",
    "--set",
    "report_to=none",
    "--set",
    "log_completions=true",
]
METHODS = [
    "sft",
    "grpo",
    "sft-then-grpo",
    "interleave",
    "sasr",
    "chord",
    "hpt",
    "luffy",
    "srft",
    "relift",
    "uft",
    "prefix-rft",
]
REWARD_MODULE = '''
def level_reward(prompts, completions, log_extra, log_metric, **kw):
    """Rewards a completion by its length; logs a column and a metric, as TRL lets a reward function."""
    values = [min(len(c), 40) / 40 for c in completions]
    log_extra("length_seen", [len(c) for c in completions])
    log_metric("mean_length_reward", sum(values) / len(values))
    return values


def half_scored(completions, **kw):
    """Scores every other completion; the rest get no reward (NaN in the samples, no advantage)."""
    return [None if i % 2 else min(len(c), 40) / 40 for i, c in enumerate(completions)]
'''


def _sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


# case: (launcher, extra arguments); the launcher is "one", "ddp" (two gloo processes) or "fsdp".
CASES: dict[str, tuple[str, list[str]]] = {
    **{m: ("one", ["--method", m]) for m in METHODS},
    **{
        f"{m}-accum": ("one", ["--method", m, *_sets("gradient_accumulation_steps=2")])
        for m in ("chord", "hpt", "srft")
    },
    "grpo-iterations": ("one", ["--method", "grpo", *_sets("grpo.num_iterations=2")]),
    "grpo-dynamic": (
        "one",
        [
            "--method",
            "grpo",
            *_sets(
                "grpo.dynamic_sampling=true",
                "grpo.overlong_buffer_len=4",
                "grpo.mask_truncated_completions=true",
                "grpo.max_num_gen_batches=3",
            ),
        ],
    ),
    **{
        f"grpo-{t}": ("one", ["--method", "grpo", *_sets(f"grpo.loss_type={t}")]) for t in ("dr_grpo", "dapo")
    },
    "sasr-probe-full": (
        "one",
        ["--method", "sasr", *_sets("sasr.probe_every=1", "grpo.reference=warmup", "lora.enabled=false")],
    ),
    "sasr-eval-every": ("one", ["--method", "sasr", *_sets("eval.every=2", "eval.samples=2")]),
    "luffy-reward-fn": (
        "one",
        ["--method", "luffy", "--reward", "same_runs_rewards:level_reward", "--reward", "task"],
    ),
    "grpo-unscored": ("one", ["--method", "grpo", "--reward", "same_runs_rewards:half_scored"]),
    "chord-demos-task": (
        "one",
        ["--method", "chord", *_sets("demos.task=arithmetic", "demos.train_size=32")],
    ),
    "hpt-ddp": ("ddp", ["--method", "hpt"]),
    "luffy-ddp": ("ddp", ["--method", "luffy"]),
    "relift-buffer-ddp": ("ddp", ["--method", "relift", *_sets("relift.buffer_size=3")]),
    "sasr-ddp": ("ddp", ["--method", "sasr"]),
    "sasr-fsdp": ("fsdp", ["--method", "sasr", *_sets("lora.enabled=false")]),
    "resume": ("one", ["--method", "sasr", "--save-every", "3", *_sets("save_total_limit=3")]),
}
TIMES = {"tokens_per_second", "seconds", "segments", "threads"}


def checkout(ref: str, out: Path) -> tuple[Path, str]:
    """(a folder holding the checkout's tree, a label): the work tree itself, or a worktree of a commit."""
    if ref == "WORKTREE":
        return ROOT, "worktree"
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", ref], capture_output=True, text=True, check=True
    )
    sha = sha.stdout.strip()
    tree = out / "checkouts" / sha[:10]
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), sha], check=True)
    return tree, sha[:10]


def command(tree: Path, launcher: str, args: list[str]) -> list[str]:
    if launcher == "one":
        return [sys.executable, "-m", "sasr", "train", *args]
    config = {"ddp": "ddp_cpu.yaml", "fsdp": "fsdp_cpu.yaml"}[launcher]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(tree / "configs" / "accelerate" / config),
        "-m",
        "sasr",
        "train",
        *args,
    ]


def environment(tree: Path, out: Path) -> dict[str, str]:
    (out / "same_runs_rewards.py").write_text(REWARD_MODULE)
    return {
        **os.environ,
        "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{out}",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # the same threads, so the same float sums
    }


def check_source(tree: Path, out: Path) -> None:
    """Refuse to go on unless this checkout's runs import sasr from its own src/ (not an installed copy)."""
    code = "import sasr; print(sasr.__file__)"
    found = subprocess.run(
        [sys.executable, "-c", code], env=environment(tree, out), capture_output=True, text=True
    )
    if not found.stdout.strip().startswith(str(tree / "src")):
        raise SystemExit(
            f"runs of {tree} would import sasr from {found.stdout.strip() or found.stderr[-500:]}"
        )


def train(tree: Path, label: str, case: str, out: Path, baseline_runs: Path | None) -> Path:
    """Train ``case`` with the checkout at ``tree`` into OUT/LABEL/CASE (kept when done and a commit's)."""
    run = out / label / case
    if (run / ".done").exists() and label != "worktree":
        return run
    shutil.rmtree(run, ignore_errors=True)
    run.parent.mkdir(parents=True, exist_ok=True)
    launcher, args = CASES[case]
    env = environment(tree, out)
    if case == "resume" and baseline_runs is not None:  # the candidate continues the baseline's checkpoint 3
        shutil.copytree(baseline_runs / case, run)
        (run / ".done").unlink()
        shutil.rmtree(run / "final", ignore_errors=True)
        for ckpt in (run / "checkpoints").glob("*"):
            if not ckpt.name.endswith("-3") and not ckpt.name.endswith("-000003"):
                shutil.rmtree(ckpt)
        cmd = [sys.executable, "-m", "sasr", "train", "--resume", str(run), "--quiet"]
    else:
        cmd = command(tree, launcher, [*TINY, *args, "--output", str(run)])
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{label}/{case} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    (run / ".done").write_text(" ".join(cmd))
    return run


def jsonl(path: Path, drop: set[str] = frozenset()) -> list[dict]:
    if not path.exists():
        return []
    # NaN, Infinity kept as their text: equal files compare equal (nan != nan), and NaN is not null
    rows = [json.loads(x, parse_constant=str) for x in path.read_text().splitlines() if x]
    return [{k: v for k, v in r.items() if k not in drop and not k.endswith("_seconds")} for r in rows]


def tensors(obj, prefix: str = "") -> dict[str, object]:
    """A nested state flattened to {path: value}, tensors as (dtype, shape, raw bytes)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return {
            prefix: (
                str(t.dtype),
                tuple(t.shape),
                t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"",
            )
        }
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in tensors(val, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in tensors(val, f"{prefix}[{i}]").items()}
    return {prefix: repr(obj)}


def state_files(run: Path) -> dict[str, object]:
    """Every weight and checkpoint file of a run, read as values (not bytes: pickles carry file positions)."""
    found: dict[str, object] = {}
    for path in sorted(run.rglob("*")):
        rel = str(path.relative_to(run))
        if path.suffix == ".safetensors":
            found[rel] = tensors(dict(load_file(path)))
        elif path.suffix == ".pt":
            found[rel] = tensors(torch.load(path, weights_only=False))
        elif path.name == "trainer_state.json":
            state = json.loads(path.read_text())
            state.get("trainer", state).pop("seconds", None)
            state.get("trainer", state).pop("segments", None)
            state.pop("manifest", None)  # checkpoints from before manifests lack the flag
            found[rel] = json.dumps(state, sort_keys=True)
    return found


def run_json(run: Path) -> dict:
    data = json.loads((run / "run.json").read_text())
    data.pop("inputs", None)  # what the run was handed (reward functions' hashes): runs from before lack it
    return {k: v for k, v in data.items() if k not in TIMES} | {
        "distributed": {k: v for k, v in data.get("distributed", {}).items() if k not in TIMES}
    }


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two runs of one case (empty: identical)."""
    found = []
    for name in ("metrics.jsonl", "completions.jsonl", "eval_completions.jsonl"):
        x, y = jsonl(a / name, TIMES), jsonl(b / name, TIMES)
        if x != y:
            line = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            keys = (
                sorted({k for k in {*x[line], *y[line]} if x[line].get(k) != y[line].get(k)})
                if line < min(len(x), len(y))
                else ["line count"]
            )
            found.append(f"{name}: line {line + 1} differs in {keys[:6]}")
    if run_json(a) != run_json(b):
        found.append("run.json differs")
    sa, sb = state_files(a), state_files(b)
    if sa.keys() != sb.keys():
        found.append(f"state files differ: {sorted(sa.keys() ^ sb.keys())[:4]}")
    for key in sorted(sa.keys() & sb.keys()):
        if sa[key] != sb[key]:
            inner = sa[key], sb[key]
            where = (
                [k for k in inner[0] if inner[0].get(k) != inner[1].get(k)]
                if isinstance(inner[0], dict)
                else []
            )
            found.append(f"{key} differs{' at ' + where[0] if where else ''}")
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="a commit (or WORKTREE)")
    p.add_argument("--candidate", default="WORKTREE", help="a commit, or WORKTREE (default: this work tree)")
    p.add_argument("--out", type=Path, required=True, help="where checkouts and runs are kept")
    p.add_argument("--cases", help=f"comma-separated subset of: {', '.join(CASES)}")
    args = p.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",") if args.cases else list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    base_tree, base = checkout(args.baseline, out)
    cand_tree, cand = checkout(args.candidate, out)
    check_source(base_tree, out)
    check_source(cand_tree, out)
    print(f"baseline {base}  candidate {cand}")
    failed = 0
    for case in cases:
        a = train(base_tree, base, case, out, None)
        b = train(cand_tree, cand, case, out, out / base)
        diff = differences(a, b)
        failed += bool(diff)
        print(f"{case:20s} {'IDENTICAL' if not diff else 'DIFFERENT: ' + '; '.join(diff)}", flush=True)
    print(f"{len(cases) - failed} of {len(cases)} cases identical")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
