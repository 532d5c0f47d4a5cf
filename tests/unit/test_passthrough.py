"""pyqvm.launch.passthrough: managed assignment on fake hosts, rollback, release, recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fixtures.sysfs import FakeHost, standard_host

import pyqvm
from pyqvm.errors import (
    DeviceClaimedError,
    GroupNotViableError,
    HostError,
    PassthroughError,
    SpecError,
)
from pyqvm.host.claims import ClaimStore
from pyqvm.host.vfio import MemlockStatus
from pyqvm.launch.passthrough import PassthroughHost, assign, migration_blocker, recover
from pyqvm.spec import HostDevice, VMSpec
from pyqvm.spec.io import spec_from_dict

NIC, GPU, AUDIO, NVME = "0000:01:00.0", "0000:02:00.0", "0000:02:00.1", "0000:04:00.0"
ROOT_OK = MemlockStatus(limit=None, ipc_lock=True)
TESTS = Path(__file__).resolve().parents[1]
SRC = Path(pyqvm.__file__).resolve().parents[1]


@pytest.fixture
def fake(tmp_path: Path) -> FakeHost:
    return standard_host(tmp_path / "root")


@pytest.fixture
def pt_host(fake: FakeHost, tmp_path: Path) -> PassthroughHost:
    return PassthroughHost(
        root=fake.root, io=fake.io, claims=ClaimStore(tmp_path / "claims"), memlock=ROOT_OK
    )


def vm_spec(*addresses: str, name: str = "pt", **kw: object) -> VMSpec:
    return VMSpec(
        name=name,
        profile="passthrough",
        host_devices=[HostDevice(a, **kw) for a in addresses],  # type: ignore[arg-type]
    )


def drivers(fake: FakeHost) -> dict[str, str | None]:
    return {a: fake.driver_of(a) for a in fake.addresses()}


def test_managed_device_goes_to_vfio_and_back(fake: FakeHost, pt_host: PassthroughHost) -> None:
    before = drivers(fake)
    pt = assign(vm_spec(NIC), pt_host)
    assert fake.driver_of(NIC) == "vfio-pci"
    assert fake.vfio_nodes() == ["2"]
    assert pt.groups == {NIC: 2} and pt.original_driver(NIC) == "e1000e"
    (rec,) = pt_host.claims.records()
    assert (rec.address, rec.vm, rec.original_driver, rec.bound) == (NIC, "pt", "e1000e", True)
    assert pt.release() == []
    assert drivers(fake) == before
    assert fake.override_of(NIC) is None and fake.vfio_nodes() == []
    assert pt_host.claims.records() == []
    assert pt.release() == []  # idempotent


def test_whole_group_assigned_together(fake: FakeHost, pt_host: PassthroughHost) -> None:
    pt = assign(vm_spec(GPU, AUDIO), pt_host)
    assert (fake.driver_of(GPU), fake.driver_of(AUDIO)) == ("vfio-pci", "vfio-pci")
    pt.release()
    assert (fake.driver_of(GPU), fake.driver_of(AUDIO)) == ("amdgpu", "snd_hda_intel")


def test_iommu_off_refused_before_anything(tmp_path: Path) -> None:
    fake = standard_host(tmp_path / "root", iommu=False)
    host = PassthroughHost(fake.root, fake.io, ClaimStore(tmp_path / "claims"), ROOT_OK)
    with pytest.raises(HostError, match=r"needs the IOMMU.*intel_iommu=on"):
        assign(vm_spec(NIC), host)
    assert fake.io.writes == [] and host.claims.records() == []


def test_vfio_pci_not_loaded_refused(tmp_path: Path) -> None:
    fake = standard_host(tmp_path / "root", vfio_loaded=False)
    host = PassthroughHost(fake.root, fake.io, ClaimStore(tmp_path / "claims"), ROOT_OK)
    with pytest.raises(HostError, match="modprobe vfio-pci"):
        assign(vm_spec(NIC), host)


def test_memlock_too_low_refused(fake: FakeHost, tmp_path: Path) -> None:
    low = MemlockStatus(limit=64 << 20, ipc_lock=False)
    host = PassthroughHost(fake.root, fake.io, ClaimStore(tmp_path / "claims"), low)
    with pytest.raises(HostError, match=r"limit is 64 MiB but VFIO pins all 512 MiB"):
        assign(vm_spec(NIC), host)
    assert fake.driver_of(NIC) == "e1000e"


def test_non_viable_group_changes_nothing(fake: FakeHost, pt_host: PassthroughHost) -> None:
    before = drivers(fake)
    with pytest.raises(GroupNotViableError) as info:
        assign(vm_spec(GPU), pt_host)
    assert (
        "IOMMU group 3 of 0000:02:00.0 is not viable: 0000:02:00.1 is bound to snd_hda_intel"
        in (str(info.value))
    )
    assert drivers(fake) == before and fake.io.writes == []
    assert pt_host.claims.records() == []


def test_second_of_two_devices_fails_first_is_rolled_back(
    fake: FakeHost, pt_host: PassthroughHost
) -> None:
    before = drivers(fake)
    fake.fail_bind(NVME)
    with pytest.raises(PassthroughError, match=r"0000:04:00.0 did not bind to vfio-pci"):
        assign(vm_spec(NIC, NVME), pt_host)
    # Both back on their own drivers, nothing overridden, no claim left behind.
    assert drivers(fake) == before
    assert fake.override_of(NIC) is None and fake.override_of(NVME) is None
    assert fake.vfio_nodes() == []
    assert pt_host.claims.records() == []
    # The NIC really went to vfio-pci and came back (not just "never touched").
    probes = [v for p, v in fake.io.writes if p.endswith("drivers_probe")]
    assert probes.count(NIC) == 2


def test_claim_held_by_another_vm(fake: FakeHost, pt_host: PassthroughHost) -> None:
    first = assign(vm_spec(NIC, name="first"), pt_host)
    with pytest.raises(DeviceClaimedError, match=r"in use by VM 'first'") as info:
        assign(vm_spec(NVME, NIC, name="second"), pt_host)
    assert info.value.holder == "first"
    assert fake.driver_of(NVME) == "nvme"  # the second VM's other device was not touched
    assert pt_host.claims.holders() == {NIC: "first"}
    first.release()


def test_unmanaged_device_is_only_checked(fake: FakeHost, pt_host: PassthroughHost) -> None:
    with pytest.raises(PassthroughError, match=r"bound to e1000e, not vfio-pci.*managed = true"):
        assign(vm_spec(NIC, managed=False), pt_host)
    assert fake.driver_of(NIC) == "e1000e" and pt_host.claims.records() == []
    # Bound by the admin: accepted, and left bound when the VM ends.
    fake.io.write(fake.root / f"sys/bus/pci/devices/{NIC}/driver_override", "vfio-pci")
    fake.io.write(fake.root / "sys/bus/pci/drivers/e1000e/unbind", NIC)
    fake.io.write(fake.root / "sys/bus/pci/drivers_probe", NIC)
    writes = len(fake.io.writes)
    pt = assign(vm_spec(NIC, managed=False), pt_host)
    assert pt_host.claims.holders() == {NIC: "pt"}
    pt.release()
    assert fake.driver_of(NIC) == "vfio-pci" and len(fake.io.writes) == writes
    assert pt_host.claims.records() == []


def test_absent_device(pt_host: PassthroughHost) -> None:
    with pytest.raises(HostError, match=r"0000:0b:00.0 does not exist"):
        assign(vm_spec("0000:0b:00.0"), pt_host)


def test_malformed_address_and_managed_flag_in_toml() -> None:
    with pytest.raises(
        SpecError, match=r"host_devices\[0\].address: '1:00.0' is not a PCI address"
    ):
        spec_from_dict({"host_devices": [{"address": "1:00.0"}]})
    with pytest.raises(SpecError, match=r"host_devices\[0\].managed"):
        spec_from_dict({"host_devices": [{"address": "01:00.0", "managed": "yes"}]})
    spec = spec_from_dict({"host_devices": [{"address": "01:00.0", "managed": False}]})
    assert spec.host_devices[0].managed is False


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fixtures.sysfs import FakeHost
    from pyqvm.host.claims import ClaimStore
    from pyqvm.host.vfio import MemlockStatus
    from pyqvm.launch.passthrough import PassthroughHost, assign
    from pyqvm.spec import HostDevice, VMSpec

    root, claims = Path(sys.argv[1]), Path(sys.argv[2])
    fake = FakeHost.existing(root)
    host = PassthroughHost(root, fake.io, ClaimStore(claims), MemlockStatus(None, True))
    pt = assign(VMSpec(name="doomed", host_devices=[HostDevice("0000:01:00.0")]), host)
    print("assigned", flush=True)
    time.sleep(60)
    """
)


