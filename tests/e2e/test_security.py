"""Safe defaults, read off the running processes (issue 12, "safe defaults, tested").

Each guarantee here is listed in docs/security.md with the test that proves it.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqvm import AsyncVM, Network, PortForward, Template, VMSpec

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process ``pid`` has open."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _addr(hex_addr: str) -> str:
    ip, port = hex_addr.split(":")
    if len(ip) == 8:
        host = socket.inet_ntop(socket.AF_INET, bytes.fromhex(ip)[::-1])
    else:
        raw = bytes.fromhex(ip)
        host = socket.inet_ntop(
            socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        )
    return f"{host}:{int(port, 16)}"


def listening(pid: int) -> list[str]:
    """Every TCP socket ``pid`` listens on and every UDP socket it has bound, as
    ``proto host:port``, from ``/proc/<pid>/net/{tcp,tcp6,udp,udp6}`` and its fds."""
    mine, out = socket_inodes(pid), []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]:
            f = line.split()
            local, state, inode = f[1], f[3], int(f[9])
            if inode in mine and (proto.startswith("udp") or state == "0A"):  # 0A: LISTEN
                out.append(f"{proto} {_addr(local)}")
    return sorted(out)


def unix_sockets(pid: int) -> list[str]:
    """The paths of the bound unix sockets ``pid`` has open (abstract and unnamed left out)."""
    mine, out = socket_inodes(pid), []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and int(f[6]) in mine and f[7].startswith("/"):
            out.append(f[7])
    return sorted(out)


def seccomp_mode(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Seccomp:"):
            return int(line.split()[1])
    raise AssertionError("no Seccomp line")


def open_files(pid: int) -> dict[str, int]:
    """Regular files ``pid`` has open, with their open flags."""
    out = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            flags = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split("flags:")[1]
        except (OSError, IndexError):
            continue
        if target.startswith("/"):
            out[target] = int(flags.split()[0], 8)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_qemu_listens_only_where_asked_and_keeps_its_files_to_itself(
    default_image: object,
) -> None:
    port = free_port()
    spec = VMSpec(
        image="default",
        networks=(Network(forwards=(PortForward(host_port=port, guest_port=22),)),),
    )
    async with AsyncVM(spec) as vm:
        assert vm.pid is not None and vm.runtime_dir is not None
        # TCP/UDP: the one forwarded port, on loopback; nothing else (QMP, the agent and
        # the console are socket pairs; no VNC, SPICE, gdbstub or migration listener).
        assert listening(vm.pid) == [f"tcp 127.0.0.1:{port}"]
        assert listening(os.getpid()) == []  # nor pyqvm's own console server
        assert not {"-vnc", "-spice", "-gdb", "-s"} & set(vm.argv)
        assert (await vm.execute("query-vnc"))["enabled"] is False
        # Unix sockets only in the runtime dir, which is ours alone; QEMU's own files too.
        rundir = vm.runtime_dir
        assert stat.S_IMODE(rundir.stat().st_mode) == 0o700
        socks = unix_sockets(vm.pid) + unix_sockets(os.getpid())
        assert rundir / "console.sock" in map(Path, socks)  # pyqvm's, for `pyqvm console`
        assert all(Path(p).parent == rundir for p in socks), socks
        for p in rundir.iterdir():
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, (p, oct(p.stat().st_mode))
        # The seccomp sandbox is on (mode 2: a filter).
        assert "-sandbox" in vm.argv and seccomp_mode(vm.pid) == 2
        # The built-in image's files are open read-only (the guest writes to an overlay).
        files = open_files(vm.pid)
        base = [f for f in files if f.startswith(str(Path.home() / ".cache" / "pyqvm"))]
        assert base, files
        for f in base:
            assert files[f] & os.O_ACCMODE == os.O_RDONLY, f
        overlays = [f for f in files if f.startswith(str(rundir)) and f.endswith(".qcow2")]
        assert overlays and all(files[f] & os.O_ACCMODE == os.O_RDWR for f in overlays)


@pytest.fixture
def registry_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pq-sec-"))
    d.chmod(0o700)
    monkeypatch.setenv("PYQVM_RUNTIME_DIR", str(d))
    yield d
    subprocess.run([sys.executable, "-m", "pyqvm", "stop", "--all", "--force"], check=False)
    subprocess.run(["rm", "-rf", str(d)], check=False)


async def test_a_named_vm_owner_listens_on_private_unix_sockets_only(
    registry_dir: Path, default_template: Template, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYQVM_TEMPLATES_DIR", str(default_template.directory.parent))
    up = [sys.executable, "-m", "pyqvm", "up", "--template", default_template.name]
    subprocess.run([*up, "--name", "sec"], check=True, capture_output=True)
    ps = subprocess.run(
        [sys.executable, "-m", "pyqvm", "ps", "--json"], check=True, capture_output=True
    )
    (info,) = json.loads(ps.stdout)
    owner, qemu = info["owner_pid"], info["qemu_pid"]
    entry = registry_dir / "vms" / "sec"
    assert stat.S_IMODE(registry_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((registry_dir / "vms").stat().st_mode) == 0o700
    assert stat.S_IMODE(entry.stat().st_mode) == 0o700
    for p in entry.iterdir():
        assert stat.S_IMODE(p.lstat().st_mode) & 0o077 == 0, (p, oct(p.lstat().st_mode))
    assert listening(owner) == [] and listening(qemu) == []
    # Its own socket, and its VM's console (`pyqvm console`) in the VM's runtime dir.
    console = Path(info["runtime_dir"]) / "console.sock"
    assert unix_sockets(owner) == sorted([str(entry / "owner.sock"), str(console)])
    assert stat.S_IMODE(console.lstat().st_mode) == 0o600
    assert seccomp_mode(qemu) == 2
    subprocess.run([sys.executable, "-m", "pyqvm", "stop", "sec"], check=True)
