"""``pyqvm ps [--json]``: the named VMs of this user, their state asked of QEMU."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

#: How long ps waits for one owner to answer before calling it unresponsive.
ASK_TIMEOUT = 2.0


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    p = sub.add_parser(
        "ps",
        parents=list(parents),
        help="list the named VMs",
        description="List the named VMs (pyqvm up) with their state as QEMU reports it. "
        "Entries whose owner process died are removed, and said so once on stderr.",
    )
    p.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    p.set_defaults(run=run)


async def _ask(name: str) -> dict[str, Any]:
    import asyncio

    from pyqvm.errors import PyqvmError
    from pyqvm.faces.derived_named import AsyncNamedVM
    from pyqvm.named import registry

    try:
        vm = await AsyncNamedVM.attach(name, timeout=ASK_TIMEOUT)
        try:
            return await asyncio.wait_for(vm.info(), ASK_TIMEOUT)
        finally:
            await vm.close()
    except (PyqvmError, TimeoutError) as e:
        try:
            entry = registry.find(name)
        except PyqvmError as gone:  # it ended while we asked
            return {"name": name, "state": "gone", "status": None, "error": str(gone)}
        try:  # what the record says still holds; only the state is unknown
            known = entry.record().to_json()
        except PyqvmError:
            if not (entry.directory / registry.RECORD).exists():
                return {"name": name, "state": "starting", "status": None}
            known = {"name": name}  # a broken record: the error says so
        return {**known, "state": "unresponsive", "status": None, "error": str(e)}


async def _all() -> tuple[list[dict[str, Any]], list[str]]:
    import asyncio

    from pyqvm.named import registry

    live, notes = registry.scan()
    infos = await asyncio.gather(*(_ask(e.name) for e in live))
    return list(infos), notes


def _uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run(args: argparse.Namespace) -> int:
    import asyncio

    infos, notes = asyncio.run(_all())
    for note in notes:
        print(f"pyqvm: removed dead VM {note}", file=sys.stderr)
    now = time.time()
    if args.json:
        for i in infos:
            if "started" in i:
                i["uptime"] = round(now - i["started"], 1)
        json.dump(infos, sys.stdout, indent=2)
        print()
        return 0
    rows = [("NAME", "STATE", "PID", "ACCEL", "MACHINE", "MEMORY", "VCPUS", "UPTIME", "PORTS")]
    for i in infos:
        state = i.get("status") or i.get("state", "?")
        rows.append(
            (
                i["name"],
                str(state),
                str(i.get("qemu_pid", "-")),
                str(i.get("accelerator", "-")),
                str(i.get("machine", "-")),
                f"{i['memory']}M" if "memory" in i else "-",
                str(i.get("smp", "-")),
                _uptime(now - i["started"]) if "started" in i else "-",
                ", ".join(i.get("forwards", ())) or "-",
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0
