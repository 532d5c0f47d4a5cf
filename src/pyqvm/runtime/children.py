"""The one owner of a QEMU child process.

`ChildProcess` starts QEMU with no shell, output going to files, and a parent-death
signal so the child cannot outlive us; it waits for exit without blocking the loop
and stops stepwise (SIGTERM, bounded wait, SIGKILL), always reaping (the runtime
dirs its files go in are `pyqvm.runtime.dirs`'s). QMP is not spoken here: the VM layer asks
QEMU to quit first and then calls `ChildProcess.terminate`.

Why a spawner thread: ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the
child exits, not the process. The sync facade runs its loop in a helper thread and
asyncio may be driven from any thread, so every fork happens on one daemon thread
(`shared_spawner`, a `SpawnerThread`) that lives until the interpreter ends. A
`ChildProcess` may be given another `Spawner` (tests use one to delay or inline the fork).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import os
import queue
import shlex
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from pyqvm.errors import LaunchError, PyqvmTimeoutError, VMStateError
from pyqvm.runtime.dirs import private_open

__all__ = [
    "ChildProcess",
    "Spawner",
    "SpawnerThread",
    "shared_spawner",
]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_THP_DISABLE = 41
TAIL_BYTES = 64 * 1024


# --- the spawner thread ------------------------------------------------------------------


class Spawner(Protocol):
    """Where `ChildProcess.start` runs its fork: ``job`` forks and execs the child."""

    def submit(self, job: Callable[[], _T]) -> concurrent.futures.Future[_T]: ...


class SpawnerThread:
    """One daemon thread that runs every fork, so PDEATHSIG tracks the process lifetime.

    The thread starts at construction and unblocks every signal, whatever the mask of
    the thread that made it, since children inherit its mask across exec.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._jobs = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pyqvm-spawner", daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        """The thread the forks run on (the children's PDEATHSIG follows it)."""
        return self._thread

    def submit(self, job: Callable[[], _T]) -> concurrent.futures.Future[_T]:
        """Run ``job`` on the thread; its result or exception lands in the future."""
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._jobs.put((job, future))
        return future

    def _run(self) -> None:
        # Children inherit this thread's signal mask across exec; QEMU must see SIGTERM.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        while True:
            job, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:  # handed to the awaiting caller
                future.set_exception(exc)


_spawner_lock = threading.Lock()
_spawner: SpawnerThread | None = None


def shared_spawner() -> SpawnerThread:
    """The process-wide spawner every `ChildProcess` uses by default, started on first use.

    A forked child of this process starts a new one when it first needs it.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = SpawnerThread()
        return _spawner


def _forget_spawner() -> None:
    # A forked child has no spawner thread (and maybe a lock held by a vanished thread).
    global _spawner, _spawner_lock
    _spawner = None
    _spawner_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_spawner)


# --- the child side ----------------------------------------------------------------------

_libc: Any = None

# <sched.h>, <sys/mount.h>
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18


def _c_functions() -> Any:
    """libc's prctl, unshare and mount, typed once (never in a forked child)."""
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        ulong, cstr = ctypes.c_ulong, ctypes.c_char_p
        libc.prctl.argtypes = [ctypes.c_int, ulong, ulong, ulong, ulong]
        libc.unshare.argtypes = [ctypes.c_int]
        libc.mount.argtypes = [cstr, cstr, cstr, ulong, ctypes.c_void_p]
        for fn in (libc.prctl, libc.unshare, libc.mount):
            fn.restype = ctypes.c_int
        _libc = libc
    return _libc


def _child_setup(
    parent_pid: int, readonly: Sequence[Path] = (), transparent_hugepages: bool = True
) -> Callable[[], None]:
    """Build the preexec_fn: set PDEATHSIG, then make sure the parent did not already die.

    Why preexec_fn despite its thread-safety warning: the getppid re-check has to run in
    the child between prctl and exec, which leaves preexec_fn or an exec wrapper.
    `setpriv --pdeathsig` cannot re-check; a ``python -c`` wrapper costs ~11 ms per
    spawn against ~2 ms here (fork instead of vfork, so it grows with our RSS: ~20 ms
    at 500 MiB). The function below takes no locks, imports nothing and calls libc
    functions resolved before the fork; CPython holds the import lock over the fork and
    re-initialises its own state in the child.

    ``readonly``: directories the child sees read-only, whatever it does (a mount
    namespace of its own with read-only bind mounts of them; needs CAP_SYS_ADMIN).

    ``transparent_hugepages=False``: ``PR_SET_THP_DISABLE``, which the exec keeps, so the
    child's anonymous memory is never backed by 2 MiB pages even where it asks for them
    (``madvise``). Best effort: a kernel that refuses it leaves THP as it is.
    """
    libc = _c_functions()
    sigkill = int(signal.SIGKILL)
    targets = [os.fsencode(p) for p in readonly]

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise OSError(ctypes.get_errno(), what)

    def setup() -> None:
        # Whatever QEMU creates (its console socket, a save's files) is for this user only.
        os.umask(0o077)
        check(libc.prctl(PR_SET_PDEATHSIG, sigkill, 0, 0, 0), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # parent died before prctl: nobody will signal us
            os._exit(127)
        if not transparent_hugepages:
            libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
        if targets:
            check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS) failed")
            # Private first: the read-only mounts below must not reach the host's namespace.
            check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount / private")
            for t in targets:
                check(libc.mount(t, t, None, MS_BIND | MS_REC, None), "bind mount failed")
                flags = MS_REMOUNT | MS_BIND | MS_RDONLY
                check(libc.mount(None, t, None, flags, None), "read-only remount failed")

    return setup


@dataclass(frozen=True, slots=True)
class _Spawned:
    popen: subprocess.Popen[bytes]
    pidfd: int | None


def _spawn(
    argv: list[str],
    pass_fds: tuple[int, ...],
    stderr_path: Path,
    stdout_path: Path | None,
    stdin_devnull: bool,
    own_process_group: bool,
    readonly: tuple[Path, ...],
    transparent_hugepages: bool = True,
) -> _Spawned:
    """Runs on the spawner thread: open the log files, fork/exec, get a pidfd."""
    files: list[IO[bytes]] = []
    try:
        for path in (stderr_path,) if stdout_path is None else (stderr_path, stdout_path):
            try:
                # Private (0600) and closed below, once the child has it.
                files.append(open(path, "wb", opener=private_open))  # noqa: SIM115
            except OSError as exc:
                raise LaunchError(f"cannot open {path}: {exc.strerror}", argv=argv) from exc
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL if stdin_devnull else None,
                stdout=files[-1],
                stderr=files[0],
                pass_fds=pass_fds,
                close_fds=True,
                # Own group: a terminal's Ctrl-C reaches only us, and we run the stepwise stop.
                process_group=0 if own_process_group else None,
                preexec_fn=_child_setup(os.getpid(), readonly, transparent_hugepages),
            )
        except OSError as exc:
            what = exc.filename or argv[0]
            raise LaunchError(f"cannot execute {what!r}: {exc.strerror}", argv=argv) from exc
        except subprocess.SubprocessError as exc:  # preexec_fn (prctl) failed in the child
            raise LaunchError(f"cannot start {argv[0]!r}: {exc}", argv=argv) from exc
    finally:
        for f in files:
            f.close()
    try:
        pidfd: int | None = os.pidfd_open(popen.pid)
    except (AttributeError, OSError) as exc:  # kernel < 5.3, or a seccomp filter
        _log.debug("pidfd_open unavailable (%s); reaping with a thread", exc)
        pidfd = None
    return _Spawned(popen, pidfd)


