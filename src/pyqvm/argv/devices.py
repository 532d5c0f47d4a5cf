"""Guest devices per profile: disks, NICs, PV extras, host devices.

The three profiles follow the openSUSE virtualization guide's modes:

- ``emulated`` (full virtualization): devices unmodified guests drive —
  e1000 (pc) / e1000e (q35) NICs, AHCI disks on q35, IDE on pc;
- ``virtio`` (PV-on-HVM): virtio-blk/scsi, virtio-net, virtio-rng,
  virtio-balloon, virtio-serial;
- ``passthrough``: the virtio set plus vfio-pci host devices.

The guest agent channel is virtio-serial in every profile: it is pyqvm's
management path, not part of the guest's emulated hardware.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pyqvm.argv.escape import opts, qjson
from pyqvm.errors import SpecError
from pyqvm.spec import Disk, Network, PortForward, VMSpec

#: The cloud-init seed's disk (``pq-*`` ids are pyqvm's: no spec disk can take it).
SEED_ID = "pq-seed"


@dataclass(frozen=True, slots=True)
class DiskFile:
    """What QEMU opens for one disk: ``overlay`` (qcow2 in the runtime dir) over the spec's file."""

    overlay: Path | None = None


def bus_kind(spec: VMSpec) -> str:
    """``pci`` or ``mmio`` (microvm's virtio-mmio transport)."""
    return "mmio" if spec.effective_machine == "microvm" else "pci"


def virtio(spec: VMSpec, kind: str) -> str:
    """The virtio driver for this machine: ``virtio-blk-pci`` or ``virtio-blk-device``."""
    return f"virtio-{kind}-{'device' if bus_kind(spec) == 'mmio' else 'pci'}"


def disk_interface(spec: VMSpec, disk: Disk) -> str:
    if disk.interface != "auto":
        return disk.interface
    if spec.profile == "emulated":
        return "ahci" if spec.effective_machine == "q35" else "ide"
    return "virtio-blk"


def nic_model(spec: VMSpec, net: Network) -> str:
    model = net.model
    if model == "auto":
        if spec.profile == "emulated":
            model = "e1000e" if spec.effective_machine == "q35" else "e1000"
        else:
            model = "virtio"
    return virtio(spec, "net") if model == "virtio" else model


def uses_ide(spec: VMSpec) -> bool:
    """Whether any disk or CD-ROM sits on the board's AHCI/IDE controller."""
    return bool(spec.cdroms) or any(disk_interface(spec, d) in ("ahci", "ide") for d in spec.disks)


class _IdePorts:
    """Hands out AHCI ports (q35: ide.0..ide.5) or IDE bus/unit pairs (pc: 2 buses x 2 units)."""

    def __init__(self, machine: str) -> None:
        if machine == "q35":
            self._free: list[dict[str, object]] = [{"bus": f"ide.{i}"} for i in range(6)]
        elif machine == "pc":
            self._free = [{"bus": f"ide.{b}", "unit": u} for b in range(2) for u in range(2)]
        else:
            self._free = []
        self._machine = machine

    def take(self, where: str) -> dict[str, object]:
        if not self._free:
            n = {"q35": 6, "pc": 4}.get(self._machine, 0)
            raise SpecError(
                where, f"machine {self._machine!r} has only {n} AHCI/IDE ports; use virtio-blk"
            )
        return self._free.pop(0)


def disk_args(
    spec: VMSpec, files: Mapping[str, DiskFile], *, seed: Path | None = None
) -> list[str]:
    """``-blockdev`` (JSON) and ``-device`` arguments for disks and CD-ROMs; ``seed``, a
    cloud-init seed volume, goes last as the read-only disk ``pq-seed``."""
    argv: list[str] = []
    ide = _IdePorts(spec.effective_machine)
    scsi_bus: str | None = None
    for i, disk in enumerate(spec.disks):
        where = f"disks[{i}]"
        argv += ["-blockdev", qjson(_blockdev(disk, files.get(disk.id, DiskFile())))]
        iface = disk_interface(spec, disk)
        dev: dict[str, object] = {"id": disk.id, "drive": disk.id}
        if iface == "virtio-blk":
            dev["driver"] = virtio(spec, "blk")
        elif iface == "virtio-scsi":
            if scsi_bus is None:
                scsi_bus = "scsi0"
                argv += ["-device", qjson({"driver": virtio(spec, "scsi"), "id": scsi_bus})]
            dev |= {"driver": "scsi-hd", "bus": f"{scsi_bus}.0"}
        else:
            dev |= {"driver": "ide-hd", **ide.take(f"{where}.interface")}
        if i == 0 and (index := spec.boot_index("disk")) is not None:
            dev["bootindex"] = index
        argv += ["-device", qjson(dev)]
    for i, cd in enumerate(spec.cdroms):
        node = f"cd{i}"
        argv += [
            "-blockdev",
            qjson(
                {
                    "driver": "raw",
                    "node-name": node,
                    "read-only": True,
                    "file": {"driver": "file", "filename": str(cd), "read-only": True},
                }
            ),
            "-device",
            qjson(
                {
                    "driver": "ide-cd",
                    "id": node,
                    "drive": node,
                    **ide.take(f"cdroms[{i}]"),
                    "bootindex": spec.boot_index("cdrom") if i == 0 else None,
                }
            ),
        ]
    if seed is not None:
        file = {"driver": "file", "filename": str(seed), "read-only": True}
        blockdev = {"driver": "raw", "node-name": SEED_ID, "read-only": True, "file": file}
        seed_dev: dict[str, object] = {"id": SEED_ID, "drive": SEED_ID}
        if spec.profile == "emulated":  # a guest that may lack virtio drivers
            seed_dev |= {"driver": "ide-hd", **ide.take("cloud_init")}
        else:
            seed_dev["driver"] = virtio(spec, "blk")
        argv += ["-blockdev", qjson(blockdev), "-device", qjson(seed_dev)]
    return argv


