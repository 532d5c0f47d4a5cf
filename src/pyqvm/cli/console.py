"""``pyqvm console NAME`` (the serial console, read-write; Ctrl-] detaches),
``pyqvm logs NAME [--follow]`` (the console log), for scripts ``pyqvm expect NAME
PATTERN...`` and ``pyqvm send NAME TEXT`` (`AsyncVM.console`, through the VM's owner), and
``pyqvm vnc NAME`` (its screen, to a VNC viewer)."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import selectors
import socket
import sys
import termios
import time
import tty
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ESCAPE = 0x1D  # Ctrl-], as telnet and virsh console
CONSOLE_LOCK = "console.lock"


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    p = sub.add_parser(
        "console",
        parents=list(parents),
        help="attach to a named VM's serial console (Ctrl-] detaches)",
        description="Attach this terminal to the named VM's serial console, read-write; "
        "Ctrl-] detaches. When stdin is not a terminal, its bytes are typed into the "
        "console and the output is printed until it has been quiet for --idle seconds.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--idle", type=float, default=1.0, help="seconds (stdin not a terminal)")
    p.set_defaults(run=run_console)
    lg = sub.add_parser(
        "logs",
        parents=list(parents),
        help="print a named VM's console log",
        description="Print the named VM's serial console log; --follow keeps printing "
        "what it adds until the VM ends (or Ctrl-C).",
    )
    lg.add_argument("name", metavar="NAME")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.set_defaults(run=run_logs)
    ex = sub.add_parser(
        "expect",
        parents=list(parents),
        help="wait until a named VM's console shows a pattern",
        description="Wait until one of the PATTERNs (Python regular expressions) shows on "
        "the named VM's serial console, taking what it printed up to the match, and print "
        "the matched text (--json: which pattern, the text, its groups and what came "
        "before). Ends with an error at once when a --fail-on pattern shows first (by "
        "default Linux's panic, oops and BUG lines) or the guest panics.",
    )
    ex.add_argument("name", metavar="NAME")
    ex.add_argument("patterns", nargs="+", metavar="PATTERN")
    ex.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    ex.add_argument("--fail-on", action="append", metavar="PATTERN", help="may be repeated")
    ex.add_argument(
        "--no-fail-on", action="store_true", help="no failure patterns (not even the defaults)"
    )
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(run=run_expect, over_owner=True)
    sd = sub.add_parser(
        "send",
        parents=list(parents),
        help="type text into a named VM's console",
        description="Type TEXT into the named VM's serial console as given; --line adds "
        "Enter (a carriage return, as a terminal sends it).",
    )
    sd.add_argument("name", metavar="NAME")
    sd.add_argument("text", metavar="TEXT")
    sd.add_argument("-l", "--line", action="store_true", help="add Enter")
    sd.set_defaults(run=run_send, over_owner=True)
    vn = sub.add_parser(
        "vnc",
        parents=list(parents),
        help="let a VNC viewer see a named VM's screen",
        description='Open the named VM\'s screen (display = "vga" or "virtio-gpu") to a '
        "VNC viewer: on a unix socket in its runtime dir, which is printed, or on TCP with "
        "--tcp (anyone who can reach that address sees and types into the guest).",
    )
    vn.add_argument("name", metavar="NAME")
    vn.add_argument("--tcp", metavar="HOST:PORT", help="listen on TCP, e.g. 127.0.0.1:5901")
    vn.set_defaults(run=run_vnc, over_owner=True)


@contextlib.contextmanager
def _console_lock(directory: Path, name: str) -> Iterator[None]:
    """One console client at a time (QEMU's socket takes one; a second would just hang)."""
    from pyqvm.errors import NamedVMError

    fd = os.open(directory / CONSOLE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NamedVMError(
                f"the console of VM {name!r} is in use by another `pyqvm console`; "
                "detach that one first (Ctrl-])",
                name=name,
            ) from None
        yield
    finally:
        os.close(fd)


def run_console(args: argparse.Namespace) -> int:
    from pyqvm.errors import NamedVMError
    from pyqvm.named import registry

    entry = registry.find(args.name)
    record = entry.record()
    if record.console_socket is None:
        raise NamedVMError(
            f"VM {args.name!r} has no console socket (its runtime dir's path is too long for "
            f"one); read its console with: pyqvm logs --follow {args.name}",
            name=args.name,
        )
    with _console_lock(entry.directory, args.name):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(record.console_socket)
        except OSError as e:
            raise NamedVMError(f"VM {args.name!r}: cannot open its console: {e}") from None
        with sock:
            if sys.stdin.isatty():
                _interactive(sock, args.name)
            else:
                _scripted(sock, args.idle)
    return 0


def _interactive(sock: socket.socket, name: str) -> None:
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    sys.stderr.write(f"Connected to {name}'s console. Escape character is ^]\r\n")
    sys.stderr.flush()
    try:
        tty.setraw(fd)
        _pump(sock, fd, stop_on_escape=True, idle=None)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sys.stderr.write("\r\n")


def _scripted(sock: socket.socket, idle: float) -> None:
    _pump(sock, sys.stdin.fileno(), stop_on_escape=False, idle=idle)


def _pump(sock: socket.socket, infd: int, *, stop_on_escape: bool, idle: float | None) -> None:
    """Copy ``infd`` to the console and the console to stdout until the escape key, the
    VM's end, or (``idle``) that many quiet seconds once ``infd`` is at its end."""
    out = sys.stdout.buffer
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(infd, selectors.EVENT_READ)
    input_done = False
    last = time.monotonic()
    while True:
        timeout = None
        if idle is not None and input_done:
            timeout = max(0.0, last + idle - time.monotonic())
        events = sel.select(timeout)
        if not events and input_done and idle is not None:
            return
        for key, _ in events:
            if key.fileobj is sock:
                data = sock.recv(65536)
                if not data:
                    return  # QEMU closed it: the VM ended
                out.write(data)
                out.flush()
                last = time.monotonic()
            else:
                data = os.read(infd, 65536)
                if not data:
                    sel.unregister(infd)
                    input_done = True
                    last = time.monotonic()
                    continue
                if stop_on_escape and ESCAPE in data:
                    sock.sendall(data[: data.index(ESCAPE)])
                    return
                sock.sendall(data)


def run_expect(args: argparse.Namespace) -> int:
    from pyqvm.cli.control import on_vm, print_json
    from pyqvm.codec import to_json
    from pyqvm.ops.console import ConsoleMatch

    fail_on = () if args.no_fail_on else args.fail_on
    found = on_vm(args, lambda vm: vm.console.expect(args.patterns, args.timeout, fail_on=fail_on))
    if args.json:
        print_json(to_json(found, ConsoleMatch))
    else:
        print(found.text)
    return 0


def run_send(args: argparse.Namespace) -> int:
    from pyqvm.cli.control import on_vm

    if args.line:
        on_vm(args, lambda vm: vm.console.sendline(args.text))
    else:
        on_vm(args, lambda vm: vm.console.send(args.text))
    return 0


def run_vnc(args: argparse.Namespace) -> int:
    from pyqvm.cli.control import on_vm

    print(on_vm(args, lambda vm: vm.vnc(args.tcp)))
    return 0


def run_logs(args: argparse.Namespace) -> int:
    from pyqvm.named import registry

    entry = registry.find(args.name)
    path = Path(entry.record().console_log)
    out = sys.stdout.buffer
    offset = 0
    while True:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            out.write(chunk)
            out.flush()
            offset += len(chunk)
        if not args.follow or not entry.alive():
            return 0
        # A file QEMU appends to: polling it is the one way to follow it.
        time.sleep(0.2)
