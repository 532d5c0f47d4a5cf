"""A stop is bounded by its timeout whatever QEMU is doing (issue 12: "stop(timeout=T) returns
within T plus a small fixed margin whatever state QEMU is in")."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from pyqvm import AsyncVM, Disk, Template, VMSpec, VMState

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

MARGIN = 1.0  # SIGKILL, reaping, closing sockets, removing the runtime dir


@pytest.mark.parametrize("timeout", [0.5, 2.0])
async def test_stop_of_a_sigstopped_qemu_returns_within_its_timeout(
    default_template: Template, timeout: float
) -> None:
    vm = await AsyncVM.from_template(default_template)
    pid, rundir = vm.pid, vm.runtime_dir
    assert pid is not None and rundir is not None
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    await vm.stop(timeout=timeout)
    took = time.monotonic() - t0
    assert took < timeout + MARGIN, took
    assert vm.state is VMState.STOPPED
    assert not Path(f"/proc/{pid}").exists() and not rundir.exists()


async def test_a_graceful_stop_of_a_sigstopped_qemu_is_bounded_too(
    default_image: object, tmp_path: Path
) -> None:
    # A disk that outlives the VM makes the stop graceful: powerdown first, then quit.
    disk = tmp_path / "keep.img"
    disk.write_bytes(b"\0" * (4 << 20))
    vm = AsyncVM(VMSpec(image="default", disks=(Disk(disk, ephemeral=False, id="keep"),)))
    await vm.start()
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    await vm.stop(timeout=2.0)
    assert time.monotonic() - t0 < 2.0 + MARGIN
    assert vm.state is VMState.STOPPED
