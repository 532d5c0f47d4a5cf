"""The launching process SIGKILLed (issue 12, item 1) while it holds several in-process VMs
and talks to a named VM: nothing of the in-process VMs survives, the named VM does.

Each of the 50 trials starts a child Python process (``_clones_child.py``) that starts two
clones of the session's template (their QEMUs are its children, with PR_SET_PDEATHSIG) and
starts (trial 1: its owner process is launched from the child) or attaches to (later
trials) one named VM, keeps them all busy, and is SIGKILLed at a seeded random moment once
they are up. Then: every clone's QEMU is dead within 1 s; the runtime dirs the child could
not remove are reclaimed by the next VM start (the next trial's child, or a `RuntimeDir`
made here after the last); the named VM, detached on purpose, still runs and answers. At
the end it is stopped and nothing at all is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _fault_helpers import dead, processes_naming, rng, summary, wait_dead, wait_gone

from pyqvm import AsyncNamedVM, Template
from pyqvm.runtime.dirs import RuntimeDir

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

TRIALS = 50
CLONES = 2  # plus the named VM: three QEMUs at once
NAME = "survivor"
CHILD = Path(__file__).with_name("_clones_child.py")
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def private_runtime(default_template: Template, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A registry and a runtime-dir base of this test's own (short paths: sockets live
    there), inherited by the children and the owner; nothing may be left in either."""
    base = Path(tempfile.mkdtemp(prefix="pq-lk-"))
    base.chmod(0o700)
    (base / "reg").mkdir(mode=0o700)
    (base / "run").mkdir(mode=0o700)
    monkeypatch.setenv("PYQVM_RUNTIME_DIR", str(base / "reg"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base / "run"))
    monkeypatch.setenv("PYQVM_TEMPLATES_DIR", str(default_template.directory.parent))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    )
    try:
        yield base
    finally:
        vms = base / "reg" / "vms"
        left = sorted(p.name for p in vms.iterdir()) if vms.is_dir() else []
        for lock in vms.glob("*/lock") if vms.is_dir() else []:
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(lock.read_text()), signal.SIGKILL)  # its QEMU dies with it
        shutil.rmtree(base, ignore_errors=True)
        assert left == [], f"named VMs left running: {left}"


