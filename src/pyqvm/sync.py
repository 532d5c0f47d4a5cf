"""`VM`: the blocking face of `AsyncVM`, for scripts.

Every method runs the `AsyncVM` method of the same name, and nothing else,
on one event loop per thread, shared by all `VM`\\ s made in that thread (so
two VMs of one thread can work together: ``src.migrate(dst)`` is
`AsyncVM.migrate` run on that loop). Use a VM from the thread that made it,
outside any running event loop (inside one, use `AsyncVM`). The loop is
closed whenever no VM of its thread holds a running QEMU, and made anew when
one is needed again. QEMU children stay alive between calls even though the
loop is idle: pyqvm forks them from a long-lived spawner thread, so their
death signal is tied to the process.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import EventListener

from pyqvm.agent import ExecResult
from pyqvm.devices import Plugged
from pyqvm.errors import PyqvmError, PyqvmTimeoutError
from pyqvm.host.facts import HostFacts
from pyqvm.ops import template as templates
from pyqvm.ops.blockjobs import ChainLink
from pyqvm.ops.migration import (
    Incoming,
    MigrationStats,
    MigrationTLS,
    MigrationTuning,
    ProgressCallback,
    SavedState,
    Storage,
    Transport,
)
from pyqvm.ops.snapshot import SnapshotInfo
from pyqvm.ops.template import Template
from pyqvm.passthrough import PassthroughHost
from pyqvm.privnet import Membership
from pyqvm.session import Event, EventFilter
from pyqvm.spec import Disk, Network, VMSpec
from pyqvm.state import VMState
from pyqvm.vm import AsyncVM

_T = TypeVar("_T")

#: States in which a VM holds nothing on the loop (no QEMU, no QMP connection).
_IDLE = frozenset({VMState.CREATED, VMState.STOPPED, VMState.FAILED})


class ThreadLoop:
    """The event loop of one thread, shared by the `VM`\\ s made in it."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self._runner: asyncio.Runner | None = None
        self._vms: weakref.WeakSet[AsyncVM] = weakref.WeakSet()

    @classmethod
    def current(cls) -> ThreadLoop:
        """This thread's loop (made on first use)."""
        loop: ThreadLoop | None = getattr(_local, "loop", None)
        if loop is None:
            loop = _local.loop = cls()
        return loop

    def adopt(self, vm: AsyncVM) -> None:
        self._vms.add(vm)

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` to its end on this loop (from this loop's thread only)."""
        if threading.get_ident() != self.thread:
            coro.close()
            raise PyqvmError(
                "a pyqvm.VM is used from another thread than the one that made it; "
                "make one VM per thread (or use AsyncVM on one event loop)"
            )
        if self._runner is None:
            self._runner = asyncio.Runner()
        try:
            return self._runner.run(coro)
        finally:
            if all(vm.state in _IDLE for vm in self._vms):
                self.close()

    def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            runner.close()


_local = threading.local()


class SyncEvents:
    """Blocking view of an event listener: ``get(timeout)`` returns the next event."""

    def __init__(self, loop: ThreadLoop, listener: EventListener) -> None:
        self._loop = loop
        self._listener = listener

    def get(self, timeout: float) -> Event:
        try:
            event: Event = self._loop.run(asyncio.wait_for(self._listener.get(), timeout))
        except TimeoutError:
            raise PyqvmTimeoutError(f"no event within {timeout:g} s") from None
        return event


class VM:
    """Blocking `AsyncVM`: the same constructor, properties and methods."""

    def __init__(
        self,
        spec: VMSpec,
        *,
        host: HostFacts | None = None,
        image_cache: Path | None = None,
        passthrough_host: PassthroughHost | None = None,
    ) -> None:
        self._vm = AsyncVM(
            spec, host=host, image_cache=image_cache, passthrough_host=passthrough_host
        )
        self._loop = ThreadLoop.current()
        self._loop.adopt(self._vm)

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self._loop.run(coro)

    def __repr__(self) -> str:
        return f"<VM {self.name!r} {self.state.value}>"

    def __enter__(self) -> VM:
        """Start the VM unless it was started already (``with VM.from_template(t) as
        vm``); it is stopped on leaving the block."""
        if self.state is VMState.CREATED:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # properties: AsyncVM's
    @property
    def spec(self) -> VMSpec:
        return self._vm.spec

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
    def private_networks(self) -> dict[str, Membership]:
        return self._vm.private_networks

    @property
    def resolved_spec(self) -> VMSpec:
        return self._vm.resolved_spec

    @property
    def boot_seconds(self) -> float | None:
        return self._vm.boot_seconds

    @property
    def plugged(self) -> dict[str, Plugged]:
        return self._vm.plugged

    # methods: AsyncVM's of the same name, run on the thread's loop
    def start(self) -> None:
        self._run(self._vm.start())

    @classmethod
    def from_template(
        cls,
        template: Template | str,
        *,
        name: str | None = None,
        directory: str | os.PathLike[str] | None = None,
        image_cache: Path | None = None,
    ) -> VM:
        t = templates.get(template, directory=directory)
        vm = cls(t.clone_spec(name), image_cache=image_cache)
        vm.start_from_template(t)
        return vm

    def start_from_template(self, template: Template) -> None:
        self._run(self._vm.start_from_template(template))

    def start_incoming(
        self, *, overlays: Mapping[str, Path] | None = None, without_forwards: bool = False
    ) -> None:
        self._run(self._vm.start_incoming(overlays=overlays, without_forwards=without_forwards))

    def stop(self, timeout: float = 10.0, *, graceful: bool | None = None) -> int | None:
        return self._run(self._vm.stop(timeout, graceful=graceful))

    def kill(self) -> None:
        self._run(self._vm.kill())

    def wait(self, timeout: float | None = None) -> int:
        return self._run(self._vm.wait(timeout))

    def pause(self) -> None:
        self._run(self._vm.pause())

    def resume(self) -> None:
        self._run(self._vm.resume())

    def console_text(self) -> str:
        return self._vm.console_text()

    def read_console(self, offset: int = 0) -> bytes:
        return self._vm.read_console(offset)

    def qmp_transcript(self) -> list[str]:
        return self._vm.qmp_transcript()

    def ssh_argv(self, command: Sequence[str] = ()) -> list[str]:
        return self._run(self._vm.ssh_argv(command))

    def gdb_target(self) -> str:
        return self._vm.gdb_target()

    def gdb_argv(
        self, *, vmlinux: Path | None = None, commands: Sequence[str] = (), batch: bool = False
    ) -> list[str]:
        return self._vm.gdb_argv(vmlinux=vmlinux, commands=commands, batch=batch)

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
            yield SyncEvents(self._loop, listener)
        finally:
            self._run(cm.__aexit__(None, None, None))

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        check: bool = False,
    ) -> ExecResult:
        return self._run(self._vm.run(argv, input=input, env=env, timeout=timeout, check=check))

    def read_file(self, path: str, *, timeout: float = 30.0) -> bytes:
        return self._run(self._vm.read_file(path, timeout=timeout))

    def write_file(self, path: str, data: bytes, *, timeout: float = 30.0) -> None:
        self._run(self._vm.write_file(path, data, timeout=timeout))

    def snapshot_save(
        self, tag: str, *, overwrite: bool = False, timeout: float | None = 600.0
    ) -> SnapshotInfo:
        return self._run(self._vm.snapshot_save(tag, overwrite=overwrite, timeout=timeout))

    def snapshot_load(self, tag: str, *, timeout: float | None = 600.0) -> None:
        self._run(self._vm.snapshot_load(tag, timeout=timeout))

    def snapshot_delete(self, tag: str, *, timeout: float | None = 600.0) -> None:
        self._run(self._vm.snapshot_delete(tag, timeout=timeout))

    def snapshot_list(self) -> list[SnapshotInfo]:
        return self._run(self._vm.snapshot_list())

    def disk_snapshot(self, disk: str, path: Path | str | None = None) -> Path:
        return self._run(self._vm.disk_snapshot(disk, path))

    def disk_commit(self, disk: str, *, timeout: float | None = 600.0) -> None:
        self._run(self._vm.disk_commit(disk, timeout=timeout))

    def disk_chain(self, disk: str) -> list[ChainLink]:
        return self._run(self._vm.disk_chain(disk))

    def hotplug_disk(self, disk: Disk) -> str:
        return self._run(self._vm.hotplug_disk(disk))

    def hotplug_nic(self, net: Network | None = None) -> str:
        return self._run(self._vm.hotplug_nic(net))

    def hotplug_cpu(self, id: str = "") -> str:
        return self._run(self._vm.hotplug_cpu(id))

    def hotplug_memory(self, size: int | str, id: str = "") -> str:
        return self._run(self._vm.hotplug_memory(size, id))

    def unplug(self, device: str, *, timeout: float = 30.0) -> None:
        self._run(self._vm.unplug(device, timeout=timeout))

    def migrate(
        self,
        dst: VM,
        *,
        transport: Transport = "unix",
        address: str | None = None,
        storage: Storage = "shared",
        tuning: MigrationTuning | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = 600.0,
        tls: MigrationTLS | None = None,
        insecure: bool = False,
    ) -> MigrationStats:
        if dst._loop is not self._loop:
            raise PyqvmError(
                f"VM {dst.name!r} was made in another thread than {self.name!r}; "
                "migrate between VMs of one thread (they share its event loop)"
            )
        return self._run(
            self._vm.migrate(
                dst._vm,
                transport=transport,
                address=address,
                storage=storage,
                tuning=tuning,
                progress=progress,
                timeout=timeout,
                tls=tls,
                insecure=insecure,
            )
        )

    def listen(
        self,
        *,
        transport: Transport = "unix",
        address: str | None = None,
        storage: Storage = "shared",
        tuning: MigrationTuning | None = None,
        overlays: Mapping[str, Path] | None = None,
        devices: Mapping[str, Plugged] | None = None,
        without_forwards: bool = False,
        tls: MigrationTLS | None = None,
        insecure: bool = False,
    ) -> Incoming:
        return self._run(
            self._vm.listen(
                transport=transport,
                address=address,
                storage=storage,
                tuning=tuning,
                overlays=overlays,
                devices=devices,
                without_forwards=without_forwards,
                tls=tls,
                insecure=insecure,
            )
        )

    def send(
        self,
        target: Incoming | str,
        *,
        storage: Storage | None = None,
        nbd: str | None = None,
        tuning: MigrationTuning | None = None,
        progress: ProgressCallback | None = None,
        progress_interval: float = 0.5,
        timeout: float | None = 600.0,
        stop_source: bool = True,
        tls: MigrationTLS | None = None,
        insecure: bool = False,
    ) -> MigrationStats:
        return self._run(
            self._vm.send(
                target,
                storage=storage,
                nbd=nbd,
                tuning=tuning,
                progress=progress,
                progress_interval=progress_interval,
                timeout=timeout,
                stop_source=stop_source,
                tls=tls,
                insecure=insecure,
            )
        )

    def accept(self, incoming: Incoming, *, timeout: float | None = 600.0) -> None:
        self._run(self._vm.accept(incoming, timeout=timeout))

    def save(
        self,
        directory: Path | str,
        *,
        resume: bool = False,
        progress: ProgressCallback | None = None,
        timeout: float | None = 600.0,
    ) -> SavedState:
        return self._run(
            self._vm.save(directory, resume=resume, progress=progress, timeout=timeout)
        )

    def restore(self, directory: Path | str, *, timeout: float | None = 600.0) -> None:
        self._run(self._vm.restore(directory, timeout=timeout))


__all__ = ["VM", "SyncEvents", "ThreadLoop"]
