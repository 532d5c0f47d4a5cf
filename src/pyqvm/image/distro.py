"""The ``debian`` flavour: a real Debian 12 system (systemd, udev, the guest agent, an SSH
server, cloud-init), built from Debian packages with ``mmdebstrap``.

The root file system is made by mmdebstrap from the host's apt sources (no
change to the host), put into an ext4 image with ``mkfs.ext4 -d`` (no loop
mount, no root tricks beyond what mmdebstrap's root mode needs) and converted
to qcow2. The generic kernel and its initramfs-tools initrd are taken out of
the tree and booted directly: no bootloader. The files of ``recipes/debian``
go to fixed places in the tree (fstab, cloud-init's datasource list, a
networkd profile). The cache key hashes the candidate versions of the
packages asked for, the recipes and `DISTRO_VERSION`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
from pathlib import Path

from pyqvm.errors import ImageError
from pyqvm.image import tools

log = logging.getLogger(__name__)

DISTRO_VERSION = "2"  # 2: the UEFI boot disk
SUITE = "bookworm"
RECIPES = Path(__file__).with_name("recipes") / "debian"
ROOT_LABEL = "pyqvm-root"
ROOT_SIZE = "3G"  # the file system's size; the qcow2 holds only what is written
#: What the system is made of (and their dependencies): mmdebstrap's --include.
PACKAGES = (
    "systemd-sysv", "udev", "dbus", "linux-image-amd64", "qemu-guest-agent",
    "openssh-server", "cloud-init", "iproute2", "procps", "less", "ca-certificates",
    # cloud-init's defaults run resize2fs and restart systemd-resolved with networkd
    "e2fsprogs", "systemd-resolved",
    "systemd-boot-efi",  # the boot disk's UEFI loader (`boot.qcow2`)
)  # fmt: skip
#: recipe file -> its place in the tree.
FILES = {
    "fstab": "etc/fstab",
    "90-pyqvm.cfg": "etc/cloud/cloud.cfg.d/90-pyqvm.cfg",
    "20-wired.network": "etc/systemd/network/20-wired.network",
}
CMDLINE = f"root=LABEL={ROOT_LABEL} rw console=ttyS0 mitigations=off quiet"
#: The GPT type of an EFI system partition.
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
SYSTEMD_BOOT = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"


def inputs() -> dict[str, str]:
    """What the image is made of, for the cache key: package versions, recipes, version."""
    found = tools.apt_show(list(PACKAGES))
    d = {"distro": DISTRO_VERSION, "suite": SUITE}
    d |= {f"pkg:{name}": pkg.version for name, pkg in found.items()}
    d |= {
        f"recipe:{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(RECIPES.iterdir())
    }
    return d


def assemble(out: Path) -> dict[str, object]:
    """Build the system into ``out``: vmlinuz, initrd.img, disk.qcow2; returns the manifest."""
    tree = out / "tree"
    hooks = ['passwd --root "$1" -d root', 'systemctl --root "$1" enable systemd-networkd']
    hooks += [f'install -D -m 0644 "{RECIPES / src}" "$1/{dst}"' for src, dst in FILES.items()]
    hooks.append('echo pyqvm-debian > "$1/etc/hostname"')
    argv = ["mmdebstrap", "--variant=apt", "--mode=auto", f"--include={','.join(PACKAGES)}"]
    argv += [f"--customize-hook={h}" for h in hooks]
    argv += [SUITE, str(tree), *map(str, tools.host_apt_sources())]
    log.info("mmdebstrap %s: %s (a minute or two)", SUITE, ", ".join(PACKAGES))
    tools.run(argv, what="mmdebstrap")
    boot = tree / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError(f"the {SUITE} tree has {len(kernels)} kernels in /boot, not one")
    version = kernels[0].name.removeprefix("vmlinuz-")
    initrd = boot / f"initrd.img-{version}"
    if not initrd.is_file():
        raise ImageError(f"the {SUITE} tree has no {initrd.name}")
    shutil.copyfile(kernels[0], out / "vmlinuz")
    shutil.copyfile(initrd, out / "initrd.img")
    _boot_disk(out, tree / SYSTEMD_BOOT)
    raw = out / "root.img"
    log.info("making the root file system (ext4 %s, label %s)", ROOT_SIZE, ROOT_LABEL)
    tools.run(
        ["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", str(tree), str(raw), ROOT_SIZE],
        what="mkfs.ext4",
    )
    tools.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / "disk.qcow2")],
              what="qemu-img convert")  # fmt: skip
    raw.unlink()
    shutil.rmtree(tree)
    return {
        "kind": "distro",
        "kernel_version": version,
        "kernel": "vmlinuz",
        "bzimage": "vmlinuz",
        "initrd": "initrd.img",
        "disk": "disk.qcow2",
        "boot_disk": "boot.qcow2",
        "ready_marker": "",
        "cmdline": CMDLINE,
        "packages": list(PACKAGES),
    }


def _boot_disk(out: Path, loader: Path) -> None:
    """``boot.qcow2``: a GPT disk whose one EFI system partition holds systemd-boot (as the
    removable-media loader, so firmware without boot entries finds it), the kernel, the
    initrd and a loader entry for the root disk. With `disk.qcow2` as a second disk it
    boots under OVMF (firmware = "ovmf"): the proof that the root disk is a bootable system.
    Made with mkfs.vfat, mtools and sfdisk on plain files: no mount, no loop device."""
    if not loader.is_file():
        raise ImageError(f"the tree has no {loader.name} (systemd-boot-efi)")
    work = out / "esp"
    work.mkdir()
    (work / "loader.conf").write_text("default debian.conf\ntimeout 0\n")
    (work / "debian.conf").write_text(
        f"title Debian {SUITE} (pyqvm)\nlinux /vmlinuz\ninitrd /initrd.img\noptions {CMDLINE}\n"
    )
    files = {
        loader: "::/EFI/BOOT/BOOTX64.EFI",
        work / "loader.conf": "::/loader/loader.conf",
        work / "debian.conf": "::/loader/entries/debian.conf",
        out / "vmlinuz": "::/vmlinuz",
        out / "initrd.img": "::/initrd.img",
    }
    mib = sum(p.stat().st_size for p in files) // (1 << 20) + 16
    esp = work / "esp.img"
    tools.run(["mkfs.vfat", "-C", "-n", "PYQVM-ESP", str(esp), str(mib * 1024)],
              what="mkfs.vfat")  # fmt: skip
    tools.run(["mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"],
              what="mmd")  # fmt: skip
    for src, dst in files.items():
        tools.run(["mcopy", "-i", str(esp), str(src), dst], what=f"mcopy {src.name}")
    disk = work / "boot.img"
    with disk.open("wb") as f:
        f.truncate((mib + 2) << 20)  # 1 MiB before the partition, room for GPT's backup
    table = f"label: gpt\nstart=2048, size={mib * 2048}, type={ESP_TYPE}, name=ESP\n"
    subprocess.run([tools.tool("sfdisk"), "-q", str(disk)], input=table, text=True, check=True,
                   capture_output=True)  # fmt: skip
    with esp.open("rb") as src_f, disk.open("r+b") as dst_f:
        dst_f.seek(1 << 20)
        shutil.copyfileobj(src_f, dst_f)
    tools.run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(out / "boot.qcow2")],
              what="qemu-img convert")  # fmt: skip
    shutil.rmtree(work)


__all__ = ["CMDLINE", "PACKAGES", "ROOT_LABEL", "assemble", "inputs"]
