"""A VM from a warm pool vs a clone made on the call vs a cold boot; and a test suite on each.

Part 1, alternating in one run: the time from ``pool.acquire()`` to a finished
``run(["true"])`` on a warm `AsyncPool`; from ``AsyncVM.from_template`` to the same
finished ``run`` (today's clones, the baseline); and from ``AsyncVM(spec).start()`` to it
(a cold boot, every ``--cold-every`` rounds). Before each measurement the pool is full
again and idle, so a refill never competes with the side being measured: what is timed
is what a caller gets from a pool that keeps up.

Part 2: a sample suite of ``--tests`` pytest tests, each starting a VM with the plugin's
``pyqvm_vm`` and running a command that takes about ``--work`` seconds of guest CPU (a
shell loop calibrated once in a clone), run with ``pytest`` twice each way, alternating:
on pools (the plugin's default) and with today's clones (``--pyqvm-pool 0``). Both ways
share pytest's start and the template (made before either runs); the suites' wall times
give ``suite_ratio``.

    python bench/pool.py [-n 20] [--size 2] [--tests 30] [--work 0.3] [--suite-runs 2]

The last line is ``result: pool pyqvm=<median s> baseline=<from_template median s>
ratio=<r> p95=<pool p95 s> suite_ratio=<pools / clones>``.

Part 3 (printed before it): the guest work in as many VMs as cores, just handed out, while
the pool refills behind them at nice 10 vs nice 0 (does a lower CPU priority for refills
spare the VMs in use?).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from pyqvm import AsyncPool, AsyncVM, VMSpec, image, templates


async def timed(start: object) -> float:
    t0 = time.monotonic()
    vm: AsyncVM = await start()  # type: ignore[operator]
    await vm.run(["true"], check=True)
    elapsed = time.monotonic() - t0
    await vm.stop()
    return elapsed


async def full(pool: AsyncPool) -> None:
    while pool.ready < pool.size:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # the refill's QEMU is paused; let the host settle


def anonymous_kib(pid: int) -> int:
    """What a process holds privately (``Anonymous`` of smaps_rollup: its heap, TCG's code,
    its copies of the template's RAM pages)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Anonymous in /proc/{pid}/smaps_rollup")


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


async def calibrate(template: templates.Template, work: float) -> int:
    """Loop iterations of the busybox shell that take about ``work`` seconds in a clone
    whose QEMU has translated the loop already (a second run)."""
    vm = await AsyncVM.from_template(template)
    try:
        n = 2000
        while True:
            await vm.run(["sh", "-c", loop(n)], check=True)
            t0 = time.monotonic()
            await vm.run(["sh", "-c", loop(n)], check=True)
            took = time.monotonic() - t0
            if took > work / 3:
                return max(1, round(n * work / took))
            n *= 4
    finally:
        await vm.stop()


def loop(n: int) -> str:
    return f"i=0; while [ $i -lt {n} ]; do i=$((i+1)); done"


SUITE = """
import pytest

@pytest.mark.parametrize("i", range({tests}))
def test_work(pyqvm_vm, i):
    vm = pyqvm_vm()
    assert vm.run(["sh", "-c", {script!r}]).returncode == 0
"""


def run_suite(directory: Path, extra: list[str], env: dict[str, str]) -> float:
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"the sample suite failed ({extra}):\n{r.stdout[-3000:]}{r.stderr}")
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="rounds of part 1 (default 20)")
    parser.add_argument("--size", type=int, default=2, help="pool size (default 2)")
    parser.add_argument("--cold-every", type=int, default=4, help="a cold boot every N rounds")
    parser.add_argument("--tests", type=int, default=30, help="tests in the sample suite")
    parser.add_argument("--work", type=float, default=0.3, help="guest CPU seconds per test")
    parser.add_argument("--suite-runs", type=int, default=2, help="suite runs each way")
    parser.add_argument("--nice-rounds", type=int, default=6, help="rounds of part 3")
    args = parser.parse_args()
    spec = VMSpec(image="default")
    image.find("default")  # built already (the suite's plugin would build it otherwise)
    template = await templates.ensure(spec)

    times: dict[str, list[float]] = {"pool": [], "clone": [], "cold": []}
    async with AsyncPool(template, size=args.size) as pool:
        sides = {
            "pool": pool.acquire,
            "clone": lambda: AsyncVM.from_template(template),
            "cold": lambda: _cold(spec),
        }
        for i in range(args.n):
            order = ["pool", "clone"] if i % 2 == 0 else ["clone", "pool"]
            if i % args.cold_every == 0:
                order.append("cold")
            for name in order:
                await full(pool)
                times[name].append(await timed(sides[name]))
            line = "  ".join(f"{k} {times[k][-1]:.3f}" for k in order)
            print(f"round {i:2d}: {line}", flush=True)
        await full(pool)
        await asyncio.sleep(2)
        spare_kib = [anonymous_kib(pid) for pid in pool.spare_pids]
        cpu0 = [cpu_ticks(pid) for pid in pool.spare_pids]
        await asyncio.sleep(5)
        cpu = [cpu_ticks(pid) - c for pid, c in zip(pool.spare_pids, cpu0, strict=True)]
        hz = os.sysconf("SC_CLK_TCK")
        print(
            "an idle spare: private memory "
            + ", ".join(f"{k / 1024:.1f}" for k in spare_kib)
            + f" MiB; CPU over 5 s: {', '.join(f'{c / hz:.2f}' for c in cpu)} s"
        )

    work_n = await calibrate(template, args.work)
    print(f"guest work: a shell loop of {work_n} iterations (~{args.work} s)")
    # Part 3: does a refill at a lower CPU priority spare the VMs in use? As many VMs as
    # cores are handed out and run the work at once (every core busy, as under pytest-xdist
    # -n auto) while the pool refills behind them, refills at nice 10 vs 0.
    cores = os.cpu_count() or 1
    niced: dict[int, list[float]] = {0: [], 10: []}
    for i in range(args.nice_rounds):
        for nice in (10, 0) if i % 2 == 0 else (0, 10):
            async with AsyncPool(template, size=cores, nice=nice) as p:
                await full(p)
                vms = [await p.acquire() for _ in range(cores)]
                t0 = time.monotonic()
                await asyncio.gather(*(vm.run(["sh", "-c", loop(work_n)]) for vm in vms))
                niced[nice].append(time.monotonic() - t0)
    if args.nice_rounds:
        n10, n0 = statistics.median(niced[10]), statistics.median(niced[0])
        print(
            f"work on {cores} VMs beside refills: nice 10 {n10:.3f} s, nice 0 {n0:.3f} s "
            f"(ratio {n10 / n0:.3f})"
        )
    suite: dict[str, list[float]] = {"pools": [], "clones": []}
    with tempfile.TemporaryDirectory(prefix="pyqvm-bench-suite-") as tmp:
        d = Path(tmp)
        (d / "test_suite.py").write_text(
            textwrap.dedent(SUITE.format(tests=args.tests, script=loop(work_n)))
        )
        (d / "pytest.ini").write_text("[pytest]\n")
        env = dict(os.environ)
        ways = {"pools": [], "clones": ["--pyqvm-pool", "0"]}
        for i in range(args.suite_runs):
            for name in ("pools", "clones") if i % 2 == 0 else ("clones", "pools"):
                suite[name].append(run_suite(d, ways[name], env))
                print(f"suite run {i} {name}: {suite[name][-1]:.2f} s", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:5s}: median {med[k]:.3f} s  p95 {p95(v):.3f} s  ({len(v)} runs)")
    nan = float("nan")
    pools = statistics.median(suite["pools"]) if suite["pools"] else nan
    clones = statistics.median(suite["clones"]) if suite["clones"] else nan
    print(f"suite of {args.tests}: pools {pools:.2f} s, clones {clones:.2f} s")
    print(
        f"cold boot + run: median {med['cold']:.3f} s (pool/cold {med['pool'] / med['cold']:.3f})"
    )
    print(
        f"result: pool pyqvm={med['pool']:.3f} baseline={med['clone']:.3f} "
        f"ratio={med['pool'] / med['clone']:.3f} p95={p95(times['pool']):.3f} "
        f"suite_ratio={pools / clones:.3f}"
    )


async def _cold(spec: VMSpec) -> AsyncVM:
    vm = AsyncVM(spec)
    await vm.start()
    return vm


if __name__ == "__main__":
    asyncio.run(main())
