"""Commands and files in a running guest, through its guest agent."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pyqvm.agent import ExecResult
from pyqvm.machine import Machine
from pyqvm.state import VMState


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
    result = await vm.agent.exec(argv, input=input, env=env, timeout=timeout)
    if check:
        result.check()
    return result


async def read_file(vm: Machine, path: str, *, timeout: float = 30.0) -> bytes:
    """The contents of a file in the guest."""
    vm.require(VMState.RUNNING, what="reading a guest file")
    return await vm.agent.read_file(path, timeout=timeout)


async def write_file(vm: Machine, path: str, data: bytes, *, timeout: float = 30.0) -> None:
    """Write ``data`` to a file in the guest (created or replaced)."""
    vm.require(VMState.RUNNING, what="writing a guest file")
    await vm.agent.write_file(path, data, timeout=timeout)
