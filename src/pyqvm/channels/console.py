"""`ConsoleLog`: a guest's serial console, a file QEMU appends to.

It reads the file's tail and follows it as it grows; ``freeze`` keeps the
last text in memory before the file goes with the runtime dir, so an error
message after teardown can still show it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pyqvm.deadline import Deadline
from pyqvm.errors import PyqvmTimeoutError

#: How much of the console `text` returns (its end).
CONSOLE_TAIL = 64 * 1024


class ConsoleLog:
    """The serial console of one VM (``path`` may not exist yet: QEMU creates it)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._frozen = b""

    @classmethod
    def create(cls, path: Path, prefix: bytes = b"") -> ConsoleLog:
        """A new console file (private to us) that starts with ``prefix``; QEMU appends."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:
            f.write(prefix)
        return cls(path)

    def text(self) -> str:
        """The console output so far (its last 64 KiB)."""
        if self.path is None or not self.path.exists():
            return self._frozen[-CONSOLE_TAIL:].decode("utf-8", "replace")
        with open(self.path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - CONSOLE_TAIL))
            return f.read().decode("utf-8", "replace")

    def read(self, offset: int = 0) -> bytes:
        """Console bytes from ``offset`` on (for following the console as it grows)."""
        if self.path is None or not self.path.exists():
            return self._frozen[offset:]
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read()

    def freeze(self) -> None:
        """Keep what the console holds now (its file is about to be removed)."""
        try:
            self._frozen = self.text().encode()
        except OSError:  # never there, or not a file: nothing to keep, and no reason to fail
            self._frozen = b""

    async def wait_for(self, pattern: str, timeout: float, name: str) -> None:
        """Wait until ``pattern`` (a plain substring) shows on the console."""
        # A file QEMU appends to: polling it is the one wait here with no event to wait on.
        deadline = Deadline(timeout)
        interval = 0.02
        while pattern not in self.text():
            if deadline.expired:
                raise PyqvmTimeoutError(f"{name}: {pattern!r} not on the console in {timeout:g} s")
            await asyncio.sleep(deadline.within(interval) or 0.0)
            interval = min(interval * 1.5, 0.25)
