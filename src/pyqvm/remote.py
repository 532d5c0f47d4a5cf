"""`NamedVM`: the blocking face of `pyqvm.named.client.AsyncNamedVM`; `attach` and `up`.

Each call connects to the VM's owner, runs, and hangs up, on this thread's
event loop (`pyqvm.sync.ThreadLoop`): a `NamedVM` holds no connection between
calls, so it is as cheap to keep as a name, and a VM that another process
stopped meanwhile is reported by the next call (`NamedVMError`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pyqvm.agent import ExecResult
from pyqvm.named import registry
from pyqvm.named.client import CONNECT_TIMEOUT, AsyncNamedVM
from pyqvm.named.registry import Record
from pyqvm.spec import Disk, VMSpec
from pyqvm.sync import ThreadLoop

_T = TypeVar("_T")


class NamedVM:
    """A named VM (``pyqvm up``), driven from blocking code; see `AsyncNamedVM`."""

    def __init__(self, name: str, *, timeout: float = CONNECT_TIMEOUT) -> None:
        self.name = name
        self.timeout = timeout
        self._loop = ThreadLoop.current()

    def __repr__(self) -> str:
        return f"<NamedVM {self.name!r}>"

    def _do(self, fn: Callable[[AsyncNamedVM], Awaitable[_T]]) -> _T:
        async def go() -> _T:
            vm = await AsyncNamedVM.attach(self.name, timeout=self.timeout)
            try:
                return await fn(vm)
            finally:
                await vm.close()

        return self._loop.run(go())

    @classmethod
    def up(
        cls,
        spec: VMSpec | None = None,
        *,
        name: str,
        template: str | None = None,
        templates_dir: Path | None = None,
        restore: Path | None = None,
        image_cache: Path | None = None,
        timeout: float = 600.0,
    ) -> NamedVM:
        """Start VM ``name`` in an owner process of its own (see `AsyncNamedVM.up`)."""

        async def go() -> None:
            vm = await AsyncNamedVM.up(
                spec,
                name=name,
                template=template,
                templates_dir=templates_dir,
                restore=restore,
                image_cache=image_cache,
                timeout=timeout,
            )
            await vm.close()

        ThreadLoop.current().run(go())
        return cls(name)

    def info(self) -> dict[str, Any]:
        return self._do(lambda vm: vm.info())

    def record(self) -> Record:
        return self._do(lambda vm: vm.record())

    def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float = 60.0
    ) -> Any:
        return self._do(lambda vm: vm.execute(command, arguments, timeout=timeout))

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        check: bool = False,
    ) -> ExecResult:
        return self._do(lambda vm: vm.run(argv, input=input, env=env, timeout=timeout, check=check))

    def read_file(self, path: str) -> bytes:
        return self._do(lambda vm: vm.read_file(path))

    def write_file(self, path: str, data: bytes) -> None:
        self._do(lambda vm: vm.write_file(path, data))

    def snapshot_save(self, tag: str, *, overwrite: bool = False) -> dict[str, Any]:
        return self._do(lambda vm: vm.snapshot_save(tag, overwrite=overwrite))

    def snapshot_load(self, tag: str) -> None:
        self._do(lambda vm: vm.snapshot_load(tag))

    def snapshot_delete(self, tag: str) -> None:
        self._do(lambda vm: vm.snapshot_delete(tag))

    def snapshot_list(self) -> list[dict[str, Any]]:
        return self._do(lambda vm: vm.snapshot_list())

    def hotplug_disk(self, disk: Disk) -> str:
        return self._do(lambda vm: vm.hotplug_disk(disk))

    def hotplug_nic(self, mac: str | None = None) -> str:
        return self._do(lambda vm: vm.hotplug_nic(mac))

    def hotplug_cpu(self, id: str = "") -> str:
        return self._do(lambda vm: vm.hotplug_cpu(id))

    def hotplug_memory(self, size: int | str, id: str = "") -> str:
        return self._do(lambda vm: vm.hotplug_memory(size, id))

    def unplug(self, device: str, *, timeout: float = 30.0) -> None:
        self._do(lambda vm: vm.unplug(device, timeout=timeout))

    def save(self, directory: Path | str) -> dict[str, Any]:
        return self._do(lambda vm: vm.save(directory))

    def migrate(
        self,
        to: str,
        *,
        transport: str = "unix",
        storage: str = "copied",
        progress: Callable[[dict[str, Any]], None] | None = None,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        """Move the guest into a new named VM ``to``; see `AsyncNamedVM.migrate`."""
        return self._do(
            lambda vm: vm.migrate(
                to, transport=transport, storage=storage, progress=progress, timeout=timeout
            )
        )

    def stop(self, timeout: float = 10.0, *, force: bool = False) -> int | None:
        return self._do(lambda vm: vm.stop(timeout, force=force))

    def wait(self) -> int | None:
        return self._do(lambda vm: vm.wait())


def attach(name: str, *, timeout: float = CONNECT_TIMEOUT) -> NamedVM:
    """The running VM called ``name`` (blocking face); `NamedVMError` if there is none."""
    registry.find(name)
    return NamedVM(name, timeout=timeout)


async def attach_async(name: str, *, timeout: float = CONNECT_TIMEOUT) -> AsyncNamedVM:
    """`AsyncNamedVM.attach`: a connected handle on the running VM called ``name``."""
    return await AsyncNamedVM.attach(name, timeout=timeout)


def up(spec: VMSpec | None = None, *, name: str, template: str | None = None) -> NamedVM:
    """`NamedVM.up` with its common arguments: start VM ``name`` detached."""
    return NamedVM.up(spec, name=name, template=template)


__all__ = ["NamedVM", "attach", "attach_async", "up"]
