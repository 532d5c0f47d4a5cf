"""Asyncio client for qemu-guest-agent (QGA).

Why plain asyncio streams and not ``qemu.qmp``: QGA has no greeting, and the channel
must be resynchronised with ``guest-sync-delimited``, whose reply is preceded by a raw
0xFF byte that ``qemu.qmp``'s line parser rejects as a protocol error. Stale replies
are also a normal event here (requests queued before the agent started are answered
later in a burst), and the 0xFF we send to flush the agent's parser makes qemu-ga 7.2
answer with an id-less error; ``qemu.qmp`` treats id-less errors as a server parse
failure and disconnects. One request at a time over a stream reader keeps the
resync rule simple: discard everything until the sync reply carrying our random id.

qemu-ga 7.2 echoes a request's ``"id"``; we send one and drop replies carrying
another id, but accept id-less replies in order so older agents still work.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import shlex
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pyqvm.errors import (
    GuestCommandError,
    GuestError,
    GuestExecError,
    PyqvmTimeoutError,
    VMExitedError,
)

log = logging.getLogger(__name__)

# guest-exec-status output can be 16 MiB before base64; the default 64 KiB limit
# would already break on one 48 KiB guest-file-read chunk.
_LINE_LIMIT = 64 * 1024 * 1024
_FILE_CHUNK = 48 * 1024
_DELIMITER = b"\xff"
_LOG_MAX = 300
# Commands that never answer on success (qga/qapi-schema.json: success-response false).
_NO_REPLY = frozenset(
    {"guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid"}
)

#: The longest wait between two polls of a running command.
POLL_MAX = 0.2


def poll_wait(age: float, poll_interval: float = 0.005) -> float:
    """How long to wait before the next ``guest-exec-status`` of a command that has run for
    ``age`` seconds: an eighth of that, from ``poll_interval`` up to `POLL_MAX`.

    A command that ends at ``t`` is seen by about 1.125 t. Doubling the wait from 5 ms saw
    a clone's first ``true`` (~105 ms under TCG: none of the guest's code is translated
    yet) 12-15 ms later (medians of 9 clones of the built-in guest each way); a busy guest
    answers a poll in 15-20 ms, so polling more often than this gained nothing.
    """
    return min(max(poll_interval, age / 8), max(POLL_MAX, poll_interval))


@dataclass(frozen=True, slots=True, repr=False)
class ExecResult:
    """Outcome of a command run in the guest with `GuestAgent.exec`.

    Reads like `subprocess.CompletedProcess`: ``returncode``, ``stdout`` and ``stderr``
    (bytes), ``check_returncode()``. ``returncode`` is ``-signal`` when the process was
    killed by a signal; ``signal`` then names it. ``exitcode`` is an older name for
    ``returncode`` and ``args`` another name for ``argv``.
    """

    returncode: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    argv: tuple[str, ...] = ()

    @property
    def exitcode(self) -> int:
        """The same as ``returncode``."""
        return self.returncode

    @property
    def args(self) -> tuple[str, ...]:
        """The same as ``argv``, as `subprocess.CompletedProcess` names it."""
        return self.argv

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def check_returncode(self) -> None:
        """Raise `GuestExecError` if the command exited non-zero or was killed."""
        if self.returncode != 0 or self.signal is not None:
            raise GuestExecError(self.argv, self.returncode, self.stderr, self.signal)

    def check(self) -> Self:
        """Return self; raise `GuestExecError` if the command failed."""
        self.check_returncode()
        return self

    def __repr__(self) -> str:
        signal = "" if self.signal is None else f", signal={self.signal!r}"
        return (
            f"ExecResult(argv={self.argv!r}, returncode={self.returncode!r}{signal}, "
            f"stdout={self.stdout!r}, stderr={self.stderr!r})"
        )


class GuestAgent:
    """One connection to a qemu-guest-agent; requests run one at a time."""

    def __init__(self, *, name: str = "agent") -> None:
        self.name = name
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._synced = False
        self._next_id = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.shield(self.close())

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def connect(self, sock_or_path: socket.socket | str | Path) -> None:
        """Attach to a connected socket (we own and close it) or a unix socket path.

        No traffic happens here; call `wait_ready` before the first command.
        """
        if self._writer is not None:
            raise GuestError(f"{self.name}: already connected")
        try:
            if isinstance(sock_or_path, socket.socket):
                reader, writer = await asyncio.open_unix_connection(
                    sock=sock_or_path, limit=_LINE_LIMIT
                )
            else:
                reader, writer = await asyncio.open_unix_connection(
                    str(sock_or_path), limit=_LINE_LIMIT
                )
        except OSError as e:
            if isinstance(sock_or_path, socket.socket):
                sock_or_path.close()  # it was handed to us; don't leak it
            raise GuestError(
                f"{self.name}: cannot connect to guest agent at {sock_or_path}: {e}"
            ) from e
        self._reader, self._writer = reader, writer
        self._synced = False
        log.debug("%s: connected to %s", self.name, sock_or_path)

    async def close(self) -> None:
        """Close the channel; safe to call twice."""
        writer, self._writer, self._reader = self._writer, None, None
        self._synced = False
        if writer is None:
            return
        writer.close()
        try:
            await writer.wait_closed()
        except OSError as e:
            log.debug("%s: error while closing: %s", self.name, e)

    async def wait_ready(self, timeout: float, *, try_timeout: float = 0.5) -> None:
        """Resync until the agent answers; `PyqvmTimeoutError` after ``timeout`` seconds.

        Each try waits ``try_timeout`` seconds, growing to 2 s, because an agent that is
        not up yet simply never answers.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        per_try = try_timeout
        tries = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise PyqvmTimeoutError(
                    f"{self.name}: guest agent did not answer within {timeout:g}s "
                    f"({tries} sync attempts); is qemu-guest-agent running in the guest?"
                )
            tries += 1
            try:
                await self.sync(timeout=min(per_try, remaining))
            except PyqvmTimeoutError:
                per_try = min(per_try * 1.5, max(2.0, try_timeout))
                continue
            log.debug("%s: ready after %d sync attempts", self.name, tries)
            return

    async def sync(self, timeout: float = 2.0) -> None:
        """Run one resync round: flush stale replies up to a fresh guest-sync id."""
        async with self._lock:
            self._synced = False
            try:
                async with asyncio.timeout(timeout):
                    await self._sync_locked()
            except TimeoutError as e:
                raise PyqvmTimeoutError(
                    f"{self.name}: guest agent did not answer guest-sync within {timeout:g}s"
                ) from e

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float = 30.0,
    ) -> object:
        """Run one QGA command and return its ``return`` value.

        Raises `GuestCommandError` on an error reply, `PyqvmTimeoutError` (the next call
        resyncs first) and `VMExitedError` if the channel closes.
        """
        return await self._call(command, arguments, timeout, "")

    async def ping(self, timeout: float = 5.0) -> None:
        """Check that the agent answers."""
        await self.execute("guest-ping", timeout=timeout)

    async def exec(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        poll_interval: float = 0.005,
    ) -> ExecResult:
        """Run ``argv`` in the guest (no shell) and wait for it to exit.

        ``env`` replaces the process environment, as QGA does. A non-zero exit is not
        an error; call `ExecResult.check`. On timeout `PyqvmTimeoutError` is raised and
        the process keeps running: QGA 7.2 has no command to kill it.
        """
        if not argv:
            raise GuestError(f"{self.name}: exec needs a non-empty argv")
        argv = tuple(argv)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        args: dict[str, object] = {
            "path": argv[0],
            "arg": list(argv[1:]),
            "capture-output": True,
        }
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode("ascii")
        if env is not None:
            args["env"] = [f"{k}={v}" for k, v in env.items()]
        what = f"guest-exec {shlex.join(argv)!r}"
        ret = _as_dict(await self._call("guest-exec", args, timeout, what))
        pid = _field(ret, "pid", int, "guest-exec")
        try:
            # QGA has no exit notification, so polling is the only way to learn the end.
            started = loop.time()
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise PyqvmTimeoutError(f"{self.name}: {what} did not finish")
                status = _as_dict(
                    await self.execute("guest-exec-status", {"pid": pid}, timeout=remaining)
                )
                if status.get("exited"):
                    break
                await asyncio.sleep(min(poll_wait(loop.time() - started, poll_interval), remaining))
        except PyqvmTimeoutError as e:
            raise PyqvmTimeoutError(
                f"{self.name}: {what} (guest pid {pid}) still running after {timeout:g}s; "
                "QGA 7.2 cannot kill it"
            ) from e
        for stream in ("out", "err"):
            if status.get(f"{stream}-truncated"):
                log.warning("%s: %s: std%s was truncated by the agent", self.name, what, stream)
        signal = status.get("signal")
        if signal is not None and not isinstance(signal, int):
            raise GuestError(f"{self.name}: guest-exec-status: bad 'signal' {signal!r}")
        returncode = status.get("exitcode")
        if not isinstance(returncode, int):
            if signal is None:
                raise GuestError(f"{self.name}: guest-exec-status: no exit code in {status!r}")
            returncode = -signal
        return ExecResult(
            returncode=returncode,
            stdout=_b64field(status, "out-data"),
            stderr=_b64field(status, "err-data"),
            signal=signal,
            argv=argv,
        )

    async def read_file(self, path: str, *, timeout: float = 30.0) -> bytes:
        """Return the whole content of a guest file."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        handle = await self._open(path, "r", timeout)
        chunks: list[bytes] = []
        async with _Closing(self, handle, path):
            while True:
                ret = _as_dict(
                    await self.execute(
                        "guest-file-read",
                        {"handle": handle, "count": _FILE_CHUNK},
                        timeout=deadline - loop.time(),
                    )
                )
                chunk = _b64field(ret, "buf-b64")
                chunks.append(chunk)
                if ret.get("eof") or not chunk:
                    break
        return b"".join(chunks)

    async def write_file(self, path: str, data: bytes, *, timeout: float = 30.0) -> None:
        """Create or truncate a guest file and write ``data`` to it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        handle = await self._open(path, "w", timeout)
        async with _Closing(self, handle, path):
            view = memoryview(data)
            for start in range(0, len(data), _FILE_CHUNK):
                chunk = view[start : start + _FILE_CHUNK]
                ret = _as_dict(
                    await self.execute(
                        "guest-file-write",
                        {"handle": handle, "buf-b64": base64.b64encode(chunk).decode("ascii")},
                        timeout=deadline - loop.time(),
                    )
                )
                if _field(ret, "count", int, "guest-file-write") != len(chunk):
                    raise GuestError(
                        f"{self.name}: short write to guest file {path!r}: "
                        f"{ret['count']} of {len(chunk)} bytes at offset {start}"
                    )
            await self.execute(
                "guest-file-flush", {"handle": handle}, timeout=deadline - loop.time()
            )

    # -- internals -------------------------------------------------------------

    async def _call(
        self,
        command: str,
        arguments: Mapping[str, object] | None,
        timeout: float,
        what: str,
    ) -> object:
        async with self._lock:
            try:
                async with asyncio.timeout(timeout):
                    return await self._execute_locked(command, arguments, what)
            except TimeoutError as e:
                raise PyqvmTimeoutError(
                    f"{self.name}: guest agent did not answer {command!r} within {timeout:g}s"
                ) from e

    async def _open(self, path: str, mode: str, timeout: float) -> int:
        ret = await self._call(
            "guest-file-open",
            {"path": path, "mode": mode},
            timeout,
            f"guest-file-open {path!r} ({mode!r})",
        )
        if not isinstance(ret, int):
            raise GuestError(f"{self.name}: guest-file-open returned {ret!r}, not a handle")
        return ret

    async def _sync_locked(self) -> None:
        reader, writer = self._channel()
        sync_id = random.getrandbits(62)
        # The leading 0xFF flushes a partial request the agent may hold from an
        # earlier writer; the agent answers it with an error that we discard below.
        self._send(
            writer, _DELIMITER, {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        )
        await self._drain(writer)
        while True:
            msg = await self._recv(reader)
            if msg is not None and msg.get("return") == sync_id:
                self._synced = True
                return
            log.debug("%s: discarding stale reply while syncing", self.name)

    async def _execute_locked(
        self, command: str, arguments: Mapping[str, object] | None, what: str = ""
    ) -> object:
        reader, writer = self._channel()
        done = False
        try:
            if not self._synced:
                await self._sync_locked()
            self._next_id += 1
            req_id = f"pyqvm-{self._next_id}"
            msg: dict[str, object] = {"execute": command, "id": req_id}
            if arguments is not None:
                msg["arguments"] = dict(arguments)
            self._send(writer, b"", msg)
            await self._drain(writer)
            if command in _NO_REPLY:
                # An error reply may still come later; the next call resyncs past it.
                self._synced = False
                done = True
                return None
            while True:
                reply = await self._recv(reader)
                if reply is None:
                    log.warning("%s: discarding unparsable reply to %r", self.name, command)
                    continue
                if "id" in reply and reply["id"] != req_id:
                    log.debug("%s: discarding reply to %r", self.name, reply["id"])
                    continue
                break
            done = True
        finally:
            if not done:
                # Timed out, cancelled or broken: a late reply may still arrive.
                self._synced = False
        if "error" in reply:
            err = reply["error"]
            err = err if isinstance(err, dict) else {}
            raise GuestCommandError(
                command,
                str(err.get("class", "?")),
                str(err.get("desc", reply)),
                what=f"{self.name}: {what or repr(command)}",
            )
        if "return" not in reply:
            raise GuestError(f"{self.name}: reply to {command!r} has no 'return': {reply!r}")
        return reply["return"]

    def _channel(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            raise GuestError(f"{self.name}: not connected; call connect() first")
        return self._reader, self._writer

    def _send(self, writer: asyncio.StreamWriter, prefix: bytes, msg: Mapping[str, object]) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode()
        log.debug("%s -> %s%s", self.name, "<0xFF>" if prefix else "", _clip(data))
        try:
            writer.write(prefix + data + b"\n")
        except (ConnectionError, RuntimeError) as e:
            raise VMExitedError(f"{self.name}: guest agent channel is closed ({e})") from e

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.drain()
        except ConnectionError as e:
            raise VMExitedError(f"{self.name}: guest agent channel is closed ({e})") from e

    async def _recv(self, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        """Read one reply line; None if it is not a JSON object (stale fragments)."""
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            raise VMExitedError(f"{self.name}: guest agent channel closed (QEMU exited?)") from e
        except asyncio.LimitOverrunError as e:
            raise GuestError(f"{self.name}: guest agent reply exceeds {_LINE_LIMIT} bytes") from e
        except ConnectionError as e:
            raise VMExitedError(f"{self.name}: guest agent channel is closed ({e})") from e
        log.debug("%s <- %s", self.name, _clip(line.rstrip(b"\n")))
        # 0xFF never occurs in UTF-8 JSON; whatever precedes it is a stale fragment.
        line = line[line.rfind(_DELIMITER) + 1 :].strip()
        if not line:
            return None
        try:
            msg = json.loads(line)
        except ValueError:
            return None
        return msg if isinstance(msg, dict) else None


class _Closing:
    """Close a guest file handle on exit, without hiding the error already raised."""

    def __init__(self, agent: GuestAgent, handle: int, path: str) -> None:
        self._agent, self._handle, self._path = agent, handle, path

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await asyncio.shield(
                self._agent.execute("guest-file-close", {"handle": self._handle}, timeout=5.0)
            )
        except Exception as e:
            if exc is None:
                raise
            log.warning(
                "%s: could not close guest file %r (handle %d): %s",
                self._agent.name,
                self._path,
                self._handle,
                e,
            )


def _as_dict(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise GuestError(f"guest agent returned {value!r}, expected an object")
    return value


def _field(d: Mapping[str, Any], key: str, typ: type[int], command: str) -> int:
    value = d.get(key)
    if not isinstance(value, typ):
        raise GuestError(f"{command}: reply field {key!r} is {value!r}")
    return value


def _b64field(d: Mapping[str, Any], key: str) -> bytes:
    value = d.get(key, "")
    if not isinstance(value, str):
        raise GuestError(f"guest agent field {key!r} is not a string: {value!r}")
    return base64.b64decode(value)


def _clip(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    return text if len(text) <= _LOG_MAX else f"{text[:_LOG_MAX]}... ({len(text)} chars)"


__all__ = [
    "POLL_MAX",
    "ExecResult",
    "GuestAgent",
    "GuestCommandError",
    "GuestExecError",
    "poll_wait",
]
