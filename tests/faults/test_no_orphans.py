"""SIGKILL the Python process that started QEMU: QEMU must die with it (PDEATHSIG)."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

QEMU = shutil.which("qemu-system-x86_64")
HELPER = Path(__file__).with_name("_launcher_child.py")
SRC = Path(__file__).resolve().parents[2] / "src"

pytestmark = pytest.mark.qemu
# QEMU is installed wherever the suite runs (scripts/setup.sh): its absence is a failure.
assert QEMU is not None, "qemu-system-x86_64 missing: apt-get install -y qemu-system-x86"


def _state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` (``Z`` for a zombie), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _dead(pid: int) -> bool:
    # A zombie is dead; its new parent (init or a subreaper), not us, will reap it.
    return _state(pid) in (None, "Z")


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _dead(pid):
            return True
        time.sleep(0.02)
    return _dead(pid)


class Launcher:
    def __init__(self, variant: str, tmp_path: Path) -> None:
        assert QEMU is not None
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
        )
        self.errlog = tmp_path / "launcher.err"
        with open(self.errlog, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(HELPER), variant, QEMU, str(tmp_path / "qemu.err")],
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
            )
        self.qemu_pid: int | None = None
        self.data: dict[str, object] = {}

    def report(self, timeout: float = 20) -> dict[str, object]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            pytest.fail(f"launcher printed nothing; stderr:\n{self.errlog.read_text()}")
        data: dict[str, object] = json.loads(line)
        pid = data["pid"]
        assert isinstance(pid, int)
        self.qemu_pid = pid
        self.data = data
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        if self.qemu_pid is not None and not _dead(self.qemu_pid):
            os.kill(self.qemu_pid, signal.SIGKILL)  # never leave one behind, even on failure


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[list[Launcher]]:
    made: list[Launcher] = []
    yield made
    for each in made:
        each.close()


def _start(made: list[Launcher], variant: str, tmp_path: Path) -> tuple[Launcher, int]:
    la = Launcher(variant, tmp_path)
    made.append(la)
    la.report()
    pid = la.qemu_pid
    assert pid is not None
    assert _ppid(pid) == la.proc.pid, "QEMU is not a child of the launcher"
    with open(f"/proc/{pid}/stat") as f:
        assert "(qemu-system-" in f.read()
    return la, pid


@pytest.mark.parametrize("variant", ["main", "thread"])
def test_qemu_dies_with_sigkilled_launcher(
    variant: str, tmp_path: Path, launcher: list[Launcher]
) -> None:
    la, pid = _start(launcher, variant, tmp_path)
    assert not _dead(pid), "QEMU is not running after start"
    if variant == "thread":
        # The starter thread has ended and its death signal would have hit by now.
        assert la.data["alive_after_thread"] is True

    la.proc.send_signal(signal.SIGKILL)
    la.proc.wait(10)

    assert _wait_dead(pid, 10), f"QEMU pid {pid} outlived its SIGKILLed parent"


def test_control_without_death_signal_leaves_an_orphan(
    tmp_path: Path, launcher: list[Launcher]
) -> None:
    """Proves the check above can fail: without PDEATHSIG, QEMU survives its parent."""
    la, pid = _start(launcher, "control", tmp_path)
    assert not _dead(pid)
    la.proc.send_signal(signal.SIGKILL)
    la.proc.wait(10)
    assert not _wait_dead(pid, 0.5)
    assert _ppid(pid) != la.proc.pid  # reparented to init or a subreaper
    os.kill(pid, signal.SIGKILL)
    assert _wait_dead(pid, 10)


def test_control_forking_on_a_short_lived_thread_kills_qemu_early(
    tmp_path: Path, launcher: list[Launcher]
) -> None:
    """Proves the trap the spawner thread avoids: PDEATHSIG follows the forking thread."""
    la, pid = _start(launcher, "inline", tmp_path)
    assert la.data["alive_after_thread"] is False
    assert _wait_dead(pid, 5)
