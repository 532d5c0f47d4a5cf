"""The destination of a migration: `listen` for the source, `accept` the guest."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Mapping
from pathlib import Path

from pyqvm.channels.devices import Plugged
from pyqvm.deadline import Deadline
from pyqvm.errors import MigrationError, PyqvmError
from pyqvm.launch.plan import LaunchPlan
from pyqvm.machine import Machine
from pyqvm.ops.hotplug import replug
from pyqvm.ops.migration.common import (
    configure,
    failure_guard,
    kill_unless_stopped,
    refuse_blocked,
    status,
    writable_disks,
)
from pyqvm.ops.migration.qapi import (
    FINAL,
    MIG_PREFIX,
    check_options,
    incoming_uri,
    listening_port,
    parse_address,
    refuse_cleartext,
    uri_host,
)
from pyqvm.ops.migration.types import (
    Incoming,
    MigrationTLS,
    MigrationTuning,
    Storage,
    Transport,
)

log = logging.getLogger(__name__)


async def listen(
    dst: Machine,
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
    """Start ``dst`` as a migration destination and listen for the source.

    ``transport`` ``unix`` listens on a socket in the VM's private runtime dir;
    ``tcp`` on ``address`` (``HOST:PORT``; default loopback, a free port). With
    ``storage="copied"`` the destination's writable disks are exported over NBD
    (same transport) for the source to mirror into. ``overlays`` (shared storage
    on one host) makes ``dst`` open the source's disk overlays (see
    `LaunchPlan`). ``devices`` (the source's hot-plugged devices,
    ``machine.devices.snapshot()``) are plugged into ``dst`` before the state
    comes, as the source has them. ``without_forwards`` starts ``dst``'s NICs
    without their host port forwards (a source on this host still holds the
    ports; `add_forwards` adds them after). ``tls`` encrypts the stream and the
    disk export and verifies the source's certificate; listening on TCP on a
    non-loopback address without it is refused unless ``insecure``. On failure
    ``dst`` is stopped and removed.
    """
    tuning = tuning or MigrationTuning()
    check_options(transport, storage, address)
    if transport == "tcp":
        host, _ = parse_address(address, "127.0.0.1")
        refuse_cleartext(transport, host, tls, insecure, "listening for a migration on")
    if tls is not None:
        tls.check("destination")
    refuse_blocked(dst, "migrate into")
    plan = LaunchPlan(overlays=dict(overlays or {}), without_forwards=without_forwards)
    await dst.start_incoming(plan)
    async with failure_guard(
        f"{dst.name}: preparing the incoming migration failed",
        lambda: kill_unless_stopped(dst),
        tail_of=dst,
    ):
        # Autostart off: the guest runs here only once the source is known to be done.
        await dst.execute("stop")
        creds = await configure(dst, tuning, "destination", tls)
        if devices:
            await replug(dst, devices, overlays=overlays, without_forwards=without_forwards)
        nbd: str | None = None
        exports: tuple[str, ...] = ()
        if storage == "copied":
            nbd, exports = await _export_disks(dst, transport, address, creds, tls)
        uri = incoming_uri(transport, dst.launched_dir(), address)
        await dst.execute("migrate-incoming", {"uri": uri})
        if uri.endswith(":0") and transport == "tcp":
            port = listening_port(await status(dst))
            if port is None:
                raise MigrationError(f"{dst.name}: QEMU did not report its listening port")
            uri = f"{uri[: -len(':0')]}:{port}"
    log.info(
        "%s: waiting for a migration on %s%s", dst.name, uri, f" (disks: {nbd})" if nbd else ""
    )
    return Incoming(uri=uri, storage=storage, nbd=nbd, exports=exports)


async def _export_disks(
    dst: Machine,
    transport: Transport,
    address: str | None,
    creds: str | None,
    tls: MigrationTLS | None,
) -> tuple[str, tuple[str, ...]]:
    # The disks travel as the RAM does: under the same credentials and authorization.
    secure: dict[str, object] = {}
    if creds is not None and tls is not None:
        secure["tls-creds"] = creds
        if tls.peer is not None:
            secure["tls-authz"] = f"{creds}-authz"
    if transport == "unix":
        path = dst.runtime_file("nbd.sock")
        await dst.execute(
            "nbd-server-start",
            {"addr": {"type": "unix", "data": {"path": str(path)}}, **secure},
        )
        nbd = f"unix:{path}"
    else:
        # A listening socket made here and handed over: the port is known, with no race.
        host, _ = parse_address(address, "127.0.0.1")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as lsock:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind((host, 0))
            lsock.listen(8)
            port = lsock.getsockname()[1]
            await dst.qmp.send_fd(lsock.fileno(), "pq-nbd-listen")
        await dst.execute(
            "nbd-server-start",
            {"addr": {"type": "fd", "data": {"str": "pq-nbd-listen"}}, **secure},
        )
        nbd = f"tcp:{uri_host(host)}:{port}"
    exports = []
    for device, node, _ in await writable_disks(dst):
        # Exports are named by the guest device, which is the same on both sides.
        await dst.execute(
            "block-export-add",
            {
                "type": "nbd",
                "id": f"{MIG_PREFIX}{device}",
                "node-name": node,
                "name": device,
                "writable": True,
            },
        )
        exports.append(device)
    return nbd, tuple(exports)


async def accept(dst: Machine, incoming: Incoming, *, timeout: float | None = 600.0) -> None:
    """Wait until the migration into ``dst`` completes, then run the guest here.

    Afterwards ``dst`` is ``RUNNING`` and its guest agent answers. If the
    migration fails (or QEMU exits) ``dst`` is killed and removed and
    `MigrationError` is raised.
    """
    async with failure_guard(
        f"{dst.name}: incoming migration failed",
        lambda: kill_unless_stopped(dst),
        tail_of=dst,
    ):
        deadline = Deadline(timeout)
        async with dst.events("MIGRATION") as listener:
            state = (await status(dst)).get("status", "none")
            while state not in FINAL:
                event = await dst.qmp.next_event(
                    listener, deadline.left(), "incoming migration to finish"
                )
                state = event["data"]["status"]
        if state != "completed":
            qemu_error = None
            with contextlib.suppress(PyqvmError):  # QEMU usually exits on a failed incoming
                qemu_error = (await status(dst)).get("error-desc")
            raise MigrationError(
                f"{dst.name}: incoming migration {state}"
                + (f": {qemu_error}" if qemu_error else ""),
                status=state,
                qemu_error=qemu_error,
            )
        await _stop_exports(dst, incoming)
        if (await dst.execute("query-status"))["status"] != "running":
            await dst.execute("cont")
        await dst.finish_incoming()


async def _stop_exports(dst: Machine, incoming: Incoming) -> None:
    if incoming.storage != "copied":
        return
    # The copy ended before the device state was sent (pause-before-switchover), but a
    # source in another process may not have closed its NBD connection yet: a "safe"
    # removal then fails with "still in use". Nothing more can come over it: cut it.
    for device in incoming.exports:
        await dst.execute("block-export-del", {"id": f"{MIG_PREFIX}{device}", "mode": "hard"})
    await dst.execute("nbd-server-stop")


__all__ = ["accept", "listen"]
