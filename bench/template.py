"""A clone of a template vs a cold boot of the built-in guest: time to a first command, and memory.

Makes one template (untimed), then alternates rounds: a cold boot
(``AsyncVM(spec).start()``) and a clone (``AsyncVM.from_template(t)``), each
timed from the call until its first ``run(["true"])`` succeeded. Every VM is
then left idle for ``--idle`` seconds and its QEMU's proportional set size
(``Pss`` of ``/proc/PID/smaps_rollup``: shared pages split among sharers) is
read. A VM alone shares nothing, so its QEMU's code and the template's page
cache count in full; the memory a template saves shows when clones run side
by side. So PSS is also measured with ``--together`` VMs of a kind alive at
once (clones of one template, or cold boots of one image), per VM.

A clone's private memory (``Anonymous`` of smaps_rollup: pages no other
process has, its copy-on-write copies of the template's RAM included) is what
each further clone costs. Each round also starts a clone the way pyqvm did
before it trimmed QEMU's own memory for templates and clones (QEMU's 1 GiB
translation cache and transparent huge pages: `pyqvm.launch.plan.QEMU_DEFAULTS`
instead of `FILE_RAM`), and both clones' idle private memory is reported.

    python bench/template.py [-n 7] [--memory 512M] [--idle 1] [--together 4]

The last line is ``result: template pyqvm=<clone median s> baseline=<cold median s>
ratio=<r> pss_ratio=<clone PSS / cold PSS, alone> pss_together=<the same, K at once>
private=<clone's private MiB> private_before=<the same with QEMU's defaults>
private_ratio=<private / private_before>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pyqvm import AsyncVM, VMSpec, templates
from pyqvm.launch import plan


def rollup_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/smaps_rollup")


def pss_kib(pid: int) -> int:
    return rollup_kib(pid, "Pss")


async def measure(start: object, idle: float) -> tuple[float, int, int]:
    """Time to a first command, then PSS and private memory (KiB) after ``idle`` s."""
    t0 = time.monotonic()
    vm = await start()  # type: ignore[operator]
    try:
        await vm.run(["true"], check=True)
        ready = time.monotonic() - t0
        await asyncio.sleep(idle)
        assert vm.pid is not None
        return ready, pss_kib(vm.pid), rollup_kib(vm.pid, "Anonymous")
    finally:
        await vm.stop()


@contextlib.contextmanager
def qemu_memory(tuning: plan.QemuMemory) -> Iterator[None]:
    """Launch templates and clones with ``tuning`` of QEMU's own memory meanwhile."""
    saved = plan.FILE_RAM
    plan.FILE_RAM = tuning
    try:
        yield
    finally:
        plan.FILE_RAM = saved


async def pss_together(start: object, count: int, idle: float) -> list[int]:
    """PSS of each of ``count`` VMs alive at once, idle after a first command."""
    vms: list[AsyncVM] = []
    try:
        for _ in range(count):
            vm = await start()  # type: ignore[operator]
            vms.append(vm)
            await vm.run(["true"], check=True)
        await asyncio.sleep(idle)
        return [pss_kib(vm.pid) for vm in vms if vm.pid is not None]
    finally:
        await asyncio.gather(*(vm.stop() for vm in vms))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=7, help="rounds (default 7)")
    parser.add_argument("--memory", default="512M")
    parser.add_argument("--idle", type=float, default=1.0, help="seconds idle before PSS")
    parser.add_argument("--together", type=int, default=4, help="VMs alive at once (default 4)")
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

        async def clone_before() -> AsyncVM:
            with qemu_memory(plan.QEMU_DEFAULTS):
                return await AsyncVM.from_template(template)

        sides = [("clone", clone), ("before", clone_before), ("cold", cold)]
        times: dict[str, list[float]] = {name: [] for name, _ in sides}
        pss: dict[str, list[int]] = {name: [] for name, _ in sides}
        private: dict[str, list[int]] = {name: [] for name, _ in sides}
        for i in range(args.n):
            for name, fn in sides if i % 2 == 0 else sides[::-1]:
                ready, kib, own = await measure(fn, args.idle)
                times[name].append(ready)
                pss[name].append(kib)
                private[name].append(own)
                print(
                    f"round {i} {name:6s}: ready {ready:.3f} s  PSS {kib / 1024:.1f} MiB  "
                    f"private {own / 1024:.1f} MiB"
                )
        together: dict[str, list[int]] = {}
        for name, fn in (("clone", clone), ("cold", cold)):
            together[name] = await pss_together(fn, args.together, args.idle)
            each = " ".join(f"{k / 1024:.1f}" for k in together[name])
            print(f"{args.together} {name} VMs at once: PSS each {each} MiB")
    c, b = statistics.median(times["clone"]), statistics.median(times["cold"])
    pc, pb = statistics.median(pss["clone"]), statistics.median(pss["cold"])
    cb = statistics.median(times["before"])
    print(f"median ready: clone {c:.3f} s (with QEMU's defaults {cb:.3f} s), cold boot {b:.3f} s")
    tc, tb = statistics.median(together["clone"]), statistics.median(together["cold"])
    print(f"median idle PSS: clone {pc / 1024:.1f} MiB, cold boot {pb / 1024:.1f} MiB")
    print(
        f"median idle PSS with {args.together} at once: clone {tc / 1024:.1f} MiB, "
        f"cold boot {tb / 1024:.1f} MiB"
    )
    mine, before = statistics.median(private["clone"]), statistics.median(private["before"])
    print(
        f"median idle private memory per clone: {mine / 1024:.1f} MiB, with QEMU's defaults "
        f"{before / 1024:.1f} MiB (x{mine / before:.3f}); cold boot "
        f"{statistics.median(private['cold']) / 1024:.1f} MiB"
    )
    print(
        f"result: template pyqvm={c:.3f} baseline={b:.3f} ratio={c / b:.3f} "
        f"pss_ratio={pc / pb:.3f} pss_together={tc / tb:.3f} private={mine / 1024:.1f} "
        f"private_before={before / 1024:.1f} private_ratio={mine / before:.3f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
