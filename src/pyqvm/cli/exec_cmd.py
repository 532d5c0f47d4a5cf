"""``pyqvm exec NAME [--timeout S] [--env K=V] -- CMD ARGS...``: run CMD in a named VM.

stdout and stderr come back apart; stdin is passed through when it is not a
terminal; the exit status is the command's (see `pyqvm.cli.status`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pyqvm.cli.specargs import UsageError


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    p = sub.add_parser(
        "exec",
        parents=list(parents),
        help="run a command in a named VM",
        description="Run CMD in the named VM through its guest agent. Its stdout and "
        "stderr are printed apart, stdin is passed to it when stdin is not a terminal, "
        "and the exit status is its own (128+N if signal N killed it; 126/127 if it "
        "cannot be executed / is not found; 125 if pyqvm failed).",
        epilog="The command follows --, e.g.: pyqvm exec web -- cat /etc/os-release",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds (default: a day)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="repeatable")
    p.add_argument("-n", "--no-stdin", action="store_true", help="do not read stdin (as ssh -n)")
    p.set_defaults(run=run, takes_command=True, over_owner=True)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from pyqvm.cli import status
    from pyqvm.errors import PyqvmError
    from pyqvm.faces.derived_named import AsyncNamedVM

    if not args.cmd:
        raise UsageError("exec needs a command after --, e.g.: pyqvm exec NAME -- uname -a")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {item!r}: use KEY=VALUE")
        env[key] = value
    quiet = args.no_stdin or sys.stdin is None or sys.stdin.isatty()
    stdin = None if quiet else sys.stdin.buffer.read()

    async def go() -> int:
        async with await AsyncNamedVM.attach(args.name, host=args.host) as vm:
            try:
                result = await vm.run(args.cmd, input=stdin, env=env or None, timeout=args.timeout)
            except PyqvmError as e:
                code = status.of_error(e)
                if code == status.EXIT_ERROR:
                    raise
                print(f"pyqvm: {e}", file=sys.stderr)
                return code
        sys.stdout.buffer.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(result.stderr)
        sys.stderr.flush()
        return status.of_result(result)

    return asyncio.run(go())
