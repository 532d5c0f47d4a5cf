"""A clone of a template through pyqvm vs the same restore done by hand: pyqvm's own cost.

Makes one template (untimed). Each round starts a clone with
``AsyncVM.from_template`` and, by hand, the same restore: the clone's argv
(taken from a pyqvm clone, with its own socket pairs at the same fd numbers
and its own runtime dir), an overlay made with ``qemu-img create`` over the
template's frozen disk, ``subprocess.Popen``, QMP through ``qemu.qmp``
(``x-ignore-shared`` on, ``migrate-incoming`` of the template's state by fd, ``cont``),
the agent's ``guest-sync``, the clock and entropy line to pyqvm-wake's port
(what makes a clone its own), and ``guest-exec true``. Both sides are timed
from the call until ``true`` ran (the same agent client polls both).
Rounds alternate the order.

    python bench/clone.py [-n 9] [--memory 512M]

The last line is ``result: clone pyqvm=<median s> baseline=<median by hand s> ratio=<r>
overhead_ms=<pyqvm - by hand, median of the rounds' differences>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from handmade import socket_pairs, with_fds
from qemu.qmp import QMPClient

from pyqvm import AsyncVM, GuestAgent, Template, VMSpec, templates

STATE_FILE = "vmstate"  # pyqvm.ops.migration's name for the state in a saved dir


async def clone_pyqvm(template: Template) -> tuple[float, list[str]]:
    t0 = time.monotonic()
    vm = await AsyncVM.from_template(template)
    try:
        await vm.run(["true"], check=True)
        elapsed = time.monotonic() - t0
        rundir = vm.runtime_dir
        assert rundir is not None
        return elapsed, [a.replace(str(rundir), "{RUNDIR}") for a in vm.argv]
    finally:
        await vm.stop()


async def clone_by_hand(argv_template: list[str], template: Template) -> float:
    rundir = Path(tempfile.mkdtemp(prefix="bench-clone-"))
    argv = [a.replace("{RUNDIR}", str(rundir)) for a in argv_template]
    pairs = socket_pairs(argv)
    theirs = {name: qemu for name, (_, qemu) in pairs.items()}
    argv = with_fds(argv, {name: s.fileno() for name, s in theirs.items()})
    qmp_sock, qga_sock, wake_sock = (pairs[n][0] for n in ("pq-qmp", "pq-qga", "pq-wake"))
    agent = GuestAgent(name="bench")
    qmp = QMPClient("bench")
    state = template.state_dir / STATE_FILE
    t0 = time.monotonic()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
         str(template.state_dir / "root.qcow2"), str(rundir / "root.qcow2")],
        check=True,
    )  # fmt: skip
    proc = subprocess.Popen(
        argv, pass_fds=[s.fileno() for s in theirs.values()], stderr=subprocess.DEVNULL
    )
    try:
        for s in theirs.values():
            s.close()
        await qmp.connect(qmp_sock)
        await agent.connect(qga_sock)
        caps = [{"capability": "x-ignore-shared", "state": True}]
        await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
        # The state as an fd (the sandbox forbids QEMU an exec: URI).
        fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            qmp.send_fd_scm(fd)
            await qmp.execute("getfd", {"fdname": "mig"})
        finally:
            os.close(fd)
        await qmp.execute("migrate-incoming", {"uri": "fd:mig"})
        while True:
            status = await qmp.execute("query-migrate")
            if isinstance(status, dict) and status.get("status") == "completed":
                break
            await asyncio.sleep(0.001)
        await qmp.execute("cont")
        await agent.wait_ready(30)
        loop = asyncio.get_running_loop()
        wake_sock.setblocking(False)
        await loop.sock_sendall(wake_sock, f"{time.time_ns()} {os.urandom(64).hex()}\n".encode())
        reply = b""
        while not reply.endswith(b"\n"):
            reply += await loop.sock_recv(wake_sock, 256)
        assert reply == b"ok\n", reply
        (await agent.exec(["true"])).check()
        elapsed = time.monotonic() - t0
    finally:
        await agent.close()
        await qmp.disconnect()
        proc.kill()
        proc.wait()
        for ours, _ in pairs.values():
            ours.close()
        shutil.rmtree(rundir, ignore_errors=True)
    return elapsed


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=9, help="clones per side")
    ap.add_argument("--memory", default="512M")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyqvm-bench-") as tmp:
        template = await templates.create(
            VMSpec(image="default", memory=args.memory), "bench", directory=Path(tmp)
        )
        _, argv = await clone_pyqvm(template)  # warm-up, and the argv for the by-hand side
        ours: list[float] = []
        theirs: list[float] = []
        for i in range(args.n):
            if i % 2 == 0:
                ours.append((await clone_pyqvm(template))[0])
                theirs.append(await clone_by_hand(argv, template))
            else:
                theirs.append(await clone_by_hand(argv, template))
                ours.append((await clone_pyqvm(template))[0])
            print(f"round {i + 1}: pyqvm {ours[-1]:.3f} s  by hand {theirs[-1]:.3f} s", flush=True)
    for label, xs in (("pyqvm", ours), ("by hand", theirs)):
        print(
            f"{label:8}  median {statistics.median(xs):.3f} s  min {min(xs):.3f}  max {max(xs):.3f}"
        )
    p, b = statistics.median(ours), statistics.median(theirs)
    over = statistics.median(o - t for o, t in zip(ours, theirs, strict=True)) * 1000
    print(f"result: clone pyqvm={p:.3f} baseline={b:.3f} ratio={p / b:.3f} overhead_ms={over:.1f}")


if __name__ == "__main__":
    asyncio.run(main())
