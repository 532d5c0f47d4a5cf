"""``pyqvm doctor [--json] [--for tcg|kvm|vfio|xen] [--fix]``: what this host can run, and
the fix for what it cannot. Exits 1 when the asked-for mode (default: tcg) cannot work."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pyqvm.cli.specargs import memory_size
from pyqvm.host.modes import MODES, Mode

if TYPE_CHECKING:  # imported when the verb runs
    from pyqvm.host.doctor import Report
    from pyqvm.launch.passthrough import Recovered

__all__ = ["add_parser", "run"]

_MARK = {"ok": "ok", "warn": "warn", "fail": "FAIL", "info": "info"}


def add_parser(
    sub: Any, parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """Add the ``doctor`` subcommand to ``sub`` (an argparse subparsers object)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "doctor",
        parents=list(parents),
        help="check what this host can run (TCG, KVM, VFIO passthrough, Xen) and how to fix it",
        description="Check what each mode needs on this host. Every failing line says the fix. "
        "Exits 1 when the mode asked for with --for (default: tcg) cannot work.",
    )
    p.add_argument("--json", action="store_true", help="print the checklist as JSON")
    p.add_argument(
        "--for",
        dest="mode",
        choices=MODES,
        help="check only this mode, and exit 1 if it cannot work",
    )
    p.add_argument(
        "--fix",
        action="store_true",
        help="give back host devices left bound to vfio-pci by killed pyqvm processes",
    )
    p.add_argument(
        "--memory",
        type=memory_size,
        default="1G",
        help="guest memory the VFIO memlock check assumes (default 1G)",
    )
    p.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)  # tests
    p.set_defaults(run=run)
    return p


def _print_text(report: Report, out: TextIO) -> None:
    for mode in report.modes:
        verdict = "usable" if report.usable(mode) else "NOT usable"
        out.write(f"{mode}: {verdict}\n")
        for c in report.for_mode(mode):
            out.write(f"  {_MARK[c.status]:<5} {c.name:<17} {c.reason}\n")
            if c.fix and c.status != "ok":
                out.write(f"  {'':<5} {'':<17} fix: {c.fix}\n")


def _fixed_json(done: list[Recovered]) -> list[dict[str, Any]]:
    return [
        {
            "address": r.address,
            "vm": r.vm,
            "pid": r.pid,
            "restored_to": r.restored_to,
            "error": r.error,
        }
        for r in done
    ]


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run ``pyqvm doctor``; returns the exit code."""
    root: Path = args.root
    from pyqvm.host.claims import ClaimStore
    from pyqvm.host.doctor import run_checks
    from pyqvm.launch.passthrough import PassthroughHost, recover
    from pyqvm.spec import parse_size_mib

    claims = ClaimStore()
    done: list[Recovered] | None = None
    if args.fix:
        done = recover(PassthroughHost(root=root, claims=claims))
    modes: tuple[Mode, ...] = (args.mode,) if args.mode else MODES
    report = run_checks(
        modes, root, memory_mib=parse_size_mib(args.memory, "--memory"), claims=claims
    )
    asked: Mode = args.mode or "tcg"
    ok = report.usable(asked)
    if args.json:
        data = report.to_json()
        data |= {"asked": asked, "ok": ok}
        if done is not None:
            data["fixed"] = _fixed_json(done)
        out.write(json.dumps(data, indent=2) + "\n")
    else:
        if done is not None:
            for r in done:
                what = f"back to {r.restored_to}" if r.restored_to else "claim dropped"
                out.write(
                    f"fixed: {r.address} of VM {r.vm!r} (pid {r.pid}): "
                    + (what if r.ok else f"FAILED: {r.error}")
                    + "\n"
                )
            if not done:
                out.write("fixed: nothing to fix (no stale device claims)\n")
        _print_text(report, out)
    return 0 if ok and all(r.ok for r in done or ()) else 1
