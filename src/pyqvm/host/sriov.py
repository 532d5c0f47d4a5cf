"""SR-IOV: physical functions (PFs), their virtual functions (VFs), creating VFs,
picking a free one, and the ``ip link`` commands that set a VF's MAC and VLAN.

A VF is an ordinary PCI function once created: it is passed through with
vfio-pci like any device, and goes to one guest at a time (see `claims`).
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from pyqvm.errors import PassthroughError
from pyqvm.host.claims import ClaimStore
from pyqvm.host.pci import DEVICES, SysfsIO, current_driver, pci_device_dir
from pyqvm.host.vfio import VFIO_DRIVER

__all__ = [
    "SriovPF",
    "VFLink",
    "list_pfs",
    "pick_free_vf",
    "set_num_vfs",
    "sriov_pf",
    "vf_index",
    "vf_link_commands",
]

_log = logging.getLogger(__name__)

_MAC_RE = re.compile(r"(?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}\Z")
_VIRTFN = re.compile(r"virtfn(\d+)\Z")


@dataclass(frozen=True, slots=True)
class SriovPF:
    """A physical function: how many VFs it can have, has, and their addresses (by index)."""

    address: str
    total_vfs: int
    num_vfs: int
    vfs: tuple[str, ...]
    netdevs: tuple[str, ...] = ()


def _int(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def _vfs(pf_dir: Path) -> tuple[str, ...]:
    found: dict[int, str] = {}
    for p in pf_dir.glob("virtfn*"):
        m = _VIRTFN.match(p.name)
        if m and p.is_symlink():
            found[int(m.group(1))] = Path(p.readlink()).name
    return tuple(found[i] for i in sorted(found))


def _netdevs(dev_dir: Path) -> tuple[str, ...]:
    try:
        return tuple(sorted(p.name for p in (dev_dir / "net").iterdir()))
    except OSError:
        return ()


def sriov_pf(address: str, root: Path = Path("/")) -> SriovPF:
    """Read one PF.

    Raises:
        HostError: no such device.
        PassthroughError: the device is not SR-IOV capable.
    """
    d = pci_device_dir(address, root)
    total = _int(d / "sriov_totalvfs")
    if total is None:
        raise PassthroughError(
            f"host device {address} is not an SR-IOV physical function (no sriov_totalvfs); "
            "list PFs with `pyqvm doctor --for vfio` or "
            "`ls /sys/bus/pci/devices/*/sriov_totalvfs`",
            address=address,
        )
    return SriovPF(
        address=address,
        total_vfs=total,
        num_vfs=_int(d / "sriov_numvfs") or 0,
        vfs=_vfs(d),
        netdevs=_netdevs(d),
    )


def list_pfs(root: Path = Path("/")) -> list[SriovPF]:
    """Every SR-IOV capable device on the host."""
    base = root / DEVICES
    try:
        names = sorted(p.name for p in base.iterdir() if (p / "sriov_totalvfs").exists())
    except OSError:
        return []
    return [sriov_pf(n, root) for n in names]


def set_num_vfs(pf: str, count: int, io: SysfsIO, root: Path = Path("/")) -> SriovPF:
    """Make ``pf`` have exactly ``count`` VFs and return it as it is then.

    The kernel refuses to change a non-zero count to another non-zero count, so
    that goes through 0 (which removes the existing VFs: none may be in use).

    Raises:
        PassthroughError: ``count`` is negative or over ``sriov_totalvfs``, a VF to
            remove is bound to vfio-pci (a guest may be using it), or the kernel
            refused; each says what to do.
    """
    info = sriov_pf(pf, root)
    if count < 0 or count > info.total_vfs:
        raise PassthroughError(
            f"{pf} supports at most {info.total_vfs} VFs (sriov_totalvfs); "
            f"asked for {count}: use 0 to {info.total_vfs}",
            address=pf,
        )
    if count == info.num_vfs:
        return info
    if info.num_vfs:
        busy = [vf for vf in info.vfs if current_driver(vf, root) == VFIO_DRIVER]
        if busy:
            raise PassthroughError(
                f"cannot change the VF count of {pf}: its VFs {', '.join(busy)} are bound to "
                "vfio-pci (a guest may be using them); stop those VMs first",
                address=pf,
            )
    numvfs = pci_device_dir(pf, root) / "sriov_numvfs"
    steps = [0, count] if info.num_vfs and count else [count]
    for n in steps:
        _log.info("%s: sriov_numvfs <- %d", pf, n)
        try:
            io.write(numvfs, str(n))
        except OSError as exc:
            raise PassthroughError(
                f"the kernel refused {n} VFs on {pf} ({exc.strerror or exc}); check `dmesg`: "
                "SR-IOV may be off in the firmware, or the PF driver does not support it",
                address=pf,
            ) from exc
    after = sriov_pf(pf, root)
    if after.num_vfs != count or len(after.vfs) != count:
        raise PassthroughError(
            f"{pf} has {after.num_vfs} VFs ({len(after.vfs)} listed) after asking for {count}; "
            "check `dmesg`",
            address=pf,
        )
    return after


def vf_index(pf: str, vf: str, root: Path = Path("/")) -> int:
    """The index of VF ``vf`` on ``pf`` (the ``n`` in ``virtfn<n>``, and in ``ip link ... vf n``).

    Raises:
        PassthroughError: ``vf`` is not a VF of ``pf``.
    """
    vfs = sriov_pf(pf, root).vfs
    if vf not in vfs:
        raise PassthroughError(f"{vf} is not a VF of {pf} (its VFs: {', '.join(vfs) or 'none'})")
    return vfs.index(vf)


def pick_free_vf(pf: str, claims: ClaimStore, root: Path = Path("/")) -> str:
    """A VF of ``pf`` that no running VM holds, preferring ones not in host use.

    A VF with no driver or already on vfio-pci comes before one bound to a host
    VF driver (iavf, ixgbevf, mlx5_core, ...), which host networking may be using.

    Raises:
        PassthroughError: every VF is taken (or there are none); says how to get more.
    """
    info = sriov_pf(pf, root)
    if not info.vfs:
        raise PassthroughError(
            f"{pf} has no VFs; create some first, e.g. "
            f"`echo 4 > /sys/bus/pci/devices/{pf}/sriov_numvfs` (at most {info.total_vfs})",
            address=pf,
        )
    held = claims.holders()
    free = [vf for vf in info.vfs if vf not in held]
    if not free:
        raise PassthroughError(
            f"all {len(info.vfs)} VFs of {pf} are in use by VMs "
            f"({', '.join(sorted(set(held[v] for v in info.vfs)))}); stop one, or create more "
            f"VFs (up to {info.total_vfs})",
            address=pf,
        )
    free.sort(key=lambda vf: current_driver(vf, root) not in (None, VFIO_DRIVER))
    return free[0]


@dataclass(frozen=True, slots=True)
class VFLink:
    """Settings of one VF as the PF's driver applies them (``ip link set PF vf N ...``)."""

    mac: str | None = None
    vlan: int | None = None
    qos: int | None = None
    spoofchk: bool | None = None
    trust: bool | None = None

    def __post_init__(self) -> None:
        if self.mac is not None and not _MAC_RE.match(self.mac):
            raise PassthroughError(f"{self.mac!r} is not a MAC address like 52:54:00:12:34:56")
        if self.vlan is not None and not 0 <= self.vlan <= 4095:
            raise PassthroughError(f"VLAN {self.vlan} is out of range; use 0 (none) to 4095")
        if self.qos is not None and (self.vlan is None or not 0 <= self.qos <= 7):
            raise PassthroughError("qos needs a vlan and is a priority from 0 to 7")


