r"""Warm pools of clones: a ready VM at the speed of a function call.

A clone of a template answers its first command about 0.2 s after the call under TCG:
QEMU starts and loads the state, then the guest's first fork and exec run in a QEMU that
has translated nothing yet. A pool pays both ahead of time. It keeps ``size`` spares
restored from the template (`pyqvm.ops.template.restore_clone`), runs a first command in
each (the ``warm`` commands, so the guest's fork/exec path is translated) and pauses them,
so an idle spare takes no CPU. `AsyncPool.acquire` resumes one and makes it its own at
that moment (`pyqvm.ops.template.make_own`: the host's clock, a random generator
reseeded from fresh host entropy; a spare may have idled for minutes, and no two VMs
handed out share random state), then starts a replacement in the background.

Refills run ``refills`` at a time (default one), so that they never take more than one
core from the VMs in use; while one runs its QEMU has a lower CPU priority (``nice``),
given back at the hand-out. A spare that died while idle is never handed out: it is
noticed, cleaned up and replaced.

A pool owns every QEMU it started: `AsyncPool.close` stops the spares and the VMs it
handed out that still run (stop those yourself to end them sooner). `Pool` is the
blocking twin: it runs the pool on an event loop of its own thread, so that refills go on
between calls, and hands out blocking `VM`\\ s driven there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from pyqvm.errors import PoolError, PyqvmError, PyqvmTimeoutError
from pyqvm.faces.derived_vm import VM
from pyqvm.faces.loop import BackgroundLoop
from pyqvm.ops import template as templates
from pyqvm.ops.template import Template
from pyqvm.state import VMState
from pyqvm.vm import AsyncVM

log = logging.getLogger(__name__)

#: What a first command costs a clone under TCG is mostly translating the guest's
#: fork/exec path; one run of ``true`` does it for every later command.
WARM: tuple[tuple[str, ...], ...] = (("true",),)
#: QEMU's own memory per VM besides guest RAM, for the memory check (TCG's code buffer
#: grows to tens of MiB, plus heap and thread stacks); see docs/templates.md.
OVERHEAD_MIB = 96
#: The nice value of a refilling spare's QEMU (0: none); see `AsyncPool`.
REFILL_NICE = 10


def mem_available_mib() -> int:
    """The host's ``MemAvailable`` in MiB (what can be allocated without swapping)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    raise PyqvmError("/proc/meminfo has no MemAvailable line")


def check_memory(template: Template, size: int, available_mib: int | None = None) -> None:
    """`PoolError` with the numbers when ``size`` VMs of ``template`` might not fit.

    A spare idles in little memory of its own (its RAM is the template's file, shared
    copy-on-write), but once handed out a VM may write all of its RAM: each counts as its
    RAM plus QEMU's own (`OVERHEAD_MIB`).
    """
    available = mem_available_mib() if available_mib is None else available_mib
    ram = template.spec.memory
    assert isinstance(ram, int)  # a built spec's memory is MiB
    each = ram + OVERHEAD_MIB
    if size * each > available:
        raise PoolError(
            f"a pool of {size} VMs of template {template.name!r} may need {size * each} MiB "
            f"({size} x ({ram} MiB RAM + {OVERHEAD_MIB} MiB for QEMU)), "
            f"but the host has {available} MiB available: ask for at most "
            f"{max(0, available // each)}",
            size=size,
            needed_mib=size * each,
            available_mib=available,
        )


