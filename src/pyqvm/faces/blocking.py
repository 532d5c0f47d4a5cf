"""What the blocking `VM` does its own way; its methods are derived (`pyqvm.faces.derived_vm`).

Every method of `VM` runs the `AsyncVM` method of the same name, and nothing else, on
its thread's event loop (`pyqvm.faces.loop`). Use a VM from the thread that made it,
outside any running event loop (inside one, use `AsyncVM`). This base holds the rest:
the constructor, ``with``, `events` as a blocking context manager, `from_template`, and
the check that two VMs given to one operation share a loop.
"""

from __future__ import annotations

import os
from collections.abc import Coroutine, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from pyqvm.channels.qmp import EventFilter
from pyqvm.errors import PyqvmError
from pyqvm.faces.loop import Loop, SyncEvents, ThreadLoop
from pyqvm.host.facts import HostFacts
from pyqvm.launch.passthrough import PassthroughHost
from pyqvm.ops import template as templates
from pyqvm.ops.template import Template
from pyqvm.spec import VMSpec
from pyqvm.state import VMState
from pyqvm.vm import AsyncVM

_T = TypeVar("_T")


class BlockingVMBase:
    """The part of `VM` that is not one `AsyncVM` method run on the thread's loop."""

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
        self._loop: Loop = ThreadLoop.current()
        self._loop.adopt(self._vm)

    @classmethod
    def _driving(cls, vm: AsyncVM, loop: Loop) -> Self:
        """The blocking face of ``vm``, which runs on ``loop`` (a pool's VMs)."""
        face = cls.__new__(cls)
        face._vm = vm
        face._loop = loop
        loop.adopt(vm)
        return face

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self._loop.run(coro)

    def _unwrap(self, other: BlockingVMBase) -> AsyncVM:
        """``other``'s AsyncVM, for an operation on two VMs (they must share a loop)."""
        if other._loop is not self._loop:
            raise PyqvmError(
                f"VM {other._vm.name!r} was made in another thread than {self._vm.name!r}; "
                "use VMs of one thread together (they share its event loop)"
            )
        return other._vm

    def __repr__(self) -> str:
        return f"<VM {self._vm.name!r} {self._vm.state.value}>"

    def __enter__(self) -> Self:
        """Start the VM unless it was started already (``with VM.from_template(t) as
        vm``); it is stopped on leaving the block."""
        if self._vm.state is VMState.CREATED:
            self._run(self._vm.start())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._run(self._vm.stop())

    @classmethod
    def from_template(
        cls,
        template: Template | str,
        *,
        name: str | None = None,
        directory: str | os.PathLike[str] | None = None,
        image_cache: Path | None = None,
    ) -> Self:
        """A running clone of ``template`` (a `Template` or its name); see
        `AsyncVM.start_from_template`."""
        t = templates.get(template, directory=directory)
        vm = cls(t.clone_spec(name), image_cache=image_cache)
        vm._run(vm._vm.start_from_template(t))
        return vm

    @contextmanager
    def events(
        self, names: str | Iterable[str] = (), match: EventFilter | None = None
    ) -> Iterator[SyncEvents]:
        """Listen for QMP events while the block runs (``events.get(timeout)``).

        ``match`` is a predicate on the event, or a mapping its ``data`` must contain.
        """
        cm = self._vm.events(names, match)
        listener = self._run(cm.__aenter__())
        try:
            yield SyncEvents(self._loop, listener)
        finally:
            self._run(cm.__aexit__(None, None, None))


class BlockingGroup:
    """A group of `VM`'s operations (``vm.console``): its `AsyncVM` group's methods, run
    on the VM's loop."""

    def __init__(self, group: Any, loop: Loop) -> None:
        self._vm = group
        self._loop = loop

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self._loop.run(coro)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._vm.name!r}>"


__all__ = ["BlockingGroup", "BlockingVMBase"]
