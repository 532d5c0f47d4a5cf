"""Named VMs on another host, over SSH: ``pyqvm --host ssh://[user@]HOST[:PORT]``.

As ``docker -H ssh://`` does, nothing listens on the network: the client runs the host's
own ``ssh`` (its config, keys and agent apply) with ``BatchMode=yes``, so a login that
would ask for a password fails at once instead of waiting, and runs a ``pyqvm`` on HOST:

- ``pyqvm dial-stdio NAME`` bridges the ssh stream to VM NAME's owner socket, so the
  owner protocol (`pyqvm.named.wire`, QMP's framing) runs over it unchanged: the client's
  `qemu.qmp.QMPClient` gets one end of a socketpair, ssh the other;
- ``pyqvm owner-start`` starts an owner there from a request on its stdin, as
  `pyqvm.named.client.start_owner` does here, and answers with the same JSON lines.

``PYQVM_SSH_COMMAND`` replaces ``ssh`` (e.g. ``ssh -F ./config``); ``PYQVM_REMOTE_COMMAND``
is how to run pyqvm on HOST (default ``pyqvm``). A host that cannot be reached, refuses the
login, or has no pyqvm is a `NamedVMError` naming it and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyqvm.errors import NamedVMError, PyqvmTimeoutError

log = logging.getLogger(__name__)

#: The exit status ssh gives when it could not connect or log in.
_SSH_FAILED = 255
#: The shell's "command not found".
_NOT_FOUND = 127
_URL = re.compile(r"ssh://(?:(?P<user>[^@/:\s]+)@)?(?P<host>[^@/:\s\[\]]+|\[[0-9A-Fa-f:]+\])"
                  r"(?::(?P<port>\d{1,5}))?/?\Z")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Host:
    """Where named VMs live: ``ssh://[user@]HOST[:PORT]``."""

    hostname: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, url: str) -> Host:
        m = _URL.match(url.strip())
        if m is None:
            raise NamedVMError(
                f"host: {url!r} is not an SSH address; use ssh://[user@]HOST[:PORT], e.g. "
                "ssh://root@10.0.0.2"
            )
        port = int(m["port"]) if m["port"] else None
        if port is not None and not 0 < port < 65536:
            raise NamedVMError(f"host: {url!r}: port {port} is not 1 to 65535")
        return cls(m["host"].strip("[]"), m["user"], port)

    @property
    def url(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{self.hostname}{port}"

    def argv(self, remote: Sequence[str], *, tty: bool = False) -> list[str]:
        """The ssh command that runs pyqvm ``remote`` on this host."""
        ssh = shlex.split(os.environ.get("PYQVM_SSH_COMMAND", "ssh"))
        pyqvm = shlex.split(os.environ.get("PYQVM_REMOTE_COMMAND", "pyqvm"))
        options = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-e", "none"]
        options += ["-t" if tty else "-T"]
        if self.port:
            options += ["-p", str(self.port)]
        if self.user:
            options += ["-l", self.user]
        # ssh hands the remote shell one string: every word quoted.
        return [*ssh, *options, "--", self.hostname, shlex.join([*pyqvm, *remote])]

    def failure(self, code: int | None, stderr: str) -> NamedVMError | None:
        """What an ssh that ended with ``code`` and ``stderr`` says went wrong, if it was
        the connection, the login or a missing pyqvm (None: pyqvm on the host spoke)."""
        said = stderr.strip().splitlines()
        last = said[-1] if said else "no output"
        if code == _SSH_FAILED:
            if "Permission denied" in stderr or "Host key verification failed" in stderr:
                fix = (
                    "pyqvm never answers a password prompt (BatchMode); give ssh a key "
                    f"for it (ssh-copy-id, an agent) and check `ssh {self.hostname} true`"
                )
                return NamedVMError(f"host {self.url} refused the login ({last}); {fix}")
            return NamedVMError(
                f"host {self.url} cannot be reached over SSH ({last}); check the address and "
                f"that sshd runs there: ssh {self.hostname} true"
            )
        if code == _NOT_FOUND or "command not found" in stderr or "No such file" in last:
            return NamedVMError(
                f"host {self.url} has no pyqvm to run ({last}); install it there (pip install "
                "pyqvm) or say how to run it: PYQVM_REMOTE_COMMAND"
            )
        return None

    def said(self, stderr: str) -> NamedVMError | None:
        """The pyqvm error the remote pyqvm printed on ``stderr`` (its last line)."""
        for line in reversed(stderr.strip().splitlines()):
            if line.startswith("pyqvm: error: "):
                return NamedVMError(f"{line.removeprefix('pyqvm: error: ')} (on {self.url})")
        return None


class SshStream:
    """One connection to a VM's owner on ``host``: a socket whose other end is an ssh
    running ``pyqvm dial-stdio NAME`` there. Give `sock` to `qemu.qmp.QMPClient.connect`."""

    def __init__(self, host: Host, name: str, timeout: float) -> None:
        self.host = host
        self.name = name
        self.timeout = timeout  # for the owner's greeting, asked there
        self.sock: socket.socket | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr: asyncio.Task[bytes] | None = None

    async def open(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.host.argv(["dial-stdio", "--timeout", f"{self.timeout:g}", self.name]),
                stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C here is ours to handle, not ssh's
            )  # fmt: skip
        except OSError as e:
            ours.close()
            raise NamedVMError(f"host {self.host.url}: cannot run ssh: {e}") from None
        finally:
            theirs.close()
        assert self._proc.stderr is not None
        self._stderr = asyncio.ensure_future(self._proc.stderr.read())
        self.sock = ours
        return ours

    async def error(self, timeout: float = 5.0) -> NamedVMError:
        """Why the stream ended before the owner greeted: the host's or its pyqvm's word."""
        code, stderr = await self._finish(timeout)
        found = self.host.failure(code, stderr) or self.host.said(stderr)
        return found or NamedVMError(
            f"VM {self.name!r} on {self.host.url}: the connection ended (ssh exit {code}: "
            f"{stderr.strip()[-300:] or 'no output'})",
            name=self.name,
        )

    async def close(self, timeout: float = 10.0) -> None:
        """Hang up and wait for ssh to end (the remote side ends with the stream: once the
        VM it was connected to is gone, after its name is free again)."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        await self._finish(timeout)
        if self.sock is not None:
            self.sock.close()

    async def _finish(self, timeout: float) -> tuple[int | None, str]:
        proc = self._proc
        if proc is None:
            return None, ""
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        stderr = b""
        if self._stderr is not None:
            with contextlib.suppress(asyncio.CancelledError, OSError):
                stderr = await self._stderr
        return proc.returncode, stderr.decode(errors="replace")


async def start_owner(
    host: Host,
    name: str,
    request: Mapping[str, Any],
    *,
    timeout: float,
    on_incoming: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """`pyqvm.named.client.start_owner` on ``host``: ``pyqvm owner-start`` there reads the
    request on its stdin and answers with the ready pipe's lines; a migration destination's
    ``{"incoming": ...}`` is handed to ``on_incoming``, and its end told back (a line on
    stdin) so that the destination goes on. Returns the ready line (``{"ok"|"error": ...}``)."""
    proc = await asyncio.create_subprocess_exec(
        *host.argv(["owner-start", name]),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True, limit=2**24,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stderr = asyncio.ensure_future(proc.stderr.read())
    try:
        proc.stdin.write(json.dumps({"request": request, "timeout": timeout}).encode() + b"\n")
        await proc.stdin.drain()
        async with asyncio.timeout(timeout + 30):
            while line := await proc.stdout.readline():
                said = json.loads(line)
                if "incoming" not in said:
                    await proc.wait()
                    return dict(said)
                if on_incoming is None:
                    raise NamedVMError(f"VM {name!r}: its owner waits for a migration", name=name)
                await on_incoming(said["incoming"])
                proc.stdin.write(b'{"sent": true}\n')
                await proc.stdin.drain()
            await proc.wait()
    except TimeoutError:
        raise PyqvmTimeoutError(f"VM {name!r} on {host.url} was not ready in time") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    text = (await stderr).decode(errors="replace")
    raise (
        host.failure(proc.returncode, text)
        or host.said(text)
        or NamedVMError(
            f"VM {name!r} on {host.url}: pyqvm owner-start ended without an answer "
            f"(exit {proc.returncode}): {text.strip()[-300:]}",
            name=name,
        )
    )


__all__ = ["Host", "SshStream", "start_owner"]
