"""Both sides of a migration in one process: `migrate` from one machine into another."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence

from pyqvm.machine import Machine
from pyqvm.ops.hotplug import hostfwds
from pyqvm.ops.migration.common import failure_guard, kill_unless_stopped, refuse_blocked
from pyqvm.ops.migration.incoming import accept, listen
from pyqvm.ops.migration.outgoing import resume_source, send
from pyqvm.ops.migration.types import (
    MigrationStats,
    MigrationTLS,
    MigrationTuning,
    ProgressCallback,
    Storage,
    Transport,
)
from pyqvm.state import VMState

log = logging.getLogger(__name__)


async def migrate(
    src: Machine,
    dst: Machine,
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
    """Move the guest of ``src`` (running) into ``dst`` (created from the same spec, not started).

    Returns QEMU's numbers; afterwards ``dst`` runs the guest and ``src`` is
    stopped. ``storage="shared"`` makes ``dst`` open the disks ``src`` has open
    (its overlays included); ``"copied"`` copies them over NBD first. Devices
    hot-plugged into ``src`` are plugged into ``dst`` first. On any failure
    ``src`` runs on with its guest intact, ``dst`` is removed, and
    `MigrationError` is raised.
    """
    t0 = time.monotonic()
    dst.require(VMState.CREATED, what="migrating into it")
    src.require(VMState.RUNNING, what="migrating")
    refuse_blocked(src, "migrate")
    # Both machines run on this host: the destination takes over the source's host
    # ports only once the source has quit.
    forwards = hostfwds(src)
    incoming = await listen(
        dst,
        transport=transport,
        address=address,
        storage=storage,
        tuning=tuning,
        overlays=src.overlays() if storage == "shared" else None,
        devices=src.devices.snapshot(),
        without_forwards=bool(forwards),
        tls=tls,
        insecure=insecure,
    )
    # The destination often knows why the source's send failed: its stderr is quoted.
    async with failure_guard(
        "", lambda: kill_unless_stopped(dst), tail_of=dst, tail_label="destination"
    ):
        stats = await send(
            src,
            incoming,
            tuning=tuning,
            progress=progress,
            timeout=timeout,
            stop_source=False,
            tls=tls,
            insecure=insecure,
        )
    try:
        await accept(dst, incoming, timeout=timeout)
    except BaseException:
        # The destination failed after the switch-over: the guest goes back to the source.
        await asyncio.shield(resume_source(src))
        raise
    await src.stop()
    if forwards:
        await add_forwards(dst, forwards)
    return dataclasses.replace(stats, wall_time=time.monotonic() - t0)


async def add_forwards(vm: Machine, forwards: Sequence[tuple[str, str]]) -> None:
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


__all__ = ["add_forwards", "migrate"]
