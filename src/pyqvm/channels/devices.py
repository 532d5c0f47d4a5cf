"""What pyqvm hot-plugged into one QEMU: `Plugged` records and the `DeviceTable` of a machine.

A `Plugged` record says how a device was plugged (its QMP commands) and what
unplugging it removes (its backends). A migration destination, a restored VM
or a VM in another process gets the same devices by replaying the records
(`pyqvm.ops.hotplug.replug`); their JSON form (`to_json`/`from_json`,
versioned) carries them across processes and into save manifests.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyqvm.errors import HotplugError
from pyqvm.spec import Disk

QMPCommand = tuple[str, Mapping[str, Any]]

#: The version of the JSON form; records of another version are refused.
RECORD_VERSION = 1


@dataclass(frozen=True, slots=True)
class Plugged:
    """A device pyqvm hot-plugged, and how to plug it again into another QEMU.

    ``commands`` are the QMP commands that plugged it, in order. A disk's
    ``blockdev-add`` is left out: it names files of this VM, so a replay
    builds it anew from ``disk``.
    """

    backends: tuple[tuple[str, str], ...]  # (kind, name): what unplug removes after the device
    commands: tuple[QMPCommand, ...]
    disk: Disk | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (for a save manifest, or a destination in another process)."""
        disk = None
        if self.disk is not None:
            disk = dataclasses.asdict(self.disk) | {"path": str(self.disk.path)}
        return {
            "version": RECORD_VERSION,
            "backends": [list(b) for b in self.backends],
            "commands": [[name, dict(args)] for name, args in self.commands],
            "disk": disk,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plugged:
        """The record ``to_json`` wrote; `HotplugError` if it is not one (or of another version)."""
        version = data.get("version", RECORD_VERSION) if isinstance(data, Mapping) else None
        if version != RECORD_VERSION:
            raise HotplugError(
                f"a hot-plugged device record of version {version!r}; this pyqvm reads "
                f"version {RECORD_VERSION} (save or migrate with the same pyqvm version)"
            )
        try:
            disk = Disk(**data["disk"]) if data.get("disk") else None
            return cls(
                backends=tuple((str(k), str(n)) for k, n in data["backends"]),
                commands=tuple((str(c), dict(a)) for c, a in data["commands"]),
                disk=disk,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise HotplugError(f"not a hot-plugged device record: {e}") from None


class DeviceTable:
    """The devices pyqvm plugged into one QEMU and that are still there, in plug order.

    ``lock`` orders plugs and unplugs, so that two never pick the same slot or id.
    """

    def __init__(self) -> None:
        self._devices: dict[str, Plugged] = {}
        self.lock = asyncio.Lock()

    def add(self, device: str, record: Plugged) -> None:
        self._devices[device] = record

    def discard(self, device: str) -> Plugged | None:
        return self._devices.pop(device, None)

    def get(self, device: str) -> Plugged | None:
        return self._devices.get(device)

    def snapshot(self) -> dict[str, Plugged]:
        """A copy of the table (device id -> record), in plug order."""
        return dict(self._devices)

    def to_json(self) -> dict[str, Any]:
        """``{device: record}`` in JSON form (see `Plugged.to_json`)."""
        return {device: p.to_json() for device, p in self._devices.items()}

    @staticmethod
    def records_from_json(data: Mapping[str, Any]) -> dict[str, Plugged]:
        """The records `to_json` wrote, for replaying into another machine."""
        if not isinstance(data, Mapping):
            raise HotplugError(
                f"hot-plugged devices: expected a mapping, got {type(data).__name__}"
            )
        return {str(device): Plugged.from_json(record) for device, record in data.items()}

    def __repr__(self) -> str:
        return f"<DeviceTable {list(self._devices)}>"
