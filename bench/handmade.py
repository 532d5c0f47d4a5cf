"""What the by-hand sides of the benches share: a pyqvm launch's argv, run with plain Popen.

pyqvm hands QEMU its sockets (QMP, the serial console, the guest agent, pyqvm-wake's port) as
inherited fds named in the argv (``socket,id=pq-qmp,fd=N``, perhaps with more options after
it). A by-hand run makes its own socket pair for each of them and puts QEMU's end in the argv
instead. (A boot's console output fits in the pair's buffer: nobody needs to read it.)
"""

from __future__ import annotations

import re
import socket

_FD_CHARDEV = re.compile(r"socket,id=([\w-]+),fd=\d+(,.*)?")


def fd_chardevs(argv: list[str]) -> list[str]:
    """The ids of the socket chardevs ``argv`` passes to QEMU as fds."""
    return [m.group(1) for a in argv if (m := _FD_CHARDEV.fullmatch(a))]


def with_fds(argv: list[str], fds: dict[str, int]) -> list[str]:
    """``argv`` with each named socket chardev on the fd given (its own socket pair's)."""
    out = []
    for a in argv:
        m = _FD_CHARDEV.fullmatch(a)
        if m and m.group(1) in fds:
            a = f"socket,id={m.group(1)},fd={fds[m.group(1)]}{m.group(2) or ''}"
        out.append(a)
    return out


def socket_pairs(argv: list[str]) -> dict[str, tuple[socket.socket, socket.socket]]:
    """A socket pair (ours, QEMU's) for every fd chardev of ``argv``."""
    return {name: socket.socketpair() for name in fd_chardevs(argv)}


__all__ = ["fd_chardevs", "socket_pairs", "with_fds"]