def _discard(future: concurrent.futures.Future[_Spawned]) -> None:
    """Kill and reap a child whose starter was cancelled mid-spawn."""
    if future.cancelled() or future.exception() is not None:
        return
    spawned = future.result()
    spawned.popen.kill()
    spawned.popen.wait()  # after SIGKILL: prompt
    if spawned.pidfd is not None:
        os.close(spawned.pidfd)


async def _finish_despite_cancel(task: asyncio.Future[_T]) -> _T:
    """Await ``task`` to the end even if we are cancelled; re-raise the cancel after."""
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            if task.done():  # the cleanup itself was cancelled (loop shutdown)
                raise
            cancelled = exc
            continue
        if cancelled is not None:
            raise cancelled
        return result


def _read_tail(path: Path | None, limit: int) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            data = f.read(limit)
    except FileNotFoundError:
        return ""
    return data.decode("utf-8", errors="replace")


# --- the process -------------------------------------------------------------------------


class ChildProcess:
    """One QEMU child: start, wait, terminate. Use it from one event loop at a time.

    ``returncode`` follows `subprocess`: the exit status, or ``-N`` if killed by signal N.
    """

    def __init__(self, *, spawner: Spawner | None = None) -> None:
        """``spawner`` runs the fork; by default the process-wide `shared_spawner`."""
        self._spawner = spawner
        self._popen: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._reaped: concurrent.futures.Future[int] | None = None  # fallback without pidfd
        self._argv: tuple[str, ...] = ()
        self._stderr_path: Path | None = None
        self._stdout_path: Path | None = None

    async def start(
        self,
        argv: Sequence[str],
        *,
        pass_fds: Sequence[int] = (),
        stderr_path: Path,
        stdout_path: Path | None = None,
        stdin_devnull: bool = True,
        own_process_group: bool = True,
        readonly: Sequence[Path] = (),
        transparent_hugepages: bool = True,
    ) -> None:
        """Start ``argv`` (no shell) with output in files and a parent-death SIGKILL.

        Args:
            argv: program and arguments; ``argv[0]`` is looked up on PATH.
            pass_fds: descriptors the child keeps, at the same numbers.
            stderr_path: file for QEMU's stderr (and stdout if ``stdout_path`` is None).
            stdout_path: separate file for stdout.
            stdin_devnull: give the child /dev/null as stdin (else it inherits ours).
            own_process_group: put the child in its own process group; pass False for an
                interactive console on the terminal.
            readonly: directories the child sees read-only (see `_child_setup`).
            transparent_hugepages: False turns THP off for the child (see `_child_setup`).

        Raises:
            LaunchError: the program could not be executed.
            VMStateError: this object was already started.
        """
        if self._popen is not None:
            raise VMStateError(f"QEMU process already started (pid {self._popen.pid})")
        args = list(argv)
        if not args:
            raise LaunchError("cannot start QEMU: empty argv")
        spawner = self._spawner if self._spawner is not None else shared_spawner()
        job = spawner.submit(
            lambda: _spawn(
                args,
                tuple(pass_fds),
                stderr_path,
                stdout_path,
                stdin_devnull,
                own_process_group,
                tuple(readonly),
                transparent_hugepages,
            )
        )
        try:
            spawned = await asyncio.shield(asyncio.wrap_future(job))
        except asyncio.CancelledError:
            if not job.cancel():
                job.add_done_callback(_discard)
            raise

        self._popen = spawned.popen
        self._pidfd = spawned.pidfd
        self._argv = tuple(args)
        self._stderr_path = stderr_path
        self._stdout_path = stdout_path
        if spawned.pidfd is None:
            self._reaped = concurrent.futures.Future()
            threading.Thread(
                target=self._reap_blocking, name=f"pyqvm-reap-{spawned.popen.pid}", daemon=True
            ).start()
        _log.debug("started pid %d: %s", spawned.popen.pid, shlex.join(args))

    def _reap_blocking(self) -> None:
        assert self._popen is not None and self._reaped is not None
        self._reaped.set_result(self._popen.wait())

    def _require(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise VMStateError("QEMU process not started")
        return self._popen

    def _poll(self) -> int | None:
        popen = self._require()
        rc = popen.poll()
        if rc is not None and self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        return rc

    @property
    def argv(self) -> tuple[str, ...]:
        return self._argv

    @property
    def pid(self) -> int:
        """The child's pid. Raises `VMStateError` before `start`."""
        return self._require().pid

    @property
    def returncode(self) -> int | None:
        """Exit status once the child has exited (``-N`` for signal N), else None."""
        return None if self._popen is None else self._poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._poll() is None

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit and return its returncode.

        Raises:
            PyqvmTimeoutError: still running after ``timeout`` seconds (it is left running).
        """
        rc = self._poll()
        if rc is not None:
            return rc
        try:
            async with asyncio.timeout(timeout):
                await self._exited()
        except TimeoutError:
            raise PyqvmTimeoutError(
                f"QEMU (pid {self.pid}) still running after {timeout} s"
            ) from None
        rc = self._poll()
        if rc is None:  # the pidfd said it exited, so this waitpid returns at once
            rc = self._require().wait()
            self._poll()
        return rc

    async def _exited(self) -> None:
        if self._pidfd is None:
            assert self._reaped is not None
            await asyncio.shield(asyncio.wrap_future(self._reaped))
            return
        loop = asyncio.get_running_loop()
        # A private dup per waiter: add_reader allows one callback per fd and loop.
        fd = os.dup(self._pidfd)
        readable: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(fd, on_readable)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    def kill(self) -> None:
        """Send SIGKILL (no wait; `wait` reaps). A no-op once the child is reaped."""
        popen = self._require()
        if self._poll() is None:
            popen.kill()

    async def terminate(self, timeout: float) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL and wait; return the returncode.

        The child is always reaped, even if the caller is cancelled meanwhile (the
        cancellation is re-raised once the child is gone).
        """
        self._require()
        return await _finish_despite_cancel(asyncio.ensure_future(self._terminate(timeout)))

    async def _terminate(self, timeout: float) -> int:
        popen = self._require()
        rc = self._poll()
        if rc is not None:
            return rc
        popen.terminate()
        try:
            return await self.wait(timeout)
        except PyqvmTimeoutError:
            _log.warning(
                "QEMU pid %d ignored SIGTERM for %s s; sending SIGKILL", popen.pid, timeout
            )
        popen.kill()
        return await self.wait(None)

    def stderr_text(self, limit: int = TAIL_BYTES) -> str:
        """The last ``limit`` bytes QEMU wrote to stderr (and stdout, if not separate)."""
        return _read_tail(self._stderr_path, limit)

    def stdout_text(self, limit: int = TAIL_BYTES) -> str:
        """The last ``limit`` bytes of stdout, or "" if stdout had no file of its own."""
        return _read_tail(self._stdout_path, limit)

    def __repr__(self) -> str:
        if self._popen is None:
            return "ChildProcess(not started)"
        return f"ChildProcess(pid={self._popen.pid}, returncode={self.returncode})"
