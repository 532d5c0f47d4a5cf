"""A command in a named VM from the shell vs the same command in-process: the CLI's round trip.

Starts a named VM (``pyqvm up --name bench-exec-<pid>``, the built-in guest with
one user-mode NIC, as ``pyqvm up`` gives by default) through the installed
``pyqvm`` entry point, and a second VM of the same spec inside this process
(``AsyncVM(spec).start()``). Both are warmed up with one untimed command, then
rounds alternate (the order flips every round, so drift in machine load hits
both sides): ``pyqvm exec NAME -- true`` as a subprocess, timed from its spawn
to its exit (a new Python, ``import pyqvm.cli``, connecting to the owner's
socket, the owner's ``guest-exec``), and ``await vm.run(["true"])`` on the
in-process VM (the guest agent's work alone). The difference is what the
command line costs per call. For reference, the wall time of
``python -c "import pyqvm.cli"`` and of a bare ``python -c pass`` (medians of
``--imports`` runs each) are printed too. The named VM is stopped at the end,
also when a round fails.

    python bench/named.py [-n 15] [--imports 7]

Set ``PYQVM_RUNTIME_DIR`` to keep the bench's named VM out of your own registry.
The last line is ``result: exec pyqvm=<CLI median s> baseline=<in-process median s>
ratio=<r>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pyqvm import AsyncVM, Network, VMSpec


def pyqvm_command() -> list[str]:
    """The installed ``pyqvm`` entry point next to this Python, else ``python -m pyqvm``."""
    exe = Path(sys.executable).with_name("pyqvm")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pyqvm"]


def wall(argv: list[str]) -> float:
    """Seconds from spawning ``argv`` to its exit (it must succeed)."""
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
    return time.monotonic() - t0


async def cli_exec(pyqvm: list[str], name: str) -> float:
    """One ``pyqvm exec NAME -- true``, timed from spawn to exit."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *pyqvm, "exec", name, "--", "true", stdin=subprocess.DEVNULL
    )
    code = await proc.wait()
    elapsed = time.monotonic() - t0
    if code != 0:
        raise RuntimeError(f"pyqvm exec {name} -- true exited {code}")
    return elapsed


async def api_run(vm: AsyncVM) -> float:
    """One in-process ``vm.run(["true"])``."""
    t0 = time.monotonic()
    await vm.run(["true"], check=True)
    return time.monotonic() - t0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=15, help="rounds (default 15)")
    ap.add_argument(
        "--imports", type=int, default=7, help="runs of each interpreter start (default 7)"
    )
    args = ap.parse_args()

    python = [sys.executable, "-c"]
    pass_times = [wall([*python, "pass"]) for _ in range(args.imports)]
    import_times = [wall([*python, "import pyqvm.cli"]) for _ in range(args.imports)]
    bare, cli_import = statistics.median(pass_times), statistics.median(import_times)

    pyqvm = pyqvm_command()
    name = f"bench-exec-{os.getpid()}"
    spec = VMSpec(image="default", networks=(Network(),))
    cli: list[float] = []
    api: list[float] = []
    try:
        t0 = time.monotonic()
        up = await asyncio.create_subprocess_exec(
            *pyqvm, "up", "--name", name, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        if await up.wait() != 0:
            raise SystemExit(f"pyqvm up --name {name} failed (exit status {up.returncode})")
        print(f"named VM {name} up in {time.monotonic() - t0:.2f} s ({' '.join(pyqvm)})")
        async with AsyncVM(spec) as vm:
            await cli_exec(pyqvm, name)  # warm-up, not counted: page cache, TCG's code cache
            await api_run(vm)
            for i in range(args.n):
                if i % 2 == 0:
                    cli.append(await cli_exec(pyqvm, name))
                    api.append(await api_run(vm))
                else:
                    api.append(await api_run(vm))
                    cli.append(await cli_exec(pyqvm, name))
                print(
                    f"round {i + 1}: pyqvm exec {cli[-1]:.3f} s  vm.run {api[-1]:.3f} s", flush=True
                )
    finally:
        stop = subprocess.run([*pyqvm, "stop", name], stdin=subprocess.DEVNULL)
        if stop.returncode != 0:
            print(f"pyqvm stop {name}: exit status {stop.returncode}", file=sys.stderr)

    print(f"python -c pass               median {bare:.3f} s  (n={args.imports})")
    print(f"python -c 'import pyqvm.cli' median {cli_import:.3f} s  (n={args.imports})")
    for label, xs in (("pyqvm exec", cli), ("vm.run", api)):
        med = statistics.median(xs)
        print(f"{label:10}  median {med:.3f} s  min {min(xs):.3f}  max {max(xs):.3f}  n={len(xs)}")
    p, b = statistics.median(cli), statistics.median(api)
    print(f"result: exec pyqvm={p:.3f} baseline={b:.3f} ratio={p / b:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
