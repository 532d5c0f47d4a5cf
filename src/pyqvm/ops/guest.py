"""Commands and files in a running guest, through its guest agent, or through a shell on
its serial console (``exec_via``: `pyqvm.ops.serialshell`).

Each call also waits on the session's note of QEMU pausing the guest on a disk error
(``BLOCK_IO_ERROR`` with action ``stop``: by default when a disk's host file system is
full), and on the machine's note of a guest panic. Such a guest answers nothing, so the
call fails at once with `GuestPausedError`, naming the disk and its file, or
`GuestPanicError` with the console's tail, instead of running into its timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

from pyqvm.channels.agent import ExecResult
from pyqvm.errors import GuestPausedError, PyqvmError
from pyqvm.machine import Machine
from pyqvm.ops import serialshell
from pyqvm.state import VMState

T = TypeVar("T")


async def run(
    vm: Machine,
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    check: bool = False,
) -> ExecResult:
    """Run ``argv`` in the guest and collect its output; ``check`` raises `GuestExecError`
    when it fails."""
    vm.require(VMState.RUNNING, what="running a guest command")
    if vm.spec.effective_exec_via == "serial":
        call = serialshell.run(vm, argv, input=input, env=env, timeout=timeout)
    else:
        call = vm.agent.exec(argv, input=input, env=env, timeout=timeout)
    result = await _unless_paused(vm, call)
    if check:
        result.check()
    return result


async def read_file(vm: Machine, path: str, *, timeout: float = 30.0) -> bytes:
    """The contents of a file in the guest."""
    vm.require(VMState.RUNNING, what="reading a guest file")
    if vm.spec.effective_exec_via == "serial":
        result = await run(vm, ["cat", "--", path], timeout=timeout, check=True)
        return result.stdout
    return await _unless_paused(vm, vm.agent.read_file(path, timeout=timeout))


async def write_file(vm: Machine, path: str, data: bytes, *, timeout: float = 30.0) -> None:
    """Write ``data`` to a file in the guest (created or replaced)."""
    vm.require(VMState.RUNNING, what="writing a guest file")
    if vm.spec.effective_exec_via == "serial":
        write = ["sh", "-c", 'cat >"$1"', "sh", path]
        await run(vm, write, input=data, timeout=timeout, check=True)
        return
    await _unless_paused(vm, vm.agent.write_file(path, data, timeout=timeout))


async def _unless_paused(vm: Machine, call: Awaitable[T]) -> T:
    """``call``'s result; or, as soon as the guest stops answering, why: `GuestPausedError`
    when QEMU pauses it on an I/O error, `GuestPanicError` when it panics (at once if
    either has happened already: both are noted as they come, so no QMP is needed)."""
    task = asyncio.ensure_future(call)
    qmp = vm.qmp
    stops: list[asyncio.Future[Any]] = [asyncio.ensure_future(vm.guest_panicked())]
    if qmp.io_error_pause is None:
        stops.append(asyncio.ensure_future(qmp.io_error_paused()))
    try:
        await asyncio.wait((task, *stops), return_when=asyncio.FIRST_COMPLETED)
        if task.done() and not task.cancelled() and task.exception() is None:
            return task.result()
        if (panic := vm.guest_panic()) is not None:
            if qmp.guest_panic is not None and vm.state is VMState.RUNNING:
                vm.move(VMState.PAUSED)  # QEMU paused it there (-action panic=pause)
            raise panic
        if qmp.io_error_pause is not None:
            raise await _paused_error(vm) from None
        return await task
    finally:
        for t in (task, *stops):
            t.cancel()
        await asyncio.gather(task, *stops, return_exceptions=True)


async def _paused_error(vm: Machine) -> GuestPausedError:
    """The guest is paused on an I/O error (QEMU answers QMP then): say which disk and file."""
    vm.move(VMState.PAUSED)
    try:
        blocks = await vm.execute("query-block", timeout=5)
    except PyqvmError:
        blocks = []
    return paused_error(vm.name, blocks, vm.qmp.io_error_pause)


def paused_error(
    name: str, blocks: Sequence[Any], event: Mapping[str, Any] | None = None
) -> GuestPausedError:
    """A `GuestPausedError` from ``query-block`` and, when there was one, the
    ``BLOCK_IO_ERROR`` event's data (without it, the first disk whose ``io-status`` is
    not ``ok`` is named)."""
    event = event or {}
    node, device = str(event.get("node-name") or ""), str(event.get("device") or "")
    io_status = "nospace" if event.get("nospace") else "failed"
    file = None
    for b in blocks:
        inserted = b.get("inserted") or {}
        if node or device:
            ours = (node and inserted.get("node-name") == node) or (
                device and b.get("device") == device
            )
        else:
            ours = b.get("io-status", "ok") != "ok"
        if ours:
            file = inserted.get("file")
            node = node or str(inserted.get("node-name") or b.get("qdev") or "")
            io_status = str(b.get("io-status") or io_status)
            break
    nospace = bool(event.get("nospace", io_status == "nospace"))
    reason = event.get("reason") or ("No space left on device" if nospace else "I/O error")
    return GuestPausedError(
        name,
        disk=node or device,
        file=file,
        operation=str(event.get("operation", "")),
        reason=str(reason),
        nospace=nospace,
    )


__all__ = ["paused_error", "read_file", "run", "write_file"]
