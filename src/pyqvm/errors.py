"""The one exception family of pyqvm.

Every error pyqvm raises on purpose derives from `PyqvmError`::

    PyqvmError
     ├─ SpecError          bad VM description; the message names the field and the fix
     ├─ HostError          the host cannot do it (KVM unusable, missing package); says the fix
     ├─ ImageError         building or finding the built-in guest image failed
     │    └─ ArchiveError       a Debian archive file is unreachable, unsigned or corrupt
     ├─ LaunchError        QEMU refused the argv or died before the guest was ready
     ├─ VMStateError       operation not valid in the VM's current state
     ├─ VMExitedError      QEMU went away during an operation
     ├─ PyqvmTimeoutError  a bounded wait ran out (also a TimeoutError)
     ├─ QMPCommandError    QEMU answered a QMP command with an error
     ├─ PassthroughError   a host device cannot be given to this VM (vfio-pci, SR-IOV)
     │    ├─ DeviceClaimedError     another VM holds the device (names the holder)
     │    └─ GroupNotViableError    an IOMMU group member blocks it (names member, driver)
     ├─ GuestError         the guest agent failed or a guest command could not run
     │    ├─ GuestCommandError  the agent answered with an error (class, description)
     │    └─ GuestExecError     a guest command exited non-zero (argv, exit code, stderr)
     └─ OperationError     a VM operation (snapshot, hotplug, migration) failed
          ├─ JobError           a QMP job (snapshot-save, block-commit, ...) ended with an error
          ├─ SnapshotError      internal/external snapshot refused or failed
          ├─ HotplugError       plugging or unplugging a device failed
          │    └─ UnplugTimeoutError  the guest never released the device (also a PyqvmTimeoutError)
          ├─ MigrationError     live migration or save/restore failed
          └─ TemplateError      a template cannot be made, or is missing, broken or stale
     ├─ NamedVMError       a named VM is unknown or taken, or its owner process does not answer
     └─ CodecError         a value does not fit its type on its way to or from JSON (names where)

Errors carry the data a caller needs (argv, exit code, stderr and console
tails) as attributes, not only inside the message.
"""

from __future__ import annotations

import enum
import re
import shlex
from collections.abc import Sequence


class PyqvmError(Exception):
    """Base class of every error pyqvm raises on purpose."""


