"""Hot-plug a disk, a NIC, a vCPU and memory into the built-in guest, then unplug them.

Run: python examples/hotplug.py   (builds the guest image on first use)
"""

import asyncio
import os
import tempfile
from pathlib import Path

from pyqvm import AsyncVM, Disk, VMSpec

ONLINE_ALL = (
    # The built-in guest has no udev: bring hot-added vCPUs and memory online by hand.
    "for c in /sys/devices/system/cpu/cpu[1-9]*/online; do echo 1 > $c; done; "
    "for m in /sys/devices/system/memory/memory*/state; do "
    "[ $(cat $m) = offline ] && echo online_movable > $m; done; true"
)


async def guest(vm: AsyncVM, script: str) -> str:
    return (await vm.run(["sh", "-c", script], check=True)).stdout_text.strip()


async def main() -> None:
    spec = VMSpec(
        image="default",
        hotplug_slots=2,  # q35: two free pcie-root-ports for a disk and a NIC
        max_smp=2,  # -smp 1,maxcpus=2
        max_memory="1G",  # -m 512M,slots=1,maxmem=1024M
        memory_slots=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "extra.img"
        image.write_bytes(b"")
        os.truncate(image, 32 << 20)
        async with AsyncVM(spec) as vm:
            blocks = await guest(vm, "ls -d /sys/devices/system/memory/memory* | wc -l")
            disk = await vm.hotplug_disk(Disk(image))  # ephemeral: the file stays untouched
            nic = await vm.hotplug_nic()  # user-mode networking, virtio-net
            cpu = await vm.hotplug_cpu()
            dimm = await vm.hotplug_memory("256M")
            print("plugged:", disk, nic, cpu, dimm)
            # Wait (in the guest, bounded) until it has seen all four.
            await guest(
                vm,
                "for i in $(seq 100); do [ -e /sys/block/vdb ] && [ -e /sys/class/net/eth0 ] "
                "&& [ -e /sys/devices/system/cpu/cpu1/online ] "
                f"&& [ $(ls -d /sys/devices/system/memory/memory* | wc -l) -gt {blocks} ] "
                "&& break; sleep 0.1; done",
            )
            await guest(vm, ONLINE_ALL)
            print("guest disks:", await guest(vm, "ls /sys/block | tr '\\n' ' '"))
            print("guest NICs:", await guest(vm, "ls /sys/class/net | tr '\\n' ' '"))
            print("guest CPUs online:", await guest(vm, "cat /sys/devices/system/cpu/online"))
            print("guest memory:", await guest(vm, "grep MemTotal /proc/meminfo"))
            for device in (disk, nic, dimm):  # vCPU unplug crashes QEMU 7.2 under TCG
                await vm.unplug(device)
            print("after unplug:", await guest(vm, "ls /sys/block /sys/class/net | tr '\\n' ' '"))
    print("ok")


asyncio.run(main())
