"""QEMU SIGSTOPped (issue 12, item 1): every operation ends with `PyqvmTimeoutError` at its
timeout (plus a small margin), then ``stop()`` escalates to SIGKILL within its own timeout
and nothing is left. 5 trials, with seeded random timeouts and moments (printed).

A QEMU stopped by a signal answers nothing: not QMP, not the guest agent (whose channel
QEMU carries), so each wait is bounded only by the caller's timeout.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable

import pytest
from _fault_helpers import assert_nothing_left, rng, state_now, summary, timed

from pyqvm import AsyncVM, Template, VMState
from pyqvm.errors import PyqvmTimeoutError

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio, pytest.mark.faults]

TRIALS = 5
MARGIN = 0.5  # past an operation's timeout
STOP_MARGIN = 1.0  # SIGKILL, reaping, closing sockets, removing the runtime dir


def _check_timeout(what: str, out_error: BaseException | None, took: float, timeout: float) -> None:
    assert isinstance(out_error, PyqvmTimeoutError), f"{what}: {out_error!r} after {took:.3f} s"
    assert timeout - 0.05 <= took < timeout + MARGIN, f"{what}: {took:.3f} s for timeout {timeout}"


def _ops(vm: AsyncVM, timeout: float) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
    return [
        ("execute", lambda: vm.execute("query-status", timeout=timeout)),
        ("run", lambda: vm.run(["true"], timeout=timeout)),
        ("agent.read_file", lambda: vm.agent.read_file("/etc/hostname", timeout=timeout)),
        ("agent.write_file", lambda: vm.agent.write_file("/tmp/x", b"x", timeout=timeout)),
        ("agent.execute", lambda: vm.agent.execute("guest-ping", timeout=timeout)),
        ("qmp.wait_for_event", lambda: vm.qmp.wait_for_event("RESUME", timeout=timeout)),
    ]


async def test_every_operation_on_a_sigstopped_qemu_times_out_and_stop_kills_it(
    default_template: Template,
) -> None:
    r = rng("sigstopped")
    took_by_op: dict[str, list[float]] = {}
    stops: list[float] = []
    t_all = time.monotonic()
    for trial in range(1, TRIALS + 1):
        vm = await AsyncVM.from_template(default_template)
        pid, rundir = vm.pid, vm.runtime_dir
        assert pid is not None
        timeout = round(r.uniform(0.3, 1.5), 3)
        stop_timeout = round(r.uniform(0.5, 2.5), 3)
        stop_at = r.uniform(0.05, 0.25)
        try:
            # First the stop lands in the middle of a guest command (at a random moment).
            t0 = time.monotonic()
            task = asyncio.ensure_future(timed(vm.run(["sleep", "0.3"], timeout=timeout)))
            await asyncio.sleep(stop_at)
            os.kill(pid, signal.SIGSTOP)
            out = await task
            if out.error is None:  # the command ended before the stop: allowed, not counted
                print(f"trial {trial}: run ended before SIGSTOP at +{stop_at:.3f} s")
            else:
                _check_timeout("run in flight", out.error, out.at - t0, timeout)
                took_by_op.setdefault("run in flight", []).append(out.at - t0)
            # Then each operation on the stopped QEMU.
            for what, op in _ops(vm, timeout):
                t0 = time.monotonic()
                out = await asyncio.wait_for(timed(op()), timeout + 10)
                _check_timeout(what, out.error, out.at - t0, timeout)
                took_by_op.setdefault(what, []).append(out.at - t0)
            assert vm.state is VMState.RUNNING  # timeouts do not change what the VM is
        finally:
            t0 = time.monotonic()
            code = await vm.stop(timeout=stop_timeout)
            took = time.monotonic() - t0
        stops.append(took)
        print(
            f"trial {trial}: timeout {timeout} s, SIGSTOP at +{stop_at:.3f} s; "
            f"stop(timeout={stop_timeout}) took {took:.3f} s, exit {code}"
        )
        assert took < stop_timeout + STOP_MARGIN, (took, stop_timeout)
        assert code == -signal.SIGKILL, f"stop ended QEMU with {code}, not SIGKILL"
        assert state_now(vm) is VMState.STOPPED
        assert_nothing_left(pid, rundir)
    for what, values in took_by_op.items():
        print(summary(what, values))
    print(summary("stop s", stops))
    print(f"wall time {time.monotonic() - t_all:.1f} s")


async def test_snapshot_save_on_a_sigstopped_qemu_times_out_at_its_timeout(
    default_template: Template,
) -> None:
    r = rng("sigstopped-snapshot")
    for _ in range(TRIALS):
        vm = await AsyncVM.from_template(default_template)
        pid, rundir = vm.pid, vm.runtime_dir
        assert pid is not None
        timeout = round(r.uniform(0.3, 1.5), 3)
        try:
            os.kill(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            # Bounded here so that the bug costs a few seconds, not a minute.
            bounded = asyncio.wait_for(vm.snapshot_save("s1", timeout=timeout), timeout + 3)
            out = await timed(bounded)
            _check_timeout("snapshot_save", out.error, out.at - t0, timeout)
        finally:
            await vm.stop(timeout=1)
        assert_nothing_left(pid, rundir)


@pytest.mark.parametrize("op", ["read_file", "write_file"])
async def test_guest_file_operations_take_a_timeout(default_template: Template, op: str) -> None:
    vm = await AsyncVM.from_template(default_template)
    pid, rundir = vm.pid, vm.runtime_dir
    assert pid is not None
    try:
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        call = (
            vm.read_file("/etc/hostname", timeout=1.0)
            if op == "read_file"
            else vm.write_file("/tmp/x", b"x", timeout=1.0)
        )
        out = await asyncio.wait_for(timed(call), 5)
        _check_timeout(op, out.error, out.at - t0, 1.0)
    finally:
        await vm.stop(timeout=1)
    assert_nothing_left(pid, rundir)
