"""VFIO facts and actions: IOMMU groups, group viability, binding a device to vfio-pci
and giving it back, the ``vfio_pci`` module, ``/dev/vfio/<group>``, the memlock limit.

Everything reads under ``root`` (``/`` by default) and writes through a `SysfsIO`,
so tests run it against fake trees whose fake writer models the kernel.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from pyqvm.errors import GroupNotViableError, HostError, PassthroughError
from pyqvm.host.pci import (
    SysfsIO,
    current_driver,
    pci_device,
    pci_device_dir,
    pci_driver_dir,
)

__all__ = [
    "VFIO_DRIVER",
    "IommuStatus",
    "MemlockStatus",
    "bind_to_vfio",
    "check_group_viable",
    "check_memlock",
    "check_vfio_dev",
    "check_vfio_host",
    "cpu_vendor",
    "group_members",
    "iommu_group",
    "iommu_groups",
    "iommu_status",
    "kernel_cmdline",
    "memlock_status",
    "restore_driver",
    "vfio_dev",
    "vfio_pci_loaded",
]

_log = logging.getLogger(__name__)

VFIO_DRIVER = "vfio-pci"
#: Drivers an IOMMU group member may have without blocking the group (the kernel
#: treats pci-stub like no driver; vfio-pci is what we want).
_HARMLESS_DRIVERS = frozenset({VFIO_DRIVER, "pci-stub"})
#: Bridges in a group are not endpoints; vfio lets them keep pcieport/shpchp.
_BRIDGE_DRIVERS = frozenset({"pcieport", "shpchp"})
#: VFIO pins all guest RAM; like libvirt, allow 1 GiB above it for ROMs and MMIO.
MEMLOCK_MARGIN_MIB = 1024
_CAP_IPC_LOCK = 14

_GRUB = "(Debian: add it to GRUB_CMDLINE_LINUX in /etc/default/grub, run update-grub, reboot)"


# --- the kernel command line and the CPU ---------------------------------------------------


def kernel_cmdline(root: Path = Path("/")) -> str:
    """``/proc/cmdline`` ('' if unreadable)."""
    try:
        return (root / "proc/cmdline").read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def cpu_vendor(root: Path = Path("/")) -> str | None:
    """``intel``, ``amd`` or None, from ``vendor_id`` in /proc/cpuinfo."""
    try:
        text = (root / "proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "vendor_id":
            v = value.strip()
            return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(v)
    return None


def _iommu_params(cmdline: str) -> list[str]:
    return [
        w for w in cmdline.split() if w.split("=", 1)[0] in ("intel_iommu", "amd_iommu", "iommu")
    ]


@dataclass(frozen=True, slots=True)
class IommuStatus:
    """Whether the IOMMU is on (IOMMU groups exist), with the reason and the fix."""

    enabled: bool
    groups: int
    cmdline_params: tuple[str, ...]
    reason: str
    fix: str


def iommu_fix(root: Path = Path("/")) -> str:
    """What to do to turn the IOMMU on, for this CPU's vendor."""
    vendor = cpu_vendor(root)
    if vendor == "amd":
        return (
            "enable the IOMMU (AMD-Vi) in the BIOS/EFI setup; if groups still do not "
            f"appear add amd_iommu=on iommu=pt to the kernel command line {_GRUB}"
        )
    if vendor == "intel":
        return (
            "enable VT-d in the BIOS/EFI setup and add intel_iommu=on iommu=pt to the "
            f"kernel command line {_GRUB}"
        )
    return (
        "enable the IOMMU (Intel VT-d / AMD-Vi) in the BIOS/EFI setup and add "
        f"intel_iommu=on (Intel) or amd_iommu=on (AMD) to the kernel command line {_GRUB}"
    )


def iommu_groups(root: Path = Path("/")) -> dict[int, list[str]]:
    """IOMMU group number -> member PCI addresses (empty when the IOMMU is off)."""
    base = root / "sys/kernel/iommu_groups"
    out: dict[int, list[str]] = {}
    try:
        entries = list(base.iterdir())
    except OSError:
        return out
    for g in entries:
        if g.name.isdigit():
            try:
                out[int(g.name)] = sorted(p.name for p in (g / "devices").iterdir())
            except OSError:
                out[int(g.name)] = []
    return dict(sorted(out.items()))


def iommu_status(root: Path = Path("/")) -> IommuStatus:
    """Is the IOMMU on? Groups in ``/sys/kernel/iommu_groups`` are the proof."""
    groups = iommu_groups(root)
    params = tuple(_iommu_params(kernel_cmdline(root)))
    said = f"kernel parameters: {' '.join(params)}" if params else "no IOMMU kernel parameter"
    if groups:
        return IommuStatus(True, len(groups), params, f"{len(groups)} IOMMU groups ({said})", "")
    if any(p in ("intel_iommu=off", "amd_iommu=off", "iommu=off") for p in params):
        reason = f"no IOMMU groups: the IOMMU is turned off on the kernel command line ({said})"
    elif params:
        reason = (
            f"no IOMMU groups although the kernel was asked for the IOMMU ({said}): "
            "it is off in the firmware, or this machine (or VM) has none"
        )
    else:
        reason = f"no IOMMU groups in /sys/kernel/iommu_groups: the IOMMU is off ({said})"
    return IommuStatus(False, 0, params, reason, iommu_fix(root))


