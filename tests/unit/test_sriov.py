"""host/sriov.py on a fake PF whose sriov_numvfs behaves like the kernel's."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.sysfs import FakeHost, standard_host

from pyqvm.errors import HostError, PassthroughError
from pyqvm.host import pci, sriov, vfio
from pyqvm.host.claims import ClaimStore

PF = "0000:03:00.0"


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return standard_host(tmp_path / "root")


@pytest.fixture
def claims(tmp_path: Path) -> ClaimStore:
    return ClaimStore(tmp_path / "claims")


def test_list_pfs(host: FakeHost) -> None:
    (pf,) = sriov.list_pfs(host.root)
    assert (pf.address, pf.total_vfs, pf.num_vfs, pf.vfs, pf.netdevs) == (
        PF,
        7,
        0,
        (),
        ("enp3s0",),
    )


def test_zero_to_four_vfs_then_pick_a_free_one(host: FakeHost, claims: ClaimStore) -> None:
    pf = sriov.set_num_vfs(PF, 4, host.io, host.root)
    # offset 0x80, stride 2 from 03:00.0: the routing ids the kernel would give.
    assert pf.vfs == ("0000:03:10.0", "0000:03:10.2", "0000:03:10.4", "0000:03:10.6")
    assert pf.num_vfs == 4
    for vf in pf.vfs:
        dev = pci.pci_device(vf, host.root)
        assert dev.physfn == PF
        assert dev.driver == "igbvf"  # autoprobed, as the kernel does
        assert dev.iommu_group is not None
    # Each VF sits alone in its own group: viable by itself.
    assert vfio.check_group_viable(pf.vfs[2], host.root) == vfio.iommu_group(pf.vfs[2], host.root)

    assert sriov.pick_free_vf(PF, claims, host.root) == "0000:03:10.0"
    claims.claim("0000:03:10.0", "vm-a")
    assert sriov.pick_free_vf(PF, claims, host.root) == "0000:03:10.2"
    # A VF already unbound from the host driver is preferred over one in host use.
    host.io.write(host.root / "sys/bus/pci/drivers/igbvf/unbind", "0000:03:10.6")
    assert sriov.pick_free_vf(PF, claims, host.root) == "0000:03:10.6"
    assert sriov.vf_index(PF, "0000:03:10.6", host.root) == 3


def test_changing_a_nonzero_count_goes_through_zero(host: FakeHost) -> None:
    sriov.set_num_vfs(PF, 2, host.io, host.root)
    host.io.writes.clear()
    io = host.io
    pf = sriov.set_num_vfs(PF, 3, io, host.root)
    assert [v for _, v in io.writes] == ["0", "3"]
    assert len(pf.vfs) == 3
    # The fake kernel itself refuses a direct change, as the real one does (EBUSY).
    with pytest.raises(OSError, match="busy"):
        host.io.write(host.root / f"sys/bus/pci/devices/{PF}/sriov_numvfs", "5")
    assert sriov.set_num_vfs(PF, 0, host.io, host.root).vfs == ()
    assert not (host.root / "sys/bus/pci/devices/0000:03:10.0").exists()


def test_vf_count_over_totalvfs(host: FakeHost) -> None:
    with pytest.raises(PassthroughError, match=r"supports at most 7 VFs.*asked for 8: use 0 to 7"):
        sriov.set_num_vfs(PF, 8, host.io, host.root)
    assert sriov.sriov_pf(PF, host.root).num_vfs == 0


def test_vf_in_guest_use_blocks_a_count_change(host: FakeHost) -> None:
    pf = sriov.set_num_vfs(PF, 2, host.io, host.root)
    vfio.bind_to_vfio(pf.vfs[1], host.io, host.root)
    with pytest.raises(PassthroughError, match=r"0000:03:10.2 are bound to vfio-pci"):
        sriov.set_num_vfs(PF, 0, host.io, host.root)


def test_not_a_pf_and_no_vfs(host: FakeHost, claims: ClaimStore) -> None:
    with pytest.raises(PassthroughError, match=r"0000:01:00.0 is not an SR-IOV physical function"):
        sriov.sriov_pf("0000:01:00.0", host.root)
    with pytest.raises(PassthroughError, match=r"has no VFs; create some first.*sriov_numvfs"):
        sriov.pick_free_vf(PF, claims, host.root)
    with pytest.raises(HostError, match="does not exist"):
        sriov.sriov_pf("0000:0a:00.0", host.root)


def test_all_vfs_taken(host: FakeHost, claims: ClaimStore) -> None:
    pf = sriov.set_num_vfs(PF, 1, host.io, host.root)
    claims.claim(pf.vfs[0], "vm-a")
    with pytest.raises(
        PassthroughError, match=r"all 1 VFs of 0000:03:00.0 are in use by VMs \(vm-a\)"
    ):
        sriov.pick_free_vf(PF, claims, host.root)


def test_vf_link_commands(host: FakeHost) -> None:
    pf = sriov.set_num_vfs(PF, 4, host.io, host.root)
    link = sriov.VFLink(mac="52:54:00:AB:CD:EF", vlan=100, qos=3, spoofchk=True, trust=False)
    assert sriov.vf_link_commands(PF, pf.vfs[2], link, host.root) == [
        ["ip", "link", "set", "dev", "enp3s0", "vf", "2", "mac", "52:54:00:ab:cd:ef"],
        ["ip", "link", "set", "dev", "enp3s0", "vf", "2", "vlan", "100", "qos", "3"],
        ["ip", "link", "set", "dev", "enp3s0", "vf", "2", "spoofchk", "on"],
        ["ip", "link", "set", "dev", "enp3s0", "vf", "2", "trust", "off"],
    ]
    with pytest.raises(PassthroughError, match="not a VF of"):
        sriov.vf_link_commands(PF, "0000:01:00.0", link, host.root)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mac": "52:54:00"}, "not a MAC address"),
        ({"vlan": 4096}, "VLAN 4096 is out of range"),
        ({"qos": 2}, "qos needs a vlan"),
    ],
)
def test_vf_link_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PassthroughError, match=message):
        sriov.VFLink(**kwargs)  # type: ignore[arg-type]
