"""Hotplug and unplug of disks, NICs, vCPUs and memory in a running guest.

Plugging is QEMU's backend first, then the guest-visible device:

- disk: ``blockdev-add`` (an ephemeral disk gets a qcow2 overlay in the runtime
  dir) + ``device_add virtio-blk-pci``;
- NIC: ``netdev_add`` + ``device_add`` (virtio-net-pci, or the spec's model);
- vCPU: ``device_add`` of a free slot from ``query-hotpluggable-cpus`` (needs
  ``max_smp`` in the spec);
- memory: ``object-add memory-backend-ram`` + ``device_add pc-dimm`` (needs
  ``max_memory`` and ``memory_slots``).

PCI devices need a slot that takes hotplug: on q35 one of the
``pcie-root-port``s the spec reserves with ``hotplug_slots`` (a free one is
picked from what ``query-pci`` reports), on pc the pci.0 bus itself.

Unplugging asks the guest to let go (``device_del``), waits for QEMU's
``DEVICE_DELETED``, then removes the backend. A guest that never lets go
raises `UnplugTimeoutError`: the device and its backend then stay as they
were, and a later `unplug` of the same id finishes the job.

The guest may need to bring hot-added vCPUs and memory online itself (the
built-in guest does not: ``echo 1 > /sys/devices/system/cpu/cpuN/online``).

Every plug is recorded in the machine's `pyqvm.channels.devices.DeviceTable`
(``machine.devices``), so that `replug` can give a migration destination the
same devices before the guest's state arrives.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyqvm.argv.devices import (
    DiskFile,
    anonymous_ram,
    blockdev_props,
    hostfwd_rule,
    hotplug_port_ids,
    netdev_props,
    nic_props,
    virtio,
)
from pyqvm.channels.devices import Plugged, QMPCommand
from pyqvm.channels.qmp import Event
from pyqvm.deadline import Deadline
from pyqvm.errors import HotplugError, PyqvmTimeoutError, QMPCommandError, UnplugTimeoutError
from pyqvm.launch.overlays import adopt_overlay, make_overlay
from pyqvm.machine import Machine
from pyqvm.ops import unique_id
from pyqvm.spec import Disk, Network, check_id, parse_size_mib
from pyqvm.state import LIVE

log = logging.getLogger(__name__)

#: Default bound on waiting for the guest to release a device.
UNPLUG_TIMEOUT = 30.0
_MIB = 1024 * 1024


async def replug(
    vm: Machine,
    devices: Mapping[str, Plugged],
    *,
    overlays: Mapping[str, Path] | None = None,
    without_forwards: bool = False,
) -> None:
    """Plug ``devices`` (another machine's ``devices.snapshot()``) into ``vm``: same ids, slots.

    For a migration destination, before the guest's state arrives: QEMU accepts
    ``device_add`` then, and the incoming state needs the same devices. An
    ephemeral disk opens ``overlays[id]`` (the source's overlay: shared storage)
    or else a fresh overlay over its file (copied storage fills it).
    ``without_forwards`` leaves out NICs' host port forwards (see `hostfwds`).
    """
    for device, p in devices.items():
        if p.disk is not None:
            files = DiskFile()
            if p.disk.ephemeral and not p.disk.readonly:
                overlay = vm.overlay_path(device)
                if overlays and device in overlays:
                    adopt_overlay(overlays[device], overlay)
                else:
                    await make_overlay(p.disk.path, p.disk.format or "raw", overlay)
                files = DiskFile(overlay=overlay)
            await _replay(vm, device, ("blockdev-add", blockdev_props(p.disk, files)))
        for name, args in p.commands:
            if without_forwards and name == "netdev_add":
                args = {k: v for k, v in args.items() if k != "hostfwd"}
            await _replay(vm, device, (name, args))
        vm.devices.add(device, p)
        log.info("%s: plugged %r as the source has it", vm.name, device)


def hostfwds(vm: Machine) -> list[tuple[str, str]]:
    """(netdev id, rule) of every host port forward of ``vm``'s NICs, hot-plugged ones too."""
    out = [
        (n.id, hostfwd_rule(f)) for n in vm.spec.networks if n.mode == "user" for f in n.forwards
    ]
    for p in vm.devices.snapshot().values():
        for name, args in p.commands:
            if name == "netdev_add":
                out += [(str(args["id"]), str(r["str"])) for r in args.get("hostfwd", ())]
    return out


async def _replay(vm: Machine, device: str, command: QMPCommand) -> None:
    name, args = command
    try:
        await vm.execute(name, dict(args))
    except QMPCommandError as e:
        raise HotplugError(
            f"VM {vm.name!r}: cannot plug {device!r} as the source has it ({name}): {e.description}"
        ) from e


def _clean(props: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in props.items() if v is not None}


async def _peripherals(vm: Machine) -> list[str]:
    """The ids of all user-created devices (``/machine/peripheral``)."""
    return [p["name"] for p in await vm.execute("qom-list", {"path": "/machine/peripheral"})]


async def _taken_ids(vm: Machine) -> set[str]:
    nodes = await vm.execute("query-named-block-nodes", {"flat": True})
    objects = await vm.execute("qom-list", {"path": "/objects"})
    return (
        set(await _peripherals(vm)) | {n["node-name"] for n in nodes} | {o["name"] for o in objects}
    )


async def _new_id(vm: Machine, wanted: str, prefix: str, field: str) -> str:
    taken = await _taken_ids(vm)
    if not wanted:
        return unique_id(prefix, sorted(taken))
    check_id(wanted, field)
    if wanted in taken:
        raise HotplugError(
            f"VM {vm.name!r} already has a device or node {wanted!r}; pick another id"
        )
    return wanted


def _hotplug_ports(vm: Machine) -> list[str] | None:
    """The root ports a PCI device may be plugged into (q35), or None (pc: pci.0).

    Checks the spec only, so a machine without PCI hotplug is refused before QEMU is asked.
    """
    spec = vm.resolved_spec
    machine = spec.effective_machine
    if machine == "pc":
        return None
    if machine != "q35":
        chose = (
            ' (machine = "auto" chose it: no hotplug room was asked for)'
            if spec.machine == "auto"
            else ""
        )
        raise HotplugError(
            f"VM {vm.name!r} runs on {machine}, which has no PCI hotplug{chose}; "
            'set hotplug_slots = N (or machine = "q35") in the spec'
        )
    ports = hotplug_port_ids(spec)
    if not ports:
        raise HotplugError(
            f"VM {vm.name!r} has no hotplug slot: on q35 a device plugs into a reserved "
            "pcie-root-port; set hotplug_slots = N in the spec"
        )
    return ports


async def _free_slot(vm: Machine, ports: list[str] | None) -> str | None:
    """A bus for one more PCI device: a free port of ``ports``, or None (pc: pci.0)."""
    if ports is None:
        return None
    used: set[str] = set()
    for bus in await vm.execute("query-pci"):
        for dev in bus.get("devices", []):
            bridge = dev.get("pci_bridge") or {}
            if dev.get("qdev_id") in ports and bridge.get("devices"):
                used.add(dev["qdev_id"])
    for port in ports:
        if port not in used:
            return port
    raise HotplugError(
        f"VM {vm.name!r}: all {len(ports)} hotplug slots are in use; unplug a device "
        "or reserve more with hotplug_slots"
    )


async def plug_disk(vm: Machine, disk: Disk) -> str:
    """Hot-add ``disk`` as a virtio-blk device; returns its device id (``disk.id`` or ``hdN``).

    An ephemeral disk (the default) gets a throw-away qcow2 overlay, so its
    file is never written. Raises `HotplugError`.
    """
    vm.require(*LIVE, what="hot-plugging a disk")
    if disk.interface not in ("auto", "virtio-blk"):
        raise HotplugError(
            f"disk interface {disk.interface!r} cannot be hot-plugged; use virtio-blk"
        )
    spec = vm.resolved_spec
    ports = _hotplug_ports(vm)
    async with vm.devices.lock:
        ident = await _new_id(vm, disk.id, "hd", "disk.id")
        disk = dataclasses.replace(disk, id=ident)
        bus = await _free_slot(vm, ports)
        files = DiskFile()
        if disk.ephemeral and not disk.readonly:
            overlay = vm.overlay_path(ident)
            await make_overlay(disk.path, disk.format or "raw", overlay)
            files = DiskFile(overlay=overlay)
        try:
            await vm.execute("blockdev-add", blockdev_props(disk, files))
        except QMPCommandError as e:
            raise HotplugError(
                f"VM {vm.name!r}: cannot open disk {disk.path}: {e.description}"
            ) from e
        device = _clean({"driver": virtio(spec, "blk"), "id": ident, "drive": ident, "bus": bus})
        try:
            await vm.execute("device_add", device)
        except QMPCommandError as e:
            await vm.execute("blockdev-del", {"node-name": ident})
            raise HotplugError(
                f"VM {vm.name!r}: cannot plug disk {ident!r}: {e.description}"
            ) from e
        vm.devices.add(ident, Plugged((("blockdev", ident),), (("device_add", device),), disk=disk))
    log.info("%s: plugged disk %r (%s) into %s", vm.name, ident, disk.path, bus or "pci.0")
    return ident


async def plug_nic(vm: Machine, net: Network | None = None) -> str:
    """Hot-add a NIC (default: user-mode networking, virtio); returns its device id."""
    vm.require(*LIVE, what="hot-plugging a NIC")
    net = net or Network()
    if net.mode == "none":
        raise HotplugError('a NIC with mode = "none" has nothing to plug; use "user" or "tap"')
    if net.mode == "private":
        raise HotplugError(
            "a private-network NIC cannot be hot-plugged yet; put it in the spec's networks"
        )
    spec = vm.resolved_spec
    ports = _hotplug_ports(vm)
    async with vm.devices.lock:
        ident = await _new_id(vm, net.id, "hnic", "network.id")
        net = dataclasses.replace(net, id=ident)
        bus = await _free_slot(vm, ports)
        netdev = netdev_props(spec, net, vm.accelerator or "tcg")
        try:
            await vm.execute("netdev_add", netdev)
        except QMPCommandError as e:
            raise HotplugError(
                f"VM {vm.name!r}: cannot add network {ident!r}: {e.description}"
            ) from e
        device = _clean(nic_props(spec, net) | {"bus": bus})
        try:
            await vm.execute("device_add", device)
        except QMPCommandError as e:
            await vm.execute("netdev_del", {"id": ident})
            raise HotplugError(f"VM {vm.name!r}: cannot plug NIC {ident!r}: {e.description}") from e
        vm.devices.add(
            ident,
            Plugged((("netdev", ident),), (("netdev_add", netdev), ("device_add", device))),
        )
    log.info("%s: plugged NIC %r into %s", vm.name, ident, bus or "pci.0")
    return ident


async def plug_cpu(vm: Machine, id: str = "") -> str:
    """Hot-add one vCPU (the lowest free slot); returns its device id.

    Needs ``max_smp`` above ``smp`` in the spec. The guest may have to bring it
    online (``echo 1 > /sys/devices/system/cpu/cpuN/online``).
    """
    vm.require(*LIVE, what="hot-plugging a vCPU")
    spec = vm.resolved_spec
    if not spec.max_smp or spec.max_smp <= spec.smp:
        raise HotplugError(
            f"VM {vm.name!r} has no room for another vCPU (smp = {spec.smp}, max_smp = "
            f"{spec.max_smp}); set max_smp above smp in the spec"
        )
    async with vm.devices.lock:
        slots: list[dict[str, Any]] = await vm.execute("query-hotpluggable-cpus")
        free = [s for s in slots if "qom-path" not in s]
        if not free:
            limit = spec.max_smp or spec.smp
            hint = "raise max_smp" if spec.max_smp else "set max_smp above smp"
            raise HotplugError(
                f"VM {vm.name!r} has all its {limit} vCPU(s) plugged; {hint} in the spec"
            )
        order = ("node-id", "socket-id", "die-id", "core-id", "thread-id")
        slot = min(free, key=lambda s: tuple(s["props"].get(k, 0) for k in order))
        ident = await _new_id(vm, id, "vcpu", "id")
        device = {"driver": slot["type"], "id": ident, **slot["props"]}
        try:
            await vm.execute("device_add", device)
        except QMPCommandError as e:
            raise HotplugError(
                f"VM {vm.name!r}: cannot plug vCPU {ident!r}: {e.description}"
            ) from e
        vm.devices.add(ident, Plugged((), (("device_add", device),)))
    log.info("%s: plugged vCPU %r at %s", vm.name, ident, slot["props"])
    return ident


async def plug_memory(vm: Machine, size: int | str, id: str = "") -> str:
    """Hot-add a ``size`` (MiB, or ``"256M"``) memory DIMM; returns its device id.

    Needs ``max_memory`` and ``memory_slots`` in the spec. Linux uses memory in
    blocks of 128 MiB; the guest may have to bring them online
    (``echo online > /sys/devices/system/memory/memoryN/state``).
    """
    vm.require(*LIVE, what="hot-plugging memory")
    spec = vm.resolved_spec
    mib = parse_size_mib(size, "size")
    if spec.max_memory is None or not spec.memory_slots:
        raise HotplugError(
            f"VM {vm.name!r} has no room for memory hotplug; set max_memory and "
            "memory_slots in the spec"
        )
    assert isinstance(spec.max_memory, int) and isinstance(spec.memory, int)
    async with vm.devices.lock:
        dimms = [d for d in await vm.execute("query-memory-devices")]
        plugged = sum(int(d.get("data", {}).get("size", 0)) for d in dimms) // _MIB
        room = spec.max_memory - spec.memory - plugged
        if len(dimms) >= spec.memory_slots:
            raise HotplugError(
                f"VM {vm.name!r}: all {spec.memory_slots} memory slots are in use; "
                "raise memory_slots or unplug a DIMM"
            )
        if mib > room:
            raise HotplugError(
                f"VM {vm.name!r}: {mib}M does not fit: {room}M left below "
                f"max_memory = {spec.max_memory}M"
            )
        ident = await _new_id(vm, id, "dimm", "id")
        backend = f"{ident}-mem"
        memory = anonymous_ram(spec, backend, mib * _MIB)
        dimm = {"driver": "pc-dimm", "id": ident, "memdev": backend}
        try:
            await vm.execute("object-add", memory)
        except QMPCommandError as e:
            raise HotplugError(f"VM {vm.name!r}: cannot allocate {mib}M: {e.description}") from e
        try:
            await vm.execute("device_add", dimm)
        except QMPCommandError as e:
            await vm.execute("object-del", {"id": backend})
            raise HotplugError(
                f"VM {vm.name!r}: cannot plug DIMM {ident!r}: {e.description}"
            ) from e
        vm.devices.add(
            ident,
            Plugged((("object", backend),), (("object-add", memory), ("device_add", dimm))),
        )
    log.info("%s: plugged %dM DIMM %r", vm.name, mib, ident)
    return ident


async def _device_backends(vm: Machine, device: str) -> list[tuple[str, str]]:
    """What a device uses, read from QEMU before it goes: its drive, netdev or memdev."""
    path = f"/machine/peripheral/{device}"
    props = {p["name"] for p in await vm.execute("qom-list", {"path": path})}
    out: list[tuple[str, str]] = []
    for prop, kind in (("drive", "blockdev"), ("netdev", "netdev"), ("memdev", "object")):
        if prop not in props:
            continue
        value = await vm.execute("qom-get", {"path": path, "property": prop})
        if isinstance(value, str) and value:
            out.append((kind, value.rsplit("/", 1)[-1]))
    return out


async def unplug(vm: Machine, device: str, *, timeout: float = UNPLUG_TIMEOUT) -> None:
    """Unplug ``device`` (a device id): ask the guest, wait for it, then remove the backend.

    Raises `UnplugTimeoutError` when the guest does not release the device
    within ``timeout`` seconds (the device and its backend then stay; call
    again to finish), `HotplugError` for an unknown device or QEMU's refusal.
    """
    vm.require(*LIVE, what=f"unplugging {device!r}")
    async with vm.devices.lock:
        present = device in await _peripherals(vm)
        known = vm.devices.get(device)
        if present:
            await _refuse_tcg_cpu_unplug(vm, device)
            # Read from QEMU before the device goes; else what pyqvm recorded when it plugged.
            backends = await _device_backends(vm, device)
            await _release(vm, device, timeout)
        elif known is not None:
            backends = list(known.backends)
        else:
            raise HotplugError(f"VM {vm.name!r} has no device {device!r}")
        for kind, name in backends:
            await _remove_backend(vm, kind, name)
        vm.devices.discard(device)
        overlay = vm.overlay_path(device)
        if ("blockdev", device) in backends and overlay.exists():
            overlay.unlink()
    log.info("%s: unplugged %r", vm.name, device)


async def _refuse_tcg_cpu_unplug(vm: Machine, device: str) -> None:
    if vm.accelerator != "tcg":
        return
    path = f"/machine/peripheral/{device}"
    cpus = await vm.execute("query-hotpluggable-cpus")
    if not any(c.get("qom-path") == path for c in cpus):
        return
    version = (await vm.execute("query-version"))["qemu"]
    if (version["major"], version["minor"]) <= (7, 2):
        # Measured: the guest ejects the vCPU, then QEMU 7.2 aborts ("double free or
        # corruption") within seconds, in most runs. Refusing keeps the VM alive.
        raise HotplugError(
            f"VM {vm.name!r}: unplugging vCPU {device!r} under TCG crashes QEMU "
            f"{version['major']}.{version['minor']}; it stays plugged (offline it in the "
            "guest instead: echo 0 > /sys/devices/system/cpu/cpuN/online)"
        )


async def _release(vm: Machine, device: str, timeout: float) -> None:
    path = f"/machine/peripheral/{device}"

    def ours(event: Event) -> bool:
        data = event.get("data") or {}
        where = str(data.get("path", ""))
        return data.get("device") == device or where == path or where.startswith(path + "/")

    deadline = Deadline(timeout)
    async with vm.qmp.events("DEVICE_DELETED", ours) as listener:
        try:
            await vm.execute("device_del", {"id": device})
        except QMPCommandError as e:
            # An unplug asked for earlier and still pending is no error: wait on.
            if "in the process of unplug" not in e.description and "pending" not in e.description:
                raise HotplugError(
                    f"VM {vm.name!r}: cannot unplug {device!r}: {e.description}"
                ) from e
        while True:
            try:
                event = await vm.qmp.wait_for_event(
                    "DEVICE_DELETED",
                    timeout=deadline.left(),
                    listener=listener,
                )
            except PyqvmTimeoutError:
                raise UnplugTimeoutError(
                    f"VM {vm.name!r}: the guest did not release {device!r} within {timeout:g} s; "
                    "it stays plugged (QEMU keeps the request: call unplug again to finish, "
                    "or check that the guest handles hotplug)",
                    device,
                ) from None
            data = event.get("data") or {}
            if data.get("device") == device or data.get("path") == path:
                return
            # QEMU 7.2 reports a vCPU's unplug only by its lapic child's DEVICE_DELETED:
            # a child's event means "look whether the device itself is gone".
            if device not in await _peripherals(vm):
                return


async def _remove_backend(vm: Machine, kind: str, name: str) -> None:
    command, args = {
        "blockdev": ("blockdev-del", {"node-name": name}),
        "netdev": ("netdev_del", {"id": name}),
        "object": ("object-del", {"id": name}),
    }[kind]
    try:
        await vm.execute(command, args)
    except QMPCommandError as e:
        raise HotplugError(
            f"VM {vm.name!r}: the device is gone but its {kind} {name!r} stays: {e.description}"
        ) from e