def blockdev_props(disk: Disk, f: DiskFile) -> dict[str, object]:
    """The ``-blockdev`` (or QMP ``blockdev-add``) tree for one disk; its node is ``disk.id``."""
    return _blockdev(disk, f)


def _blockdev(disk: Disk, f: DiskFile) -> dict[str, object]:
    base: dict[str, object] = {
        "driver": disk.format,
        "file": {"driver": "file", "filename": str(disk.path)},
    }
    if disk.ephemeral and not disk.readonly:
        if f.overlay is None:
            raise ValueError(f"disk {disk.id!r} is ephemeral but no overlay was made for it")
        # The overlay names its backing file explicitly: QEMU never reparses a
        # path stored in an image header, and the base is opened read-only.
        base |= {"node-name": f"{disk.id}-base", "read-only": True}
        return {
            "driver": "qcow2",
            "node-name": disk.id,
            "file": {"driver": "file", "filename": str(f.overlay)},
            "backing": base,
        }
    return base | {"node-name": disk.id, "read-only": disk.readonly}


def hostfwd_rule(f: PortForward) -> str:
    """A port forward in slirp's syntax (``-netdev user,hostfwd=`` and HMP ``hostfwd_add``)."""
    return f"{f.protocol}:{f.host_address}:{f.host_port}-:{f.guest_port}"


def uses_virtiofs(spec: VMSpec) -> bool:
    return any(s.transport == "virtiofs" for s in spec.shares)


def anonymous_ram(spec: VMSpec, backend_id: str, size: int) -> dict[str, object]:
    """A RAM backend object (boot or hot-plugged): shareable memfd when a virtiofsd must map
    the guest's RAM to reach its buffers, plain anonymous memory otherwise."""
    if uses_virtiofs(spec):
        return {"qom-type": "memory-backend-memfd", "id": backend_id, "size": size, "share": True}
    return {"qom-type": "memory-backend-ram", "id": backend_id, "size": size}


#: The SSH port forward of ``spec.ssh``, on the first user network.
SSH_HOSTFWD = "tcp:127.0.0.1:0-:22"


def netdev_props(
    spec: VMSpec, net: Network, accel: str, vde_socket: Path | None = None
) -> dict[str, object]:
    """The ``-netdev`` (or QMP ``netdev_add``) members for one NIC's host side."""
    netdev: dict[str, object] = {"id": net.id, "type": net.mode}
    if net.mode == "user":
        rules = [hostfwd_rule(f) for f in net.forwards]
        if spec.ssh and net is next((n for n in spec.networks if n.mode == "user"), None):
            # Port 0: the host picks a free one, read back with `info usernet` (ops/ssh.py).
            rules.append(SSH_HOSTFWD)
        if rules:
            netdev["hostfwd"] = [{"str": r} for r in rules]
        if net.tftp is not None:
            netdev["tftp"] = str(net.tftp)
        if net.bootfile is not None:
            netdev["bootfile"] = net.bootfile
    elif net.mode == "private":
        if vde_socket is None:
            raise ValueError(f"private NIC {net.id!r} has no switch to plug into")
        netdev |= {"type": "vde", "sock": str(vde_socket)}
    else:
        netdev |= {"ifname": net.tap, "script": "no", "downscript": "no"}
        if accel == "kvm" and spec.profile != "emulated":
            netdev["vhost"] = True
    return netdev


def _first_nic(spec: VMSpec) -> Network | None:
    """The NIC that network-boots: the first with a bootfile, else the first."""
    nics = [n for n in spec.networks if n.mode != "none"]
    return next((n for n in nics if n.bootfile is not None), nics[0] if nics else None)


def nic_props(spec: VMSpec, net: Network) -> dict[str, object]:
    """The ``-device`` (or QMP ``device_add``) members for one NIC; None members are unset."""
    # A directly booted kernel never network-boots: skip the iPXE option ROM,
    # which SeaBIOS would otherwise run (about 0.15 s under TCG).
    rom = "" if spec.kernel is not None and bus_kind(spec) == "pci" else None
    return {
        "driver": nic_model(spec, net),
        "id": net.id,
        "netdev": net.id,
        "mac": net.mac,
        "romfile": rom,
        # The first NIC is where the firmware network-boots (PXE), if the boot order says so.
        "bootindex": spec.boot_index("network") if net is _first_nic(spec) else None,
    }


