"""Shared fixtures: everything offline, on CPU, with the `tiny` random model."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

import pytest

from sasr.process import keep_freed_memory

# Before anything imports huggingface_hub (the test modules import sasr after this file).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "TRACKIO_DIR" not in os.environ:  # not the user's store; removed when the tests end
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="sasr-tests-trackio-")
    atexit.register(shutil.rmtree, os.environ["TRACKIO_DIR"], ignore_errors=True)
os.environ.setdefault("WANDB_MODE", "offline")
keep_freed_memory()  # as the sasr command does, so in-process cli.main calls change nothing for later tests

TINY = {
    "model": {"name": "tiny"},
    "task": {"name": "arithmetic", "train_size": 64, "test_size": 4},
    "sft": {"batch_size": 2},
    "grpo": {"batch_size": 2, "num_generations": 4, "max_completion_length": 12},
    "eval": {"max_new_tokens": 12},
    "report_to": ["none"],
}


def tiny_config(output_dir, **top) -> dict:
    """The TINY config with top-level keys and whole sections replaced (sections are merged one level)."""
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    cfg["output_dir"] = str(output_dir)
    return cfg


@pytest.fixture
def run_tiny(tmp_path):
    """Train `tiny` for a few steps; returns (RunResult, metrics rows)."""
    import sasr

    def _run(name: str = "run", **top):
        out = tmp_path / name
        result = sasr.train(tiny_config(out, **top), progress=False)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return result, rows

    return _run
