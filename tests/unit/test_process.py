"""ChildProcess and RuntimeDir with small stand-in children (and one real QEMU)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyqvm.errors import LaunchError, PyqvmTimeoutError, VMStateError
from pyqvm.runtime.children import ChildProcess, SpawnerThread, shared_spawner
from pyqvm.runtime.dirs import RuntimeDir

PY = sys.executable
QEMU = shutil.which("qemu-system-x86_64")


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _proc_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
    raise KeyError(name)


# --- RuntimeDir ---------------------------------------------------------------------------


def test_runtime_dir_is_private_and_cleanup_is_idempotent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "xdg"
    base.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    rd = RuntimeDir()
    assert rd.path.parent == base
    assert rd.path.name.startswith("pyqvm-")
    assert stat.S_IMODE(rd.path.stat().st_mode) == 0o700
    (rd.path / "sub").mkdir()
    (rd.path / "sub" / "qmp.sock").write_text("x")
    rd.cleanup()
    assert not rd.path.exists()
    rd.cleanup()  # already gone: no error


def test_runtime_dir_ignores_unusable_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent/run/user/1000")
    with RuntimeDir() as rd:
        assert rd.path.is_dir()
        assert not str(rd.path).startswith("/nonexistent")
    assert not rd.path.exists()


# --- ChildProcess with stand-in children ---------------------------------------------------


@pytest.mark.asyncio
async def test_wait_returns_exit_code_and_captures_output(tmp_path: Path) -> None:
    p = ChildProcess()
    code = "import sys; print('to-out'); print('to-err', file=sys.stderr); sys.exit(3)"
    await p.start(
        [PY, "-c", code], stderr_path=tmp_path / "err.log", stdout_path=tmp_path / "out.log"
    )
    assert await p.wait(10) == 3
    assert p.returncode == 3
    assert not p.running
    assert p.stderr_text().strip() == "to-err"
    assert p.stdout_text().strip() == "to-out"


@pytest.mark.asyncio
async def test_stdout_shares_the_stderr_file_by_default(tmp_path: Path) -> None:
    p = ChildProcess()
    code = "import sys; print('a', flush=True); print('b', file=sys.stderr)"
    await p.start([PY, "-c", code], stderr_path=tmp_path / "err.log")
    assert await p.wait(10) == 0
    assert p.stderr_text().split() == ["a", "b"]
    assert p.stdout_text() == ""


@pytest.mark.asyncio
async def test_stderr_text_is_tail_limited(tmp_path: Path) -> None:
    p = ChildProcess()
    code = "import sys; sys.stderr.write('x' * 100000 + 'END')"
    await p.start([PY, "-c", code], stderr_path=tmp_path / "err.log")
    await p.wait(10)
    assert len(p.stderr_text()) == 64 * 1024
    assert p.stderr_text().endswith("END")
    assert p.stderr_text(limit=3) == "END"


@pytest.mark.asyncio
async def test_wait_timeout_leaves_it_running_then_terminate(tmp_path: Path) -> None:
    p = ChildProcess()
    await p.start(["sleep", "30"], stderr_path=tmp_path / "err.log")
    assert p.running and p.returncode is None
    with pytest.raises(PyqvmTimeoutError) as info:
        await p.wait(0.05)
    assert isinstance(info.value, TimeoutError)
    assert p.running
    assert await p.terminate(5) == -signal.SIGTERM
    assert p.returncode == -signal.SIGTERM
    assert not _alive(p.pid)
    assert await p.terminate(5) == -signal.SIGTERM  # again: no-op


async def start_ignoring_sigterm(tmp_path: Path) -> ChildProcess:
    """A child that ignores SIGTERM, returned once the SIG_IGN is in place."""
    p = ChildProcess()
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    out = tmp_path / "out.log"
    await p.start([PY, "-c", code], stderr_path=tmp_path / "err.log", stdout_path=out)
    deadline = time.monotonic() + 10
    while "ready" not in p.stdout_text():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    return p


@pytest.mark.asyncio
async def test_terminate_escalates_to_sigkill(tmp_path: Path) -> None:
    p = await start_ignoring_sigterm(tmp_path)
    started = time.monotonic()
    assert await p.terminate(0.2) == -signal.SIGKILL
    assert time.monotonic() - started < 5


@pytest.mark.asyncio
async def test_kill_then_wait(tmp_path: Path) -> None:
    p = ChildProcess()
    await p.start(["sleep", "30"], stderr_path=tmp_path / "err.log")
    p.kill()
    assert await p.wait(5) == -signal.SIGKILL
    p.kill()  # reaped already: no-op


@pytest.mark.asyncio
async def test_concurrent_waiters_all_wake(tmp_path: Path) -> None:
    p = ChildProcess()
    await p.start(["sleep", "30"], stderr_path=tmp_path / "err.log")
    waiters = [asyncio.ensure_future(p.wait(10)) for _ in range(3)]
    await asyncio.sleep(0)
    p.kill()
    assert await asyncio.gather(*waiters) == [-signal.SIGKILL] * 3


@pytest.mark.asyncio
async def test_cancelled_wait_does_not_disturb_the_process(tmp_path: Path) -> None:
    p = ChildProcess()
    await p.start(["sleep", "30"], stderr_path=tmp_path / "err.log")
    waiter = asyncio.ensure_future(p.wait(None))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert p.running
    assert await p.terminate(5) == -signal.SIGTERM


@pytest.mark.asyncio
async def test_terminate_finishes_even_if_caller_is_cancelled(tmp_path: Path) -> None:
    p = await start_ignoring_sigterm(tmp_path)
    stopper = asyncio.ensure_future(p.terminate(0.3))
    await asyncio.sleep(0.05)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    # The cancellation surfaced only after the child was killed and reaped.
    assert p.returncode == -signal.SIGKILL


@pytest.mark.asyncio
async def test_pass_fds_reach_the_child(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        p = ChildProcess()
        code = f"import os; os.write({w}, b'hello')"
        await p.start([PY, "-c", code], pass_fds=[w], stderr_path=tmp_path / "err.log")
        assert await p.wait(10) == 0
        assert os.read(r, 5) == b"hello"
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.asyncio
async def test_child_has_pdeathsig_devnull_stdin_and_own_group(tmp_path: Path) -> None:
    p = ChildProcess()
    code = (
        "import ctypes, os, sys\n"
        "sig = ctypes.c_int()\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)\n"  # PR_GET_PDEATHSIG
        "print(sig.value, os.getpgrp() == os.getpid(), os.path.realpath('/proc/self/fd/0'))\n"
    )
    out = tmp_path / "out.log"
    await p.start([PY, "-c", code], stderr_path=tmp_path / "err.log", stdout_path=out)
    assert await p.wait(10) == 0, p.stderr_text()
    assert p.stdout_text().split() == [str(int(signal.SIGKILL)), "True", "/dev/null"]


@pytest.mark.asyncio
@pytest.mark.parametrize("thp", [True, False])
async def test_child_can_be_kept_off_transparent_hugepages(tmp_path: Path, thp: bool) -> None:
    """A template's or a clone's QEMU has THP off (pyqvm.launch.plan.FILE_RAM): the flag
    survives the exec; other children keep the host's setting."""
    p = ChildProcess()
    code = "import ctypes; print(ctypes.CDLL(None).prctl(42, 0, 0, 0, 0))"  # PR_GET_THP_DISABLE
    out = tmp_path / "out.log"
    await p.start(
        [PY, "-c", code],
        stderr_path=tmp_path / "err.log",
        stdout_path=out,
        transparent_hugepages=thp,
    )
    assert await p.wait(10) == 0, p.stderr_text()
    assert p.stdout_text().split() == ["0" if thp else "1"]