def _assign_in_child_then_kill(fake: FakeHost, claims: ClaimStore) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(fake.root), str(claims.directory)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    with child.stdout:
        assert child.stdout.readline() == "assigned\n"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)


def test_recover_gives_back_devices_of_a_killed_pyqvm(
    fake: FakeHost, pt_host: PassthroughHost
) -> None:
    _assign_in_child_then_kill(fake, pt_host.claims)
    assert fake.driver_of(NIC) == "vfio-pci"  # left behind by the dead process
    (stale,) = pt_host.claims.stale()
    assert (stale.vm, stale.original_driver) == ("doomed", "e1000e")

    (done,) = recover(pt_host)
    assert (done.address, done.vm, done.restored_to, done.ok) == (NIC, "doomed", "e1000e", True)
    assert fake.driver_of(NIC) == "e1000e" and fake.override_of(NIC) is None
    assert pt_host.claims.records() == []
    assert recover(pt_host) == []


def test_next_assignment_restores_first_then_remembers_the_real_original(
    fake: FakeHost, pt_host: PassthroughHost
) -> None:
    _assign_in_child_then_kill(fake, pt_host.claims)
    pt = assign(vm_spec(NIC, name="next"), pt_host)
    assert fake.driver_of(NIC) == "vfio-pci"
    assert pt.original_driver(NIC) == "e1000e"  # not the vfio-pci the dead VM left
    pt.release()
    assert fake.driver_of(NIC) == "e1000e"


