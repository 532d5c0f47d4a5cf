"""A guest's serial console: `ConsoleLog`, the file QEMU logs it to, and `ConsolePort`,
its live end (what the guest prints, and typing into it).

`ConsoleLog` reads the file's tail and follows it as it grows; ``freeze`` keeps the
last text in memory before the file goes with the runtime dir, so an error
message after teardown can still show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import selectors
import socket
import threading
from pathlib import Path

from pyqvm.deadline import Deadline
from pyqvm.errors import ConsoleError, PyqvmTimeoutError

log = logging.getLogger(__name__)

#: How much of the console `text` returns (its end).
CONSOLE_TAIL = 64 * 1024


class ConsoleLog:
    """The serial console of one VM (``path`` may not exist yet: QEMU creates it)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._frozen = b""

    @classmethod
    def create(cls, path: Path, prefix: bytes = b"") -> ConsoleLog:
        """A new console file (private to us) that starts with ``prefix``; QEMU appends."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:
            f.write(prefix)
        return cls(path)

    def text(self) -> str:
        """The console output so far (its last 64 KiB)."""
        if self.path is None or not self.path.exists():
            return self._frozen[-CONSOLE_TAIL:].decode("utf-8", "replace")
        with open(self.path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - CONSOLE_TAIL))
            return f.read().decode("utf-8", "replace")

    def read(self, offset: int = 0) -> bytes:
        """Console bytes from ``offset`` on (for following the console as it grows)."""
        if self.path is None or not self.path.exists():
            return self._frozen[offset:]
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read()

    def freeze(self) -> None:
        """Keep what the console holds now (its file is about to be removed)."""
        try:
            self._frozen = self.text().encode()
        except OSError:  # never there, or not a file: nothing to keep, and no reason to fail
            self._frozen = b""

    async def wait_for(self, pattern: str, timeout: float, name: str) -> None:
        """Wait until ``pattern`` (a plain substring) shows on the console."""
        # A file QEMU appends to: polling it is the one wait here with no event to wait on.
        deadline = Deadline(timeout)
        interval = 0.02
        while pattern not in self.text():
            if deadline.expired:
                raise PyqvmTimeoutError(f"{name}: {pattern!r} not on the console in {timeout:g} s")
            await asyncio.sleep(deadline.within(interval) or 0.0)
            interval = min(interval * 1.5, 0.25)


#: Linux's line when its kernel panics (what QEMU's functional tests watch for too).
PANIC_LINE = re.compile(rb"Kernel panic - not syncing[^\r\n]*")
#: Console bytes kept that no `ConsolePort.consume` has taken (the oldest go first).
PENDING_LIMIT = 4 * 1024 * 1024


class ConsolePort:
    """The serial console's live end.

    QEMU's serial chardev is one end of a socket pair (it still logs to the console file);
    a thread here holds the other end, so QEMU is never held up by a reader that is away.
    It keeps what the guest printed until `consume` takes it (for ``expect``), types what
    `send` queues, and serves ``listen`` (a unix socket) to any number of interactive
    clients (``pyqvm console``): each sees the output and types into the guest. It runs
    from construction until `close` or QEMU's end.

    A thread and not a task: a blocking `VM` runs its loop only during a call, and the
    guest must be able to print between calls.
    """

    def __init__(self, sock: socket.socket, *, listen: Path | None, name: str) -> None:
        self.name = name
        self.listen_path = listen
        self._qemu = sock
        self._lock = threading.Lock()
        self._pending = bytearray()  # printed and not yet consumed
        self._outbox = bytearray()  # queued for the guest
        self._version = 0  # changes on every arrival, the end and the panic line
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._tail = b""  # the last bytes, for a panic line split across two reads
        self.eof = False
        self.panic_line: str | None = None
        self._closing = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._listener: socket.socket | None = None
        if listen is not None:
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(str(listen))
            os.chmod(listen, 0o600)  # ours alone, as everything in the runtime dir
            self._listener.listen(8)
        self._thread = threading.Thread(target=self._pump, name=f"{name}-console", daemon=True)
        self._thread.start()

    # --- what the operations use -------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    def pending(self) -> bytes:
        """What the guest printed that no `consume` has taken."""
        with self._lock:
            return bytes(self._pending)

    def consume(self, n: int) -> None:
        """Take the first ``n`` pending bytes (an ``expect`` matched up to there)."""
        with self._lock:
            del self._pending[:n]

    def send(self, data: bytes) -> None:
        """Type ``data`` into the guest's serial port (queued; the thread writes it)."""
        if self.eof:
            raise ConsoleError(f"VM {self.name!r}: its serial console has closed (QEMU exited)")
        with self._lock:
            self._outbox += data
        self._wake()

    async def changed(self, version: int) -> None:
        """Return once `version` is no longer ``version`` (something arrived, or the end)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._version != version:
                return
            self._waiters.append((loop, fut))
        try:
            await fut
        finally:
            with self._lock:
                if (loop, fut) in self._waiters:
                    self._waiters.remove((loop, fut))

    def close(self) -> None:
        """Stop the thread, close the sockets and remove the listening socket."""
        self._closing = True
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        for s in (self._qemu, self._wake_r, self._wake_w, self._listener):
            if s is not None:
                s.close()
        if self.listen_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.listen_path.unlink()

    # --- the thread --------------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _changed(self) -> None:
        """Called with the lock held: wake every waiter on its own loop."""
        self._version += 1
        waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_resolve, fut)

    def _received(self, data: bytes) -> None:
        with self._lock:
            self._pending += data
            if len(self._pending) > PENDING_LIMIT:
                del self._pending[: len(self._pending) - PENDING_LIMIT]
            if self.panic_line is None:
                seen = self._tail + data
                m = PANIC_LINE.search(seen)
                if m is not None and (m.end() < len(seen) or seen.endswith(b"\n")):
                    self.panic_line = m.group().decode("utf-8", "replace").strip()
                self._tail = seen[-256:]
            self._changed()

    def _pump(self) -> None:
        clients: list[socket.socket] = []
        sel = selectors.DefaultSelector()
        self._qemu.setblocking(False)
        sel.register(self._qemu, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        if self._listener is not None:
            self._listener.setblocking(False)
            sel.register(self._listener, selectors.EVENT_READ)
        try:
            while not self._closing:
                with self._lock:
                    writing = bool(self._outbox)
                mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
                sel.modify(self._qemu, mask)
                for key, events in sel.select():
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._qemu:
                        if events & selectors.EVENT_WRITE:
                            self._write_out()
                        if events & selectors.EVENT_READ and not self._read_in(sel, clients):
                            return
                    elif sock is self._wake_r:
                        sock.recv(4096)
                    elif sock is self._listener:
                        self._accept(sel, clients)
                    elif sock in clients:  # not dropped earlier in this same batch
                        self._from_client(sel, clients, sock)
        except OSError as e:  # our sockets closed under us (close), or QEMU's end broke
            log.debug("%s: console thread ends: %s", self.name, e)
        finally:
            for c in clients:
                c.close()
            sel.close()
            with self._lock:
                self.eof = True
                self._changed()

    def _read_in(self, sel: selectors.BaseSelector, clients: list[socket.socket]) -> bool:
        try:
            data = self._qemu.recv(65536)
        except BlockingIOError:
            return True
        if not data:
            return False  # QEMU closed it: the VM ended
        self._received(data)
        for c in list(clients):
            try:
                if c.send(data) == len(data):
                    continue
            except OSError:
                pass
            # A viewer that cannot keep up loses its connection rather than hold up the guest.
            _drop(sel, clients, c)
        return True

    def _write_out(self) -> None:
        with self._lock:
            out = bytes(self._outbox)
        try:
            n = self._qemu.send(out)
        except BlockingIOError:
            return
        with self._lock:
            del self._outbox[:n]

    def _accept(self, sel: selectors.BaseSelector, clients: list[socket.socket]) -> None:
        assert self._listener is not None
        try:
            c, _ = self._listener.accept()
        except BlockingIOError:
            return
        c.setblocking(False)
        clients.append(c)
        sel.register(c, selectors.EVENT_READ)

    def _from_client(
        self, sel: selectors.BaseSelector, clients: list[socket.socket], c: socket.socket
    ) -> None:
        try:
            data = c.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            _drop(sel, clients, c)
            return
        with self._lock:
            self._outbox += data


def _drop(sel: selectors.BaseSelector, clients: list[socket.socket], c: socket.socket) -> None:
    """Forget a client everywhere at once, so no later event in a batch sees it closed."""
    sel.unregister(c)
    clients.remove(c)
    c.close()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
