"""`AsyncVM`: the one object a user holds for a guest (asyncio API).

It is a `pyqvm.machine.Machine` (one launch's resources: runtime dir, QEMU,
QMP, agent, hot-plugged devices) plus one-line delegations to it and to the
operations in `pyqvm.ops`::

    async with AsyncVM(VMSpec(image="default")) as vm:
        result = await vm.run(["uname", "-a"])

Cleanup is shielded from the caller's cancellation, and nothing is left
behind: no process, socket, overlay or directory.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

from qemu.qmp import EventListener

from pyqvm.channels.agent import ExecResult, GuestAgent
from pyqvm.channels.devices import Plugged
from pyqvm.channels.qmp import EventFilter, QMPSession
from pyqvm.errors import OperationError, PyqvmError, PyqvmTimeoutError
from pyqvm.host.facts import HostFacts
from pyqvm.launch.passthrough import PassthroughHost
from pyqvm.launch.plan import LaunchPlan, preview_argv
from pyqvm.launch.privnet import Membership
from pyqvm.machine import Machine
from pyqvm.ops import (
    blockjobs,
    console,
    gdb,
    guest,
    hotplug,
    keys,
    migration,
    screen,
    snapshot,
    ssh,
)
from pyqvm.ops import template as templates
from pyqvm.ops.blockjobs import ChainLink
from pyqvm.ops.console import ConsoleMatch
from pyqvm.ops.migration import (
    Incoming,
    MigrationStats,
    MigrationTLS,
    MigrationTuning,
    ProgressCallback,
    SavedState,
    Storage,
    Transport,
)
from pyqvm.ops.screen import Region
from pyqvm.ops.snapshot import SnapshotInfo
from pyqvm.ops.template import Template
from pyqvm.spec import Disk, Network, VMSpec
from pyqvm.state import VMState

_Op = TypeVar("_Op", bound=Callable[..., Awaitable[Any]])


def _guarded(fn: _Op) -> _Op:
    @functools.wraps(fn)
    async def guarded(self: AsyncVM | OperationGroup, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(self, *args, **kwargs)
        except PyqvmError:
            raise
        except TimeoutError as e:
            raise PyqvmTimeoutError(f"VM {self.name!r}: {fn.__name__} timed out ({e})") from e
        except OSError as e:
            raise OperationError(f"VM {self.name!r}: {fn.__name__} failed: {e}") from e

    return cast(_Op, guarded)


_C = TypeVar("_C", bound=type)


def _one_error_boundary(cls: _C) -> _C:
    """Every operation fails with the `PyqvmError` family, the cause kept: an `OSError`
    from the host (a full disk, a directory that cannot be written) becomes an
    `OperationError`, a bare `TimeoutError` a `PyqvmTimeoutError`. One boundary, around
    each public coroutine method, instead of a ``try`` in every one."""
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(member):
            setattr(cls, name, _guarded(member))
    return cls


class OperationGroup:
    """A group of AsyncVM's operations under one name (``vm.console.expect``); every face
    has a group of the same members (`pyqvm.faces.operations.GROUPS`)."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine

    @property
    def name(self) -> str:
        return self._machine.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.name!r}>"


@_one_error_boundary
class AsyncConsole(OperationGroup):
    """The serial console as a channel (`pyqvm.ops.console`): ``expect`` regular
    expressions on what the guest prints, ``send``/``sendline`` to type into it."""

    async def expect(
        self,
        patterns: str | Sequence[str],
        timeout: float = 60.0,
        *,
        fail_on: Sequence[str] | None = None,
    ) -> ConsoleMatch:
        """Wait until one of ``patterns`` (regular expressions) shows on the console, and
        take what the guest printed up to the end of the match. ``fail_on`` patterns (by
        default Linux's panic, oops and BUG lines; ``()`` for none) end the wait with
        `ConsoleError`, a guest panic with `GuestPanicError`."""
        return await console.expect(self._machine, patterns, timeout, fail_on=fail_on)

    async def send(self, data: str | bytes) -> None:
        """Type ``data`` into the serial console, as given (text as UTF-8)."""
        console.send(self._machine, data)

    async def sendline(self, text: str = "") -> None:
        """Type ``text`` and Enter (a carriage return, as a terminal sends it)."""
        console.send(self._machine, text + console.ENTER)


