"""A QMP session on `qemu.qmp`: commands with typed errors, event waits and QMP jobs.

All QMP traffic of pyqvm goes through `qemu.qmp.QMPClient`; this module maps
its errors into pyqvm's family and adds bounded waits:

- `QMPSession.wait_for_event` waits for one event (by name, with a filter);
  open a listener with `QMPSession.events` *before* the command that causes
  the event and pass it in, so the event cannot slip past.
- `QMPSession.job` starts a QMP job (``snapshot-save``, ``block-commit``,
  ``blockdev-mirror``, ...) and hands back a `Job` that follows it through
  ``JOB_STATUS_CHANGE`` events; `QMPSession.run_job` runs one to its end,
  raises `JobError` with QEMU's own message when it fails, and dismisses it.
- `QMPSession.send_fd` hands QEMU an open file descriptor over the QMP
  socket (SCM_RIGHTS) and names it with ``getfd``, for ``fd:NAME`` URIs and
  ``"type": "fd"`` socket addresses.

Every wait also ends, with `VMExitedError`, when the QMP connection drops.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from qemu.qmp import (
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    QMPError,
    StateError,
)
from qemu.qmp.message import Message
from qemu.qmp.protocol import Runstate

from pyqvm.deadline import Deadline
from pyqvm.errors import (
    JobError,
    PyqvmError,
    PyqvmTimeoutError,
    QMPCommandError,
    VMExitedError,
    VMStateError,
)

log = logging.getLogger(__name__)

Event = Mapping[str, Any]
EventMatch = Callable[[Event], bool]
#: A filter on an event: a predicate, or a mapping that the event's ``data`` must contain.
EventFilter = EventMatch | Mapping[str, object]

_T = TypeVar("_T")

#: How many lines `QMPSession.transcript` keeps, and how long each may be.
TRANSCRIPT_LINES = 200
TRANSCRIPT_WIDTH = 300

#: Job statuses after which a job does nothing more (``null``: already dismissed).
JOB_FINAL = frozenset({"concluded", "null"})


def event_filter(match: EventFilter | None) -> EventMatch | None:
    """A predicate from a filter: a mapping means "``data`` has these key/values"."""
    if match is None or callable(match):
        return match
    want = dict(match)

    def _match(event: Event) -> bool:
        data = event.get("data") or {}
        return all(data.get(k) == v for k, v in want.items())

    return _match


@dataclass(frozen=True, slots=True)
class JobInfo:
    """One job as ``query-jobs`` reports it (``error`` is None unless it failed).

    For a job that succeeded, `Job.finish` skips ``query-jobs``: ``type`` is
    then the command that started it and the progress counters are 0.
    """

    id: str
    type: str
    status: str
    current_progress: int = 0
    total_progress: int = 0
    error: str | None = None

    @classmethod
    def from_qmp(cls, data: Mapping[str, Any]) -> JobInfo:
        return cls(
            id=str(data["id"]),
            type=str(data.get("type", "")),
            status=str(data.get("status", "")),
            current_progress=int(data.get("current-progress", 0)),
            total_progress=int(data.get("total-progress", 0)),
            error=data.get("error"),
        )


class _Listener(EventListener):
    """qemu.qmp's listener, whose ``async for`` ends when the connection does (QEMU exited
    or the VM was stopped) instead of waiting for ever."""

    def __init__(
        self,
        session: QMPSession,
        names: Iterable[str] | None,
        event_filter: Callable[[Message], bool] | None,
    ) -> None:
        super().__init__(names, event_filter)
        self._session = session

    async def __anext__(self) -> Message:
        try:
            return await self._session._bounded(self.get(), None, "the next event")
        except VMExitedError:
            raise StopAsyncIteration from None


class _IOErrorPause(EventListener):
    """Notes the ``BLOCK_IO_ERROR`` that paused the guest, until a ``RESUME``; queues nothing.

    ``accept`` is qemu.qmp's hook for custom listeners: answering False keeps the
    queue empty, so this costs nothing however long the VM runs.
    """

    def __init__(self) -> None:
        super().__init__(("BLOCK_IO_ERROR", "RESUME"))
        self.data: dict[str, Any] | None = None
        self.paused = asyncio.Event()

    def accept(self, event: Message) -> bool:
        if super().accept(event):
            raw = event.get("data")
            data: dict[str, Any] = raw if isinstance(raw, dict) else {}
            if event["event"] == "RESUME":
                self.data = None
                self.paused.clear()
            elif data.get("action") == "stop":
                self.data = data
                self.paused.set()
        return False


class _GuestPanic(EventListener):
    """Notes QEMU's ``GUEST_PANICKED`` (a pvpanic device told it); queues nothing."""

    def __init__(self) -> None:
        super().__init__(("GUEST_PANICKED",))
        self.data: dict[str, Any] | None = None
        self.panicked = asyncio.Event()

    def accept(self, event: Message) -> bool:
        if super().accept(event) and self.data is None:
            raw = event.get("data")
            self.data = raw if isinstance(raw, dict) else {}
            self.panicked.set()
        return False


