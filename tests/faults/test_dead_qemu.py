"""QEMU ending behind pyqvm's back, while nothing is in flight (killed, crashed, or the guest
powering off): the next look at the VM says so, QEMU is reaped, and stop() cleans up."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from _fault_helpers import assert_nothing_left, state, state_now

from pyqvm import VM, AsyncVM, Template, VMState
from pyqvm.errors import VMStateError

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


async def _exited(pid: int) -> None:
    """Until QEMU (our child) has exited, without reaping it (``WNOWAIT``): pyqvm's next look
    must. (A ``Z`` in /proc is not enough: the leader thread shows it while others still run.)"""
    for _ in range(1000):
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"pid {pid} did not exit: state {state(pid)}")


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["sigkill", "poweroff"])
async def test_qemu_that_ended_by_itself_is_noticed(default_template: Template, how: str) -> None:
    vm = await AsyncVM.from_template(default_template)
    pid, rundir = vm.pid, vm.runtime_dir
    assert pid is not None
    try:
        if how == "sigkill":
            os.kill(pid, signal.SIGKILL)
        else:
            # The guest powers itself off; QEMU exits 0 (pyqvm passes no -no-shutdown).
            await vm.run(["sh", "-c", "(sleep 0.2; poweroff -f) >/dev/null 2>&1 &"], check=True)
        await _exited(pid)
        assert vm.state is VMState.FAILED  # this look reaps QEMU
        assert state(pid) is None, "QEMU was left a zombie"
        with pytest.raises(VMStateError) as caught:
            await vm.run(["true"])
        assert "failed" in str(caught.value) and "QEMU" in str(caught.value), caught.value
    finally:
        await vm.stop(timeout=5)
    assert state_now(vm) is VMState.STOPPED
    assert_nothing_left(pid, rundir)


def test_the_blocking_face_notices_too(default_template: Template) -> None:
    with VM.from_template(default_template) as vm:
        pid = vm.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        asyncio.run(_exited(pid))
        assert vm.state is VMState.FAILED
