"""Operations refused before QEMU is asked (no QEMU needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyqvm.channels.devices import Plugged
from pyqvm.errors import HotplugError, SnapshotError, VMStateError
from pyqvm.spec import Disk, HostDevice, VMSpec
from pyqvm.vm import AsyncVM, VMState


def running(spec: VMSpec) -> AsyncVM:
    """A VM that believes it runs but has no QEMU: any QMP call would fail with VMStateError."""
    vm = AsyncVM(spec)
    vm.machine.move(VMState.STARTING)  # the moves a start makes
    vm.machine.move(VMState.RUNNING)
    return vm


@pytest.mark.asyncio
async def test_snapshot_of_a_vfio_vm_is_refused_up_front() -> None:
    vm = running(VMSpec(host_devices=(HostDevice("0000:01:00.0"),)))
    for op in (vm.snapshot_save("s1"), vm.snapshot_load("s1"), vm.snapshot_delete("s1")):
        with pytest.raises(SnapshotError, match="vfio-pci") as err:
            await op
        assert "0000:01:00.0" in str(err.value)


@pytest.mark.asyncio
async def test_operations_need_a_live_vm() -> None:
    vm = AsyncVM(VMSpec())
    with pytest.raises(VMStateError, match="created"):
        await vm.snapshot_save("s1")
    with pytest.raises(VMStateError, match="created"):
        await vm.hotplug_nic()


@pytest.mark.asyncio
@pytest.mark.parametrize("tag", ["", "  ", "12"])
async def test_bad_snapshot_tags(tag: str) -> None:
    with pytest.raises(SnapshotError, match="tag"):
        await running(VMSpec()).snapshot_save(tag)


@pytest.mark.asyncio
async def test_memory_hotplug_needs_room_in_the_spec() -> None:
    with pytest.raises(HotplugError, match="max_memory and memory_slots"):
        await running(VMSpec()).hotplug_memory("256M")


@pytest.mark.asyncio
async def test_pci_hotplug_on_an_automatic_microvm_says_how_to_get_q35() -> None:
    vm = running(VMSpec(image="default"))
    with pytest.raises(HotplugError, match=r'microvm.*"auto" chose it.*hotplug_slots = N'):
        await vm.hotplug_nic()


def test_plugged_records_survive_json(tmp_path: Path) -> None:
    raw = tmp_path / "d.img"
    raw.write_bytes(b"")
    disk = Plugged(
        (("blockdev", "hd0"),),
        (("device_add", {"driver": "virtio-blk-pci", "id": "hd0", "drive": "hd0"}),),
        disk=Disk(raw, id="hd0"),
    )
    nic = Plugged((("netdev", "n"),), (("netdev_add", {"type": "user", "id": "n"}),))
    for p in (disk, nic):
        assert Plugged.from_json(json.loads(json.dumps(p.to_json()))) == p
    with pytest.raises(HotplugError, match="not a hot-plugged device record"):
        Plugged.from_json({"commands": []})
