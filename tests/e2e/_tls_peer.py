"""One side of a cross-host TLS migration (tests/e2e/test_tls_migration.py runs it, inside a
network namespace, with ``ip netns exec``).

Reads one JSON request on stdin.

- ``{"role": "dst", "address", "tls", "peer"}``: listen (copied storage, over TCP with TLS),
  print ``{"uri", "nbd"}``, accept the guest, print ``{"out": ...}`` of a command run in it,
  then stop.
- ``{"role": "src", "template", "templates", "tries": [{"uri", "nbd", "tls", "insecure"}]}``:
  start a clone of the template, write a file and start a counter, then try each target in
  turn and print one ``{"ok", "error", "running"}`` line per try (``running``: whether the
  guest ran on here afterwards); stop after the first success.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from pyqvm import AsyncVM, MigrationTLS, PyqvmError, VMSpec, templates


def say(msg: object) -> None:
    print(json.dumps(msg), flush=True)


async def destination(req: dict[str, object]) -> int:
    tls = MigrationTLS(Path(str(req["tls"])), peer=req.get("peer"))  # type: ignore[arg-type]
    vm = AsyncVM(VMSpec(image="default", name="tls-dst"))
    incoming = await vm.listen(
        transport="tcp", address=str(req["address"]), storage="copied", tls=tls
    )
    say({"uri": incoming.uri, "nbd": incoming.nbd})
    try:
        await vm.accept(incoming, timeout=120)
        out = await vm.run(
            ["sh", "-c", "cat /tmp/counter; echo 3 > /proc/sys/vm/drop_caches; cat /mnt/data/f"],
            check=True,
        )
        say({"out": out.stdout_text})
    finally:
        await vm.stop()
    return 0


async def source(req: dict[str, object]) -> int:
    t = templates.load(str(req["template"]), directory=Path(str(req["templates"])))
    vm = await AsyncVM.from_template(t, name="tls-src")
    try:
        count = "i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done"
        script = f"echo kept > /mnt/data/f; sync; ({count}) >/dev/null 2>&1 &"
        await vm.run(["sh", "-c", script], check=True)
        for t in req["tries"]:  # type: ignore[attr-defined]
            tls = MigrationTLS(Path(t["tls"])) if t.get("tls") else None
            try:
                await vm.send(
                    t["uri"],
                    storage="copied",
                    nbd=t["nbd"],
                    tls=tls,
                    insecure=bool(t.get("insecure")),
                    timeout=120,
                )
            except PyqvmError as e:
                running = (await vm.run(["cat", "/tmp/counter"])).returncode == 0
                say({"ok": False, "error": str(e), "running": running})
                continue
            say({"ok": True, "error": "", "running": False})
            break
    finally:
        await vm.stop()
    return 0


def main() -> int:
    req = json.loads(sys.stdin.readline())
    return asyncio.run(destination(req) if req["role"] == "dst" else source(req))


if __name__ == "__main__":
    sys.exit(main())
