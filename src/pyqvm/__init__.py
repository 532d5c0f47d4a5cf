"""pyqvm: a pure-Python QEMU/KVM launcher that speaks QMP directly.

Public API::

    VMSpec (+ Disk, Network, PortForward, KernelBoot, HostDevice), load_spec: describe a VM
    AsyncVM (asyncio) / VM (blocking): run it
    ExecResult: a guest command's outcome
    PyqvmError and its subclasses: every error pyqvm raises
"""

from pyqvm.agent import ExecResult, GuestAgent
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
    UnplugTimeoutError,
    VMExitedError,
    VMStateError,
)
from pyqvm.spec import Disk, HostDevice, KernelBoot, Network, PortForward, VMSpec, load_spec
from pyqvm.sync import VM
from pyqvm.vm import AsyncVM, VMState, preview_argv

__all__ = [
    "VM",
    "AsyncVM",
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
    "JobError",
    "KernelBoot",
    "LaunchError",
    "MigrationError",
    "Network",
    "OperationError",
    "PassthroughError",
    "PortForward",
    "PyqvmError",
    "PyqvmTimeoutError",
    "QMPCommandError",
    "SnapshotError",
    "SpecError",
    "UnplugTimeoutError",
    "VMExitedError",
    "VMSpec",
    "VMState",
    "VMStateError",
    "load_spec",
    "preview_argv",
]
