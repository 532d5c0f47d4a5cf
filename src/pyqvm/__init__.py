"""pyqvm: a pure-Python QEMU/KVM launcher that speaks QMP directly.

Public API (everything a user handles is importable from here)::

    VMSpec (+ Disk, Network, PortForward, KernelBoot, HostDevice, Share), load_spec: describe a VM
    AsyncVM (asyncio) / VM (blocking): run it; VMState: where it is
    ExecResult: a guest command's outcome (like subprocess.CompletedProcess)
    SnapshotInfo, ChainLink: internal and external snapshots
    Plugged: a hot-plugged device, as it travels to a migration destination
    MigrationTuning, MigrationProgress, MigrationStats, Incoming, SavedState: migration
    Template, templates (create/load/list/remove): a frozen, ready guest;
    AsyncVM.from_template(t) clones it; AsyncPool / Pool keep clones warm for acquire()
    attach(name) / NamedVM, attach_async(name) / AsyncNamedVM, up(spec, name=...): VMs that
    live in an owner process of their own (``pyqvm up``) and are driven from anywhere
    Machine, LaunchPlan: one launch's resources, for code that builds operations
    PyqvmError and its subclasses: every error pyqvm raises
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names are imported on first use (PEP 562), so that `pyqvm.cli` (whose import runs
# this file first) starts in a fraction of the time the whole API takes to import.
# The block below is the same table for type checkers; tests/unit/test_layers.py
# keeps the two equal.
_LAZY: dict[str, tuple[str, str | None]] = {  # name -> (module, attribute; None: the module)
    "AsyncNamedVM": ("pyqvm.faces.derived_named", "AsyncNamedVM"),
    "AsyncPool": ("pyqvm.pool", "AsyncPool"),
    "AsyncVM": ("pyqvm.vm", "AsyncVM"),
    "attach": ("pyqvm.faces.derived_named", "attach"),
    "attach_async": ("pyqvm.faces.derived_named", "attach_async"),
    "ChainLink": ("pyqvm.ops.blockjobs", "ChainLink"),
    "CodecError": ("pyqvm.errors", "CodecError"),
    "DeviceClaimedError": ("pyqvm.errors", "DeviceClaimedError"),
    "Disk": ("pyqvm.spec", "Disk"),
    "ExecResult": ("pyqvm.channels.agent", "ExecResult"),
    "GroupNotViableError": ("pyqvm.errors", "GroupNotViableError"),
    "GuestAgent": ("pyqvm.channels.agent", "GuestAgent"),
    "GuestCommandError": ("pyqvm.errors", "GuestCommandError"),
    "GuestError": ("pyqvm.errors", "GuestError"),
    "GuestExecError": ("pyqvm.errors", "GuestExecError"),
    "GuestPausedError": ("pyqvm.errors", "GuestPausedError"),
    "HostDevice": ("pyqvm.spec", "HostDevice"),
    "HostError": ("pyqvm.errors", "HostError"),
    "HotplugError": ("pyqvm.errors", "HotplugError"),
    "ImageError": ("pyqvm.errors", "ImageError"),
    "Incoming": ("pyqvm.ops.migration", "Incoming"),
    "JobError": ("pyqvm.errors", "JobError"),
    "KernelBoot": ("pyqvm.spec", "KernelBoot"),
    "LaunchError": ("pyqvm.errors", "LaunchError"),
    "LaunchPlan": ("pyqvm.launch.plan", "LaunchPlan"),
    "load_spec": ("pyqvm.spec.io", "load_spec"),
    "Machine": ("pyqvm.machine", "Machine"),
    "MigrationError": ("pyqvm.errors", "MigrationError"),
    "MigrationProgress": ("pyqvm.ops.migration", "MigrationProgress"),
    "MigrationStats": ("pyqvm.ops.migration", "MigrationStats"),
    "MigrationTLS": ("pyqvm.ops.migration", "MigrationTLS"),
    "MigrationTuning": ("pyqvm.ops.migration", "MigrationTuning"),
    "NamedVM": ("pyqvm.faces.derived_named", "NamedVM"),
    "NamedVMError": ("pyqvm.errors", "NamedVMError"),
    "Network": ("pyqvm.spec", "Network"),
    "OperationError": ("pyqvm.errors", "OperationError"),
    "PassthroughError": ("pyqvm.errors", "PassthroughError"),
    "Plugged": ("pyqvm.channels.devices", "Plugged"),
    "Pool": ("pyqvm.pool", "Pool"),
    "PoolError": ("pyqvm.errors", "PoolError"),
    "PortForward": ("pyqvm.spec", "PortForward"),
    "Share": ("pyqvm.spec.shares", "Share"),
    "preview_argv": ("pyqvm.launch.plan", "preview_argv"),
    "PyqvmError": ("pyqvm.errors", "PyqvmError"),
    "PyqvmTimeoutError": ("pyqvm.errors", "PyqvmTimeoutError"),
    "QMPCommandError": ("pyqvm.errors", "QMPCommandError"),
    "QMPSession": ("pyqvm.channels.qmp", "QMPSession"),
    "SavedState": ("pyqvm.ops.migration", "SavedState"),
    "SnapshotError": ("pyqvm.errors", "SnapshotError"),
    "SnapshotInfo": ("pyqvm.ops.snapshot", "SnapshotInfo"),
    "SpecError": ("pyqvm.errors", "SpecError"),
    "Template": ("pyqvm.ops.template", "Template"),
    "TemplateError": ("pyqvm.errors", "TemplateError"),
    "templates": ("pyqvm.ops.template", None),
    "UnplugTimeoutError": ("pyqvm.errors", "UnplugTimeoutError"),
    "up": ("pyqvm.faces.derived_named", "up"),
    "VM": ("pyqvm.faces.derived_vm", "VM"),
    "VMExitedError": ("pyqvm.errors", "VMExitedError"),
    "VMSpec": ("pyqvm.spec", "VMSpec"),
    "VMState": ("pyqvm.state", "VMState"),
    "VMStateError": ("pyqvm.errors", "VMStateError"),
}

if TYPE_CHECKING:
    from pyqvm.channels.agent import ExecResult, GuestAgent
    from pyqvm.channels.devices import Plugged
    from pyqvm.channels.qmp import QMPSession
    from pyqvm.errors import (
        CodecError,
        DeviceClaimedError,
        GroupNotViableError,
        GuestCommandError,
        GuestError,
        GuestExecError,
        GuestPausedError,
        HostError,
        HotplugError,
        ImageError,
        JobError,
        LaunchError,
        MigrationError,
        NamedVMError,
        OperationError,
        PassthroughError,
        PoolError,
        PyqvmError,
        PyqvmTimeoutError,
        QMPCommandError,
        SnapshotError,
        SpecError,
        TemplateError,
        UnplugTimeoutError,
        VMExitedError,
        VMStateError,
    )
    from pyqvm.faces.derived_named import AsyncNamedVM, NamedVM, attach, attach_async, up
    from pyqvm.faces.derived_vm import VM
    from pyqvm.launch.plan import LaunchPlan, preview_argv
    from pyqvm.machine import Machine
    from pyqvm.ops import template as templates
    from pyqvm.ops.blockjobs import ChainLink
    from pyqvm.ops.migration import (
        Incoming,
        MigrationProgress,
        MigrationStats,
        MigrationTLS,
        MigrationTuning,
        SavedState,
    )
    from pyqvm.ops.snapshot import SnapshotInfo
    from pyqvm.ops.template import Template
    from pyqvm.pool import AsyncPool, Pool
    from pyqvm.spec import Disk, HostDevice, KernelBoot, Network, PortForward, VMSpec
    from pyqvm.spec.io import load_spec
    from pyqvm.spec.shares import Share
    from pyqvm.state import VMState
    from pyqvm.vm import AsyncVM


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'pyqvm' has no attribute {name!r}") from None
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "VM",
    "AsyncNamedVM",
    "AsyncPool",
    "AsyncVM",
    "ChainLink",
    "CodecError",
    "DeviceClaimedError",
    "Disk",
    "ExecResult",
    "GroupNotViableError",
    "GuestAgent",
    "GuestCommandError",
    "GuestError",
    "GuestExecError",
    "GuestPausedError",
    "HostDevice",
    "HostError",
    "HotplugError",
    "ImageError",
    "Incoming",
    "JobError",
    "KernelBoot",
    "LaunchError",
    "LaunchPlan",
    "Machine",
    "MigrationError",
    "MigrationProgress",
    "MigrationStats",
    "MigrationTLS",
    "MigrationTuning",
    "NamedVM",
    "NamedVMError",
    "Network",
    "OperationError",
    "PassthroughError",
    "Plugged",
    "Pool",
    "PoolError",
    "PortForward",
    "PyqvmError",
    "PyqvmTimeoutError",
    "QMPCommandError",
    "QMPSession",
    "SavedState",
    "Share",
    "SnapshotError",
    "SnapshotInfo",
    "SpecError",
    "Template",
    "TemplateError",
    "UnplugTimeoutError",
    "VMExitedError",
    "VMSpec",
    "VMState",
    "VMStateError",
    "attach",
    "attach_async",
    "load_spec",
    "preview_argv",
    "templates",
    "up",
]
