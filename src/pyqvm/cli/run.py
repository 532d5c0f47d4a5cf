"""``pyqvm run [SPEC.toml] [overrides] [--template T] [-- CMD ARGS...]``: boot an ephemeral VM
(or clone a template), run CMD in it, print its output and exit with its exit code."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pyqvm.cli import status
from pyqvm.cli.firstuse import ensure_image
from pyqvm.cli.specargs import add_spec_options, refuse_overrides_with_template, spec_from_args
from pyqvm.errors import PyqvmError

if TYPE_CHECKING:  # imported when the verb runs: `pyqvm ps` need not pay for them
    from pyqvm.spec import VMSpec
    from pyqvm.vm import AsyncVM


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    p = sub.add_parser(
        "run",
        parents=list(parents),
        help="boot an ephemeral VM and run a command in it",
        description="Boot an ephemeral VM (default: the built-in guest), run CMD in it through "
        "the guest agent, print its output and exit with its exit code. Without CMD, show the "
        "serial console until Ctrl-C.",
        epilog="The command to run in the guest follows --, e.g.: pyqvm run -- uname -a",
    )
    add_spec_options(p)
    p.add_argument(
        "--template",
        metavar="T",
        help="start a clone of template T instead of booting (see pyqvm template); "
        "of the overrides only --name goes with it",
    )
    p.set_defaults(run=run, takes_command=True)


def run(args: argparse.Namespace) -> int:
    import asyncio

    if args.template:
        refuse_overrides_with_template(args)
        return asyncio.run(_clone_and_run(args.template, args.name, args.cmd))
    spec = spec_from_args(args)
    ensure_image(spec)
    return asyncio.run(_run(spec, args.cmd))


async def _clone_and_run(template: str, name: str | None, cmd: Sequence[str]) -> int:
    from pyqvm.vm import AsyncVM

    vm = await AsyncVM.from_template(template, name=name)
    try:
        return await _command_or_console(vm, cmd)
    finally:
        await vm.stop()


async def _run(spec: VMSpec, cmd: Sequence[str]) -> int:
    from pyqvm.vm import AsyncVM

    async with AsyncVM(spec) as vm:
        return await _command_or_console(vm, cmd)


async def _command_or_console(vm: AsyncVM, cmd: Sequence[str]) -> int:
    if not cmd:
        return await _show_console(vm)
    try:
        result = await vm.run(cmd, timeout=24 * 3600)
    except PyqvmError as e:
        code = status.of_error(e)
        if code == status.EXIT_ERROR:
            raise
        print(f"pyqvm: {e}", file=sys.stderr)
        return code  # 126/127: the command could not run, as a shell says
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    return status.of_result(result)


async def _show_console(vm: AsyncVM) -> int:
    """Copy the serial console to stdout until Ctrl-C or the guest powers off."""
    import asyncio

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    sys.stderr.write(f"pyqvm: {vm.name} is up; console follows (Ctrl-C to stop)\n")
    shown = 0
    exited = asyncio.ensure_future(vm.wait())
    try:
        while not stop.is_set() and not exited.done():
            chunk = vm.read_console(shown)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                shown += len(chunk)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        if not exited.done():
            exited.cancel()
    return 0
