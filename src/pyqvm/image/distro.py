"""The ``debian`` flavour: a real Debian 12 system (systemd, udev, the guest agent, an SSH
server, cloud-init), built from Debian packages with ``mmdebstrap``.

The root file system is made by mmdebstrap from the host's apt sources (no
change to the host), put into an ext4 image with ``mkfs.ext4 -d`` (no loop
mount, no root tricks beyond what mmdebstrap's root mode needs) and converted
to qcow2. The generic kernel and its initramfs-tools initrd are taken out of
the tree and booted directly; ``boot.qcow2`` has them on an EFI system
partition behind systemd-boot for firmware boot. The files of
``recipes/debian`` go to fixed places in the tree (fstab, cloud-init's
datasource list, a networkd profile, a wait-online drop-in that does not wait
for a NIC the VM lacks, pyqvm-wake's unit and udev rule; the helper itself is
compiled from the built-in guest's recipe). The cache key hashes the candidate
versions of the packages asked for, the recipes and `DISTRO_VERSION`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from pyqvm.arches import arch_info, cross_compiler
from pyqvm.errors import ImageError
from pyqvm.image import esp, tools
from pyqvm.image.archive import Archive

log = logging.getLogger(__name__)

DISTRO_VERSION = "3"  # 2: the UEFI boot disk (pyqvm.image.esp); 3: pyqvm-wake
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
}
#: The clone helper of the built-in guest, compiled for this one too (FILES start it).
WAKE_SOURCE = RECIPES.parent / "pyqvm-wake.c"
WAKE_PATH = "usr/local/sbin/pyqvm-wake"
CMDLINE = f"root=LABEL={ROOT_LABEL} rw console=ttyS0 mitigations=off quiet"
X86_64 = arch_info("x86_64")


def inputs(archive: Archive) -> dict[str, str]:
    """What the image is made of, for the cache key: package versions, recipes, version."""
    found = archive.candidates(PACKAGES, X86_64.debian)
    d = {"distro": DISTRO_VERSION, "suite": SUITE}
    d |= {f"pkg:{name}": pkg.version for name, pkg in found.items()}
    d |= {
        f"recipe:{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
        for p in [*sorted(RECIPES.iterdir()), WAKE_SOURCE]
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
    tools.compile_static(cross_compiler(X86_64)[0], WAKE_SOURCE, tree / WAKE_PATH).chmod(0o755)
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
    # The proof that the root disk is a bootable system: with it as a second disk, the
    # boot disk boots under OVMF (firmware = "ovmf") through systemd-boot.
    esp.boot_disk(
        out / "boot.qcow2",
        arch=X86_64,
        loader=esp.systemd_boot(tree, X86_64),
        kernel=out / "vmlinuz",
        initrd=out / "initrd.img",
        cmdline=CMDLINE,
        title=f"Debian {SUITE} (pyqvm)",
    )
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
        "wake_port": True,  # pyqvm-wake.service on its port (pyqvm.ops.wake)
        "cmdline": CMDLINE,
        "packages": list(PACKAGES),
    }


__all__ = ["CMDLINE", "PACKAGES", "ROOT_LABEL", "assemble", "inputs"]
