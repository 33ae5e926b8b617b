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


# --- nothing left behind: checked once the whole run has ended ---------------------------------------------

_REPO_SKIP = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _repo_files() -> set[str]:
    """Every file of the repository's tree (the environment, git's and the caches' folders aside)."""
    import os
    from pathlib import Path

    from helpers import ROOT

    found = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _REPO_SKIP and not d.endswith(".egg-info")]
        found |= {str(Path(folder, f).relative_to(ROOT)) for f in files}
    return found


def _children() -> list[str]:
    """This process's live child processes (their command lines), from /proc."""
    import os
    from pathlib import Path

    mine, found = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            # multiprocessing's resource tracker is the interpreter's own helper: it ends with this process
            if fields[1] == mine and fields[0] != "Z" and "resource_tracker" not in command:
                found.append(command[:120])
        except (OSError, IndexError):
            continue
    return found


def pytest_sessionstart(session):
    session.config._files_before = _repo_files()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a test left a file in the repository, a child process alive, or a tracker run open."""
    left = []
    new = sorted(_repo_files() - getattr(session.config, "_files_before", set()))
    if new:
        left.append(f"files in the repository: {new[:5]}")
    if children := _children():
        left.append(f"processes still running: {children[:3]}")
    try:
        from trackio import context_vars

        if context_vars.current_run.get() is not None:
            left.append("a trackio run still open")
    except ImportError:
        pass
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line("")
        reporter.write_line("tests left behind: " + "; ".join(left), red=True)
        session.exitstatus = 1
