"""QEMU SIGKILLed while an operation is in flight (issue 12, item 1): a QMP command, a guest
``exec``, a snapshot save, a migration (its source or its destination), each at a random
moment, 20 trials each.

Each trial must see: a typed `PyqvmError` subclass within 1 s of the kill (measured),
then ``stop()`` (what leaving ``async with`` does) quick and leaving nothing: no QEMU
process, no runtime dir. The moments are drawn from a seeded generator (see
``_fault_helpers.SEED``) and printed with the measured times (``pytest -s`` shows them).
A kill that came after the operation had already finished is not counted: the trial is
run again, up to ``MAX_TRIES`` times.

Event iterators (``async with vm.events() as l: async for e in l``) are a test of their own
below.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from _fault_helpers import Outcome, assert_nothing_left, rng, summary, timed

from pyqvm import AsyncVM, MigrationProgress, MigrationTuning, Template, VMState
from pyqvm.errors import MigrationError, PyqvmError, PyqvmTimeoutError, VMExitedError

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio, pytest.mark.faults]

TRIALS = 20
MAX_TRIES = 35
WITHIN = 1.0  # seconds from the kill to the typed error
STOP_WITHIN = 2.0  # a stop after QEMU died has nothing to wait for
# ~76 MiB of a clone's RAM at 16 MiB/s: ~5 s, so the kill lands mid-migration.
SLOW = MigrationTuning(max_bandwidth=16 * 2**20)
QMP_COMMANDS: list[tuple[str, dict[str, object] | None]] = [
    ("query-status", None),
    ("query-block", None),
    ("query-named-block-nodes", None),
    ("qom-list", {"path": "/machine"}),
    ("query-cpus-fast", None),
]


@dataclass
class Trial:
    """What one trial saw."""

    delay: float
    error: BaseException | None = None
    to_error: float = 0.0  # kill -> typed error
    stop_took: float = 0.0
    notes: dict[str, object] = field(default_factory=dict)


@dataclass
class Stats:
    case: str
    trials: list[Trial] = field(default_factory=list)
    misses: int = 0

    def report(self) -> str:
        kinds: dict[str, int] = {}
        for t in self.trials:
            kinds[type(t.error).__name__] = kinds.get(type(t.error).__name__, 0) + 1
        return "\n".join(
            [
                f"[{self.case}] {len(self.trials)} trials, {self.misses} kills too late (rerun)",
                f"[{self.case}] errors: {kinds}",
                f"[{self.case}] " + summary("kill->error s", [t.to_error for t in self.trials]),
                f"[{self.case}] " + summary("stop s", [t.stop_took for t in self.trials]),
                f"[{self.case}] " + summary("moment s", [t.delay for t in self.trials]),
            ]
        )


# --- the operations, each started in flight; returns (task, what to wait for before the
# --- random delay starts, the VM to kill, any other VM the trial made)


async def _qmp_loop(vm: AsyncVM, sent: list[str]) -> None:
    i = 0
    while True:
        command, args = QMP_COMMANDS[i % len(QMP_COMMANDS)]
        sent.append(command)
        await vm.execute(command, args)
        i += 1


def _kill(pid: int | None) -> float:
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


async def _stop_timed(*vms: AsyncVM) -> float:
    t0 = time.monotonic()
    for vm in vms:
        await vm.stop(timeout=5)
    return time.monotonic() - t0


def _check_error(case: str, trial: Trial, expected: type[PyqvmError]) -> None:
    err = trial.error
    assert err is not None, f"{case}: the operation succeeded although QEMU was killed"
    assert isinstance(err, PyqvmError), f"{case}: untyped error {type(err).__name__}: {err!r}"
    assert type(err) is not PyqvmError, f"{case}: the bare base class: {err}"
    assert not isinstance(err, PyqvmTimeoutError), f"{case}: a dead QEMU is not a timeout: {err}"
    assert isinstance(err, expected), f"{case}: {type(err).__name__}: {err}"
    assert trial.to_error < WITHIN, f"{case}: error {trial.to_error:.3f} s after the kill: {err}"


async def _run_op(
    vm: AsyncVM, op: Awaitable[object], delay: float, ready: asyncio.Event | None = None
) -> tuple[Trial, float] | None:
    """Start ``op``, wait for ``ready`` (if any) and ``delay``, kill ``vm``'s QEMU.

    Returns None if the operation ended before the kill (a miss)."""
    task = asyncio.ensure_future(timed(op))
    try:
        if ready is not None:
            waiter = asyncio.ensure_future(ready.wait())
            await asyncio.wait({task, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            assert ready.is_set() or task.done(), "the operation never got going"
        await asyncio.sleep(delay)
        if task.done():
            return None
        killed_at = _kill(vm.pid)
        out: Outcome = await asyncio.wait_for(asyncio.shield(task), 30)
    finally:
        if not task.done():
            task.cancel()
    trial = Trial(delay=delay, error=out.error, to_error=out.at - killed_at)
    return trial, killed_at


async def trial_qmp(template: Template, r: random.Random) -> Trial | None:
    vm = await AsyncVM.from_template(template)
    pid, rundir = vm.pid, vm.runtime_dir
    sent: list[str] = []
    try:
        done = await _run_op(vm, _qmp_loop(vm, sent), r.uniform(0.02, 0.4))
        assert done is not None  # the loop never ends on its own
        trial, _ = done
        last = vm.qmp_transcript()[-1] if vm.qmp_transcript() else ""
        trial.notes = {"commands": len(sent), "in_flight": sent[-1], "transcript": last}
        _check_error("qmp", trial, VMExitedError)
        assert sent[-1] in str(trial.error), trial.error
    finally:
        trial_stop = await _stop_timed(vm)
    trial.stop_took = trial_stop
    assert vm.state is VMState.STOPPED
    assert_nothing_left(pid, rundir)
    return trial


async def trial_exec(template: Template, r: random.Random) -> Trial | None:
    vm = await AsyncVM.from_template(template)
    pid, rundir = vm.pid, vm.runtime_dir
    try:
        done = await _run_op(vm, vm.run(["sleep", "5"]), r.uniform(0.02, 1.0))
        if done is None:
            return None
        trial, _ = done
        _check_error("exec", trial, VMExitedError)
    finally:
        stop_took = await _stop_timed(vm)
    trial.stop_took = stop_took
    assert vm.state is VMState.STOPPED
    assert_nothing_left(pid, rundir)
    return trial


async def trial_snapshot(template: Template, r: random.Random) -> Trial | None:
    vm = await AsyncVM.from_template(template)
    pid, rundir = vm.pid, vm.runtime_dir
    running = asyncio.Event()
    statuses: list[str] = []

    def job_event(event: Mapping[str, Any]) -> bool:
        statuses.append(str(event["data"]["status"]))
        if statuses[-1] == "running":
            running.set()
        return False  # noted here; the listener's queue stays empty

    try:
        # The moment is drawn from when the snapshot-save job runs (QEMU writing RAM
        # and disks), not from the query-block before it.
        async with vm.events("JOB_STATUS_CHANGE", job_event):
            done = await _run_op(vm, vm.snapshot_save("s1"), r.uniform(0.0, 0.15), running)
        if done is None:
            return None
        trial, _ = done
        trial.notes = {"job": "/".join(statuses)}
        _check_error("snapshot", trial, PyqvmError)
        assert "running" in statuses, statuses
    finally:
        stop_took = await _stop_timed(vm)
    trial.stop_took = stop_took
    assert vm.state is VMState.STOPPED
    assert_nothing_left(pid, rundir)
    return trial


async def _trial_migration(template: Template, r: random.Random, kill_source: bool) -> Trial | None:
    src = await AsyncVM.from_template(template)
    dst = AsyncVM(src.spec)
    active = asyncio.Event()

    def note(p: MigrationProgress) -> None:
        if p.status == "active" and p.transferred > 0:
            active.set()

    src_pid, src_dir = src.pid, src.runtime_dir
    dst_pid = dst_dir = None
    try:
        op = src.migrate(dst, tuning=SLOW, progress=note)
        task = asyncio.ensure_future(timed(op))
        await asyncio.wait_for(active.wait(), 60)
        dst_pid, dst_dir = dst.pid, dst.runtime_dir
        delay = r.uniform(0.0, 2.5)
        await asyncio.sleep(delay)
        if task.done():
            task.cancel()
            return None
        killed_at = _kill(src_pid if kill_source else dst_pid)
        out = await asyncio.wait_for(task, 30)
        trial = Trial(delay=delay, error=out.error, to_error=out.at - killed_at)
        _check_error("migration", trial, MigrationError)
        # Whatever side died, the destination is removed at once.
        assert dst.state in (VMState.STOPPED, VMState.FAILED), dst.state
        assert dst.runtime_dir is None
        if not kill_source:
            # The source's guest runs on.
            assert src.state is VMState.RUNNING
            assert (await src.execute("query-status"))["status"] == "running"
            assert (await src.run(["echo", "on"], check=True)).stdout == b"on\n"
    finally:
        stop_took = await _stop_timed(src, dst)
    trial.stop_took = stop_took
    assert_nothing_left(src_pid, src_dir, "source")
    assert_nothing_left(dst_pid, dst_dir, "destination")
    return trial


async def trial_migration_source(template: Template, r: random.Random) -> Trial | None:
    return await _trial_migration(template, r, kill_source=True)


async def trial_migration_destination(template: Template, r: random.Random) -> Trial | None:
    return await _trial_migration(template, r, kill_source=False)


CASES: dict[str, Callable[[Template, random.Random], Awaitable[Trial | None]]] = {
    "qmp": trial_qmp,
    "exec": trial_exec,
    "snapshot": trial_snapshot,
    "migration-source": trial_migration_source,
    "migration-destination": trial_migration_destination,
}


@pytest.mark.parametrize("case", list(CASES))
async def test_qemu_sigkilled_in_flight(default_template: Template, case: str) -> None:
    r = rng(f"killed-in-flight:{case}")
    stats = Stats(case)
    t0 = time.monotonic()
    for attempt in range(MAX_TRIES):
        if len(stats.trials) == TRIALS:
            break
        trial = await CASES[case](default_template, r)
        if trial is None:
            stats.misses += 1
            print(f"[{case}] try {attempt}: the operation ended before the kill; again")
            continue
        stats.trials.append(trial)
        print(
            f"[{case}] trial {len(stats.trials)}: kill at +{trial.delay:.3f} s -> "
            f"{type(trial.error).__name__} after {trial.to_error:.3f} s, "
            f"stop {trial.stop_took:.3f} s {trial.notes or ''}"
        )
    print(stats.report())
    print(f"[{case}] wall time {time.monotonic() - t0:.1f} s")
    assert len(stats.trials) == TRIALS, stats.report()
    assert max(t.stop_took for t in stats.trials) < STOP_WITHIN, stats.report()


# --- event iterators ---------------------------------------------------------------------


async def _start_in_flight(kind: str, vm: AsyncVM, dst: AsyncVM | None) -> asyncio.Future[Outcome]:
    if kind == "qmp":
        return asyncio.ensure_future(timed(_qmp_loop(vm, [])))
    if kind == "exec":
        return asyncio.ensure_future(timed(vm.run(["sleep", "5"])))
    if kind == "snapshot":
        return asyncio.ensure_future(timed(vm.snapshot_save("s1")))
    assert dst is not None
    active = asyncio.Event()

    def note(p: MigrationProgress) -> None:
        if p.status == "active" and p.transferred > 0:
            active.set()

    task = asyncio.ensure_future(timed(vm.migrate(dst, tuning=SLOW, progress=note)))
    await asyncio.wait_for(active.wait(), 60)
    return task


@pytest.mark.parametrize("kind", ["qmp", "exec", "snapshot", "migration"])
async def test_event_iterators_end_when_qemu_is_killed(
    default_template: Template, kind: str
) -> None:
    r = rng(f"events-end:{kind}")
    vm = await AsyncVM.from_template(default_template)
    dst = AsyncVM(vm.spec) if kind == "migration" else None
    seen: list[str] = []
    listening = asyncio.Event()

    async def drain() -> None:
        async with vm.events() as listener:
            listening.set()
            async for event in listener:
                seen.append(str(event["event"]))

    iterator = asyncio.ensure_future(timed(drain()))
    try:
        await listening.wait()
        op = await _start_in_flight(kind, vm, dst)
        await asyncio.sleep(r.uniform(0.02, 0.2))
        assert not op.done()
        _kill(vm.pid)
        out = await asyncio.wait_for(op, 30)
        assert isinstance(out.error, PyqvmError)
        # The iterator must end (or raise a PyqvmError) once QEMU is gone, even before stop.
        done, _ = await asyncio.wait({iterator}, timeout=WITHIN)
        if iterator not in done:
            await vm.stop()  # what leaving `async with vm` does; still no end?
            done, _ = await asyncio.wait({iterator}, timeout=WITHIN)
            after_stop = "it ended after stop()" if done else "it still waits after stop() too"
            raise AssertionError(
                f"the event iterator is still waiting {WITHIN} s after QEMU died "
                f"(events seen: {seen}); {after_stop}"
            )
        ended = iterator.result()
        assert ended.error is None or isinstance(ended.error, PyqvmError), ended.error
    finally:
        await vm.stop()
        if dst is not None:
            await dst.stop()
        if not iterator.done():
            iterator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await iterator
