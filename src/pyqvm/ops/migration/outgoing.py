"""The source of a migration: `send` the guest (and, for copied storage, its disks) away."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from contextlib import AsyncExitStack
from typing import Any

from qemu.qmp import EventListener

from pyqvm.channels.qmp import Job
from pyqvm.deadline import Deadline
from pyqvm.errors import JobError, MigrationError, PyqvmError
from pyqvm.machine import Machine
from pyqvm.ops.migration.common import (
    configure,
    failure_guard,
    refuse_blocked,
    status,
    writable_disks,
)
from pyqvm.ops.migration.qapi import (
    FINAL,
    MIG_PREFIX,
    nbd_server,
    progress_from,
    refuse_cleartext,
    stats_from,
    tcp_uri_host,
)
from pyqvm.ops.migration.types import (
    Incoming,
    MigrationProgress,
    MigrationStats,
    MigrationTLS,
    MigrationTuning,
    ProgressCallback,
    Storage,
)
from pyqvm.state import VMState

log = logging.getLogger(__name__)


class DiskCopies:
    """The disk mirrors of a copied-storage migration, as `pyqvm.channels.qmp.Job`\\ s.

    Started before the RAM goes (`start`, until every copy is ``ready``),
    ended at the switch-over with a complete copy (`finish`), or abandoned
    when the migration fails (`abandon`). Their NBD client nodes go last
    (`drop_nodes`).
    """

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self.jobs: list[Job] = []
        self.nodes: list[str] = []
        self._stack = AsyncExitStack()

    async def mirror(
        self, nbd: str, deadline: Deadline, creds: str | None = None, hostname: str | None = None
    ) -> None:
        vm = self.vm
        server = nbd_server(nbd)
        secure: dict[str, object] = {}
        if creds is not None:
            secure["tls-creds"] = creds
            if hostname:
                secure["tls-hostname"] = hostname
        for device, node, sync in await writable_disks(vm):
            target = f"{MIG_PREFIX}{device}"
            await vm.execute(
                "blockdev-add",
                {
                    "driver": "nbd",
                    "node-name": target,
                    "server": server,
                    "export": device,
                    **secure,
                },
            )
            self.nodes.append(target)
            args = {"device": node, "target": target, "sync": sync, "auto-dismiss": False}
            job = await self._stack.enter_async_context(
                vm.qmp.job("blockdev-mirror", args, job_id=target)
            )
            self.jobs.append(job)
            log.info("%s: copying disk %s to %s (sync %s)", vm.name, device, nbd, sync)
        for job in self.jobs:
            if await job.wait_for("ready", timeout=deadline.left()) != "ready":
                info = await job.info()
                raise MigrationError(
                    f"{vm.name}: copying disk {job.id[len(MIG_PREFIX) :]} failed: "
                    f"{(info.error or info.status) if info else 'job ended'}"
                )

    async def totals(self) -> dict[str, int]:
        """``done``/``left`` bytes of all copies (empty without copies)."""
        if not self.jobs:
            return {}
        ours = {j.id for j in self.jobs}
        done = left = 0
        for info in await self.vm.qmp.query_jobs():
            if info.id in ours:
                cur, tot = info.current_progress, info.total_progress
                done, left = done + cur, left + max(0, tot - cur)
        return {"done": done, "left": left}

    async def finish(self, deadline: Deadline) -> int:
        """End the ready copies with a complete copy (the guest is paused); returns bytes copied."""
        copied = (await self.totals()).get("done", 0)
        # Not a forced cancel: on a ready mirror this first copies what is still dirty.
        for job in self.jobs:
            await job.cancel(force=False)
        for job in self.jobs:
            try:
                await job.finish(timeout=deadline.left())
            except JobError as e:
                raise MigrationError(
                    f"{self.vm.name}: copying disk {job.id[len(MIG_PREFIX) :]} failed: {e.error}"
                ) from e
        self.jobs.clear()
        await self._stack.aclose()
        return copied

    async def abandon(self) -> None:
        """Cancel what still runs (bounded, never raises a `PyqvmError`)."""
        self.jobs.clear()
        await self._stack.aclose()

    async def drop_nodes(self) -> None:
        for node in list(self.nodes):
            try:
                await self.vm.execute("blockdev-del", {"node-name": node})
            except PyqvmError as e:
                log.info("%s: removing %s: %s", self.vm.name, node, e)
            self.nodes.remove(node)


async def send(
    src: Machine,
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
    """Migrate ``src`` to a destination that `listen`\\ ed at ``target`` (an `Incoming` or its URI).

    ``storage`` and ``nbd`` come from the `Incoming` when one is given.
    ``progress`` is called with a `MigrationProgress` about every
    ``progress_interval`` seconds. When it returns, the guest has left:
    ``src`` is stopped (or paused with ``stop_source=False``, for a caller that
    confirms the destination first). ``tls`` encrypts the stream and the disk
    copy and checks the destination's certificate; sending over TCP to a
    non-loopback address without it is refused unless ``insecure``. On failure,
    timeout or cancellation the source's guest runs on and `MigrationError` is
    raised (cancellation is re-raised as such).
    """
    t0 = time.monotonic()
    tuning = tuning or MigrationTuning()
    if isinstance(target, Incoming):
        uri, storage, nbd = target.uri, storage or target.storage, nbd or target.nbd
    else:
        uri, storage = target, storage or "shared"
    if storage == "copied" and not nbd:
        raise MigrationError("copied storage needs the destination's nbd address")
    refuse_cleartext("tcp", tcp_uri_host(uri), tls, insecure, "migrating to")
    if nbd is not None:
        refuse_cleartext("tcp", tcp_uri_host(nbd), tls, insecure, "copying disks to")
    if tls is not None:
        tls.check("source")
    src.require(VMState.RUNNING, what="migrating")
    refuse_blocked(src, "migrate")
    src.move(VMState.MIGRATING)
    deadline = Deadline(timeout)
    copies = DiskCopies(src)
    async with failure_guard(
        f"migration to {uri} failed",
        lambda: recover_source(src, copies),
        suffix=f"; the guest runs on here ({src.name})",
    ):
        creds = await configure(src, tuning, "source", tls)
        # Copied storage: stop before the device state goes, to end the disk copies first.
        copied = storage == "copied"
        await src.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "pause-before-switchover", "state": copied}]},
        )
        if copied:
            assert nbd is not None
            await copies.mirror(nbd, deadline, creds, tls.hostname if tls else None)
        stats = await run_migration(
            src, uri, tuning, progress, deadline, t0, copies=copies, interval=progress_interval
        )
    await asyncio.shield(copies.drop_nodes())
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
        src.move(VMState.PAUSED)
    return stats


def _notify(progress: ProgressCallback | None, p: MigrationProgress) -> None:
    log.debug(
        "migration %s: %.1f s, %d/%d MiB sent, %d MiB left, %.0f MiB/s, dirty %.0f MiB/s, "
        "pass %d, throttle %d%%",
        p.status,
        p.elapsed,
        p.transferred >> 20,
        p.total >> 20,
        p.remaining >> 20,
        p.rate / 2**20,
        p.dirty_rate / 2**20,
        p.passes,
        p.cpu_throttle,
    )
    if progress is not None:
        progress(p)


async def run_migration(
    src: Machine,
    uri: str,
    tuning: MigrationTuning,
    progress: ProgressCallback | None,
    deadline: Deadline,
    t0: float,
    *,
    copies: DiskCopies | None = None,
    interval: float = 0.5,
) -> MigrationStats:
    """``migrate`` to ``uri`` and follow it to ``completed``; `MigrationError` otherwise."""
    copies = copies or DiskCopies(src)
    storage_bytes = 0
    postcopy_started = False
    continued = False
    throttle = 0
    async with src.events(("MIGRATION", "MIGRATION_PASS")) as listener:
        await src.execute("migrate", {"uri": uri})
        log.info("%s: migrating to %s", src.name, uri)
        while True:
            info = await status(src)
            state = str(info.get("status", "none"))
            postcopy_started |= state == "postcopy-active"
            look = progress_from(info, time.monotonic() - t0, await copies.totals())
            throttle = max(throttle, look.cpu_throttle)
            _notify(progress, look)
            if state == "completed":
                break
            if state in ("failed", "cancelled"):
                qemu_error = info.get("error-desc")
                raise MigrationError(
                    f"{src.name}: migration to {uri} {state}: {qemu_error or state}",
                    status=state,
                    qemu_error=qemu_error,
                )
            if state == "pre-switchover" and not continued:
                storage_bytes = await copies.finish(deadline)
                await src.execute("migrate-continue", {"state": "pre-switchover"})
                # QEMU's migration thread leaves pre-switchover a moment later: a look
                # before then must not continue it a second time.
                continued = True
            passes = int((info.get("ram") or {}).get("dirty-sync-count", 0))
            if tuning.postcopy and not postcopy_started and state == "active" and passes >= 2:
                log.info("%s: first RAM pass done; switching to postcopy", src.name)
                await src.execute("migrate-start-postcopy")
                postcopy_started = True
            if deadline.expired:
                raise MigrationError(
                    f"{src.name}: migration to {uri} did not finish in {deadline.timeout:g} s",
                    status=state,
                )
            # Status changes come as MIGRATION events; progress has no event, so
            # with a callback the wait also ends every `interval` for a fresh look.
            wait = deadline.within(interval if progress is not None else None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_next_status_event(src, listener), wait)
    info = await _final_info(src, info)
    stats = stats_from(info, time.monotonic() - t0, storage_bytes)
    return dataclasses.replace(stats, postcopy=postcopy_started, cpu_throttle=throttle)


async def _final_info(src: Machine, info: dict[str, Any]) -> dict[str, Any]:
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
        info = await status(src)
    return info


async def _next_status_event(src: Machine, listener: EventListener) -> None:
    event = await src.qmp.next_event(listener, None, "migration event")
    if event.get("event") == "MIGRATION_PASS":
        log.info("%s: migration pass %s", src.name, event["data"]["pass"])
    else:
        log.info("%s: migration %s", src.name, event["data"]["status"])


async def ensure_running(vm: Machine) -> None:
    """After a failed or cancelled migration: the source's guest must run again."""
    state = (await vm.execute("query-status", timeout=10))["status"]
    if state != "running":
        # QEMU resumes a source whose migration failed by itself; this covers the
        # states it leaves alone (postmigrate after our own abort, pre-switchover).
        log.info("%s: guest is %s after the failed migration; resuming it", vm.name, state)
        await vm.execute("cont", timeout=30)
    vm.move(VMState.RUNNING)


