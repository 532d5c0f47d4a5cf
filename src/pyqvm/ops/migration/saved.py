"""A VM's state saved to files (`save`) and a VM started from them (`restore`).

`save` pauses the guest, migrates its state into a file through a file
descriptor handed to QEMU over the QMP socket (``getfd`` + ``migrate fd:``;
QEMU 7.2 has no ``file:`` URI, and ``exec:`` would need to spawn a process,
which pyqvm's seccomp sandbox forbids), and copies each disk overlay next to
it. `restore` starts a new VM from that directory with ``-incoming defer`` +
``migrate-incoming fd:``, each disk through a fresh overlay over the saved one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pyqvm.argv.build import RamFile
from pyqvm.channels.devices import DeviceTable, Plugged
from pyqvm.deadline import Deadline
from pyqvm.errors import MigrationError, PyqvmError
from pyqvm.host.accel import KvmStatus, choose_accelerator, kvm_status
from pyqvm.host.facts import qemu_binary, read_host_facts
from pyqvm.launch.plan import LaunchPlan
from pyqvm.launch.resolve import with_image
from pyqvm.machine import Machine
from pyqvm.ops.hotplug import replug
from pyqvm.ops.migration.common import (
    configure,
    failure_guard,
    kill_unless_stopped,
    refuse_blocked,
)
from pyqvm.ops.migration.incoming import accept
from pyqvm.ops.migration.outgoing import recover_source, run_migration
from pyqvm.ops.migration.portable import PORTABLE, check_portable, make_portable
from pyqvm.ops.migration.qapi import FD_NAME
from pyqvm.ops.migration.types import (
    MANIFEST,
    STATE_FILE,
    Incoming,
    MigrationTuning,
    ProgressCallback,
    SavedState,
)
from pyqvm.spec import Disk, VMSpec
from pyqvm.state import LIVE, VMState

log = logging.getLogger(__name__)


async def save(
    vm: Machine,
    directory: Path | str,
    *,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    timeout: float | None = 600.0,
    tuning: MigrationTuning | None = None,
    portable: bool = False,
) -> SavedState:
    """Save the guest's state (RAM and devices) and its disk overlays into ``directory``.

    The guest is paused while its state is written (so the file holds one
    consistent image, written once). Afterwards the VM is stopped, or runs on
    with ``resume=True``. ``directory`` is created; it must not hold a saved
    state already. Restore with `restore` (with the same ``tuning``
    capabilities: a template saves with ``x-ignore-shared``, leaving its RAM
    in its memory file). ``portable``: the directory also carries every file the VM
    needs, for a restore on another machine (`pyqvm.ops.migration.portable`).
    """
    tuning = tuning or MigrationTuning()
    vm.require(*LIVE, what="saving")
    refuse_blocked(vm, "save")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists() or (out / STATE_FILE).exists():
        raise MigrationError(f"'{out}' already holds a saved VM; use a new directory")
    was_running = vm.state is VMState.RUNNING
    overlays = vm.overlays()  # hot-plugged disks' too
    devices = vm.devices.snapshot()
    disks = sorted(d for d in overlays if d not in devices)
    written = [out / STATE_FILE, out / MANIFEST, *(out / f"{d}.qcow2" for d in overlays)]

    async def undo() -> dict[str, Any]:
        last = await recover_source(vm)
        if not was_running:
            with contextlib.suppress(PyqvmError):
                await vm.execute("stop")
            vm.move(VMState.PAUSED)
        for p in written:
            p.unlink(missing_ok=True)
        return last

    t0 = time.monotonic()
    if was_running:
        await vm.execute("stop")
    vm.move(VMState.MIGRATING)
    async with failure_guard(f"{vm.name}: saving to '{out}' failed", undo):
        fd = os.open(out / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await vm.qmp.send_fd(fd, FD_NAME)
        finally:
            os.close(fd)
        await configure(vm, tuning, "source")
        await run_migration(vm, f"fd:{FD_NAME}", tuning, progress, Deadline(timeout), t0)
        # The source's disks are flushed and inactive now: their overlays are stable.
        for disk_id, path in overlays.items():
            shutil.copyfile(path, out / f"{disk_id}.qcow2")
        manifest = {
            "name": vm.name,
            "accelerator": vm.accelerator,
            "disks": disks,
            "memory_mib": vm.spec.memory,
            # Restored before the state is loaded, as a migration destination gets them.
            "devices": vm.devices.to_json(),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if portable:
            await make_portable(vm, out, {d: out / f"{d}.qcow2" for d in overlays})
    size = (out / STATE_FILE).stat().st_size
    log.info("%s: saved to %s (%d MiB) in %.2f s", vm.name, out, size >> 20, time.monotonic() - t0)
    if resume:
        await vm.execute("cont")  # re-activates the disks too
        vm.move(VMState.RUNNING if was_running else VMState.PAUSED)
        if not was_running:
            await vm.execute("stop")
    else:
        await vm.stop()
    return SavedState(directory=out, disks=tuple(disks), size=size)


def check_accelerator(saved: str | None, spec: VMSpec, kvm: KvmStatus | None = None) -> None:
    """`MigrationError` unless ``spec`` runs here under ``saved``, the accelerator a state
    was saved under (None: not recorded, not checked). ``kvm``: this host's, probed if None.

    The state holds what the accelerator shaped (the CPU model's features, a TCG guest's
    padded RAM), so it loads only under the same one.
    """
    if saved is None:
        return
    status = kvm or kvm_status()
    here = choose_accelerator(spec.accelerator, status)
    if here != saved:
        raise MigrationError(
            f"the state was saved under {saved} and would load under {here} here "
            f"(accelerator {spec.accelerator!r}; KVM: {status.reason}); it loads only under "
            f"the accelerator it was saved under"
        )


def _manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise MigrationError(f"'{directory}' holds no saved VM: {e}") from None
    return manifest


def restored_spec(spec: VMSpec, saved: Path | str, *, image_cache: Path | None = None) -> VMSpec:
    """``spec`` with each saved disk opened through a fresh overlay over its saved overlay."""
    directory = Path(saved)
    manifest = _manifest(directory)
    concrete = with_image(spec, image_cache)
    saved_disks = set(manifest.get("disks", ()))
    missing = saved_disks - {d.id for d in concrete.disks}
    if missing:
        raise MigrationError(
            f"'{directory}' was saved from a VM with disks {sorted(missing)} that this spec lacks"
        )
    disks: list[Disk] = []
    for d in concrete.disks:
        if d.id in saved_disks:
            d = dataclasses.replace(d, path=directory / f"{d.id}.qcow2", format="qcow2")
        disks.append(d)
    return dataclasses.replace(concrete, disks=tuple(disks))


def saved_devices(saved: Path | str) -> dict[str, Plugged]:
    """The hot-plugged devices a save recorded; an ephemeral disk among them opens a fresh
    overlay over its saved one, as the spec's disks do."""
    directory = Path(saved)
    devices = DeviceTable.records_from_json(_manifest(directory).get("devices", {}))
    for device, p in devices.items():
        if p.disk is not None and (directory / f"{device}.qcow2").is_file():
            disk = dataclasses.replace(p.disk, path=directory / f"{device}.qcow2", format="qcow2")
            devices[device] = dataclasses.replace(p, disk=disk)
    return devices


