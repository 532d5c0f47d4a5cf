"""A snapshot save interrupted by QEMU dying (issue 12, item 1): the image passes
``qemu-img check`` and the older snapshot still loads.

The VM's only writable disk is a persistent qcow2 copy of the built-in guest's disk
(``Disk(path, ephemeral=False)``), so the snapshots (RAM and disk) live in that one file.
Snapshot "s0" is saved, the guest changes (in RAM and on disk), then QEMU is SIGKILLed at
a seeded random moment while "s1" is being saved (the ``snapshot-save`` job running).
Then: ``qemu-img check`` passes (exit 0: no corruption, and no leaked clusters: pyqvm
gives back what the interrupted save had taken), "s0" is still listed (and "s1" is not, or is
complete), and a new VM on the same image loads "s0" and is back where it was.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from _fault_helpers import assert_nothing_left, rng, summary, timed

from pyqvm import AsyncVM, Disk, KernelBoot, VMSpec, VMState, image
from pyqvm.errors import PyqvmError, PyqvmTimeoutError
from pyqvm.spec import IMAGE_DISK_ID

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio, pytest.mark.faults]

TRIALS = 8
MAX_TRIES = 14
DATA = "/mnt/data"


def spec(img: image.GuestImage, disk: Path, name: str) -> VMSpec:
    boot = KernelBoot(kernel=img.kernel, initrd=img.initrd, append=image.KERNEL_CMDLINE)
    root = Disk(path=disk, format="qcow2", ephemeral=False, id=IMAGE_DISK_ID)
    return VMSpec(name=name, kernel=boot, disks=(root,), memory=512)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60)


def check_image(disk: Path) -> dict[str, Any]:
    """``qemu-img check`` passes: exit 0, no corruption and no leaked clusters (pyqvm gives
    back the clusters the interrupted save had taken once QEMU is gone)."""
    r = qemu_img("check", "--output=json", str(disk))
    assert r.returncode == 0, f"qemu-img check exit {r.returncode}:\n{r.stdout}{r.stderr}"
    info: dict[str, Any] = json.loads(r.stdout)
    assert info.get("corruptions", 0) == 0 and info.get("check-errors", 0) == 0, info
    return info


def snapshot_tags(disk: Path) -> list[str]:
    r = qemu_img("info", "--output=json", "--force-share", str(disk))
    assert r.returncode == 0, r.stderr
    return [s["name"] for s in json.loads(r.stdout).get("snapshots", [])]


async def sh(vm: AsyncVM, script: str) -> str:
    return (await vm.run(["sh", "-c", script], check=True)).stdout_text


async def interrupted_save(
    img: image.GuestImage, disk: Path, trial: int, delay: float
) -> dict[str, Any] | None:
    """Boot, save s0, change, kill QEMU mid s1; None if s1 finished before the kill."""
    vm = AsyncVM(spec(img, disk, f"snapint-{os.getpid()}-{trial}"))
    await vm.start()
    pid, rundir = vm.pid, vm.runtime_dir
    running = asyncio.Event()
    statuses: list[str] = []

    def job_event(event: Mapping[str, Any]) -> bool:
        statuses.append(str(event["data"]["status"]))
        if statuses[-1] == "running":
            running.set()
        return False

    try:
        await sh(vm, f"echo s0 > /tmp/marker; echo s0 > {DATA}/marker; sync")
        await vm.snapshot_save("s0")
        await sh(vm, f"echo after > /tmp/marker; echo after > {DATA}/marker; sync")
        # Dirty some RAM so the second save has work to do.
        await sh(vm, "dd if=/dev/urandom of=/tmp/fill bs=1M count=48 2>/dev/null")
        async with vm.events("JOB_STATUS_CHANGE", job_event):
            task = asyncio.ensure_future(timed(vm.snapshot_save("s1")))
            await asyncio.wait_for(running.wait(), 30)
            await asyncio.sleep(delay)
            if task.done():
                await task
                return None
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            out = await asyncio.wait_for(task, 30)
        assert isinstance(out.error, PyqvmError), out.error
        assert not isinstance(out.error, PyqvmTimeoutError), out.error
        assert out.at - killed < 1.0, out.at - killed
        return {"error": type(out.error).__name__, "to_error": out.at - killed, "job": statuses}
    finally:
        await vm.stop(timeout=5)
        assert vm.state is VMState.STOPPED
        assert_nothing_left(pid, rundir)


async def test_a_snapshot_save_killed_midway_leaves_the_image_sound_and_s0_loadable(
    default_image: image.GuestImage, tmp_path: Path
) -> None:
    r = rng("snapshot-interrupted")
    t_all = time.monotonic()
    done = misses = 0
    leaks: list[int] = []
    loads: list[float] = []
    for attempt in range(MAX_TRIES):
        if done == TRIALS:
            break
        disk = tmp_path / f"persist-{attempt}.qcow2"
        shutil.copyfile(default_image.disk, disk)
        delay = r.uniform(0.0, 0.4)
        seen = await interrupted_save(default_image, disk, attempt, delay)
        if seen is None:
            misses += 1
            print(f"try {attempt}: s1 was saved before the kill at +{delay:.3f} s; again")
            disk.unlink()
            continue
        info = check_image(disk)
        leaks.append(int(info.get("leaks", 0)))
        tags = snapshot_tags(disk)
        assert "s0" in tags, tags
        # s1 may only be listed if QEMU got to finish it (the table is written last).
        # A new VM on the same image goes back to s0: RAM and disk as they were.
        vm = AsyncVM(spec(default_image, disk, f"snapint-load-{os.getpid()}-{attempt}"))
        await vm.start()
        pid, rundir = vm.pid, vm.runtime_dir
        try:
            t0 = time.monotonic()
            await vm.snapshot_load("s0")
            loads.append(time.monotonic() - t0)
            assert await sh(vm, f"cat /tmp/marker {DATA}/marker") == "s0\ns0\n"
            assert "s0" in [s.tag for s in await vm.snapshot_list()]
        finally:
            await vm.stop(timeout=10)
        assert_nothing_left(pid, rundir)
        check_image(disk)
        done += 1
        print(
            f"trial {done}: kill at +{delay:.3f} s into the s1 job -> {seen['error']} after "
            f"{seen['to_error']:.3f} s (job {'/'.join(seen['job'])}); qemu-img check: "
            f"{info.get('leaks', 0)} leaked clusters, 0 corruptions; snapshots {tags}; s0 loads"
        )
        disk.unlink()
    print(f"{done} trials, {misses} kills too late (rerun); " + summary("s0 load s", loads))
    print(f"leaked clusters per trial: {leaks}")
    print(f"wall time {time.monotonic() - t_all:.1f} s")
    assert done == TRIALS
