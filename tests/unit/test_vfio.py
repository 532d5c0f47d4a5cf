"""host/vfio.py and host/pci.py on fake sysfs trees whose writes act like the kernel's."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.sysfs import FakeHost, standard_host

from pyqvm.errors import GroupNotViableError, HostError, PassthroughError, SpecError
from pyqvm.host import pci, vfio

NIC = "0000:01:00.0"
GPU, AUDIO = "0000:02:00.0", "0000:02:00.1"


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return standard_host(tmp_path)


def test_pci_device_reads_ids_class_driver_and_group(host: FakeHost) -> None:
    dev = pci.pci_device(NIC, host.root)
    assert (dev.ids, dev.pci_class, dev.driver, dev.iommu_group) == (
        "8086:10d3",
        0x020000,
        "e1000e",
        2,
    )
    assert not dev.is_bridge
    assert pci.pci_device("0000:00:01.0", host.root).is_bridge
    assert [d.address for d in pci.list_pci_devices(host.root)][:3] == [
        "0000:00:00.0",
        "0000:00:01.0",
        NIC,
    ]


def test_absent_and_malformed_addresses(host: FakeHost) -> None:
    with pytest.raises(HostError, match=r"0000:09:00.0 does not exist.*lspci -D"):
        pci.pci_device("0000:09:00.0", host.root)
    with pytest.raises(SpecError, match=r"'01:0g.0' is not a PCI address"):
        pci.pci_address("01:0g.0")
    assert pci.pci_address("01:00.0") == NIC


def test_iommu_on(host: FakeHost) -> None:
    st = vfio.iommu_status(host.root)
    assert st.enabled and st.groups == 6
    assert st.cmdline_params == ("intel_iommu=on", "iommu=pt")
    assert vfio.iommu_groups(host.root)[3] == [GPU, AUDIO]


def test_iommu_off_is_a_host_error_with_the_fix(tmp_path: Path) -> None:
    host = standard_host(tmp_path, iommu=False, cmdline="root=/dev/sda1 ro")
    st = vfio.iommu_status(host.root)
    assert not st.enabled
    assert "no IOMMU groups" in st.reason and "no IOMMU kernel parameter" in st.reason
    assert "intel_iommu=on" in st.fix and "VT-d" in st.fix  # an Intel CPU
    with pytest.raises(HostError, match=r"needs the IOMMU: no IOMMU groups.*intel_iommu=on"):
        vfio.check_vfio_host(host.root)
    with pytest.raises(HostError, match=r"0000:01:00.0 is in no IOMMU group"):
        vfio.iommu_group(NIC, host.root)


def test_iommu_asked_for_but_absent_blames_the_firmware(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, iommu=False, cmdline="intel_iommu=on")
    assert "off in the firmware" in vfio.iommu_status(host.root).reason


def test_amd_fix_names_amd_iommu(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, iommu=False, cpuinfo="vendor_id\t: AuthenticAMD\n")
    assert "amd_iommu=on" in vfio.iommu_status(host.root).fix


def test_vfio_pci_not_loaded(tmp_path: Path) -> None:
    host = standard_host(tmp_path, vfio_loaded=False)
    assert not vfio.vfio_pci_loaded(host.root)
    with pytest.raises(HostError, match=r"vfio-pci driver, which is not loaded.*modprobe vfio-pci"):
        vfio.check_vfio_host(host.root)


def test_group_with_a_sibling_on_a_host_driver_is_not_viable(host: FakeHost) -> None:
    # A dual-port NIC: both functions in group 7, the second one still in host use.
    host.add_device("0000:05:00.0", device="1521", driver="igb")
    host.add_device("0000:05:00.1", device="1521", driver="igb")
    host.add_group(7, "0000:05:00.0", "0000:05:00.1")
    with pytest.raises(GroupNotViableError) as info:
        vfio.check_group_viable("0000:05:00.0", host.root)
    e = info.value
    assert (e.group, e.blocker, e.driver) == (7, "0000:05:00.1", "igb")
    assert str(e).startswith(
        "IOMMU group 7 of 0000:05:00.0 is not viable: 0000:05:00.1 is bound to igb; unbind it"
    )
    assert "or assign it to this VM too" in str(e)
    # Assigning both makes it viable.
    assert vfio.check_group_viable("0000:05:00.0", host.root, assigning=["0000:05:00.1"]) == 7


def test_group_member_of_another_vm_blocks(host: FakeHost) -> None:
    with pytest.raises(GroupNotViableError, match=r"0000:02:00.1 is bound to vfio-pci for VM 'a'"):
        vfio.check_group_viable(GPU, host.root, holders={AUDIO: "a"})


def test_bridges_and_unbound_members_do_not_block(host: FakeHost) -> None:
    host.add_device("0000:06:00.0", device="1234", driver="e1000e")
    host.add_device("0000:06:00.1", device="1235")  # no driver
    host.add_device("0000:06:00.2", device="1236", pci_class=0x060400, driver="pcieport")
    host.add_group(8, "0000:06:00.0", "0000:06:00.1", "0000:06:00.2")
    assert vfio.check_group_viable("0000:06:00.0", host.root) == 8


def test_bind_to_vfio_and_restore(host: FakeHost) -> None:
    io = host.io
    assert host.vfio_nodes() == []
    original = vfio.bind_to_vfio(NIC, io, host.root)
    assert original == "e1000e"
    assert host.driver_of(NIC) == "vfio-pci"
    assert host.override_of(NIC) == "vfio-pci"
    assert host.vfio_nodes() == ["2"]
    assert vfio.check_vfio_dev(2, host.root) == host.root / "dev/vfio/2"
    # The kernel's way: override, unbind, probe (never a raw bind to vfio-pci).
    assert [w[0].rsplit("/", 1)[-1] for w in io.writes] == [
        "driver_override",
        "unbind",
        "drivers_probe",
    ]

    vfio.restore_driver(NIC, original, io, host.root)
    assert host.driver_of(NIC) == "e1000e"
    assert host.override_of(NIC) is None
    assert host.vfio_nodes() == []


def test_restore_to_no_driver_leaves_it_unbound(host: FakeHost) -> None:
    host.add_device("0000:07:00.0", group=9)
    assert vfio.bind_to_vfio("0000:07:00.0", host.io, host.root) is None
    vfio.restore_driver("0000:07:00.0", None, host.io, host.root)
    assert host.driver_of("0000:07:00.0") is None
    assert host.override_of("0000:07:00.0") is None


def test_bind_failure_says_so(host: FakeHost) -> None:
    host.fail_bind(NIC)
    with pytest.raises(PassthroughError, match=r"0000:01:00.0 did not bind to vfio-pci.*none"):
        vfio.bind_to_vfio(NIC, host.io, host.root)


def test_restore_when_the_driver_is_gone_says_how(host: FakeHost) -> None:
    vfio.bind_to_vfio(NIC, host.io, host.root)
    host.remove_driver("e1000e")
    with pytest.raises(PassthroughError, match=r"did not go back to e1000e.*drivers/e1000e/bind"):
        vfio.restore_driver(NIC, "e1000e", host.io, host.root)


def test_write_refused_names_the_file(host: FakeHost) -> None:
    class Denied(pci.SysfsIO):
        def write(self, path: Path, value: str) -> None:
            raise PermissionError(13, "Permission denied")

    with pytest.raises(
        PassthroughError, match=r"driver_override.*Permission denied; run pyqvm as root"
    ):
        vfio.bind_to_vfio(NIC, Denied(), host.root)


def test_missing_vfio_node(host: FakeHost) -> None:
    with pytest.raises(HostError, match=r"dev/vfio/2 does not exist"):
        vfio.check_vfio_dev(2, host.root)


def test_memlock() -> None:
    low = vfio.MemlockStatus(limit=8 * 1024 * 1024, ipc_lock=False)
    with pytest.raises(HostError, match=r"limit is 8 MiB but VFIO pins all 2048 MiB.*ulimit -l"):
        vfio.check_memlock(2048, low)
    vfio.check_memlock(2048, vfio.MemlockStatus(limit=None, ipc_lock=False))
    vfio.check_memlock(2048, vfio.MemlockStatus(limit=8 * 1024 * 1024, ipc_lock=True))
    vfio.check_memlock(512, vfio.MemlockStatus(limit=2 << 30, ipc_lock=False))


def test_real_sysfs_writer_writes_one_value(tmp_path: Path) -> None:
    f = tmp_path / "attr"
    f.write_text("")
    pci.SysfsIO().write(f, "0000:01:00.0")
    assert f.read_text() == "0000:01:00.0"
