"""One writer per folder: a run directory (``sasr train``) or a comparison's folder (``sasr compare``) is held
with an exclusive lock on ``FOLDER/.sasr.lock`` from before anything is written there until the command ends.

The lock is the operating system's (``flock``): it is released when its file is closed, which happens on every
exit, a crash or a SIGKILL included, so a lock file left by a killed process holds nothing and is taken over.
The file names the holder (process, host, command, start time) for the refusal's sentence.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from sasr.errors import SasrError

LOCK = ".sasr.lock"


class FolderLock:
    """``FolderLock(folder, "sasr train").acquire()`` or refuse in one sentence; ``release()`` (idempotent)."""

    def __init__(self, folder: Path, command: str) -> None:
        self.path, self.command, self.fd = Path(folder) / LOCK, command, None

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise SasrError(
                f"'{self.path.parent}' is in use by process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} ({holder.get('command', 'sasr')}, since {holder.get('since', '?')}); "
                "wait for it to end or stop it, or choose another --output"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command}
        holder["since"] = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock; the file stays (removing it would race a newcomer)
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> dict:
    """What the holding process wrote in the lock file (empty while it has not written it yet)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}
