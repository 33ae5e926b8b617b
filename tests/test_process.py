"""The process settings: glibc's malloc keeps freed memory, so a large tensor allocated again faults no pages."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sasr.process import GLIBC

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# What changes the default run's faults: torch's and glibc's huge-page switches, malloc variables, another malloc.
MALLOC_ENV = ("THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES", "LD_PRELOAD")

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


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
@pytest.mark.skipif(
    THP.is_file() and "[always]" in THP.read_text(), reason="huge pages fault 512 pages at a time"
)
def test_keep_freed_memory_reuses_pages():
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV and not k.startswith("MALLOC_")}

    def faults(malloc: str) -> int:  # each in its own process: the setting is the whole process's
        run = subprocess.run(
            [sys.executable, "-c", FAULTS, malloc], capture_output=True, text=True, check=True, env=env
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
