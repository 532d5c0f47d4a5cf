"""QMPSession's event waits and job helper against a fake QEMU on a socketpair."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from json_stream import JSONStream

from pyqvm.channels.qmp import QMPSession
from pyqvm.errors import JobError, PyqvmTimeoutError, QMPCommandError, VMExitedError

Handler = Callable[["FakeQEMU", str, dict[str, Any]], Awaitable[Any]]


class FakeQEMU:
    """Speaks just enough QMP: the greeting, capabilities, and a handler per command."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self._writer: asyncio.StreamWriter | None = None

    def event(self, name: str, **data: Any) -> None:
        msg = {"event": name, "data": data, "timestamp": {"seconds": 0, "microseconds": 0}}
        self._send(msg)

    def job_status(self, job_id: str, *statuses: str) -> None:
        for status in statuses:
            self.event("JOB_STATUS_CHANGE", id=job_id, status=status)

    def _send(self, msg: dict[str, Any]) -> None:
        assert self._writer is not None
        self._writer.write(json.dumps(msg).encode() + b"\n")

    async def serve(self, sock: socket.socket) -> None:
        reader, self._writer = await asyncio.open_connection(sock=sock)
        version = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}
        self._send({"QMP": {"version": version, "capabilities": []}})
        async for msg in self._messages(reader):
            name, args = msg["execute"], msg.get("arguments", {})
            reply: dict[str, Any] = {"id": msg["id"]} if "id" in msg else {}
            if name == "qmp_capabilities":
                reply["return"] = {}
            else:
                self.commands.append((name, args))
                try:
                    reply["return"] = await self.handler(self, name, args)
                except LookupError as e:
                    reply["error"] = {"class": "GenericError", "desc": str(e)}
            self._send(reply)
            await self._writer.drain()
        self._writer.close()

    @staticmethod
    async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
        # The client writes JSON objects back to back, without newlines (as QEMU allows).
        stream = JSONStream()
        while chunk := await reader.read(4096):
            for msg in stream.feed(chunk):
                yield msg

    def close(self) -> None:
        assert self._writer is not None
        self._writer.close()


@pytest_asyncio.fixture
async def connect() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[QMPSession, FakeQEMU]]]]:
    tasks: list[asyncio.Task[None]] = []
    sessions: list[QMPSession] = []

    async def make(handler: Handler) -> tuple[QMPSession, FakeQEMU]:
        ours, theirs = socket.socketpair()
        fake = FakeQEMU(handler)
        tasks.append(asyncio.create_task(fake.serve(theirs)))
        session = QMPSession("fake")
        await session.connect(ours, timeout=5)
        sessions.append(session)
        return session, fake

    yield make
    for s in sessions:
        await s.close()
    for t in tasks:
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)


def snapshot_job(error: str | None = None) -> Handler:
    """A fake ``snapshot-save``: a job that runs through to ``concluded``."""
    jobs: dict[str, dict[str, Any]] = {}

    async def handler(fake: FakeQEMU, name: str, args: dict[str, Any]) -> Any:
        if name == "snapshot-save":
            jid = args["job-id"]
            jobs[jid] = {"id": jid, "type": "snapshot-save", "status": "concluded"}
            if error:
                jobs[jid]["error"] = error
            # Events come after the reply, as when QEMU's monitor was busy with the job.
            end = ("aborting",) if error else ("waiting", "pending")
            statuses = ("created", "running", *end, "concluded")
            asyncio.get_running_loop().call_soon(fake.job_status, jid, *statuses)
            return {}
        if name == "query-jobs":
            return list(jobs.values())
        if name == "job-dismiss":
            jobs.pop(args["id"])
            return {}
        raise LookupError(f"unexpected {name}")

    return handler


@pytest.mark.asyncio
async def test_run_job_follows_events_and_dismisses(connect: Any) -> None:
    session, fake = await connect(snapshot_job())
    info = await session.run_job("snapshot-save", {"tag": "t"}, job_id="j1", timeout=5)
    assert info.id == "j1" and info.status == "concluded" and info.error is None
    # Success went through waiting/pending, never aborting: no error to read.
    assert [c[0] for c in fake.commands] == ["snapshot-save", "job-dismiss"]
    assert fake.commands[0][1] == {"job-id": "j1", "tag": "t"}


@pytest.mark.asyncio
async def test_run_job_surfaces_the_jobs_error(connect: Any) -> None:
    session, fake = await connect(snapshot_job(error="Device 'x' does not support snapshots"))
    with pytest.raises(JobError) as err:
        await session.run_job("snapshot-save", {"tag": "t"}, timeout=5)
    assert err.value.error == "Device 'x' does not support snapshots"
    assert err.value.job_type == "snapshot-save" and err.value.job_id.startswith("pyqvm-")
    assert "does not support snapshots" in str(err.value)
    # The error is read, and the job dismissed even though it failed.
    assert [c[0] for c in fake.commands] == ["snapshot-save", "query-jobs", "job-dismiss"]


