"""The event loops the blocking faces (`VM`, `NamedVM`) run their calls on.

`ThreadLoop`: one per thread, running only during a call.

Every `VM` made in a thread runs on that thread's loop, so two VMs of one thread can work
together (``src.migrate(dst)`` is `AsyncVM.migrate` run on that loop). The loop is closed
whenever no VM of its thread holds a running QEMU, and made anew when one is needed again.
QEMU children stay alive between calls even though the loop is idle: pyqvm forks them
from a long-lived spawner thread, so their death signal is tied to the process.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from qemu.qmp import EventListener

from pyqvm.channels.qmp import Event
from pyqvm.errors import PyqvmError, PyqvmTimeoutError, VMStateError
from pyqvm.state import VMState

if TYPE_CHECKING:  # the blocking named face runs here too, and needs no AsyncVM
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


class BackgroundLoop:
    r"""An event loop that runs on a thread of its own, between calls too: a blocking
    `Pool` refills there while the caller's thread does other things, and the `VM`\ s it
    hands out are driven there (each call waits for its coroutine, from any thread)."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def adopt(self, vm: AsyncVM) -> None:
        """Nothing to keep: this loop runs until `close`, whatever its VMs do."""

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the loop's thread and wait for its end here."""
        if self.closed or not self._thread.is_alive():
            coro.close()
            raise VMStateError("the pool that made this VM is closed")
        if threading.get_ident() == self._thread.ident:
            coro.close()
            raise PyqvmError("a blocking pyqvm call from inside its pool's own loop")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C here ends the coroutine there too
            raise

    @property
    def closed(self) -> bool:
        return self._loop.is_closed()

    def close(self) -> None:
        """Stop the loop and its thread (after the VMs on it were stopped)."""
        if self.closed:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


#: What a blocking face runs its calls on.
Loop = ThreadLoop | BackgroundLoop


class SyncEvents:
    """Blocking view of an event listener: ``get(timeout)`` returns the next event."""

    def __init__(self, loop: Loop, listener: EventListener) -> None:
        self._loop = loop
        self._listener = listener

    def get(self, timeout: float) -> Event:
        try:
            event: Event = self._loop.run(asyncio.wait_for(self._listener.get(), timeout))
        except TimeoutError:
            raise PyqvmTimeoutError(f"no event within {timeout:g} s") from None
        return event


__all__ = ["BackgroundLoop", "Loop", "SyncEvents", "ThreadLoop"]
