"""Live migration of a 512 MiB guest over TCP on loopback: QEMU's defaults vs pyqvm's.

Three cases, each with one guest that hops from launcher instance to launcher
instance (every migration goes into a fresh `AsyncVM`, over ``tcp`` on 127.0.0.1,
shared storage):

- ``idle``: the guest as booted;
- ``filled``: 300 MiB of random data in a guest tmpfs first (RAM that is not zero);
- ``dirtying``: a guest process keeps rewriting a 64 MiB tmpfs file during the migration.

Each round migrates the guest once with QEMU's parameters (``baseline``:
`MigrationTuning.qemu_defaults`, a 128 MiB/s cap in QEMU 7.2) and once with
pyqvm's (`MigrationTuning()`: cap lifted, 300 ms downtime limit), in alternating
order. Times and downtime are QEMU's own (``query-migrate``); a migration that
does not converge within ``--give-up`` seconds is cancelled (the guest runs on
where it was) and reported as such.

    python bench/migration.py [-n 3] [--give-up 30] [--cases idle,filled,dirtying]

The last line is ``result: migration pyqvm=<median s> baseline=<median s> ratio=<r>``
for the ``filled`` case.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from dataclasses import dataclass

from pyqvm import AsyncVM, MigrationError, MigrationStats, MigrationTuning, VMSpec

SPEC = VMSpec(image="default", name="bench-mig", memory=512, smp=1)
FILL = "mount -o remount,size=400M /tmp && dd if=/dev/urandom of=/tmp/fill bs=1M count=300"
DIRTY = (
    "dd if=/dev/urandom of=/tmp/dirty-src bs=1M count=64 2>/dev/null; "
    "setsid sh -c 'while :; do dd if=/tmp/dirty-src of=/tmp/dirty bs=1M count=64 "
    "conv=notrunc 2>/dev/null; done' </dev/null >/dev/null 2>&1 &"
)
TUNINGS = {"baseline": MigrationTuning.qemu_defaults(), "pyqvm": MigrationTuning()}


@dataclass
class Run:
    case: str
    tuning: str
    stats: MigrationStats | None
    error: str = ""


async def prepare(vm: AsyncVM, case: str) -> None:
    if case == "filled":
        await vm.run(["sh", "-c", FILL], check=True, timeout=300)
    elif case == "dirtying":
        await vm.run(["sh", "-c", DIRTY], check=True, timeout=120)


async def hop(vm: AsyncVM, tuning: MigrationTuning, give_up: float) -> tuple[AsyncVM, Run]:
    """Migrate ``vm`` into a new instance; returns the VM that runs the guest afterwards."""
    dst = AsyncVM(SPEC)
    try:
        stats = await vm.migrate(dst, transport="tcp", tuning=tuning, timeout=give_up)
    except MigrationError as e:
        return vm, Run("", "", None, str(e).splitlines()[0])
    return dst, Run("", "", stats)


async def bench_case(case: str, rounds: int, give_up: float) -> list[Run]:
    vm = AsyncVM(SPEC)
    await vm.start()
    runs: list[Run] = []
    try:
        await prepare(vm, case)
        for i in range(rounds):
            order = ["baseline", "pyqvm"] if i % 2 == 0 else ["pyqvm", "baseline"]
            for name in order:
                vm, run = await hop(vm, TUNINGS[name], give_up)
                run.case, run.tuning = case, name
                runs.append(run)
                print(line(run), flush=True)
        # The guest is still the one that was prepared: its data survived every hop.
        if case == "filled":
            size = (await vm.run(["stat", "-c", "%s", "/tmp/fill"], check=True)).stdout_text
            assert int(size) == 300 * 2**20, size
    finally:
        await vm.stop()
    return runs


def line(run: Run) -> str:
    head = f"{run.case:>9} {run.tuning:>8}:"
    if run.stats is None:
        return f"{head} did not finish: {run.error}"
    s = run.stats
    return (
        f"{head} total {s.total_time:6.3f} s  downtime {s.downtime * 1000:5.0f} ms  "
        f"transferred {s.transferred / 2**20:7.1f} MiB  passes {s.passes:3d}  "
        f"(with destination start {s.wall_time:6.3f} s)"
    )


def median_total(runs: list[Run], case: str, tuning: str, give_up: float) -> float:
    # A migration that never finished counts as the time we gave it.
    times = [
        r.stats.total_time if r.stats else give_up
        for r in runs
        if r.case == case and r.tuning == tuning
    ]
    return statistics.median(times)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--rounds", type=int, default=3)
    ap.add_argument("--give-up", type=float, default=30.0, help="seconds before cancelling")
    ap.add_argument("--cases", default="idle,filled,dirtying")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in ("idle", "filled", "dirtying"):
            ap.error(f"unknown case {c!r}")
    print(f"guest: {SPEC.memory} MiB, {SPEC.smp} vCPU; tcp on loopback; {args.rounds} rounds")
    t0 = time.monotonic()
    runs: list[Run] = []
    for case in cases:
        runs += await bench_case(case, args.rounds, args.give_up)
    print(f"\nmedians of QEMU's total time ({time.monotonic() - t0:.0f} s in all):")
    for case in cases:
        for name in TUNINGS:
            sel = [r for r in runs if r.case == case and r.tuning == name]
            done = [r.stats for r in sel if r.stats]
            down = statistics.median([s.downtime * 1000 for s in done]) if done else float("nan")
            xfer = (
                statistics.median([s.transferred / 2**20 for s in done]) if done else float("nan")
            )
            print(
                f"{case:>9} {name:>8}: total {median_total(runs, case, name, args.give_up):6.3f} s"
                f"  downtime {down:5.0f} ms  transferred {xfer:7.1f} MiB"
                f"  finished {len(done)}/{len(sel)}"
            )
    if "filled" not in cases:
        return 0
    ours = median_total(runs, "filled", "pyqvm", args.give_up)
    base = median_total(runs, "filled", "baseline", args.give_up)
    print(f"result: migration pyqvm={ours:.3f} baseline={base:.3f} ratio={ours / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
