"""PCI devices as sysfs shows them, under a configurable root (tests use fake trees).

Reads go straight to the files; every *write* goes through one `SysfsIO`
object, so tests can substitute a fake that applies the kernel's reaction
(a driver unbinding, VFs appearing) to a fake tree.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pyqvm.errors import HostError
from pyqvm.spec import normalize_pci_address

__all__ = [
    "PCI_BRIDGE_CLASS",
    "PciDevice",
    "SysfsIO",
    "current_driver",
    "describe",
    "list_pci_devices",
    "pci_address",
    "pci_device",
    "pci_device_dir",
    "pci_driver_dir",
]

_log = logging.getLogger(__name__)

DEVICES = "sys/bus/pci/devices"
DRIVERS = "sys/bus/pci/drivers"
#: PCI class code (base class 06, subclass 04) of PCI-to-PCI bridges.
PCI_BRIDGE_CLASS = 0x0604


class SysfsIO:
    """Writes one value to one sysfs attribute, as ``echo value > path`` does.

    The kernel acts on the write (``unbind`` detaches the driver, ``sriov_numvfs``
    creates VFs); a test replaces this object with one that models that reaction.
    """

    def write(self, path: Path, value: str) -> None:
        """Write ``value`` to ``path``.

        Raises:
            OSError: the kernel refused the write (its errno says why).
        """
        _log.debug("sysfs: %s <- %r", path, value)
        # One write(2) of the whole value: sysfs attributes take a single write.
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)


def pci_address(value: str, field: str = "address") -> str:
    """``01:00.0`` or ``0000:01:00.0`` -> ``0000:01:00.0``; `SpecError` if malformed."""
    return normalize_pci_address(value, field)


def pci_device_dir(address: str, root: Path = Path("/")) -> Path:
    """The sysfs directory of a host PCI device (``0000:01:00.0``); `HostError` when absent."""
    d = root / DEVICES / address
    if not d.is_dir():
        raise HostError(
            f"host PCI device {address} does not exist on this host; "
            "list devices with `lspci -D` and check the address"
        )
    return d


def pci_driver_dir(driver: str, root: Path = Path("/")) -> Path:
    """``/sys/bus/pci/drivers/<driver>`` (it exists only while the driver is loaded)."""
    return root / DRIVERS / driver


def _link_name(path: Path) -> str | None:
    """The last component of a symlink's target, or None if there is no such link."""
    try:
        return Path(os.readlink(path)).name
    except OSError:
        return None


def current_driver(address: str, root: Path = Path("/")) -> str | None:
    """The driver bound to the device now, or None when it has none."""
    return _link_name(root / DEVICES / address / "driver")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _hex(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class PciDevice:
    """One PCI function as sysfs shows it.

    ``vendor``/``device`` are 4-digit hex ids, ``pci_class`` the 24-bit class
    code, ``physfn`` the PF's address when this is an SR-IOV virtual function.
    """

    address: str
    vendor: str
    device: str
    pci_class: int
    driver: str | None
    iommu_group: int | None
    physfn: str | None = None
    driver_override: str | None = None

    @property
    def is_bridge(self) -> bool:
        return self.pci_class >> 8 == PCI_BRIDGE_CLASS

    @property
    def ids(self) -> str:
        """``vendor:device`` as ``lspci -nn`` prints it."""
        return f"{self.vendor}:{self.device}"


def pci_device(address: str, root: Path = Path("/")) -> PciDevice:
    """Read one device. Raises `HostError` when it does not exist."""
    d = pci_device_dir(address, root)
    group = _link_name(d / "iommu_group")
    override = _read(d / "driver_override")
    return PciDevice(
        address=address,
        vendor=f"{_hex(_read(d / 'vendor')) or 0:04x}",
        device=f"{_hex(_read(d / 'device')) or 0:04x}",
        pci_class=_hex(_read(d / "class")) or 0,
        driver=current_driver(address, root),
        iommu_group=int(group) if group is not None and group.isdigit() else None,
        physfn=_link_name(d / "physfn"),
        driver_override=override if override and override != "(null)" else None,
    )


def list_pci_devices(root: Path = Path("/")) -> list[PciDevice]:
    """Every PCI device under ``root``, sorted by address."""
    base = root / DEVICES
    try:
        names = sorted(p.name for p in base.iterdir())
    except OSError:
        return []
    return [pci_device(n, root) for n in names]


def describe(address: str, root: Path = Path("/")) -> str:
    """``0000:01:00.0 [8086:10d3] (e1000e)`` for messages; tolerant of missing devices."""
    try:
        dev = pci_device(address, root)
    except HostError:
        return f"{address} (absent)"
    return f"{address} [{dev.ids}] ({dev.driver or 'no driver'})"
