"""Host trouble (issue 12, item 1): the runtime dir's parent unwritable, the disk full (a
small tmpfs), the QEMU binary missing -> a clear `PyqvmError` subclass whose message names
the problem (and the fix), raised before or at start, and nothing left: no QEMU, no
runtime dir, no half-made directory.

Where the runtime dir goes (``process._runtime_base``): ``$XDG_RUNTIME_DIR`` if it is ours
and writable, else Python's temporary directory (``tempfile.gettempdir()``: ``$TMPDIR``,
``/tmp``...). Read-only and full file systems are tmpfs mounts made here (root, or
``sudo -n``), unmounted after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import pytest
from _fault_helpers import dead, processes_naming

from pyqvm import AsyncVM, Template, VMSpec, VMState
from pyqvm.errors import (
    GuestPausedError,
    HostError,
    LaunchError,
    PyqvmError,
    VMStateError,
)
from pyqvm.host.facts import read_host_facts

pytestmark = [pytest.mark.e2e, pytest.mark.faults]  # and asyncio on each async test

NO_SPACE = "No space left on device"


def _as_root(*argv: str) -> None:
    cmd = list(argv) if os.geteuid() == 0 else ["sudo", "-n", *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    _as_root("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where))
    try:
        yield where
    finally:
        try:
            _as_root("umount", str(where))
        except AssertionError:
            _as_root("umount", "-l", str(where))  # still busy: detach it anyway


def fill(directory: Path, leave: int = 0) -> None:
    """Fill the file system of ``directory`` up, but for ``leave`` bytes."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (65536, 4096, 512):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
    finally:
        os.close(fd)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    st = os.statvfs(directory)
    print(f"{directory}: {st.f_bavail * st.f_frsize} bytes free")


def assert_nothing_left(vm: AsyncVM, *bases: Path) -> None:
    assert vm.state is VMState.FAILED, vm.state
    assert vm.pid is None or dead(vm.pid)
    assert vm.runtime_dir is None
    for base in bases:
        left = [p.name for p in base.iterdir() if p.name.startswith("pyqvm-")]
        assert left == [], f"left in {base}: {left}"
        assert processes_naming(base) == []


@pytest.fixture
def base() -> Iterator[Path]:
    """A short private directory for mounts (sockets live in runtime dirs)."""
    d = Path(tempfile.mkdtemp(prefix="pq-ht-"))
    yield d
    with contextlib.suppress(OSError):
        for p in d.iterdir():
            p.rmdir()
        d.rmdir()


# --- the runtime dir's parent unwritable --------------------------------------------------


@pytest.mark.asyncio
async def test_an_unwritable_xdg_runtime_dir_falls_back_to_the_temporary_directory(
    default_template: Template, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tmpfs(base / "ro", "ro,size=1M,mode=0700") as ro:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(ro))
        vm = await AsyncVM.from_template(default_template)
        try:
            assert vm.runtime_dir is not None
            assert vm.runtime_dir.parent == Path(tempfile.gettempdir()), vm.runtime_dir
            assert (await vm.run(["true"])).returncode == 0
        finally:
            rundir = vm.runtime_dir
            await vm.stop()
        assert not rundir.exists()
        assert list(ro.iterdir()) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["clone", "boot"])
async def test_an_unwritable_runtime_dir_base_is_a_clear_error(
    default_template: Template, base: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    with tmpfs(base / "ro", "ro,size=1M,mode=0700") as ro:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        monkeypatch.setattr(tempfile, "tempdir", str(ro))  # what $TMPDIR would choose
        vm = AsyncVM(default_template.clone_spec() if how == "clone" else VMSpec(image="default"))
        try:
            with pytest.raises(PyqvmError) as caught:
                if how == "clone":
                    await vm.start_from_template(default_template)
                else:
                    await vm.start()
        finally:
            monkeypatch.undo()
            await vm.stop()
        msg = str(caught.value)
        print(f"{type(caught.value).__name__}: {msg}")
        assert isinstance(caught.value, HostError), type(caught.value)
        assert str(ro) in msg and ("XDG_RUNTIME_DIR" in msg or "TMPDIR" in msg), msg
        assert_nothing_left(vm, ro)


# --- the disk full ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_full_runtime_dir_file_system_is_a_clear_error_and_leaves_nothing(
    default_template: Template, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tmpfs(base / "full", "size=2M,mode=0700") as full:
        fill(full)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(full))
        vm = AsyncVM(default_template.clone_spec())
        try:
            with pytest.raises(PyqvmError) as caught:
                await vm.start_from_template(default_template)
        finally:
            await vm.stop()
            half_made = [p.name for p in full.iterdir() if p.name.startswith("pyqvm-")]
            for p in full.glob("pyqvm-*"):  # the mount goes, whatever the outcome
                for f in p.iterdir():
                    f.unlink()
                p.rmdir()
        msg = str(caught.value)
        print(f"{type(caught.value).__name__}: {msg}")
        assert half_made == [], f"half-made runtime dirs left: {half_made}"
        assert isinstance(caught.value, HostError | LaunchError), type(caught.value)
        assert NO_SPACE in msg and str(full) in msg, msg
        assert_nothing_left(vm, full)


