"""SIGKILL the Python process that holds a VM: QEMU (and the virtiofsd of each share) must die
with it, and the runtime dir it could not remove is reclaimed by the next pyqvm process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _fault_helpers import processes_naming, wait_gone

from pyqvm.process import RuntimeDir

pytestmark = pytest.mark.qemu

CHILD = Path(__file__).with_name("_vm_child.py")


def _gone(pid: int) -> bool:
    # QEMU was re-parented to init, which reaps it: gone means no /proc entry at all.
    return not Path(f"/proc/{pid}").exists()


def test_sigkilled_launcher_leaves_no_qemu_and_no_rundir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A private runtime base: another pyqvm process on this machine would reclaim in /tmp.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    child = subprocess.Popen([sys.executable, str(CHILD)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())
        pid, rundir = int(info["pid"]), Path(info["rundir"])
        assert rundir.parent == tmp_path
        assert Path(f"/proc/{pid}").exists() and rundir.is_dir()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 10
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid), f"QEMU {pid} outlived its launcher"
        assert rundir.is_dir()  # nothing could run in the killed process
        RuntimeDir().cleanup()  # the next pyqvm process reclaims it
        assert not rundir.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_sigkilled_launcher_leaves_no_virtiofsd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shared = tmp_path / "shared"
    run.mkdir()
    shared.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    child = subprocess.Popen(
        [sys.executable, str(CHILD), f"share:{shared}"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())
        pid, rundir = int(info["pid"]), Path(info["rundir"])
        # QEMU, and virtiofsd with the fork it sandboxes itself in: each names its socket.
        helpers = [p for p in processes_naming(rundir) if p != pid]
        names = {Path(f"/proc/{p}/exe").resolve().name for p in helpers}
        assert names == {"virtiofsd"} and len(helpers) >= 1, (helpers, names)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        left = [p for p in (pid, *helpers) if not wait_gone([p], 10)]
        assert not left, f"{left} outlived their launcher ({names})"
        assert processes_naming(rundir) == []
        RuntimeDir().cleanup()
        assert not rundir.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_sigkilled_launcher_leaves_no_network_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The runtime root holds the networks too: a short private one (unix socket paths).
    root = Path(tempfile.mkdtemp(prefix="pq-kill-"))
    monkeypatch.setenv("PYQVM_RUNTIME_DIR", str(root))
    child = subprocess.Popen(
        [sys.executable, str(CHILD), "net:killnet"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())
        pid = int(info["pid"])
        network = root / "networks" / "killnet"
        owner = int((network / "owner.lock").read_text())
        switches = [p for p in processes_naming(network) if p != pid]
        assert owner in switches and len(switches) == 2, switches  # the owner and vde_switch
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        # QEMU dies with its launcher; the network's owner sees no port left and ends.
        left = [p for p in (pid, *switches) if not wait_gone([p], 15)]
        assert not left, f"{left} outlived the launcher"
        assert not (network / "sw").exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
        shutil.rmtree(root, ignore_errors=True)
