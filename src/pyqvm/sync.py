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
from typing import Any

from qemu.qmp import EventListener

from pyqvm.agent import ExecResult
from pyqvm.errors import PyqvmTimeoutError
from pyqvm.host.facts import HostFacts
from pyqvm.session import Event, EventMatch
from pyqvm.spec import VMSpec
from pyqvm.vm import AsyncVM, VMState


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
        self, names: str | Iterable[str] = (), match: EventMatch | None = None
    ) -> Iterator[SyncEvents]:
        cm = self._vm.events(names, match)
        listener = self._run(cm.__aenter__())
        try:
            yield SyncEvents(self._runner, listener)
        finally:
            self._run(cm.__aexit__(None, None, None))

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
