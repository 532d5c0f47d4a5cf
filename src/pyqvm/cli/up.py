"""``pyqvm up [SPEC.toml] [options] --name NAME`` and ``pyqvm restore DIR --name NAME``:
start a named VM that outlives this command (see `pyqvm.named`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyqvm.cli.firstuse import ensure_image
from pyqvm.cli.specargs import (
    UsageError,
    add_spec_options,
    refuse_overrides_with_template,
    spec_from_args,
)


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    p = sub.add_parser(
        "up",
        parents=list(parents),
        help="start a named VM in the background",
        description="Start a VM (as `pyqvm run` would) that lives on after this command, "
        "owned by a pyqvm process of its own; return when the guest is ready and print "
        "its name. Drive it with exec, console, qmp, snapshot, hotplug, stop...",
    )
    add_spec_options(p)
    p.add_argument("--template", metavar="T", help="start a clone of template T")
    p.set_defaults(run=run_up)
    r = sub.add_parser(
        "restore",
        parents=list(parents),
        help="start a named VM from a state `pyqvm save` wrote",
        description="Resume the VM saved into DIR (by `pyqvm save NAME DIR`) as named VM NAME.",
    )
    r.add_argument("directory", type=Path, metavar="DIR")
    r.add_argument("--name", required=True)
    r.set_defaults(run=run_restore)


def run_up(args: argparse.Namespace) -> int:
    import asyncio

    from pyqvm.faces.derived_named import AsyncNamedVM

    if not args.name:
        raise UsageError("up needs --name NAME (the name other commands use)")
    if args.template:
        refuse_overrides_with_template(args)
        spec = None
    else:
        spec = spec_from_args(args)  # bad input fails here, before any process starts
        ensure_image(spec)

    async def up() -> None:
        vm = await AsyncNamedVM.up(spec, name=args.name, template=args.template)
        await vm.close()

    asyncio.run(up())
    print(args.name)
    return 0


def run_restore(args: argparse.Namespace) -> int:
    import asyncio

    from pyqvm.faces.derived_named import AsyncNamedVM

    async def restore() -> None:
        vm = await AsyncNamedVM.up(name=args.name, restore=args.directory)
        await vm.close()

    asyncio.run(restore())
    print(args.name)
    return 0
