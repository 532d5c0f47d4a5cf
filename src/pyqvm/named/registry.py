"""The registry of named VMs: one directory per VM in the per-user runtime dir.

Layout (``root()`` is ``$PYQVM_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/pyqvm``, else
``/tmp/pyqvm-<uid>``; always 0700 and ours)::

    vms/NAME/lock         the owner process holds an exclusive flock on it for its life;
                          it holds the owner's pid
    vms/NAME/owner.sock   the owner's socket (0600; see `pyqvm.named.wire`)
    vms/NAME/record.json  a versioned `Record`, written once the guest is ready
    vms/NAME/owner.log    the owner's own log

Whether a VM is alive is asked of the lock, never of a pid: a lock dies with
its process, a pid can be reused. A name is reserved by renaming a complete,
already locked directory into place, so there is no moment at which a
directory exists at ``vms/NAME`` without its owner's lock on it. A dead entry
(its lock free) is pruned by whoever sees it first: it takes the lock itself,
checks that the directory at ``vms/NAME`` is still the one it locked, and
renames it away before removing it and the dead VM's runtime dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyqvm.errors import HostError, NamedVMError, PyqvmError
from pyqvm.runtime.dirs import runtime_root
from pyqvm.spec import check_id

log = logging.getLogger(__name__)

#: The version of `Record`; a record of another version is reported, not guessed at.
RECORD_FORMAT = 1
LOCK = "lock"
SOCKET = "owner.sock"
RECORD = "record.json"
LOG = "owner.log"
REQUEST = "request.json"  # what the owner is to start (written by `up`, read by the owner)


def root() -> Path:
    """pyqvm's per-user runtime dir (`pyqvm.runtime.dirs.runtime_root`)."""
    return runtime_root()


def vms_dir() -> Path:
    d = root() / "vms"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


