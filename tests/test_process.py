"""The process settings: glibc's malloc keeps freed memory, so a large tensor allocated again faults no pages."""

import platform
import subprocess
import sys

import pytest

FAULTS = """
import resource, sys, torch
from sasr.process import keep_freed_memory

if sys.argv[1] == "kept":
    assert keep_freed_memory()
x = torch.ones(256, 49152)  # a decode step's logits
for _ in range(3):
    x * 2
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # each product freed before the next
    x * 2
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)
def test_keep_freed_memory_reuses_pages():
    def faults(malloc: str) -> int:  # each in its own process: the setting is the whole process's
        run = subprocess.run(
            [sys.executable, "-c", FAULTS, malloc], capture_output=True, text=True, check=True
        )
        return int(run.stdout)

    default, kept = faults("default"), faults("kept")
    assert default > 20 * 256 * 49152 * 4 // 4096 // 2  # a fresh mmap each time: its pages faulted in again
    assert kept < default // 4  # freed blocks reused (glibc may still grow its heap once or twice)


def test_cli_keeps_freed_memory(monkeypatch):
    from sasr import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    assert cli.main(["models"]) == 0
    assert calls == [True]