def test_recover_leaves_live_claims_alone(fake: FakeHost, pt_host: PassthroughHost) -> None:
    pt = assign(vm_spec(NIC), pt_host)
    assert recover(pt_host) == []
    assert fake.driver_of(NIC) == "vfio-pci"
    pt.release()


def test_failed_restore_keeps_the_claim_for_a_retry(
    fake: FakeHost, pt_host: PassthroughHost
) -> None:
    pt = assign(vm_spec(NIC), pt_host)
    fake.remove_driver("e1000e")
    (problem,) = pt.release()
    assert "did not go back to e1000e" in problem
    (rec,) = pt_host.claims.records()
    assert (rec.original_driver, rec.bound) == ("e1000e", True)


def test_migration_blocker() -> None:
    assert migration_blocker(VMSpec()) is None
    msg = migration_blocker(vm_spec(NIC, name="gpu-vm"))
    assert msg is not None
    assert msg.startswith("VM 'gpu-vm' has passthrough host devices (0000:01:00.0): QEMU cannot")
    assert "snapshot or migrate" in msg


def test_claim_record_is_json(pt_host: PassthroughHost) -> None:
    assign(vm_spec(NIC), pt_host)
    data = json.loads((pt_host.claims.directory / f"{NIC}.json").read_text())
    assert data["vm"] == "pt" and data["pid"] == os.getpid() and data["bound"] is True


def test_example_spec_loads_and_becomes_vfio_pci() -> None:
    from pyqvm.argv.devices import hostdev_args
    from pyqvm.spec.io import load_spec

    spec = load_spec(TESTS.parent / "examples" / "passthrough.toml")
    (dev,) = spec.host_devices
    assert (dev.address, dev.guest_address, dev.rombar, dev.managed) == (NIC, "05.0", False, True)
    assert hostdev_args(spec) == [
        "-device",
        '{"driver":"vfio-pci","id":"hostdev0","host":"0000:01:00.0","addr":"05.0","rombar":0}',
    ]
    assert migration_blocker(spec) is not None
