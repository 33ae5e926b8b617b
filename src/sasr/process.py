"""What a process does beside the algorithm: agree with the other ranks, catch stop signals, exit with a code,
keep freed memory."""

from __future__ import annotations

import contextlib
import ctypes
import platform
import signal
import sys
import threading
from collections.abc import Callable, Iterator

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# glibc's mallopt parameters (malloc.h): no mmap for large blocks, and the heap's free top kept up to 1 GiB.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
KEPT = {M_TRIM_THRESHOLD: 2**30, M_MMAP_MAX: 0}
GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"  # malloc is glibc's: mallopt applies


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation, for the rest of the process.

    By default a large block (a decode step's ``[B, V]`` logits, a KV cache) is a fresh ``mmap`` whose pages
    the kernel faults in and zeroes one at a time, and goes back to the kernel when freed, as does the free top
    of the heap; kept, the next block reuses those pages. Decoding large batches spends much of its time on
    the faults (measured in docs/performance.md). The cost: freed memory stays with the process (up to 1 GiB
    at the heap's top, and any block below live ones). Returns whether glibc took the settings: False where
    it is not the C library (a preloaded jemalloc or tcmalloc goes unnoticed, and is left as it is).
    """
    if not GLIBC:
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Both are tried, whatever the first gives.
    taken = [mallopt(param, value) == 1 for param, value in KEPT.items()]
    return all(taken)


def any_rank(accelerator, flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank gets the same answer; a collective when several)."""
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        value = accelerator.reduce(value, reduction="sum")
    return bool(value.item())


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[str], None]) -> Iterator[None]:
    """Within this block SIGTERM and SIGINT call ``handler(signal name)`` instead of ending the process; the
    previous handlers come back after it. Outside the main thread (where Python allows no handler) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        s: signal.signal(s, lambda signum, frame: handler(signal.Signals(signum).name)) for s in STOP_SIGNALS
    }
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def exit_code(signal_name: str) -> int:
    """The shell's exit code for a process stopped by this signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + signal.Signals[signal_name].value