# --- the vfio_pci module and /dev/vfio -----------------------------------------------------


def vfio_pci_loaded(root: Path = Path("/")) -> bool:
    """Whether the vfio-pci driver is registered (module loaded or built in)."""
    return pci_driver_dir(VFIO_DRIVER, root).is_dir() or (root / "sys/module/vfio_pci").is_dir()


def check_vfio_host(root: Path = Path("/")) -> None:
    """The host side of VFIO: IOMMU on, vfio-pci loaded.

    Raises:
        HostError: naming what is missing and how to fix it.
    """
    st = iommu_status(root)
    if not st.enabled:
        raise HostError(f"device passthrough needs the IOMMU: {st.reason}; {st.fix}")
    if not pci_driver_dir(VFIO_DRIVER, root).is_dir():
        raise HostError(
            "device passthrough needs the vfio-pci driver, which is not loaded; load it with "
            "`modprobe vfio-pci` (and at boot: echo vfio-pci > /etc/modules-load.d/vfio-pci.conf)"
        )


def iommu_group(address: str, root: Path = Path("/")) -> int:
    """The IOMMU group of a device.

    Raises:
        HostError: the device does not exist, or has no group (IOMMU off).
    """
    dev = pci_device(address, root)
    if dev.iommu_group is None:
        st = iommu_status(root)
        why = st.reason if not st.enabled else "the device has no iommu_group link"
        raise HostError(
            f"host device {address} is in no IOMMU group ({why}); {st.fix or iommu_fix(root)}"
        )
    return dev.iommu_group


def group_members(group: int, root: Path = Path("/")) -> list[str]:
    """The PCI addresses in IOMMU group ``group``."""
    try:
        return sorted(p.name for p in (root / f"sys/kernel/iommu_groups/{group}/devices").iterdir())
    except OSError:
        return []


def check_group_viable(
    address: str,
    root: Path = Path("/"),
    *,
    assigning: Collection[str] = (),
    holders: Mapping[str, str] | None = None,
) -> int:
    """Check the whole IOMMU group of ``address`` can go to one guest; return the group.

    A group is viable when every endpoint in it is bound to vfio-pci (or pci-stub)
    or to no driver, or is itself being assigned (``assigning``) to the same VM.
    Bridges may keep their port drivers. ``holders`` maps addresses other VMs hold
    to those VMs' names: a group cannot be split across two guests.

    Raises:
        GroupNotViableError: naming the member that blocks the group and its driver.
        HostError: the device is in no group (IOMMU off).
    """
    group = iommu_group(address, root)
    holders = holders or {}
    mine = set(assigning) | {address}
    for member in group_members(group, root):
        if member in holders and member not in mine:
            raise GroupNotViableError(
                address,
                group,
                member,
                f"{VFIO_DRIVER} for VM {holders[member]!r}",
                "a group goes to one guest: stop that VM first",
            )
        if member in mine:
            continue
        dev = pci_device(member, root)
        if dev.driver is None or dev.driver in _HARMLESS_DRIVERS:
            continue
        if dev.is_bridge and dev.driver in _BRIDGE_DRIVERS:
            continue
        raise GroupNotViableError(
            address,
            group,
            member,
            dev.driver,
            f"unbind it (echo {member} > /sys/bus/pci/drivers/{dev.driver}/unbind) "
            "or assign it to this VM too",
        )
    return group


def vfio_dev(group: int, root: Path = Path("/")) -> Path:
    """``/dev/vfio/<group>``, the node QEMU opens for the group."""
    return root / "dev/vfio" / str(group)


def check_vfio_dev(group: int, root: Path = Path("/")) -> Path:
    """``/dev/vfio/<group>`` exists and this process may open it read-write.

    Raises:
        HostError: it is missing or not accessible, saying why.
    """
    node = vfio_dev(group, root)
    if not node.exists():
        raise HostError(
            f"{node} does not exist although the group's devices are bound to vfio-pci; "
            "check `dmesg` for vfio errors (is the vfio_iommu_type1 module loaded?)"
        )
    if not os.access(node, os.R_OK | os.W_OK):
        raise HostError(
            f"{node} is not readable and writable by uid {os.getuid()}; run as root or "
            f"give yourself access (chown $USER {node}, or a udev rule for the vfio group)"
        )
    return node


# --- binding and giving back ---------------------------------------------------------------


