"""`VM`: the synchronous face of `AsyncVM`, for scripts.

It owns a private event loop (`asyncio.Runner`) and forwards each call to the
async core; it holds no logic of its own. Use it from one thread, outside any
running event loop (inside one, use `AsyncVM`). QEMU children stay alive
between calls even though the loop is idle: pyqvm forks them from a
long-lived spawner thread, so their death signal is tied to the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from qemu.qmp import EventListener

from pyqvm.agent import ExecResult
from pyqvm.errors import PyqvmTimeoutError
from pyqvm.host.facts import HostFacts
from pyqvm.ops.blockjobs import ChainLink
from pyqvm.ops.snapshot import SnapshotInfo
from pyqvm.session import Event, EventFilter
from pyqvm.spec import Disk, Network, VMSpec
from pyqvm.vm import AsyncVM, VMState

if TYPE_CHECKING:
    from pyqvm.ops.migration import MigrationStats, MigrationTuning, ProgressCallback, SavedState


class SyncEvents:
    """Blocking view of an event listener: ``get(timeout)`` returns the next event."""

    def __init__(self, runner: asyncio.Runner, listener: EventListener) -> None:
        self._runner = runner
        self._listener = listener

    def get(self, timeout: float) -> Event:
        try:
            event: Event = self._runner.run(asyncio.wait_for(self._listener.get(), timeout))
        except TimeoutError:
            raise PyqvmTimeoutError(f"no event within {timeout:g} s") from None
        return event


class VM:
    """Synchronous `AsyncVM`: same methods, blocking."""

    def __init__(
        self, spec: VMSpec, *, host: HostFacts | None = None, image_cache: Path | None = None
    ) -> None:
        self._runner = asyncio.Runner()
        self._vm = AsyncVM(spec, host=host, image_cache=image_cache)
        self.spec = spec

    def _run(self, coro: Any) -> Any:
        return self._runner.run(coro)

    def __enter__(self) -> VM:
        try:
            self.start()
        except BaseException:
            self._runner.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            self._runner.close()

    # properties mirror AsyncVM's
    @property
    def state(self) -> VMState:
        return self._vm.state

    @property
    def name(self) -> str:
        return self._vm.name

    @property
    def argv(self) -> list[str]:
        return self._vm.argv

    @property
    def pid(self) -> int | None:
        return self._vm.pid

    @property
    def accelerator(self) -> str | None:
        return self._vm.accelerator

    @property
    def runtime_dir(self) -> Path | None:
        return self._vm.runtime_dir

    @property
    def resolved_spec(self) -> VMSpec:
        return self._vm.resolved_spec

    @property
    def boot_seconds(self) -> float | None:
        return self._vm.boot_seconds

    def start(self) -> None:
        self._run(self._vm.start())

    def stop(self, timeout: float = 10.0, *, graceful: bool | None = None) -> int | None:
        result: int | None = self._run(self._vm.stop(timeout, graceful=graceful))
        return result

    def kill(self) -> None:
        self._run(self._vm.kill())

    def wait(self, timeout: float | None = None) -> int:
        code: int = self._run(self._vm.wait(timeout))
        return code

    def console_text(self) -> str:
        return self._vm.console_text()

    def read_console(self, offset: int = 0) -> bytes:
        return self._vm.read_console(offset)

    def wait_for_console(self, pattern: str, timeout: float) -> None:
        self._run(self._vm.wait_for_console(pattern, timeout))

    def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float = 60.0
    ) -> Any:
        return self._run(self._vm.execute(command, arguments, timeout=timeout))

    @contextmanager
    def events(
        self, names: str | Iterable[str] = (), match: EventFilter | None = None
    ) -> Iterator[SyncEvents]:
        cm = self._vm.events(names, match)
        listener = self._run(cm.__aenter__())
        try:
            yield SyncEvents(self._runner, listener)
        finally:
            self._run(cm.__aexit__(None, None, None))

    # operations: see the AsyncVM methods of the same names
    def snapshot_save(
        self, tag: str, *, overwrite: bool = False, timeout: float | None = 600.0
    ) -> SnapshotInfo:
        info: SnapshotInfo = self._run(
            self._vm.snapshot_save(tag, overwrite=overwrite, timeout=timeout)
        )
        return info

    def snapshot_load(self, tag: str, *, timeout: float | None = 600.0) -> None:
        self._run(self._vm.snapshot_load(tag, timeout=timeout))

    def snapshot_delete(self, tag: str, *, timeout: float | None = 600.0) -> None:
        self._run(self._vm.snapshot_delete(tag, timeout=timeout))

    def snapshot_list(self) -> list[SnapshotInfo]:
        infos: list[SnapshotInfo] = self._run(self._vm.snapshot_list())
        return infos

    def disk_snapshot(self, disk: str, path: Path | str | None = None) -> Path:
        overlay: Path = self._run(self._vm.disk_snapshot(disk, path))
        return overlay

    def disk_commit(self, disk: str, *, timeout: float | None = 600.0) -> None:
        self._run(self._vm.disk_commit(disk, timeout=timeout))

    def disk_chain(self, disk: str) -> list[ChainLink]:
        links: list[ChainLink] = self._run(self._vm.disk_chain(disk))
        return links

    def hotplug_disk(self, disk: Disk) -> str:
        ident: str = self._run(self._vm.hotplug_disk(disk))
        return ident

    def hotplug_nic(self, net: Network | None = None) -> str:
        ident: str = self._run(self._vm.hotplug_nic(net))
        return ident

    def hotplug_cpu(self, id: str = "") -> str:
        ident: str = self._run(self._vm.hotplug_cpu(id))
        return ident

    def hotplug_memory(self, size: int | str, id: str = "") -> str:
        ident: str = self._run(self._vm.hotplug_memory(size, id))
        return ident

    def unplug(self, device: str, *, timeout: float = 30.0) -> None:
        self._run(self._vm.unplug(device, timeout=timeout))

    def pause(self) -> None:
        self._run(self._vm.pause())

    def resume(self) -> None:
        self._run(self._vm.resume())

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        check: bool = False,
    ) -> ExecResult:
        result: ExecResult = self._run(
            self._vm.run(argv, input=input, env=env, timeout=timeout, check=check)
        )
        return result

    def read_file(self, path: str) -> bytes:
        data: bytes = self._run(self._vm.read_file(path))
        return data

    def write_file(self, path: str, data: bytes) -> None:
        self._run(self._vm.write_file(path, data))

    def start_incoming(
        self, *, overlays: Mapping[str, Path] | None = None, without_forwards: bool = False
    ) -> None:
        self._run(self._vm.start_incoming(overlays=overlays, without_forwards=without_forwards))

    def migrate(
        self,
        dst: VM,
        *,
        transport: Literal["unix", "tcp"] = "unix",
        address: str | None = None,
        storage: Literal["shared", "copied"] = "shared",
        tuning: MigrationTuning | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = 600.0,
    ) -> MigrationStats:
        from pyqvm.ops.migration import migrate_between_loops

        return migrate_between_loops(
            self._run,
            dst._run,
            self._vm,
            dst._vm,
            transport=transport,
            address=address,
            storage=storage,
            tuning=tuning,
            progress=progress,
            timeout=timeout,
        )

    def save(
        self,
        directory: Path | str,
        *,
        resume: bool = False,
        progress: ProgressCallback | None = None,
        timeout: float | None = 600.0,
    ) -> SavedState:
        saved: SavedState = self._run(
            self._vm.save(directory, resume=resume, progress=progress, timeout=timeout)
        )
        return saved

    def restore(self, directory: Path | str, *, timeout: float | None = 600.0) -> None:
        self._run(self._vm.restore(directory, timeout=timeout))
