"""16 VMs at once from one asyncio loop: cold boots vs clones of a template.

Starts ``-n`` VMs of the built-in guest concurrently (``asyncio.gather``) and
times until every one of them has answered ``run(["true"])``; first as clones of
one template, then as cold boots (the template is made first, untimed). With all
of them idle, it reads each QEMU's PSS (``/proc/PID/smaps_rollup``).

    python bench/scale.py [-n 16] [--memory 512M]

The last line is ``result: scale pyqvm=<s for n clones> baseline=<s for n cold boots>
ratio=<r>``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from pyqvm import AsyncVM, VMSpec, templates


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


async def wave(n: int, start: Callable[[], Awaitable[AsyncVM]]) -> tuple[float, float]:
    """Seconds until ``n`` VMs all answered, and their mean PSS in MiB."""

    async def one() -> AsyncVM:
        vm = await start()
        await vm.run(["true"], check=True)
        return vm

    t0 = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    elapsed = time.monotonic() - t0
    vms = [r for r in results if isinstance(r, AsyncVM)]
    try:
        errors = [r for r in results if not isinstance(r, AsyncVM)]
        if errors:
            raise RuntimeError(f"{len(errors)} of {n} VMs failed: {errors[0]!r}")
        await asyncio.sleep(1)
        pss = [pss_mib(vm.pid) for vm in vms if vm.pid is not None]
        return elapsed, sum(pss) / len(pss)
    finally:
        await asyncio.gather(*(vm.stop() for vm in vms))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=16, help="VMs at once (default 16)")
    parser.add_argument("--memory", default="512M")
    args = parser.parse_args()
    spec = VMSpec(image="default", memory=args.memory)
    with tempfile.TemporaryDirectory(prefix="pyqvm-bench-") as tmp:
        template = await templates.create(spec, "scale", directory=Path(tmp))

        async def clone() -> AsyncVM:
            return await AsyncVM.from_template(template)

        async def cold() -> AsyncVM:
            vm = AsyncVM(spec)
            await vm.start()
            return vm

        c, c_pss = await wave(args.n, clone)
        print(f"{args.n} clones: all answered in {c:.2f} s, PSS {c_pss:.1f} MiB per VM")
        b, b_pss = await wave(args.n, cold)
        print(f"{args.n} cold boots: all answered in {b:.2f} s, PSS {b_pss:.1f} MiB per VM")
    print(f"result: scale pyqvm={c:.3f} baseline={b:.3f} ratio={c / b:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
