"""Move a running guest to a second launcher instance, then save it to files and restore it.

Run it with ``python examples/migrate.py`` (build the guest first with
``pyqvm image build``). It uses the blocking face (`pyqvm.VM`); `pyqvm.AsyncVM`
has the same methods as coroutines.

1. Boot the built-in guest and start a counter loop in it.
2. Live-migrate it over a unix socket into a second VM made from the same spec,
   sharing its disk: the counter keeps counting there, from where it was.
3. Save that guest's state and disk to a directory, and start a third VM from it.

It exits 1 if the guest does not see what it should, 125 if pyqvm itself fails.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time

from pyqvm import VM, MigrationProgress, PyqvmError, VMSpec

# Written aside and renamed, so a reader never sees the file half-written (empty).
COUNTER = (
    "i=0; while :; do i=$((i+1)); echo $i > /tmp/counter.new; "
    "mv /tmp/counter.new /tmp/counter; sleep 0.05; done"
)


def counter(vm: VM) -> int:
    return int(vm.read_file("/tmp/counter").decode())


def show(p: MigrationProgress) -> None:
    print(
        f"  {p.status:>10} {p.elapsed:5.2f} s  {p.transferred >> 20:4d} MiB sent, "
        f"{p.remaining >> 20:4d} MiB left, {p.rate / 2**20:6.0f} MiB/s",
        file=sys.stderr,
    )


def main() -> int:
    problems: list[str] = []
    spec = VMSpec(image="default", memory=512)
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(VM(spec))  # boots
        # Not started yet: `migrate` starts it with -incoming and moves the guest in.
        # (push: leaving the block stops it and closes its loop, like `with`.)
        dst = stack.push(VM(spec))
        src.run(["sh", "-c", f"setsid sh -c '{COUNTER}' </dev/null >/dev/null 2>&1 &"], check=True)
        src.run(["sleep", "0.5"])
        before = counter(src)

        stats = src.migrate(dst, transport="unix", storage="shared", progress=show)
        after = counter(dst)
        print(f"migrated: counter {before} -> {after}, downtime {stats.downtime * 1000:.0f} ms")
        print(f"source: {src.state.value}, destination: {dst.state.value}")
        if after <= before:
            problems.append(f"the counter went from {before} to {after} across the migration")

        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        saved = dst.save(f"{tmp}/state")  # the VM stops; its state and disk are files now
        print(f"saved {saved.size >> 20} MiB of state to {saved.directory}")
        restored = stack.push(VM(spec))
        t0 = time.monotonic()
        restored.restore(saved.directory)  # starts the VM from the files, no boot
        print(f"restore took {time.monotonic() - t0:.2f} s", file=sys.stderr)
        restored.run(["sleep", "0.2"])
        now = counter(restored)
        print(f"restored: counter {after} -> {now}")
        if now < after:
            problems.append(f"the restored counter is {now}, saved at >= {after}")

    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    print("ok" if not problems else "FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PyqvmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(125)
