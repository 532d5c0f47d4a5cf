"""External disk snapshots and ``block-commit``: a disk's backing chain, changed live.

An external snapshot puts a new, empty qcow2 overlay on top of a disk while
the guest runs (``blockdev-snapshot-sync``): from then on the guest writes go
to the overlay and the image below stays byte-identical — a stable base to
copy or back up. ``block-commit`` folds the overlay's data back down into the
image below it and drops the overlay from the chain; for the active layer
that is a job that becomes ``ready`` and is then completed (pivot).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyqvm.errors import JobError, SnapshotError
from pyqvm.machine import Machine
from pyqvm.ops import block_node
from pyqvm.state import LIVE

log = logging.getLogger(__name__)

TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class ChainLink:
    """One image in a disk's backing chain (top first)."""

    filename: str
    format: str
    virtual_size: int
    node: str | None  # QEMU's node name, when the image is a named node


async def chain(vm: Machine, disk: str) -> list[ChainLink]:
    """The backing chain of ``disk`` (a device id or node), the image the guest writes first."""
    vm.require(*LIVE, what="query a disk's backing chain")
    top = await block_node(vm, disk, SnapshotError)
    nodes = await vm.execute("query-named-block-nodes", {"flat": True})
    by_file = {
        n["file"]: n["node-name"]
        for n in nodes
        if n.get("drv") not in ("file", "host_device") and not n["node-name"].startswith("#")
    }
    out: list[ChainLink] = []
    image: dict[str, Any] | None = top.info.get("image")
    while image:
        fname = image.get("filename", "")
        out.append(
            ChainLink(
                filename=fname,
                format=image.get("format", ""),
                virtual_size=int(image.get("virtual-size", 0)),
                node=top.node if not out else by_file.get(fname),
            )
        )
        image = image.get("backing-image")
    return out


async def snapshot(vm: Machine, disk: str, path: Path | str | None = None) -> Path:
    """Put a new qcow2 overlay at ``path`` on top of ``disk`` while the guest runs.

    The previous top image is not written from then on. Without ``path`` the
    overlay goes to the VM's runtime dir (removed with the VM). Returns the
    overlay's path. Raises `SnapshotError`.
    """
    vm.require(*LIVE, what=f"snapshot disk {disk!r}")
    top = await block_node(vm, disk, SnapshotError)
    if top.readonly:
        raise SnapshotError(f"disk {top.device!r} is read-only; it needs no external snapshot")
    links = await chain(vm, top.device)
    taken = {link.node for link in links}
    i = len(links)
    while f"{top.device}-snap{i}" in taken:
        i += 1
    node = f"{top.device}-snap{i}"
    target = Path(path) if path is not None else vm.runtime_file(f"{node}.qcow2")
    target = target if target.is_absolute() else Path.cwd() / target
    if target.exists():
        raise SnapshotError(f"{target} exists; an external snapshot makes a new file")
    await vm.execute(
        "blockdev-snapshot-sync",
        {
            "node-name": top.node,
            "snapshot-file": str(target),
            "snapshot-node-name": node,
            "format": "qcow2",
            "mode": "absolute-paths",
        },
    )
    log.info("%s: disk %r now writes to %s", vm.name, top.device, target)
    return target


async def commit(vm: Machine, disk: str, *, timeout: float | None = TIMEOUT) -> None:
    """Fold ``disk``'s top image into the image below it and drop it from the chain.

    The guest keeps running; when this returns, the data the guest wrote since
    the external `snapshot` is in the lower image, which the guest now writes.
    The overlay file itself is left in place (it is no longer used). Raises
    `SnapshotError` (no image below, or QEMU's job error).
    """
    vm.require(*LIVE, what=f"commit disk {disk!r}")
    top = await block_node(vm, disk, SnapshotError)
    links = await chain(vm, top.device)
    if len(links) < 2 or links[1].node is None:
        raise SnapshotError(
            f"disk {top.device!r} has no named image below its top ({links[0].filename}); "
            "take an external snapshot first"
        )
    if links[1].node == f"{top.device}-base":
        raise SnapshotError(
            f"disk {top.device!r} is ephemeral: the image below its overlay "
            f"({links[1].filename}) is never written; take an external snapshot first"
        )
    args = {"device": top.node, "base-node": links[1].node, "auto-dismiss": False}
    try:
        await vm.qmp.run_job("block-commit", args, timeout=timeout, complete_on_ready=True)
    except JobError as e:
        raise SnapshotError(f"committing disk {top.device!r} failed: {e.error}") from e
    log.info("%s: committed %s into %s", vm.name, links[0].filename, links[1].filename)
