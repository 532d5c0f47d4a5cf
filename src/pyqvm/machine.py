"""`Machine`: one launch of QEMU and everything it holds, with the API operations use.

A machine owns, in order of creation: the host devices it was given
(passthrough), its runtime dir (sockets, logs, overlays), its `Companions`
(virtiofsds, private-network leases, SSH keys), the QEMU process,
the QMP session, the guest agent, and the table of devices hot-plugged into
it. It tears them down in reverse, each step bounded, shielded from the
caller's cancellation::

    machine = Machine(VMSpec(image="default"))
    await machine.start()               # returns when the guest is ready
    await machine.stop()

Operations (`pyqvm.ops`) take a machine: they guard on its state
(``require``), change it (``move``), talk QMP (``execute``/``events``), read
its files (``runtime_file``/``overlay_path``) and its last words
(``stderr_tail``). A migration destination starts from a `LaunchPlan`
(``-incoming defer``, overlays adopted from the source, forwards withheld)
and becomes a running VM with ``finish_incoming``.

Shutdown goes in steps, each bounded: agent or ACPI powerdown (wait for QEMU
to exit) -> QMP ``quit`` -> SIGTERM -> SIGKILL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from signal import SIGTERM
from typing import Any, TypeVar

from qemu.qmp import EventListener

from pyqvm.channels.agent import GuestAgent
from pyqvm.channels.console import ConsoleLog, ConsolePort
from pyqvm.channels.devices import DeviceTable
from pyqvm.channels.qmp import EventFilter, QMPSession
from pyqvm.deadline import Deadline
from pyqvm.errors import GuestPanicError, LaunchError, PyqvmError, VMStateError, tail
from pyqvm.host.facts import HostFacts
from pyqvm.launch.companions import Companions
from pyqvm.launch.overlays import (
    adopt_overlay,
    make_overlay,
    overlay_disks,
    overlay_path,
    reclaim_leaks,
)
from pyqvm.launch.passthrough import Passthrough, PassthroughHost, assign
from pyqvm.launch.plan import (
    CONSOLE_SOCKET,
    Channels,
    LaunchPlan,
    console_listen_path,
    launch_argv,
)
from pyqvm.launch.resolve import Resolved, resolve
from pyqvm.runtime.children import ChildProcess
from pyqvm.runtime.dirs import RuntimeDir
from pyqvm.spec import VMSpec
from pyqvm.state import Lifecycle, VMState

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: Seconds a stop waits for QEMU to answer `quit` and to exit after it; and how much of a
#: graceful stop's time is kept for that should the guest not power off.
_QUIT_WAIT = 5.0
_QUIT_RESERVE = 2.0
#: States in which QEMU runs: one that has exited there ended without a stop.
_QEMU_UP = (VMState.RUNNING, VMState.PAUSED, VMState.MIGRATING, VMState.INMIGRATE)
#: Seconds between SIGTERM and SIGKILL when no deadline says otherwise.
_TERM_WAIT = 5.0


class Machine:
    """One QEMU launch of a `VMSpec`: its resources and the operations' view of them."""

    def __init__(
        self,
        spec: VMSpec,
        *,
        host: HostFacts | None = None,
        image_cache: Path | None = None,
        passthrough_host: PassthroughHost | None = None,
    ) -> None:
        self._spec = spec
        self.host = host
        self.image_cache = image_cache
        # Where host devices are prepared (sysfs root, writer, claims); tests use fakes.
        self.passthrough_host = passthrough_host or PassthroughHost()
        self.devices = DeviceTable()
        self.console = ConsoleLog()
        #: The console's live end while QEMU runs (`ConsolePort`).
        self.console_port: ConsolePort | None = None
        #: The last screenshot taken (PNG), for a failure report.
        self.last_screenshot: bytes | None = None
        self._life = Lifecycle(spec.name)
        self._passthrough: Passthrough | None = None
        self.companions = Companions()  # virtiofsds, private-network leases, SSH keys
        self._resolved: Resolved | None = None
        self._rundir: RuntimeDir | None = None
        self._process: ChildProcess | None = None
        self._qmp: QMPSession | None = None
        self._agent: GuestAgent | None = None
        self._wake: socket.socket | None = None  # the host's end of pyqvm-wake's port
        self._argv: list[str] = []
        self._last_code: int | None = None
        self._stopping: asyncio.Future[int | None] | None = None  # the one stop in progress
        self._transcript: list[str] = []
        self._boot_seconds: float | None = None
        self._exit_note = ""  # why QEMU ended without a stop, once it has

    def __repr__(self) -> str:
        return f"<Machine {self.name!r} {self.state.value} pid={self.pid}>"

    # --- what it is --------------------------------------------------------------------------

    @property
    def spec(self) -> VMSpec:
        """The spec this machine launches (or launched)."""
        return self._spec

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def state(self) -> VMState:
        self._notice_exit()
        return self._life.state

    def require(self, *states: VMState, what: str = "this") -> None:
        """Raise `VMStateError` (naming the state and ``states``) unless in one of ``states``."""
        self._notice_exit()
        try:
            self._life.require(*states, what=what)
        except VMStateError as e:
            if self._exit_note:
                e.args = (f"{e}; {self._exit_note}",)
            raise

    def _notice_exit(self) -> None:
        """QEMU ended without a stop (killed, crashed, the guest powered off): ``FAILED``.

        Asked at every look at the state, so nothing has to be watching; the look
        also reaps QEMU (no zombie) and keeps the reason for later messages.
        """
        if self._life.state not in _QEMU_UP or self._process is None:
            return
        code = self._process.returncode  # waitpid(WNOHANG): reaps an exited QEMU
        if code is None:
            return
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        self._exit_note = f"QEMU ended by itself ({how}); stop() cleans up"
        log.warning("%s: %s%s", self.name, self._exit_note, self.stderr_tail())
        self._life.move(VMState.FAILED)

    def move(self, to: VMState) -> None:
        """Change the state (an operation starting or ending: migrating, paused, running)."""
        self._life.move(to)

    @property
    def argv(self) -> list[str]:
        """The argv QEMU was started with (empty before the launch)."""
        return list(self._argv)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        """QEMU was started and has not exited."""
        return self._process is not None and self._process.returncode is None

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
        return self._resolved.spec if self._resolved else self._spec

    @property
    def runtime_dir(self) -> Path | None:
        return self._rundir.path if self._rundir else None

    def launched_dir(self) -> Path:
        """The runtime dir (removed with the machine); `VMStateError` if there is none."""
        if self._rundir is None:
            raise VMStateError(
                f"VM {self.name!r} is {self.state.value}; it has no runtime dir",
                state=self.state,
            )
        return self._rundir.path

    def runtime_file(self, name: str) -> Path:
        """A path in the runtime dir; `VMStateError` if there is none."""
        return self.launched_dir() / name

    def console_socket(self) -> Path | None:
        """The serial console's unix socket for interactive clients, if there is one."""
        p = self.runtime_file(CONSOLE_SOCKET)
        return p if p.is_socket() else None

    def overlay_path(self, disk_id: str) -> Path:
        """The throw-away overlay of ephemeral disk ``disk_id`` (a spec or hot-plugged disk)."""
        return overlay_path(self.launched_dir(), disk_id)

    def overlays(self) -> dict[str, Path]:
        """The overlay of each writable ephemeral disk now open: the spec's and hot-plugged ones."""
        out = {d.id: self.overlay_path(d.id) for d in overlay_disks(self.resolved_spec)}
        for device, p in self.devices.snapshot().items():
            if p.disk is not None and p.disk.ephemeral and not p.disk.readonly:
                out[device] = self.overlay_path(device)
        return out

    # --- QMP and the agent -------------------------------------------------------------------

    @property
    def qmp(self) -> QMPSession:
        """The QMP session; `VMStateError` when it is not connected."""
        if self._qmp is None:
            raise VMStateError(
                f"VM {self.name!r} is {self.state.value}; QMP is not connected", state=self.state
            )
        return self._qmp

    @property
    def agent(self) -> GuestAgent:
        """The guest agent client; `VMStateError` when there is none."""
        if self._agent is None:
            raise VMStateError(
                f"VM {self.name!r} has no guest agent (guest_agent = false or not started)",
                state=self.state,
            )
        return self._agent

    @property
    def wake_port(self) -> socket.socket | None:
        """The host's end of ``pyqvm-wake``'s port (`Resolved.wake_port`: pyqvm's own images),
        connected for QEMU's life; None for other guests. `pyqvm.ops.wake` uses it."""
        return self._wake

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float = 60.0
    ) -> Any:
        """Run a QMP command; see `QMPSession.execute`."""
        return await self.qmp.execute(command, arguments, timeout=timeout)

    @asynccontextmanager
    async def events(
        self, names: str | Iterable[str] = (), match: EventFilter | None = None
    ) -> AsyncIterator[EventListener]:
        """Listen for QMP events while the block runs (see `QMPSession.events`)."""
        async with self.qmp.events(names, match) as listener:
            yield listener

    # --- QEMU's last words -------------------------------------------------------------------

    def stderr_text(self) -> str:
        return self._process.stderr_text() if self._process else ""

    def stderr_tail(self, lines: int = 10) -> str:
        """QEMU's last stderr lines as a message suffix (``"\\nQEMU stderr:\\n..."``), or ""."""
        text = tail(self.stderr_text(), lines)
        return f"\nQEMU stderr:\n{text}" if text else ""

    def console_text(self) -> str:
        """The serial console output so far (its last 64 KiB)."""
        return self.console.text()

    def read_console(self, offset: int = 0) -> bytes:
        """Console bytes from ``offset`` on (for following the console as it grows)."""
        return self.console.read(offset)

    async def wait_for_console(self, pattern: str, timeout: float) -> None:
        """Wait until ``pattern`` (a plain substring) shows on the serial console."""
        await self.console.wait_for(pattern, timeout, self.name)

    def guest_panic(self) -> GuestPanicError | None:
        """The guest's panic, once it has panicked: QEMU's ``GUEST_PANICKED`` (pvpanic), or
        Linux's panic line on the serial console (a kernel without pvpanic's driver)."""
        # Checked on every burst of console output: read the console file only for a panic.
        if self._qmp is not None and (data := self._qmp.guest_panic) is not None:
            info = data.get("info") or {}
            detail = ", ".join(f"{k} {v}" for k, v in info.items()) or str(data.get("action", ""))
            source = "pvpanic"
        elif self.console_port is not None and self.console_port.panic_line is not None:
            detail, source = self.console_port.panic_line, "console"
        else:
            return None
        return GuestPanicError(self.name, source=source, detail=detail, console=self.console_text())

    async def guest_panicked(self) -> GuestPanicError:
        """Wait until the guest panics (`guest_panic`), and return that error."""
        while True:
            port = self.console_port
            version = port.version if port is not None else 0  # before looking: no gap
            if (error := self.guest_panic()) is not None:
                return error
            waits = [asyncio.ensure_future(self.qmp.guest_panicked())]
            if port is not None and not port.eof:
                waits.append(asyncio.ensure_future(port.changed(version)))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
                await asyncio.gather(*waits, return_exceptions=True)

    def qmp_transcript(self) -> list[str]:
        """The last QMP commands sent and their answers (kept after the machine stopped)."""
        return list(self._qmp.transcript) if self._qmp is not None else list(self._transcript)

    def launch_error(self, message: str) -> LaunchError:
        """A `LaunchError` with this launch's argv, exit code, stderr and console."""
        return LaunchError(
            message,
            argv=self._argv,
            exitcode=self._process.returncode if self._process else None,
            stderr=self.stderr_text(),
            console=self.console_text(),
        )

    # --- starting ----------------------------------------------------------------------------

    async def start(self, plan: LaunchPlan | None = None) -> None:
        """Start QEMU and wait until the guest is ready (``spec.ready``)."""
        self.require(VMState.CREATED, what="starting")
        self.move(VMState.STARTING)
        t0 = time.monotonic()
        try:
            await self._launch(plan or LaunchPlan())
            await self._wait_ready()
        except BaseException:
            self.move(VMState.FAILED)
            await asyncio.shield(self.teardown())
            raise
        self._boot_seconds = time.monotonic() - t0
        self.move(VMState.RUNNING)
        log.info("%s: ready after %.2f s (pid %s)", self.name, self._boot_seconds, self.pid)

    async def start_incoming(self, plan: LaunchPlan | None = None) -> None:
        """Start QEMU as a migration destination; returns once QMP is connected.

        The guest does not run until a migration (or a saved state) brings it
        here: the state is ``INMIGRATE`` until `finish_incoming`.
        """
        plan = dataclasses.replace(plan or LaunchPlan(), incoming="defer")
        self.require(VMState.CREATED, what="starting as a migration destination")
        self.move(VMState.STARTING)
        t0 = time.monotonic()
        try:
            await self._launch(plan)
        except BaseException:
            self.move(VMState.FAILED)
            await asyncio.shield(self.teardown())
            raise
        self.move(VMState.INMIGRATE)
        log.info(
            "%s: waiting for an incoming migration after %.2f s (pid %s)",
            self.name,
            time.monotonic() - t0,
            self.pid,
        )

    async def finish_incoming(self, timeout: float | None = None) -> None:
        """The guest runs here now (migrated in): wait for its agent, then be ``RUNNING``.

        A console ready pattern was printed on the source's console, not here,
        so only an agent is waited for.
        """
        self.require(VMState.INMIGRATE, what="finishing an incoming migration")
        if self._agent is not None and self._spec.effective_ready == "agent":
            try:
                await self._agent.wait_ready(timeout or self._spec.ready_timeout)
            except BaseException:
                self.move(VMState.FAILED)
                raise
        self.move(VMState.RUNNING)
        log.info("%s: guest running here after migration (pid %s)", self.name, self.pid)

    async def _launch(self, plan: LaunchPlan) -> None:
        if plan.spec is not None:
            self._spec = plan.spec
        self._resolved = resolved = resolve(
            self._spec,
            facts=self.host,
            image_cache=self.image_cache,
            host_root=self.passthrough_host.root,
        )
        resolved = plan.applied_to(resolved)
        spec = resolved.spec
        if spec.host_devices:  # claim, check and bind to vfio-pci; undone in teardown
            self._passthrough = assign(spec, self.passthrough_host)
        self._rundir = RuntimeDir()
        rundir = self._rundir.path
        self.console = ConsoleLog.create(
            spec.serial_log or rundir / "console.log", plan.console_prefix
        )
        assert self.console.path is not None
        for d in overlay_disks(spec):
            if d.id in plan.overlays:
                adopt_overlay(Path(plan.overlays[d.id]), overlay_path(rundir, d.id))
            else:
                await make_overlay(d.path, d.format or "raw", overlay_path(rundir, d.id))
        prepared = await self.companions.prepare(resolved, rundir)
        channels = Channels(resolved)
        try:
            try:
                self._argv = launch_argv(
                    resolved,
                    rundir,
                    console_log=self.console.path,
                    qmp_fd=channels.theirs["qmp"].fileno(),
                    console_fd=channels.fd("console"),
                    agent_fd=channels.fd("agent"),
                    wake_fd=channels.fd("wake"),
                    incoming=plan.incoming,
                    ram=plan.ram,
                    networks=prepared.networks,
                    ssh_keys=prepared.ssh_keys,
                    tb_size=plan.qemu_memory.tb_size,
                )
                log.info(
                    "%s: starting %s (accel %s)", self.name, resolved.qemu.name, resolved.accel
                )
                log.debug("%s: argv %s", self.name, self._argv)
                process = ChildProcess()
                await process.start(
                    self._argv,
                    pass_fds=[s.fileno() for s in channels.theirs.values()],
                    stderr_path=rundir / "qemu.stderr",
                    transparent_hugepages=plan.qemu_memory.transparent_hugepages,
                )
                self._process = process  # only a started process: teardown reaps it
            finally:
                channels.close_theirs()  # QEMU holds its own copies now
            self._qmp = QMPSession(self.name)
            await self.until_exit(self._qmp.connect(channels.ours["qmp"]), "connecting QMP")
            self.companions.qemu_connected()
        except BaseException:
            channels.close()
            raise
        self._wake = channels.ours.get("wake")
        self.console_port = ConsolePort(
            channels.ours["console"], listen=console_listen_path(rundir), name=self.name
        )
        if "agent" in channels.ours:
            self._agent = GuestAgent(name=f"{self.name}-agent")
            await self._agent.connect(channels.ours["agent"])

    async def _wait_ready(self) -> None:
        spec = self._spec
        mode = spec.effective_ready
        if mode == "agent":
            await self.until_exit(
                self.agent.wait_ready(spec.ready_timeout), "waiting for the guest agent"
            )
        elif mode == "console":
            assert spec.ready_pattern is not None
            await self.until_exit(
                self.wait_for_console(spec.ready_pattern, spec.ready_timeout),
                "waiting for the console",
            )

    async def until_exit(self, aw: Awaitable[_T], what: str) -> _T:
        """Await ``aw``, but fail with `LaunchError` as soon as QEMU exits or ``aw`` fails,
        and with `GuestPanicError` as soon as the guest panics."""
        if self._process is None:
            raise VMStateError(f"VM {self.name!r}: QEMU was not started", state=self.state)
        task = asyncio.ensure_future(aw)
        exited = asyncio.ensure_future(self._process.wait(None))
        stops: set[asyncio.Future[Any]] = {exited}
        if self._qmp is not None:  # a guest that panics will not get ready either
            stops.add(asyncio.ensure_future(self.guest_panicked()))
        try:
            done, _ = await asyncio.wait({task, *stops}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for stop in stops:
                stop.cancel()
            await asyncio.gather(*stops, return_exceptions=True)
            if not task.done():
                task.cancel()
                # Retrieve what it ends with: an unretrieved error would be logged at
                # garbage collection, wherever that happens to run.
                await asyncio.gather(task, return_exceptions=True)
        if task in done and task.exception() is None:
            return task.result()
        if (panic := self.guest_panic()) is not None:
            raise panic
        if task in done and self._process.returncode is None:
            err = task.exception()
            assert err is not None
            if not isinstance(err, PyqvmError):
                raise err
            raise self.launch_error(f"{self.name}: failed while {what}: {err}") from err
        raise self.launch_error(f"{self.name}: QEMU exited while {what}")

    # --- running -----------------------------------------------------------------------------

    async def pause(self) -> None:
        self.require(VMState.RUNNING, what="pausing")
        await self.execute("stop")
        self.move(VMState.PAUSED)

    async def resume(self) -> None:
        self.require(VMState.PAUSED, what="resuming")
        await self.execute("cont")
        self.move(VMState.RUNNING)

    # --- ending ------------------------------------------------------------------------------

    async def stop(self, timeout: float = 10.0, *, graceful: bool | None = None) -> int | None:
        """Shut down in steps (powerdown -> quit -> SIGTERM -> SIGKILL) and remove everything.

        ``graceful`` asks the guest to power off first (through its agent, else
        by ACPI) and waits for it. By default that happens only when the VM
        writes to a disk that outlives it; with throw-away overlays there is
        nothing to keep and QEMU is told to ``quit`` at once. Every step shares
        ``timeout``: whatever state QEMU is in (stopped by a signal, wedged), it
        is SIGKILLed once the time is up, so a stop returns within ``timeout``
        and a small fixed margin.
        Returns QEMU's exit status (None if it never started). Safe to call twice,
        and from two tasks at once: the second waits for the first's stop.
        """
        if self._stopping is not None and not self._stopping.done():
            return await asyncio.shield(self._stopping)
        self._stopping = asyncio.ensure_future(self._stop(timeout, graceful))
        return await asyncio.shield(self._stopping)

    async def _stop(self, timeout: float, graceful: bool | None) -> int | None:
        if self._process is None:
            if self.state is not VMState.FAILED:
                self.move(VMState.STOPPED)
            return None
        if graceful is None:  # a guest that panicked powers nothing off
            graceful = (
                self.state is VMState.RUNNING
                and self.guest_panic() is None
                and any(not d.ephemeral and not d.readonly for d in self.resolved_spec.disks)
            )
        self.move(VMState.STOPPING)
        # One bound for every step, so that a QEMU that answers nothing (SIGSTOPped,
        # wedged) costs ``timeout`` and then a SIGKILL, not each step's own wait.
        deadline = Deadline(timeout)
        try:
            await self._shutdown(deadline, graceful)
        finally:
            await self.teardown(deadline)
        self.move(VMState.STOPPED)
        return self._last_code

    async def _shutdown(self, deadline: Deadline, graceful: bool) -> None:
        proc, qmp = self._process, self._qmp
        if proc is None or proc.returncode is not None or qmp is None or not qmp.connected:
            return
        if graceful:
            # Keep a little of the time for `quit` should the guest not power off.
            reserve = min(_QUIT_RESERVE, (deadline.timeout or 0) / 4)
            try:
                await self._request_poweroff(deadline)
                await proc.wait(max(0.0, (deadline.left() or 0) - reserve))
                return
            except PyqvmError as e:
                log.info("%s: no clean powerdown (%s); sending quit", self.name, e)
        try:
            await qmp.execute("quit", timeout=deadline.within(_QUIT_WAIT) or 0.01)
            await proc.wait(deadline.within(_QUIT_WAIT))
        except PyqvmError as e:
            log.info("%s: quit did not end QEMU (%s); terminating", self.name, e)

    async def _request_poweroff(self, deadline: Deadline) -> None:
        """Ask the guest to power off: through its agent when it answers (a guest
        without an ACPI daemon ignores the power button), else by ACPI."""
        if self._agent is not None and self.state is VMState.STOPPING:
            try:
                await self._agent.execute(
                    "guest-shutdown", {"mode": "powerdown"}, timeout=deadline.within(2) or 0.01
                )
                log.info("%s: asked the guest agent to power off", self.name)
                return
            except PyqvmError as e:
                log.info("%s: guest agent shutdown failed (%s); trying ACPI", self.name, e)
        await self.execute("system_powerdown", timeout=deadline.within(5) or 0.01)
        log.info("%s: sent ACPI powerdown", self.name)

    async def kill(self) -> None:
        """End QEMU at once (SIGKILL) and clean up."""
        self.move(VMState.STOPPING)
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
        await asyncio.shield(self.teardown())
        self.move(VMState.STOPPED)

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for QEMU to exit on its own (guest powered off); returns its exit status."""
        if self._process is None:
            raise VMStateError(f"VM {self.name!r} was never started", state=self.state)
        code = await self._process.wait(timeout)
        await self.stop()
        return code

    async def teardown(self, deadline: Deadline | None = None) -> None:
        """Close the agent and QMP, reap QEMU, give host devices back, remove the runtime dir.

        QEMU still running gets SIGTERM, and SIGKILL when ``deadline`` (default: 5 s
        from now) has passed. Leaves the state as it is (callers say what the machine is
        now).
        """
        deadline = deadline or Deadline(_TERM_WAIT)
        if self._agent is not None:
            await self._agent.close()
            self._agent = None
        if self._wake is not None:
            self._wake.close()
            self._wake = None
        if self.console_port is not None:
            self.console_port.close()
            self.console_port = None
        if self._qmp is not None:
            self._transcript = list(self._qmp.transcript)
            await self._qmp.close()
            self._qmp = None
        if self._process is not None:
            if self._process.returncode is None:
                await self._process.terminate(deadline.left() or 0.0)
            code = self._process.returncode
            if self._last_code is None and code is not None and code < 0 and code != -SIGTERM:
                # A kept qcow2 disk may hold clusters QEMU had taken but not yet used.
                plugged = [p.disk for p in self.devices.snapshot().values() if p.disk]
                await reclaim_leaks(self.name, [*self.resolved_spec.disks, *plugged], deadline)
            self._last_code = code
        if self._passthrough is not None:
            # Only now that QEMU is gone does vfio-pci let go of the devices.
            self._passthrough.release()
            self._passthrough = None
        await self.companions.end()
        if self._rundir is not None:
            self.console.freeze()  # for error messages after teardown
            self._rundir.cleanup()
            self._rundir = None


__all__ = ["Machine"]
