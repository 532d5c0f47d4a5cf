"""Tests for pyqvm.channels.agent against a fake guest agent, and once against the real qemu-ga."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from pyqvm.channels.agent import (
    POLL_MAX,
    ExecResult,
    GuestAgent,
    GuestCommandError,
    GuestExecError,
    poll_wait,
)
from pyqvm.errors import GuestError, PyqvmTimeoutError, VMExitedError


class FakeQGA:
    """A scripted qemu-guest-agent on the far end of a socketpair.

    It stays silent for the first ``silent_for`` requests and answers them all in a
    burst with the next one, like a virtio-serial channel read by a late agent.
    """

    def __init__(self, *, silent_for: int = 0, echo_id: bool = True, split: bool = False):
        self.silent_for = silent_for  # further requests to hold back
        self.echo_id = echo_id
        self.split = split
        self.never_answer = False
        self.requests: list[dict[str, Any]] = []
        self.files: dict[str, bytearray] = {}
        self._handles: dict[int, tuple[str, int]] = {}
        self._execs: dict[int, dict[str, Any]] = {}
        self._queued: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    def commands(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r.get("execute") == name]

    async def start(self, sock: socket.socket) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=2**24)
        self._task = asyncio.create_task(self._serve(reader, self._writer))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            replies = []
            if b"\xff" in line:
                # qemu-ga 7.2 answers the flushing 0xFF with an id-less error.
                replies.append(_error("GenericError", "JSON parse error, stray '\\uFFFD'"))
                line = line[line.rfind(b"\xff") + 1 :]
            req = json.loads(line)
            self.requests.append(req)
            replies.append(self._reply(req))
            data = b"".join(replies)
            if self.never_answer:
                continue
            if self.silent_for > 0:
                self.silent_for -= 1
                self._queued.append(data)
                continue
            data = b"".join(self._queued) + data
            self._queued.clear()
            if self.split:
                # Deliver in small pieces so a reply spans several reads.
                for i in range(0, len(data), 7):
                    writer.write(data[i : i + 7])
                    await writer.drain()
                    await asyncio.sleep(0)
            else:
                writer.write(data)
                await writer.drain()

    def _reply(self, req: dict[str, Any]) -> bytes:
        cmd, args = req["execute"], req.get("arguments", {})
        try:
            ret = self._dispatch(cmd, args)
            msg: dict[str, Any] = {"return": ret}
        except KeyError as e:
            msg = {"error": {"class": "GenericError", "desc": f"bad request: {e}"}}
        except _Fail as e:
            msg = {"error": {"class": e.args[0], "desc": e.args[1]}}
        if cmd == "guest-sync-delimited":
            return b"\xff" + json.dumps(msg).encode() + b"\n"
        if self.echo_id and "id" in req:
            msg["id"] = req["id"]
        return json.dumps(msg).encode() + b"\n"

    def _dispatch(self, cmd: str, args: dict[str, Any]) -> object:
        if cmd in ("guest-sync", "guest-sync-delimited"):
            return args["id"]
        if cmd == "guest-ping":
            return {}
        if cmd == "guest-exec":
            if not args["path"].startswith("/bin/"):
                raise _Fail("GenericError", f"Failed to execute child process {args['path']}")
            pid = 100 + len(self._execs)
            self._execs[pid] = {"args": args, "polls": 0}
            return {"pid": pid}
        if cmd == "guest-exec-status":
            proc = self._execs[args["pid"]]
            proc["polls"] += 1
            if proc["polls"] <= 2:
                return {"exited": False}
            stdin = base64.b64decode(proc["args"].get("input-data", ""))
            out = b"hi\n" + stdin
            return {
                "exited": True,
                "exitcode": 7,
                "out-data": base64.b64encode(out).decode(),
                "err-data": base64.b64encode(b"err\n").decode(),
            }
        if cmd == "guest-file-open":
            path, mode = args["path"], args.get("mode", "r")
            if mode == "w":
                self.files[path] = bytearray()
            elif path not in self.files:
                raise _Fail("GenericError", f"failed to open file '{path}': No such file")
            handle = 1000 + len(self._handles)
            self._handles[handle] = (path, 0)
            return handle
        if cmd == "guest-file-read":
            path, pos = self._handles[args["handle"]]
            chunk = bytes(self.files[path][pos : pos + args["count"]])
            self._handles[args["handle"]] = (path, pos + len(chunk))
            eof = pos + len(chunk) >= len(self.files[path])
            return {"count": len(chunk), "buf-b64": base64.b64encode(chunk).decode(), "eof": eof}
        if cmd == "guest-file-write":
            path, _ = self._handles[args["handle"]]
            chunk = base64.b64decode(args["buf-b64"])
            self.files[path] += chunk
            return {"count": len(chunk), "eof": False}
        if cmd == "guest-file-flush":
            _ = self._handles[args["handle"]]  # KeyError on a bad handle
            return {}
        if cmd == "guest-file-close":
            del self._handles[args["handle"]]
            return {}
        raise _Fail("CommandNotFound", f"The command {cmd} has not been found")


class _Fail(Exception):
    pass


def _error(cls: str, desc: str) -> bytes:
    return json.dumps({"error": {"class": cls, "desc": desc}}).encode() + b"\n"


@asynccontextmanager
async def fake_agent(fake: FakeQGA) -> AsyncIterator[GuestAgent]:
    ours, theirs = socket.socketpair()
    agent = GuestAgent(name="test")
    try:
        await fake.start(theirs)
        await agent.connect(ours)
        yield agent
    finally:
        await agent.close()
        await fake.stop()


@pytest.mark.asyncio
async def test_sync_discards_stale_burst() -> None:
    fake = FakeQGA(silent_for=2)
    async with fake_agent(fake) as agent:
        for _ in range(2):
            with pytest.raises(PyqvmTimeoutError):
                await agent.sync(timeout=0.05)
        await agent.sync(timeout=2)
        # The burst carried two stale sync replies (and 0xFF parse errors) first.
        syncs = fake.commands("guest-sync-delimited")
        assert len(syncs) == 3
        await agent.ping()


@pytest.mark.asyncio
async def test_wait_ready_retries_until_agent_answers() -> None:
    fake = FakeQGA(silent_for=2)
    async with fake_agent(fake) as agent:
        await agent.wait_ready(timeout=5, try_timeout=0.05)
        assert len(fake.commands("guest-sync-delimited")) == 3
        assert await agent.execute("guest-sync", {"id": 42}) == 42


@pytest.mark.asyncio
async def test_wait_ready_times_out_when_agent_never_answers() -> None:
    fake = FakeQGA()
    fake.never_answer = True
    async with fake_agent(fake) as agent:
        with pytest.raises(PyqvmTimeoutError, match="did not answer within"):
            await agent.wait_ready(timeout=0.3, try_timeout=0.05)
        assert len(fake.commands("guest-sync-delimited")) >= 2


@pytest.mark.asyncio
async def test_stale_reply_after_timeout_is_not_mistaken_for_the_next() -> None:
    # Without ids in replies only the resync protects the next command.
    fake = FakeQGA(echo_id=False)
    async with fake_agent(fake) as agent:
        await agent.sync()
        fake.silent_for = 1
        with pytest.raises(PyqvmTimeoutError):
            await agent.execute("guest-sync", {"id": 1}, timeout=0.05)
        # The late reply {"return": 1} arrives in the burst and must be skipped.
        assert await agent.execute("guest-sync", {"id": 2}) == 2
        assert [r["execute"] for r in fake.requests] == [
            "guest-sync-delimited",
            "guest-sync",
            "guest-sync-delimited",
            "guest-sync",
        ]


@pytest.mark.asyncio
async def test_reply_with_foreign_id_is_dropped() -> None:
    fake = FakeQGA()
    async with fake_agent(fake) as agent:
        await agent.sync()
        assert fake._writer is not None
        fake._writer.write(b'{"return": "stale", "id": "someone-else"}\n')
        assert await agent.execute("guest-sync", {"id": 5}) == 5


@pytest.mark.asyncio
async def test_split_reply_is_reassembled() -> None:
    fake = FakeQGA(split=True)
    async with fake_agent(fake) as agent:
        await agent.wait_ready(timeout=5)
        fake.files["/big"] = bytearray(os.urandom(10_000))
        assert await agent.read_file("/big") == bytes(fake.files["/big"])


@pytest.mark.asyncio
async def test_exec_returns_exit_code_and_output() -> None:
    fake = FakeQGA()
    async with fake_agent(fake) as agent:
        await agent.wait_ready(timeout=5)
        result = await agent.exec(
            ["/bin/sh", "-c", "x"], input=b"in\n", env={"A": "1"}, poll_interval=0.001
        )
        assert result == ExecResult(
            returncode=7, stdout=b"hi\nin\n", stderr=b"err\n", argv=("/bin/sh", "-c", "x")
        )
        assert result.stdout_text == "hi\nin\n"
        (req,) = fake.commands("guest-exec")
        assert req["arguments"] == {
            "path": "/bin/sh",
            "arg": ["-c", "x"],
            "capture-output": True,
            "input-data": base64.b64encode(b"in\n").decode(),
            "env": ["A=1"],
        }
        assert len(fake.commands("guest-exec-status")) == 3
        with pytest.raises(GuestExecError, match=r"exit code 7(.|\n)*err") as info:
            result.check()
        assert info.value.exitcode == 7


def test_exec_polls_follow_the_command_age() -> None:
    """An eighth of the age between polls: a command that ends at t is seen by ~1.125 t, and
    one that runs for minutes is asked about every POLL_MAX."""
    assert poll_wait(0.0) == poll_wait(0.03) == 0.005
    assert poll_wait(0.08) == pytest.approx(0.01)
    assert poll_wait(60.0) == POLL_MAX
    assert poll_wait(0.0, poll_interval=0.5) == poll_wait(60.0, poll_interval=0.5) == 0.5
    # When a command that ends at `end` is seen to have ended, and after how many polls.
    for end, most_polls in ((0.01, 3), (0.08, 16), (0.3, 28), (60.0, 340)):
        t, polls = 0.0, 1
        while t < end:
            t += poll_wait(t)
            polls += 1
        assert t <= max(1.125 * end, end + 0.005) + 1e-9, (end, t)
        assert polls <= most_polls, (end, polls)


def test_exec_result_check() -> None:
    ok = ExecResult(returncode=0, stdout=b"", stderr=b"")
    assert ok.check() is ok
    killed = ExecResult(returncode=-9, stdout=b"", stderr=b"\xff", signal=9, argv=("x",))
    with pytest.raises(GuestExecError, match="signal 9"):
        killed.check()
    assert killed.stderr_text == "\ufffd"


def test_exec_result_reads_like_completed_process() -> None:
    ok = ExecResult(0, b"Linux\n", b"", argv=("uname",))
    done = subprocess.CompletedProcess(["uname"], 0, b"Linux\n", b"")
    ok.check_returncode()  # returns None, like CompletedProcess's
    done.check_returncode()
    assert (ok.returncode, ok.stdout, ok.stderr) == (done.returncode, done.stdout, done.stderr)
    assert ok.args == ok.argv == ("uname",)
    assert ok.exitcode == ok.returncode == 0  # the older name, read-only
    alias = vars(ExecResult)["exitcode"]
    assert isinstance(alias, property) and alias.fset is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        ok.returncode = 1  # type: ignore[misc]
    assert repr(ok) == "ExecResult(argv=('uname',), returncode=0, stdout=b'Linux\\n', stderr=b'')"


@pytest.mark.parametrize(
    ("result", "match"),
    [
        (ExecResult(3, b"", b"oops\n", argv=("false",)), r"'false' failed: exit code 3\nstderr:"),
        (ExecResult(-9, b"", b"", signal=9, argv=("sleep", "9")), "killed by signal 9"),
        (ExecResult(0, b"", b"", signal=15, argv=("x",)), "killed by signal 15"),
    ],
)
def test_exec_result_check_returncode_raises(result: ExecResult, match: str) -> None:
    with pytest.raises(GuestExecError, match=match) as info:
        result.check_returncode()
    assert (info.value.argv, info.value.exitcode) == (list(result.argv), result.returncode)
    assert info.value.signal == result.signal and info.value.stderr == result.stderr
    with pytest.raises(GuestExecError, match=match):
        result.check()


def test_exec_result_repr_names_a_signal() -> None:
    killed = ExecResult(-9, b"", b"\xff", signal=9, argv=("x",))
    assert repr(killed) == (
        "ExecResult(argv=('x',), returncode=-9, signal=9, stdout=b'', stderr=b'\\xff')"
    )


@pytest.mark.asyncio
async def test_error_reply_raises_guest_error() -> None:
    fake = FakeQGA()
    async with fake_agent(fake) as agent:
        with pytest.raises(GuestCommandError) as info:
            await agent.execute("guest-nope")
        assert info.value.error_class == "CommandNotFound"
        assert "guest-nope" in str(info.value)
        with pytest.raises(GuestError, match="guest-exec '/no/such'"):
            await agent.exec(["/no/such"])
        # The channel is still usable after an error reply.
        await agent.ping()


@pytest.mark.asyncio
async def test_file_round_trip_in_chunks() -> None:
    fake = FakeQGA()
    data = os.urandom(150 * 1024)
    async with fake_agent(fake) as agent:
        await agent.write_file("/tmp/f", data)
        assert bytes(fake.files["/tmp/f"]) == data
        assert len(fake.commands("guest-file-write")) == 4
        assert fake.commands("guest-file-flush")
        assert await agent.read_file("/tmp/f") == data
        assert len(fake.commands("guest-file-read")) == 4
        assert len(fake.commands("guest-file-close")) == 2
        assert not fake._handles
        await agent.write_file("/tmp/empty", b"")
        assert await agent.read_file("/tmp/empty") == b""
        with pytest.raises(GuestCommandError, match="'/missing'"):
            await agent.read_file("/missing")


@pytest.mark.asyncio
async def test_channel_closed_raises_vm_exited() -> None:
    fake = FakeQGA()
    async with fake_agent(fake) as agent:
        await agent.ping()
        await fake.stop()
        with pytest.raises(VMExitedError):
            await agent.ping()


@pytest.mark.asyncio
async def test_not_connected() -> None:
    agent = GuestAgent()
    with pytest.raises(GuestError, match="not connected"):
        await agent.ping()
    await agent.close()


QEMU_GA = "/usr/sbin/qemu-ga"


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_real_qemu_ga(tmp_path: Path) -> None:
    assert os.path.exists(QEMU_GA), f"{QEMU_GA} missing: apt-get install -y qemu-guest-agent"
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    sock = tmp_path / "qga.sock"
    assert len(str(sock)) < 108, "tmp_path too long for a unix socket"
    proc = await asyncio.create_subprocess_exec(
        QEMU_GA,
        "-m",
        "unix-listen",
        "-p",
        str(sock),
        "-t",
        str(tmp_path),
        "-f",
        str(tmp_path / "qga.pid"),
        "-l",
        str(tmp_path / "qga.log"),
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if sock.exists() or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert sock.exists(), (tmp_path / "qga.log").read_text(errors="replace")
        async with GuestAgent(name="host-qga") as agent:
            await agent.connect(sock)
            await agent.wait_ready(timeout=10)
            result = await agent.exec(["sh", "-c", "echo hi; echo err >&2; exit 7"])
            assert (result.returncode, result.stdout, result.stderr) == (7, b"hi\n", b"err\n")
            piped = await agent.exec(
                ["sh", "-c", 'printf %s "$V"; cat'], input=b"!", env={"V": "v"}
            )
            assert piped.check().stdout == b"v!"
            data = os.urandom(100_000)
            target = tmp_path / "f.bin"
            await agent.write_file(str(target), data)
            assert target.read_bytes() == data
            assert await agent.read_file(str(target)) == data
            with pytest.raises(GuestCommandError):
                await agent.exec([str(tmp_path / "missing")])
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
