"""How to install a missing tool on this host: its package manager and its package names.

pyqvm names what it lacks by Debian's package name (its home); `install_hint`
turns that into this host's command, read from ``/etc/os-release`` (``ID`` and
``ID_LIKE``): ``apt-get`` on Debian and Ubuntu, ``dnf`` on Fedora and its kin,
``zypper`` on openSUSE and SLES, ``pacman`` on Arch. `PACKAGE_NAMES` maps each
Debian name pyqvm uses to the others' (None: that distribution does not package
it); a name not in the table is assumed to be the same everywhere.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MappingProxyType

__all__ = [
    "BUILDER_TOOLS",
    "MANAGERS",
    "PACKAGE_NAMES",
    "TOOL_PACKAGES",
    "HostDistro",
    "host_distro",
    "install_hint",
    "read_os_release",
]

#: package manager -> (the install command, the os-release IDs it serves).
MANAGERS: Mapping[str, tuple[str, tuple[str, ...]]] = MappingProxyType(
    {
        "apt": ("apt-get install -y", ("debian", "ubuntu")),
        "dnf": ("dnf install -y", ("fedora", "rhel", "centos", "rocky", "almalinux")),
        "zypper": (
            "zypper install -y",
            ("opensuse", "suse", "sles", "opensuse-leap", "opensuse-tumbleweed"),
        ),
        "pacman": ("pacman -S --needed", ("arch", "manjaro", "endeavouros")),
    }
)

_N = None  # not packaged there
#: Debian package -> its name for dnf, zypper and pacman.
PACKAGE_NAMES: Mapping[str, tuple[str | None, str | None, str | None]] = MappingProxyType(
    {
        "qemu-system-x86": ("qemu-system-x86", "qemu-x86", "qemu-system-x86"),
        "qemu-system-arm": ("qemu-system-aarch64", "qemu-arm", "qemu-system-aarch64"),
        "qemu-system-misc": ("qemu-system-riscv", "qemu-extra", "qemu-system-riscv"),
        "qemu-system-ppc": ("qemu-system-ppc", "qemu-ppc", "qemu-system-ppc"),
        "qemu-system-xen": (_N, _N, _N),
        "qemu-utils": ("qemu-img", "qemu-tools", "qemu-img"),
        "qemu-system-common": ("virtiofsd", "virtiofsd", "virtiofsd"),
        "ovmf": ("edk2-ovmf", "qemu-ovmf-x86_64", "edk2-ovmf"),
        "qemu-efi-aarch64": ("edk2-aarch64", "qemu-uefi-aarch64", "edk2-aarch64"),
        "libc6-dev": ("glibc-static", "glibc-devel-static", "glibc"),
        "gcc-aarch64-linux-gnu": (
            "gcc-aarch64-linux-gnu",
            "cross-aarch64-gcc13",
            "aarch64-linux-gnu-gcc",
        ),
        "libc6-dev-arm64-cross": (_N, _N, "aarch64-linux-gnu-glibc"),
        "fdisk": ("util-linux", "util-linux", "util-linux"),
        "iproute2": ("iproute", "iproute2", "iproute2"),
        "openssh-client": ("openssh-clients", "openssh-clients", "openssh"),
        "vde-switch": ("vde2", "vde2", "vde2"),
        "dropbear-bin": ("dropbear", "dropbear", "dropbear"),
        "kmod": ("kmod", "kmod", "kmod"),
        "mmdebstrap": ("mmdebstrap", _N, "mmdebstrap"),
    }
)
_COLUMN = {"dnf": 0, "zypper": 1, "pacman": 2}

#: A host tool pyqvm runs -> the Debian package that ships it.
TOOL_PACKAGES: Mapping[str, str] = MappingProxyType(
    {
        "depmod": "kmod",
        "mkfs.ext4": "e2fsprogs",
        "debugfs": "e2fsprogs",
        "qemu-img": "qemu-utils",
        "lz4": "lz4",
        "mkfs.vfat": "dosfstools",
        "mmd": "mtools",
        "mcopy": "mtools",
        "sfdisk": "fdisk",
        "gcc": "gcc",
        "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    }
)
#: What the image builder runs on the host, for every image (pyqvm.image).
BUILDER_TOOLS = ("depmod", "mkfs.ext4", "debugfs", "qemu-img", "lz4", "mkfs.vfat", "mmd",
                 "mcopy", "sfdisk", "gcc")  # fmt: skip


@dataclass(frozen=True, slots=True)
class HostDistro:
    """This host's distribution as os-release names it, and its package manager."""

    id: str
    like: tuple[str, ...]
    name: str
    manager: str | None  # a key of MANAGERS, or None: not one pyqvm knows


def read_os_release(root: Path = Path("/")) -> HostDistro:
    """``/etc/os-release`` (else ``/usr/lib/os-release``) under ``root``."""
    fields: dict[str, str] = {}
    for rel in ("etc/os-release", "usr/lib/os-release"):
        try:
            text = (root / rel).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() and not key.startswith("#"):
                words = shlex.split(value, comments=False) or [""]
                fields[key.strip()] = words[0]
        break
    ident = fields.get("ID", "").lower()
    like = tuple(fields.get("ID_LIKE", "").lower().split())
    manager = next(
        (m for m, (_, ids) in MANAGERS.items() for i in (ident, *like) if i in ids), None
    )
    return HostDistro(ident, like, fields.get("PRETTY_NAME", ident or "this host"), manager)


@cache
def host_distro() -> HostDistro:
    return read_os_release()


def install_hint(debian_packages: str | Iterable[str], distro: HostDistro | None = None) -> str:
    """The command that installs ``debian_packages`` here, as words for a message:
    ``"dnf install -y qemu-img"``, or what to look for where pyqvm knows no name."""
    wanted = [debian_packages] if isinstance(debian_packages, str) else list(debian_packages)
    distro = distro or host_distro()
    if distro.manager is None:
        return f"install {' '.join(wanted)} (Debian's package names) with your package manager"
    command = MANAGERS[distro.manager][0]
    if distro.manager == "apt":
        return f"{command} {' '.join(wanted)}"
    names: list[str] = []
    lacking: list[str] = []
    for debian in wanted:
        mapped = PACKAGE_NAMES.get(debian, (debian, debian, debian))[_COLUMN[distro.manager]]
        if mapped is None:
            lacking.append(debian)
        elif mapped not in names:
            names.append(mapped)
    hint = f"{command} {' '.join(names)}" if names else ""
    if lacking:
        extra = f"{distro.name} does not package what Debian's {', '.join(lacking)} holds"
        hint = f"{hint} ({extra})" if hint else extra
    return hint
