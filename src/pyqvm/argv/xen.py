"""The QEMU argv of a Xen HVM guest's device model, as the Xen toolstack would start it.

Under Xen, QEMU does not run the guest: the hypervisor does, and QEMU (the
"device model", started in dom0 for an existing domain ``-xen-domid N``) only
emulates its devices. pyqvm builds this argv so it can be checked and shown;
running it needs a Xen dom0 (``pyqvm doctor --for xen`` tells whether this is one).

QEMU 7.2 spells the accelerator in one of two ways, not both: ``-machine xenfv``
(the PC board with the Xen platform device, which implies ``accel=xen``), or
``-accel xen`` with ``-machine pc``. ``-accel xen -machine xenfv`` is refused
("The -accel and "-machine accel=" options are incompatible").
"""

from __future__ import annotations

from pathlib import Path

from pyqvm.argv.escape import opts
from pyqvm.errors import HostError, SpecError
from pyqvm.host.facts import find_xen_device_model
from pyqvm.host.packages import install_hint
from pyqvm.spec import VMSpec

__all__ = ["xen_device_model", "xen_hvm_argv"]


def xen_device_model(root: Path = Path("/")) -> Path:
    """The QEMU built for Xen (Debian: qemu-system-xen's /usr/libexec/xen-qemu-system-i386).

    Raises:
        HostError: it is not installed; says which package has it.
    """
    if (found := find_xen_device_model(root)) is not None:
        return found
    raise HostError(
        "no QEMU built for Xen is installed (Debian's qemu-system-x86_64 has no xen "
        f"accelerator); install it with: {install_hint('qemu-system-xen')}"
    )


def xen_hvm_argv(spec: VMSpec, *, qemu: Path, domid: int, machine: str = "xenfv") -> list[str]:
    """The device-model argv for ``spec`` as Xen HVM domain ``domid``.

    ``machine`` is ``xenfv`` (implies the xen accelerator) or ``pc`` (then
    ``-accel xen`` is added). Only the board, memory, vCPUs and a null display
    come from the spec; disks and NICs of a Xen guest are set up by the toolstack.
    """
    if isinstance(domid, bool) or not isinstance(domid, int) or domid < 1:
        raise SpecError("domid", f"{domid!r} is not a guest domain id (1 or more; 0 is dom0)")
    if machine not in ("xenfv", "pc"):
        raise SpecError("machine", f"{machine!r}: a Xen HVM device model uses xenfv or pc")
    argv = [
        str(qemu),
        "-xen-domid",
        str(domid),
        "-nodefaults",
        "-no-user-config",
        "-name",
        opts(spec.name, {}),
        "-machine",
        machine,
    ]
    if machine == "pc":
        argv += ["-accel", "xen"]
    argv += ["-m", f"{spec.memory}M", "-smp", str(spec.smp), "-display", "none"]
    return argv
