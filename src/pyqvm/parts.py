"""The parts of a `VMSpec` that are not its networks or shares: the kernel it boots
directly, its disks, and the host PCI devices passed through to it. Frozen dataclasses,
validated when built, like the spec itself (`pyqvm.spec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from pyqvm.errors import SpecError
from pyqvm.fields import (
    GUEST_PCI_RE,
    QCOW2_MAGIC,
    absolute_path,
    boolean,
    check_id,
    choice,
    normalize_pci_address,
    set_field,
    text,
)

DiskFormat = Literal["qcow2", "raw"]
DiskInterface = Literal["auto", "virtio-blk", "virtio-scsi", "ahci", "ide"]


@dataclass(frozen=True, slots=True)
class KernelBoot:
    """Direct kernel boot: QEMU loads the kernel (ELF vmlinux with PVH, or bzImage)."""

    kernel: Path
    initrd: Path | None = None
    append: str = ""

    def __post_init__(self) -> None:
        set_field(self, "kernel", absolute_path(self.kernel, "kernel.kernel"))
        if self.initrd is not None:
            set_field(self, "initrd", absolute_path(self.initrd, "kernel.initrd"))
        text(self.append, "kernel.append")


@dataclass(frozen=True, slots=True)
class Disk:
    """A disk image. An ``ephemeral`` disk gets a throw-away overlay: the file is never written."""

    path: Path
    format: DiskFormat | None = None
    interface: DiskInterface = "auto"
    ephemeral: bool = True
    readonly: bool = False
    id: str = ""

    def __post_init__(self) -> None:
        set_field(self, "path", absolute_path(self.path, "disk.path"))
        if self.format is None:
            with open(self.path, "rb") as f:
                set_field(self, "format", "qcow2" if f.read(4) == QCOW2_MAGIC else "raw")
        choice(self.format, get_args(DiskFormat), "disk.format")
        choice(self.interface, get_args(DiskInterface), "disk.interface")
        boolean(self.ephemeral, "disk.ephemeral")
        boolean(self.readonly, "disk.readonly")
        if self.id != "":  # "" (the default) means: pyqvm names it
            check_id(self.id, "disk.id")


@dataclass(frozen=True, slots=True)
class HostDevice:
    """A host PCI device passed through with vfio-pci.

    ``managed`` (the default) lets pyqvm bind the device to vfio-pci before QEMU
    starts and give it back to its host driver afterwards; with ``managed = false``
    the device must already be bound to vfio-pci and pyqvm only checks it.
    """

    address: str
    guest_address: str | None = None
    rombar: bool | None = None
    multifunction: bool = False
    id: str = ""
    managed: bool = True

    def __post_init__(self) -> None:
        set_field(self, "address", normalize_pci_address(self.address, "host_device.address"))
        boolean(self.managed, "host_device.managed")
        boolean(self.multifunction, "host_device.multifunction")
        if self.rombar is not None:
            boolean(self.rombar, "host_device.rombar")
        if self.guest_address is not None and (
            not isinstance(self.guest_address, str) or not GUEST_PCI_RE.match(self.guest_address)
        ):
            raise SpecError(
                "host_device.guest_address",
                f"{self.guest_address!r} is not a guest slot[.function] like 05.0",
            )
        if self.id != "":
            check_id(self.id, "host_device.id")


__all__ = ["Disk", "DiskFormat", "DiskInterface", "HostDevice", "KernelBoot"]
