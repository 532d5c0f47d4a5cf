"""pyqvm: a pure-Python QEMU/KVM launcher that speaks QMP directly.

Public API::

    VMSpec (+ Disk, Network, PortForward, KernelBoot, HostDevice), load_spec: describe a VM
    AsyncVM (asyncio) / VM (blocking): run it
    ExecResult: a guest command's outcome
    PyqvmError and its subclasses: every error pyqvm raises
"""

from pyqvm.agent import ExecResult, GuestAgent
from pyqvm.errors import (
    GuestCommandError,
    GuestError,
    GuestExecError,
    HostError,
    ImageError,
    LaunchError,
    PyqvmError,
    PyqvmTimeoutError,
    QMPCommandError,
    SpecError,
    VMExitedError,
    VMStateError,
)
from pyqvm.spec import Disk, HostDevice, KernelBoot, Network, PortForward, VMSpec, load_spec
from pyqvm.sync import VM
from pyqvm.vm import AsyncVM, VMState, preview_argv

__all__ = [
    "VM",
    "AsyncVM",
    "Disk",
    "ExecResult",
    "GuestAgent",
    "GuestCommandError",
    "GuestError",
    "GuestExecError",
    "HostDevice",
    "HostError",
    "ImageError",
    "KernelBoot",
    "LaunchError",
    "Network",
    "PortForward",
    "PyqvmError",
    "PyqvmTimeoutError",
    "QMPCommandError",
    "SpecError",
    "VMExitedError",
    "VMSpec",
    "VMState",
    "VMStateError",
    "load_spec",
    "preview_argv",
]
