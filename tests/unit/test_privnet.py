"""Private networks in the spec, the argv and the kernel command line; and their switch's
life on this host (a real vde_switch and owner process, no QEMU: a NIC's join and leave)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqvm.argv import LaunchContext, build_argv
from pyqvm.errors import SpecError
from pyqvm.host.accel import KvmStatus
from pyqvm.host.facts import HostFacts
from pyqvm.launch.plan import launch_argv
from pyqvm.launch.privnet import (
    Membership,
    PrivateNetworks,
    connected_ports,
    guest_cmdline,
    mac_for,
    networks_dir,
    switch_alive,
)
from pyqvm.launch.resolve import Resolved
from pyqvm.spec import KernelBoot, Network, VMSpec
from pyqvm.spec.fields import private_subnet
from pyqvm.spec.io import spec_from_dict

TCG_HOST = HostFacts(kvm=KvmStatus(False, "no vmx/svm"), tsc_khz=2596132)


def test_private_network_fields() -> None:
    n = Network(mode="private", name="lab", address="10.9.0.5/24")
    assert (n.name, n.address) == ("lab", "10.9.0.5/24")
    spec = spec_from_dict({"networks": [{"mode": "private", "name": "lab"}, {"mode": "user"}]})
    assert [x.mode for x in spec.networks] == ["private", "user"]


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"mode": "private"}, "network.name"),
        ({"mode": "private", "name": "has space"}, "network.name"),
        ({"mode": "private", "name": "-lab"}, "network.name"),
        ({"mode": "private", "name": "x" * 33}, "network.name"),
        ({"mode": "private", "name": "lab", "address": "10.9.0.5"}, "network.address"),
        ({"mode": "private", "name": "lab", "address": "10.9.0.0/24"}, "network.address"),
        ({"mode": "private", "name": "lab", "address": "10.9.0.255/24"}, "network.address"),
        ({"mode": "private", "name": "lab", "address": "fe80::1/64"}, "network.address"),
        ({"mode": "private", "name": "lab", "address": "nonsense"}, "network.address"),
        ({"mode": "user", "name": "lab"}, "network.name"),
        ({"mode": "user", "address": "10.9.0.5/24"}, "network.address"),
        (
            {"mode": "private", "name": "lab", "forwards": [{"host_port": 2222, "guest_port": 22}]},
            "network.forwards",
        ),
    ],
)
def test_bad_private_networks(kw: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as e:
        spec_from_dict({"networks": [kw]})
    assert e.value.field == f"networks[0].{field.removeprefix('network.')}", e.value


def test_one_nic_per_private_network() -> None:
    with pytest.raises(SpecError) as e:
        VMSpec(networks=(Network(mode="private", name="a"), Network(mode="private", name="a")))
    assert e.value.field == "networks[1].name"


def test_default_subnets_are_stable_and_apart_from_the_user_net() -> None:
    assert private_subnet("lab") == private_subnet("lab")
    nets = {private_subnet(f"n{i}") for i in range(200)}
    assert len(nets) > 150  # names spread over the space
    user = ipaddress.IPv4Network("10.0.2.0/24")
    assert all(n.prefixlen == 24 and not n.overlaps(user) for n in nets)


def test_mac_from_the_address_is_unicast_and_local() -> None:
    mac = mac_for(ipaddress.IPv4Interface("10.9.0.5/24"))
    assert mac == "52:54:0a:09:00:05"
    assert int(mac[:2], 16) & 1 == 0 and int(mac[:2], 16) & 2  # unicast, locally administered


def _member(nic: str, addr: str) -> Membership:
    a = ipaddress.IPv4Interface(addr)
    return Membership("lab", nic, Path("/run/n/lab/sw"), a, mac_for(a))


def test_argv_plugs_private_nics_into_their_switch(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    spec = VMSpec(
        kernel=KernelBoot(kernel=kernel, append="console=ttyS0"),
        guest_agent=False,
        networks=(Network(), Network(mode="private", name="lab")),
    )
    members = {"net1": _member("net1", "10.9.0.7/24")}
    for builtin in (True, False):
        resolved = Resolved(
            spec=spec, accel="tcg", qemu=Path("/q"), facts=TCG_HOST, builtin_guest=builtin
        )
        argv = launch_argv(
            resolved,
            tmp_path,
            console_log=tmp_path / "c",
            qmp_fd=3,
            console_fd=4,
            agent_fd=None,
            networks=members,
        )
        netdevs = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-netdev"]
        assert netdevs[1] == {"id": "net1", "type": "vde", "sock": "/run/n/lab/sw"}
        nics = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-device"]
        assert [d["mac"] for d in nics if d.get("netdev") == "net1"] == ["52:54:0a:09:00:07"]
        append = argv[argv.index("-append") + 1].split()
        # Only the built-in guest's init reads pyqvm.ip (another guest configures itself).
        assert ("pyqvm.ip=52:54:0a:09:00:07,10.9.0.7/24" in append) is builtin
    with pytest.raises(ValueError, match="not joined"):
        launch_argv(
            resolved, tmp_path, console_log=tmp_path / "c", qmp_fd=3, console_fd=4, agent_fd=None
        )


def test_build_argv_needs_the_switch(tmp_path: Path) -> None:
    spec = VMSpec(guest_agent=False, networks=(Network(mode="private", name="lab"),))
    ctx = LaunchContext(qemu=Path("/q"), accel="tcg", qmp_fd=3, console_log=tmp_path / "c")
    with pytest.raises(ValueError, match="no switch"):
        build_argv(spec, ctx)


def test_guest_cmdline() -> None:
    m = {"a": _member("a", "10.9.0.2/24"), "b": _member("b", "10.9.1.2/23")}
    assert guest_cmdline(m) == [
        "pyqvm.ip=52:54:0a:09:00:02,10.9.0.2/24",
        "pyqvm.ip=52:54:0a:09:01:02,10.9.1.2/23",
    ]


# --- the switch's life (real vde_switch and owner; no QEMU) -----------------------------------


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"pq-net-{os.getpid()}"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("PYQVM_RUNTIME_DIR", str(d))
    try:
        yield d
    finally:
        for owner in d.glob("networks/*/owner.lock"):  # a test that failed midway
            try:
                pid = int(owner.read_text() or 0)
            except ValueError:
                continue
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        shutil.rmtree(d, ignore_errors=True)


def _owner_pid(directory: Path) -> int:
    return int((directory / "owner.lock").read_text())


def _wait(cond: object, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def _spec(name: str, net: str, address: str | None = None) -> VMSpec:
    return VMSpec(name=name, networks=(Network(mode="private", name=net, address=address),))


@pytest.mark.asyncio
async def test_joiners_share_one_switch_and_get_their_own_addresses(runtime: Path) -> None:
    a, b = PrivateNetworks(), PrivateNetworks()
    ma = (await a.join(_spec("a", "lab")))["net0"]
    mb = (await b.join(_spec("b", "lab")))["net0"]
    directory = networks_dir() / "lab"
    assert ma.switch == mb.switch == directory / "sw" and switch_alive(directory)
    assert ma.address != mb.address and ma.address.network == mb.address.network
    assert ma.address.network == private_subnet("lab") and ma.mac != mb.mac
    assert connected_ports(directory) == 0
    owner = _owner_pid(directory)
    # Nobody plugged in, but both are still joining: the switch stays.
    time.sleep(1.0)
    assert switch_alive(directory)
    a.connected()
    b.connected()
    # Joined and no port connected: the owner ends, with its switch.
    assert _wait(lambda: not Path(f"/proc/{owner}").exists()), "the owner outlived its network"
    assert not switch_alive(directory) and not (directory / "sw").exists()
    a.leave()
    b.leave()


@pytest.mark.asyncio
async def test_a_taken_address_and_a_foreign_subnet_are_refused(runtime: Path) -> None:
    a = PrivateNetworks()
    await a.join(_spec("a", "lab", "10.9.0.5/24"))
    try:
        with pytest.raises(SpecError, match="taken by another VM") as e:
            await PrivateNetworks().join(_spec("b", "lab", "10.9.0.5/24"))
        assert e.value.field == "network.address"
        with pytest.raises(SpecError, match=r"subnet 10\.9\.0\.0/24"):
            await PrivateNetworks().join(_spec("c", "lab", "10.8.0.5/24"))
        # One without an address gets one in the network's subnet.
        c = PrivateNetworks()
        m = (await c.join(_spec("c", "lab")))["net0"]
        assert m.address.network == ipaddress.IPv4Network("10.9.0.0/24")
        assert m.address.ip != ipaddress.IPv4Address("10.9.0.5")
        c.leave()
    finally:
        a.leave()


@pytest.mark.asyncio
async def test_another_network_is_another_switch(runtime: Path) -> None:
    a, b = PrivateNetworks(), PrivateNetworks()
    ma = (await a.join(_spec("a", "lab")))["net0"]
    mb = (await b.join(_spec("b", "lab2")))["net0"]
    try:
        assert ma.switch != mb.switch
        assert _owner_pid(ma.switch.parent) != _owner_pid(mb.switch.parent)
    finally:
        a.leave()
        b.leave()


def test_templates_and_migration_refuse_private_nics_and_ssh() -> None:
    from pyqvm.ops.migration.common import network_blocker
    from pyqvm.ops.template import templatable

    private = VMSpec(image="default", networks=(Network(mode="private", name="lab"),))
    assert not templatable(private)
    assert "private network 'lab'" in (network_blocker(private) or "")
    ssh = VMSpec(image="default", ssh=True, networks=(Network(),))
    assert not templatable(ssh) and network_blocker(ssh) is None
    assert templatable(VMSpec(image="default", networks=(Network(),)))
