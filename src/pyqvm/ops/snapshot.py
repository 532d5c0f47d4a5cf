"""Internal snapshots: the guest's RAM and device state plus every writable disk, in qcow2.

QEMU 7.2's ``snapshot-save``/``snapshot-load``/``snapshot-delete`` are jobs
and need every argument (job id, tag, the node for the VM state, the disk
nodes). While one runs, the monitor may not answer for a second or two; the
job is followed through its events only (`pyqvm.channels.qmp.QMPSession.run_job`).

The VM state goes to a writable qcow2 node: the disk's top node (for an
ephemeral disk, its overlay). A raw disk cannot hold snapshots and a VM with a
vfio-pci device cannot save its state: both are refused before QEMU is asked,
with a message that names the disk or device.

Note: ``-loadvm`` on the command line cannot load a snapshot made with
``snapshot-save``; start the VM, then `load` it.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from typing import Any

from pyqvm.deadline import Deadline
from pyqvm.errors import JobError, SnapshotError
from pyqvm.machine import Machine
from pyqvm.ops import BlockNode, block_nodes
from pyqvm.ops.migration.common import migration_blocker
from pyqvm.state import LIVE

log = logging.getLogger(__name__)

#: Default bound on one snapshot job (a big guest under TCG is slow to save).
TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One internal snapshot as the VM's disks hold it."""

    tag: str
    id: str
    date: _dt.datetime  # when it was taken (UTC)
    vm_clock: float  # guest run time at the snapshot, in seconds
    vm_state_size: int  # bytes of RAM/device state (0: disks only)
    disks: tuple[str, ...]  # the disks (device ids) that hold it


def _check_tag(tag: str) -> None:
    if not isinstance(tag, str) or not tag.strip():
        raise SnapshotError(f"snapshot tag {tag!r} is empty; give it a name like 'clean'")
    if tag.isdigit():
        # QEMU looks snapshots up by id as well as by name: "2" could mean snapshot id 2.
        raise SnapshotError(f"snapshot tag {tag!r} is all digits; add a letter, e.g. 's{tag}'")


def _step(deadline: Deadline) -> float:
    """A single QMP call's bound within ``deadline`` (at most a minute, as any call's)."""
    return deadline.within(60.0) or 0.0


async def _writable(vm: Machine, what: str, deadline: Deadline) -> list[BlockNode]:
    """The nodes a snapshot covers: every writable disk, each of which must be qcow2."""
    vm.require(*LIVE, what=what)
    blocker = migration_blocker(vm.resolved_spec)
    if blocker:
        raise SnapshotError(f"cannot {what}: {blocker}")
    nodes = [n for n in await block_nodes(vm, _step(deadline)) if not n.readonly]
    for n in nodes:
        if n.driver != "qcow2":
            raise SnapshotError(
                f"VM {vm.name!r}: cannot {what}: disk {n.device!r} ({n.filename}) is "
                f"{n.driver}, which cannot hold snapshots; use a qcow2 image "
                "(qemu-img convert -O qcow2) or attach the disk ephemeral (a qcow2 overlay)"
            )
    if not nodes:
        raise SnapshotError(
            f"VM {vm.name!r}: cannot {what}: it has no writable qcow2 disk to hold the snapshot"
        )
    return nodes


def _snapshots(node: BlockNode) -> list[dict[str, Any]]:
    image = node.info.get("image") or {}
    return list(image.get("snapshots") or [])


def _infos(nodes: list[BlockNode]) -> list[SnapshotInfo]:
    by_tag: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for n in nodes:
        for s in _snapshots(n):
            raw, disks = by_tag.setdefault(s["name"], (s, []))
            disks.append(n.device)
            if s.get("vm-state-size", 0) > raw.get("vm-state-size", 0):
                by_tag[s["name"]] = (s, disks)
    out = []
    for tag, (s, disks) in by_tag.items():
        out.append(
            SnapshotInfo(
                tag=tag,
                id=str(s.get("id", "")),
                date=_dt.datetime.fromtimestamp(
                    s.get("date-sec", 0) + s.get("date-nsec", 0) / 1e9, _dt.UTC
                ),
                vm_clock=s.get("vm-clock-sec", 0) + s.get("vm-clock-nsec", 0) / 1e9,
                vm_state_size=int(s.get("vm-state-size", 0)),
                disks=tuple(disks),
            )
        )
    return sorted(out, key=lambda i: i.date)


async def list_snapshots(vm: Machine) -> list[SnapshotInfo]:
    """The internal snapshots on the VM's writable disks, oldest first."""
    vm.require(*LIVE, what="list snapshots")
    return _infos([n for n in await block_nodes(vm) if not n.readonly])


