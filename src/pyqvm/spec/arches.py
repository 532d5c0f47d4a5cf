"""What differs between guest architectures, in one table.

Everything arch-specific that the spec, the argv builder, the image builder
and the host checks need comes from `ARCHES`; adding an architecture is
adding a row (and its machine checks in the spec). riscv64 would be:
``qemu-system-riscv64`` (Debian's ``qemu-system-misc``), machine ``virt``,
console ``ttyS0``, ELF ``EM_RISCV``, cross compiler ``gcc-riscv64-linux-gnu``
-- but Debian 12's main archive has no riscv64 packages (they live in
debian-ports, unsigned by the archive key), so the built-in image cannot be
built from bookworm; it waits for Debian 13.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ArchInfo:
    """One guest architecture."""

    name: str  # QEMU's name (qemu-system-<name>), the spec's ``arch``
    debian: str  # Debian's architecture name (dpkg --print-architecture)
    qemu_package: str  # the Debian package with qemu-system-<name>
    machines: tuple[str, ...]  # the machine types pyqvm drives on it, the default first
    console: str  # the Linux device of the machine's first serial port
    elf_machine: str  # e_machine of its kernels and programs, as pyelftools names it
    tcg_cpu: str | None  # -cpu under TCG (None: QEMU's default)
    gnu_triplet: str  # the GNU toolchain prefix of its cross compiler
    firmware_package: str  # the Debian package with its UEFI firmware
    firmware_code: str  # that package's UEFI code image (pflash0)
    efi_suffix: str  # UEFI's name of the arch in loader paths (BOOTX64.EFI, systemd-bootx64.efi)


ARCHES: dict[str, ArchInfo] = {
    "x86_64": ArchInfo(
        name="x86_64",
        debian="amd64",
        qemu_package="qemu-system-x86",
        machines=("microvm", "q35", "pc"),
        console="ttyS0",
        elf_machine="EM_X86_64",
        tcg_cpu=None,
        gnu_triplet="x86_64-linux-gnu",
        firmware_package="ovmf",
        firmware_code="/usr/share/OVMF/OVMF_CODE_4M.fd",
        efi_suffix="x64",
    ),
    "aarch64": ArchInfo(
        name="aarch64",
        debian="arm64",
        qemu_package="qemu-system-arm",
        machines=("virt",),
        console="ttyAMA0",  # virt's PL011
        elf_machine="EM_AARCH64",
        # virt's default (cortex-a15) is 32-bit; "max" emulates pointer authentication
        # with QARMA, which costs TCG much time: cortex-a72 is a plain ARMv8.0 core.
        tcg_cpu="cortex-a72",
        gnu_triplet="aarch64-linux-gnu",
        firmware_package="qemu-efi-aarch64",
        firmware_code="/usr/share/AAVMF/AAVMF_CODE.fd",
        efi_suffix="aa64",
    ),
}


def arch_info(name: str) -> ArchInfo:
    """The row of ``name`` (a spec's arch, already validated)."""
    return ARCHES[name]


def host_arch() -> str:
    """This host's architecture in QEMU's naming (``uname -m``)."""
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def cross_compiler(arch: ArchInfo) -> tuple[str, str]:
    """The C compiler that builds programs for ``arch`` here, and its Debian packages."""
    if arch.name == host_arch():
        return "cc", "gcc libc6-dev"
    libc = f"libc6-dev-{arch.debian}-cross"
    return f"{arch.gnu_triplet}-gcc", f"gcc-{arch.gnu_triplet} {libc}"


__all__ = ["ARCHES", "ArchInfo", "arch_info", "cross_compiler", "host_arch"]
