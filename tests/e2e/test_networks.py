"""Private networks between VMs, without root: two VMs on one network ping and exchange a
file; a third on another network, in the same subnet, cannot reach them; and the network's
switch ends with its last VM."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cli import own_registry

from pyqvm import AsyncVM, Network, VMSpec

pytestmark = [pytest.mark.e2e]


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    with own_registry(monkeypatch, "pq-net-") as d:
        yield d


def _spec(name: str, net: str, address: str | None = None) -> VMSpec:
    # The private NIC first: the guest must still put user networking on the other one.
    return VMSpec(
        image="default",
        name=name,
        memory=256,
        networks=(Network(mode="private", name=net, address=address), Network()),
    )


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.asyncio
async def test_two_vms_talk_and_a_third_cannot(runtime: Path, default_image: object) -> None:
    a = AsyncVM(_spec("a", "lab", "10.9.0.1/24"))
    b = AsyncVM(_spec("b", "lab"))  # leased in the subnet a's address set
    c = AsyncVM(_spec("c", "elsewhere", "10.9.0.3/24"))  # same subnet, another segment
    vms = (a, b, c)
    try:
        await a.start()  # the first VM to join sets the network's subnet: a's
        await asyncio.gather(b.start(), c.start())
        addr = {v.name: next(iter(v.private_networks.values())).address for v in vms}
        assert str(addr["b"].network) == "10.9.0.0/24" and addr["b"].ip != addr["a"].ip
        # The built-in guest's init gave each NIC its address, and user networking the other.
        shown = (await b.run(["ip", "-o", "-4", "addr", "show"], check=True)).stdout.decode()
        assert f"eth0    inet {addr['b'].with_prefixlen}" in " ".join(shown.split("\n"))
        assert "inet 10.0.2.15/24" in shown
        route = (await b.run(["ip", "route"], check=True)).stdout.decode()
        assert "default via 10.0.2.2" in route

        r = await a.run(["ping", "-c", "2", "-w", "10", str(addr["b"].ip)])
        assert r.returncode == 0, r.stdout
        # A file over the segment: b serves, a fetches.
        data = os.urandom(48 * 1024).hex()
        await b.run(["mkdir", "-p", "/srv"], check=True)
        await b.write_file("/srv/f.txt", data.encode())
        await b.run(["httpd", "-p", "8080", "-h", "/srv"], check=True)
        got = await a.run(
            ["wget", "-q", "-O", "-", f"http://{addr['b'].ip}:8080/f.txt"], timeout=60, check=True
        )
        assert got.stdout.decode() == data

        # c is on another network: nothing of lab answers it, at L2 (ARP) or above.
        for target in ("a", "b"):
            r = await c.run(["ping", "-c", "1", "-w", "3", str(addr[target].ip)], timeout=30)
            assert r.returncode != 0, f"c reached {target}: {r.stdout!r}"
        r = await c.run(
            ["arping", "-c", "1", "-w", "2", "-I", "eth0", str(addr["a"].ip)], timeout=30
        )
        assert r.returncode != 0, r.stdout
    finally:
        await asyncio.gather(*(v.stop() for v in vms), return_exceptions=True)

    # The networks end with their last VM: no owner, no switch.
    owners = [int(p.read_text()) for p in runtime.glob("networks/*/owner.lock")]
    assert len(owners) == 2
    end = time.monotonic() + 10
    while any(_alive(p) for p in owners) and time.monotonic() < end:
        await asyncio.sleep(0.05)
    assert not any(_alive(p) for p in owners), "a network's owner outlived its VMs"
    assert not list(runtime.glob("networks/*/sw"))
