"""Helpers the e2e and fault tests share: a counter loop in the guest, and running
examples as a user would."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from pyqvm.vm import AsyncVM

REPO = Path(__file__).resolve().parents[1]
# Written aside and renamed, so a reader never sees the file half-written (empty).
COUNTER = (
    "i=0; while :; do i=$((i+1)); echo $i > /tmp/counter.new; "
    "mv /tmp/counter.new /tmp/counter; sleep 0.05; done"
)


async def start_counter(vm: AsyncVM) -> None:
    """Start a loop in the guest that counts in /tmp/counter (detached), once it has counted 1."""
    start = f"setsid sh -c '{COUNTER}' </dev/null >/dev/null 2>&1 &"
    wait = "until [ -e /tmp/counter ]; do sleep 0.02; done"
    await vm.run(["sh", "-c", f"{start} {wait}"], check=True)


async def counter(vm: AsyncVM) -> int:
    return int((await vm.read_file("/tmp/counter")).decode())


async def counter_beyond(vm: AsyncVM, past: int) -> int:
    """The guest's counter, once it is beyond ``past`` (bounded by the agent's own timeouts)."""
    for _ in range(200):
        value = await counter(vm)
        if value > past:
            return value
        await vm.run(["sleep", "0.1"])
    raise AssertionError(f"the guest's counter stayed at {past}")


async def run_script(*argv: str) -> tuple[int | None, str, str]:
    """Run a Python script from the repository root with this pyqvm importable:
    (exit code, stdout, stderr)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 600)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def run_example(script: str) -> str:
    """Run an example; returns its stdout, asserting it exited 0 and ended with ``ok``."""
    code, out, err = await run_script(script)
    report = f"exit {code}\n--- stdout\n{out}\n--- stderr\n{err}"
    assert code == 0, report
    assert out.splitlines()[-1] == "ok", report
    return out
