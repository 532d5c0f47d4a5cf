"""PCI devices as sysfs shows them, under a configurable root (tests use fake trees)."""

from __future__ import annotations

from pathlib import Path

from pyqvm.errors import HostError


def pci_device_dir(address: str, root: Path = Path("/")) -> Path:
    """The sysfs directory of a host PCI device (``0000:01:00.0``); `HostError` when absent."""
    d = root / "sys/bus/pci/devices" / address
    if not d.is_dir():
        raise HostError(
            f"host PCI device {address} does not exist on this host; "
            "list devices with `lspci -D` and check the address"
        )
    return d
