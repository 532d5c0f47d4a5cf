"""pyqvm: a pure-Python QEMU/KVM launcher that speaks QMP directly."""

from pyqvm.errors import (
    GuestError,
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

__all__ = [
    "GuestError",
    "HostError",
    "ImageError",
    "LaunchError",
    "PyqvmError",
    "PyqvmTimeoutError",
    "QMPCommandError",
    "SpecError",
    "VMExitedError",
    "VMStateError",
]