def auto_size(
    template: Template,
    workers: int = 1,
    *,
    cores: int | None = None,
    available_mib: int | None = None,
) -> int:
    """A pool size for one of ``workers`` processes (pytest-xdist's) on this host: a spare
    per core each (refills then keep up with one test per core), at most 4, and room in
    half of the host's available memory for each VM handed out; 0 where there is none."""
    cores = cores or os.cpu_count() or 1
    available = mem_available_mib() if available_mib is None else available_mib
    ram = template.spec.memory
    assert isinstance(ram, int)
    by_memory = available // 2 // (ram + OVERHEAD_MIB) // max(1, workers)
    return max(0, min(max(1, cores // max(1, workers)), 4, by_memory))


class AsyncPool:
    """``size`` warm, paused clones of ``template``, handed out by `acquire`.

    ``async with AsyncPool(t, size=2) as pool: vm = await pool.acquire()``.
    ``template`` is a `Template` or its name (in ``directory``). A missing or stale
    template is a `TemplateError` and a size the host's memory cannot hold a `PoolError`,
    both before any QEMU starts. ``warm`` are the commands run in each spare before it is
    paused; ``refills`` how many spares are made at once; ``nice`` the CPU priority of a
    spare's QEMU until its hand-out (0 for none; only root can give it back, so others
    get none).
    """

    def __init__(
        self,
        template: Template | str,
        size: int = 2,
        *,
        directory: str | os.PathLike[str] | None = None,
        image_cache: Path | None = None,
        warm: Sequence[Sequence[str]] = WARM,
        refills: int = 1,
        nice: int = REFILL_NICE,
    ) -> None:
        if size < 1:
            raise PoolError(f"size: a pool holds at least one spare, not {size}", size=size)
        if refills < 1:
            raise PoolError(f"refills: at least one at a time, not {refills}", size=size)
        self.template = templates.get(template, directory=directory)
        self.size = size
        self._image_cache = image_cache
        self._warm = [list(c) for c in warm]
        self._slots = asyncio.Semaphore(refills)
        self._nice = nice if os.geteuid() == 0 else 0
        self._spares: list[AsyncVM] = []  # warm and paused, oldest first
        self._refilling: set[asyncio.Task[None]] = set()
        self._handed_out: list[AsyncVM] = []
        self._error: BaseException | None = None  # the last refill's failure, for acquire
        self._changed = asyncio.Event()
        self._state = "new"  # new -> open -> closed

    def __repr__(self) -> str:
        return (
            f"<AsyncPool {self.template.name!r} {self._state} ready={len(self._spares)}/"
            f"{self.size} refilling={len(self._refilling)}>"
        )

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def ready(self) -> int:
        """How many spares wait, warm, for `acquire` now."""
        return sum(1 for vm in self._spares if vm.state is VMState.PAUSED)

    @property
    def spare_pids(self) -> tuple[int, ...]:
        """The QEMU processes of the spares waiting now (to watch what they cost)."""
        return tuple(vm.pid for vm in self._spares if vm.pid is not None)

    async def open(self, *, wait: bool = False) -> None:
        """Check the template and the host's memory, and start filling the pool (with
        ``wait``, return once it is full)."""
        if self._state != "new":
            raise PoolError("this pool was opened before; make a new one", size=self.size)
        self.template.check(self.template.spec, image_cache=self._image_cache)
        check_memory(self.template, self.size)
        self._state = "open"
        self._top_up()
        while wait and self.ready < self.size:
            await self._wait_change(None)

    async def acquire(self, timeout: float | None = 60.0) -> AsyncVM:
        """A running clone of the template, ready and its own (its clock set, its random
        generator reseeded). Waits for a spare if none is ready, up to ``timeout``
        seconds (`PyqvmTimeoutError`); a failed refill's error is raised here."""
        self._require_open("acquire")
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while True:
            vm = await self._take(end)
            self._top_up()
            try:
                await vm.resume()
                _renice(vm, 0)
                await templates.make_own(vm.machine)
            except PyqvmError as e:  # it died while idle, or waking it failed
                log.warning("%s: a spare of the pool failed at its hand-out: %s", vm.name, e)
                await _discard(vm)
                continue
            # Only what may still run is kept: a long session hands out thousands.
            self._handed_out = [v for v in self._handed_out if v.state not in _ENDED]
            self._handed_out.append(vm)
            log.info("%s: handed out by the pool of %s", vm.name, self.template.name)
            return vm

    async def close(self) -> None:
        """Stop the refills, the spares and the VMs this pool handed out that still run."""
        if self._state == "closed":
            return
        self._state = "closed"
        for task in self._refilling:
            task.cancel()
        await asyncio.gather(*self._refilling, return_exceptions=True)
        vms, self._spares = self._spares, []
        vms += [vm for vm in self._handed_out if vm.state not in _ENDED]
        self._handed_out.clear()
        results = await asyncio.gather(*(vm.stop() for vm in vms), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    # --- inside ------------------------------------------------------------------------------

    def _require_open(self, what: str) -> None:
        if self._state != "open":
            raise PoolError(
                f"{what}: the pool of template {self.template.name!r} is {self._state}"
                + (" (use it in 'async with', or call open())" if self._state == "new" else ""),
                size=self.size,
            )

    async def _take(self, end: float | None) -> AsyncVM:
        """The oldest live spare, waiting for one; a dead one is cleaned up and replaced."""
        while True:
            self._require_open("acquire")
            while self._spares:
                vm = self._spares.pop(0)
                if vm.state is VMState.PAUSED:
                    return vm
                log.warning("%s: a spare of the pool died while idle; replacing it", vm.name)
                await _discard(vm)
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            self._top_up()
            await self._wait_change(end)

    async def _wait_change(self, end: float | None) -> None:
        self._changed.clear()
        left = None if end is None else end - asyncio.get_running_loop().time()
        if left is not None and left <= 0:
            raise PyqvmTimeoutError(
                f"no spare of template {self.template.name!r} was ready in time "
                f"({len(self._refilling)} refilling)"
            )
        with contextlib.suppress(TimeoutError):  # the callers' loops say it
            await asyncio.wait_for(self._changed.wait(), left)

    def _top_up(self) -> None:
        """Start refills until spares and refills make ``size``."""
        if self._state != "open":
            return
        for _ in range(self.size - self.ready - len(self._refilling)):
            task = asyncio.ensure_future(self._refill())
            self._refilling.add(task)
            task.add_done_callback(self._refilled)

    def _refilled(self, task: asyncio.Task[None]) -> None:
        self._refilling.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self._error = error
        self._changed.set()

    async def _refill(self) -> None:
        async with self._slots:
            vm = AsyncVM(self.template.clone_spec(), image_cache=self._image_cache)
            try:
                await templates.restore_clone(vm.machine, self.template)
                _renice(vm, self._nice)
                for command in self._warm:
                    await vm.run(command, check=True)
                await vm.pause()
            except BaseException:
                await asyncio.shield(_discard(vm))
                raise
        if self._state != "open":
            await vm.stop()
            return
        self._spares.append(vm)


_ENDED = frozenset({VMState.CREATED, VMState.STOPPED})


async def _discard(vm: AsyncVM) -> None:
    """End a spare that will never be handed out, whatever its state."""
    with contextlib.suppress(PyqvmError, OSError):
        await vm.kill()


def _renice(vm: AsyncVM, nice: int) -> None:
    """Set the CPU priority of every thread of ``vm``'s QEMU (Linux's nice is per thread,
    and QEMU's vCPU and I/O threads are where the time goes)."""
    pid = vm.machine.pid
    if pid is None:
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread that just ended; or no right to
            os.setpriority(os.PRIO_PROCESS, tid, nice)


class Pool:
    r"""The blocking twin of `AsyncPool`: ``with Pool(t, size=2) as pool: vm =
    pool.acquire()``, the same arguments. It runs on an event loop in a thread of its
    own, so refills go on while the caller does other things; the `VM`\\ s it hands out
    are driven on that loop and usable from any one thread at a time."""

    def __init__(
        self,
        template: Template | str,
        size: int = 2,
        *,
        directory: str | os.PathLike[str] | None = None,
        image_cache: Path | None = None,
        warm: Sequence[Sequence[str]] = WARM,
        refills: int = 1,
        nice: int = REFILL_NICE,
    ) -> None:
        t = templates.get(template, directory=directory)
        self._loop = BackgroundLoop(f"pyqvm-pool-{t.name}")
        try:
            # asyncio's primitives bind to a loop at first use: the pool's thread's, here.
            self._pool = AsyncPool(
                t, size, image_cache=image_cache, warm=warm, refills=refills, nice=nice
            )
        except BaseException:
            self._loop.close()
            raise
        self.template = self._pool.template
        self.size = size

    def __repr__(self) -> str:
        return repr(self._pool).replace("<AsyncPool", "<Pool", 1)

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def ready(self) -> int:
        """How many spares wait, warm, for `acquire` now."""
        return self._pool.ready

    @property
    def spare_pids(self) -> tuple[int, ...]:
        """The QEMU processes of the spares waiting now (to watch what they cost)."""
        return self._pool.spare_pids

    def open(self, *, wait: bool = False) -> None:
        """`AsyncPool.open`."""
        self._loop.run(self._pool.open(wait=wait))

    def acquire(self, timeout: float | None = 60.0) -> VM:
        """`AsyncPool.acquire`, as a blocking `VM`."""
        return VM._driving(self._loop.run(self._pool.acquire(timeout)), self._loop)

    def close(self) -> None:
        """`AsyncPool.close`, then the pool's thread ends."""
        if self._loop.closed:
            return
        try:
            self._loop.run(self._pool.close())
        finally:
            self._loop.close()


__all__ = ["WARM", "AsyncPool", "Pool", "auto_size", "check_memory", "mem_available_mib"]