def vf_link_commands(pf: str, vf: str, link: VFLink, root: Path = Path("/")) -> list[list[str]]:
    """The ``ip link`` commands (argv lists) that apply ``link`` to VF ``vf`` of ``pf``.

    They act on the PF's network interface, so the PF must have one (its driver
    must be a network driver with the interface up in the host).

    Raises:
        PassthroughError: ``vf`` is no VF of ``pf``, or the PF has no network interface.
    """
    index = vf_index(pf, vf, root)
    netdevs = sriov_pf(pf, root).netdevs
    if not netdevs:
        raise PassthroughError(
            f"{pf} has no network interface in the host, so its VF settings cannot be set "
            "with `ip link`; bind the PF to its network driver",
            address=pf,
        )
    base = ["ip", "link", "set", "dev", netdevs[0], "vf", str(index)]
    cmds: list[list[str]] = []
    if link.mac is not None:
        cmds.append([*base, "mac", link.mac.lower()])
    if link.vlan is not None:
        vlan = [*base, "vlan", str(link.vlan)]
        if link.qos is not None:
            vlan += ["qos", str(link.qos)]
        cmds.append(vlan)
    if link.spoofchk is not None:
        cmds.append([*base, "spoofchk", "on" if link.spoofchk else "off"])
    if link.trust is not None:
        cmds.append([*base, "trust", "on" if link.trust else "off"])
    _log.debug("VF %s settings: %s", vf, [shlex.join(c) for c in cmds])
    return cmds
