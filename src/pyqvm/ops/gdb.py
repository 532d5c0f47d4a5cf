"""The host's gdb on a VM's gdbstub: its target and the vmlinux to load, for a VM of this
process (`AsyncVM.gdb_argv`) and a named one (``pyqvm gdb NAME``) alike."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pyqvm import image
from pyqvm.errors import SpecError
from pyqvm.host.gdb import gdb_argv, vmlinux_for
from pyqvm.launch.plan import GDB_SOCKET
from pyqvm.spec import VMSpec


def gdb_target(spec: VMSpec, rundir: Path) -> str:
    """What gdb's ``target remote`` takes: the unix socket in the runtime dir (``gdb =
    true``) or the spec's ``HOST:PORT``."""
    if spec.gdb is False:
        raise SpecError("gdb", f"VM {spec.name!r} has no gdbstub; start it with gdb = true")
    return str(rundir / GDB_SOCKET) if spec.gdb is True else spec.gdb


def gdb_command(
    spec: VMSpec,
    rundir: Path,
    *,
    vmlinux: Path | None = None,
    commands: Sequence[str] = (),
    batch: bool = False,
    image_cache: Path | None = None,
) -> list[str]:
    """gdb on the gdbstub of a VM of ``spec`` (as given, before resolution) running in
    ``rundir``, with ``vmlinux`` loaded, else the booted kernel's (`vmlinux_for`)."""
    target = gdb_target(spec, rundir)
    if vmlinux is None:
        kernel, release = (spec.kernel.kernel if spec.kernel else None), None
        if spec.image is not None:
            img = image.find(spec.image, cache=image_cache, arch=spec.arch)
            kernel, release = img.kernel, img.kernel_version
        if kernel is not None:
            vmlinux = vmlinux_for(kernel, rundir, release)
    return gdb_argv(target, vmlinux=vmlinux, commands=commands, batch=batch)


__all__ = ["gdb_command", "gdb_target"]
