"""`Deadline`: one bounded wait's end, shared by the steps that make up the wait."""

from __future__ import annotations

import time


class Deadline:
    """The moment ``timeout`` seconds from now (None: never).

    Every step of a multi-step wait asks ``left()`` for its own bound, so the
    steps together never take longer than the caller allowed::

        deadline = Deadline(timeout)
        while not done():
            await next_event(timeout=deadline.left())
    """

    __slots__ = ("_at", "timeout")

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._at = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        """Seconds left (never below 0), or None for no limit."""
        return None if self._at is None else max(0.0, self._at - time.monotonic())

    @property
    def expired(self) -> bool:
        return self._at is not None and time.monotonic() >= self._at

    def within(self, interval: float | None) -> float | None:
        """``interval`` capped by what is left (None: no cap on either side)."""
        left = self.left()
        if interval is None:
            return left
        return interval if left is None else min(interval, left)

    def __repr__(self) -> str:
        left = self.left()
        return "<Deadline never>" if left is None else f"<Deadline in {left:.3f} s>"
