"""`AsyncVM`: the one object a user holds for a running guest.

It owns the runtime dir, the QEMU process, the QMP session and the guest
agent, in that order of creation, and tears them down in reverse::

    async with AsyncVM(VMSpec(image="default")) as vm:
        result = await vm.run(["uname", "-a"])

Shutdown goes in steps, each bounded: ACPI powerdown (wait for QEMU to
exit) -> QMP ``quit`` -> SIGTERM -> SIGKILL. Cleanup is shielded from the
caller's cancellation, and nothing is left behind: no process, socket,
overlay or directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from qemu.qmp import EventListener

from pyqvm.agent import ExecResult, GuestAgent
from pyqvm.argv.build import LaunchContext, build_argv
from pyqvm.argv.devices import DiskFile
from pyqvm.errors import (
    LaunchError,
    PyqvmError,
    PyqvmTimeoutError,
    VMStateError,
)
from pyqvm.host.facts import HostFacts
from pyqvm.ops import blockjobs as _blockjobs
from pyqvm.ops import hotplug as _hotplug
from pyqvm.ops import migration
from pyqvm.ops import snapshot as _snapshot
from pyqvm.ops.blockjobs import ChainLink
from pyqvm.ops.migration import MigrationStats, MigrationTuning, ProgressCallback, SavedState
from pyqvm.ops.snapshot import SnapshotInfo
from pyqvm.overlays import adopt_overlay, make_overlay, overlay_disks, overlay_path
from pyqvm.passthrough import Passthrough, PassthroughHost, assign
from pyqvm.process import QemuProcess, RuntimeDir
from pyqvm.resolve import Resolved, resolve
from pyqvm.session import EventFilter, QMPSession
from pyqvm.spec import Disk, Network, VMSpec
from pyqvm.state import VMState

log = logging.getLogger(__name__)

_CONSOLE_TAIL = 64 * 1024


class AsyncVM:
    """A QEMU guest described by a `VMSpec`; asyncio API.

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
        self.spec = spec
        self._host = host
        self._image_cache = image_cache
        # Where host devices are prepared (sysfs root, writer, claims); tests use fakes.
        self._pt_host = passthrough_host or PassthroughHost()
        self._passthrough: Passthrough | None = None
        self._state = VMState.CREATED
        self._resolved: Resolved | None = None
        self._rundir: RuntimeDir | None = None
        self._process: QemuProcess | None = None
        self._qmp: QMPSession | None = None
        self._agent: GuestAgent | None = None
        self._argv: list[str] = []
        self._console_log: Path | None = None
        self._stderr_log: Path | None = None
        self._last_code: int | None = None
        self._console_cache = ""
        self._boot_seconds: float | None = None
        self._adopt: dict[str, Path] = {}
        self._without_forwards = False

    # --- state -------------------------------------------------------------------------------

    @property
    def state(self) -> VMState:
        return self._state

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def argv(self) -> list[str]:
        """The argv QEMU was started with (empty before `start`)."""
        return list(self._argv)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def accelerator(self) -> str | None:
        return self._resolved.accel if self._resolved else None

    @property
    def boot_seconds(self) -> float | None:
        """Seconds from `start` until the guest was ready."""
        return self._boot_seconds

    @property
    def resolved_spec(self) -> VMSpec:
        """The spec as launched (the built-in image replaced by its kernel and disk)."""
        return self._resolved.spec if self._resolved else self.spec

    @property
    def runtime_dir(self) -> Path | None:
        return self._rundir.path if self._rundir else None

    def _require(self, *states: VMState) -> None:
        if self._state not in states:
            wanted = " or ".join(s.value for s in states)
            raise VMStateError(f"VM {self.name!r} is {self._state.value}; this needs it {wanted}")

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncVM:
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
        self._require(VMState.CREATED)
        self._state = VMState.STARTING
        t0 = time.monotonic()
        try:
            await self._launch()
            await self._wait_ready()
        except BaseException:
            self._state = VMState.FAILED
            await asyncio.shield(self._teardown())
            raise
        self._boot_seconds = time.monotonic() - t0
        self._state = VMState.RUNNING
        log.info("%s: ready after %.2f s (pid %s)", self.name, self._boot_seconds, self.pid)

    async def start_incoming(
        self, *, overlays: Mapping[str, Path] | None = None, without_forwards: bool = False
    ) -> None:
        """Start QEMU as a migration destination (``-incoming defer``).

        Returns once QMP is connected; the guest does not run until a migration
        (`pyqvm.ops.migration`) brings it here, so the state is ``INMIGRATE``.
        ``overlays`` maps an ephemeral disk's id to an existing overlay file to
        open instead of a fresh one (shared storage: the source's overlay). The
        file is hard-linked into this VM's runtime dir, so either side's cleanup
        leaves the other's disk intact (symlinked if it is on another filesystem).
        ``without_forwards`` leaves out the NICs' host port forwards, which a source
        on the same host still holds (the migration adds them once it has quit).
        """
        self._require(VMState.CREATED)
        self._adopt = {k: Path(v) for k, v in (overlays or {}).items()}
        self._without_forwards = without_forwards
        self._state = VMState.STARTING
        t0 = time.monotonic()
        try:
            await self._launch(incoming="defer")
        except BaseException:
            self._state = VMState.FAILED
            await asyncio.shield(self._teardown())
            raise
        self._state = VMState.INMIGRATE
        log.info(
            "%s: waiting for an incoming migration after %.2f s (pid %s)",
            self.name,
            time.monotonic() - t0,
            self.pid,
        )

    def _set_state(self, state: VMState) -> None:
        # For pyqvm.ops: operations move a VM between states (migrating, and back).
        self._state = state

    async def _finish_incoming(self, timeout: float | None = None) -> None:
        # For pyqvm.ops.migration: the guest runs here now; wait for its agent to answer.
        # (A console ready pattern was printed on the source's console, not here.)
        self._require(VMState.INMIGRATE)
        if self._agent is not None and self.spec.effective_ready == "agent":
            try:
                await self._agent.wait_ready(timeout or self.spec.ready_timeout)
            except BaseException:
                self._state = VMState.FAILED
                raise
        self._state = VMState.RUNNING
        log.info("%s: guest running here after migration (pid %s)", self.name, self.pid)

    async def _launch(self, incoming: str | None = None) -> None:
        self._resolved = resolved = resolve(
            self.spec, facts=self._host, image_cache=self._image_cache, host_root=self._pt_host.root
        )
        if self._without_forwards:
            nets = tuple(dataclasses.replace(n, forwards=()) for n in resolved.spec.networks)
            resolved = dataclasses.replace(
                resolved, spec=dataclasses.replace(resolved.spec, networks=nets)
            )
        spec = resolved.spec
        if spec.host_devices:  # claim, check and bind to vfio-pci; undone in _teardown
            self._passthrough = assign(spec, self._pt_host)
        self._rundir = RuntimeDir()
        rundir = self._rundir.path
        self._console_log = spec.serial_log or rundir / "console.log"
        self._stderr_log = rundir / "qemu.stderr"
        self._console_log.write_bytes(b"")
        for d in overlay_disks(spec):
            if d.id in self._adopt:
                adopt_overlay(self._adopt[d.id], overlay_path(rundir, d.id))
            else:
                await make_overlay(d.path, d.format or "raw", overlay_path(rundir, d.id))
        qmp_ours, qmp_theirs = socket.socketpair()
        agent_ours, agent_theirs = socket.socketpair() if spec.guest_agent else (None, None)
        theirs = [s for s in (qmp_theirs, agent_theirs) if s is not None]
        ours = [s for s in (qmp_ours, agent_ours) if s is not None]
        try:
            try:
                self._argv = launch_argv(
                    resolved,
                    rundir,
                    console_log=self._console_log,
                    qmp_fd=qmp_theirs.fileno(),
                    agent_fd=agent_theirs.fileno() if agent_theirs else None,
                    incoming=incoming,
                )
                log.info(
                    "%s: starting %s (accel %s)", self.name, resolved.qemu.name, resolved.accel
                )
                log.debug("%s: argv %s", self.name, self._argv)
                process = QemuProcess()
                await process.start(
                    self._argv, pass_fds=[s.fileno() for s in theirs], stderr_path=self._stderr_log
                )
                self._process = process  # only a started process: teardown reaps it
            finally:
                for s in theirs:  # QEMU holds its own copies now
                    s.close()
            self._qmp = QMPSession(self.name)
            await self._until_exit(self._qmp.connect(qmp_ours), "connecting QMP")
        except BaseException:
            for s in ours:
                s.close()
            raise
        if agent_ours is not None:
            self._agent = GuestAgent(name=f"{self.name}-agent")
            await self._agent.connect(agent_ours)

    async def _wait_ready(self) -> None:
        spec = self.spec
        mode = spec.effective_ready
        timeout = spec.ready_timeout
        if mode == "agent":
            assert self._agent is not None
            await self._until_exit(self._agent.wait_ready(timeout), "waiting for the guest agent")
        elif mode == "console":
            assert spec.ready_pattern is not None
            await self._until_exit(
                self.wait_for_console(spec.ready_pattern, timeout), "waiting for the console"
            )

    async def _until_exit(self, aw: Any, what: str) -> Any:
        """Await ``aw``, but fail with `LaunchError` as soon as QEMU exits or ``aw`` fails."""
        assert self._process is not None
        task = asyncio.ensure_future(aw)
        exited = asyncio.ensure_future(self._process.wait(None))
        try:
            done, _ = await asyncio.wait({task, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not task.done():
                task.cancel()
        if task in done and task.exception() is None:
            return task.result()
        code = self._process.returncode
        if task in done and code is None:
            err = task.exception()
            assert err is not None
            if not isinstance(err, PyqvmError):
                raise err
            raise self._launch_error(f"{self.name}: failed while {what}: {err}") from err
        raise self._launch_error(f"{self.name}: QEMU exited while {what}")

    def _launch_error(self, message: str) -> LaunchError:
        code = self._process.returncode if self._process else None
        return LaunchError(
            message,
            argv=self._argv,
            exitcode=code,
            stderr=self._process.stderr_text() if self._process else "",
            console=self.console_text(),
        )

    async def stop(self, timeout: float = 10.0, *, graceful: bool | None = None) -> int | None:
        """Shut down in steps (powerdown -> quit -> SIGTERM -> SIGKILL) and remove everything.

        ``graceful`` asks the guest to power off first (through its agent, else by
        ACPI) and waits up to ``timeout`` for it. By default that happens only when
        the VM writes to a disk that outlives it; with throw-away overlays there is
        nothing to keep and QEMU is told to ``quit`` at once. Returns QEMU's exit
        status (None if it never started). Safe to call twice.
        """
        if self._process is None:
            if self._state is not VMState.FAILED:
                self._state = VMState.STOPPED
            return None
        if graceful is None:
            spec = self._resolved.spec if self._resolved else self.spec
            graceful = self._state is VMState.RUNNING and any(
                not d.ephemeral and not d.readonly for d in spec.disks
            )
        self._state = VMState.STOPPING
        try:
            await asyncio.shield(self._shutdown(timeout if graceful else 0.0))
        finally:
            await asyncio.shield(self._teardown())
        self._state = VMState.STOPPED
        return self._last_code

    async def _shutdown(self, powerdown_timeout: float) -> None:
        proc, qmp = self._process, self._qmp
        if proc is None or proc.returncode is not None or qmp is None or not qmp.connected:
            return
        if powerdown_timeout > 0:
            try:
                await self._request_poweroff()
                await proc.wait(powerdown_timeout)
                return
            except PyqvmError as e:
                log.info("%s: no clean powerdown (%s); sending quit", self.name, e)
        try:
            await qmp.execute("quit", timeout=5)
            await proc.wait(5)
        except PyqvmError as e:
            log.info("%s: quit did not end QEMU (%s); terminating", self.name, e)

    async def _request_poweroff(self) -> None:
        """Ask the guest to power off: through its agent when it answers (a guest
        without an ACPI daemon ignores the power button), else by ACPI."""
        if self._agent is not None and self._state is VMState.STOPPING:
            try:
                await self._agent.execute("guest-shutdown", {"mode": "powerdown"}, timeout=2)
                log.info("%s: asked the guest agent to power off", self.name)
                return
            except PyqvmError as e:
                log.info("%s: guest agent shutdown failed (%s); trying ACPI", self.name, e)
        await self.qmp.execute("system_powerdown", timeout=5)
        log.info("%s: sent ACPI powerdown", self.name)

    async def kill(self) -> None:
        """End QEMU at once (SIGKILL) and clean up."""
        self._state = VMState.STOPPING
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
        await asyncio.shield(self._teardown())
        self._state = VMState.STOPPED

    async def _teardown(self) -> None:
        if self._agent is not None:
            await self._agent.close()
            self._agent = None
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None
        if self._process is not None:
            if self._process.returncode is None:
                await self._process.terminate(5.0)
            self._last_code = self._process.returncode
        if self._passthrough is not None:
            # Only now that QEMU is gone does vfio-pci let go of the devices.
            self._passthrough.release()
            self._passthrough = None
        if self._rundir is not None:
            # Keep the console for error messages after teardown.
            self._console_cache = self.console_text()
            self._rundir.cleanup()
            self._rundir = None

    # --- console -----------------------------------------------------------------------------

    def console_text(self) -> str:
        """The serial console output so far (its last 64 KiB)."""
        if self._console_log is None or not self._console_log.exists():
            return self._console_cache
        with open(self._console_log, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - _CONSOLE_TAIL))
            return f.read().decode("utf-8", "replace")

    def read_console(self, offset: int = 0) -> bytes:
        """Console bytes from ``offset`` on (for following the console as it grows)."""
        if self._console_log is None or not self._console_log.exists():
            return self._console_cache.encode()[offset:]
        with open(self._console_log, "rb") as f:
            f.seek(offset)
            return f.read()

    async def wait_for_console(self, pattern: str, timeout: float) -> None:
        """Wait until ``pattern`` (a plain substring) shows on the serial console."""
        # The console is a file QEMU appends to; polling it is the one wait here that
        # has no event to wait on.
        deadline = time.monotonic() + timeout
        interval = 0.02
        while pattern not in self.console_text():
            if time.monotonic() > deadline:
                raise PyqvmTimeoutError(
                    f"{self.name}: {pattern!r} not on the console in {timeout:g} s"
                )
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 0.25)

    # --- QMP ---------------------------------------------------------------------------------

    @property
    def qmp(self) -> QMPSession:
        """The QMP session (for commands pyqvm does not wrap)."""
        if self._qmp is None:
            raise VMStateError(f"VM {self.name!r} is {self._state.value}; QMP is not connected")
        return self._qmp

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float = 60.0
    ) -> Any:
        """Run a QMP command; see `QMPSession.execute`."""
        return await self.qmp.execute(command, arguments, timeout=timeout)

    @asynccontextmanager
    async def events(
        self, names: str | Iterable[str] = (), match: EventFilter | None = None
    ) -> AsyncIterator[EventListener]:
        """Listen for QMP events while the block runs (``async for event in listener``).

        ``match`` is a predicate on the event, or a mapping its ``data`` must contain.
        """
        async with self.qmp.events(names, match) as listener:
            yield listener

    async def pause(self) -> None:
        self._require(VMState.RUNNING)
        await self.execute("stop")
        self._state = VMState.PAUSED

    async def resume(self) -> None:
        self._require(VMState.PAUSED)
        await self.execute("cont")
        self._state = VMState.RUNNING

    # --- operations (each in pyqvm.ops) ------------------------------------------------------

    async def snapshot_save(
        self, tag: str, *, overwrite: bool = False, timeout: float | None = 600.0
    ) -> SnapshotInfo:
        """Save RAM, device state and every writable disk as internal snapshot ``tag``.

        See `pyqvm.ops.snapshot.save`; raises `SnapshotError`.
        """
        return await _snapshot.save(self, tag, overwrite=overwrite, timeout=timeout)

    async def snapshot_load(self, tag: str, *, timeout: float | None = 600.0) -> None:
        """Return the VM to internal snapshot ``tag``; see `pyqvm.ops.snapshot.load`."""
        await _snapshot.load(self, tag, timeout=timeout)

    async def snapshot_delete(self, tag: str, *, timeout: float | None = 600.0) -> None:
        """Delete internal snapshot ``tag`` from every disk holding it."""
        await _snapshot.delete(self, tag, timeout=timeout)

    async def snapshot_list(self) -> list[SnapshotInfo]:
        """The internal snapshots on the VM's writable disks, oldest first."""
        return await _snapshot.list_snapshots(self)

    async def disk_snapshot(self, disk: str, path: Path | str | None = None) -> Path:
        """Put a new qcow2 overlay on ``disk`` (external snapshot); returns its path.

        See `pyqvm.ops.blockjobs.snapshot`; raises `SnapshotError`.
        """
        return await _blockjobs.snapshot(self, disk, path)

    async def disk_commit(self, disk: str, *, timeout: float | None = 600.0) -> None:
        """Fold ``disk``'s top overlay into the image below it (``block-commit``)."""
        await _blockjobs.commit(self, disk, timeout=timeout)

    async def disk_chain(self, disk: str) -> list[ChainLink]:
        """``disk``'s backing chain, top image first."""
        return await _blockjobs.chain(self, disk)

    async def hotplug_disk(self, disk: Disk) -> str:
        """Hot-add a virtio-blk disk; returns its device id. See `pyqvm.ops.hotplug`."""
        return await _hotplug.plug_disk(self, disk)

    async def hotplug_nic(self, net: Network | None = None) -> str:
        """Hot-add a NIC (default: user-mode, virtio); returns its device id."""
        return await _hotplug.plug_nic(self, net)

    async def hotplug_cpu(self, id: str = "") -> str:
        """Hot-add a vCPU (needs ``max_smp``); returns its device id."""
        return await _hotplug.plug_cpu(self, id)

    async def hotplug_memory(self, size: int | str, id: str = "") -> str:
        """Hot-add a memory DIMM (needs ``max_memory``/``memory_slots``); returns its id."""
        return await _hotplug.plug_memory(self, size, id)

    async def unplug(self, device: str, *, timeout: float = 30.0) -> None:
        """Unplug a device and remove its backend; `UnplugTimeoutError` if the guest holds on."""
        await _hotplug.unplug(self, device, timeout=timeout)

    # --- guest -------------------------------------------------------------------------------

    @property
    def agent(self) -> GuestAgent:
        """The guest agent client."""
        if self._agent is None:
            raise VMStateError(
                f"VM {self.name!r} has no guest agent (guest_agent = false or not started)"
            )
        return self._agent

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
        self._require(VMState.RUNNING)
        result = await self.agent.exec(argv, input=input, env=env, timeout=timeout)
        if check:
            result.check()
        return result

    async def read_file(self, path: str) -> bytes:
        self._require(VMState.RUNNING)
        return await self.agent.read_file(path)

    async def write_file(self, path: str, data: bytes) -> None:
        self._require(VMState.RUNNING)
        await self.agent.write_file(path, data)

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for QEMU to exit on its own (guest powered off); returns its exit status."""
        if self._process is None:
            raise VMStateError(f"VM {self.name!r} was never started")
        code = await self._process.wait(timeout)
        await self.stop()
        return code

    # --- migration (pyqvm.ops.migration) -----------------------------------------------------

    async def migrate(
        self,
        dst: AsyncVM,
        *,
        transport: Literal["unix", "tcp"] = "unix",
        address: str | None = None,
        storage: Literal["shared", "copied"] = "shared",
        tuning: MigrationTuning | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = 600.0,
    ) -> MigrationStats:
        """Move this running guest into ``dst`` (same spec, not started); see
        `pyqvm.ops.migration.migrate`. Raises `MigrationError`; the guest then runs on here."""
        return await migration.migrate(
            self,
            dst,
            transport=transport,
            address=address,
            storage=storage,
            tuning=tuning,
            progress=progress,
            timeout=timeout,
        )

    async def save(
        self,
        directory: Path | str,
        *,
        resume: bool = False,
        progress: ProgressCallback | None = None,
        timeout: float | None = 600.0,
    ) -> SavedState:
        """Save the guest's state and disk overlays into ``directory``; then stop (or
        ``resume``). See `pyqvm.ops.migration.save`."""
        return await migration.save(
            self, directory, resume=resume, progress=progress, timeout=timeout
        )

    async def restore(self, directory: Path | str, *, timeout: float | None = 600.0) -> None:
        """Start this VM (created from the saved VM's spec) from a state `save` wrote."""
        await migration.restore(self, directory, timeout=timeout)


def launch_argv(
    resolved: Resolved,
    rundir: Path,
    *,
    console_log: Path,
    qmp_fd: int,
    agent_fd: int | None,
    incoming: str | None = None,
) -> list[str]:
    """The argv for one launch of a resolved spec, given its runtime dir and inherited fds."""
    spec = resolved.spec
    ctx = LaunchContext(
        qemu=resolved.qemu,
        accel=resolved.accel,
        qmp_fd=qmp_fd,
        agent_fd=agent_fd,
        console_log=console_log,
        disk_files={
            d.id: DiskFile(overlay=overlay_path(rundir, d.id)) for d in overlay_disks(spec)
        },
        tsc_khz=resolved.facts.tsc_khz,
        incoming=incoming,
    )
    return build_argv(spec, ctx)


def preview_argv(spec: VMSpec, *, image_cache: Path | None = None) -> list[str]:
    """The argv `AsyncVM.start` would run for ``spec``, with a placeholder runtime dir
    (``$PYQVM_RUNDIR``) and the fd numbers QEMU would inherit (3 and 4)."""
    resolved = resolve(spec, image_cache=image_cache)
    rundir = Path("$PYQVM_RUNDIR")
    return launch_argv(
        resolved,
        rundir,
        console_log=resolved.spec.serial_log or rundir / "console.log",
        qmp_fd=3,
        agent_fd=4 if resolved.spec.guest_agent else None,
    )


__all__ = ["AsyncVM", "ExecResult", "VMState", "preview_argv"]
