"""The parts of a `VMSpec` other than its shares: the kernel it boots directly, its
disks, the host PCI devices passed through to it, and its NICs (`Network`) with their
port forwards. Frozen dataclasses, validated when built, like the spec itself
(`pyqvm.spec`).

How a NIC is wired up at launch is `pyqvm.argv.devices`' (QEMU's netdevs) and
`pyqvm.launch.privnet`'s (the switch of a private network).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from pyqvm.errors import SpecError
from pyqvm.spec.fields import (
    GUEST_PCI_RE,
    MAC_RE,
    PRIVATE_NET_RE,
    QCOW2_MAGIC,
    absolute_path,
    boolean,
    check_id,
    choice,
    normalize_pci_address,
    private_address,
    set_field,
    show,
    slirp_address,
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


NetMode = Literal["none", "user", "tap", "private"]
NicModel = Literal["auto", "virtio", "e1000", "e1000e"]


@dataclass(frozen=True, slots=True)
class PortForward:
    """A host port forwarded into the guest (user-mode networking)."""

    host_port: int
    guest_port: int
    protocol: Literal["tcp", "udp"] = "tcp"
    host_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for name in ("host_port", "guest_port"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
                raise SpecError(f"forward.{name}", f"{show(v)} is not a port number (1-65535)")
        choice(self.protocol, ("tcp", "udp"), "forward.protocol")
        if not isinstance(self.host_address, str) or not slirp_address(self.host_address):
            raise SpecError("forward.host_address", f"{self.host_address!r} is not an address")


@dataclass(frozen=True, slots=True)
class Network:
    """One NIC: ``user`` is QEMU's user-mode (slirp) network, ``tap`` an existing tap device,
    ``private`` the L2 segment ``name`` that every VM naming it on this host shares
    (`pyqvm.launch.privnet`), at ``address`` (CIDR) or one pyqvm leases in the network's subnet.

    ``tftp`` and ``bootfile`` (user mode): QEMU's own TFTP server serves that directory and
    its DHCP names the file, so firmware network-boots it (PXE); the NIC is then first in
    the boot order."""

    mode: NetMode = "user"
    model: NicModel = "auto"
    forwards: tuple[PortForward, ...] = ()
    tap: str | None = None
    mac: str | None = None
    id: str = ""
    name: str | None = None
    address: str | None = None
    tftp: Path | None = None
    bootfile: str | None = None

    def __post_init__(self) -> None:
        choice(self.mode, get_args(NetMode), "network.mode")
        choice(self.model, get_args(NicModel), "network.model")
        set_field(self, "forwards", tuple(self.forwards))
        if self.mode == "tap":
            if not isinstance(self.tap, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", self.tap):
                raise SpecError("network.tap", f"{self.tap!r} is not a tap interface name")
        elif self.tap is not None:
            raise SpecError("network.tap", 'only valid with mode = "tap"')
        if self.forwards and self.mode != "user":
            raise SpecError("network.forwards", 'port forwards need mode = "user"')
        if self.mode == "private":
            if not isinstance(self.name, str) or not PRIVATE_NET_RE.fullmatch(self.name):
                raise SpecError(
                    "network.name",
                    f"{show(self.name)} is not a private network name: use 1-32 letters, "
                    "digits, '-', '_' or '.', starting with a letter or digit (e.g. \"lab\")",
                )
            if self.address is not None:
                private_address(self.name, self.address)
        elif self.name is not None or self.address is not None:
            raise SpecError(
                "network.name" if self.name is not None else "network.address",
                'only valid with mode = "private"',
            )
        if self.mac is not None:
            if not isinstance(self.mac, str) or not MAC_RE.match(self.mac):
                raise SpecError(
                    "network.mac", f"{show(self.mac)} is not a MAC address like 52:54:00:12:34:56"
                )
            first = int(self.mac[:2], 16)
            if self.mac.replace(":", "").strip("0") == "" or first & 1:
                # QEMU silently replaces the all-zero MAC; a multicast one the guest refuses.
                raise SpecError(
                    "network.mac",
                    f"{self.mac!r} is not a unicast address a NIC can have (not all zero, "
                    "first byte even); use e.g. 52:54:00:12:34:56",
                )
        if self.id != "":
            check_id(self.id, "network.id")
        self._check_boot()

    def _check_boot(self) -> None:
        if (self.tftp is not None or self.bootfile is not None) and self.mode != "user":
            raise SpecError(
                "network.tftp" if self.tftp is not None else "network.bootfile",
                'QEMU serves TFTP on its user network only: mode = "user"',
            )
        if self.tftp is not None:
            d = absolute_path(self.tftp, "network.tftp", must_exist=False)
            if not d.is_dir():
                raise SpecError("network.tftp", f"no such directory: '{d}'; check the path")
            set_field(self, "tftp", d)
            if self.bootfile is None:
                raise SpecError(
                    "network.bootfile", "give the file to boot from tftp, e.g. pxelinux.0"
                )
        if self.bootfile is not None:
            text(self.bootfile, "network.bootfile")
            if self.tftp is not None and not (self.tftp / self.bootfile).is_file():
                raise SpecError("network.bootfile", f"no file {self.bootfile!r} in '{self.tftp}'")


__all__ = [
    "Disk",
    "DiskFormat",
    "DiskInterface",
    "HostDevice",
    "KernelBoot",
    "NetMode",
    "Network",
    "NicModel",
    "PortForward",
]
