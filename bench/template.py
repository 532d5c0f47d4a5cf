"""A clone of a template vs a cold boot of the built-in guest: time to a first command, and memory.

Makes one template (untimed), then alternates rounds: a cold boot
(``AsyncVM(spec).start()``) and a clone (``AsyncVM.from_template(t)``), each
timed from the call until its first ``run(["true"])`` succeeded. Every VM is
then left idle for ``--idle`` seconds and its QEMU's proportional set size
(``Pss`` of ``/proc/PID/smaps_rollup``: shared pages split among sharers) is
read, so a clone's share of the template's page cache counts, only divided.

    python bench/template.py [-n 7] [--memory 512M] [--idle 1]

The last line is ``result: template pyqvm=<clone median s> baseline=<cold median s>
ratio=<r> pss_ratio=<clone PSS / cold PSS>``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from pyqvm import AsyncVM, VMSpec, templates


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


async def measure(start: object, idle: float) -> tuple[float, int]:
    t0 = time.monotonic()
    vm = await start()  # type: ignore[operator]
    try:
        await vm.run(["true"], check=True)
        ready = time.monotonic() - t0
        await asyncio.sleep(idle)
        assert vm.pid is not None
        return ready, pss_kib(vm.pid)
    finally:
        await vm.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=7, help="rounds (default 7)")
    parser.add_argument("--memory", default="512M")
    parser.add_argument("--idle", type=float, default=1.0, help="seconds idle before PSS")
    args = parser.parse_args()
    spec = VMSpec(image="default", memory=args.memory)
    with tempfile.TemporaryDirectory(prefix="pyqvm-bench-") as tmp:
        t0 = time.monotonic()
        template = await templates.create(spec, "bench", directory=Path(tmp))
        print(f"template made in {time.monotonic() - t0:.2f} s")

        async def cold() -> AsyncVM:
            vm = AsyncVM(spec)
            await vm.start()
            return vm

        async def clone() -> AsyncVM:
            return await AsyncVM.from_template(template)

        times: dict[str, list[float]] = {"clone": [], "cold": []}
        pss: dict[str, list[int]] = {"clone": [], "cold": []}
        for i in range(args.n):
            sides = [("clone", clone), ("cold", cold)]
            for name, fn in sides if i % 2 == 0 else sides[::-1]:
                ready, kib = await measure(fn, args.idle)
                times[name].append(ready)
                pss[name].append(kib)
                print(f"round {i} {name:5s}: ready {ready:.3f} s  PSS {kib / 1024:.1f} MiB")
    c, b = statistics.median(times["clone"]), statistics.median(times["cold"])
    pc, pb = statistics.median(pss["clone"]), statistics.median(pss["cold"])
    print(f"median ready: clone {c:.3f} s, cold boot {b:.3f} s")
    print(f"median idle PSS: clone {pc / 1024:.1f} MiB, cold boot {pb / 1024:.1f} MiB")
    print(
        f"result: template pyqvm={c:.3f} baseline={b:.3f} ratio={c / b:.3f} "
        f"pss_ratio={pc / pb:.3f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