@_one_error_boundary
class AsyncKeys(OperationGroup):
    """The keyboard (`pyqvm.ops.keys`, QMP ``send-key``, a US keymap)."""

    async def press(self, combo: str, *, hold_ms: int | None = None) -> None:
        """Press the keys of ``combo`` together (``"ctrl-alt-f2"``, ``"ret"``), then let go."""
        await keys.press(self._machine, combo, hold_ms=hold_ms)

    async def type(self, text: str, *, delay: float = keys.TYPE_DELAY) -> None:
        """Type ``text`` (``"\\n"`` is Enter), one key at a time, ``delay`` seconds apart;
        `SpecError` before the first key for a character a US keyboard cannot type."""
        await keys.type_text(self._machine, text, delay=delay)


@_one_error_boundary
class AsyncVM:
    """A QEMU guest described by a `VMSpec`.

    ``start()`` returns when the guest is ready (guest agent answers, or the
    console shows ``ready_pattern``, per ``spec.ready``) and raises
    `LaunchError` with QEMU's stderr and the console tail if it never gets there.
    """

    def __init__(
        self,
        spec: VMSpec,
        *,
        host: HostFacts | None = None,
        image_cache: Path | None = None,
        passthrough_host: PassthroughHost | None = None,
    ) -> None:
        self.machine = Machine(
            spec, host=host, image_cache=image_cache, passthrough_host=passthrough_host
        )

    def __repr__(self) -> str:
        return f"<AsyncVM {self.name!r} {self.state.value}>"

    # --- what it is --------------------------------------------------------------------------

    @property
    def spec(self) -> VMSpec:
        """The spec this VM runs (after `restore`: with the saved disks)."""
        return self.machine.spec

    @property
    def state(self) -> VMState:
        return self.machine.state

    @property
    def name(self) -> str:
        return self.machine.name

    @property
    def argv(self) -> list[str]:
        """The argv QEMU was started with (empty before `start`)."""
        return self.machine.argv

    @property
    def pid(self) -> int | None:
        return self.machine.pid

    @property
    def accelerator(self) -> str | None:
        return self.machine.accelerator

    @property
    def boot_seconds(self) -> float | None:
        """Seconds from `start` until the guest was ready."""
        return self.machine.boot_seconds

    @property
    def resolved_spec(self) -> VMSpec:
        """The spec as launched (the built-in image replaced by its kernel and disk)."""
        return self.machine.resolved_spec

    @property
    def runtime_dir(self) -> Path | None:
        return self.machine.runtime_dir

    @property
    def private_networks(self) -> dict[str, Membership]:
        """NIC id -> its private network, address and MAC (while the VM runs)."""
        return dict(self.machine.companions.networks.members)

    @property
    def plugged(self) -> dict[str, Plugged]:
        """The devices hot-plugged into this VM and still there, in plug order."""
        return self.machine.devices.snapshot()

    @property
    def qmp(self) -> QMPSession:
        """The QMP session (for commands pyqvm does not wrap)."""
        return self.machine.qmp

    @property
    def agent(self) -> GuestAgent:
        """The guest agent client."""
        return self.machine.agent

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncVM:
        """Start the VM unless it was started already (``async with await
        AsyncVM.from_template(t) as vm``); it is stopped on leaving the block."""
        if self.state is VMState.CREATED:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start QEMU and wait until the guest is ready."""
        await self.machine.start()

    @classmethod
    async def from_template(
        cls,
        template: Template | str,
        *,
        name: str | None = None,
        directory: str | os.PathLike[str] | None = None,
        image_cache: Path | None = None,
    ) -> AsyncVM:
        """A running clone of ``template`` (a `Template` or its name); see `start_from_template`."""
        t = templates.get(template, directory=directory)
        vm = cls(t.clone_spec(name), image_cache=image_cache)
        await vm.start_from_template(t)
        return vm

    async def start_from_template(self, template: Template) -> None:
        """Start as a clone of ``template`` (this VM was made from its spec): no boot, its
        RAM mapped copy-on-write from the template's. See `pyqvm.ops.template`."""
        await templates.clone_into(self.machine, template)

    async def start_incoming(
        self, *, overlays: Mapping[str, Path] | None = None, without_forwards: bool = False
    ) -> None:
        """Start QEMU as a migration destination (``-incoming defer``); see `LaunchPlan`.

        Returns once QMP is connected; the state is ``INMIGRATE`` until a
        migration brings the guest here (`accept`).
        """
        plan = LaunchPlan(overlays=dict(overlays or {}), without_forwards=without_forwards)
        await self.machine.start_incoming(plan)

    async def stop(self, timeout: float = 10.0, *, graceful: bool | None = None) -> int | None:
        """Shut down in steps and remove everything; see `Machine.stop`."""
        return await self.machine.stop(timeout, graceful=graceful)

    async def kill(self) -> None:
        """End QEMU at once (SIGKILL) and clean up."""
        await self.machine.kill()

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for QEMU to exit on its own (guest powered off); returns its exit status."""
        return await self.machine.wait(timeout)

    async def pause(self) -> None:
        await self.machine.pause()

    async def resume(self) -> None:
        await self.machine.resume()

    # --- console and QMP ---------------------------------------------------------------------

    @property
    def console(self) -> AsyncConsole:
        """The serial console as a channel: ``expect``, ``send``, ``sendline``."""
        return AsyncConsole(self.machine)

    @property
    def keys(self) -> AsyncKeys:
        """The keyboard: ``press``, ``type`` (needs a ``display``)."""
        return AsyncKeys(self.machine)

    def console_text(self) -> str:
        """The serial console output so far (its last 64 KiB)."""
        return self.machine.console_text()

    def read_console(self, offset: int = 0) -> bytes:
        """Console bytes from ``offset`` on (for following the console as it grows)."""
        return self.machine.read_console(offset)

    def qmp_transcript(self) -> list[str]:
        """The last QMP commands sent and their answers, one line each (also after `stop`)."""
        return self.machine.qmp_transcript()

    # --- ssh (pyqvm.ops.ssh) -----------------------------------------------------------------

    async def ssh_argv(self, command: Sequence[str] = ()) -> list[str]:
        """The ``ssh`` command into this VM (``ssh = true``): its port forward, key and
        known-hosts entry, no prompts; runs ``command`` there, or a login shell."""
        return await ssh.ssh_argv(self.machine, command)

    # --- gdb (pyqvm.ops.gdb) -----------------------------------------------------------------

    def gdb_target(self) -> str:
        """What gdb's ``target remote`` takes for this VM's gdbstub: the unix socket in the
        runtime dir (``gdb = true``) or the spec's ``HOST:PORT``."""
        return gdb.gdb_target(self.spec, self.machine.launched_dir())

    def gdb_argv(
        self, *, vmlinux: Path | None = None, commands: Sequence[str] = (), batch: bool = False
    ) -> list[str]:
        """The host's gdb attached to this VM, the guest kernel loaded (``vmlinux``, or the
        kernel the VM booted; see `pyqvm.host.gdb.vmlinux_for`), then ``commands``; with
        ``batch`` it detaches and exits after them, and the guest runs on."""
        return gdb.gdb_command(
            self.spec,
            self.machine.launched_dir(),
            vmlinux=vmlinux,
            commands=commands,
            batch=batch,
            image_cache=self.machine.image_cache,
        )

    async def wait_for_console(self, pattern: str, timeout: float) -> None:
        """Wait until ``pattern`` (a plain substring) shows on the serial console."""
        await self.machine.wait_for_console(pattern, timeout)

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float = 60.0
    ) -> Any:
        """Run a QMP command; see `QMPSession.execute`."""
        return await self.machine.execute(command, arguments, timeout=timeout)

    @asynccontextmanager
    async def events(
        self, names: str | Iterable[str] = (), match: EventFilter | None = None
    ) -> AsyncIterator[EventListener]:
        """Listen for QMP events while the block runs (``async for event in listener``).

        ``match`` is a predicate on the event, or a mapping its ``data`` must contain.
        """
        async with self.machine.events(names, match) as listener:
            yield listener

    # --- screen (pyqvm.ops.screen) -----------------------------------------------------------

    @property
    def last_screenshot(self) -> bytes | None:
        """The last screenshot taken (PNG), for a failure report; None before any."""
        return self.machine.last_screenshot

    async def screenshot(self, path: Path | str | None = None) -> bytes:
        """The screen as PNG bytes (also written to ``path`` if given); needs a ``display``."""
        return await screen.screenshot(self.machine, path)

    async def wait_screen_change(self, *, timeout: float = 60.0) -> bytes:
        """Wait until the screen differs from what it shows now; its PNG then."""
        return await screen.wait_screen_change(self.machine, timeout=timeout)

    async def wait_screen_stable(self, *, seconds: float = 1.0, timeout: float = 60.0) -> bytes:
        """Wait until the screen has not changed for ``seconds``; its PNG then."""
        return await screen.wait_screen_stable(self.machine, seconds=seconds, timeout=timeout)

    async def wait_for_screen(
        self,
        reference: Path | str | bytes,
        *,
        region: Region | None = None,
        threshold: float = 0.02,
        timeout: float = 60.0,
    ) -> float:
        """Wait until the screen, or ``region`` (left, top, width, height) of it, matches
        ``reference`` (a PNG) within ``threshold`` (mean difference, 0..1); that difference
        then. Needs Pillow (``pyqvm[screen]``)."""
        return await screen.wait_for_screen(
            self.machine, reference, region=region, threshold=threshold, timeout=timeout
        )

    async def wait_for_text(
        self, pattern: str, *, region: Region | None = None, timeout: float = 60.0
    ) -> str:
        """Wait until ``pattern`` (a regular expression) is on the screen, read by OCR
        (Pillow and Debian's tesseract-ocr); the text read then."""
        return await screen.wait_for_text(self.machine, pattern, region=region, timeout=timeout)

    async def vnc(self, address: str | None = None) -> str:
        """Let a VNC viewer in: a unix socket in the runtime dir, or TCP ``HOST:PORT`` when
        asked; returns where (``unix:PATH`` or ``HOST:PORT``)."""
        return await screen.vnc(self.machine, address)

    # --- guest (pyqvm.ops.guest) -------------------------------------------------------------

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        check: bool = False,
    ) -> ExecResult:
        """Run a command in the guest through the guest agent and collect its output."""
        return await guest.run(
            self.machine, argv, input=input, env=env, timeout=timeout, check=check
        )

    async def read_file(self, path: str, *, timeout: float = 30.0) -> bytes:
        return await guest.read_file(self.machine, path, timeout=timeout)

    async def write_file(self, path: str, data: bytes, *, timeout: float = 30.0) -> None:
        await guest.write_file(self.machine, path, data, timeout=timeout)

    # --- snapshots (pyqvm.ops.snapshot, pyqvm.ops.blockjobs) ---------------------------------

    async def snapshot_save(
        self, tag: str, *, overwrite: bool = False, timeout: float | None = 600.0
    ) -> SnapshotInfo:
        """Save RAM, device state and every writable disk as internal snapshot ``tag``."""
        return await snapshot.save(self.machine, tag, overwrite=overwrite, timeout=timeout)

    async def snapshot_load(self, tag: str, *, timeout: float | None = 600.0) -> None:
        """Return the VM to internal snapshot ``tag``."""
        await snapshot.load(self.machine, tag, timeout=timeout)

    async def snapshot_delete(self, tag: str, *, timeout: float | None = 600.0) -> None:
        """Delete internal snapshot ``tag`` from every disk holding it."""
        await snapshot.delete(self.machine, tag, timeout=timeout)

    async def snapshot_list(self) -> list[SnapshotInfo]:
        """The internal snapshots on the VM's writable disks, oldest first."""
        return await snapshot.list_snapshots(self.machine)

    async def disk_snapshot(self, disk: str, path: Path | str | None = None) -> Path:
        """Put a new qcow2 overlay on ``disk`` (external snapshot); returns its path."""
        return await blockjobs.snapshot(self.machine, disk, path)

    async def disk_commit(self, disk: str, *, timeout: float | None = 600.0) -> None:
        """Fold ``disk``'s top overlay into the image below it (``block-commit``)."""
        await blockjobs.commit(self.machine, disk, timeout=timeout)

    async def disk_chain(self, disk: str) -> list[ChainLink]:
        """``disk``'s backing chain, top image first."""
        return await blockjobs.chain(self.machine, disk)

    # --- hotplug (pyqvm.ops.hotplug) ---------------------------------------------------------

    async def hotplug_disk(self, disk: Disk) -> str:
        """Hot-add a virtio-blk disk; returns its device id."""
        return await hotplug.plug_disk(self.machine, disk)

    async def hotplug_nic(self, net: Network | None = None) -> str:
        """Hot-add a NIC (default: user-mode, virtio); returns its device id."""
        return await hotplug.plug_nic(self.machine, net)

    async def hotplug_cpu(self, id: str = "") -> str:
        """Hot-add a vCPU (needs ``max_smp``); returns its device id."""
        return await hotplug.plug_cpu(self.machine, id)

    async def hotplug_memory(self, size: int | str, id: str = "") -> str:
        """Hot-add a memory DIMM (needs ``max_memory``/``memory_slots``); returns its id."""
        return await hotplug.plug_memory(self.machine, size, id)

    async def unplug(self, device: str, *, timeout: float = 30.0) -> None:
        """Unplug a device and remove its backend; `UnplugTimeoutError` if the guest holds on."""
        await hotplug.unplug(self.machine, device, timeout=timeout)

    # --- migration (pyqvm.ops.migration) -----------------------------------------------------

    async def migrate(
        self,
        dst: AsyncVM,
        *,
        transport: Transport = "unix",
        address: str | None = None,
        storage: Storage = "shared",
        tuning: MigrationTuning | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = 600.0,
        tls: MigrationTLS | None = None,
        insecure: bool = False,
    ) -> MigrationStats:
        """Move this running guest into ``dst`` (same spec, not started); raises
        `MigrationError`, and the guest then runs on here."""
        return await migration.migrate(
            self.machine,
            dst.machine,
            transport=transport,
            address=address,
            storage=storage,
            tuning=tuning,
            progress=progress,
            timeout=timeout,
            tls=tls,
            insecure=insecure,
        )

    async def listen(
        self,
        *,
        transport: Transport = "unix",
        address: str | None = None,
        storage: Storage = "shared",
        tuning: MigrationTuning | None = None,
        overlays: Mapping[str, Path] | None = None,
        devices: Mapping[str, Plugged] | None = None,
        without_forwards: bool = False,
        tls: MigrationTLS | None = None,
        insecure: bool = False,
    ) -> Incoming:
        """Start as a migration destination for a source elsewhere; hand the result to its
        `send`, then call `accept`. See `pyqvm.ops.migration.listen`."""
        return await migration.listen(
            self.machine,
            transport=transport,
            address=address,
            storage=storage,
            tuning=tuning,
            overlays=overlays,
            devices=devices,
            without_forwards=without_forwards,
            tls=tls,
            insecure=insecure,
        )

    async def send(
        self,
        target: Incoming | str,
        *,
        storage: Storage | None = None,
        nbd: str | None = None,
        tuning: MigrationTuning | None = None,
        progress: ProgressCallback | None = None,
        progress_interval: float = 0.5,
        timeout: float | None = 600.0,
        stop_source: bool = True,
        tls: MigrationTLS | None = None,
        insecure: bool = False,
    ) -> MigrationStats:
        """Migrate this guest to a destination that listened at ``target``."""
        return await migration.send(
            self.machine,
            target,
            storage=storage,
            nbd=nbd,
            tuning=tuning,
            progress=progress,
            progress_interval=progress_interval,
            timeout=timeout,
            stop_source=stop_source,
            tls=tls,
            insecure=insecure,
        )

    async def accept(self, incoming: Incoming, *, timeout: float | None = 600.0) -> None:
        """Wait for the migration into this VM to complete, then run the guest here."""
        await migration.accept(self.machine, incoming, timeout=timeout)

    async def save(
        self,
        directory: Path | str,
        *,
        resume: bool = False,
        progress: ProgressCallback | None = None,
        timeout: float | None = 600.0,
        portable: bool = False,
    ) -> SavedState:
        """Save the guest's state and disk overlays into ``directory``; then stop (or
        ``resume``). ``portable``: with standalone disks, the kernel and every file the
        VM needs, to restore on another host with the same QEMU. See
        `pyqvm.ops.migration.save`."""
        return await migration.save(
            self.machine,
            directory,
            resume=resume,
            progress=progress,
            timeout=timeout,
            portable=portable,
        )

    async def restore(self, directory: Path | str, *, timeout: float | None = 600.0) -> None:
        """Start this VM (created from the saved VM's spec) from a state `save` wrote."""
        await migration.restore(self.machine, directory, timeout=timeout)


__all__ = ["AsyncVM", "ExecResult", "VMState", "preview_argv"]
