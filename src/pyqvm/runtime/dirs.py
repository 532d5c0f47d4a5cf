"""Runtime directories: pyqvm's per-user root, and one private directory per VM.

`runtime_root` is where named VMs and private networks live; a `RuntimeDir` holds one
VM's sockets, logs and overlays, is removed with it, and one left by a killed process is
reclaimed by the next pyqvm process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from pyqvm.errors import HostError

_log = logging.getLogger(__name__)


def _runtime_base() -> str | None:
    """$XDG_RUNTIME_DIR if it is ours and writable; None lets tempfile pick (/tmp)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base:
        return None
    try:
        st = os.stat(base)
    except OSError:
        return None
    if st.st_uid != os.getuid() or not os.access(base, os.W_OK | os.X_OK):
        return None
    return base


def runtime_root() -> Path:
    """pyqvm's per-user runtime dir, made 0700 if missing; `HostError` if it is not safe.

    ``$PYQVM_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/pyqvm``, else ``/tmp/pyqvm-<uid>``: named
    VMs (`pyqvm.named.registry`) and private networks (`pyqvm.launch.privnet`) live in it.

    Another user must not be able to put sockets in it, so it must be ours and
    closed to everyone else (an attacker could otherwise pre-create
    ``/tmp/pyqvm-<uid>``).
    """
    if env := os.environ.get("PYQVM_RUNTIME_DIR"):
        path = Path(env)
    elif (xdg := os.environ.get("XDG_RUNTIME_DIR")) and Path(xdg).is_dir():
        path = Path(xdg) / "pyqvm"
    else:
        path = Path("/tmp") / f"pyqvm-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise HostError(
            f"pyqvm's runtime dir {path} is not a directory of yours closed to others "
            f"(mode {stat.filemode(st.st_mode)}, uid {st.st_uid}); remove it, or set "
            "PYQVM_RUNTIME_DIR to a directory of yours"
        )
    return path


_OWNER = "owner"


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, unique over time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _reclaim_stale(base: Path) -> None:
    """Remove runtime dirs whose owning process is gone (it was killed before cleaning up)."""
    for d in base.glob("pyqvm-*"):
        try:
            pid_s, start = (d / _OWNER).read_text().split()
            if d.stat().st_uid != os.getuid():
                continue
        except (OSError, ValueError):
            continue  # not ours, or still being set up
        if _start_time(int(pid_s)) != start:
            _log.info("removing stale runtime dir %s (owner pid %s is gone)", d, pid_s)
            shutil.rmtree(d, ignore_errors=True)


def private_open(path: str, flags: int) -> int:
    """An ``open()`` opener: files pyqvm makes for a VM are readable by this user only."""
    return os.open(path, flags, 0o600)


def _no_room(where: Path, e: OSError) -> HostError:
    return HostError(
        f"cannot make a VM runtime dir in {where}: {e.strerror}; free space there, or set "
        "XDG_RUNTIME_DIR (or TMPDIR) to a writable directory of yours"
    )


class RuntimeDir:
    """A private (mode 0700) directory for one VM; `cleanup` removes it.

    It records its owner (pid and start time), so a directory left behind by a
    killed process is removed by the next pyqvm process that makes one.
    """

    def __init__(self) -> None:
        base = _runtime_base()
        where = Path(base or tempfile.gettempdir())
        _reclaim_stale(where)
        try:
            self._path = Path(tempfile.mkdtemp(prefix="pyqvm-", dir=base))
        except OSError as e:
            raise _no_room(where, e) from None
        try:
            with open(self._path / _OWNER, "w", opener=private_open) as f:
                f.write(f"{os.getpid()} {_start_time(os.getpid())}\n")
        except OSError as e:  # a full disk: leave no half-made dir (reclaim skips those)
            shutil.rmtree(self._path, ignore_errors=True)
            raise _no_room(where, e) from None

    @property
    def path(self) -> Path:
        return self._path

    def cleanup(self) -> None:
        """Remove the directory and its contents; a no-op if it is already gone."""
        # Retry: an entry vanishing under rmtree (e.g. QEMU removing its socket) aborts it.
        for _ in range(3):
            try:
                shutil.rmtree(self._path)
            except FileNotFoundError:
                continue
            return

    def __enter__(self) -> RuntimeDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"RuntimeDir({str(self._path)!r})"


__all__ = ["RuntimeDir", "private_open", "runtime_root"]