def test_child_starts_with_no_blocked_signals(tmp_path: Path) -> None:
    # The spawner thread is born in whichever thread spawns first; that one blocks SIGTERM.
    p: ChildProcess | None = None

    def in_thread() -> None:
        nonlocal p
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        p = ChildProcess(spawner=SpawnerThread())
        asyncio.run(p.start(["sleep", "30"], stderr_path=tmp_path / "err.log"))

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert p is not None
    try:
        assert int(_proc_field(p.pid, "SigBlk"), 16) == 0
    finally:
        assert asyncio.run(p.terminate(5)) == -signal.SIGTERM


@pytest.mark.asyncio
async def test_cancelled_start_kills_the_child_it_made(tmp_path: Path) -> None:
    release = threading.Event()
    made: list[int] = []

    class SlowSpawner:
        """Holds the fork back until the caller has given up on it."""

        def submit(self, job: Callable[[], Any]) -> concurrent.futures.Future[Any]:
            def slow() -> Any:
                release.wait(10)
                spawned = job()
                made.append(spawned.popen.pid)
                return spawned

            return shared_spawner().submit(slow)

    starter = asyncio.ensure_future(
        ChildProcess(spawner=SlowSpawner()).start(["sleep", "30"], stderr_path=tmp_path / "err.log")
    )
    await asyncio.sleep(0.01)
    starter.cancel()
    release.set()  # the fork happens after the caller gave up
    with pytest.raises(asyncio.CancelledError):
        await starter
    deadline = time.monotonic() + 5
    while not made or _alive(made[0]) or os.path.exists(f"/proc/{made[0]}"):
        assert time.monotonic() < deadline, "the orphaned spawn was not killed and reaped"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_missing_binary_is_a_launch_error(tmp_path: Path) -> None:
    p = ChildProcess()
    argv = ["/nonexistent/qemu-system-x86_64", "-S"]
    with pytest.raises(LaunchError) as info:
        await p.start(argv, stderr_path=tmp_path / "err.log")
    assert info.value.argv == argv
    assert "/nonexistent/qemu-system-x86_64" in str(info.value)
    with pytest.raises(VMStateError):
        _ = p.pid
    assert p.returncode is None and not p.running


