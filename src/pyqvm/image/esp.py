"""A UEFI boot disk: a GPT disk whose one EFI system partition holds systemd-boot, a
kernel, its initrd and one loader entry.

systemd-boot goes where firmware without boot entries looks for a removable medium's
loader (``\\EFI\\BOOT\\BOOT<ARCH>.EFI``), so OVMF (x86) and AAVMF (aarch64) boot the
disk as it is, with no variable store set up. Made with mkfs.vfat, mtools and sfdisk on
plain files: no mount, no loop device, no root.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pyqvm.errors import ImageError
from pyqvm.image import tools
from pyqvm.spec.arches import ArchInfo

#: The GPT type of an EFI system partition.
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
#: Where systemd-boot-efi puts its loaders (``systemd-boot<suffix>.efi``).
SYSTEMD_BOOT_DIR = "usr/lib/systemd/boot/efi"
#: The host tools this module runs, for a check before a build starts.
TOOLS = ("mkfs.vfat", "mmd", "mcopy", "sfdisk", "qemu-img")
LABEL = "PYQVM-ESP"
#: The Debian package with systemd-boot's loaders.
LOADER_PACKAGE = "systemd-boot-efi"


def systemd_boot(root: Path, arch: ArchInfo) -> Path:
    """systemd-boot's loader for ``arch`` in an unpacked tree (a system or the package)."""
    loader = root / SYSTEMD_BOOT_DIR / f"systemd-boot{arch.efi_suffix}.efi"
    if not loader.is_file():
        raise ImageError(f"{root} has no {loader.name} (from the {LOADER_PACKAGE} package)")
    return loader


def loader_entry(title: str, cmdline: str) -> str:
    """The one boot entry: the kernel and initrd at the partition's root."""
    return f"title {title}\nlinux /vmlinuz\ninitrd /initrd.img\noptions {cmdline}\n"


def boot_disk(
    out: Path,
    *,
    arch: ArchInfo,
    loader: Path,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    title: str,
) -> None:
    """Write the boot disk to ``out`` (qcow2), made in a work dir next to it."""
    work = out.with_name(f".{out.name}.work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        (work / "loader.conf").write_text("default pyqvm.conf\ntimeout 0\n")
        (work / "pyqvm.conf").write_text(loader_entry(title, cmdline))
        files = {
            loader: f"::/EFI/BOOT/BOOT{arch.efi_suffix.upper()}.EFI",
            work / "loader.conf": "::/loader/loader.conf",
            work / "pyqvm.conf": "::/loader/entries/pyqvm.conf",
            kernel: "::/vmlinuz",
            initrd: "::/initrd.img",
        }
        mib = partition_mib(sum(p.stat().st_size for p in files))
        esp = work / "esp.img"
        tools.run(["mkfs.vfat", "-C", "-n", LABEL, str(esp), str(mib * 1024)], what="mkfs.vfat")
        dirs = ["::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"]
        tools.run(["mmd", "-i", str(esp), *dirs], what="mmd")
        for src, dst in files.items():
            tools.run(["mcopy", "-i", str(esp), str(src), dst], what=f"mcopy {src.name}")
        disk = work / "boot.img"
        with disk.open("wb") as f:
            f.truncate((mib + 2) << 20)  # 1 MiB before the partition, room for GPT's backup
        tools.run(["sfdisk", "-q", str(disk)], input=partition_table(mib), what="sfdisk")
        with esp.open("rb") as src_f, disk.open("r+b") as dst_f:
            dst_f.seek(1 << 20)
            shutil.copyfileobj(src_f, dst_f)
        tools.run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(out)],
                  what="qemu-img convert")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def partition_mib(payload: int) -> int:
    """The ESP's size in MiB for ``payload`` bytes of files: FAT's own room on top."""
    return payload // (1 << 20) + 16


def partition_table(mib: int) -> str:
    """sfdisk's script for the disk: GPT, one ESP of ``mib`` MiB at 1 MiB."""
    return f"label: gpt\nstart=2048, size={mib * 2048}, type={ESP_TYPE}, name=ESP\n"


__all__ = [
    "ESP_TYPE",
    "LABEL",
    "LOADER_PACKAGE",
    "SYSTEMD_BOOT_DIR",
    "TOOLS",
    "boot_disk",
    "loader_entry",
    "partition_mib",
    "partition_table",
    "systemd_boot",
]
