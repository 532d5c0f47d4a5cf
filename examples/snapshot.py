"""Internal and external snapshots of the built-in guest.

Run: python examples/snapshot.py   (builds the guest image on first use)
"""

import asyncio

from pyqvm import AsyncVM, VMSpec


async def main() -> None:
    async with AsyncVM(VMSpec(image="default")) as vm:
        # Internal snapshot: RAM, devices and disk, restored in a fraction of a second.
        await vm.write_file("/mnt/data/config", b"known good\n")
        info = await vm.snapshot_save("clean")
        print(f"saved {info.tag!r}: {info.vm_state_size} bytes of VM state on {info.disks}")

        await vm.run(["rm", "/mnt/data/config"], check=True)
        await vm.snapshot_load("clean")
        print("after load:", (await vm.read_file("/mnt/data/config")).decode().strip())
        print("snapshots:", [i.tag for i in await vm.snapshot_list()])
        await vm.snapshot_delete("clean")

        # External snapshot: a new overlay takes the guest's writes; the image below stays.
        overlay = await vm.disk_snapshot("root")
        print("chain:", [link.filename.rsplit("/", 1)[-1] for link in await vm.disk_chain("root")])
        await vm.write_file("/mnt/data/new", b"written on the overlay\n")
        await vm.run(["sync"], check=True)
        await vm.disk_commit("root")  # fold the overlay back into the image below
        print(
            "after commit:",
            [link.filename.rsplit("/", 1)[-1] for link in await vm.disk_chain("root")],
        )
        print("overlay was", overlay.name)
    print("ok")


asyncio.run(main())