async def resume_source(src: Machine) -> None:
    """The destination failed after the switch-over: the guest goes back to the source."""
    try:
        await ensure_running(src)
    except PyqvmError as e:
        log.error("%s: could not resume the guest after the failed migration: %s", src.name, e)


async def recover_source(src: Machine, copies: DiskCopies | None = None) -> dict[str, Any]:
    """Abort whatever is left of a migration and make sure the source's guest runs.

    Returns the last ``query-migrate`` seen (its ``status`` updated by the
    cancellation, if one was needed), or ``{}`` when QEMU could not be asked.
    """
    last: dict[str, Any] = {}
    try:
        last = await status(src)
        state = last.get("status", "none")
        if state not in FINAL and state != "none":
            log.info("%s: cancelling the migration (%s)", src.name, state)
            async with src.events("MIGRATION") as listener:
                await src.execute("migrate_cancel")
                while state not in FINAL:
                    event = await src.qmp.next_event(listener, 30, "migration cancel")
                    state = event["data"]["status"]
            last = {**last, "status": state}
        if copies is not None:
            await copies.abandon()
            await copies.drop_nodes()
        await ensure_running(src)
    except PyqvmError as e:
        log.warning("%s: cleaning up after the failed migration: %s", src.name, e)
        src.move(VMState.RUNNING if src.alive else VMState.FAILED)
    return last


__all__ = [
    "DiskCopies",
    "ensure_running",
    "recover_source",
    "resume_source",
    "run_migration",
    "send",
]
