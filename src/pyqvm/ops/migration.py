"""Live migration between two launcher instances, and a VM's state saved to / restored from files.

Same host, one call (`AsyncVM.migrate` is the same thing)::

    dst = AsyncVM(src.spec)
    stats = await migrate(src, dst, transport="unix", storage="shared")

Two processes or two hosts: the destination side calls `listen` (it starts the
VM with ``-incoming defer`` and says where to connect), hands ``incoming.uri``
(and ``incoming.nbd`` for copied storage) to the source side, which calls
`send`; then the destination calls `accept`::

    incoming = await listen(dst, transport="tcp", address="0.0.0.0:4444", storage="copied")
    # ... on the source host:  await send(src, uri, nbd=nbd, storage="copied")
    await accept(dst, incoming)

The steps, in the order libvirt uses:

1. destination: QEMU with ``-incoming defer``; ``stop`` (autostart off, so the
   guest runs there only once the source is known to be done); the same
   migration capabilities as the source; for copied storage an NBD server
   exporting its fresh disks; ``migrate-incoming``.
2. source: capabilities and parameters (`MigrationTuning`); for copied storage
   a ``blockdev-mirror`` of every writable disk into the destination's export,
   until ``ready``; ``migrate``.
3. copied storage: at ``pre-switchover`` (the guest is paused now) the mirrors
   are ended with ``block-job-cancel`` (on a ready mirror: a complete copy, no
   pivot), then ``migrate-continue`` sends the device state.
4. the source reports ``completed`` → the destination ``cont``s, its guest agent
   answers → the source QEMU quits.

Failure rule: if the destination dies or the link breaks before step 4 ends,
the source keeps (or goes back to) running its guest, the half-started
destination is killed and removed, and `MigrationError` is raised. Cancelling
the awaiting task cancels the migration the same way. Postcopy is the one
exception: once the guest runs on the destination, the source no longer holds
all of its memory (see docs/migration.md).

Saving: `save` pauses the guest, migrates its state into a file through a file
descriptor handed to QEMU over the QMP socket (``getfd`` + ``migrate fd:``;
QEMU 7.2 has no ``file:`` URI, and ``exec:`` would need to spawn a process,
which pyqvm's seccomp sandbox forbids), and copies each disk overlay next to
it. `restore` starts a new VM from that directory with ``-incoming defer`` +
``migrate-incoming fd:``, each disk through a fresh overlay over the saved one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pyqvm import passthrough
from pyqvm.errors import MigrationError, PyqvmError, VMStateError
from pyqvm.ops import block_nodes
from pyqvm.ops.hotplug import Plugged, hostfwds, plugged, plugged_overlays, replug
from pyqvm.overlays import overlay_disks, overlay_path
from pyqvm.resolve import with_image
from pyqvm.spec import Disk, VMSpec
from pyqvm.state import VMState

if TYPE_CHECKING:
    from pyqvm.vm import AsyncVM

log = logging.getLogger(__name__)

Transport = Literal["unix", "tcp"]
Storage = Literal["shared", "copied"]
ProgressCallback = Callable[["MigrationProgress"], object]

#: ``max-bandwidth`` meaning "no cap" (bytes/s), the value libvirt sets for "unlimited".
UNLIMITED_BANDWIDTH = (2**63 - 1) // 2**20 * 2**20
#: QEMU 7.2's own defaults, for reference: 128 MiB/s and 300 ms.
QEMU_DEFAULT_BANDWIDTH = 128 * 2**20
QEMU_DEFAULT_DOWNTIME_MS = 300

_STATE_FILE = "vmstate"
_MANIFEST = "pyqvm-saved.json"
_FD_NAME = "pq-migfd"
_MIG_PREFIX = "pq-mig-"
_FINAL = frozenset({"completed", "failed", "cancelled"})


# --- tuning, progress, results ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MigrationTuning:
    """Migration parameters and capabilities; the defaults are pyqvm's.

    ``max_bandwidth`` (bytes/s) lifts QEMU's 128 MiB/s cap by default, as
    libvirt does; ``downtime_limit`` is in milliseconds. None leaves QEMU's
    own value. ``multifd_channels`` > 0 turns multifd on (both sides);
    ``postcopy`` switches to postcopy after the first full RAM pass.
    ``parameters`` and ``capabilities`` pass anything else through, by QEMU's
    names (``migrate-set-parameters`` / ``migrate-set-capabilities``).
    """

    max_bandwidth: int | None = UNLIMITED_BANDWIDTH
    downtime_limit: int | None = QEMU_DEFAULT_DOWNTIME_MS
    multifd_channels: int = 0
    auto_converge: bool = False
    postcopy: bool = False
    parameters: Mapping[str, object] = field(default_factory=dict)
    capabilities: Mapping[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_bandwidth", "downtime_limit"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise MigrationError(f"tuning.{name}: {v!r} must be a whole number >= 0 or None")
        n = self.multifd_channels
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 255:
            raise MigrationError(f"tuning.multifd_channels: {n!r} must be 0 (off) to 255")
        if self.postcopy and n:
            raise MigrationError(
                "tuning: postcopy and multifd together are not supported by QEMU 7.2"
            )

    @classmethod
    def qemu_defaults(cls) -> MigrationTuning:
        """Change nothing: QEMU's own parameters (the baseline for benchmarks)."""
        return cls(max_bandwidth=None, downtime_limit=None)

    def capability_states(self, side: Literal["source", "destination"]) -> dict[str, bool]:
        caps = {"events": True}
        if self.multifd_channels:
            caps["multifd"] = True
        if self.postcopy:
            caps["postcopy-ram"] = True
        if side == "source" and self.auto_converge:
            caps["auto-converge"] = True
        caps.update(self.capabilities)
        return caps

    def parameter_values(self, side: Literal["source", "destination"]) -> dict[str, object]:
        params: dict[str, object] = {}
        if self.multifd_channels:
            params["multifd-channels"] = self.multifd_channels
        if side == "source":
            if self.max_bandwidth is not None:
                params["max-bandwidth"] = self.max_bandwidth
            if self.downtime_limit is not None:
                params["downtime-limit"] = self.downtime_limit
            params.update(self.parameters)
        return params


