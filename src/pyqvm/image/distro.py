"""The ``debian`` flavour: a real Debian 12 system (systemd, udev, the guest agent, an SSH
server, cloud-init), bootstrapped from Debian's archive in two stages with no Debian tool
and no root on the host, for x86_64 and aarch64.

The first stage (`pyqvm.image.bootstrap`) resolves and fetches the packages with
pyqvm's archive client, unpacks the essential ones into a tree, adds the files of
``recipes/debian`` at fixed places (fstab, cloud-init's datasource list, a networkd
profile, a wait-online drop-in that does not wait for a NIC the VM lacks, pyqvm-wake's
unit and udev rule, an initramfs of the boot disks' drivers only; the helper itself
compiled from the built-in guest's recipe), and
makes the tree an ext4 image with ``mkfs.ext4 -d`` (no loop mount). The second stage
runs in a helper guest of the same arch (the caller's `SecondStage`): dpkg installs and
configures everything. The generic kernel and the initrd dpkg made are then read out of
the file system with ``debugfs`` and booted directly; ``boot.qcow2`` has them on an EFI
system partition behind systemd-boot for firmware boot. The cache key hashes the
candidate versions of the packages asked for, the recipes, the arch and
`DISTRO_VERSION`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
from pathlib import Path

from pyqvm.errors import ImageError
from pyqvm.image import bootstrap, esp, tools
from pyqvm.image.archive import Archive, unpack
from pyqvm.spec.arches import ArchInfo, cross_compiler

log = logging.getLogger(__name__)

# 2: the UEFI boot disk (pyqvm.image.esp); 3: pyqvm-wake; 4: bootstrapped by pyqvm itself
DISTRO_VERSION = "4"
SUITE = "bookworm"
RECIPES = Path(__file__).with_name("recipes") / "debian"
ROOT_LABEL = "pyqvm-root"
DEBS_LABEL = "pyqvm-debs"  # the second stage's packages, on a disk of their own
ROOT_SIZE = "3G"  # the file system's size; the qcow2 holds only what is written
#: What the system is made of, besides the essential set and apt (and their dependencies).
PACKAGES = (
    "systemd-sysv", "udev", "dbus", "qemu-guest-agent",
    "openssh-server", "cloud-init", "iproute2", "procps", "less", "ca-certificates",
    # cloud-init's defaults run resize2fs and restart systemd-resolved with networkd
    "e2fsprogs", "systemd-resolved",
    esp.LOADER_PACKAGE,  # the boot disk's UEFI loader (`boot.qcow2`)
)  # fmt: skip
#: recipe file -> its place in the tree.
FILES = {
    "fstab": "etc/fstab",
    "90-pyqvm.cfg": "etc/cloud/cloud.cfg.d/90-pyqvm.cfg",
    "20-wired.network": "etc/systemd/network/20-wired.network",
    "wait-online.conf": "etc/systemd/system/systemd-networkd-wait-online.service.d/pyqvm.conf",
    "pyqvm-wake.service": "etc/systemd/system/pyqvm-wake.service",
    "90-pyqvm-wake.rules": "etc/udev/rules.d/90-pyqvm-wake.rules",
    "initramfs.conf": "etc/initramfs-tools/conf.d/pyqvm.conf",
    "initramfs-hook": "etc/initramfs-tools/hooks/pyqvm",
}
EXECUTABLE = {"initramfs-hook"}
#: What the second stage does once dpkg is done (in the chroot, as root).
CUSTOMIZE = (
    "passwd -d root",
    "systemctl enable systemd-networkd",
    "echo pyqvm-debian > /etc/hostname",
)
#: The clone helper of the built-in guest, compiled for this one too (FILES start it).
WAKE_SOURCE = RECIPES.parent / "pyqvm-wake.c"
WAKE_PATH = "usr/local/sbin/pyqvm-wake"
TOOLS = ("mkfs.ext4", "debugfs", "qemu-img", *esp.TOOLS)


def kernel_package(arch: ArchInfo) -> str:
    return f"linux-image-{arch.debian}"


def cmdline(arch: ArchInfo) -> str:
    return f"root=LABEL={ROOT_LABEL} rw console={arch.console} mitigations=off quiet"


def inputs(archive: Archive, arch: ArchInfo) -> dict[str, str]:
    """What the image is made of, for the cache key: package versions, recipes, version."""
    names = [*PACKAGES, kernel_package(arch)]
    found = archive.candidates(names, arch.debian)
    d = {"distro": DISTRO_VERSION, "suite": SUITE, "arch": arch.name}
    d |= {f"pkg:{name}": pkg.version for name, pkg in found.items()}
    d |= {
        f"recipe:{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
        for p in [*sorted(RECIPES.iterdir()), WAKE_SOURCE]
    }
    return d


def _debugfs_dump(disk: Path, pattern: str, dest: Path) -> str:
    """The one file of ``/boot`` whose name matches ``pattern``, copied out of the ext4
    image ``disk`` to ``dest`` (no mount, no root); returns its name."""
    listing = tools.run(["debugfs", "-R", "ls -p /boot", str(disk)], what="listing /boot")
    names = [f.split("/")[5] for f in listing.splitlines() if f.count("/") >= 6]
    hits = sorted(n for n in names if re.fullmatch(pattern, n))
    if len(hits) != 1:
        raise ImageError(f"the {SUITE} system has {hits or 'no'} /boot/{pattern}, not one")
    tools.run(["debugfs", "-R", f"dump /boot/{hits[0]} {dest}", str(disk)],
              what=f"copying /boot/{hits[0]} out of the root file system")  # fmt: skip
    if not dest.is_file() or dest.stat().st_size == 0:
        raise ImageError(f"debugfs did not copy /boot/{hits[0]} out of {disk}")
    return hits[0]


def _mkfs(tree: Path, disk: Path, label: str, size: str) -> None:
    tools.run(
        ["mkfs.ext4", "-q", "-F", "-L", label, "-E", "root_owner=0:0", "-d", str(tree),
         str(disk), size],
        what=f"mkfs.ext4 of {label}",
    )  # fmt: skip


def assemble(
    out: Path, *, arch: ArchInfo, archive: Archive, second_stage: bootstrap.SecondStage
) -> dict[str, object]:
    """Build the system into ``out``: vmlinuz, initrd.img, disk.qcow2, boot.qcow2; returns
    the manifest's fields."""
    tree, debs = out / "tree", out / "debs"
    first = bootstrap.first_stage(
        archive, arch, [*PACKAGES, kernel_package(arch)], tree, debs, customize=CUSTOMIZE
    )
    for src, dst in FILES.items():
        (tree / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RECIPES / src, tree / dst)
        (tree / dst).chmod(0o755 if src in EXECUTABLE else 0o644)
    (tree / WAKE_PATH).parent.mkdir(parents=True, exist_ok=True)
    tools.compile_static(cross_compiler(arch)[0], WAKE_SOURCE, tree / WAKE_PATH).chmod(0o755)
    raw, debs_disk = out / "root.img", out / "debs.img"
    log.info("making the root file system (ext4 %s, label %s)", ROOT_SIZE, ROOT_LABEL)
    _mkfs(tree, raw, ROOT_LABEL, ROOT_SIZE)
    _mkfs(debs, debs_disk, DEBS_LABEL, f"{sum(p.size for p in first.packages) // 2**20 + 64}M")
    shutil.rmtree(tree)
    shutil.rmtree(debs)
    command = bootstrap.HELPER_COMMAND.replace("@LABEL@", ROOT_LABEL)
    second_stage([raw, debs_disk], arch, command.replace("@DEBS_LABEL@", DEBS_LABEL))
    debs_disk.unlink()
    kernel = _debugfs_dump(raw, r"vmlinuz-.*", out / "vmlinuz")
    version = kernel.removeprefix("vmlinuz-")
    _debugfs_dump(raw, re.escape(f"initrd.img-{version}"), out / "initrd.img")
    with tempfile.TemporaryDirectory(dir=out) as loader_tree:
        loader_pkg = next(p for p in first.packages if p.name == esp.LOADER_PACKAGE)
        unpack(archive.download([loader_pkg])[loader_pkg], Path(loader_tree))
        # The proof that the root disk is a bootable system: with it as a second disk, the
        # boot disk boots under UEFI firmware (firmware = "ovmf") through systemd-boot.
        esp.boot_disk(
            out / "boot.qcow2",
            arch=arch,
            loader=esp.systemd_boot(Path(loader_tree), arch),
            kernel=out / "vmlinuz",
            initrd=out / "initrd.img",
            cmdline=cmdline(arch),
            title=f"Debian {SUITE} (pyqvm)",
        )
    tools.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / "disk.qcow2")],
              what="qemu-img convert")  # fmt: skip
    raw.unlink()
    return {
        "kind": "distro",
        "kernel_version": version,
        "kernel": "vmlinuz",
        "bzimage": "vmlinuz",
        "initrd": "initrd.img",
        "disk": "disk.qcow2",
        "boot_disk": "boot.qcow2",
        "ready_marker": "",
        "wake_port": True,  # pyqvm-wake.service on its port (pyqvm.ops.wake)
        "cmdline": cmdline(arch),
        "packages": {p.name: p.version for p in first.packages},
    }


__all__ = ["PACKAGES", "ROOT_LABEL", "TOOLS", "assemble", "cmdline", "inputs", "kernel_package"]