async def restore(
    vm: Machine,
    saved: Path | str,
    *,
    timeout: float | None = 600.0,
    tuning: MigrationTuning | None = None,
    ram: RamFile | None = None,
    console_prefix: bytes = b"",
) -> None:
    """Start ``vm`` (created, not started) from a state `save` wrote into ``saved``.

    ``vm`` must have been built from the spec the state was saved from (its
    hardware must match). Its spec becomes that spec with the saved disks.
    ``tuning`` and ``ram`` are the save's capabilities and the guest RAM's
    file (a clone of a template); ``console_prefix`` starts its console log.
    Returns when the guest runs and its agent answers. On failure ``vm`` is
    removed and `MigrationError` is raised with QEMU's reason.
    """
    tuning = tuning or MigrationTuning()
    directory = Path(saved)
    state_file = directory / STATE_FILE
    if not state_file.is_file():
        raise MigrationError(f"'{directory}' holds no saved VM state ({STATE_FILE} missing)")
    vm.require(VMState.CREATED, what="restoring into it")
    refuse_blocked(vm, "restore")  # restored_spec changes the disks only
    if (directory / PORTABLE).is_file():  # from elsewhere, maybe: its QEMU must be this one
        check_portable(directory, qemu_binary(vm.host or read_host_facts(), vm.spec.arch))
    try:
        check_accelerator(
            _manifest(directory).get("accelerator"), vm.spec, vm.host.kvm if vm.host else None
        )
    except MigrationError as e:
        raise MigrationError(f"{vm.name}: cannot restore from '{directory}': {e}") from None
    spec = restored_spec(vm.spec, directory, image_cache=vm.image_cache)
    devices = saved_devices(directory)
    t0 = time.monotonic()
    await vm.start_incoming(LaunchPlan(spec=spec, ram=ram, console_prefix=console_prefix))
    incoming = Incoming(uri=f"fd:{FD_NAME}", storage="shared")
    async with failure_guard(
        f"{vm.name}: restoring from '{directory}' failed",
        lambda: kill_unless_stopped(vm),
        tail_of=vm,
        prefix_all=True,
    ):
        await configure(vm, tuning, "destination")
        await replug(vm, devices)
        fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await vm.qmp.send_fd(fd, FD_NAME)
        finally:
            os.close(fd)
        await vm.execute("migrate-incoming", {"uri": incoming.uri})
        await accept(vm, incoming, timeout=timeout)
    log.info("%s: restored from %s in %.2f s", vm.name, directory, time.monotonic() - t0)


__all__ = ["check_accelerator", "restore", "restored_spec", "save", "saved_devices"]
