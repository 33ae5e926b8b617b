"""Shared fixtures: everything offline, on CPU, with the `tiny` random model."""

from __future__ import annotations

import pytest
from helpers import read_metrics, tiny_config  # before sasr: it sets the offline environment

from sasr.process import keep_freed_memory

keep_freed_memory()  # as the sasr command does, so in-process cli.main calls change nothing for later tests


@pytest.fixture(autouse=True)
def isolated_registries():
    """A user's method file loaded by a test (its method, losses, metrics) is gone for the next test."""
    from sasr import contracts, registry

    held, files = registry.snapshot(), contracts.forget_files(None)
    yield
    registry.restore(held)
    contracts.forget_files(files)


@pytest.fixture
def run_tiny(tmp_path):
    """Train `tiny` for a few steps; returns (RunResult, metrics rows)."""
    import sasr

    def _run(name: str = "run", **top):
        out = tmp_path / name
        result = sasr.train(tiny_config(out, **top), progress=False)
        return result, read_metrics(out)

    return _run
