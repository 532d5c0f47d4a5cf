"""``pyqvm ssh NAME [--print] [-- CMD]``: ssh into a named VM started with ``--ssh``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    p = sub.add_parser(
        "ssh",
        parents=list(parents),
        help="ssh into a named VM (started with --ssh)",
        description="Run the host's ssh into the named VM: its port forward, its key and "
        "its known-hosts entry, no prompts (BatchMode; the built-in guest's host key is "
        "checked strictly). CMD runs in the guest's shell, each word quoted; with none, a "
        "login shell. The exit status is ssh's: the command's own, 255 for an ssh error.",
        epilog="e.g.: pyqvm ssh web -- uname -a; pyqvm ssh --print web (the command only)",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--print", action="store_true", help="print the ssh command, do not run it")
    p.set_defaults(run=run_ssh, takes_command=True)


def ssh_argv_of(name: str, command: Sequence[str]) -> list[str]:
    import asyncio
    from pathlib import Path

    from pyqvm.faces.derived_named import AsyncNamedVM
    from pyqvm.named import registry
    from pyqvm.ops.ssh import forwarded_port, ssh_command
    from pyqvm.spec.io import spec_from_dict

    record = registry.find(name).record()
    spec = spec_from_dict(record.spec)
    if not spec.ssh:
        from pyqvm.errors import NamedVMError

        raise NamedVMError(
            f"VM {name!r} has no SSH server; start it with `pyqvm up --ssh --name {name}`",
            name=name,
        )

    async def port() -> int:
        async with await AsyncNamedVM.attach(name) as vm:
            text = await vm.execute("human-monitor-command", {"command-line": "info usernet"})
        return forwarded_port(str(text))

    return ssh_command(spec, Path(record.runtime_dir), asyncio.run(port()), command)


def run_ssh(args: argparse.Namespace) -> int:
    argv = ssh_argv_of(args.name, args.cmd or ())
    if args.print:
        print(shlex.join(argv))
        return 0
    sys.stdout.flush()
    os.execv(argv[0], argv)  # ssh owns the terminal and the exit status
