"""Operations on a running VM, each in its own module, each over QMP.

- `pyqvm.ops.snapshot`: internal snapshots (RAM + disks): ``snapshot-save``/``-load``/``-delete``;
- `pyqvm.ops.blockjobs`: external disk snapshots (a new overlay) and ``block-commit``;
- `pyqvm.ops.hotplug`: plugging and unplugging disks, NICs, vCPUs and memory;
- `pyqvm.ops.migration` (a package): live migration between launcher instances,
  and saving / restoring a VM's state;
- `pyqvm.ops.guest`: commands and files in the guest, through its agent.

Each function takes the `pyqvm.machine.Machine` it works on; `pyqvm.AsyncVM`
exposes them as methods (``vm.snapshot_save(tag)``, ``vm.hotplug_disk(disk)``, ...). The
helpers here read what QEMU itself reports, so an operation sees the VM as it
is now (a hot-added disk, a disk whose top node an external snapshot replaced),
not as the spec described it at boot.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyqvm.machine import Machine

_PERIPHERAL = re.compile(r"/machine/peripheral/([^/]+)")


@dataclass(frozen=True, slots=True)
class BlockNode:
    """The top block node under one attached disk, as ``query-block`` reports it."""

    device: str  # the guest device's id (``root``, ``disk0``, a hot-added id)
    node: str  # the node the device reads and writes (changes with external snapshots)
    driver: str  # qcow2, raw, ...
    filename: str
    readonly: bool
    info: Mapping[str, Any]  # the whole ``inserted`` member, for callers who need more


def device_id(qdev: str) -> str:
    """``/machine/peripheral/root/virtio-backend`` -> ``root`` (or the path itself)."""
    m = _PERIPHERAL.match(qdev)
    return m.group(1) if m else qdev


async def block_nodes(vm: Machine, timeout: float = 60.0) -> list[BlockNode]:
    """Every attached disk with a medium, in QEMU's order."""
    out = []
    for b in await vm.execute("query-block", timeout=timeout):
        ins = b.get("inserted")
        if not ins:
            continue
        out.append(
            BlockNode(
                device=b.get("device") or device_id(b.get("qdev", "")),
                node=ins["node-name"],
                driver=ins["drv"],
                filename=ins.get("file", ""),
                readonly=bool(ins.get("ro")),
                info=ins,
            )
        )
    return out


async def block_node(vm: Machine, device: str, error: type[Exception]) -> BlockNode:
    """The disk whose guest device (or top node) is ``device``; ``error`` names the known ones."""
    nodes = await block_nodes(vm)
    for n in nodes:
        if device in (n.device, n.node):
            return n
    known = ", ".join(repr(n.device) for n in nodes) or "none"
    raise error(f"VM {vm.name!r} has no disk {device!r}; its disks: {known}")


def unique_id(prefix: str, taken: Sequence[str]) -> str:
    """``prefix0``, ``prefix1``, ... : the first not in ``taken``."""
    i = 0
    while f"{prefix}{i}" in taken:
        i += 1
    return f"{prefix}{i}"
