"""Private networks: one L2 segment per name on this host, shared by every VM naming it; no root.

Why ``vde_switch`` (Debian's ``vde-switch``; the NixOS test driver builds its VLANs on
it): QEMU 7.2's ``stream`` netdev is point to point (one peer at a time, no reconnect),
``hubport`` hubs live inside one QEMU, ``dgram`` needs a frame relay of our own, and
multicast ``socket``/``dgram`` traffic goes to a group address, off this host. One switch
per network, joined with ``-netdev vde``, gives any number of VMs one segment; another
network is another switch, so the two never meet. The switch runs unprivileged and its
sockets are 0600 in a 0700 directory: other users cannot join.

Who owns the switch: a network outlives any one of its VMs (they may live in several
processes: a test, ``pyqvm up`` in two shells), so its switch belongs to a small owner
process of its own (``python -m pyqvm.launch.privnet DIR``) that ends, and the switch with it,
once no VM is connected and no launcher is joining. A launcher killed with SIGKILL takes
its QEMU with it (PDEATHSIG), so its network ends with its last VM.

Layout, in ``runtime_root()/networks/NAME``::

    owner.lock    the owner holds an exclusive flock on it for its life
    join.lock     launchers hold it shared from before they make sure the switch runs until
                  their QEMU is connected; the owner ends only when it can take it
                  exclusively and no port is connected
    sw/           the switch's socket directory (``-netdev vde,sock=``)
    mgmt          the switch's management socket (the owner counts connected ports on it)
    subnet        the network's subnet while it lives: the first VM's address's, else the
                  name's default (`pyqvm.spec.fields.private_subnet`); leases are taken in it
    leases/ADDR   a VM's address: it is the VM's while the VM's launcher holds a flock on it
    owner.log     the owner's and the switch's messages
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pyqvm.deadline import Deadline
from pyqvm.errors import HostError, LaunchError, SpecError
from pyqvm.files import try_lock
from pyqvm.host.packages import install_hint
from pyqvm.runtime.dirs import runtime_root
from pyqvm.spec import Network, VMSpec
from pyqvm.spec.fields import private_address, private_subnet

log = logging.getLogger(__name__)

VDE_SWITCH_ENV = "PYQVM_VDE_SWITCH"
SWITCH_DIR = "sw"
MGMT = "mgmt"
JOIN_LOCK = "join.lock"
OWNER_LOCK = "owner.lock"
LEASES = "leases"
OWNER_LOG = "owner.log"
SUBNET = "subnet"
IDLE_CHECKS = 3  # owner polls (0.2 s apart) with nobody connected or joining before it ends
_PROMPT = b"vde$ "
_ACTIVE_PORT = re.compile(rb"^Port \d+ .*\bACTIVE\b", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Membership:
    """One NIC's place on a private network: the switch to plug into, and its address."""

    network: str
    nic_id: str
    switch: Path
    address: ipaddress.IPv4Interface
    mac: str


def find_vde_switch() -> Path:
    """``$PYQVM_VDE_SWITCH`` or ``vde_switch`` on PATH, or `HostError` naming the package."""
    explicit = os.environ.get(VDE_SWITCH_ENV)
    found = explicit or shutil.which("vde_switch") or shutil.which("vde_switch", path="/usr/bin")
    if not found or not os.access(found, os.X_OK):
        why = f" ({VDE_SWITCH_ENV}={explicit} is not executable)" if explicit else ""
        raise HostError(f"private networks need vde_switch{why}: {install_hint('vde-switch')}")
    return Path(found)


def networks_dir() -> Path:
    d = runtime_root() / "networks"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def mac_for(address: ipaddress.IPv4Interface) -> str:
    """A locally administered unicast MAC from the address: unique on its segment, and stable."""
    return "52:54:" + ":".join(f"{b:02x}" for b in address.ip.packed)


def guest_cmdline(members: Mapping[str, Membership]) -> list[str]:
    """``pyqvm.ip=MAC,ADDR/PREFIX``: the built-in guest's init gives the NIC its address."""
    return [f"pyqvm.ip={m.mac},{m.address.with_prefixlen}" for m in members.values()]


