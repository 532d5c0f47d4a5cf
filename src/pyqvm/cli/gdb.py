"""``pyqvm gdb NAME``: the host's gdb on a named VM's gdbstub, the guest kernel loaded."""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    p = sub.add_parser(
        "gdb",
        parents=list(parents),
        help="debug a named VM's guest kernel with the host's gdb",
        description="Run the host's gdb against the gdbstub of a named VM started with "
        "--gdb (a unix socket in its runtime dir), with the guest kernel loaded: the "
        "debug vmlinux of Debian's linux-image-RELEASE-dbg when installed, else the booted "
        "kernel (no symbols; read addresses from the guest's /proc/kallsyms). The guest "
        "stops while gdb holds it; quitting gdb detaches and it runs on.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--vmlinux", type=Path, help="the ELF vmlinux to load (with symbols)")
    p.add_argument(
        "-x",
        "--ex",
        action="append",
        default=[],
        metavar="CMD",
        help="a gdb command to run after attaching (repeatable)",
    )
    p.add_argument(
        "--batch", action="store_true", help="run the --ex commands, detach and exit (scripts)"
    )
    p.set_defaults(run=run_gdb)


def gdb_command(args: argparse.Namespace) -> list[str]:
    """The gdb argv for the named VM (separate from running it, for tests and --dry-run)."""
    from pyqvm.errors import NamedVMError
    from pyqvm.named import registry
    from pyqvm.ops.gdb import gdb_command
    from pyqvm.spec.io import spec_from_dict

    record = registry.find(args.name).record()
    spec = spec_from_dict(record.spec)
    if spec.gdb is False:
        raise NamedVMError(
            f"VM {args.name!r} has no gdbstub; start it with `pyqvm up --gdb --name {args.name}`",
            name=args.name,
        )
    return gdb_command(
        spec, Path(record.runtime_dir), vmlinux=args.vmlinux, commands=args.ex, batch=args.batch
    )


def run_gdb(args: argparse.Namespace) -> int:
    argv = gdb_command(args)
    if args.batch:
        return subprocess.run(argv, check=False).returncode
    os.execv(argv[0], argv)  # gdb owns the terminal (Ctrl-C interrupts the guest, not us)
