"""Helper for test_launcher_killed: a launching process with in-process VMs and a named VM.

Usage: python _clones_child.py TEMPLATE N_CLONES NAME up|attach

Starts N_CLONES clones of TEMPLATE (in-process `AsyncVM`s, whose QEMUs are this process's
children) and starts (``up``: its owner process is launched from here) or attaches to
(``attach``) the named VM NAME. Prints one JSON line (this process's pid, the clones' QEMU
pids and runtime dirs, the named VM's record) and then keeps all of them busy (guest
commands, QMP commands, a command through the named VM's owner) until it is killed; after
120 s it stops its clones and exits, so a broken test cannot leave it behind for long.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from pyqvm import AsyncNamedVM, AsyncVM


async def main() -> int:
    template, n, name, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    clones = list(await asyncio.gather(*(AsyncVM.from_template(template) for _ in range(n))))
    if mode == "up":
        named = await AsyncNamedVM.up(name=name, template=template)
    else:
        named = await AsyncNamedVM.attach(name)
    info = await named.info()
    report = {
        "pid": os.getpid(),
        "qemu": [vm.pid for vm in clones],
        "rundirs": [str(vm.runtime_dir) for vm in clones],
        "named": {k: info[k] for k in ("owner_pid", "qemu_pid", "runtime_dir")},
    }
    print(json.dumps(report), flush=True)
    end = time.monotonic() + 120
    try:
        while time.monotonic() < end:
            await asyncio.gather(
                *(vm.run(["sleep", "0.05"]) for vm in clones),
                *(vm.execute("query-status") for vm in clones),
                named.run(["true"]),
            )
    finally:
        await named.close()
        for vm in clones:
            await vm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