class SpecError(PyqvmError, ValueError):
    """A VM description is invalid.

    ``field`` is the dotted path of the offending field (e.g. ``disks[1].path``).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class HostError(PyqvmError):
    """The host lacks something pyqvm needs; the message says how to fix it."""


class ImageError(PyqvmError):
    """The built-in guest image could not be built or found."""


class ArchiveError(ImageError):
    """A file of the Debian archive could not be fetched or failed its check.

    ``url`` is the file asked for (or the cache file), ``package`` the package whose
    file it is, when it is one; ``unreachable`` is true when the mirror did not answer at
    all (as opposed to answering with an error or a bad file). The message says what was
    wrong and the fix.
    """

    def __init__(
        self, message: str, *, url: str = "", package: str = "", unreachable: bool = False
    ) -> None:
        super().__init__(message)
        self.url = url
        self.package = package
        self.unreachable = unreachable


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def printable(text: str) -> str:
    """``text`` (a guest's console, say) with its control characters escaped, so that a
    message never drives the reader's terminal: a guest's ``ESC [ 6 n`` would make it
    answer into its input."""
    text = text.replace("\r\n", "\n")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def tail(text: str, lines: int) -> str:
    """The last ``lines`` lines of ``text`` (QEMU's stderr, the console), for a message,
    control characters escaped (`printable`)."""
    return "\n".join(printable(text).rstrip().splitlines()[-lines:])


def _with_console(message: str, console: str) -> str:
    """``message`` and, if there is one, the console's last 20 lines."""
    return f"{message}\nconsole tail:\n{tail(console, 20)}" if console.strip() else message


class LaunchError(PyqvmError):
    """QEMU refused its command line or died before the guest became ready."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        exitcode: int | None = None,
        stderr: str = "",
        console: str = "",
    ) -> None:
        self.reason = message
        self.argv = list(argv)
        self.exitcode = exitcode
        self.stderr = stderr
        self.console = console
        parts = [message]
        if exitcode is not None:
            parts.append(f"QEMU exit code: {exitcode}")
        if stderr.strip():
            parts.append("QEMU stderr:\n" + tail(stderr, 20))
        if console.strip():
            parts.append("console tail:\n" + tail(console, 20))
        super().__init__("\n".join(parts))


class VMStateError(PyqvmError):
    """The operation is not valid in the VM's current state.

    ``state`` is the state the VM was in (a `pyqvm.VMState`; None where no VM
    state applies, e.g. a process not started yet) and ``required`` the states
    the operation needs.
    """

    def __init__(
        self,
        message: str,
        *,
        state: enum.Enum | None = None,
        required: Sequence[enum.Enum] = (),
    ) -> None:
        super().__init__(message)
        self.state = state
        self.required = tuple(required)


class VMExitedError(PyqvmError):
    """QEMU exited while an operation was in progress."""


class PyqvmTimeoutError(PyqvmError, TimeoutError):
    """A bounded wait ran out."""


class QMPCommandError(PyqvmError):
    """QEMU answered a QMP command with an error.

    ``command`` is the QMP command, ``error_class`` QEMU's error class
    (e.g. ``GenericError``) and ``description`` QEMU's own text.
    """

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"QMP {command!r} failed ({error_class}): {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


class PassthroughError(PyqvmError):
    """A host device cannot be given to this VM; the message says what to do.

    ``address`` is the host PCI address concerned (empty when none is).
    """

    def __init__(self, message: str, *, address: str = "") -> None:
        super().__init__(message)
        self.address = address


class DeviceClaimedError(PassthroughError):
    """The device belongs to another running VM (``holder``, process ``pid``)."""

    def __init__(self, address: str, holder: str, pid: int) -> None:
        super().__init__(
            f"host device {address} is in use by VM {holder!r} (pyqvm process {pid}); "
            "a device goes to one guest at a time: stop that VM or pick another device",
            address=address,
        )
        self.holder = holder
        self.pid = pid


class GroupNotViableError(PassthroughError):
    """An IOMMU group cannot go to the guest: ``blocker`` is bound to ``driver``."""

    def __init__(self, address: str, group: int, blocker: str, driver: str, fix: str) -> None:
        super().__init__(
            f"IOMMU group {group} of {address} is not viable: "
            f"{blocker} is bound to {driver}; {fix}",
            address=address,
        )
        self.group = group
        self.blocker = blocker
        self.driver = driver


class GuestError(PyqvmError):
    """The guest agent failed, or a command could not be run in the guest."""


class GuestCommandError(GuestError):
    """The agent answered a command with an error.

    ``command`` is the QGA command, ``error_class`` the agent's error class
    (e.g. ``GenericError``) and ``description`` the agent's own text.
    """

    def __init__(self, command: str, error_class: str, description: str, *, what: str = "") -> None:
        super().__init__(f"{what or repr(command)} failed ({error_class}): {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


class GuestExecError(GuestError):
    """A guest command ran but exited non-zero or was killed by a signal."""

    def __init__(
        self, argv: Sequence[str], exitcode: int, stderr: bytes, signal: int | None
    ) -> None:
        how = f"killed by signal {signal}" if signal is not None else f"exit code {exitcode}"
        msg = f"guest command {shlex.join(argv)!r} failed: {how}"
        last = tail(stderr.decode("utf-8", "replace"), 20)
        if last:
            msg += "\nstderr:\n" + last
        super().__init__(msg)
        self.argv = list(argv)
        self.exitcode = exitcode
        self.stderr = stderr
        self.signal = signal


class GuestPausedError(GuestError):
    """QEMU paused the guest on a disk I/O error (the disk's error policy: by default when
    the host file system holding its image is full), so it cannot answer until resumed.

    ``disk`` is the node or device name, ``file`` its image (None if unknown),
    ``operation`` ``read`` or ``write``, ``reason`` QEMU's text (``No space left on
    device``) and ``nospace`` whether it was ENOSPC.
    """

    def __init__(
        self,
        name: str,
        *,
        disk: str,
        file: str | None,
        operation: str,
        reason: str,
        nospace: bool,
    ) -> None:
        where = f"disk {disk!r}" + (f" ({file})" if file else "")
        fix = (
            "free space on the host file system holding it"
            if nospace
            else "fix the host side of that disk"
        )
        super().__init__(
            f"VM {name!r}: QEMU paused the guest (io-error): {operation or 'I/O'} error on "
            f"{where}: {reason or 'I/O error'}; {fix}, then resume the VM, or stop it"
        )
        self.name = name
        self.disk = disk
        self.file = file
        self.operation = operation
        self.reason = reason
        self.nospace = nospace


class GuestPanicError(GuestError):
    """The guest's kernel panicked: QEMU's ``GUEST_PANICKED`` event (a pvpanic device) or
    Linux's panic line on the serial console.

    ``source`` is ``"pvpanic"`` or ``"console"``, ``detail`` what it said (the event's
    data, or the panic line), ``console`` the console's tail.
    """

    def __init__(self, name: str, *, source: str, detail: str, console: str) -> None:
        super().__init__(
            _with_console(f"VM {name!r}: the guest panicked ({source}: {detail})", console)
        )
        self.name = name
        self.source = source
        self.detail = detail
        self.console = console


class ConsoleError(GuestError):
    """A console wait ended without its pattern: a ``fail_on`` pattern showed first, or the
    console closed (QEMU exited).

    ``pattern`` is the failure pattern that matched (None: the console closed),
    ``text`` what matched, ``console`` the console's tail.
    """

    def __init__(
        self, message: str, *, pattern: str | None = None, text: str = "", console: str = ""
    ) -> None:
        super().__init__(_with_console(message, console))
        self.pattern = pattern
        self.text = text
        self.console = console


class OperationError(PyqvmError):
    """A VM operation (snapshot, hotplug, migration) was refused or failed."""


class JobError(OperationError):
    """A QMP job ended with an error (or was cancelled).

    ``job_id`` and ``job_type`` name the job (e.g. ``snapshot-save``),
    ``status`` is the last status seen and ``error`` QEMU's own text.
    """

    def __init__(self, job_id: str, job_type: str, status: str, error: str) -> None:
        super().__init__(f"QMP job {job_id!r} ({job_type or 'job'}) failed: {error}")
        self.job_id = job_id
        self.job_type = job_type
        self.status = status
        self.error = error


class SnapshotError(OperationError):
    """A snapshot (internal or external) was refused or failed."""


class HotplugError(OperationError):
    """Plugging or unplugging a device failed, or the guest never acknowledged an unplug."""


class UnplugTimeoutError(HotplugError, PyqvmTimeoutError):
    """The guest did not release a device in time; it stays plugged, with its backend.

    ``device`` is the device id. QEMU keeps the unplug request: the guest may
    still release it later; calling unplug again finishes the job.
    """

    def __init__(self, message: str, device: str) -> None:
        super().__init__(message)
        self.device = device


class MigrationError(OperationError):
    """Live migration, or saving/restoring a VM's state, failed.

    ``status`` is the last migration status QEMU reported (``query-migrate``:
    ``failed``, ``cancelled``, ``active``...; None when refused before QEMU
    was asked) and ``qemu_error`` QEMU's own reason (its ``error-desc``), when
    it gave one.
    """

    def __init__(
        self, message: str, *, status: str | None = None, qemu_error: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.qemu_error = qemu_error


class TemplateError(OperationError):
    """A template cannot be made from a spec, or is missing, broken or stale (made with
    another QEMU, image or spec); ``name`` is the template's."""

    def __init__(self, message: str, *, name: str = "") -> None:
        super().__init__(message)
        self.name = name


class PoolError(OperationError):
    """A pool cannot be made (its size, the host's memory) or used (not open, closed);
    ``size`` is the pool's, and for memory ``needed_mib`` and ``available_mib``."""

    def __init__(
        self, message: str, *, size: int = 0, needed_mib: int = 0, available_mib: int = 0
    ) -> None:
        super().__init__(message)
        self.size = size
        self.needed_mib = needed_mib
        self.available_mib = available_mib


class NamedVMError(PyqvmError):
    """A named VM (``pyqvm up``) is unknown, its name is taken, or its owner process died
    or does not answer; ``name`` is the VM's."""

    def __init__(self, message: str, *, name: str = "") -> None:
        super().__init__(message)
        self.name = name


class CodecError(PyqvmError, ValueError):
    """A value does not fit its type on its way to or from JSON (`pyqvm.codec`);
    ``where`` is the path to it (``disk.path``)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.message = message


__all__ = [
    "ArchiveError",
    "CodecError",
    "ConsoleError",
    "DeviceClaimedError",
    "GroupNotViableError",
    "GuestCommandError",
    "GuestError",
    "GuestExecError",
    "GuestPanicError",
    "GuestPausedError",
    "HostError",
    "HotplugError",
    "ImageError",
    "JobError",
    "LaunchError",
    "MigrationError",
    "NamedVMError",
    "OperationError",
    "PassthroughError",
    "PyqvmError",
    "PyqvmTimeoutError",
    "QMPCommandError",
    "SnapshotError",
    "SpecError",
    "TemplateError",
    "UnplugTimeoutError",
    "VMExitedError",
    "VMStateError",
    "printable",
    "tail",
]
