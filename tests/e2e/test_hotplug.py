"""Hotplug and unplug of disks, NICs, vCPUs and memory, proven by what the guest sees."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from guest_helpers import run_example

from pyqvm import image
from pyqvm.errors import HotplugError, PyqvmTimeoutError, UnplugTimeoutError
from pyqvm.spec import Disk, Network, VMSpec
from pyqvm.vm import AsyncVM, VMState

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

MIB = 1024 * 1024


async def sh(vm: AsyncVM, script: str) -> str:
    return (await vm.run(["sh", "-c", script], check=True)).stdout_text.strip()


async def until(vm: AsyncVM, condition: str, what: str) -> None:
    """Wait in the guest (bounded) until the shell ``condition`` holds."""
    loop = f"for i in $(seq 150); do if {condition}; then exit 0; fi; sleep 0.1; done; exit 1"
    result = await vm.run(["sh", "-c", loop])
    assert result.returncode == 0, f"guest never saw {what}"


async def listing(vm: AsyncVM, directory: str) -> set[str]:
    return set((await sh(vm, f"ls {directory}")).split())


async def node_names(vm: AsyncVM) -> set[str]:
    return {n["node-name"] for n in await vm.execute("query-named-block-nodes")}


async def peripherals(vm: AsyncVM) -> set[str]:
    return {p["name"] for p in await vm.execute("qom-list", {"path": "/machine/peripheral"})}


async def test_disk_and_nic_on_q35(default_image: image.GuestImage, tmp_path: Path) -> None:
    raw = tmp_path / "data.img"
    raw.write_bytes(b"")
    os.truncate(raw, 48 * MIB)
    mac = "52:54:00:12:34:99"
    async with AsyncVM(VMSpec(image="default", hotplug_slots=2)) as vm:
        blocks, nets = await listing(vm, "/sys/block"), await listing(vm, "/sys/class/net")

        disk = await vm.hotplug_disk(Disk(raw, ephemeral=False, id="data"))
        await until(vm, f"[ $(ls /sys/block | wc -l) -gt {len(blocks)} ]", "the new disk")
        (dev,) = await listing(vm, "/sys/block") - blocks
        assert int(await sh(vm, f"cat /sys/block/{dev}/size")) * 512 == 48 * MIB
        # Writable and readable by the guest, and the write reached the host's file.
        await sh(vm, f"printf hot-plugged | dd of=/dev/{dev} bs=512 seek=100 conv=fsync")
        await sh(vm, "echo 3 > /proc/sys/vm/drop_caches")
        assert await sh(vm, f"dd if=/dev/{dev} bs=512 skip=100 count=1 | head -c 11") == (
            "hot-plugged"
        )
        assert raw.read_bytes()[512 * 100 : 512 * 100 + 11] == b"hot-plugged"

        nic = await vm.hotplug_nic(Network(mac=mac))
        await until(vm, f"[ $(ls /sys/class/net | wc -l) -gt {len(nets)} ]", "the new NIC")
        (eth,) = await listing(vm, "/sys/class/net") - nets
        assert await sh(vm, f"cat /sys/class/net/{eth}/address") == mac

        with pytest.raises(HotplugError, match="all 2 hotplug slots are in use"):
            await vm.hotplug_nic()

        await vm.unplug(disk)
        await vm.unplug(nic)
        assert await listing(vm, "/sys/block") == blocks
        assert await listing(vm, "/sys/class/net") == nets
        assert "data" not in await node_names(vm)
        network = await vm.execute("human-monitor-command", {"command-line": "info network"})
        assert nic not in network
        assert {disk, nic}.isdisjoint(await peripherals(vm))

        # The slots are free again.
        assert await vm.hotplug_nic() == "hnic0"  # the first free id, reused
        await until(vm, f"[ $(ls /sys/class/net | wc -l) -gt {len(nets)} ]", "a NIC again")


async def test_nic_on_pc(default_image: image.GuestImage) -> None:
    async with AsyncVM(VMSpec(image="default", machine="pc")) as vm:
        nets = await listing(vm, "/sys/class/net")
        nic = await vm.hotplug_nic()
        await until(vm, f"[ $(ls /sys/class/net | wc -l) -gt {len(nets)} ]", "the new NIC")
        await vm.unplug(nic)
        assert await listing(vm, "/sys/class/net") == nets


async def test_vcpu_and_memory(default_image: image.GuestImage) -> None:
    spec = VMSpec(image="default", max_smp=2, max_memory="1G", memory_slots=2)
    async with AsyncVM(spec) as vm:
        assert await sh(vm, "cat /sys/devices/system/cpu/online") == "0"
        cpu = await vm.hotplug_cpu()
        await until(vm, "[ -e /sys/devices/system/cpu/cpu1/online ]", "cpu1")
        # The built-in guest has no udev rule to online it: do it as udev would.
        await sh(vm, "echo 1 > /sys/devices/system/cpu/cpu1/online")
        assert await sh(vm, "cat /sys/devices/system/cpu/online") == "0-1"
        assert await sh(vm, "grep -c ^processor /proc/cpuinfo") == "2"
        with pytest.raises(HotplugError, match="all its 2 vCPU"):
            await vm.hotplug_cpu()
        with pytest.raises(HotplugError, match="crashes QEMU"):
            await vm.unplug(cpu)  # QEMU 7.2 under TCG: refused, the vCPU stays
        assert await sh(vm, "cat /sys/devices/system/cpu/online") == "0-1"

        total = "grep MemTotal /proc/meminfo | tr -dc 0-9"
        before = int(await sh(vm, total))
        blocks = "ls -d /sys/devices/system/memory/memory* | wc -l"
        nblocks = int(await sh(vm, blocks))
        block_size = int(await sh(vm, "cat /sys/devices/system/memory/block_size_bytes"), 16)
        dimm = await vm.hotplug_memory("256M")
        new = 256 * MIB // block_size
        await until(vm, f"[ $({blocks}) -eq {nblocks + new} ]", "the new memory blocks")
        await sh(
            vm,
            "for m in /sys/devices/system/memory/memory*; do "
            "[ $(cat $m/state) = offline ] && echo online_movable > $m/state; done; true",
        )
        assert int(await sh(vm, total)) - before == 256 * 1024  # kB
        with pytest.raises(HotplugError, match="does not fit"):
            await vm.hotplug_memory("512M")
        await vm.unplug(dimm)
        assert int(await sh(vm, total)) == before
        assert not any(
            o["name"] == f"{dimm}-mem" for o in await vm.execute("qom-list", {"path": "/objects"})
        )


async def test_unplug_the_guest_never_acknowledges(
    default_image: image.GuestImage, tmp_path: Path
) -> None:
    raw = tmp_path / "late.img"
    raw.write_bytes(b"")
    os.truncate(raw, 8 * MIB)
    async with AsyncVM(VMSpec(image="default", hotplug_slots=1)) as vm:
        blocks = await listing(vm, "/sys/block")
        disk = await vm.hotplug_disk(Disk(raw, id="late"))
        await until(vm, f"[ $(ls /sys/block | wc -l) -gt {len(blocks)} ]", "the new disk")
        await vm.pause()  # a guest that does not run cannot acknowledge anything
        with pytest.raises(UnplugTimeoutError) as err:
            await vm.unplug(disk, timeout=2)
        assert isinstance(err.value, PyqvmTimeoutError) and err.value.device == "late"
        # Nothing changed: same VM state, the device and its disk node are still there.
        assert vm.state is VMState.PAUSED
        assert "late" in await peripherals(vm) and "late" in await node_names(vm)
        await vm.resume()
        await vm.unplug(disk)  # finishes the pending unplug
        assert await listing(vm, "/sys/block") == blocks
        assert "late" not in await node_names(vm)


async def test_hotplug_example(default_image: image.GuestImage) -> None:
    await run_example("examples/hotplug.py")


@dataclasses.dataclass
class DiskAndNic:
    """A hot-plugged ephemeral disk with a word written at one sector, and a NIC."""

    disk: str
    nic: str
    dev: str  # as the guest names them
    eth: str
    blocks: set[str]  # the guest's block devices before the plug
    raw: Path
    word: str
    mac: str

    async def check(self, vm: AsyncVM) -> None:
        """``vm`` (the same guest, moved) still has both, and the disk still holds the word."""
        assert {self.disk, self.nic} <= await peripherals(vm)
        await sh(vm, "echo 3 > /proc/sys/vm/drop_caches")
        read = f"dd if=/dev/{self.dev} bs=512 skip=7 count=1 | head -c {len(self.word)}"
        assert await sh(vm, read) == self.word
        assert await sh(vm, f"cat /sys/class/net/{self.eth}/address") == self.mac
        assert self.raw.read_bytes().count(self.word.encode()) == 0  # ephemeral: never written


async def plug_disk_and_nic(vm: AsyncVM, tmp_path: Path, word: str, mac: str) -> DiskAndNic:
    raw = tmp_path / "extra.img"
    raw.write_bytes(b"")
    os.truncate(raw, 16 * MIB)
    blocks, nets = await listing(vm, "/sys/block"), await listing(vm, "/sys/class/net")
    disk = await vm.hotplug_disk(Disk(raw, format="raw", id="extra"))  # ephemeral
    nic = await vm.hotplug_nic(Network(mac=mac))
    await until(vm, f"[ $(ls /sys/block | wc -l) -gt {len(blocks)} ]", "the new disk")
    await until(vm, f"[ $(ls /sys/class/net | wc -l) -gt {len(nets)} ]", "the new NIC")
    (dev,) = await listing(vm, "/sys/block") - blocks
    (eth,) = await listing(vm, "/sys/class/net") - nets
    await sh(vm, f"printf {word} | dd of=/dev/{dev} bs=512 seek=7 conv=fsync")
    return DiskAndNic(disk, nic, dev, eth, blocks, raw, word, mac)


@pytest.mark.parametrize("storage", ["shared", "copied"])
async def test_hot_plugged_devices_follow_a_migration(
    default_image: image.GuestImage, tmp_path: Path, storage: str
) -> None:
    """The destination gets what was hot-plugged into the source, with the same ids and
    slots, before the state arrives; the guest carries on with its disk, NIC, vCPU and DIMM."""
    spec = VMSpec(image="default", hotplug_slots=2, max_smp=2, max_memory="1G", memory_slots=1)
    src, dst = AsyncVM(spec), AsyncVM(spec)
    try:
        await src.start()
        plugged = await plug_disk_and_nic(src, tmp_path, "migrated", "52:54:00:12:34:77")
        cpu = await src.hotplug_cpu()
        dimm = await src.hotplug_memory("128M")

        await src.migrate(dst, storage=storage)  # type: ignore[arg-type]

        await plugged.check(dst)
        assert {cpu, dimm} <= await peripherals(dst)
        cpus = await dst.execute("query-hotpluggable-cpus")
        assert any(c.get("qom-path") == f"/machine/peripheral/{cpu}" for c in cpus)
        assert await sh(dst, "ls -d /sys/devices/system/cpu/cpu1")  # the guest still has it
        assert len(await dst.execute("query-memory-devices")) == 1
        # The destination knows them as its own: they unplug there.
        await dst.unplug(plugged.disk)
        await dst.unplug(plugged.nic)
        assert await listing(dst, "/sys/block") == plugged.blocks
    finally:
        await dst.stop()
        await src.stop()


async def test_hot_plugged_devices_are_saved_and_restored(
    default_image: image.GuestImage, tmp_path: Path
) -> None:
    spec = VMSpec(image="default", hotplug_slots=2)
    vm, restored = AsyncVM(spec), AsyncVM(spec)
    try:
        await vm.start()
        plugged = await plug_disk_and_nic(vm, tmp_path, "saved", "52:54:00:12:34:78")

        saved = await vm.save(tmp_path / "saved")
        assert saved.disks == ("root",)  # the spec's disks; the hot-plugged one rides along
        assert (saved.directory / "extra.qcow2").is_file()
        await restored.restore(saved.directory)

        await plugged.check(restored)
        await restored.unplug(plugged.disk)
        assert await listing(restored, "/sys/block") == plugged.blocks
    finally:
        await restored.stop()
        await vm.stop()