def preview_memberships(spec: VMSpec) -> dict[str, Membership]:
    """What `PrivateNetworks.join` would give, with placeholders (for ``pyqvm cmdline``)."""
    out = {}
    for n in spec.networks:
        if n.mode == "private":
            assert n.name is not None
            address = (
                private_address(n.name, n.address)
                if n.address is not None
                else ipaddress.IPv4Interface(f"{private_subnet(n.name)[2]}/24")
            )
            switch = Path("$PYQVM_RUNTIME_DIR/networks") / n.name / SWITCH_DIR
            out[n.id] = Membership(n.name, n.id, switch, address, n.mac or mac_for(address))
    return out


# --- the management socket -------------------------------------------------------------------


def _mgmt(path: Path, command: bytes | None, timeout: float = 2.0) -> bytes:
    """The switch's answer to ``command`` (None: just its banner)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.fsencode(path))
        _read_prompt(s)
        if command is None:
            return b""
        s.sendall(command + b"\n")
        return _read_prompt(s)


def _read_prompt(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(_PROMPT):
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("the switch closed its management socket")
        data += chunk
    return data


def switch_alive(directory: Path) -> bool:
    try:
        _mgmt(directory / MGMT, None, timeout=1.0)
    except OSError:
        return False
    return True


def connected_ports(directory: Path) -> int:
    """How many endpoints (QEMUs) are plugged into the network's switch now."""
    return len(_ACTIVE_PORT.findall(_mgmt(directory / MGMT, b"port/print")))


# --- a launcher's side -----------------------------------------------------------------------


class PrivateNetworks:
    """The private-network NICs of one launch: joined before QEMU, left after it."""

    def __init__(self) -> None:
        self._joining: list[int] = []  # join.lock fds, shared
        self._leases: list[int] = []
        self.members: dict[str, Membership] = {}

    async def join(self, spec: VMSpec, timeout: float = 10.0) -> dict[str, Membership]:
        """Make sure each private network's switch runs and lease an address on it."""
        nets = [n for n in spec.networks if n.mode == "private"]
        if not nets:
            return {}
        binary = find_vde_switch()
        deadline = Deadline(timeout)
        try:
            for n in nets:
                assert n.name is not None
                directory = networks_dir() / n.name
                if len(os.fsencode(directory / SWITCH_DIR / "ctl")) >= 108:
                    raise SpecError(
                        "network.name",
                        f"'{directory}' is too long for the switch's unix sockets; use a "
                        "shorter name or set PYQVM_RUNTIME_DIR to a shorter directory",
                    )
                directory.mkdir(mode=0o700, exist_ok=True)
                (directory / LEASES).mkdir(mode=0o700, exist_ok=True)
                self._joining.append(await self._hold_join(directory, deadline))
                if not switch_alive(directory):
                    await _start_owner(binary, directory, deadline)
                subnet = _network_subnet(n, directory)
                self.members[n.id] = self._lease(spec.name, n, directory, subnet)
        except BaseException:
            self.leave()
            raise
        return dict(self.members)

    async def _hold_join(self, directory: Path, deadline: Deadline) -> int:
        # Shared: launchers join side by side; the owner holds it exclusively only while
        # it decides to end, which is brief.
        while (fd := try_lock(directory / JOIN_LOCK, shared=True)) is None:
            if deadline.expired:
                raise LaunchError(f"private network {directory.name!r}: its owner does not let go")
            await asyncio.sleep(0.01)
        return fd

    def _lease(
        self, vm: str, net: Network, directory: Path, subnet: ipaddress.IPv4Network
    ) -> Membership:
        assert net.name is not None
        candidates: Iterable[ipaddress.IPv4Interface]
        if net.address is not None:
            candidates = [private_address(net.name, net.address)]
        else:
            # The first host address is left for a gateway the user may add; lazily: a /8
            # has 16 million.
            hosts = itertools.islice(subnet.hosts(), 1, None)
            candidates = (ipaddress.IPv4Interface(f"{h}/{subnet.prefixlen}") for h in hosts)
        for cand in candidates:
            fd = try_lock(directory / LEASES / str(cand.ip))
            if fd is None:
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {vm}\n".encode())
            self._leases.append(fd)
            mac = net.mac or mac_for(cand)
            log.info("%s: private network %s, %s (%s)", vm, net.name, cand, mac)
            return Membership(net.name, net.id, directory / SWITCH_DIR, cand, mac)
        if net.address is not None:
            raise SpecError(
                "network.address",
                f"{net.address} on private network {net.name!r} is taken by another VM; "
                "give another address or leave it out",
            )
        raise LaunchError(f"private network {net.name!r}: every address is taken")

    def connected(self) -> None:
        """QEMU is up and plugged in: the switch may now count on its port."""
        for fd in self._joining:
            os.close(fd)
        self._joining = []

    def leave(self) -> None:
        """After QEMU is gone: the addresses are free again."""
        self.connected()
        for fd in self._leases:
            os.close(fd)
        self._leases = []
        self.members = {}


