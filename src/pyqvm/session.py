"""A QMP session on `qemu.qmp`: commands with typed errors, and event waits.

All QMP traffic of pyqvm goes through `qemu.qmp.QMPClient`; this module only
maps its errors into pyqvm's family and adds bounded waits on events.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from pyqvm.errors import PyqvmTimeoutError, QMPCommandError, VMExitedError

log = logging.getLogger(__name__)

Event = Mapping[str, Any]
EventMatch = Callable[[Event], bool]


class QMPSession:
    """One QMP connection to a QEMU process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._client = QMPClient(name)

    async def connect(self, sock: socket.socket, timeout: float = 30.0) -> None:
        """Connect over an already connected socket (one end of a socketpair QEMU holds)."""
        try:
            await asyncio.wait_for(self._client.connect(sock), timeout)
        except TimeoutError:
            raise PyqvmTimeoutError(
                f"{self.name}: QEMU sent no QMP greeting in {timeout:g} s"
            ) from None
        except QMPError as e:
            raise VMExitedError(f"{self.name}: QMP connection failed: {e}") from e

    @property
    def connected(self) -> bool:
        return self._client.runstate.name == "RUNNING"

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float | None = 60.0,
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        Raises `QMPCommandError` when QEMU answers with an error, `VMExitedError`
        when the connection ends first, `PyqvmTimeoutError` after ``timeout``.
        """
        log.debug("%s: -> %s %s", self.name, command, arguments or "")
        try:
            result = await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except ExecuteError as e:
            raise QMPCommandError(command, e.error_class, str(e)) from None
        except TimeoutError:
            raise PyqvmTimeoutError(
                f"{self.name}: QMP {command!r} got no reply in {timeout:g} s"
            ) from None
        except (ExecInterruptedError, QMPError) as e:
            raise VMExitedError(f"{self.name}: QEMU went away during QMP {command!r}: {e}") from e
        log.debug("%s: <- %s", self.name, result)
        return result

    @asynccontextmanager
    async def events(
        self, names: str | Iterable[str] = (), match: EventMatch | None = None
    ) -> AsyncIterator[EventListener]:
        """Listen for events while the block runs; ``async for`` over the listener.

        Open the listener *before* issuing the command whose event you await,
        so the event cannot slip past.
        """
        names = (names,) if isinstance(names, str) else tuple(names)
        listener = EventListener(names or None, match)
        with self._client.listen(listener):
            yield listener

    async def next_event(self, listener: EventListener, timeout: float, what: str) -> Event:
        """The next event on ``listener``; `PyqvmTimeoutError` naming ``what`` after ``timeout``."""
        try:
            event: Event = await asyncio.wait_for(listener.get(), timeout)
        except TimeoutError:
            raise PyqvmTimeoutError(f"{self.name}: no {what} within {timeout:g} s") from None
        return event

    async def close(self) -> None:
        try:
            await self._client.disconnect()
        except (QMPError, EOFError, OSError) as e:
            # A QEMU that died leaves the reader with an error; the session is closed anyway.
            log.debug("%s: QMP disconnect: %s", self.name, e)