@dataclass(frozen=True, slots=True)
class MigrationProgress:
    """One look at a running migration (``query-migrate`` on the source).

    Sizes in bytes, rates in bytes/s, times in seconds. ``expected_downtime``
    is QEMU's estimate (None before it has one); ``passes`` counts RAM dirty
    syncs; ``storage_*`` cover the disk mirrors of copied storage.
    """

    status: str
    elapsed: float
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    rate: float = 0.0
    dirty_rate: float = 0.0
    expected_downtime: float | None = None
    passes: int = 0
    storage_transferred: int = 0
    storage_remaining: int = 0


@dataclass(frozen=True, slots=True)
class MigrationStats:
    """A finished migration as QEMU measured it (times in seconds).

    ``total_time`` and ``downtime`` are QEMU's (``query-migrate``; the guest
    is paused for ``downtime``); ``wall_time`` is pyqvm's whole operation,
    destination start and storage copy included.
    """

    total_time: float
    downtime: float
    setup_time: float
    transferred: int
    passes: int
    wall_time: float
    storage_transferred: int = 0
    postcopy: bool = False  # switched to postcopy (the destination ran before RAM was all there)
    multifd_bytes: int = 0  # RAM sent over the multifd channels
    cpu_throttle: int = 0  # the highest auto-converge throttle seen, in percent


@dataclass(frozen=True, slots=True)
class Incoming:
    """Where a destination waits: give ``uri`` (and ``nbd``) to the source's `send`."""

    uri: str
    storage: Storage
    nbd: str | None = None  # ``unix:PATH`` or ``tcp:HOST:PORT`` of the disk export (copied)
    exports: tuple[str, ...] = ()  # exported disk node names


@dataclass(frozen=True, slots=True)
class SavedState:
    """A VM's state on disk: ``directory`` holds the vmstate and one overlay per disk."""

    directory: Path
    disks: tuple[str, ...]
    size: int  # bytes of the vmstate file

    @property
    def state_file(self) -> Path:
        return self.directory / _STATE_FILE


# --- guards ---------------------------------------------------------------------------------


def migration_blocker(spec: VMSpec) -> str | None:
    """Why this VM cannot be migrated or saved (a vfio-pci host device), or None."""
    return passthrough.migration_blocker(spec)


def _refuse_blocked(vm: AsyncVM, what: str) -> None:
    reason = migration_blocker(vm.spec)
    if reason:
        raise MigrationError(f"cannot {what} VM {vm.name!r}: {reason}")


# --- QMP helpers ----------------------------------------------------------------------------


def _configure_commands(
    tuning: MigrationTuning, side: Literal["source", "destination"]
) -> list[tuple[str, dict[str, object]]]:
    """The QMP commands (name, arguments) that apply ``tuning`` on one side, in order."""
    caps = tuning.capability_states(side)
    commands: list[tuple[str, dict[str, object]]] = [
        (
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
        )
    ]
    params = tuning.parameter_values(side)
    if params:
        commands.append(("migrate-set-parameters", params))
    return commands


async def _configure(
    vm: AsyncVM, tuning: MigrationTuning, side: Literal["source", "destination"]
) -> None:
    for command, arguments in _configure_commands(tuning, side):
        await vm.execute(command, arguments)


async def _status(vm: AsyncVM) -> dict[str, Any]:
    info: dict[str, Any] = await vm.execute("query-migrate")
    return info


def _progress(
    info: Mapping[str, Any], elapsed: float, mirrors: Mapping[str, int]
) -> MigrationProgress:
    """A `MigrationProgress` from a ``query-migrate`` reply (QEMU's MigrationInfo).

    ``mirrors`` holds the disk copies' ``done``/``left`` bytes (copied storage).
    """
    ram = info.get("ram") or {}
    page = int(ram.get("page-size") or 4096)
    exp = info.get("expected-downtime")
    return MigrationProgress(
        status=str(info.get("status", "none")),
        elapsed=elapsed,
        transferred=int(ram.get("transferred", 0)),
        remaining=int(ram.get("remaining", 0)),
        total=int(ram.get("total", 0)),
        rate=float(ram.get("mbps", 0.0)) * 1e6 / 8,
        dirty_rate=float(ram.get("dirty-pages-rate", 0)) * page,
        expected_downtime=exp / 1000 if isinstance(exp, int) else None,
        passes=int(ram.get("dirty-sync-count", 0)),
        storage_transferred=mirrors.get("done", 0),
        storage_remaining=mirrors.get("left", 0),
    )


def _notify(progress: ProgressCallback | None, p: MigrationProgress) -> None:
    log.debug(
        "migration %s: %.1f s, %d/%d MiB sent, %d MiB left, %.0f MiB/s, dirty %.0f MiB/s, pass %d",
        p.status,
        p.elapsed,
        p.transferred >> 20,
        p.total >> 20,
        p.remaining >> 20,
        p.rate / 2**20,
        p.dirty_rate / 2**20,
        p.passes,
    )
    if progress is not None:
        progress(p)


async def _ensure_running(vm: AsyncVM) -> None:
    """After a failed or cancelled migration: the source's guest must run again."""
    status = (await vm.execute("query-status", timeout=10))["status"]
    if status != "running":
        # QEMU resumes a source whose migration failed by itself; this covers the
        # states it leaves alone (postmigrate after our own abort, pre-switchover).
        log.info("%s: guest is %s after the failed migration; resuming it", vm.name, status)
        await vm.execute("cont", timeout=30)
    # No public setter: operations move a VM between states (migrating, and back).
    vm._set_state(VMState.RUNNING)