def _network_subnet(net: Network, directory: Path) -> ipaddress.IPv4Network:
    """The subnet the network has while it lives (the first VM to join sets it), checked
    against this NIC's address."""
    assert net.name is not None
    wanted = private_address(net.name, net.address).network if net.address else None
    path = directory / SUBNET
    tmp = directory / f"{SUBNET}.{os.getpid()}"
    tmp.write_text(f"{wanted or private_subnet(net.name)}\n")
    try:
        os.link(tmp, path)  # atomic: created with its content, or not at all
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    recorded = ipaddress.IPv4Network(path.read_text().strip())
    if wanted is not None and wanted != recorded:
        raise SpecError(
            "network.address",
            f"{net.address} is not in private network {net.name!r}'s subnet {recorded} "
            "(set by the first VM that joined it); give an address in it, or none",
        )
    return recorded


async def _start_owner(binary: Path, directory: Path, deadline: Deadline) -> None:
    """Start the network's owner (it detaches itself) and wait until its switch answers."""
    with open(directory / OWNER_LOG, "ab") as logf:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pyqvm.launch.privnet",
            str(directory),
            str(binary),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=logf,
            start_new_session=True,
        )
    await proc.wait()  # its first process exits once the second runs on alone
    while not switch_alive(directory):
        if deadline.expired:
            tail = (directory / OWNER_LOG).read_text(errors="replace")[-800:]
            raise LaunchError(
                f"private network {directory.name!r}: its switch did not start: {tail.strip()}"
            )
        await asyncio.sleep(0.01)


# --- the owner process -----------------------------------------------------------------------


def _owner(directory: Path, binary: Path) -> int:
    owner_fd = try_lock(directory / OWNER_LOCK)
    if owner_fd is None:  # another owner runs (two launchers raced to start one)
        return 0
    os.ftruncate(owner_fd, 0)
    os.write(owner_fd, f"{os.getpid()}\n".encode())
    sw, mgmt = directory / SWITCH_DIR, directory / MGMT
    shutil.rmtree(sw, ignore_errors=True)  # what a killed switch left
    with contextlib.suppress(FileNotFoundError):
        mgmt.unlink()
    # The switch reads commands on stdin and ends at its EOF: our pipe to it is its lifeline.
    switch = subprocess.Popen(
        [str(binary), "-s", str(sw), "-M", str(mgmt)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    print(f"owner {os.getpid()}: vde_switch {switch.pid} on {sw}", file=sys.stderr, flush=True)
    idle = 0
    try:
        while switch.poll() is None:
            time.sleep(0.2)
            join_fd = try_lock(directory / JOIN_LOCK)
            if join_fd is None:  # someone is joining
                idle = 0
                continue
            try:
                ports = connected_ports(directory)
            except OSError:
                ports = 0 if switch.poll() is not None else 1  # a busy switch: ask again
            if ports:
                idle = 0
                os.close(join_fd)
                continue
            idle += 1
            if idle < IDLE_CHECKS:
                os.close(join_fd)
                continue
            # Still holding join.lock: nobody can join a switch that is going away.
            print(f"owner {os.getpid()}: no VM left; ending", file=sys.stderr, flush=True)
            break
    finally:
        if switch.stdin is not None:
            switch.stdin.close()
        try:
            switch.wait(5)
        except subprocess.TimeoutExpired:
            switch.kill()
            switch.wait()
        shutil.rmtree(sw, ignore_errors=True)
        for p in (mgmt, directory / SUBNET):  # the next network of this name starts afresh
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        for lease in (directory / LEASES).glob("*"):
            if (fd := try_lock(lease)) is not None:  # nobody's any more
                lease.unlink()
                os.close(fd)
    return 0


def _die_with_parent() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def main(argv: list[str]) -> int:
    directory, binary = Path(argv[0]), Path(argv[1])
    if os.fork():  # detach: the launcher reaps this first process at once
        return 0
    os.setsid()
    return _owner(directory, binary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = [
    "Membership",
    "PrivateNetworks",
    "connected_ports",
    "find_vde_switch",
    "guest_cmdline",
    "mac_for",
    "networks_dir",
    "preview_memberships",
    "switch_alive",
]
