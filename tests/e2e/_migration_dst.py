"""The destination half of a two-process migration (test_migration.py runs it).

Reads one JSON line on stdin: ``{"transport", "storage", "devices", "command"}``
(``devices``: the source's hot-plugged devices as `Plugged.to_json` records).
Prints ``{"uri", "nbd"}`` once listening, then, when the guest runs here, the
output of ``command`` run in it as ``{"out": ...}``; then stops the VM.
"""

from __future__ import annotations

import asyncio
import json
import sys

from pyqvm import AsyncVM, Plugged, VMSpec


async def main() -> int:
    request = json.loads(sys.stdin.readline())
    devices = {d: Plugged.from_json(r) for d, r in request["devices"].items()}
    dst = AsyncVM(VMSpec(image="default", name="xproc-dst", hotplug_slots=2))
    incoming = await dst.listen(
        transport=request["transport"], storage=request["storage"], devices=devices
    )
    print(json.dumps({"uri": incoming.uri, "nbd": incoming.nbd}), flush=True)
    try:
        await dst.accept(incoming, timeout=120)
        result = await dst.run(["sh", "-c", request["command"]], check=True)
        print(json.dumps({"out": result.stdout_text}), flush=True)
    finally:
        await dst.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
