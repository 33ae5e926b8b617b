"""Loading rows of a dataset: local JSONL / JSON / Parquet files, or a hub dataset through `datasets`.

Bad files fail with one sentence naming the file and line: a line that is not JSON, a missing field,
an empty file. Nothing is half-loaded: rows are checked before any is returned.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sasr.errors import SasrError
from sasr.tasks.base import split_of

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def _not_utf8(path: Path, exc: UnicodeDecodeError, data: bytes, line: int | None = None) -> SasrError:
    line = line or data[: exc.start].count(b"\n") + 1
    return SasrError(
        f"{path}:{line} is not UTF-8 text ({exc.reason}, byte 0x{data[exc.start]:02x}); save it as UTF-8"
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, exc, raw, lineno) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SasrError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise SasrError(f"{path}:{lineno} must be a JSON object, not {type(row).__name__}")
            row["_line"] = lineno
            rows.append(row)
    return rows


def _read_local(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SasrError(f"data file '{path}' does not exist")
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix == ".json":
        try:
            raw = path.read_bytes()
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc, raw) from None
        except json.JSONDecodeError as exc:
            raise SasrError(f"{path}:{exc.lineno} is not valid JSON ({exc.msg})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise SasrError(f"{path} must hold a JSON list of objects")
        rows = [{**r, "_line": i + 1} for i, r in enumerate(data)]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise SasrError(f"{path} is not a readable Parquet file ({exc})") from None
        rows = [{**r, "_line": i + 1} for i, r in enumerate(table.to_pylist())]
    else:
        raise SasrError(f"data file '{path}' must end in {', '.join(LOCAL_SUFFIXES)}")
    if not rows:
        raise SasrError(f"data file '{path}' is empty")
    return rows


def _read_hub(name: str, config: str | None, split: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types; offline it is a ConnectionError or similar
        raise SasrError(
            f"cannot load dataset '{name}' split '{split}' from the hub ({type(exc).__name__}); "
            "name a local JSONL/Parquet file in its place (--task verl:FILE or jsonl:FILE; a built-in task: "
            "--set task.path=FILE)"
        ) from None
    return [{**r, "_line": i + 1} for i, r in enumerate(ds)]


def is_local(path: str) -> bool:
    return Path(path).suffix in LOCAL_SUFFIXES or Path(path).exists()


def require_fields(rows: Sequence[dict[str, Any]], fields: Sequence[str], source: str) -> None:
    """Every row has every field, or one sentence names the first that does not."""
    for row in rows:
        for name in fields:
            if row.get(name) is None:
                raise SasrError(f"{source}:{row.get('_line', '?')} has no field '{name}'")


def load_rows(
    path: str | None, test_path: str | None, hub_name: str, hub_config: str | None, split: str
) -> tuple[list[dict[str, Any]], bool]:
    """Rows for ``split`` and whether the source already separates the splits.

    - ``path`` a local file, no ``test_path``: all its rows, not yet split (the caller splits by a hash);
    - ``path`` and ``test_path`` local: each file is one split;
    - otherwise the hub dataset ``path or hub_name`` with its own train/test splits.
    """
    source = path or hub_name
    if is_local(source):
        if test_path:
            return _read_local(Path(test_path if split == "test" else source)), True
        return _read_local(Path(source)), False
    return _read_hub(source, hub_config, split), True


def hash_split(rows: list[dict[str, Any]], key: Callable[[dict], str], split: str) -> list[dict[str, Any]]:
    """The rows of ``split`` by a stable hash of ``key(row)`` (the question): train and test never share one."""
    return [r for r in rows if split_of(key(r)) == split]


def take(items: list, n: int | None, seed: int) -> list:
    """A deterministic shuffle (by seed) of ``items``, cut to ``n``."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return items if n is None else items[:n]


def dataset_file(dataset: Any, folder: Path) -> Path:
    """A ``datasets.Dataset`` as a JSONL file in ``folder``, named by the dataset's fingerprint, so that a run
    on it can read it back (and resume) like a file of the user's."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not hasattr(dataset, "to_json") or fingerprint is None:
        raise SasrError(
            f"train_dataset and eval_dataset must be datasets.Dataset objects, not {type(dataset).__name__}"
        )
    path = folder / f"{fingerprint}.jsonl"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        dataset.to_json(partial, lines=True, force_ascii=False)
        partial.replace(path)
    return path
