"""Boot the built-in guest under TCG in each profile and ask the guest what it sees."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from pyqvm import image
from pyqvm.errors import LaunchError
from pyqvm.spec import Disk, Network, VMSpec
from pyqvm.spec.arches import arch_info
from pyqvm.vm import AsyncVM

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

# The PCI device a block device or NIC sits on, and that device's driver.
DRIVER_OF = """
for dev in "$@"; do
  p=$(readlink -f "$dev")
  while [ "$p" != / ]; do
    if [ -e "$p/driver" ] && [ -e "$p/subsystem_vendor" ]; then
      echo "$(basename "$dev")=$(basename "$(readlink -f "$p/driver")")"; break
    fi
    p=$(dirname "$p")
  done
done
"""


async def drivers(vm: AsyncVM, *paths: str) -> dict[str, str]:
    r = await vm.run(["sh", "-c", DRIVER_OF, "sh", *paths], check=True)
    return dict(line.split("=", 1) for line in r.stdout_text.split())


@pytest.mark.parametrize(
    ("machine", "transport"), [("auto", "virtio-mmio"), ("q35", "virtio-pci"), ("pc", "virtio-pci")]
)
async def test_virtio_profile(
    default_image: image.GuestImage, machine: str, transport: str
) -> None:
    spec = VMSpec(image="default", machine=machine, networks=(Network(),), accelerator="auto")  # type: ignore[arg-type]
    async with AsyncVM(spec) as vm:
        assert vm.accelerator == "tcg"  # /dev/kvm exists here but KVM does not work
        r = await vm.run(["sh", "-c", "ls /sys/block; ls /sys/class/net; cat /mnt/data/hello.txt"])
        assert r.returncode == 0, r.stderr_text
        assert "vda" in r.stdout_text.split() and "eth0" in r.stdout_text.split()
        # The function driver is on the virtio bus; its parent is the transport
        # (a PCI function, or microvm's virtio-mmio platform device).
        r = await vm.run(
            [
                "sh",
                "-c",
                "for d in /sys/class/net/eth0/device /sys/block/vda/device; do"
                " basename $(readlink $d/driver); basename $(readlink -f $d/../driver); done",
            ],
            check=True,
        )
        assert r.stdout_text.split() == ["virtio_net", transport, "virtio_blk", transport]
        rng = await vm.run(["cat", "/sys/class/misc/hw_random/rng_current"], check=True)
        assert "virtio" in rng.stdout_text


@pytest.mark.parametrize(
    ("machine", "nic", "disk"), [("q35", "e1000e", "ahci"), ("pc", "e1000", "ata_piix")]
)
async def test_emulated_profile(
    full_image: image.GuestImage, machine: str, nic: str, disk: str
) -> None:
    spec = VMSpec(image="full", profile="emulated", machine=machine, networks=(Network(),))  # type: ignore[arg-type]
    async with AsyncVM(spec) as vm:
        seen = await drivers(vm, "/sys/block/sda", "/sys/class/net/eth0")
        assert seen == {"sda": disk, "eth0": nic}
        r = await vm.run(["cat", "/mnt/data/hello.txt"], check=True)
        assert r.stdout


async def test_base_image_never_written(default_image: image.GuestImage) -> None:
    before = hashlib.sha256(default_image.disk.read_bytes()).hexdigest()
    async with AsyncVM(VMSpec(image="default")) as vm:
        await vm.run(
            ["sh", "-c", "dd if=/dev/urandom of=/mnt/data/junk bs=1M count=4 && sync"], check=True
        )
        r = await vm.run(["sh", "-c", "ls -l /mnt/data/junk"], check=True)
        assert "4194304" in r.stdout_text
    assert hashlib.sha256(default_image.disk.read_bytes()).hexdigest() == before


async def test_nothing_left_behind(default_image: image.GuestImage) -> None:
    vm = AsyncVM(VMSpec(image="default"))
    async with vm:
        rundir, pid = vm.runtime_dir, vm.pid
        assert rundir is not None and rundir.is_dir() and pid is not None
        await vm.write_file("/tmp/greeting", b"hello\n")
        assert await vm.read_file("/tmp/greeting") == b"hello\n"
    assert not rundir.exists()
    assert not Path(f"/proc/{pid}").exists()


async def test_readiness_timeout_quotes_console(default_image: image.GuestImage) -> None:
    spec = VMSpec(
        image="default", ready="console", ready_pattern="this-never-shows", ready_timeout=8
    )
    vm = AsyncVM(spec)
    with pytest.raises(LaunchError) as err:
        await vm.start()
    assert default_image.ready_marker in err.value.console
    assert "console tail" in str(err.value)
    assert vm.pid is not None and not Path(f"/proc/{vm.pid}").exists()


async def test_graceful_stop_flushes_a_persistent_disk(
    default_image: image.GuestImage, tmp_path: Path
) -> None:
    """A disk written in place gets a clean guest shutdown: what sat in the guest's page
    cache reaches the host file (a bare `quit` loses it: checked by hand)."""
    disk = tmp_path / "scratch.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk), "8M"], check=True)
    spec = VMSpec(image="default", disks=(Disk(disk, ephemeral=False, id="scratch"),))
    vm = AsyncVM(spec)
    await vm.start()
    try:
        # vdb is the second virtio disk; no sync: the file stays in the guest's page cache.
        await vm.run(
            ["sh", "-c", "mkdir /mnt/x && mount /dev/vdb /mnt/x && echo flushed > /mnt/x/f"],
            check=True,
        )
    finally:
        code = await vm.stop()
    assert code == 0
    out = subprocess.run(
        ["debugfs", "-R", "cat /f", str(disk)], capture_output=True, text=True, check=True
    )
    assert out.stdout == "flushed\n"


async def test_the_boot_disk_boots_under_ovmf(default_image: image.GuestImage) -> None:
    """Firmware boot of a plain disk: OVMF (found through QEMU's firmware descriptors),
    systemd-boot from the ESP, the image's kernel."""
    assert default_image.boot_disk is not None
    spec = VMSpec(
        name="uefi",
        firmware="ovmf",
        disks=(Disk(path=default_image.boot_disk),),
        ready="agent",
        ready_timeout=180,
    )
    async with AsyncVM(spec) as vm:
        assert "-kernel" not in vm.argv and vm.machine.resolved_spec.effective_machine == "q35"
        assert vm.machine.resolved_spec.ovmf_code == Path(arch_info("x86_64").firmware_code)
        out = await vm.run(["sh", "-c", "test -d /sys/firmware/efi && cat /proc/cmdline"])
        assert out.stdout_text == f"initrd=\\initrd.img {default_image.cmdline}\n"
