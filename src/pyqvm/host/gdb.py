"""The host's gdb against a guest's gdbstub: where gdb is, which vmlinux it loads, its argv.

QEMU serves the stub (``-gdb chardev:...``); gdb connects with ``target remote``, to a
unix socket path or ``HOST:PORT``. QEMU answers gdb's ``qAttached`` with 1, so quitting
gdb detaches and the guest runs on (a *kill* would end QEMU).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from pyqvm.errors import HostError
from pyqvm.host.kernel import extract_vmlinux, inspect_kernel
from pyqvm.host.packages import install_hint

log = logging.getLogger(__name__)

#: Where Debian's ``linux-image-<release>-dbg`` puts the kernel with its debug symbols.
DEBUG_VMLINUX = "/usr/lib/debug/boot/vmlinux-{release}"


def find_gdb() -> Path:
    """The host's gdb, or `HostError` saying which package to install."""
    found = shutil.which("gdb")
    if found is None:
        raise HostError(f"gdb is not installed; install it with: {install_hint('gdb')}")
    return Path(found)


def vmlinux_for(kernel: Path, scratch: Path, release: str | None = None) -> Path:
    """The ELF vmlinux gdb should load for a guest booted from ``kernel``.

    The debug build of ``release`` when it is installed (symbols and types); else
    ``kernel`` itself when it is an ELF, else the ELF inside the bzImage, extracted
    into ``scratch`` once. Those have sections but no symbols: gdb disassembles, and
    reads memory at addresses from the guest's ``/proc/kallsyms``.
    """
    if release:
        debug = Path(DEBUG_VMLINUX.format(release=release))
        if debug.is_file():
            return debug
        log.info("no %s: install linux-image-%s-dbg for kernel symbols in gdb", debug, release)
    if inspect_kernel(kernel).format == "elf":
        return kernel
    dest = scratch / "vmlinux"
    if not dest.exists():
        extract_vmlinux(kernel, dest)
    return dest


def gdb_argv(
    target: str,
    *,
    vmlinux: Path | None = None,
    gdb: Path | None = None,
    commands: Sequence[str] = (),
    batch: bool = False,
) -> list[str]:
    """gdb connected to ``target`` (a unix socket path or ``HOST:PORT``), ``vmlinux``
    loaded, then ``commands`` run; with ``batch``, gdb detaches and exits after them."""
    argv = [str(gdb or find_gdb()), "-q"]
    if batch:
        argv += ["-batch", "-nx"]
    if vmlinux is not None:
        argv.append(str(vmlinux))
    argv += ["-ex", "set pagination off", "-ex", f"target remote {target}"]
    for c in commands:
        argv += ["-ex", c]
    if batch:
        argv += ["-ex", "detach"]
    return argv


__all__ = ["DEBUG_VMLINUX", "find_gdb", "gdb_argv", "vmlinux_for"]