def net_args(spec: VMSpec, accel: str, vde_sockets: Mapping[str, Path] | None = None) -> list[str]:
    argv: list[str] = []
    for net in spec.networks:
        if net.mode == "none":
            continue
        sock = (vde_sockets or {}).get(net.id)
        argv += ["-netdev", qjson(netdev_props(spec, net, accel, sock))]
        argv += ["-device", qjson(nic_props(spec, net))]
    return argv


def pv_extra_args(spec: VMSpec) -> list[str]:
    """virtio-rng and virtio-balloon (PV profiles only)."""
    if spec.profile == "emulated":
        return []
    argv: list[str] = []
    if spec.rng:
        argv += [
            "-object",
            qjson({"qom-type": "rng-builtin", "id": "pq-rng"}),
            "-device",
            qjson({"driver": virtio(spec, "rng"), "id": "pq-rng-dev", "rng": "pq-rng"}),
        ]
    if spec.balloon:
        argv += ["-device", qjson({"driver": virtio(spec, "balloon"), "id": "pq-balloon"})]
    return argv


def vmgenid_args(spec: VMSpec) -> list[str]:
    """QEMU's VM generation ID (`VMSpec.has_vmgenid`). Each QEMU process makes a random
    GUID ("auto"), and one restored from a state writes its own into the guest and
    notifies it: the guest kernel then reseeds its RNG (a clone's, a restored save's)."""
    if not spec.has_vmgenid:
        return []
    return ["-device", qjson({"driver": "vmgenid", "id": "pq-vmgenid"})]


def hostdev_args(spec: VMSpec) -> list[str]:
    argv: list[str] = []
    for h in spec.host_devices:
        dev: dict[str, object] = {
            "driver": "vfio-pci",
            "id": h.id,
            "host": h.address,
            "addr": h.guest_address,
        }
        if h.rombar is not None:
            dev["rombar"] = int(h.rombar)
        if h.multifunction:
            dev["multifunction"] = True
        argv += ["-device", qjson(dev)]
    return argv


def hotplug_port_ids(spec: VMSpec) -> list[str]:
    """The ids of the q35 ``pcie-root-port``s kept free for hotplug (``spec.hotplug_slots``)."""
    return (
        [f"pq-hp{i}" for i in range(spec.hotplug_slots)] if spec.effective_machine == "q35" else []
    )


def hotplug_port_args(spec: VMSpec) -> list[str]:
    """Empty ``pcie-root-port``s: on q35 the root complex itself takes no hotplug."""
    argv: list[str] = []
    for i, port in enumerate(hotplug_port_ids(spec)):
        # chassis numbers must be unique per root port; 0 is the root complex's own.
        dev = {"driver": "pcie-root-port", "id": port, "bus": "pcie.0", "chassis": i + 1}
        argv += ["-device", qjson(dev)]
    return argv


#: 9p's security model. "none": files the guest creates belong to QEMU's user on the
#: host, with the mode the guest gave them (chown from the guest is ignored, not failed).
#: "mapped-xattr" would keep the guest's owners in xattrs, which host tools do not read.
NINEP_SECURITY_MODEL = "none"


def share_args(spec: VMSpec, sockets: Mapping[str, Path]) -> list[str]:
    """Each share's device: vhost-user-fs on its virtiofsd's socket (``sockets``: tag ->
    path), or virtio-9p over QEMU's own ``local`` fsdev."""
    out: list[str] = []
    fs_driver = f"vhost-user-fs-{'device' if bus_kind(spec) == 'mmio' else 'pci'}"
    for i, s in enumerate(spec.shares):
        if s.transport == "virtiofs":
            out += [
                "-chardev",
                opts("socket", {"id": f"pq-fs{i}", "path": str(sockets[s.tag])}),
                "-device",
                qjson(
                    {
                        "driver": fs_driver,
                        "id": f"pq-fsdev{i}",
                        "chardev": f"pq-fs{i}",
                        "tag": s.tag,
                    }
                ),
            ]
        elif s.transport == "9p":
            fsdev = {
                "id": f"pq-fs{i}",
                "path": str(s.host),
                "security_model": NINEP_SECURITY_MODEL,
                # Inode numbers stay unique when the tree spans host file systems.
                "multidevs": "remap",
                "readonly": True if s.readonly else None,
            }
            out += [
                "-fsdev",
                opts("local", fsdev),
                "-device",
                qjson(
                    {
                        "driver": virtio(spec, "9p"),
                        "id": f"pq-fsdev{i}",
                        "fsdev": f"pq-fs{i}",
                        "mount_tag": s.tag,
                    }
                ),
            ]
        else:
            raise ValueError(f"share {s.tag!r}: decide the transport before building argv")
    return out