def _write(io: SysfsIO, path: Path, value: str, address: str, what: str) -> None:
    try:
        io.write(path, value)
    except OSError as exc:
        hint = (
            "; run pyqvm as root"
            if exc.errno in (errno.EACCES, errno.EPERM)
            else "; see `dmesg` for the kernel's reason"
        )
        raise PassthroughError(
            f"{what} {address} failed: writing {value.strip()!r} to {path}: "
            f"{exc.strerror or exc}{hint}",
            address=address,
        ) from exc


def bind_to_vfio(address: str, io: SysfsIO, root: Path = Path("/")) -> str | None:
    """Move a device from its host driver to vfio-pci; return the driver it had.

    The kernel's way (what libvirt's managed hostdevs do): set ``driver_override``
    to vfio-pci, unbind from the current driver, ask the bus to probe the device.

    Raises:
        PassthroughError: a write was refused or the device did not end up on vfio-pci
            (the caller restores it).
    """
    dev_dir = pci_device_dir(address, root)
    original = current_driver(address, root)
    if original == VFIO_DRIVER:
        _log.info("%s: already bound to vfio-pci", address)
        return original
    _log.info("%s: rebinding from %s to vfio-pci", address, original or "no driver")
    _write(io, dev_dir / "driver_override", VFIO_DRIVER, address, "setting driver_override on")
    if original is not None:
        _write(
            io,
            pci_driver_dir(original, root) / "unbind",
            address,
            address,
            f"unbinding from {original}",
        )
    _write(io, root / "sys/bus/pci/drivers_probe", address, address, "probing")
    now = current_driver(address, root)
    if now != VFIO_DRIVER:
        raise PassthroughError(
            f"host device {address} did not bind to vfio-pci (its driver is now "
            f"{now or 'none'}); check `dmesg` for vfio-pci errors",
            address=address,
        )
    return original


def restore_driver(address: str, original: str | None, io: SysfsIO, root: Path = Path("/")) -> None:
    """Give a device back to the driver it had (``original``; None leaves it unbound).

    Unbinds it from whatever it has now, clears ``driver_override`` and lets the
    bus probe it, which binds its native driver again.

    Raises:
        PassthroughError: it did not end up on ``original`` (the message says how to fix it).
    """
    dev_dir = pci_device_dir(address, root)
    now = current_driver(address, root)
    if original == VFIO_DRIVER:
        return  # it was on vfio-pci before we came: leave it there
    if now is not None and now != original:
        _write(io, pci_driver_dir(now, root) / "unbind", address, address, f"unbinding from {now}")
    _write(io, dev_dir / "driver_override", "\n", address, "clearing driver_override on")
    if original is None or current_driver(address, root) == original:
        _log.info("%s: given back (%s)", address, original or "no driver")
        return
    _write(io, root / "sys/bus/pci/drivers_probe", address, address, "probing")
    if current_driver(address, root) != original and pci_driver_dir(original, root).is_dir():
        _write(io, pci_driver_dir(original, root) / "bind", address, address, "binding")
    now = current_driver(address, root)
    if now != original:
        raise PassthroughError(
            f"host device {address} did not go back to {original} (driver now: "
            f"{now or 'none'}); bind it by hand: "
            f"echo {address} > /sys/bus/pci/drivers/{original}/bind "
            f"(load the module first if /sys/bus/pci/drivers/{original} is missing)",
            address=address,
        )
    _log.info("%s: given back to %s", address, original)


# --- locked memory -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemlockStatus:
    """The locked-memory limit (bytes; None = unlimited) and whether CAP_IPC_LOCK lifts it."""

    limit: int | None
    ipc_lock: bool

    def allows_mib(self, mib: int) -> bool:
        return self.ipc_lock or self.limit is None or self.limit >= mib * 1024 * 1024


def _has_ipc_lock() -> bool:
    try:
        text = Path("/proc/self/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    return False


def memlock_status() -> MemlockStatus:
    """This process's RLIMIT_MEMLOCK (QEMU inherits it) and CAP_IPC_LOCK (always of the
    real host: limits belong to the process, not to a sysfs tree)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return MemlockStatus(
        limit=None if soft == resource.RLIM_INFINITY else soft, ipc_lock=_has_ipc_lock()
    )


def check_memlock(memory_mib: int, status: MemlockStatus) -> None:
    """VFIO pins all guest RAM: the memlock limit must cover it (plus a margin).

    Raises:
        HostError: the limit is too low; says the numbers and how to raise it.
    """
    need = memory_mib + MEMLOCK_MARGIN_MIB
    if status.allows_mib(need):
        return
    assert status.limit is not None
    raise HostError(
        f"the locked-memory limit is {status.limit // (1024 * 1024)} MiB but VFIO pins all "
        f"{memory_mib} MiB of guest RAM (pyqvm asks for {need} MiB with the margin for ROMs "
        "and MMIO); raise it: run as root (CAP_IPC_LOCK), `ulimit -l unlimited` in the shell "
        "that starts pyqvm, or a memlock line in /etc/security/limits.conf"
    )
