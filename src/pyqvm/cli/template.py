"""``pyqvm template create|list|rm``: guests frozen once, cloned in a blink
(``pyqvm run --template T``)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from pyqvm.cli.firstuse import ensure_image
from pyqvm.cli.specargs import add_spec_options, spec_from_args


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    p = sub.add_parser("template", help="make, list and remove templates (instant clones)")
    tsub = p.add_subparsers(dest="template_command", required=True)
    create = tsub.add_parser(
        "create",
        parents=list(parents),
        help="boot a VM, run setup commands in it, freeze it as a template",
        description="Boot the VM a spec describes (default: the built-in guest), run each "
        "--setup command in it (sh -c), and freeze it as template NAME: its clones start "
        "where it stopped, without booting (pyqvm run --template NAME -- CMD).",
    )
    add_spec_options(create)
    create.add_argument("--setup", action="append", default=[], metavar="CMD", help="repeatable")
    create.add_argument("--replace", action="store_true", help="replace a template of that name")
    tsub.add_parser("list", parents=list(parents), help="list the templates")
    rm = tsub.add_parser("rm", parents=list(parents), help="remove templates")
    rm.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(run=run, min_log_level="info")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from pyqvm.ops import template as templates

    if args.template_command == "create":
        if not args.name:
            args.parser.error("template create needs --name NAME")
        spec = spec_from_args(args)
        ensure_image(spec)
        t = asyncio.run(templates.create(spec, args.name, setup=args.setup, replace=args.replace))
        print(f"{t.name}: {t.directory}")
    elif args.template_command == "list":
        for t in templates.list_templates():
            made = time.strftime("%Y-%m-%d %H:%M", time.localtime(t.created))
            print(
                f"{t.name:20} {t.machine:8} {t.accelerator:4} QEMU {t.qemu_version:8} {made}  "
                f"{t.directory}"
            )
    else:
        for name in args.names:
            templates.remove(name)
            print(f"removed {name}")
    return 0