async def save(
    vm: Machine, tag: str, *, overwrite: bool = False, timeout: float | None = TIMEOUT
) -> SnapshotInfo:
    """Save the VM's RAM, device state and all writable disks as snapshot ``tag``.

    The guest pauses for the save and resumes after it (if it was running).
    With ``overwrite`` an existing snapshot of that name is replaced; without,
    it is an error. Raises `SnapshotError` (a raw disk, a vfio device, QEMU's
    own failure), `PyqvmTimeoutError` after ``timeout`` seconds.
    """
    _check_tag(tag)
    deadline = Deadline(timeout)  # one bound for every QMP call of the operation
    nodes = await _writable(vm, f"save snapshot {tag!r}", deadline)
    if any(i.tag == tag for i in _infos(nodes)):
        if not overwrite:
            raise SnapshotError(
                f"VM {vm.name!r} already has a snapshot {tag!r}; "
                "delete it first or overwrite it (overwrite=True; pyqvm snapshot save --overwrite)"
            )
        await delete(vm, tag, timeout=deadline.left())
    args = {"tag": tag, "vmstate": nodes[0].node, "devices": [n.node for n in nodes]}
    try:
        await vm.qmp.run_job("snapshot-save", args, timeout=deadline.left())
    except JobError as e:
        raise SnapshotError(f"VM {vm.name!r}: saving snapshot {tag!r} failed: {e.error}") from e
    log.info("%s: saved snapshot %r", vm.name, tag)
    for info in _infos([n for n in await block_nodes(vm, _step(deadline)) if not n.readonly]):
        if info.tag == tag:
            return info
    raise SnapshotError(f"VM {vm.name!r}: snapshot {tag!r} was saved but no disk lists it")


async def load(vm: Machine, tag: str, *, timeout: float | None = TIMEOUT) -> None:
    """Return the VM to snapshot ``tag``: RAM, devices and disks as they were at `save`.

    A running guest keeps running from the snapshot's point (a paused one stays
    paused). Every writable disk must hold the snapshot (a disk hot-added since
    does not). Raises `SnapshotError`.
    """
    _check_tag(tag)
    deadline = Deadline(timeout)  # one bound for every QMP call of the operation
    nodes = await _writable(vm, f"load snapshot {tag!r}", deadline)
    info = next((i for i in _infos(nodes) if i.tag == tag), None)
    if info is None:
        have = ", ".join(repr(i.tag) for i in _infos(nodes)) or "none"
        raise SnapshotError(f"VM {vm.name!r} has no snapshot {tag!r}; it has: {have}")
    missing = [n.device for n in nodes if n.device not in info.disks]
    if missing:
        raise SnapshotError(
            f"VM {vm.name!r}: snapshot {tag!r} does not cover disk(s) "
            f"{', '.join(map(repr, missing))} (attached after it was saved); unplug them first"
        )
    if info.vm_state_size == 0:
        raise SnapshotError(
            f"VM {vm.name!r}: snapshot {tag!r} holds disks only, no VM state to load"
        )
    vmstate = next(
        n.node
        for n in nodes
        if any(s["name"] == tag and s.get("vm-state-size", 0) for s in _snapshots(n))
    )
    args = {"tag": tag, "vmstate": vmstate, "devices": [n.node for n in nodes]}
    try:
        await vm.qmp.run_job("snapshot-load", args, timeout=deadline.left())
    except JobError as e:
        raise SnapshotError(f"VM {vm.name!r}: loading snapshot {tag!r} failed: {e.error}") from e
    log.info("%s: loaded snapshot %r", vm.name, tag)


async def delete(vm: Machine, tag: str, *, timeout: float | None = TIMEOUT) -> None:
    """Delete snapshot ``tag`` from every disk that holds it. Raises `SnapshotError`."""
    _check_tag(tag)
    deadline = Deadline(timeout)  # one bound for every QMP call of the operation
    nodes = await _writable(vm, f"delete snapshot {tag!r}", deadline)
    holders = [n for n in nodes if any(s["name"] == tag for s in _snapshots(n))]
    if not holders:
        have = ", ".join(repr(i.tag) for i in _infos(nodes)) or "none"
        raise SnapshotError(f"VM {vm.name!r} has no snapshot {tag!r}; it has: {have}")
    args = {"tag": tag, "devices": [n.node for n in holders]}
    try:
        await vm.qmp.run_job("snapshot-delete", args, timeout=deadline.left())
    except JobError as e:
        raise SnapshotError(f"VM {vm.name!r}: deleting snapshot {tag!r} failed: {e.error}") from e
    log.info("%s: deleted snapshot %r", vm.name, tag)