@pytest.mark.asyncio
async def test_no_room_for_an_overlay_is_a_launch_error_naming_it(
    default_template: Template, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tmpfs(base / "full", "size=2M,mode=0700") as full:
        fill(full, leave=64 * 1024)  # the runtime dir and its owner file fit, an overlay not
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(full))
        vm = AsyncVM(default_template.clone_spec())
        try:
            with pytest.raises(LaunchError) as caught:
                await vm.start_from_template(default_template)
        finally:
            await vm.stop()
        msg = str(caught.value)
        print(f"LaunchError: {msg}")
        assert NO_SPACE in msg and str(full) in msg and "overlay" in msg, msg
        assert_nothing_left(vm, full)


@pytest.mark.asyncio
@pytest.mark.asyncio
async def test_the_disk_filling_up_under_a_running_guest_is_named(
    default_template: Template, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU pauses the guest when its overlay's file system fills up (BLOCK_IO_ERROR,
    nospace; status io-error): the guest command fails at once with GuestPausedError naming
    the disk, its file and ENOSPC, not with a timeout, and the VM says it is paused."""
    with tmpfs(base / "full", "size=2M,mode=0700") as full:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(full))
        vm = await AsyncVM.from_template(default_template)
        pid, rundir = vm.pid, vm.runtime_dir
        try:
            fill_guest = "dd if=/dev/urandom of=/mnt/data/big bs=64k count=100; sync"
            t0 = time.monotonic()
            with pytest.raises(GuestPausedError) as caught:
                await vm.run(["sh", "-c", fill_guest], timeout=30)
            took = time.monotonic() - t0
            e = caught.value
            print(f"GuestPausedError after {took:.2f} s: {e}")
            assert took < 20, "it waited for the timeout instead of noticing the pause"
            assert (await vm.execute("query-status"))["status"] == "io-error"  # what QEMU knows
            assert vm.state is VMState.PAUSED
            assert e.nospace and NO_SPACE in str(e) and e.operation == "write"
            assert e.file is not None and e.file.startswith(str(full)), e.file
            assert e.file in str(e) and "free space" in str(e)
            # A later call, with the pause already there, is refused by state.
            with pytest.raises(VMStateError):
                await vm.run(["true"])
        finally:
            await vm.stop(timeout=3)
        assert pid is not None and rundir is not None
        assert dead(pid) and not rundir.exists()


# --- the QEMU binary missing --------------------------------------------------------------


MISSING = "qemu-system-x86_64 not found; install it with: apt-get install -y qemu-system-x86"


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["boot", "clone"])
async def test_no_qemu_on_path_is_a_host_error_naming_the_package(
    default_template: Template, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, how: str
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    vm = AsyncVM(VMSpec(image="default") if how == "boot" else default_template.clone_spec())
    with pytest.raises(HostError) as caught:
        if how == "boot":
            await vm.start()
        else:
            await vm.start_from_template(default_template)
    assert str(caught.value) == MISSING
    await vm.stop()
    assert vm.runtime_dir is None and vm.pid is None
    assert [p for p in tmp_path.iterdir() if p.name.startswith("pyqvm-")] == []


@pytest.mark.asyncio
async def test_host_facts_naming_a_vanished_qemu_binary_give_a_launch_error(
    default_image: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    gone = tmp_path / "bin" / "qemu-system-x86_64"
    facts = dataclasses.replace(read_host_facts(), qemu_binaries=MappingProxyType({"x86_64": gone}))
    vm = AsyncVM(VMSpec(image="default"), host=facts)
    with pytest.raises(LaunchError) as caught:
        await vm.start()
    msg = str(caught.value)
    assert f"cannot execute '{gone}'" in msg and "No such file or directory" in msg, msg
    await vm.stop()
    assert_nothing_left(vm, tmp_path)


@pytest.mark.parametrize("verb", ["run", "up"])
def test_the_cli_without_qemu_says_what_to_install(
    default_template: Template, tmp_path: Path, verb: str
) -> None:
    reg = Path(tempfile.mkdtemp(prefix="pq-ht-reg-"))
    env = dict(
        os.environ,
        PATH=str(tmp_path / "empty-bin"),
        PYQVM_RUNTIME_DIR=str(reg),
        XDG_RUNTIME_DIR=str(tmp_path),
        PYQVM_TEMPLATES_DIR=str(default_template.directory.parent),
    )
    args = (
        ["run", "--", "true"]
        if verb == "run"
        else ["up", "--template", default_template.name, "--name", "noqemu"]
    )
    try:
        r = subprocess.run(
            [sys.executable, "-m", "pyqvm", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 125, (r.returncode, r.stdout, r.stderr)
        assert MISSING in r.stderr, r.stderr
        vms = reg / "vms"
        assert not vms.is_dir() or list(vms.iterdir()) == []
        assert [p for p in tmp_path.iterdir() if p.name.startswith("pyqvm-")] == []
    finally:
        subprocess.run(["rm", "-rf", str(reg)], check=False)