@pytest.mark.asyncio
async def test_unwritable_log_is_a_launch_error(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="cannot open"):
        await ChildProcess().start(["true"], stderr_path=tmp_path / "no" / "err.log")


@pytest.mark.asyncio
async def test_start_twice_is_refused(tmp_path: Path) -> None:
    p = ChildProcess()
    await p.start(["true"], stderr_path=tmp_path / "err.log")
    with pytest.raises(VMStateError, match="already started"):
        await p.start(["true"], stderr_path=tmp_path / "err.log")
    assert await p.wait(5) == 0


@pytest.mark.asyncio
async def test_fallback_reaper_without_pidfd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    p = ChildProcess()
    await p.start(["sleep", "30"], stderr_path=tmp_path / "err.log")
    with pytest.raises(PyqvmTimeoutError):
        await p.wait(0.05)
    assert await p.terminate(5) == -signal.SIGTERM


def test_spawns_from_a_short_lived_thread_survive_it(tmp_path: Path) -> None:
    """PDEATHSIG follows the forking thread: a caller thread's exit must not kill QEMU."""
    p = ChildProcess()

    def in_thread() -> None:
        asyncio.run(p.start(["sleep", "30"], stderr_path=tmp_path / "err.log"))

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    try:
        assert p.running
        # PR_SET_PDEATHSIG is tied to the spawner thread, which is still alive.
        assert shared_spawner().thread.is_alive()
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:  # a pdeathsig would land at once
            assert _alive(p.pid)
            time.sleep(0.02)
    finally:
        asyncio.run(p.terminate(5))


# --- real QEMU ----------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_real_qemu_starts_and_terminates(tmp_path: Path) -> None:
    assert QEMU is not None
    p = ChildProcess()
    argv = [QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-S"]
    await p.start(argv, stderr_path=tmp_path / "qemu.err")
    assert p.argv == tuple(argv)
    with pytest.raises(PyqvmTimeoutError):
        await p.wait(0.2)  # -S: it stays up, waiting
    assert p.running
    code = await p.terminate(10)
    # QEMU catches SIGTERM and exits with status 0 ("terminating on signal 15").
    assert code == 0
    assert "terminating on signal 15" in p.stderr_text()


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_real_qemu_bad_option_exits_with_stderr(tmp_path: Path) -> None:
    assert QEMU is not None
    p = ChildProcess()
    await p.start([QEMU, "-no-such-option"], stderr_path=tmp_path / "qemu.err")
    assert await p.wait(10) == 1
    assert "no-such-option" in p.stderr_text()
