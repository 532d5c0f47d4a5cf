"""What each QEMU machine type pyqvm drives supports: one table, as `pyqvm.spec.arches` is
for architectures.

`VMSpec` checks a spec against its machine's row: the disk interfaces and NIC models it
has, its AHCI/IDE ports, whether its ACPI tables carry vmgenid, and what it refuses, each
refusal with the field it names and the fix (`Refusal`). A new machine type is a row here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

#: What a spec may ask of a machine that some machines cannot give.
Feature = Literal[
    "emulated",  # profile "emulated": e1000 and AHCI/IDE, PC devices on PCI
    "vfio",  # host devices passed through (vfio-pci)
    "disk_boot",  # firmware booting a disk, no kernel given
    "cdrom",
    "hotplug_slots",  # pcie-root-ports kept free for hot-plugged PCI devices
    "cpu_hotplug",  # max_smp above smp
    "memory_hotplug",  # max_memory
    "display",  # a graphics card (PCI)
]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A feature a machine does not have: the spec field to name, and the message."""

    field: str
    message: str


@dataclass(frozen=True, slots=True)
class MachineInfo:
    """One machine type."""

    name: str
    interfaces: tuple[str, ...]  # disk interfaces it has (besides "auto")
    nic_models: tuple[str, ...]  # NIC models it has (besides "auto")
    block_ports: int  # AHCI/IDE ports, for emulated disks and CD-ROMs
    acpi: bool  # ACPI tables that carry QEMU's vmgenid
    pvpanic: str | None  # the device a guest tells a panic through (GUEST_PANICKED)
    refuses: Mapping[Feature, Refusal] = field(default_factory=dict)


_NO_PCI_BUS = "use q35 or pc"
#: Interfaces each bus family needs, with the fix when the machine lacks it.
INTERFACE_HINTS: Mapping[str, str] = {
    "ahci": '"ahci" needs machine = "q35"; use "ide" on pc',
    "ide": '"ide" needs machine = "pc"; use "ahci" on q35',
}

MACHINE_TYPES: Mapping[str, MachineInfo] = {
    "q35": MachineInfo(
        name="q35",
        interfaces=("virtio-blk", "virtio-scsi", "ahci"),
        nic_models=("virtio", "e1000", "e1000e"),
        block_ports=6,
        acpi=True,
        pvpanic="pvpanic",  # ISA, found through ACPI (QEMU0001)
    ),
    "pc": MachineInfo(
        name="pc",
        interfaces=("virtio-blk", "virtio-scsi", "ide"),
        nic_models=("virtio", "e1000", "e1000e"),
        block_ports=4,
        acpi=True,
        pvpanic="pvpanic",
        refuses={
            "hotplug_slots": Refusal(
                "hotplug_slots",
                'machine "pc" hot-plugs into its pci.0 bus without reserved slots; leave it 0',
            ),
        },
    ),
    "microvm": MachineInfo(
        name="microvm",
        interfaces=("virtio-blk",),
        nic_models=("virtio",),
        block_ports=0,
        acpi=False,
        pvpanic=None,  # its ISA pvpanic is found only through ACPI, which pyqvm leaves off
        refuses={
            "emulated": Refusal("machine", f"microvm has no emulated PCI devices; {_NO_PCI_BUS}"),
            "vfio": Refusal("machine", f"microvm has no PCI bus for vfio-pci; {_NO_PCI_BUS}"),
            "disk_boot": Refusal(
                "kernel", "microvm boots only a kernel directly; set kernel or image"
            ),
            "cdrom": Refusal("cdroms", f"microvm has no AHCI/IDE bus for a CD-ROM; {_NO_PCI_BUS}"),
            "display": Refusal(
                "display", f"microvm has no PCI bus for a graphics card; {_NO_PCI_BUS}"
            ),
            "hotplug_slots": Refusal(
                "hotplug_slots", 'microvm has no PCI hotplug; use machine = "q35"'
            ),
            "cpu_hotplug": Refusal("max_smp", 'microvm has no CPU hotplug; use machine = "q35"'),
            "memory_hotplug": Refusal(
                "max_memory", 'microvm has no memory hotplug; use machine = "q35"'
            ),
        },
    ),
    # aarch64's board; what it lacks as an arch (PC devices, SeaBIOS) is the arch's check.
    "virt": MachineInfo(
        name="virt",
        interfaces=("virtio-blk", "virtio-scsi"),
        nic_models=("virtio",),
        block_ports=0,
        acpi=False,
        pvpanic="pvpanic-pci",
        refuses={
            "hotplug_slots": Refusal("hotplug_slots", "not supported on aarch64 yet; leave it out"),
        },
    ),
}

__all__ = ["INTERFACE_HINTS", "MACHINE_TYPES", "Feature", "MachineInfo", "Refusal"]
