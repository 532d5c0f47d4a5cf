"""Exclusive claims on host devices across every pyqvm process on the host.

A device (or SR-IOV VF) belongs to at most one running VM. Each claimed device
has a record ``<address>.json`` in the claims directory, written and removed
under an ``flock`` on ``<address>.lock`` (so two processes never interleave).
The record names the VM, its pyqvm process (pid and start time: together unique
over time) and the driver the device had, so when the owner dies without
cleaning up, the next process that touches the device (or ``pyqvm doctor
--fix``) sees the record is stale, gives the device back and takes it over.

The directory: ``$PYQVM_CLAIMS_DIR``; else ``/run/pyqvm/claims`` for root;
else ``$XDG_RUNTIME_DIR/pyqvm/claims``; else ``/tmp/pyqvm-<uid>/claims``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyqvm.errors import DeviceClaimedError, HostError
from pyqvm.files import locked

__all__ = ["Claim", "ClaimRecord", "ClaimStore", "default_claims_dir", "process_start_time"]

_log = logging.getLogger(__name__)

ENV_DIR = "PYQVM_CLAIMS_DIR"


def default_claims_dir() -> Path:
    """Where claims live when no directory is given (see the module docs)."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/pyqvm/claims")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.access(xdg, os.W_OK | os.X_OK):
        return Path(xdg) / "pyqvm/claims"
    return Path(tempfile.gettempdir()) / f"pyqvm-{os.getuid()}" / "claims"


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass(frozen=True, slots=True)
class ClaimRecord:
    """What a claim file says: who holds ``address`` and what to restore when done.

    ``original_driver`` is the host driver the device had before pyqvm bound it
    to vfio-pci (None: it had none); ``bound`` whether pyqvm changed its binding
    (so a recovery knows whether there is anything to give back).
    """

    address: str
    vm: str
    pid: int
    start_time: str | None
    original_driver: str | None = None
    managed: bool = True
    bound: bool = False
    created: float = 0.0
    token: str = ""

    @property
    def alive(self) -> bool:
        """Whether the owning process still runs (same pid *and* start time)."""
        now = process_start_time(self.pid)
        return now is not None and now == self.start_time

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClaimRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class Claim:
    """This process's hold on one device; `release` (or the store's) drops it.

    ``stale`` is the record of a dead owner this claim replaced: the device may
    still be bound to vfio-pci for it, and ``stale.original_driver`` says what to
    give it back to.
    """

    def __init__(self, store: ClaimStore, record: ClaimRecord, stale: ClaimRecord | None) -> None:
        self.store = store
        self.record = record
        self.stale = stale
        self.released = False

    @property
    def address(self) -> str:
        return self.record.address

    def update(self, **changes: Any) -> None:
        """Rewrite this claim's record (e.g. ``original_driver=..., bound=True``)."""
        self.record = self.store._update(self.record, changes)

    def release(self) -> None:
        """Drop the claim (idempotent)."""
        if not self.released:
            self.store._release(self.record)
            self.released = True

    def __repr__(self) -> str:
        return f"Claim({self.record.address!r}, vm={self.record.vm!r})"


class ClaimStore:
    """The claims directory; every pyqvm process on the host must use the same one."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_claims_dir()

    def _ensure_dir(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError as exc:
            raise HostError(
                f"cannot create the device claims directory {self.directory}: {exc.strerror}; "
                f"run as root or set {ENV_DIR} to a directory every pyqvm process can write"
            ) from None

    def _record_path(self, address: str) -> Path:
        return self.directory / f"{address}.json"

    @contextlib.contextmanager
    def _locked(self, address: str) -> Iterator[None]:
        self._ensure_dir()
        # Held for a read-modify-write only: short.
        with locked(self.directory / f"{address}.lock", mode=0o644):
            yield

    def _read(self, address: str) -> ClaimRecord | None:
        try:
            data = json.loads(self._record_path(address).read_text(encoding="utf-8"))
            return ClaimRecord.from_json(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            _log.warning("ignoring unreadable claim for %s: %s", address, exc)
            return None

    def _write(self, record: ClaimRecord) -> None:
        path = self._record_path(record.address)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record.to_json(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)

    def claim(
        self,
        address: str,
        vm: str,
        *,
        original_driver: str | None = None,
        managed: bool = True,
    ) -> Claim:
        """Take ``address`` for VM ``vm``.

        Raises:
            DeviceClaimedError: a live process holds it; names the VM and pid.
        """
        with self._locked(address):
            old = self._read(address)
            if old is not None and old.alive:
                raise DeviceClaimedError(address, old.vm, old.pid)
            if old is not None:
                _log.warning(
                    "%s: reclaiming the claim of VM %r (pyqvm process %d is gone)",
                    address,
                    old.vm,
                    old.pid,
                )
            pid = os.getpid()
            record = ClaimRecord(
                address=address,
                vm=vm,
                pid=pid,
                start_time=process_start_time(pid),
                original_driver=original_driver,
                managed=managed,
                created=time.time(),
                token=uuid.uuid4().hex,
            )
            self._write(record)
        _log.debug("%s: claimed for VM %r", address, vm)
        return Claim(self, record, old)

    def _update(self, record: ClaimRecord, changes: dict[str, Any]) -> ClaimRecord:
        with self._locked(record.address):
            now = self._read(record.address)
            if now is None or now.token != record.token:
                raise HostError(
                    f"the claim on {record.address} for VM {record.vm!r} vanished from "
                    f"{self.directory}; was the directory cleaned while the VM ran?"
                )
            new = dataclasses.replace(record, **changes)
            self._write(new)
            return new

    def _release(self, record: ClaimRecord) -> None:
        with self._locked(record.address):
            now = self._read(record.address)
            if now is not None and now.token == record.token:
                self._record_path(record.address).unlink(missing_ok=True)
                _log.debug("%s: released by VM %r", record.address, record.vm)

    def holder(self, address: str) -> ClaimRecord | None:
        """The live claim on ``address``, or None."""
        rec = self._read(address)
        return rec if rec is not None and rec.alive else None

    def records(self) -> list[ClaimRecord]:
        """Every claim record, live or stale, by address."""
        try:
            names = sorted(p.name for p in self.directory.glob("*.json"))
        except OSError:
            return []
        out = []
        for n in names:
            rec = self._read(n.removesuffix(".json"))
            if rec is not None:
                out.append(rec)
        return out

    def holders(self) -> dict[str, str]:
        """Address -> VM name, for every live claim."""
        return {r.address: r.vm for r in self.records() if r.alive}

    def stale(self) -> list[ClaimRecord]:
        """The records whose owner died without releasing them."""
        return [r for r in self.records() if not r.alive]

    def take_over(self, record: ClaimRecord, vm: str) -> Claim | None:
        """Claim a device whose record is ``record`` (stale), if nobody got there first."""
        try:
            claim = self.claim(
                record.address, vm, original_driver=record.original_driver, managed=record.managed
            )
        except DeviceClaimedError:
            return None
        if claim.stale is None or claim.stale.token != record.token:
            # Someone else recovered and released it meanwhile: nothing stale left.
            claim.release()
            return None
        return claim