class QMPSession:
    """One QMP connection to a QEMU process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._client = QMPClient(name)
        self._job_seq = 0
        #: The last commands sent and their answers, one line each, for a failure report.
        self.transcript: collections.deque[str] = collections.deque(maxlen=TRANSCRIPT_LINES)
        # One fd in flight at a time: QEMU pairs a passed fd with the next getfd.
        self._fd_lock = asyncio.Lock()
        self._io_error = _IOErrorPause()
        self._client.register_listener(self._io_error)
        self._panic = _GuestPanic()
        self._client.register_listener(self._panic)

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

    @property
    def io_error_pause(self) -> Mapping[str, Any] | None:
        """The ``BLOCK_IO_ERROR`` data of the disk error that paused the guest (QEMU's
        ``werror``/``rerror`` action ``stop``), until the guest resumes; else None."""
        return self._io_error.data

    async def io_error_paused(self) -> None:
        """Wait until a disk error pauses the guest (`io_error_pause` is set then)."""
        await self._io_error.paused.wait()

    @property
    def guest_panic(self) -> Mapping[str, Any] | None:
        """The ``GUEST_PANICKED`` event's data once the guest has panicked; else None."""
        return self._panic.data

    async def guest_panicked(self) -> None:
        """Wait until the guest panics (`guest_panic` is set then)."""
        await self._panic.panicked.wait()

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
        self._note("->", f"{command} {json.dumps(arguments) if arguments else ''}")
        try:
            result = await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except ExecuteError as e:
            self._note("<-", f"{command}: error {e.error_class}: {e}")
            raise QMPCommandError(command, e.error_class, str(e)) from None
        except TimeoutError:
            self._note("<-", f"{command}: no reply in {timeout:g} s")
            raise PyqvmTimeoutError(
                f"{self.name}: QMP {command!r} got no reply in {timeout:g} s"
            ) from None
        except (ExecInterruptedError, QMPError) as e:
            self._note("<-", f"{command}: connection lost: {e}")
            raise VMExitedError(f"{self.name}: QEMU went away during QMP {command!r}: {e}") from e
        log.debug("%s: <- %s", self.name, result)
        self._note("<-", f"{command}: {json.dumps(result, default=str)}")
        return result

    def _note(self, direction: str, text: str) -> None:
        if len(text) > TRANSCRIPT_WIDTH:
            text = text[: TRANSCRIPT_WIDTH - 3] + "..."
        self.transcript.append(f"{time.strftime('%H:%M:%S')} {direction} {text}")

    async def send_fd(self, fd: int, name: str, *, timeout: float | None = 60.0) -> None:
        """Hand QEMU a copy of the open file descriptor ``fd``, named ``name`` (``getfd``).

        The descriptor goes over the QMP socket (SCM_RIGHTS, which needs the
        session connected over a UNIX socket, as pyqvm's are); ``getfd`` then
        names it in QEMU, for ``fd:NAME`` migration URIs or ``"type": "fd"``
        socket addresses. ``fd`` stays open here: close it when this returns.
        A ``name`` already in use is replaced (QEMU closes the old descriptor).

        Raises ValueError for a name QEMU would refuse (empty, or starting with a
        digit) or a closed ``fd``, `VMExitedError` if the session is not connected
        or QEMU went away, `VMStateError` if the socket cannot carry descriptors,
        `QMPCommandError` if QEMU refuses ``getfd``, `PyqvmTimeoutError` after
        ``timeout``.
        """
        if not name or name[0].isdigit():
            raise ValueError(
                f"fd name {name!r}: QEMU needs a name that does not start with a digit"
            )
        async with self._fd_lock:
            # The fd and the getfd that names it must arrive as one step: no other
            # send_fd of ours may slip in between (QEMU keeps only the last fd sent).
            log.debug("%s: -> fd %d (SCM_RIGHTS) for %r", self.name, fd, name)
            try:
                self._client.send_fd_scm(fd)
            except StateError as e:
                raise VMExitedError(
                    f"{self.name}: QMP is not connected; cannot pass fd {name!r}: {e}"
                ) from e
            except QMPError as e:  # not a UNIX socket
                raise VMStateError(f"{self.name}: cannot pass fd {name!r} over QMP: {e}") from e
            except OSError as e:
                if e.errno == errno.EBADF:
                    raise ValueError(f"fd {fd} ({name!r}) is not an open file descriptor") from e
                raise VMExitedError(
                    f"{self.name}: QEMU went away while passing fd {name!r}: {e}"
                ) from e
            await self.execute("getfd", {"fdname": name}, timeout=timeout)

    @asynccontextmanager
    async def events(
        self, names: str | Iterable[str] = (), match: EventFilter | None = None
    ) -> AsyncIterator[EventListener]:
        """Listen for events while the block runs; ``async for`` over the listener.

        Open the listener *before* issuing the command whose event you await,
        so the event cannot slip past. ``match`` is a predicate on the event or
        a mapping its ``data`` must contain (``{"device": "disk1"}``).
        """
        names = (names,) if isinstance(names, str) else tuple(names)
        listener = _Listener(self, names or None, event_filter(match))
        with self._client.listen(listener):
            yield listener

    async def next_event(self, listener: EventListener, timeout: float | None, what: str) -> Event:
        """The next event on ``listener``.

        Raises `PyqvmTimeoutError` naming ``what`` after ``timeout`` seconds
        (None: no limit) and `VMExitedError` if the connection drops first.
        """
        event: Event = await self._bounded(listener.get(), timeout, what)
        log.debug("%s: event %s %s", self.name, event.get("event"), event.get("data", ""))
        return event

    async def wait_for_event(
        self,
        name: str | Iterable[str],
        match: EventFilter | None = None,
        timeout: float | None = 60.0,
        *,
        listener: EventListener | None = None,
    ) -> Event:
        """Wait for the first event called ``name`` (one name or several) that ``match``es.

        With ``listener`` (from `events`, opened before the command that
        causes the event) events already queued there count; without it only
        events arriving from now on do. Raises `PyqvmTimeoutError` after
        ``timeout`` seconds (None: no limit), `VMExitedError` if QEMU goes away.
        """
        names = {name} if isinstance(name, str) else set(name)
        pred = event_filter(match)
        what = f"{'/'.join(sorted(names))} event"
        deadline = Deadline(timeout)

        async def scan(source: EventListener) -> Event:
            while True:
                event = await self.next_event(source, deadline.left(), what)
                if event.get("event") in names and (pred is None or pred(event)):
                    return event

        if listener is not None:
            return await scan(listener)
        async with self.events(tuple(names), pred) as own:
            return await scan(own)

    async def _until_closed(self) -> None:
        while self._client.runstate is Runstate.RUNNING:
            await self._client.runstate_changed()

    async def _bounded(self, aw: Awaitable[_T], timeout: float | None, what: str) -> _T:
        """Await ``aw`` for at most ``timeout`` s, failing early if the connection drops."""
        if self._client.runstate is not Runstate.RUNNING:
            raise VMExitedError(f"{self.name}: QMP is not connected (waiting for {what})")
        task = asyncio.ensure_future(aw)
        closed = asyncio.ensure_future(self._until_closed())
        try:
            done, _ = await asyncio.wait(
                {task, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for t in (task, closed):
                if not t.done():
                    t.cancel()
        if task in done:
            return task.result()
        if closed in done:
            raise VMExitedError(f"{self.name}: QEMU went away while waiting for {what}")
        raise PyqvmTimeoutError(f"{self.name}: no {what} within {timeout:g} s")

    # --- jobs ---------------------------------------------------------------------------------

    async def query_jobs(self, *, timeout: float | None = 60.0) -> list[JobInfo]:
        """All QMP jobs QEMU knows (``query-jobs``)."""
        return [JobInfo.from_qmp(j) for j in await self.execute("query-jobs", timeout=timeout)]

    @asynccontextmanager
    async def job(
        self,
        command: str,
        arguments: Mapping[str, object],
        *,
        job_id: str,
        timeout: float | None = 60.0,
    ) -> AsyncIterator[Job]:
        """Start a QMP job and follow it while the block runs.

        ``command`` is sent with ``arguments`` plus ``"job-id": job_id``. The
        job's ``JOB_STATUS_CHANGE`` events are listened for from before the
        command is sent. If the block is left before the job ended (an error,
        a cancellation), the job is cancelled and dismissed, each step bounded.
        Block jobs should be started with ``"auto-dismiss": False`` so that
        their error can still be read when they conclude.
        """
        args = {"job-id": job_id, **arguments}
        listener = EventListener(_JOB_EVENTS, _job_filter(job_id))
        with self._client.listen(listener):
            await self.execute(command, args, timeout=timeout)
            job = Job(self, job_id, command, listener)
            try:
                yield job
            finally:
                # Not dismissed yet ("concluded" too: a failed job waits for job-dismiss).
                if job.status != "null" and self.connected:
                    await asyncio.shield(job.abandon())

    async def run_job(
        self,
        command: str,
        arguments: Mapping[str, object],
        *,
        job_id: str | None = None,
        timeout: float | None = None,
        complete_on_ready: bool = False,
    ) -> JobInfo:
        """Run a QMP job to its end and dismiss it; returns its final `JobInfo`.

        ``complete_on_ready`` sends ``job-complete`` once the job is ``ready``
        (an active ``block-commit``, a mirror). Raises `JobError` with QEMU's
        message if the job fails, `PyqvmTimeoutError` after ``timeout`` s
        (None: no limit; the job is then cancelled), `QMPCommandError` if QEMU
        refuses to start it.
        """
        self._job_seq += 1
        jid = job_id or f"pyqvm-{command}-{self._job_seq}"
        left = Deadline(timeout).left
        async with self.job(command, arguments, job_id=jid, timeout=left()) as job:
            if complete_on_ready and await job.wait_for("ready", timeout=left()) == "ready":
                await job.complete(timeout=left())
            return await job.finish(timeout=left())

    async def close(self) -> None:
        try:
            await self._client.disconnect()
        except (QMPError, EOFError, OSError) as e:
            # A QEMU that died leaves the reader with an error; the session is closed anyway.
            log.debug("%s: QMP disconnect: %s", self.name, e)


_JOB_EVENTS = ("JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


def _job_filter(job_id: str) -> EventMatch:
    def match(event: Event) -> bool:
        data = event.get("data") or {}
        key = "id" if event.get("event") == "JOB_STATUS_CHANGE" else "device"
        return bool(data.get(key) == job_id)

    return match


class Job:
    """A running QMP job, followed through its ``JOB_STATUS_CHANGE`` events.

    Made by `QMPSession.job`. ``status`` is the last status QEMU reported
    (``created``, ``running``, ``ready``, ``pending``, ``concluded``, ``null``...).
    Waits never poll: while some jobs run (``snapshot-save``/``-load``) the
    monitor may not answer at all, but their events arrive once it does.
    """

    def __init__(
        self, session: QMPSession, job_id: str, command: str, listener: EventListener
    ) -> None:
        self.id = job_id
        self.command = command
        self.status = "created"
        self._session = session
        self._listener = listener
        self._block_error: str | None = None
        self._cancelled = False
        self._seen: set[str] = set()

    def __repr__(self) -> str:
        return f"<Job {self.id!r} ({self.command}) {self.status}>"

    def _take(self, event: Event) -> None:
        data = event.get("data") or {}
        name = event.get("event")
        if name == "JOB_STATUS_CHANGE":
            self.status = str(data.get("status", self.status))
            self._seen.add(self.status)
        elif name == "BLOCK_JOB_COMPLETED" and data.get("error"):
            self._block_error = str(data["error"])
        elif name == "BLOCK_JOB_CANCELLED":
            self._cancelled = True

    def _drain(self) -> None:
        for event in self._listener.clear():
            self._take(event)

    async def wait_for(self, *statuses: str, timeout: float | None = None) -> str:
        """Wait until the job's status is one of ``statuses`` or final; returns the status.

        Raises `PyqvmTimeoutError` after ``timeout`` s, `VMExitedError` if QEMU exits.
        """
        want = set(statuses) | JOB_FINAL
        deadline = Deadline(timeout)
        self._drain()
        while self.status not in want:
            what = f"job {self.id!r} reaching {'/'.join(sorted(want))} (now {self.status})"
            self._take(await self._session.next_event(self._listener, deadline.left(), what))
        return self.status

    async def info(self, *, timeout: float | None = 60.0) -> JobInfo | None:
        """The job as ``query-jobs`` reports it now (None once it is dismissed)."""
        for j in await self._session.query_jobs(timeout=timeout):
            if j.id == self.id:
                return j
        return None

    async def complete(self, *, timeout: float | None = 60.0) -> None:
        """``job-complete``: finish a ``ready`` job (pivot a mirror, end an active commit)."""
        await self._session.execute("job-complete", {"id": self.id}, timeout=timeout)

    async def cancel(self, *, force: bool = True, timeout: float | None = 60.0) -> None:
        """Ask QEMU to stop the job: ``job-cancel`` (forced: a ``ready`` mirror stops at once,
        without pivot).

        ``force=False`` is ``block-job-cancel`` without force, for a ``ready``
        mirror: it first copies what is still dirty, then ends without pivot,
        and `finish` reports success (a complete copy that was not switched to).
        """
        if not force:
            await self._session.execute(
                "block-job-cancel", {"device": self.id, "force": False}, timeout=timeout
            )
            return
        self._cancelled = True
        await self._session.execute("job-cancel", {"id": self.id}, timeout=timeout)

    async def finish(self, *, timeout: float | None = None) -> JobInfo:
        """Wait for the job to conclude, read its outcome, dismiss it.

        Returns the final `JobInfo`; raises `JobError` with QEMU's message when
        the job failed or was cancelled.
        """
        await self.wait_for(timeout=timeout)
        info: JobInfo | None = None
        if self.status == "concluded":
            # A job that fails or is cancelled always passes through "aborting"; only
            # then is there an error to read (and a round trip to spend on it).
            failed = "aborting" in self._seen or self._cancelled
            info = await self.info() if failed else JobInfo(self.id, self.command, "concluded")
            if info is not None:
                try:
                    await self._session.execute("job-dismiss", {"id": self.id})
                except QMPCommandError as e:  # auto-dismissed meanwhile
                    log.debug("%s: job-dismiss %s: %s", self._session.name, self.id, e)
            self.status = "null"
        self._drain()
        error = (info.error if info else None) or self._block_error
        if error is None and self._cancelled and info is None:
            error = "cancelled"
        if error is not None:
            raise JobError(self.id, info.type if info else self.command, "concluded", error)
        return info or JobInfo(id=self.id, type=self.command, status="null")

    async def abandon(self, timeout: float = 30.0) -> None:
        """Cancel the job if it still runs, wait (bounded) for its end, dismiss it; never raises
        a `PyqvmError` (it logs instead): this is cleanup after something else failed."""
        try:
            if self.status not in JOB_FINAL:
                try:
                    await self.cancel(timeout=timeout)
                except QMPCommandError as e:  # it may have ended meanwhile: finish tells
                    log.debug("%s: cancelling job %s: %s", self._session.name, self.id, e)
            await self.finish(timeout=timeout)
        except PyqvmError as e:
            log.info("%s: abandoning job %s: %s", self._session.name, self.id, e)