async def _resume_source(src: AsyncVM) -> None:
    """The destination failed after the switch-over: the guest goes back to the source."""
    try:
        await _ensure_running(src)
    except PyqvmError as e:
        log.error("%s: could not resume the guest after the failed migration: %s", src.name, e)


def _parse_address(address: str | None, default_host: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST``, ``:PORT`` or ``[IPv6]:PORT`` -> (host, port); port 0: any."""
    if not address:
        return default_host, 0
    host, sep, port = address.rpartition(":")
    if not sep:
        host, port = address, "0"
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise MigrationError(f"address {address!r}: write an IPv6 address as [ADDR]:PORT")
    host = host.strip("[]") or default_host
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MigrationError(f"address {address!r}: use HOST:PORT, e.g. 127.0.0.1:4444")
    return host, int(port)


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_options(transport: str, storage: str, address: str | None) -> None:
    """Refuse a bad transport, storage or TCP address before any QEMU is started."""
    if transport not in ("unix", "tcp"):
        raise MigrationError(f"transport {transport!r}: use 'unix' or 'tcp'")
    if storage not in ("shared", "copied"):
        raise MigrationError(f"storage {storage!r}: use 'shared' or 'copied'")
    if transport == "tcp":
        _parse_address(address, "127.0.0.1")


def _incoming_uri(transport: Transport, runtime_dir: Path, address: str | None) -> str:
    """The ``migrate-incoming`` URI: a socket in ``runtime_dir`` (unix), or
    ``address`` (tcp; loopback and port 0, i.e. any free one, by default)."""
    if transport == "unix":
        return f"unix:{runtime_dir / 'migrate.sock'}"
    host, port = _parse_address(address, "127.0.0.1")
    return f"tcp:{_uri_host(host)}:{port}"


def _listening_port(info: Mapping[str, Any]) -> int | None:
    """The TCP port an incoming migration listens on (``socket-address`` of ``query-migrate``)."""
    for addr in info.get("socket-address") or ():
        if addr.get("type") == "inet":
            return int(addr["port"])
    return None


def _nbd_server(nbd: str) -> dict[str, object]:
    """``unix:PATH`` / ``tcp:HOST:PORT`` -> a QAPI SocketAddress for blockdev-add."""
    kind, _, rest = nbd.partition(":")
    if kind == "unix" and rest:
        return {"type": "unix", "path": rest}
    if kind == "tcp":
        host, port = _parse_address(rest, "127.0.0.1")
        if port:
            return {"type": "inet", "host": host, "port": str(port)}
    raise MigrationError(f"nbd address {nbd!r}: use unix:PATH or tcp:HOST:PORT")


async def _writable_disks(vm: AsyncVM) -> list[tuple[str, str, str]]:
    """(device id, top node, mirror sync mode) of each disk a copy must carry: the writable ones.

    A disk whose top node is still pyqvm's ephemeral overlay has the same base
    on both sides, so only the overlay's own data travels (``top``); any other
    disk is copied whole.
    """

    ephemeral = {d.id for d in overlay_disks(vm.resolved_spec)}
    return [
        (n.device, n.node, "top" if n.node == n.device and n.device in ephemeral else "full")
        for n in await block_nodes(vm)
        if not n.readonly
    ]


# --- destination ----------------------------------------------------------------------------


async def listen(
    dst: AsyncVM,
    *,
    transport: Transport = "unix",
    address: str | None = None,
    storage: Storage = "shared",
    tuning: MigrationTuning | None = None,
    overlays: Mapping[str, Path] | None = None,
    devices: Mapping[str, Plugged] | None = None,
    without_forwards: bool = False,
) -> Incoming:
    """Start ``dst`` as a migration destination and listen for the source.

    ``transport`` ``unix`` listens on a socket in the VM's private runtime dir;
    ``tcp`` on ``address`` (``HOST:PORT``; default loopback, a free port). With
    ``storage="copied"`` the destination's writable disks are exported over NBD
    (same transport) for the source to mirror into. ``overlays`` (shared storage
    on one host) makes ``dst`` open the source's disk overlays, see
    `AsyncVM.start_incoming`. ``devices`` (the source's `hotplug.plugged`) are
    plugged into ``dst`` before the state comes, as the source has them.
    ``without_forwards`` starts ``dst``'s NICs without their host port forwards
    (a source on this host still holds the ports; `add_forwards` adds them after).
    On failure ``dst`` is stopped and removed.
    """
    tuning = tuning or MigrationTuning()
    _check_options(transport, storage, address)
    _refuse_blocked(dst, "migrate into")
    await dst.start_incoming(overlays=overlays, without_forwards=without_forwards)
    try:
        assert dst.runtime_dir is not None
        # Autostart off: the guest runs here only once the source is known to be done.
        await dst.execute("stop")
        await _configure(dst, tuning, "destination")
        if devices:
            await replug(dst, devices, overlays=overlays, without_forwards=without_forwards)
        nbd: str | None = None
        exports: tuple[str, ...] = ()
        if storage == "copied":
            nbd, exports = await _export_disks(dst, transport, address)
        uri = _incoming_uri(transport, dst.runtime_dir, address)
        await dst.execute("migrate-incoming", {"uri": uri})
        if uri.endswith(":0") and transport == "tcp":
            port = _listening_port(await _status(dst))
            if port is None:
                raise MigrationError(f"{dst.name}: QEMU did not report its listening port")
            uri = f"{uri[: -len(':0')]}:{port}"
    except BaseException:
        await asyncio.shield(dst.kill())
        raise
    log.info(
        "%s: waiting for a migration on %s%s", dst.name, uri, f" (disks: {nbd})" if nbd else ""
    )
    return Incoming(uri=uri, storage=storage, nbd=nbd, exports=exports)


async def _export_disks(
    dst: AsyncVM, transport: Transport, address: str | None
) -> tuple[str, tuple[str, ...]]:
    assert dst.runtime_dir is not None
    if transport == "unix":
        path = dst.runtime_dir / "nbd.sock"
        await dst.execute(
            "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(path)}}}
        )
        nbd = f"unix:{path}"
    else:
        # A listening socket made here and handed over: the port is known, with no race.
        host, _ = _parse_address(address, "127.0.0.1")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as lsock:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind((host, 0))
            lsock.listen(8)
            port = lsock.getsockname()[1]
            await dst.qmp.send_fd(lsock.fileno(), "pq-nbd-listen")
        await dst.execute(
            "nbd-server-start", {"addr": {"type": "fd", "data": {"str": "pq-nbd-listen"}}}
        )
        nbd = f"tcp:{_uri_host(host)}:{port}"
    exports = []
    for device, node, _ in await _writable_disks(dst):
        # Exports are named by the guest device, which is the same on both sides.
        await dst.execute(
            "block-export-add",
            {
                "type": "nbd",
                "id": f"{_MIG_PREFIX}{device}",
                "node-name": node,
                "name": device,
                "writable": True,
            },
        )
        exports.append(device)
    return nbd, tuple(exports)


async def accept(dst: AsyncVM, incoming: Incoming, *, timeout: float | None = 600.0) -> None:
    """Wait until the migration into ``dst`` completes, then run the guest here.

    Afterwards ``dst`` is ``RUNNING`` and its guest agent answers. If the
    migration fails (or QEMU exits) ``dst`` is killed and removed and
    `MigrationError` is raised.
    """
    state = VMState
    try:
        async with dst.events("MIGRATION") as listener:
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            status = (await _status(dst)).get("status", "none")
            while status not in _FINAL:
                left = None if deadline is None else max(0.0, deadline - loop.time())
                event = await dst.qmp.next_event(listener, left, "incoming migration to finish")
                status = event["data"]["status"]
        if status != "completed":
            qemu_error = None
            with contextlib.suppress(PyqvmError):  # QEMU usually exits on a failed incoming
                qemu_error = (await _status(dst)).get("error-desc")
            raise MigrationError(
                f"{dst.name}: incoming migration {status}"
                + (f": {qemu_error}" if qemu_error else ""),
                status=status,
                qemu_error=qemu_error,
            )
        await _stop_exports(dst, incoming)
        run = (await dst.execute("query-status"))["status"]
        if run != "running":
            await dst.execute("cont")
        await dst._finish_incoming()
    except BaseException as e:
        tail = _stderr_tail(dst)
        if dst.state is not state.STOPPED:
            await asyncio.shield(dst.kill())
        if isinstance(e, PyqvmError):
            msg = (
                str(e)
                if isinstance(e, MigrationError)
                else f"{dst.name}: incoming migration failed: {e}"
            )
            raise _migration_error(f"{msg}{tail}", e) from e
        raise


async def _stop_exports(dst: AsyncVM, incoming: Incoming) -> None:
    if incoming.storage != "copied":
        return
    # The copy ended before the device state was sent (pause-before-switchover), but a
    # source in another process may not have closed its NBD connection yet: a "safe"
    # removal then fails with "still in use". Nothing more can come over it: cut it.
    for device in incoming.exports:
        await dst.execute("block-export-del", {"id": f"{_MIG_PREFIX}{device}", "mode": "hard"})
    await dst.execute("nbd-server-stop")


# --- source ---------------------------------------------------------------------------------


async def send(
    src: AsyncVM,
    target: Incoming | str,
    *,
    storage: Storage | None = None,
    nbd: str | None = None,
    tuning: MigrationTuning | None = None,
    progress: ProgressCallback | None = None,
    progress_interval: float = 0.5,
    timeout: float | None = 600.0,
    stop_source: bool = True,
) -> MigrationStats:
    """Migrate ``src`` to a destination that `listen`\\ ed at ``target`` (an `Incoming` or its URI).

    ``storage`` and ``nbd`` come from the `Incoming` when one is given.
    ``progress`` is called with a `MigrationProgress` about every
    ``progress_interval`` seconds. When it returns, the guest has left:
    ``src`` is stopped (or paused with ``stop_source=False``, for a caller that
    confirms the destination first). On failure, timeout or cancellation the
    source's guest runs on and `MigrationError` is raised (cancellation is
    re-raised as such).
    """
    t0 = time.monotonic()
    tuning = tuning or MigrationTuning()
    if isinstance(target, Incoming):
        uri, storage, nbd = target.uri, storage or target.storage, nbd or target.nbd
    else:
        uri, storage = target, storage or "shared"
    if storage == "copied" and not nbd:
        raise MigrationError("copied storage needs the destination's nbd address")
    src._require(VMState.RUNNING)
    _refuse_blocked(src, "migrate")
    state = VMState
    src._set_state(state.MIGRATING)
    jobs: list[str] = []
    nodes: list[str] = []
    done = False
    try:
        await _configure(src, tuning, "source")
        # Copied storage: stop before the device state goes, to end the disk copies first.
        copied = storage == "copied"
        await src.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "pause-before-switchover", "state": copied}]},
        )
        if copied:
            assert nbd is not None
            await _start_mirrors(src, nbd, jobs, nodes, timeout)
        stats = await _run_migration(
            src, uri, tuning, jobs, progress, progress_interval, timeout, t0
        )
        done = True
    except BaseException as e:
        last = await asyncio.shield(_recover_source(src, jobs, nodes))
        if isinstance(e, PyqvmError):
            what = str(e) if isinstance(e, MigrationError) else f"migration to {uri} failed: {e}"
            raise _migration_error(f"{what}; the guest runs on here ({src.name})", e, last) from e
        raise
    finally:
        if done:
            await asyncio.shield(_drop_nodes(src, nodes))
    log.info(
        "%s: migrated to %s in %.2f s (downtime %.0f ms, %d MiB)",
        src.name,
        uri,
        stats.total_time,
        stats.downtime * 1000,
        stats.transferred >> 20,
    )
    if stop_source:
        await src.stop()
    else:
        src._set_state(state.PAUSED)
    return stats


async def _start_mirrors(
    src: AsyncVM, nbd: str, jobs: list[str], nodes: list[str], timeout: float | None
) -> None:
    server = _nbd_server(nbd)
    disks = await _writable_disks(src)
    async with src.events("JOB_STATUS_CHANGE") as listener:
        for device, node, sync in disks:
            target = f"{_MIG_PREFIX}{device}"
            await src.execute(
                "blockdev-add",
                {"driver": "nbd", "node-name": target, "server": server, "export": device},
            )
            nodes.append(target)
            await src.execute(
                "blockdev-mirror",
                {
                    "job-id": target,
                    "device": node,
                    "target": target,
                    "sync": sync,
                    "auto-dismiss": False,
                },
            )
            jobs.append(target)
            log.info("%s: copying disk %s to %s (sync %s)", src.name, device, nbd, sync)
        waiting = set(jobs)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while waiting:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            ev = await src.qmp.next_event(listener, left, "disk copies to become ready")
            jid, status = ev["data"]["id"], ev["data"]["status"]
            if jid not in waiting:
                continue
            if status == "ready":
                waiting.discard(jid)
            elif status in ("aborting", "concluded", "null"):
                err = await _job_error(src, jid)
                raise MigrationError(
                    f"{src.name}: copying disk {jid[len(_MIG_PREFIX) :]} failed: {err}"
                )


async def _job_error(vm: AsyncVM, job_id: str) -> str:
    for j in await vm.execute("query-jobs"):
        if j.get("id") == job_id:
            return str(j.get("error") or j.get("status"))
    return "job ended"


async def _mirror_totals(vm: AsyncVM, jobs: list[str]) -> dict[str, int]:
    if not jobs:
        return {}
    done = left = 0
    for j in await vm.execute("query-jobs"):
        if j.get("id") in jobs:
            cur, tot = int(j.get("current-progress", 0)), int(j.get("total-progress", 0))
            done, left = done + cur, left + max(0, tot - cur)
    return {"done": done, "left": left}


async def _finish_mirrors(src: AsyncVM, jobs: list[str], timeout: float | None) -> int:
    """End ready mirrors with a complete copy (guest paused); returns bytes copied."""
    copied = (await _mirror_totals(src, jobs)).get("done", 0)
    async with src.events("JOB_STATUS_CHANGE") as listener:
        for jid in jobs:
            # Not job-cancel (a forced cancel): block-job-cancel on a ready mirror
            # first copies what is still dirty, then ends without pivoting.
            await src.execute("block-job-cancel", {"device": jid})
        waiting = set(jobs)
        while waiting:
            ev = await src.qmp.next_event(listener, timeout, "disk copies to finish")
            jid, status = ev["data"]["id"], ev["data"]["status"]
            if jid in waiting and status == "concluded":
                waiting.discard(jid)
    for jid in jobs:
        err = None
        for j in await src.execute("query-jobs"):
            if j.get("id") == jid:
                err = j.get("error")
        await src.execute("job-dismiss", {"id": jid})
        if err:
            raise MigrationError(
                f"{src.name}: copying disk {jid[len(_MIG_PREFIX) :]} failed: {err}"
            )
    jobs.clear()
    return copied


async def _run_migration(
    src: AsyncVM,
    uri: str,
    tuning: MigrationTuning,
    jobs: list[str],
    progress: ProgressCallback | None,
    interval: float,
    timeout: float | None,
    t0: float,
) -> MigrationStats:
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    storage_bytes = 0
    postcopy_started = False
    throttle = 0
    async with src.events(("MIGRATION", "MIGRATION_PASS")) as listener:
        await src.execute("migrate", {"uri": uri})
        log.info("%s: migrating to %s", src.name, uri)
        while True:
            info = await _status(src)
            status = str(info.get("status", "none"))
            postcopy_started |= status == "postcopy-active"
            throttle = max(throttle, int(info.get("cpu-throttle-percentage", 0)))
            elapsed = time.monotonic() - t0
            _notify(progress, _progress(info, elapsed, await _mirror_totals(src, jobs)))
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                qemu_error = info.get("error-desc")
                raise MigrationError(
                    f"{src.name}: migration to {uri} {status}: {qemu_error or status}",
                    status=status,
                    qemu_error=qemu_error,
                )
            if status == "pre-switchover":
                storage_bytes = await _finish_mirrors(src, jobs, _left(deadline, loop))
                await src.execute("migrate-continue", {"state": "pre-switchover"})
            passes = int((info.get("ram") or {}).get("dirty-sync-count", 0))
            if tuning.postcopy and not postcopy_started and status == "active" and passes >= 2:
                log.info("%s: first RAM pass done; switching to postcopy", src.name)
                await src.execute("migrate-start-postcopy")
                postcopy_started = True
            # Status changes come as MIGRATION events; progress has no event, so
            # with a callback the wait also ends every `interval` for a fresh look.
            left = _left(deadline, loop)
            if left == 0.0:
                raise MigrationError(
                    f"{src.name}: migration to {uri} did not finish in {timeout:g} s",
                    status=status,
                )
            wait = interval if progress is not None else None
            wait = left if wait is None else (wait if left is None else min(wait, left))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_next_status_event(src, listener), wait)
    info = await _final_info(src, info)
    stats = _stats(info, time.monotonic() - t0, storage_bytes)
    return dataclasses.replace(stats, postcopy=postcopy_started, cpu_throttle=throttle)


def _stats(info: Mapping[str, Any], wall_time: float, storage_bytes: int) -> MigrationStats:
    """`MigrationStats` from the ``query-migrate`` reply of a completed migration."""
    ram = info.get("ram") or {}
    return MigrationStats(
        multifd_bytes=int(ram.get("multifd-bytes", 0)),
        total_time=int(info.get("total-time", 0)) / 1000,
        downtime=int(info.get("downtime", 0)) / 1000,
        setup_time=int(info.get("setup-time", 0)) / 1000,
        transferred=int(ram.get("transferred", 0)),
        passes=int(ram.get("dirty-sync-count", 0)),
        wall_time=wall_time,
        storage_transferred=storage_bytes,
    )


async def _final_info(src: AsyncVM, info: dict[str, Any]) -> dict[str, Any]:
    """``query-migrate`` once QEMU has recorded the total time and downtime.

    QEMU reports ``completed`` (and sends the event) a moment before its migration
    thread records those two numbers, and nothing is announced when it has: ask
    again, briefly, until they are there.
    """
    wait = 0.002
    for _ in range(12):  # about 8 s in all, at most
        if info.get("total-time"):
            break
        await asyncio.sleep(wait)
        wait *= 2
        info = await _status(src)
    return info


def _left(deadline: float | None, loop: asyncio.AbstractEventLoop) -> float | None:
    return None if deadline is None else max(0.0, deadline - loop.time())


async def _next_status_event(src: AsyncVM, listener: Any) -> None:
    event = await src.qmp.next_event(listener, None, "migration event")
    if event.get("event") == "MIGRATION_PASS":
        log.info("%s: migration pass %s", src.name, event["data"]["pass"])
    else:
        log.info("%s: migration %s", src.name, event["data"]["status"])


async def _recover_source(src: AsyncVM, jobs: list[str], nodes: list[str]) -> dict[str, Any]:
    """Abort whatever is left of a migration and make sure the source's guest runs.

    Returns the last ``query-migrate`` seen (its ``status`` updated by the
    cancellation, if one was needed), or ``{}`` when QEMU could not be asked.
    """
    last: dict[str, Any] = {}
    try:
        last = await _status(src)
        status = last.get("status", "none")
        if status not in _FINAL and status != "none":
            log.info("%s: cancelling the migration (%s)", src.name, status)
            async with src.events("MIGRATION") as listener:
                await src.execute("migrate_cancel")
                while status not in _FINAL:
                    status = (await src.qmp.next_event(listener, 30, "migration cancel"))["data"][
                        "status"
                    ]
            last = {**last, "status": status}
        for jid in list(jobs):
            with contextlib.suppress(PyqvmError):
                await src.execute("block-job-cancel", {"device": jid, "force": True})
            with contextlib.suppress(PyqvmError):
                await _wait_job_gone(src, jid)
        jobs.clear()
        await _drop_nodes(src, nodes)
        await _ensure_running(src)
    except PyqvmError as e:
        log.warning("%s: cleaning up after the failed migration: %s", src.name, e)
        # No public "is QEMU still alive" on AsyncVM: ask its process.
        alive = src._process is not None and src._process.returncode is None
        src._set_state(VMState.RUNNING if alive else VMState.FAILED)
    return last


def _migration_error(
    message: str, cause: BaseException, last: Mapping[str, Any] | None = None
) -> MigrationError:
    """A `MigrationError` saying ``message`` that keeps what ``cause`` (a
    `MigrationError`) knew of QEMU's status and reason, else takes them from
    ``last`` (a ``query-migrate`` reply)."""
    status = cause.status if isinstance(cause, MigrationError) else None
    qemu_error = cause.qemu_error if isinstance(cause, MigrationError) else None
    if last:
        status = status or last.get("status")
        qemu_error = qemu_error or last.get("error-desc")
    return MigrationError(message, status=status, qemu_error=qemu_error)


async def _wait_job_gone(vm: AsyncVM, job_id: str) -> None:
    async with vm.events("JOB_STATUS_CHANGE", {"id": job_id}) as listener:
        while True:
            jobs = {j["id"]: j["status"] for j in await vm.execute("query-jobs")}
            if job_id not in jobs:
                return
            if jobs[job_id] == "concluded":
                await vm.execute("job-dismiss", {"id": job_id})
                return
            await vm.qmp.next_event(listener, 30, f"job {job_id} to end")


async def _drop_nodes(vm: AsyncVM, nodes: list[str]) -> None:
    for node in list(nodes):
        try:
            await vm.execute("blockdev-del", {"node-name": node})
        except PyqvmError as e:
            log.info("%s: removing %s: %s", vm.name, node, e)
        nodes.remove(node)


# --- both sides in one process ----------------------------------------------------------------

# One plan drives both faces: `migrate` (one event loop) and `migrate_between_loops`
# (two loops, run one step at a time by the sync face). The plan yields each step as
# (side, awaitable, cleanup) and gets its result back (or its exception thrown in), so
# the order of steps and the failure handling live in one place.
Side = Literal["src", "dst"]
_Step = tuple[Side, Awaitable[Any], bool]


def _plan(
    src: AsyncVM,
    dst: AsyncVM,
    transport: Transport,
    address: str | None,
    storage: Storage,
    tuning: MigrationTuning | None,
    progress: ProgressCallback | None,
    timeout: float | None,
) -> Generator[_Step, Any, MigrationStats]:
    t0 = time.monotonic()
    dst._require(VMState.CREATED)
    src._require(VMState.RUNNING)
    _refuse_blocked(src, "migrate")
    overlays = source_overlays(src) if storage == "shared" else None
    # Both VMs run on this host: the destination takes over the source's host ports
    # only once the source has quit.
    forwards = hostfwds(src)
    listening = listen(
        dst,
        transport=transport,
        address=address,
        storage=storage,
        tuning=tuning,
        overlays=overlays,
        devices=plugged(src),
        without_forwards=bool(forwards),
    )
    incoming: Incoming = yield "dst", listening, False
    try:
        sending = send(
            src, incoming, tuning=tuning, progress=progress, timeout=timeout, stop_source=False
        )
        stats: MigrationStats = yield "src", sending, False
    except BaseException as e:
        tail = _stderr_tail(dst)  # the destination often knows why the source's send failed
        yield "dst", dst.kill(), True
        if isinstance(e, MigrationError) and tail:
            raise _migration_error(f"{e}\n(destination){tail}", e) from e
        raise
    try:
        yield "dst", accept(dst, incoming, timeout=timeout), False
    except BaseException:
        # The destination failed after the switch-over: the guest goes back to the source.
        yield "src", _resume_source(src), True
        raise
    yield "src", src.stop(), False
    if forwards:
        yield "dst", add_forwards(dst, forwards), False
    return dataclasses.replace(stats, wall_time=time.monotonic() - t0)


async def add_forwards(vm: AsyncVM, forwards: Sequence[tuple[str, str]]) -> None:
    """Add host port forwards ((netdev id, rule), see `hotplug.hostfwds`) to running NICs.

    The guest already runs here, so a port that cannot be had (taken meanwhile)
    is logged, not raised.
    """
    for netdev, rule in forwards:
        out = await vm.execute(
            "human-monitor-command", {"command-line": f"hostfwd_add {netdev} {rule}"}
        )
        if str(out).strip():
            log.warning("%s: port forward %s on %s not restored: %s", vm.name, rule, netdev, out)
        else:
            log.info("%s: port forward %s on %s", vm.name, rule, netdev)


async def migrate(
    src: AsyncVM,
    dst: AsyncVM,
    *,
    transport: Transport = "unix",
    address: str | None = None,
    storage: Storage = "shared",
    tuning: MigrationTuning | None = None,
    progress: ProgressCallback | None = None,
    timeout: float | None = 600.0,
) -> MigrationStats:
    """Move the guest of ``src`` (running) into ``dst`` (created from the same spec, not started).

    Returns QEMU's numbers; afterwards ``dst`` runs the guest and ``src`` is
    stopped. ``storage="shared"`` makes ``dst`` open the disks ``src`` has open
    (its overlays included); ``"copied"`` copies them over NBD first. Devices
    hot-plugged into ``src`` are plugged into ``dst`` first. On any failure
    ``src`` runs on with its guest intact, ``dst`` is removed, and
    `MigrationError` is raised.
    """
    plan = _plan(src, dst, transport, address, storage, tuning, progress, timeout)
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            _, step, cleanup = plan.throw(error) if error else plan.send(result)
        except StopIteration as done:
            stats: MigrationStats = done.value
            return stats
        try:
            # Cleanup runs to the end even when the caller cancels meanwhile.
            result, error = (await (asyncio.shield(step) if cleanup else step)), None
        except BaseException as e:
            result, error = None, e


def migrate_between_loops(
    run_src: Callable[[Awaitable[Any]], Any],
    run_dst: Callable[[Awaitable[Any]], Any],
    src: AsyncVM,
    dst: AsyncVM,
    *,
    transport: Transport = "unix",
    address: str | None = None,
    storage: Storage = "shared",
    tuning: MigrationTuning | None = None,
    progress: ProgressCallback | None = None,
    timeout: float | None = 600.0,
) -> MigrationStats:
    """`migrate` for VMs driven by two event loops (the sync face: one per `pyqvm.VM`).

    The same steps, each run on its own VM's loop one after the other: QEMU does
    the work in between, so neither side needs its loop running meanwhile.
    """
    plan = _plan(src, dst, transport, address, storage, tuning, progress, timeout)
    run = {"src": run_src, "dst": run_dst}
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            side, step, _ = plan.throw(error) if error else plan.send(result)
        except StopIteration as done:
            stats: MigrationStats = done.value
            return stats
        try:
            result, error = run[side](step), None
        except BaseException as e:
            result, error = None, e


def source_overlays(src: AsyncVM) -> dict[str, Path]:
    """The overlay file of each ephemeral disk of a running VM (for shared-storage migration)."""

    rundir = src.runtime_dir
    if rundir is None:
        raise VMStateError(f"VM {src.name!r} is {src.state.value}; it has no disks open")
    spec_disks = {d.id: overlay_path(rundir, d.id) for d in overlay_disks(src.resolved_spec)}
    return spec_disks | plugged_overlays(src)


# --- save to / restore from files -------------------------------------------------------------


async def save(
    vm: AsyncVM,
    directory: Path | str,
    *,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    timeout: float | None = 600.0,
) -> SavedState:
    """Save the guest's state (RAM and devices) and its disk overlays into ``directory``.

    The guest is paused while its state is written (so the file holds one
    consistent image, written once). Afterwards the VM is stopped, or runs on
    with ``resume=True``. ``directory`` is created; it must not hold a saved
    state already. Restore with `restore`.
    """
    vm._require(VMState.RUNNING, VMState.PAUSED)
    _refuse_blocked(vm, "save")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if (out / _MANIFEST).exists() or (out / _STATE_FILE).exists():
        raise MigrationError(f"'{out}' already holds a saved VM; use a new directory")
    state = VMState
    was_running = vm.state is state.RUNNING
    overlays = source_overlays(vm)  # hot-plugged disks' too
    devices = plugged(vm)
    disks = sorted(d for d in overlays if d not in devices)
    t0 = time.monotonic()
    if was_running:
        await vm.execute("stop")
    vm._set_state(state.MIGRATING)
    fd = os.open(out / _STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            await vm.qmp.send_fd(fd, _FD_NAME)
        finally:
            os.close(fd)
        await _configure(vm, MigrationTuning(), "source")
        await _run_migration(
            vm, f"fd:{_FD_NAME}", MigrationTuning(), [], progress, 0.5, timeout, t0
        )
        # The source's disks are flushed and inactive now: their overlays are stable.
        for disk_id, path in overlays.items():
            shutil.copyfile(path, out / f"{disk_id}.qcow2")
        manifest = {
            "name": vm.name,
            "disks": disks,
            "memory_mib": vm.spec.memory,
            # Restored before the state is loaded, as a migration destination gets them.
            "devices": {d: p.to_json() for d, p in devices.items()},
        }
        (out / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException as e:
        last = await asyncio.shield(_recover_saved(vm, was_running))
        for p in [out / _STATE_FILE, out / _MANIFEST, *(out / f"{d}.qcow2" for d in overlays)]:
            p.unlink(missing_ok=True)
        if isinstance(e, PyqvmError) and not isinstance(e, MigrationError):
            raise _migration_error(f"{vm.name}: saving to '{out}' failed: {e}", e, last) from e
        raise
    size = (out / _STATE_FILE).stat().st_size
    log.info("%s: saved to %s (%d MiB) in %.2f s", vm.name, out, size >> 20, time.monotonic() - t0)
    if resume:
        await vm.execute("cont")  # re-activates the disks too
        vm._set_state(state.RUNNING if was_running else state.PAUSED)
        if not was_running:
            await vm.execute("stop")
    else:
        await vm.stop()
    return SavedState(directory=out, disks=tuple(disks), size=size)


async def _recover_saved(vm: AsyncVM, was_running: bool) -> dict[str, Any]:
    last = await _recover_source(vm, [], [])
    if not was_running:
        with contextlib.suppress(PyqvmError):
            await vm.execute("stop")
        vm._set_state(VMState.PAUSED)
    return last


def restored_spec(spec: VMSpec, saved: Path | str, *, image_cache: Path | None = None) -> VMSpec:
    """``spec`` with each saved disk opened through a fresh overlay over its saved overlay."""
    directory = Path(saved)
    try:
        manifest = json.loads((directory / _MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise MigrationError(f"'{directory}' holds no saved VM: {e}") from None
    concrete = with_image(spec, image_cache)
    saved_disks = set(manifest.get("disks", ()))
    known = {d.id for d in concrete.disks}
    missing = saved_disks - known
    if missing:
        raise MigrationError(
            f"'{directory}' was saved from a VM with disks {sorted(missing)} that this spec lacks"
        )
    disks: list[Disk] = []
    for d in concrete.disks:
        if d.id in saved_disks:
            d = dataclasses.replace(d, path=directory / f"{d.id}.qcow2", format="qcow2")
        disks.append(d)
    return dataclasses.replace(concrete, disks=tuple(disks))


def _saved_devices(directory: Path) -> dict[str, Plugged]:
    """The hot-plugged devices a save recorded; an ephemeral disk among them opens a fresh
    overlay over its saved one, as the spec's disks do."""
    manifest = json.loads((directory / _MANIFEST).read_text())
    devices: dict[str, Plugged] = {}
    for device, record in manifest.get("devices", {}).items():
        p = Plugged.from_json(record)
        if p.disk is not None and (directory / f"{device}.qcow2").is_file():
            saved = dataclasses.replace(p.disk, path=directory / f"{device}.qcow2", format="qcow2")
            p = dataclasses.replace(p, disk=saved)
        devices[device] = p
    return devices


async def restore(vm: AsyncVM, saved: Path | str, *, timeout: float | None = 600.0) -> None:
    """Start ``vm`` (created, not started) from a state `save` wrote into ``saved``.

    ``vm`` must have been built from the spec the state was saved from (its
    hardware must match); `AsyncVM.restore` builds that for you. Returns when
    the guest runs and its agent answers. On failure ``vm`` is removed and
    `MigrationError` is raised with QEMU's reason.
    """
    directory = Path(saved)
    state_file = directory / _STATE_FILE
    if not state_file.is_file():
        raise MigrationError(f"'{directory}' holds no saved VM state ({_STATE_FILE} missing)")
    vm._require(VMState.CREATED)
    vm.spec = restored_spec(vm.spec, directory, image_cache=vm._image_cache)
    _refuse_blocked(vm, "restore")
    devices = _saved_devices(directory)
    t0 = time.monotonic()
    await vm.start_incoming()
    incoming = Incoming(uri=f"fd:{_FD_NAME}", storage="shared")
    try:
        await _configure(vm, MigrationTuning(), "destination")
        await replug(vm, devices)
        fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await vm.qmp.send_fd(fd, _FD_NAME)
        finally:
            os.close(fd)
        await vm.execute("migrate-incoming", {"uri": incoming.uri})
    except BaseException as e:
        tail = _stderr_tail(vm)
        await asyncio.shield(vm.kill())
        if isinstance(e, PyqvmError):
            raise _migration_error(
                f"{vm.name}: restoring from '{directory}' failed: {e}{tail}", e
            ) from e
        raise
    try:
        await accept(vm, incoming, timeout=timeout)
    except MigrationError as e:
        raise _migration_error(f"{vm.name}: restoring from '{directory}' failed: {e}", e) from e
    log.info("%s: restored from %s in %.2f s", vm.name, directory, time.monotonic() - t0)


def _stderr_tail(vm: AsyncVM) -> str:
    """QEMU's last words (read before the runtime dir goes), for an error message."""
    proc = vm._process
    text = proc.stderr_text().strip() if proc is not None else ""
    return "\nQEMU stderr:\n" + "\n".join(text.splitlines()[-10:]) if text else ""


__all__ = [
    "QEMU_DEFAULT_BANDWIDTH",
    "QEMU_DEFAULT_DOWNTIME_MS",
    "UNLIMITED_BANDWIDTH",
    "Incoming",
    "MigrationProgress",
    "MigrationStats",
    "MigrationTuning",
    "ProgressCallback",
    "SavedState",
    "accept",
    "listen",
    "migrate",
    "migrate_between_loops",
    "migration_blocker",
    "restore",
    "restored_spec",
    "save",
    "send",
    "source_overlays",
]
