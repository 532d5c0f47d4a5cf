"""Live migration between two launcher instances, and a VM's state saved to / restored from files.

Same host, one call (`AsyncVM.migrate` is the same thing)::

    dst = AsyncVM(src.spec)
    stats = await src.migrate(dst, transport="unix", storage="shared")

Two processes or two hosts: the destination side calls `listen` (it starts the
VM with ``-incoming defer`` and says where to connect), hands ``incoming.uri``
(and ``incoming.nbd`` for copied storage) to the source side, which calls
`send`; then the destination calls `accept`::

    incoming = await dst.listen(transport="tcp", address="0.0.0.0:4444", storage="copied")
    # ... on the source host:  await src.send(uri, nbd=nbd, storage="copied")
    await dst.accept(incoming)

The steps, in the order libvirt uses:

1. destination: QEMU with ``-incoming defer``; ``stop`` (autostart off, so the
   guest runs there only once the source is known to be done); the same
   migration capabilities as the source; for copied storage an NBD server
   exporting its fresh disks; ``migrate-incoming``.
2. source: capabilities and parameters (`MigrationTuning`); for copied storage
   a ``blockdev-mirror`` of every writable disk into the destination's export,
   until ``ready``; ``migrate``.
3. copied storage: at ``pre-switchover`` (the guest is paused now) the mirrors
   are ended with ``block-job-cancel`` (on a ready mirror: a complete copy, no
   pivot), then ``migrate-continue`` sends the device state.
4. the source reports ``completed`` → the destination ``cont``s, its guest agent
   answers → the source QEMU quits.

Failure rule: if the destination dies or the link breaks before step 4 ends,
the source keeps (or goes back to) running its guest, the half-started
destination is killed and removed, and `MigrationError` is raised. Cancelling
the awaiting task cancels the migration the same way. Postcopy is the one
exception: once the guest runs on the destination, the source no longer holds
all of its memory (see docs/migration.md).

The package, one module a concern (each function takes machines: `pyqvm.machine.Machine`):

- `types`: `MigrationTuning` and `MigrationTLS` in; `MigrationProgress`, `MigrationStats`,
  `Incoming`, `SavedState` out;
- `qapi`: pure helpers between those and QEMU's QAPI (no I/O: unit-tested without QEMU);
- `common`: what both sides do, and `failure_guard`, the one error boundary;
- `incoming`: the destination (`listen`, `accept`); `outgoing`: the source (`send`);
- `local`: both sides in one process (`migrate`); `saved`: `save` / `restore` with files.
"""

from pyqvm.ops.migration.common import migration_blocker
from pyqvm.ops.migration.incoming import accept, listen
from pyqvm.ops.migration.local import add_forwards, migrate
from pyqvm.ops.migration.outgoing import send
from pyqvm.ops.migration.saved import (
    check_accelerator,
    restore,
    restored_spec,
    save,
    saved_devices,
)
from pyqvm.ops.migration.types import (
    QEMU_DEFAULT_BANDWIDTH,
    QEMU_DEFAULT_DOWNTIME_MS,
    UNLIMITED_BANDWIDTH,
    Incoming,
    MigrationProgress,
    MigrationStats,
    MigrationTLS,
    MigrationTuning,
    ProgressCallback,
    SavedState,
    Storage,
    Transport,
)

__all__ = [
    "QEMU_DEFAULT_BANDWIDTH",
    "QEMU_DEFAULT_DOWNTIME_MS",
    "UNLIMITED_BANDWIDTH",
    "Incoming",
    "MigrationProgress",
    "MigrationStats",
    "MigrationTLS",
    "MigrationTuning",
    "ProgressCallback",
    "SavedState",
    "Storage",
    "Transport",
    "accept",
    "add_forwards",
    "check_accelerator",
    "listen",
    "migrate",
    "migration_blocker",
    "restore",
    "restored_spec",
    "save",
    "saved_devices",
    "send",
]
