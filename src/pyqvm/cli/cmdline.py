"""``pyqvm cmdline SPEC.toml [overrides] [--json]``: print the QEMU argv pyqvm would run."""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Sequence
from typing import Any

from pyqvm.cli.firstuse import ensure_image
from pyqvm.cli.specargs import add_spec_options, spec_from_args


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    p = sub.add_parser(
        "cmdline", parents=list(parents), help="print the QEMU command line for a spec"
    )
    add_spec_options(p)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of shell words")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pyqvm.launch.plan import preview_argv

    spec = spec_from_args(args)
    ensure_image(spec)
    argv = preview_argv(spec)
    print(json.dumps(argv) if args.json else shlex.join(argv))
    return 0
