"""What a process does beside the algorithm: agree with the other ranks, catch stop signals, exit with a code."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
