"""SIGKILL the Python process that holds a VM: QEMU (and the virtiofsd of each share, the
swtpm of a TPM) must die with it, and the runtime dir it could not remove is reclaimed by
the next pyqvm process; a launch that fails leaves no swtpm either."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _fault_helpers import processes_naming, wait_gone

from pyqvm.runtime.dirs import RuntimeDir

pytestmark = pytest.mark.qemu

CHILD = Path(__file__).with_name("_vm_child.py")


@contextlib.contextmanager
def launcher(*args: str) -> Iterator[tuple[int, Path]]:
    """`_vm_child.py ARGS` holding one VM: yields its QEMU pid and runtime dir, then
    SIGKILLs the launcher on leaving (and reaps it)."""
    child = subprocess.Popen([sys.executable, str(CHILD), *args], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())
        yield int(info["pid"]), Path(info["rundir"])
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if child.stdout is not None:
            child.stdout.close()


def test_sigkilled_launcher_leaves_no_qemu_and_no_rundir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A private runtime base: another pyqvm process on this machine would reclaim in /tmp.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with launcher() as (pid, rundir):
        assert rundir.parent == tmp_path
        assert Path(f"/proc/{pid}").exists() and rundir.is_dir()
    # QEMU was re-parented to init, which reaps it: gone means no /proc entry at all.
    assert wait_gone([pid], 10), f"QEMU {pid} outlived its launcher"
    assert rundir.is_dir()  # nothing could run in the killed process
    RuntimeDir().cleanup()  # the next pyqvm process reclaims it
    assert not rundir.exists()


def test_sigkilled_launcher_leaves_no_virtiofsd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shared = tmp_path / "shared"
    run.mkdir()
    shared.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    with launcher(f"share:{shared}") as (pid, rundir):
        # QEMU, and virtiofsd with the fork it sandboxes itself in: each names its socket.
        helpers = [p for p in processes_naming(rundir) if p != pid]
        names = {Path(f"/proc/{p}/exe").resolve().name for p in helpers}
        assert names == {"virtiofsd"} and len(helpers) >= 1, (helpers, names)
    left = [p for p in (pid, *helpers) if not wait_gone([p], 10)]
    assert not left, f"{left} outlived their launcher ({names})"
    assert processes_naming(rundir) == []
    RuntimeDir().cleanup()
    assert not rundir.exists()


def test_sigkilled_launcher_leaves_no_swtpm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with launcher("tpm:on") as (pid, rundir):
        helpers = [p for p in processes_naming(rundir) if p != pid]
        names = {Path(f"/proc/{p}/exe").resolve().name for p in helpers}
        assert names == {"swtpm"}, (helpers, names)
    left = [p for p in (pid, *helpers) if not wait_gone([p], 10)]
    assert not left, f"{left} outlived their launcher"
    RuntimeDir().cleanup()
    assert not rundir.exists()


def test_a_launch_that_fails_leaves_no_swtpm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyqvm import VM, VMSpec
    from pyqvm.errors import LaunchError

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    vm = VM(VMSpec(tpm=True, guest_agent=False, ready="none", extra_args=("-no-such-option",)))
    with pytest.raises(LaunchError, match="no-such-option"):
        vm.start()
    assert processes_naming(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_sigkilled_launcher_leaves_no_network_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    # The runtime root holds the networks too: a short private one (unix socket paths).
    root = Path(tempfile.mkdtemp(prefix="pq-kill-"))
    monkeypatch.setenv("PYQVM_RUNTIME_DIR", str(root))
    try:
        with launcher("net:killnet") as (pid, _rundir):
            network = root / "networks" / "killnet"
            owner = int((network / "owner.lock").read_text())
            switches = [p for p in processes_naming(network) if p != pid]
            assert owner in switches and len(switches) == 2, switches  # owner and vde_switch
        # QEMU dies with its launcher; the network's owner sees no port left and ends.
        left = [p for p in (pid, *switches) if not wait_gone([p], 15)]
        assert not left, f"{left} outlived the launcher"
        assert not (network / "sw").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)
