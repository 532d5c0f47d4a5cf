"""Helper for test_no_orphans: start a real QEMU through ChildProcess, report, then idle.

Usage: python _launcher_child.py {main|thread|control} QEMU_BINARY STDERR_PATH

- main:    start QEMU from this process's main thread.
- thread:  start it from a short-lived thread's event loop; once that thread has
           ended, check QEMU is still alive before reporting.
- control: start it from the main thread the way pyqvm does (no shell, own process
           group, /dev/null stdin) but with plain subprocess.Popen and so no death
           signal, to prove the test can see an orphan.
- inline:  like thread, but forking on the starter thread itself instead of the
           spawner thread, to prove the PDEATHSIG-follows-the-thread trap is real.

Prints one JSON line ``{"pid": ..., "alive_after_thread": ...}`` and then sleeps
until killed (at most 120 s, so a broken test cannot leave it behind for long).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyqvm.runtime.children import ChildProcess


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def main() -> int:
    variant, qemu, stderr_path = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    argv = [qemu, "-machine", "none", "-nodefaults", "-display", "none", "-S"]
    report: dict[str, object] = {"variant": variant}

    class InlineSpawner:
        """Forks on the calling thread, as a ChildProcess without a spawner thread would."""

        def submit(self, job: Callable[[], Any]) -> concurrent.futures.Future[Any]:
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            future.set_result(job())
            return future

    proc = ChildProcess(spawner=InlineSpawner() if variant == "inline" else None)

    if variant == "control":
        with stderr_path.open("wb") as err:
            orphan = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, process_group=0
            )
        print(json.dumps({**report, "pid": orphan.pid}), flush=True)
        time.sleep(120)
        return 0

    if variant == "main":
        asyncio.run(proc.start(argv, stderr_path=stderr_path))
    elif variant in ("thread", "inline"):
        t = threading.Thread(
            target=lambda: asyncio.run(proc.start(argv, stderr_path=stderr_path)),
            name="short-lived-starter",
        )
        t.start()
        t.join()
        assert not t.is_alive()
        # A death signal tied to the starter thread would have landed by now; give it a
        # little time and look repeatedly.
        deadline = time.monotonic() + 0.5
        alive = True
        while alive and time.monotonic() < deadline:
            alive = _alive(proc.pid)
            time.sleep(0.02)
        report["alive_after_thread"] = alive
    else:
        raise SystemExit(f"unknown variant {variant!r}")

    report["pid"] = proc.pid
    print(json.dumps(report), flush=True)
    time.sleep(120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
