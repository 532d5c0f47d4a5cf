"""Internal and external snapshots, proven by what the guest (and the image files) hold."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from guest_helpers import run_example

from pyqvm import Template, image
from pyqvm.errors import SnapshotError
from pyqvm.spec import Disk, VMSpec
from pyqvm.vm import AsyncVM, VMState

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

DATA = "/mnt/data"  # the built-in guest mounts its disk ("root", /dev/vda) here


async def guest_ls(vm: AsyncVM) -> set[str]:
    return set((await vm.run(["ls", DATA], check=True)).stdout_text.split())


async def write_synced(vm: AsyncVM, path: str, data: bytes) -> None:
    await vm.write_file(path, data)
    await vm.run(["sync"], check=True)


async def test_save_load_list_delete(default_template: Template) -> None:
    async with await AsyncVM.from_template(default_template) as vm:
        await write_synced(vm, f"{DATA}/A", b"file A\n")
        # RAM too: /tmp is a tmpfs, it lives only in the guest's memory.
        await vm.write_file("/tmp/ram", b"before")
        info = await vm.snapshot_save("s1")
        assert info.tag == "s1" and info.disks == ("root",) and info.vm_state_size > 0

        await write_synced(vm, f"{DATA}/B", b"file B\n")
        await vm.write_file("/tmp/ram", b"after")
        assert {"A", "B"} <= await guest_ls(vm)

        await vm.snapshot_load("s1")
        assert vm.state is VMState.RUNNING
        files = await guest_ls(vm)
        assert "A" in files and "B" not in files
        assert await vm.read_file(f"{DATA}/A") == b"file A\n"
        assert await vm.read_file("/tmp/ram") == b"before"
        # The guest runs on from the snapshot: it can write again.
        await write_synced(vm, f"{DATA}/C", b"file C\n")

        await vm.snapshot_save("s2")
        assert [i.tag for i in await vm.snapshot_list()] == ["s1", "s2"]
        with pytest.raises(SnapshotError, match="already has a snapshot 's1'"):
            await vm.snapshot_save("s1")

        await vm.snapshot_delete("s1")
        assert [i.tag for i in await vm.snapshot_list()] == ["s2"]
        with pytest.raises(SnapshotError, match=r"no snapshot 's1'.*'s2'"):
            await vm.snapshot_load("s1")
        # QEMU's own view agrees: the overlay holds exactly one snapshot.
        (root,) = [b for b in await vm.execute("query-block") if b.get("inserted")]
        assert [s["name"] for s in root["inserted"]["image"]["snapshots"]] == ["s2"]


async def test_raw_disk_is_refused_by_name(default_image: image.GuestImage, tmp_path: Path) -> None:
    raw = tmp_path / "scratch.img"
    raw.write_bytes(b"\0" * (4 << 20))
    spec = VMSpec(image="default", disks=(Disk(raw, ephemeral=False, id="scratch"),))
    async with AsyncVM(spec) as vm:
        with pytest.raises(SnapshotError) as err:
            await vm.snapshot_save("s1")
        assert "'scratch'" in str(err.value) and str(raw) in str(err.value)
        assert "raw" in str(err.value) and "qcow2" in str(err.value)
        assert await vm.snapshot_list() == []
        assert vm.state is VMState.RUNNING
        assert (await vm.run(["true"])).returncode == 0
        await vm.stop(graceful=False)  # the scratch disk holds nothing worth a clean shutdown


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flat_image(path: Path, out: Path) -> bytes:
    """The guest-visible content of a (possibly in-use) image and its backing chain."""
    subprocess.run(
        ["qemu-img", "convert", "-U", "-O", "raw", str(path), str(out)],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


async def test_external_snapshot_keeps_base_then_commit(
    default_template: Template, tmp_path: Path
) -> None:
    marker = os.urandom(64 * 1024)  # random: found in an image only if the guest wrote it
    async with await AsyncVM.from_template(default_template) as vm:
        base = Path((await vm.disk_chain("root"))[0].filename)  # the ephemeral overlay
        overlay = await vm.disk_snapshot("root")
        chain = await vm.disk_chain("root")
        assert [c.filename for c in chain[:2]] == [str(overlay), str(base)]
        assert chain[0].node and chain[1].node == "root"
        base_sum = sha256(base)

        await write_synced(vm, f"{DATA}/marker", marker)
        await vm.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
        assert await vm.read_file(f"{DATA}/marker") == marker
        assert sha256(base) == base_sum  # the guest's writes went to the overlay only
        assert marker[:1024] not in flat_image(base, tmp_path / "base0.raw")
        assert marker[:1024] in flat_image(overlay, tmp_path / "top.raw")

        await vm.disk_commit("root")
        assert [c.filename for c in await vm.disk_chain("root")] == [c.filename for c in chain[1:]]
        assert marker[:1024] in flat_image(base, tmp_path / "base1.raw")
        # The guest still sees its data, read from the base now.
        await vm.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
        assert await vm.read_file(f"{DATA}/marker") == marker
        with pytest.raises(SnapshotError, match="ephemeral"):
            await vm.disk_commit("root")  # never into the cached built-in image


async def test_snapshot_example(default_image: image.GuestImage) -> None:
    await run_example("examples/snapshot.py")
