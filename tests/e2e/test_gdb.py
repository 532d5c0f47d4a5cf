"""QEMU's gdbstub, driven by the host's real gdb in batch mode: registers and a kernel symbol
read from a running guest, in-process (`vm.gdb_argv`) and on a named VM (`pyqvm gdb`)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cli import go_there, own_registry, pyqvm

from pyqvm import VM, SpecError, VMSpec

pytestmark = [pytest.mark.e2e]


def _banner(vm: VM) -> tuple[str, str]:
    """``linux_banner``'s address from the guest's /proc/kallsyms, and /proc/version."""
    line = vm.run(["grep", " linux_banner$", "/proc/kallsyms"], check=True).stdout.decode()
    version = vm.run(["cat", "/proc/version"], check=True).stdout.decode().strip()
    return line.split()[0], version


def _check_gdb_output(out: str, version: str) -> None:
    # rip is in the kernel's text (the guest idles in the kernel)...
    rip = [line for line in out.splitlines() if line.startswith("rip")]
    assert rip and int(rip[0].split()[1], 16) >= 0xFFFFFFFF80000000, out
    # ...and the bytes at linux_banner are the guest's own /proc/version.
    assert f'"{version[:60]}' in out, out


def test_gdb_reads_registers_and_a_kernel_symbol(default_image: object) -> None:
    with VM(VMSpec(image="default", gdb=True)) as vm:
        sock = Path(vm.gdb_target())
        assert sock.parent == vm.runtime_dir and sock.is_socket()
        assert "nokaslr" in vm.argv[vm.argv.index("-append") + 1].split()
        addr, version = _banner(vm)
        # nokaslr: the symbol is at its link address, as in the vmlinux gdb loads.
        assert addr.startswith("ffffffff8"), addr
        argv = vm.gdb_argv(commands=["info registers rip", f"x/s 0x{addr}"], batch=True)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        _check_gdb_output(r.stdout, version)
        assert "detached" in r.stdout
        # gdb detached: the guest runs on.
        assert vm.run(["echo", "alive"], check=True).stdout == b"alive\n"


def test_gdb_is_off_unless_asked(default_image: object) -> None:
    with VM(VMSpec(image="default", guest_agent=False, ready="none")) as vm:
        assert "-gdb" not in vm.argv
        assert not (vm.runtime_dir / "gdb.sock").exists()  # type: ignore[operator]
        with pytest.raises(SpecError, match="gdb = true"):
            vm.gdb_target()


@pytest.fixture(params=["here", "ssh"])
def runtime(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    go_there(request, monkeypatch)  # "ssh": the named-VM verbs against another host
    with own_registry(monkeypatch, "pq-gdb-") as d:
        yield d


def test_pyqvm_gdb_on_a_named_vm(runtime: Path, default_image: object) -> None:
    r = pyqvm("up", "--gdb", "--name", "dbg")
    assert r.returncode == 0, r.stderr
    r = pyqvm("exec", "dbg", "--", "grep", " linux_banner$", "/proc/kallsyms")
    assert r.returncode == 0, r.stderr
    addr = r.stdout.split()[0]
    version = pyqvm("exec", "dbg", "--", "cat", "/proc/version").stdout.strip()
    r = pyqvm("gdb", "dbg", "--batch", "-x", "info registers rip", "-x", f"x/s 0x{addr}")
    assert r.returncode == 0, r.stderr
    _check_gdb_output(r.stdout, version)
    assert pyqvm("exec", "dbg", "--", "true").returncode == 0
    # A VM started without --gdb: the error says how to get one.
    assert pyqvm("up", "--name", "plain").returncode == 0
    r = pyqvm("gdb", "plain", "--batch")
    assert r.returncode != 0 and "--gdb" in r.stderr, r.stderr
