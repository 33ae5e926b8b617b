"""A comparison's summaries (``summaries/METHOD-sSEED.json``, ``summaries/untrained-sSEED.json``): all the
table needs of a run, named, read (refused in one sentence if made with another configuration), written, and
taken from another comparison folder (``--include``)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

from sasr.config import BOOKKEEPING_KEYS, TrainConfig
from sasr.errors import SasrError
from sasr.experiments.labels import included_label
from sasr.experiments.plan import run_config
from sasr.methods import METHODS, method_source
from sasr.trees import dotted

# What an evaluation depends on: the untrained model's summary is reused while these stay the same, and another
# folder's runs (--include) pair with this comparison's only if these are the same (the same questions).
EVAL_KEYS = ("seed", "model", "task", "eval", "grpo.max_prompt_length")


def summary_path(output: Path, name: str) -> Path:
    """The summary of run ``name`` (METHOD-sSEED, or untrained-sSEED) in the comparison folder ``output``."""
    return output / "summaries" / f"{name}.json"


def _differences(saved: dict, wanted: dict, keys: tuple[str, ...] | None = None) -> list[str]:
    """'key: saved there, wanted here' for every option that differs (bookkeeping such as the run directory
    or checkpoint frequency aside). An option missing on one side counts as equal while the other side holds
    its default (it changes nothing): so summaries of an earlier version of sasr stay usable, and a method's
    options filled in by whichever method a comparison listed first do not tell two runs apart."""
    a, b = dotted(saved), dotted(wanted)
    tree = TrainConfig().model_dump(mode="json")
    for name, method in METHODS.items():  # every method's options ("grpo" and "sft" are sections too)
        tree[name] = {**method.Options().model_dump(mode="json"), **tree.get(name, {})}
    defaults = dotted(tree)
    names = sorted((a.keys() | b.keys()) - set(BOOKKEEPING_KEYS))
    if keys is not None:
        names = [n for n in names if any(n == k or n.startswith(k + ".") for k in keys)]
    return [
        f"{n}: {a.get(n)!r} there, {b.get(n)!r} here"
        for n in names
        if a.get(n) != b.get(n) and not _default_on_one_side(n, a, b, defaults)
    ]


def _default_on_one_side(name: str, a: dict, b: dict, defaults: dict) -> bool:
    if name not in defaults or (name in a) == (name in b):
        return False
    return (a if name in a else b)[name] == defaults[name]


def git_commit() -> str:
    """The commit of the sasr source tree that runs ('+dirty' with uncommitted changes), or 'unknown'."""
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=src, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def read_summary(path: Path, config: dict, keys: tuple[str, ...] | None = None) -> dict | None:
    """The summary at ``path`` if there is one; refused in one sentence if it was made with another
    configuration (only ``keys`` compared, when given)."""
    if not path.exists():
        return None
    summary = _load_summary(path, "delete it to redo that run")
    _same_method_file(summary, config["method"], path)
    diff = _differences(summary["config"], config, keys)
    if diff:
        raise SasrError(
            f"summary {path} was made with another configuration ({'; '.join(diff[:3])}); compare with that "
            "configuration, or delete the summary (and its run directory) to redo the run"
        )
    return summary


def _same_method_file(record: dict, method: str, path: Path) -> None:
    """Refuse a summary or run (``record``, at ``path``) of a user's method whose file has changed since."""
    then, now = record.get("method_source"), method_source(method)
    if then and now and then["sha256"] != now["sha256"]:
        raise SasrError(
            f"{path} was made with another version of the method file {method.rpartition(':')[0]} (its sha256 "
            "differs); restore the file, or delete the summary and the run directory to train that run again"
        )


def _load_summary(path: Path, fix: str) -> dict:
    """The summary at ``path``, or one sentence that says it is none and ``fix``."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        summary = None
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        raise SasrError(f"summary {path} is not a sasr compare summary; {fix}")
    return summary


def _write_summary(path: Path, summary: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, separators=(",", ":")) + "\n")
    tmp.replace(path)  # never half a summary
    return summary


def included(
    base: TrainConfig, folders: Sequence[Path], seeds: list[int], output: Path
) -> dict[tuple[str, int], dict]:
    """The trained runs of other comparison folders, as ``METHOD@FOLDER`` rows of this one: a variant trained
    with options of its own (another rate, no KL...) tabled and paired with this comparison's SASR. Refused
    in one sentence unless each was evaluated as this comparison evaluates (the pairs need the same
    questions), and for this comparison's own folder or two folders of one name (rows of one label)."""
    rows, names = {}, {}
    for folder in folders:
        where = folder.resolve()
        if where == output.resolve():
            raise SasrError(f"--include {folder} is this comparison's own folder: its runs are in the table")
        if names.setdefault(where.name, where) != where:
            raise SasrError(
                f"--include {folder} and {names[where.name]} have one name, which labels their rows "
                f"({included_label('METHOD', where.name)}); rename one"
            )
        # A trained run is evaluated with the trainer's own evaluations off: compare run_config's, not base's.
        wanted = {s: run_config(base, base.method, s, where).model_dump(mode="json") for s in seeds}
        found = 0
        for path in sorted((folder / "summaries").glob("*-s*.json")):
            method, _, seed = path.stem.rpartition("-s")
            if method == "untrained" or not seed.isdecimal() or int(seed) not in seeds:
                continue
            summary = _load_summary(path, "include a folder that sasr compare wrote")
            diff = _differences(summary["config"], wanted[int(seed)], EVAL_KEYS)
            if diff:
                raise SasrError(
                    f"--include {folder}: {path.name} was evaluated otherwise ({'; '.join(diff[:3])}), so not "
                    "on this comparison's questions; include a comparison of the same task, model and eval"
                )
            rows[included_label(method, where.name), int(seed)] = summary
            found += 1
        if not found:
            raise SasrError(
                f"--include {folder}: no run summaries (summaries/METHOD-sSEED.json) of seeds "
                f"{', '.join(map(str, seeds))} there; name the --output folder of a sasr compare"
            )
    return rows
