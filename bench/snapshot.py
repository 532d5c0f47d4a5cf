"""Internal snapshot save + load of an idle 512 MiB built-in guest: pyqvm vs QMP by hand.

In one VM, each round times ``vm.snapshot_save(tag)`` + ``vm.snapshot_load(tag)``
(pyqvm: state checks, disk discovery, the job followed through its events,
``query-jobs``, ``job-dismiss``) and the bare minimum sent by hand over the
same QMP connection: ``snapshot-save``/``snapshot-load`` with the arguments
QEMU needs, wait for the job's ``concluded`` event, ``job-dismiss``. Each
snapshot is deleted (untimed) before the next round; rounds alternate the
order so drift hits both sides.

    python bench/snapshot.py [-n 11] [--memory 512M]

The last line is ``result: snapshot pyqvm=<median s> baseline=<median s> ratio=<r>``
(save + load).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from pyqvm import AsyncVM, VMSpec


async def by_hand(vm: AsyncVM, command: str, job_id: str, tag: str) -> None:
    args = {"job-id": job_id, "tag": tag, "vmstate": "root", "devices": ["root"]}
    async with vm.events("JOB_STATUS_CHANGE", {"id": job_id, "status": "concluded"}) as events:
        await vm.execute(command, args)
        await events.get()
    await vm.execute("job-dismiss", {"id": job_id})


async def round_pyqvm(vm: AsyncVM, tag: str) -> tuple[float, float]:
    t0 = time.monotonic()
    await vm.snapshot_save(tag)
    t1 = time.monotonic()
    await vm.snapshot_load(tag)
    t2 = time.monotonic()
    await vm.snapshot_delete(tag)
    return t1 - t0, t2 - t1


async def round_hand(vm: AsyncVM, tag: str) -> tuple[float, float]:
    t0 = time.monotonic()
    await by_hand(vm, "snapshot-save", f"save-{tag}", tag)
    t1 = time.monotonic()
    await by_hand(vm, "snapshot-load", f"load-{tag}", tag)
    t2 = time.monotonic()
    await vm.snapshot_delete(tag)
    return t1 - t0, t2 - t1


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=11, help="rounds (default 11)")
    parser.add_argument("--memory", default="512M")
    args = parser.parse_args()
    ours: list[float] = []
    hand: list[float] = []
    async with AsyncVM(VMSpec(image="default", memory=args.memory)) as vm:
        await vm.run(["true"], check=True)
        # One untimed save/load first: the overlay's first allocation is not what we measure.
        await round_hand(vm, "warmup")
        for i in range(args.n):
            sides = [("pyqvm", round_pyqvm, ours), ("hand", round_hand, hand)]
            for name, fn, out in sides if i % 2 == 0 else sides[::-1]:
                save, load = await fn(vm, f"r{i}{name}")
                out.append(save + load)
                print(f"round {i} {name:5s}: save {save:.3f} s  load {load:.3f} s")
        # The guest still answers after all those loads.
        await vm.run(["true"], check=True)
    p, b = statistics.median(ours), statistics.median(hand)
    print(f"median save+load: pyqvm {p:.3f} s, by hand {b:.3f} s")
    print(f"result: snapshot pyqvm={p:.3f} baseline={b:.3f} ratio={p / b:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
