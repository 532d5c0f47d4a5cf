"""Boot the built-in guest, use it, and tear it down.

Run it with ``python examples/ephemeral_vm.py`` (build the guest first with
``pyqvm image build``). It runs a command in the guest, writes a file there and
reads it back, asks QEMU for its status over QMP, and stops the VM; nothing is
left behind. It exits 1 if anything in the guest is not as expected, and 125
if pyqvm itself fails (like ``pyqvm run``).
"""

from __future__ import annotations

import asyncio
import sys

from pyqvm import AsyncVM, PyqvmError, VMSpec

MESSAGE = b"written by examples/ephemeral_vm.py\n"


async def main() -> int:
    problems: list[str] = []
    spec = VMSpec(image="default", memory=512)  # MiB
    async with AsyncVM(spec) as vm:
        print(f"booted {vm.name} with {vm.accelerator} in {vm.boot_seconds:.1f} s")

        # A command, run through the guest agent (no shell unless you ask for one).
        result = await vm.run(["uname", "-sr"])
        print(f"uname -sr: exit {result.returncode}: {result.stdout_text.strip()}")
        if result.returncode != 0 or not result.stdout_text.startswith("Linux"):
            problems.append(f"uname -sr gave {result!r}")

        # A guest file, written and read back through the guest agent.
        await vm.write_file("/tmp/pyqvm-example.txt", MESSAGE)
        data = await vm.read_file("/tmp/pyqvm-example.txt")
        print(f"read back {len(data)} bytes: {data.decode().strip()!r}")
        if data != MESSAGE:
            problems.append(f"read back {data!r}, wrote {MESSAGE!r}")

        # QEMU itself, over QMP.
        status = await vm.execute("query-status")
        print(f"query-status: {status['status']}")
        if status["status"] != "running":
            problems.append(f"query-status says {status!r}")

    # Leaving the block stopped QEMU and removed the runtime dir and overlay.
    print(f"stopped: state {vm.state.value}, runtime dir {vm.runtime_dir}")
    if vm.runtime_dir is not None:
        problems.append("the runtime dir is still there")

    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    print("ok" if not problems else "FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except PyqvmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(125)
