"""`HostFacts`: what pure code downstream needs to know about the host, read once."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from pyqvm.errors import HostError
from pyqvm.host.accel import KvmStatus, host_tsc_khz, kvm_status
from pyqvm.host.firmware import Firmware, read_firmware
from pyqvm.host.packages import install_hint

__all__ = [
    "QEMU_PACKAGES",
    "HostFacts",
    "pyqvm_version",
    "qemu_binary",
    "qemu_version_line",
    "read_host_facts",
    "search_path",
]

# QEMU architecture → Debian package that ships qemu-system-<arch>.
QEMU_PACKAGES: Mapping[str, str] = MappingProxyType(
    {
        "x86_64": "qemu-system-x86",
        "i386": "qemu-system-x86",
        "aarch64": "qemu-system-arm",
        "arm": "qemu-system-arm",
        "riscv64": "qemu-system-misc",
        "ppc64": "qemu-system-ppc",
        "s390x": "qemu-system-misc",
    }
)


@dataclass(frozen=True, slots=True)
class HostFacts:
    """Host facts read once by `read_host_facts`; build by hand in tests."""

    kvm: KvmStatus
    tsc_khz: int | None
    qemu_binaries: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))
    firmware: tuple[Firmware, ...] = ()  # QEMU's UEFI descriptors, in their order


def search_path(root: Path) -> str:
    """PATH as seen under ``root`` (a fake root in tests: the same entries inside it)."""
    dirs = os.environ.get("PATH", os.defpath).split(os.pathsep)
    if root.resolve() == Path("/"):
        return os.pathsep.join(dirs)
    # A fake root: look for the binaries inside it, at the same PATH entries.
    return os.pathsep.join(str(root / d.lstrip("/")) for d in dirs if d.startswith("/"))


#: Where a distribution puts QEMU for the host's own arch off PATH (RHEL and its kin).
QEMU_KVM_PATHS = ("usr/libexec/qemu-kvm",)


def find_qemu_binaries(root: Path) -> Mapping[str, Path]:
    """``qemu-system-<arch>`` on PATH (under ``root``) for each arch pyqvm knows; for the
    host's arch, RHEL's ``/usr/libexec/qemu-kvm`` when PATH has none."""
    path = search_path(root)
    found: dict[str, Path] = {}
    for arch in QEMU_PACKAGES:
        hit = shutil.which(f"qemu-system-{arch}", path=path)
        if hit is not None:
            found[arch] = Path(hit)
    host = platform.machine()
    if host not in found:
        kvm = next((root / p for p in QEMU_KVM_PATHS if os.access(root / p, os.X_OK)), None)
        if kvm is not None:
            found[host] = kvm
    return MappingProxyType(found)


#: Where distributions put the Xen device model (QEMU built with -accel xen): Debian's
#: qemu-system-xen, and Xen's own install.
XEN_DEVICE_MODELS = ("usr/libexec/xen-qemu-system-i386", "usr/lib/xen/bin/qemu-system-i386")


def find_xen_device_model(root: Path = Path("/")) -> Path | None:
    """The QEMU built for Xen on this host, or None."""
    return next((root / p for p in XEN_DEVICE_MODELS if (root / p).exists()), None)


def read_host_facts(root: Path = Path("/")) -> HostFacts:
    """Read KVM status, TSC rate, the QEMU binaries on PATH and QEMU's firmware
    descriptors (under ``root``)."""
    return HostFacts(
        kvm=kvm_status(root),
        tsc_khz=host_tsc_khz(root),
        qemu_binaries=find_qemu_binaries(root),
        firmware=read_firmware(root),
    )


def qemu_binary(facts: HostFacts, arch: str) -> Path:
    """The ``qemu-system-<arch>`` binary found on this host.

    Raises:
        HostError: it is not installed; the message names the package.
    """
    try:
        return facts.qemu_binaries[arch]
    except KeyError:
        package = QEMU_PACKAGES.get(arch)
        fix = (
            f"install it with: {install_hint(package)}"
            if package
            else "install the QEMU system emulator for that architecture"
        )
        raise HostError(f"qemu-system-{arch} not found; {fix}") from None


def pyqvm_version() -> str:
    """This installation's pyqvm version ("unknown" when run from a bare source tree)."""
    try:
        return importlib.metadata.version("pyqvm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def qemu_version_line(binary: str | Path, timeout: float = 20.0) -> str | None:
    """The first line of ``BINARY --version`` ("QEMU emulator version 7.2.19 (Debian
    ...)"), or None when it cannot be run."""
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=timeout, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None
