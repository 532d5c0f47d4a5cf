"""Two file-system steps several owners share, written once.

- `locked` / `locked_async` / `try_lock`: an ``flock`` held on a lock file (made if
  missing) for a block; a contended lock is said once at INFO (``waiting``) and waited for,
  or, with `try_lock`, not waited for. Closing the file drops the lock, so a process that
  dies holds nothing.
- `built_aside`: a directory made under a temporary name beside its place and renamed
  into place only when complete, so a reader never sees half of one (an image, an import).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def _open(path: Path, mode: int) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)


def try_lock(path: Path, *, shared: bool = False, mode: int = 0o600) -> int | None:
    """An fd of ``path`` holding its lock, or None if another process holds it; closing
    the fd drops it."""
    fd = _open(path, mode)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def locked(
    path: Path,
    *,
    shared: bool = False,
    waiting: str = "",
    mode: int = 0o600,
    logger: logging.Logger = log,
) -> Iterator[None]:
    """Hold ``path``'s lock (exclusive, or ``shared``) while the block runs; when another
    process holds it, log ``waiting`` (if given, at INFO on the caller's ``logger``: its
    user sees it where the caller's other news shows) and wait."""
    fd = try_lock(path, shared=shared, mode=mode)
    if fd is None:
        if waiting:
            logger.info("%s", waiting)
        fd = _open(path, mode)
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def locked_async(
    path: Path,
    *,
    shared: bool = False,
    waiting: str = "",
    mode: int = 0o600,
    logger: logging.Logger = log,
) -> AsyncIterator[None]:
    """`locked`, waiting in a thread so that the event loop runs on."""
    fd = try_lock(path, shared=shared, mode=mode)
    if fd is None:
        if waiting:
            logger.info("%s", waiting)
        fd = _open(path, mode)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
    try:
        yield
    finally:
        os.close(fd)


class Aside:
    """A directory being built beside its place (`built_aside`); `place` moves it there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.placed: Path | None = None

    def place(self, target: Path, *, replace: bool = True) -> bool:
        """Rename the directory to ``target``; an existing ``target`` is replaced, or with
        ``replace=False`` kept (and this one dropped: returns False)."""
        if target.exists():
            if not replace:
                return False
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        self.path.rename(target)
        self.placed = target
        return True


@contextlib.contextmanager
def built_aside(parent: Path, label: str) -> Iterator[Aside]:
    """A fresh directory in ``parent`` (``.tmp-LABEL-PID``, which listings skip) for the
    block to fill and `Aside.place`; whatever was not placed is removed when it ends."""
    tmp = parent / f".tmp-{label}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield Aside(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["Aside", "built_aside", "locked", "locked_async", "try_lock"]
