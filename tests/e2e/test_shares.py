"""Shared host folders, proven by what the guest and the host each see (docs/shares.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from guest_helpers import run_script

from pyqvm import AsyncVM, MigrationError, Share, SnapshotError, VMSpec, image
from pyqvm.launch.virtiofs import virtiofsd_status

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]


def processes_naming(path: Path) -> list[int]:
    """Live processes whose command line names ``path`` (QEMU, virtiofsd)."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(path).encode() in (proc / "cmdline").read_bytes():
                out.append(int(proc.name))
        except OSError:
            continue
    return out


async def sh(vm: AsyncVM, script: str) -> str:
    r = await vm.run(["sh", "-c", script])
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr_text}"
    return r.stdout_text


def trees(tmp_path: Path) -> tuple[Path, Path]:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    for d in (rw, ro):
        d.mkdir()
        (d / "host.txt").write_text(f"from the host ({d.name})\n")
    (rw / "doomed.txt").write_text("x")
    return rw, ro


# The guest side of a round trip: read, write, create, rename, unlink, a directory.
ROUND_TRIP = """
set -e
cat /mnt/rw/host.txt
echo guest > /mnt/rw/new.txt
echo moved > /mnt/rw/before.txt && mv /mnt/rw/before.txt /mnt/rw/after.txt
rm /mnt/rw/doomed.txt
mkdir /mnt/rw/dir && echo deep > /mnt/rw/dir/file
echo more >> /mnt/rw/host.txt
"""


def check_host_side(rw: Path) -> None:
    assert (rw / "new.txt").read_text() == "guest\n"
    assert (rw / "after.txt").read_text() == "moved\n" and not (rw / "before.txt").exists()
    assert not (rw / "doomed.txt").exists()
    assert (rw / "dir" / "file").read_text() == "deep\n"
    assert (rw / "host.txt").read_text() == "from the host (rw)\nmore\n"
    assert (rw / "new.txt").stat().st_uid == os.geteuid()  # the host user's files


async def check_read_only(vm: AsyncVM, ro: Path) -> None:
    """Writes fail, and still fail after the guest remounts the share read-write: the host
    holds it read-only, not only the guest's mount options."""
    assert await sh(vm, "cat /mnt/ro/host.txt") == "from the host (ro)\n"
    for script in (
        "echo x > /mnt/ro/host.txt",
        "mount -o remount,rw /mnt/ro && touch /mnt/ro/new",
        "rm /mnt/ro/host.txt",
    ):
        r = await vm.run(["sh", "-c", script])
        assert r.returncode != 0 and "Read-only file system" in r.stderr_text, (script, r)
    assert sorted(p.name for p in ro.iterdir()) == ["host.txt"]
    assert (ro / "host.txt").read_text() == "from the host (ro)\n"


async def test_a_virtiofs_share(default_image: image.GuestImage, tmp_path: Path) -> None:
    assert virtiofsd_status().usable, virtiofsd_status().reason  # CI runs as root
    rw, ro = trees(tmp_path)
    spec = VMSpec(
        image="default",
        name="shares-vfs",
        shares=(Share(rw, tag="rw"), Share(ro, tag="ro", readonly=True)),
    )
    vm = AsyncVM(spec)
    try:
        await vm.start()
        assert [s.transport for s in vm.resolved_spec.shares] == ["virtiofs", "virtiofs"]
        mounts = await sh(vm, "grep virtiofs /proc/mounts")
        assert "rw /mnt/rw virtiofs rw" in mounts and "ro /mnt/ro virtiofs ro" in mounts
        rundir = vm.runtime_dir
        assert rundir is not None
        daemons = [p for p in processes_naming(rundir) if p != vm.pid]
        assert daemons, "no virtiofsd runs for the shares"

        assert await sh(vm, ROUND_TRIP) == "from the host (rw)\n"
        check_host_side(rw)
        # The host's edits show in the guest (cache=auto: within a second; a new name at once).
        (rw / "later.txt").write_text("written later\n")
        assert await sh(vm, "cat /mnt/rw/later.txt") == "written later\n"
        # Open, unlink, then fstat and read through the open file (9p's old trouble).
        out = await sh(
            vm,
            "exec 3<>/mnt/rw/open.txt; echo data >&3; rm /mnt/rw/open.txt; "
            "stat -L -c %s /proc/$$/fd/3; cat /proc/$$/fd/3; ls /mnt/rw",
        )
        assert out.splitlines()[:2] == ["5", "data"] and "open.txt" not in out
        await check_read_only(vm, ro)

        with pytest.raises(MigrationError, match=r"has shared folders \(rw, ro\)"):
            await vm.save(tmp_path / "saved")
        with pytest.raises(SnapshotError, match="shared folders"):
            await vm.snapshot_save("s1")
        assert await sh(vm, "cat /mnt/rw/new.txt") == "guest\n"  # still running, still shared
    finally:
        await vm.stop()
    assert processes_naming(rundir) == [], "virtiofsd or QEMU outlived stop()"
    assert not rundir.exists()


async def test_a_9p_share(full_image: image.GuestImage, tmp_path: Path) -> None:
    rw, ro = trees(tmp_path)
    shares = (
        Share(rw, tag="rw", transport="9p"),
        Share(ro, tag="ro", readonly=True, transport="9p"),
    )
    async with AsyncVM(VMSpec(image="full", name="shares-9p", shares=shares)) as vm:
        mounts = await sh(vm, "grep ' 9p ' /proc/mounts")
        assert "rw /mnt/rw 9p rw" in mounts and "ro /mnt/ro 9p ro" in mounts
        assert await sh(vm, ROUND_TRIP) == "from the host (rw)\n"
        check_host_side(rw)
        await check_read_only(vm, ro)


async def test_the_share_option_of_run(default_image: image.GuestImage, tmp_path: Path) -> None:
    """``pyqvm run --share HOST:GUEST`` as a user types it; the guest's output comes back."""
    (tmp_path / "in.txt").write_text("input\n")
    code, out, err = await run_script(
        "-m",
        "pyqvm",
        "run",
        "--share",
        f"{tmp_path}:/work",
        "--",
        "sh",
        "-c",
        "cat /work/in.txt && echo output > /work/out.txt",
    )
    assert code == 0, err
    assert out == "input\n" and (tmp_path / "out.txt").read_text() == "output\n"
