"""An aarch64 guest under TCG on an x86 host: the built-in image on QEMU's virt board."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from _cli import pyqvm

from pyqvm import AsyncVM, Disk, Network, VMSpec, image, templates
from pyqvm.spec.arches import arch_info

pytestmark = [pytest.mark.e2e]

# PCI device ids of virtio devices: transitional (what QEMU gives on virt's root bus) and modern.
VIRTIO_PCI = {
    **{"0x1000": "net", "0x1001": "block", "0x1002": "balloon", "0x1003": "console"},
    **{"0x1005": "rng", "0x1041": "net", "0x1042": "block", "0x1043": "console"},
    **{"0x1044": "rng", "0x1045": "balloon"},
}


async def sh(vm: AsyncVM, script: str) -> str:
    return (await vm.run(["sh", "-c", script], check=True)).stdout_text


@pytest.mark.asyncio
async def test_the_built_in_guest_runs_on_virt_with_the_virtio_devices_asked_for(
    aarch64_image: image.GuestImage, tmp_path: Path
) -> None:
    assert aarch64_image.arch == "aarch64"
    extra = tmp_path / "extra.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(extra), "16M"], check=True)
    spec = VMSpec(
        name="arm",
        arch="aarch64",
        image="default",
        smp=2,
        disks=(Disk(path=extra, id="extra"),),
        networks=(Network(mode="user"),),
    )
    async with AsyncVM(spec) as vm:
        assert vm.machine.argv[0].endswith("qemu-system-aarch64")
        assert await sh(vm, "uname -m") == "aarch64\n"
        assert await sh(vm, "grep -c ^processor /proc/cpuinfo") == "2\n"
        # The PCI functions the guest sees: virtio-net, two virtio-blk, the agent's
        # virtio-serial, virtio-rng, virtio-balloon -- all on virt's PCIe host bridge.
        ids = (await sh(vm, "cat /sys/bus/pci/devices/*/device")).split()
        kinds = sorted(VIRTIO_PCI[i] for i in ids if i in VIRTIO_PCI)
        assert kinds == ["balloon", "block", "block", "console", "net", "rng"], ids
        # The extra disk is a disk the guest can write; the NIC has slirp's address.
        assert await sh(vm, "cat /sys/block/vdb/size") == str(16 * 1024 * 2) + "\n"
        await sh(vm, "echo hi | dd of=/dev/vdb bs=512 count=1 conv=sync 2>/dev/null; sync")
        assert "10.0.2.15" in await sh(vm, "ip -4 addr show eth0")
        # init's marker came through the serial console: the PL011 (console=ttyAMA0).
        assert aarch64_image.ready_marker in vm.console_text()


@pytest.mark.asyncio
async def test_a_template_of_an_aarch64_guest_clones(
    aarch64_image: image.GuestImage, tmp_path: Path
) -> None:
    """Its clones are made their own by the cross-compiled helper like any other."""
    spec = VMSpec(name="armt", arch="aarch64", image="default")
    t = await templates.create(spec, "arm", directory=tmp_path / "t", setup=["echo s > /tmp/s"])
    a = await AsyncVM.from_template(t)
    b = await AsyncVM.from_template(t)
    try:
        assert await sh(a, "cat /tmp/s; uname -m") == "s\naarch64\n"
        assert await sh(a, "head -c 16 /dev/urandom | od -An -tx1") != await sh(
            b, "head -c 16 /dev/urandom | od -An -tx1"
        )
    finally:
        await a.stop()
        await b.stop()


def test_pyqvm_run_arch_aarch64(aarch64_image: image.GuestImage) -> None:
    out = pyqvm("run", "--arch", "aarch64", "--", "uname", "-m")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "aarch64\n"


@pytest.mark.asyncio
async def test_the_aarch64_boot_disk_boots_under_uefi(aarch64_image: image.GuestImage) -> None:
    """No -kernel: AAVMF (qemu-efi-aarch64, found through QEMU's firmware descriptors) finds
    systemd-boot on the boot disk's EFI system partition as the removable-media loader, and
    it loads the kernel and initrd from there."""
    assert aarch64_image.boot_disk is not None
    spec = VMSpec(
        name="arm-uefi",
        arch="aarch64",
        firmware="ovmf",
        disks=(Disk(path=aarch64_image.boot_disk),),
        ready="agent",
        ready_timeout=180,
    )
    async with AsyncVM(spec) as vm:
        assert "-kernel" not in vm.argv and "pflash0=pq-ovmf-code" in " ".join(vm.argv)
        # the descriptor's code image (60-edk2-aarch64.json on Debian)
        assert vm.machine.resolved_spec.ovmf_code == Path(arch_info("aarch64").firmware_code)
        out = await sh(vm, "uname -m; test -d /sys/firmware/efi && echo efi; cat /proc/cmdline")
        arch, efi, cmdline = out.splitlines()
        assert (arch, efi) == ("aarch64", "efi")
        # systemd-boot's entry: it passes the initrd it loaded and the image's command line.
        assert cmdline == f"initrd=\\initrd.img {aarch64_image.cmdline}"
