"""The guest agent wedged (issue 12, item 1): qemu-ga SIGSTOPped inside the guest.

The next ``run`` times out with `PyqvmTimeoutError` at its timeout (and so does the one
after: the resync it starts with is bounded too), while the VM stays usable over QMP
(QEMU itself is fine), and ``stop`` still works, bounded, graceful or not.

The ``kill -STOP`` runs through the agent itself, so it is backgrounded with a delay: the
command that arranges it returns first. The delay is seeded-random (printed), so the agent
freezes at some moment of the ``run`` that follows (mid ``guest-exec``/``-status`` polls).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from _fault_helpers import assert_nothing_left, rng, state_now, summary, timed

from pyqvm import AsyncVM, Template, VMState
from pyqvm.errors import PyqvmTimeoutError

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio, pytest.mark.faults]

TRIALS = 6
MARGIN = 0.5
STOP_MARGIN = 1.0


def _freeze_agent_in(seconds: float) -> list[str]:
    script = f"(sleep {seconds:.3f}; kill -STOP $(pidof qemu-ga)) </dev/null >/dev/null 2>&1 &"
    return ["sh", "-c", script]


async def test_a_wedged_agent_times_out_runs_and_leaves_qmp_and_stop_working(
    default_template: Template,
) -> None:
    r = rng("wedged-agent")
    runs: list[float] = []
    stops: list[float] = []
    t_all = time.monotonic()
    for trial in range(1, TRIALS + 1):
        vm = await AsyncVM.from_template(default_template)
        pid, rundir = vm.pid, vm.runtime_dir
        freeze_in = round(r.uniform(0.05, 0.6), 3)
        timeout = round(r.uniform(1.0, 2.0), 3)
        stop_timeout = round(r.uniform(1.5, 3.0), 3)
        graceful = trial % 2 == 0  # powerdown through the (wedged) agent first
        try:
            agent_pid = (await vm.run(["pidof", "qemu-ga"], check=True)).stdout_text.strip()
            assert agent_pid.isdigit(), agent_pid
            await vm.run(_freeze_agent_in(freeze_in), check=True)
            # The agent freezes while this command runs (it would take 1.5 s).
            t0 = time.monotonic()
            out = await timed(vm.run(["sleep", "1.5"], timeout=timeout))
            took = out.at - t0
            assert isinstance(out.error, PyqvmTimeoutError), out.error or out.result
            assert timeout - 0.05 <= took < timeout + MARGIN, (took, timeout)
            runs.append(took)
            # And the next one, which first resyncs with the frozen agent.
            t0 = time.monotonic()
            out = await timed(vm.run(["true"], timeout=timeout))
            assert isinstance(out.error, PyqvmTimeoutError), out.error or out.result
            assert out.at - t0 < timeout + MARGIN
            # QEMU is fine: QMP answers, and a QMP-only operation works.
            status = await vm.execute("query-status", timeout=5)
            assert status["status"] == "running" and status["running"] is True
            assert await vm.execute("query-block", timeout=5)
            assert (await vm.snapshot_save("while-wedged", timeout=30)).vm_state_size > 0
            assert vm.state is VMState.RUNNING
        finally:
            t0 = time.monotonic()
            code = await vm.stop(timeout=stop_timeout, graceful=graceful)
            stop_took = time.monotonic() - t0
        stops.append(stop_took)
        print(
            f"trial {trial}: agent {agent_pid} frozen at +{freeze_in} s; run(timeout={timeout}) "
            f"ended after {runs[-1]:.3f} s; stop(timeout={stop_timeout}, graceful={graceful}) "
            f"took {stop_took:.3f} s, exit {code}"
        )
        assert stop_took < stop_timeout + STOP_MARGIN, (stop_took, stop_timeout)
        assert state_now(vm) is VMState.STOPPED
        assert_nothing_left(pid, rundir)
    print(summary("run s", runs))
    print(summary("stop s", stops))
    print(f"wall time {time.monotonic() - t_all:.1f} s")


async def test_a_wedged_agent_at_start_of_a_guest_command_does_not_block_qmp_callers(
    default_template: Template,
) -> None:
    """While one task waits on the frozen agent, QMP calls from other tasks go on."""
    vm = await AsyncVM.from_template(default_template)
    pid, rundir = vm.pid, vm.runtime_dir
    try:
        await vm.run(_freeze_agent_in(0.1), check=True)
        await asyncio.sleep(0.4)
        waiting = asyncio.ensure_future(timed(vm.run(["true"], timeout=3.0)))
        t0 = time.monotonic()
        for _ in range(20):
            assert (await vm.execute("query-status", timeout=1))["status"] == "running"
        assert time.monotonic() - t0 < 1.0
        assert not waiting.done()
        out = await waiting
        assert isinstance(out.error, PyqvmTimeoutError), out.error
    finally:
        await vm.stop(timeout=2)
    assert_nothing_left(pid, rundir)
