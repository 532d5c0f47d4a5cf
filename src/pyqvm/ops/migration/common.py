"""What both sides of a migration do with their machine, and the one failure guard."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from pyqvm.errors import MigrationError, PyqvmError
from pyqvm.launch import passthrough
from pyqvm.launch.overlays import overlay_disks
from pyqvm.launch.virtiofs import share_blocker
from pyqvm.machine import Machine
from pyqvm.ops import block_nodes
from pyqvm.ops.migration.qapi import (
    configure_commands,
    migration_error,
    tls_objects,
    tls_parameters,
)
from pyqvm.ops.migration.types import MigrationTLS, MigrationTuning, Side
from pyqvm.spec import VMSpec
from pyqvm.state import VMState

log = logging.getLogger(__name__)

Cleanup = Callable[[], Awaitable[Mapping[str, Any] | None]]


def network_blocker(spec: VMSpec) -> str | None:
    """Why a VM on a private network cannot move to another QEMU (a snapshot is fine)."""
    names = [n.name for n in spec.networks if n.mode == "private"]
    if not names:
        return None
    return (
        f"VM {spec.name!r} is on private network {names[0]!r}: the guest keeps the address "
        "its NIC leased there, which the new QEMU would not hold; stop the VM instead"
    )


def migration_blocker(spec: VMSpec) -> str | None:
    """Why this VM cannot be migrated, saved or snapshotted (a vfio-pci host device, a
    shared folder), or None."""
    return passthrough.migration_blocker(spec) or share_blocker(spec)


def refuse_blocked(vm: Machine, what: str) -> None:
    """`MigrationError` (before QEMU is asked) if ``vm`` cannot be migrated or saved."""
    reason = migration_blocker(vm.spec) or network_blocker(vm.spec)
    if reason:
        raise MigrationError(f"cannot {what} VM {vm.name!r}: {reason}")


async def configure(
    vm: Machine, tuning: MigrationTuning, side: Side, tls: MigrationTLS | None = None
) -> str | None:
    """Apply ``tuning`` and ``tls`` on one side; returns the TLS credentials' object id
    (for the NBD disk copy), or None without TLS."""
    for command, arguments in configure_commands(tuning, side):
        await vm.execute(command, arguments)
    creds = None
    if tls is not None:
        tls.check(side)
        creds, commands = tls_objects(tls, side, next(_tls_seq))
        for command, arguments in commands:
            await vm.execute(command, arguments)
    # Always set: a TLS attempt that failed must not leave a later plain one encrypted.
    await vm.execute("migrate-set-parameters", tls_parameters(tls, side, creds or ""))
    return creds


_tls_seq = itertools.count(1)  # credentials objects stay in QEMU; each attempt makes its own


async def status(vm: Machine) -> dict[str, Any]:
    """``query-migrate``."""
    info: dict[str, Any] = await vm.execute("query-migrate")
    return info


async def writable_disks(vm: Machine) -> list[tuple[str, str, str]]:
    """(device id, top node, mirror sync mode) of each disk a copy must carry: the writable ones.

    A disk whose top node is still pyqvm's ephemeral overlay has the same base
    on both sides, so only the overlay's own data travels (``top``); any other
    disk is copied whole.
    """
    ephemeral = {d.id for d in overlay_disks(vm.resolved_spec)}
    return [
        (n.device, n.node, "top" if n.node == n.device and n.device in ephemeral else "full")
        for n in await block_nodes(vm)
        if not n.readonly
    ]


async def kill_unless_stopped(vm: Machine) -> None:
    """Remove a half-started or failed destination."""
    if vm.state is not VMState.STOPPED:
        await vm.kill()


@asynccontextmanager
async def failure_guard(
    what: str,
    cleanup: Cleanup,
    *,
    tail_of: Machine | None = None,
    tail_label: str = "",
    suffix: str = "",
    prefix_all: bool = False,
) -> AsyncIterator[None]:
    """The one error boundary of a migration phase.

    On any exception (cancellation too) ``cleanup`` runs to its end, shielded
    from the caller's cancellation (it may return the last ``query-migrate``
    reply, whose status and reason the error then carries). A `PyqvmError`
    is raised again as a `MigrationError`: a `MigrationError` keeps its
    message (``prefix_all`` puts ``what`` before it too), any other says
    ``"{what}: {error}"``; then ``suffix``, and QEMU's stderr tail of
    ``tail_of`` (read before the cleanup removes it), labelled ``tail_label``.
    An `OSError` (the state's directory unwritable, a full disk) is one too, with
    ``what`` before it. Anything else (cancellation, a bug) is re-raised as it is.
    """
    try:
        yield
    except BaseException as e:
        stderr = tail_of.stderr_tail() if tail_of is not None else ""
        last = await asyncio.shield(cleanup())
        if not isinstance(e, (PyqvmError, OSError)):  # an OSError: the host's files
            raise
        mine = isinstance(e, MigrationError) and not prefix_all
        text = str(e) if mine else f"{what}: {e}"
        if stderr and tail_label:
            stderr = f"\n({tail_label}){stderr}"
        raise migration_error(f"{text}{suffix}{stderr}", e, last) from e


__all__ = [
    "configure",
    "failure_guard",
    "kill_unless_stopped",
    "migration_blocker",
    "network_blocker",
    "refuse_blocked",
    "status",
    "writable_disks",
]