@pytest.mark.asyncio
async def test_refused_job_raises_the_command_error(connect: Any) -> None:
    async def refuse(fake: FakeQEMU, name: str, args: dict[str, Any]) -> Any:
        raise LookupError("Parameter 'tag' is missing")

    session, _ = await connect(refuse)
    with pytest.raises(QMPCommandError, match="'tag' is missing"):
        await session.run_job("snapshot-save", {}, timeout=5)


@pytest.mark.asyncio
async def test_ready_job_is_completed(connect: Any) -> None:
    async def commit(fake: FakeQEMU, name: str, args: dict[str, Any]) -> Any:
        if name == "block-commit":
            fake.job_status(args["job-id"], "created", "running", "ready")
            return {}
        if name == "job-complete":
            fake.job_status(args["id"], "waiting", "pending", "concluded")
            return {}
        if name == "query-jobs":
            return [{"id": "c1", "type": "commit", "status": "concluded"}]
        if name == "job-dismiss":
            return {}
        raise LookupError(name)

    session, fake = await connect(commit)
    await session.run_job(
        "block-commit", {"device": "top"}, job_id="c1", complete_on_ready=True, timeout=5
    )
    assert [c[0] for c in fake.commands] == ["block-commit", "job-complete", "job-dismiss"]


@pytest.mark.asyncio
async def test_leaving_a_job_early_cancels_it(connect: Any) -> None:
    async def mirror(fake: FakeQEMU, name: str, args: dict[str, Any]) -> Any:
        if name == "blockdev-mirror":
            fake.job_status(args["job-id"], "created", "running")
            return {}
        if name == "job-cancel":
            fake.job_status(args["id"], "aborting", "concluded")
            return {}
        if name == "query-jobs":
            return [{"id": "m1", "type": "mirror", "status": "concluded", "error": "cancelled"}]
        if name == "job-dismiss":
            return {}
        raise LookupError(name)

    session, fake = await connect(mirror)
    with pytest.raises(RuntimeError, match="caller failed"):
        async with session.job("blockdev-mirror", {}, job_id="m1") as job:
            assert await job.wait_for("running", timeout=5) == "running"
            raise RuntimeError("caller failed")
    assert [c[0] for c in fake.commands][1:] == ["job-cancel", "query-jobs", "job-dismiss"]
    assert job.status == "null"


@pytest.mark.asyncio
async def test_wait_for_event_filters_by_data_and_times_out(connect: Any) -> None:
    async def unplug(fake: FakeQEMU, name: str, args: dict[str, Any]) -> Any:
        fake.event("DEVICE_DELETED", device="other", path="/machine/peripheral/other")
        fake.event("DEVICE_DELETED", path="/machine/peripheral/hd0/virtio-backend")
        fake.event("DEVICE_DELETED", device="hd0", path="/machine/peripheral/hd0")
        return {}

    session, _ = await connect(unplug)
    async with session.events("DEVICE_DELETED") as listener:
        await session.execute("device_del", {"id": "hd0"})
        event = await session.wait_for_event(
            "DEVICE_DELETED", {"device": "hd0"}, 5, listener=listener
        )
    assert event["data"]["path"] == "/machine/peripheral/hd0"
    with pytest.raises(PyqvmTimeoutError, match="DEVICE_DELETED"):
        await session.wait_for_event("DEVICE_DELETED", {"device": "hd0"}, 0.05)


@pytest.mark.asyncio
async def test_waits_end_when_qemu_goes_away(connect: Any) -> None:
    async def die(fake: FakeQEMU, name: str, args: dict[str, Any]) -> Any:
        asyncio.get_running_loop().call_later(0.05, fake.close)
        return {}

    session, _ = await connect(die)
    async with session.job("snapshot-save", {}, job_id="j") as job:
        with pytest.raises(VMExitedError, match="went away"):
            await job.finish(timeout=None)  # no timeout: only the disconnect ends it


@pytest.mark.asyncio
async def test_the_transcript_keeps_commands_and_answers(connect: Any) -> None:
    async def answer(fake: FakeQEMU, name: str, args: dict[str, Any]) -> Any:
        if name == "query-status":
            return {"status": "running"}
        raise LookupError(f"unexpected {name}")

    session, _ = await connect(answer)
    await session.execute("query-status")
    with pytest.raises(QMPCommandError):
        await session.execute("stop", {"x": "y" * 1000})
    lines = list(session.transcript)
    assert lines[0].endswith("-> query-status ") and lines[1].endswith(
        '<- query-status: {"status": "running"}'
    )
    assert ' -> stop {"x": "yyy' in lines[2] and lines[2].endswith("...")  # clipped
    assert "<- stop: error" in lines[3]
