"""Host devices for one VM: what libvirt calls *managed* hostdevs, without libvirt.

`assign` runs before QEMU starts: it checks the host (IOMMU on, vfio-pci loaded,
memlock), claims every device for the VM (a device goes to one VM at a time),
checks each IOMMU group is viable, moves managed devices from their host driver
to vfio-pci and checks ``/dev/vfio/<group>``. Anything failing undoes what was
done, so no device is left half-assigned. `Passthrough.release` (after QEMU
exits, however it exits) gives every device back to its driver and drops the
claims. If pyqvm itself is killed, the claims record enough for `recover` (run
by the next process that claims the device, or by ``pyqvm doctor --fix``)::

    pt = assign(spec)          # raises HostError / PassthroughError before QEMU runs
    try:
        ...                    # QEMU runs with -device vfio-pci,host=...
    finally:
        pt.release()
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pyqvm.errors import PassthroughError, PyqvmError
from pyqvm.host.claims import Claim, ClaimStore
from pyqvm.host.pci import SysfsIO, current_driver, pci_device_dir
from pyqvm.host.vfio import (
    VFIO_DRIVER,
    MemlockStatus,
    bind_to_vfio,
    check_group_viable,
    check_memlock,
    check_vfio_dev,
    check_vfio_host,
    memlock_status,
    restore_driver,
)
from pyqvm.spec import HostDevice, VMSpec

__all__ = [
    "Passthrough",
    "PassthroughHost",
    "Recovered",
    "assign",
    "migration_blocker",
    "recover",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PassthroughHost:
    """Where and how passthrough touches the host.

    ``root`` is the filesystem root sysfs and /dev are read under (tests use a fake
    tree), ``io`` writes sysfs attributes, ``claims`` is the host-wide claims
    store, ``memlock`` the locked-memory status (None: read this process's).
    """

    root: Path = Path("/")
    io: SysfsIO = field(default_factory=SysfsIO)
    claims: ClaimStore = field(default_factory=ClaimStore)
    memlock: MemlockStatus | None = None


@dataclass(slots=True)
class _Device:
    spec: HostDevice
    claim: Claim
    group: int = -1
    original_driver: str | None = None
    bound: bool = False  # we changed its binding (so release must give it back)


class Passthrough:
    """The host devices one VM holds; `release` gives them back. Idempotent."""

    def __init__(self, vm: str, host: PassthroughHost) -> None:
        self.vm = vm
        self.host = host
        self._devices: list[_Device] = []

    @property
    def addresses(self) -> list[str]:
        return [d.spec.address for d in self._devices]

    @property
    def groups(self) -> dict[str, int]:
        """Host address -> IOMMU group."""
        return {d.spec.address: d.group for d in self._devices}

    def original_driver(self, address: str) -> str | None:
        """The driver ``address`` had before this VM took it."""
        for d in self._devices:
            if d.spec.address == address:
                return d.original_driver
        raise KeyError(address)

    def release(self) -> list[str]:
        """Give every device back to its original driver and drop the claims.

        Never raises: a device that cannot be given back keeps its claim record
        (so ``pyqvm doctor --fix`` can retry once this process is gone) and the
        problem is logged and returned.
        """
        problems: list[str] = []
        while self._devices:
            d = self._devices.pop()
            if d.bound:
                try:
                    restore_driver(d.spec.address, d.original_driver, self.host.io, self.host.root)
                except PyqvmError as e:
                    log.error("%s: %s", self.vm, e)
                    problems.append(str(e))
                    continue  # keep the claim: it says what to restore
            d.claim.release()
        return problems

    def __repr__(self) -> str:
        return f"Passthrough(vm={self.vm!r}, devices={self.addresses})"


def _restore_stale(d: _Device, host: PassthroughHost) -> None:
    """A dead VM left this device on vfio-pci: give it back before we take it."""
    stale = d.claim.stale
    if stale is None or not (stale.managed and stale.bound):
        return
    log.warning(
        "%s: VM %r (pyqvm process %d) died holding it; giving it back to %s first",
        d.claim.address,
        stale.vm,
        stale.pid,
        stale.original_driver or "no driver",
    )
    # Carry the dead owner's record over, so a failure here leaves it for a retry.
    d.original_driver, d.bound = stale.original_driver, True
    d.claim.update(original_driver=stale.original_driver, bound=True)
    restore_driver(d.claim.address, stale.original_driver, host.io, host.root)
    d.bound = False
    d.claim.update(bound=False)


def _unmanaged_check(address: str, root: Path) -> None:
    now = current_driver(address, root)
    if now != VFIO_DRIVER:
        raise PassthroughError(
            f"host device {address} is bound to {now or 'no driver'}, not vfio-pci, and it "
            f"is unmanaged (managed = false), so pyqvm does not rebind it; bind it yourself "
            f"(e.g. `driverctl set-override {address} vfio-pci`) or set managed = true",
            address=address,
        )


def assign(spec: VMSpec, host: PassthroughHost | None = None) -> Passthrough:
    """Claim and prepare every host device of ``spec`` for vfio-pci.

    Raises (before QEMU starts; nothing is left changed when it does):
        HostError: the IOMMU is off, vfio-pci is not loaded, memlock is too low,
            a device does not exist, or ``/dev/vfio/<group>`` is missing.
        DeviceClaimedError: another VM holds a device (names it).
        GroupNotViableError: an IOMMU group member blocks (names it and its driver).
        PassthroughError: binding failed, or an unmanaged device is not on vfio-pci.
    """
    host = host or PassthroughHost()
    pt = Passthrough(spec.name, host)
    if not spec.host_devices:
        return pt
    root = host.root
    check_vfio_host(root)
    assert isinstance(spec.memory, int)
    check_memlock(spec.memory, host.memlock or memlock_status())
    for h in spec.host_devices:
        pci_device_dir(h.address, root)

    addresses = [h.address for h in spec.host_devices]
    try:
        for h in spec.host_devices:
            claim = host.claims.claim(h.address, spec.name, managed=h.managed)
            pt._devices.append(_Device(spec=h, claim=claim))
            _restore_stale(pt._devices[-1], host)
        holders = host.claims.holders()
        for d in pt._devices:
            d.group = check_group_viable(d.spec.address, root, assigning=addresses, holders=holders)
            if not d.spec.managed:
                _unmanaged_check(d.spec.address, root)
        for d in pt._devices:
            if not d.spec.managed:
                continue
            d.original_driver = current_driver(d.spec.address, root)
            if d.original_driver == VFIO_DRIVER:
                continue
            # Record first: if we die mid-bind, the next process knows what to restore.
            d.claim.update(original_driver=d.original_driver, bound=True)
            d.bound = True
            bind_to_vfio(d.spec.address, host.io, root)
        for group in sorted({d.group for d in pt._devices}):
            check_vfio_dev(group, root)
    except BaseException as e:
        problems = pt.release()
        for p in problems:
            e.add_note(f"while undoing: {p}")
        raise
    log.info(
        "%s: host devices ready for vfio-pci: %s",
        spec.name,
        ", ".join(f"{d.spec.address} (group {d.group})" for d in pt._devices),
    )
    return pt


@dataclass(frozen=True, slots=True)
class Recovered:
    """One stale claim `recover` handled: which device, whose it was, what happened."""

    address: str
    vm: str
    pid: int
    restored_to: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def recover(host: PassthroughHost | None = None) -> list[Recovered]:
    """Give back the devices of VMs whose pyqvm process died, and drop their claims.

    A claim whose owner still runs is left alone. Returns what was done.
    """
    host = host or PassthroughHost()
    done: list[Recovered] = []
    for rec in host.claims.stale():
        claim = host.claims.take_over(rec, "pyqvm-recover")
        if claim is None:
            continue
        error = None
        try:
            if rec.managed and rec.bound:
                restore_driver(rec.address, rec.original_driver, host.io, host.root)
        except PyqvmError as e:
            error = str(e)
            log.error("recovering %s: %s", rec.address, e)
            # Keep a record for a later retry, owned by nobody alive.
            claim.update(pid=0, start_time=None)
        else:
            claim.release()
        done.append(
            Recovered(
                address=rec.address,
                vm=rec.vm,
                pid=rec.pid,
                restored_to=rec.original_driver if rec.bound else None,
                error=error,
            )
        )
    return done


def migration_blocker(spec: VMSpec) -> str | None:
    """Why ``spec``'s VM cannot be snapshotted or migrated, or None if passthrough is no reason.

    QEMU refuses both for vfio-pci devices: their state lives in the hardware.
    """
    if not spec.host_devices:
        return None
    return _blocker_text(spec.name, (h.address for h in spec.host_devices))


def _blocker_text(name: str, addresses: Iterable[str]) -> str:
    return (
        f"VM {name!r} has passthrough host devices ({', '.join(addresses)}): QEMU cannot "
        "snapshot or migrate a VM with vfio-pci devices, whose state lives in the hardware; "
        "hot-unplug them first, or use a VM without host_devices"
    )
