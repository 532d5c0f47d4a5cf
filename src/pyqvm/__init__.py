"""pyqvm: a pure-Python QEMU/KVM launcher that speaks QMP directly.

Public API (everything a user handles is importable from here)::

    VMSpec (+ Disk, Network, PortForward, KernelBoot, HostDevice), load_spec: describe a VM
    AsyncVM (asyncio) / VM (blocking): run it; VMState: where it is
    ExecResult: a guest command's outcome (like subprocess.CompletedProcess)
    SnapshotInfo, ChainLink: internal and external snapshots
    Plugged: a hot-plugged device, as it travels to a migration destination
    MigrationTuning, MigrationProgress, MigrationStats, Incoming, SavedState: migration
    Template, templates (create/load/list/remove): a frozen, ready guest;
    AsyncVM.from_template(t) clones it
    Machine, LaunchPlan: one launch's resources, for code that builds operations
    PyqvmError and its subclasses: every error pyqvm raises
"""

from pyqvm.agent import ExecResult, GuestAgent
from pyqvm.devices import Plugged
from pyqvm.errors import (
    DeviceClaimedError,
    GroupNotViableError,
    GuestCommandError,
    GuestError,
    GuestExecError,
    HostError,
    HotplugError,
    ImageError,
    JobError,
    LaunchError,
    MigrationError,
    OperationError,
    PassthroughError,
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
from pyqvm.machine import LaunchPlan, Machine, preview_argv
from pyqvm.ops import template as templates
from pyqvm.ops.blockjobs import ChainLink
from pyqvm.ops.migration import (
    Incoming,
    MigrationProgress,
    MigrationStats,
    MigrationTuning,
    SavedState,
)
from pyqvm.ops.snapshot import SnapshotInfo
from pyqvm.ops.template import Template
from pyqvm.session import QMPSession
from pyqvm.spec import Disk, HostDevice, KernelBoot, Network, PortForward, VMSpec, load_spec
from pyqvm.state import VMState
from pyqvm.sync import VM
from pyqvm.vm import AsyncVM

__all__ = [
    "VM",
    "AsyncVM",
    "ChainLink",
    "DeviceClaimedError",
    "Disk",
    "ExecResult",
    "GroupNotViableError",
    "GuestAgent",
    "GuestCommandError",
    "GuestError",
    "GuestExecError",
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
    "MigrationTuning",
    "Network",
    "OperationError",
    "PassthroughError",
    "Plugged",
    "PortForward",
    "PyqvmError",
    "PyqvmTimeoutError",
    "QMPCommandError",
    "QMPSession",
    "SavedState",
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
    "load_spec",
    "preview_argv",
    "templates",
]