class Child:
    def __init__(self, template: str, mode: str, errlog: Path) -> None:
        self.errlog = errlog
        with open(errlog, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD), template, str(CLONES), NAME, mode],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        self.report: dict[str, Any] = {}

    def read_report(self, timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the child printed nothing; its stderr:\n{self.errlog.read_text()}")
        self.report = json.loads(line)
        return self.report

    def qemu_pids(self) -> list[int]:
        return [int(p) for p in self.report.get("qemu", [])]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        for pid in self.qemu_pids():  # never leave one behind, even on failure
            if not dead(pid):
                os.kill(pid, signal.SIGKILL)


async def _named_answers() -> dict[str, Any]:
    async with await AsyncNamedVM.attach(NAME) as vm:
        assert (await vm.run(["echo", "alive"], check=True)).stdout == b"alive\n"
        assert (await vm.execute("query-status"))["status"] == "running"
        info: dict[str, Any] = await vm.info()
        return info


def test_sigkilled_launcher_takes_its_vms_along_and_leaves_named_vms_running(
    default_template: Template, private_runtime: Path, tmp_path: Path
) -> None:
    r = rng("launcher-killed")
    rundir_base = private_runtime / "run"
    previous_dirs: list[Path] = []
    named: dict[str, Any] = {}
    to_dead: list[float] = []
    t_all = time.monotonic()
    try:
        for trial in range(1, TRIALS + 1):
            child = Child(default_template.name, "up" if trial == 1 else "attach", tmp_path / "e")
            try:
                report = child.read_report()
                pids = child.qemu_pids()
                rundirs = [Path(p) for p in report["rundirs"]]
                if trial == 1:
                    named = report["named"]
                assert report["named"] == named, "the named VM changed under us"
                # The runtime dirs the last killed child left were reclaimed by this start.
                assert [d for d in previous_dirs if d.exists()] == [], "stale dirs not reclaimed"
                assert all(not dead(p) for p in pids) and all(d.is_dir() for d in rundirs)
                assert all(d.parent == rundir_base for d in rundirs)
                delay = r.uniform(0.0, 0.5)
                time.sleep(delay)
                assert child.proc.poll() is None, child.errlog.read_text()
                child.proc.send_signal(signal.SIGKILL)
                t_kill = time.monotonic()
                child.proc.wait(10)
                assert wait_dead(pids, 1.0), f"trial {trial}: a clone's QEMU outlived its launcher"
                took = time.monotonic() - t_kill
                to_dead.append(took)
                assert wait_gone(pids, 5.0), "a dead QEMU was never reaped"
                # Nothing in the killed process could remove its runtime dirs.
                assert all(d.is_dir() for d in rundirs)
                previous_dirs = rundirs
            finally:
                child.close()
            # The named VM is detached on purpose: it runs on and answers.
            owner, qemu = int(named["owner_pid"]), int(named["qemu_pid"])
            assert not dead(owner) and not dead(qemu), f"trial {trial}: the named VM died"
            assert Path(str(named["runtime_dir"])).is_dir()
            info = asyncio.run(_named_answers())
            assert info["qemu_pid"] == qemu
            print(
                f"trial {trial}: killed at +{delay:.3f} s after the VMs were up; "
                f"QEMUs {pids} dead {took:.3f} s later"
            )
        # The last child's dirs: the next VM start anywhere reclaims them.
        RuntimeDir().cleanup()
        assert [d for d in previous_dirs if d.exists()] == []
    finally:
        print(summary("kill -> all clone QEMUs dead, s", to_dead))
        if named:
            asyncio.run(_stop_named())
    owner, qemu = int(named["owner_pid"]), int(named["qemu_pid"])
    assert wait_gone([qemu], 5.0) and wait_dead([owner], 5.0)
    assert not Path(str(named["runtime_dir"])).exists()
    assert list((private_runtime / "reg" / "vms").iterdir()) == []
    assert [p.name for p in rundir_base.iterdir()] == [], "runtime dirs left"
    print(f"{TRIALS} trials; wall time {time.monotonic() - t_all:.1f} s")


async def _stop_named() -> None:
    async with await AsyncNamedVM.attach(NAME) as vm:
        await vm.stop()


STARTING_TRIALS = 20


def test_a_launcher_sigkilled_while_its_vms_start_leaves_nothing(
    default_template: Template, private_runtime: Path, tmp_path: Path
) -> None:
    """Killed at a random moment of the start itself (overlays being made, QEMU forked,
    state loading): whatever was started dies with it, whatever dir it made is reclaimed."""
    r = rng("launcher-killed-starting")
    rundir_base = private_runtime / "run"
    t_all = time.monotonic()
    named_qemu = asyncio.run(_up_named(default_template.name))  # attached to by the children
    named_dirs = set(rundir_base.iterdir())
    ran: list[int] = []
    seen: dict[int, int] = {}  # how many VM processes ran at the kill -> trials
    try:
        for trial in range(1, STARTING_TRIALS + 1):
            child = Child(default_template.name, "attach", tmp_path / "e")
            try:
                delay = r.uniform(0.1, 0.8)
                time.sleep(delay)
                ran = [p for p in processes_naming(rundir_base) if p != named_qemu]
                child.proc.send_signal(signal.SIGKILL)
                child.proc.wait(10)
                end = time.monotonic() + 1.0
                while (left := [p for p in processes_naming(rundir_base) if p != named_qemu]) and (
                    time.monotonic() < end
                ):
                    time.sleep(0.01)
            finally:
                child.close()
            assert left == [], f"trial {trial}: {left} outlived the launcher by 1 s"
            assert asyncio.run(_named_answers())["qemu_pid"] == named_qemu
            RuntimeDir().cleanup()  # the next VM start reclaims what the child left
            stale = sorted(set(rundir_base.iterdir()) - named_dirs)
            assert stale == [], f"trial {trial}: runtime dirs not reclaimed: {stale}"
            seen[len(ran)] = seen.get(len(ran), 0) + 1
            print(f"trial {trial}: killed {delay:.3f} s after spawn, with {len(ran)} VM processes")

    finally:
        asyncio.run(_stop_named())
    assert list((private_runtime / "reg" / "vms").iterdir()) == []
    assert [p.name for p in rundir_base.iterdir()] == [], "runtime dirs left"
    print(f"VM processes running at the kill -> trials: {seen}")
    print(f"{STARTING_TRIALS} trials; wall time {time.monotonic() - t_all:.1f} s")


async def _up_named(template: str) -> int:
    async with await AsyncNamedVM.up(name=NAME, template=template) as vm:
        qemu: int = (await vm.info())["qemu_pid"]
        return qemu
