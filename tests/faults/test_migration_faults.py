"""Migrations that go wrong: the source's guest must run on, intact, and nothing is left over.

The migration is slowed down (bandwidth capped) so that it is surely still running
when the destination is killed or the caller cancels; the guest's counter loop
proves that the source's guest kept running and was never reset.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from guest_helpers import counter_beyond, start_counter

from pyqvm import AsyncVM, MigrationProgress, MigrationTuning, VMSpec, VMState
from pyqvm.errors import MigrationError
from pyqvm.image import GuestImage

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

# ~76 MiB of guest RAM at 16 MiB/s: several seconds, so the faults land mid-migration.
SLOW = MigrationTuning(max_bandwidth=16 * 2**20)


def spec(name: str) -> VMSpec:
    return VMSpec(image="default", name=name, memory=512, smp=1)


async def running_source() -> tuple[AsyncVM, int]:
    src = AsyncVM(spec("fault-src"))
    await src.start()
    await src.run(["sh", "-c", "echo kept > /mnt/data/kept && sync"], check=True)
    await start_counter(src)
    return src, await counter_beyond(src, 0)


async def assert_source_intact(src: AsyncVM, before: int) -> None:
    assert src.state is VMState.RUNNING
    assert (await src.execute("query-status"))["status"] == "running"
    assert (await src.execute("query-migrate"))["status"] in ("failed", "cancelled")
    value = await counter_beyond(src, before)
    await counter_beyond(src, value)  # and it keeps counting
    assert (await src.read_file("/mnt/data/kept")) == b"kept\n"
    # No leftovers of the copy machinery on the source.
    assert await src.execute("query-jobs") == []
    nodes = [n["node-name"] for n in await src.execute("query-named-block-nodes")]
    assert not [n for n in nodes if n.startswith("pq-mig-")]


def assert_gone(dst: AsyncVM, pid: int | None) -> None:
    assert dst.state in (VMState.STOPPED, VMState.FAILED)
    assert dst.runtime_dir is None
    assert pid is not None and not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("storage", ["shared", "copied"])
async def test_destination_killed_mid_migration(pyqvm_image: GuestImage, storage: str) -> None:
    src, before = await running_source()
    dst = AsyncVM(spec("fault-dst"))
    killed: list[int] = []

    def kill_destination(p: MigrationProgress) -> None:
        if p.status == "active" and p.transferred > 8 * 2**20 and not killed and dst.pid:
            os.kill(dst.pid, signal.SIGKILL)
            killed.append(p.transferred)

    try:
        with pytest.raises(MigrationError, match="the guest runs on here"):
            await src.migrate(
                dst,
                transport="tcp",
                storage=storage,  # type: ignore[arg-type]
                tuning=SLOW,
                progress=kill_destination,
            )
        assert killed, "the destination was never killed: the migration ended too soon"
        assert_gone(dst, dst.pid)
        await assert_source_intact(src, before)
    finally:
        await dst.stop()
        await src.stop()


async def test_cancelled_migration(pyqvm_image: GuestImage) -> None:
    src, before = await running_source()
    dst = AsyncVM(spec("fault-dst"))
    started = asyncio.Event()

    def note(p: MigrationProgress) -> None:
        if p.status == "active" and p.transferred > 0:
            started.set()

    try:
        task = asyncio.ensure_future(src.migrate(dst, transport="unix", tuning=SLOW, progress=note))
        await asyncio.wait_for(started.wait(), 120)
        assert not task.done()
        pid = dst.pid
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_gone(dst, pid)
        await assert_source_intact(src, before)
    finally:
        await dst.stop()
        await src.stop()
