"""Helpers the fault tests share: seeded random moments, operations timed to the moment
they fail, and the checks that nothing of a VM is left."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyqvm import AsyncVM, VMState

#: One seed for every random moment of the fault tests; set PQ_FAULT_SEED to replay a run.
SEED = int(os.environ.get("PQ_FAULT_SEED", "20240612"))


def rng(case: str) -> random.Random:
    """A generator of its own per case, so one case's trials do not shift another's."""
    r = random.Random(f"{SEED}:{case}")
    print(f"[{case}] seed {SEED} (PQ_FAULT_SEED={SEED} replays it)")
    return r


def state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` (``Z`` for a zombie), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def state_now(vm: AsyncVM) -> VMState:
    """``vm.state`` read afresh. An earlier ``assert vm.state is ...`` would otherwise still
    narrow the property for mypy after the awaits (stop) that change it."""
    return vm.state


def dead(pid: int) -> bool:
    return state(pid) in (None, "Z")


def processes_naming(path: Path) -> list[int]:
    """Live processes whose command line names ``path`` (QEMU, qemu-img: a VM's helpers)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = proc.joinpath("cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in argv and not dead(int(proc.name)):
            out.append(int(proc.name))
    return out


def gone(pid: int) -> bool:
    """No process at all: reaped (a zombie still counts as left)."""
    return state(pid) is None


def wait_dead(pids: list[int], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not all(dead(p) for p in pids):
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def wait_gone(pids: list[int], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not all(gone(p) for p in pids):
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


@dataclass
class Outcome:
    """How an operation ended: its result or error, and when (``time.monotonic``)."""

    at: float = 0.0
    error: BaseException | None = None
    result: Any = None


async def timed(aw: Awaitable[Any]) -> Outcome:
    """Await ``aw``, noting the moment it ended and how (never raises but cancellation)."""
    out = Outcome()
    try:
        out.result = await aw
    except asyncio.CancelledError:
        raise
    except BaseException as e:  # the error is the subject of the test
        out.error = e
    out.at = time.monotonic()
    return out


def summary(name: str, values: list[float]) -> str:
    if not values:
        return f"{name}: none"
    return (
        f"{name}: n={len(values)} min={min(values):.3f} "
        f"median={sorted(values)[len(values) // 2]:.3f} max={max(values):.3f}"
    )


def assert_nothing_left(pid: int | None, rundir: Path | None, what: str = "VM") -> None:
    assert pid is not None and rundir is not None, f"{what} never had a QEMU"
    assert wait_gone([pid], 1.0), f"{what}: QEMU pid {pid} still exists ({state(pid)})"
    assert not rundir.exists(), f"{what}: runtime dir {rundir} is left: {list(rundir.iterdir())}"