@dataclass(frozen=True, slots=True)
class Record:
    """What ``pyqvm ps`` shows of a named VM that does not change while it runs."""

    name: str
    owner_pid: int
    qemu_pid: int
    started: float  # time.time() when the guest was ready
    accelerator: str
    machine: str
    memory: int  # MiB
    smp: int
    runtime_dir: str
    console_log: str
    console_socket: str | None
    forwards: tuple[str, ...] = ()  # "tcp 127.0.0.1:2222 -> 22"
    template: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "name": self.name,
            "owner_pid": self.owner_pid,
            "qemu_pid": self.qemu_pid,
            "started": self.started,
            "accelerator": self.accelerator,
            "machine": self.machine,
            "memory": self.memory,
            "smp": self.smp,
            "runtime_dir": self.runtime_dir,
            "console_log": self.console_log,
            "console_socket": self.console_socket,
            "forwards": list(self.forwards),
            "template": self.template,
            "spec": self.spec,
        }

    @classmethod
    def from_json(cls, data: Any, name: str) -> Record:
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise NamedVMError(
                f"VM {name!r}: its record is of another pyqvm version or broken; "
                f"stop it with `pyqvm stop {name}` and start it again",
                name=name,
            )
        try:
            return cls(
                name=str(data["name"]),
                owner_pid=int(data["owner_pid"]),
                qemu_pid=int(data["qemu_pid"]),
                started=float(data["started"]),
                accelerator=str(data["accelerator"]),
                machine=str(data["machine"]),
                memory=int(data["memory"]),
                smp=int(data["smp"]),
                runtime_dir=str(data["runtime_dir"]),
                console_log=str(data["console_log"]),
                console_socket=None
                if data["console_socket"] is None
                else str(data["console_socket"]),
                forwards=tuple(str(f) for f in data["forwards"]),
                template=None if data.get("template") is None else str(data["template"]),
                spec=dict(data.get("spec") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise NamedVMError(
                f"VM {name!r}: its record is broken ({type(e).__name__}: {e}); stop it with "
                f"`pyqvm stop {name}` and start it again",
                name=name,
            ) from None


@dataclass(frozen=True, slots=True)
class Entry:
    """One directory of the registry (its owner may have died since it was listed)."""

    name: str
    directory: Path

    @property
    def socket(self) -> Path:
        return self.directory / SOCKET

    @property
    def log_file(self) -> Path:
        return self.directory / LOG

    def record(self) -> Record:
        """The VM's `Record`; `NamedVMError` if it is missing (still starting) or broken."""
        try:
            data = json.loads((self.directory / RECORD).read_text())
        except FileNotFoundError:
            raise NamedVMError(
                f"VM {self.name!r} is still starting (no record yet)", name=self.name
            ) from None
        except (OSError, ValueError) as e:
            raise NamedVMError(
                f"VM {self.name!r}: its record {self.directory / RECORD} is unreadable ({e}); "
                f"stop it with `pyqvm stop {self.name}`",
                name=self.name,
            ) from None
        return Record.from_json(data, self.name)

    def owner_pid(self) -> int | None:
        """The pid the owner wrote into its lock file (None before it did)."""
        try:
            return int((self.directory / LOCK).read_text().strip() or "x")
        except (OSError, ValueError):
            return None

    def owner(self) -> str:
        """The owner process, as a message names it: ``pid N`` (or ``pid unknown``)."""
        try:
            return f"pid {self.record().owner_pid}"
        except NamedVMError:
            return "pid unknown"

    def not_answering(self, timeout: float) -> NamedVMError:
        """The error for an owner that took no connection or sent no greeting in time."""
        return NamedVMError(
            f"VM {self.name!r}: its owner process ({self.owner()}) does not answer within "
            f"{timeout:g} s; see {self.log_file}, or end it: pyqvm stop --force {self.name}",
            name=self.name,
        )

    def alive(self) -> bool:
        """Whether the owner process holds its lock (so the VM exists)."""
        try:
            fd = os.open(self.directory / LOCK, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def write_record(entry: Entry, record: Record) -> None:
    """Write ``record`` atomically (a reader sees no record or a whole one)."""
    tmp = entry.directory / f".{RECORD}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "w") as f:
        f.write(json.dumps(record.to_json(), indent=2) + "\n")
    tmp.rename(entry.directory / RECORD)


class Reservation:
    """A name taken for a VM about to start: its directory and the lock's fd.

    Hand ``lock_fd`` to the owner process (it inherits the same lock) and
    `close` it here once the owner holds it; `release` if no owner was started.
    """

    def __init__(self, entry: Entry, lock_fd: int) -> None:
        self.entry = entry
        self.lock_fd = lock_fd

    def close(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def release(self) -> None:
        """Give the name back: remove the directory, then drop the lock."""
        shutil.rmtree(self.entry.directory, ignore_errors=True)
        self.close()


def reserve(name: str) -> Reservation:
    """Take ``name`` for a new VM; `NamedVMError` naming the VM that holds it.

    A dead VM of that name is pruned first (and said so in the log).
    """
    check_id(name, "name")
    base = vms_dir()
    if len(os.fsencode(base / name / SOCKET)) > 107:  # sun_path holds 108 bytes
        raise HostError(
            f"the socket path {base / name / SOCKET} is too long for a unix socket; "
            "use a shorter name, or set PYQVM_RUNTIME_DIR to a shorter directory"
        )
    for _ in range(3):
        tmp = base / f".new-{name}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir(mode=0o700)
        fd = os.open(tmp / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: never contended
        try:
            tmp.rename(base / name)
        except OSError:  # ENOTEMPTY/EEXIST: the name is taken, perhaps by a dead VM
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(fd)
            entry = Entry(name, base / name)
            if entry.alive():
                raise NamedVMError(_taken(entry), name=name) from None
            prune(entry)
            continue
        return Reservation(Entry(name, base / name), fd)
    raise NamedVMError(f"could not take the name {name!r}: it keeps being taken", name=name)


def _taken(entry: Entry) -> str:
    try:
        r = entry.record()
        since = time.strftime("%H:%M:%S", time.localtime(r.started))
        who = f"owner pid {r.owner_pid}, up since {since}"
    except PyqvmError:
        who = "still starting"
    return (
        f"the name {entry.name!r} is taken by a running VM ({who}); pick another --name "
        f"or stop it: pyqvm stop {entry.name}"
    )


def find(name: str) -> Entry:
    """The live VM called ``name``; `NamedVMError` if there is none (a dead one is pruned)."""
    entry = Entry(name, vms_dir() / name)
    if not entry.directory.is_dir():
        live = [e.name for e in scan()[0]]
        known = f"running VMs: {', '.join(live)}" if live else "no named VMs are running"
        raise NamedVMError(
            f"no VM named {name!r} ({known}); start one: pyqvm up --name {name}", name=name
        )
    if not entry.alive():
        gone = prune(entry)
        raise NamedVMError(f"VM {name!r} is gone: {gone}", name=name)
    return entry


def scan() -> tuple[list[Entry], list[str]]:
    """The live entries by name, and one line for each dead one pruned now."""
    live, notes = [], []
    for d in sorted(vms_dir().iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        entry = Entry(d.name, d)
        if entry.alive():
            live.append(entry)
        elif (gone := prune(entry)) is not None:
            notes.append(f"{entry.name}: {gone}")
    return live, notes


def prune(entry: Entry) -> str | None:
    """Remove a dead VM's directory and runtime dir; what happened, or None if another
    process got there first (or the VM is alive after all)."""
    try:
        fd = os.open(entry.directory / LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        # No lock at all: a directory left half-made by a crash (never made by reserve).
        return _remove(entry)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # alive, or being pruned by someone else
        try:
            here = os.stat(entry.directory / LOCK)
        except FileNotFoundError:
            return None
        mine = os.fstat(fd)
        if (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
            return None  # already pruned and the name taken again
        return _remove(entry)  # with the lock held
    finally:
        os.close(fd)


def kill_owner(entry: Entry, timeout: float = 5.0) -> str:
    """SIGKILL a live entry's owner (its QEMU dies with it) and prune the entry: the way
    out when an owner does not answer. The pid comes from the record, and the lock still
    being held proves it is still the owner's (a pid is not reused while its process lives).
    """
    pid = entry.owner_pid()
    if entry.alive() and pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        give_up = time.monotonic() + timeout
        while entry.alive():  # the lock is freed when the kernel has closed its files
            if time.monotonic() > give_up:
                raise NamedVMError(
                    f"VM {entry.name!r}: its owner (pid {pid}) was killed but "
                    f"still holds its lock after {timeout:g} s",
                    name=entry.name,
                )
            time.sleep(0.01)
    return prune(entry) or "already removed"


def _remove(entry: Entry) -> str:
    try:
        record: Record | None = entry.record()
    except PyqvmError:
        record = None
    aside = entry.directory.with_name(f".dead-{entry.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        entry.directory.rename(aside)
    except FileNotFoundError:
        return "already removed"
    what = "its owner process died"
    if record is not None:
        what = f"its owner process (pid {record.owner_pid}) died"
        _kill_leftover(record)
        shutil.rmtree(record.runtime_dir, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    log.info("pruned VM %s: %s", entry.name, what)
    return f"{what}; removed it"


def _kill_leftover(record: Record) -> None:
    """Kill the dead owner's QEMU if it is somehow still there (it gets a death signal
    when its owner dies); a reused pid is told apart by the runtime dir in its argv."""
    try:
        argv = Path(f"/proc/{record.qemu_pid}/cmdline").read_bytes()
    except OSError:
        return
    if record.runtime_dir.encode() in argv:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.qemu_pid, 9)
        log.warning("killed QEMU pid %d of dead VM %s", record.qemu_pid, record.name)


__all__ = [
    "LOCK",
    "LOG",
    "RECORD",
    "RECORD_FORMAT",
    "REQUEST",
    "SOCKET",
    "Entry",
    "Record",
    "Reservation",
    "find",
    "kill_owner",
    "prune",
    "reserve",
    "root",
    "scan",
    "vms_dir",
    "write_record",
]
