"""Reach into and between guests: a shared host folder, ssh, a private network, gdb.

Run it with ``python examples/reach.py`` (as root for virtiofs; build the guest first with
``pyqvm image build``). Two built-in guests on the private network "example-lab" share a
host directory read-only; one pings the other, lists the share over ssh, and gdb reads
the kernel's banner from it. It prints ``ok`` at the end, exits 1 if something is not as
expected, and 125 if pyqvm itself fails.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from pyqvm import VM, Network, PyqvmError, Share, VMSpec


def spec(name: str, folder: Path) -> VMSpec:
    return VMSpec(
        image="default",
        name=name,
        memory=256,
        ssh=True,
        gdb=True,
        shares=[Share(folder, guest="/mnt/src", readonly=True)],
        networks=[Network(), Network(mode="private", name="example-lab")],
    )


def main() -> int:
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "hello.txt").write_text("from the host\n")
        with VM(spec("a", folder)) as a, VM(spec("b", folder)) as b:
            b_addr = next(iter(b.private_networks.values())).address
            print(f"b is {b_addr} on example-lab")
            ping = a.run(["ping", "-c", "1", "-w", "10", str(b_addr.ip)])
            print(f"a pings b: exit {ping.returncode}")
            if ping.returncode != 0:
                problems.append(f"ping: {ping.stdout_text}")

            ssh = subprocess.run(a.ssh_argv(["cat", "/mnt/src/hello.txt"]), capture_output=True)
            print(f"over ssh: {ssh.stdout.decode().strip()!r}")
            if ssh.stdout != b"from the host\n":
                problems.append(f"ssh: {ssh!r}")

            banner = a.run(["grep", " linux_banner$", "/proc/kallsyms"]).stdout_text.split()[0]
            gdb = subprocess.run(
                a.gdb_argv(commands=[f"x/s 0x{banner}"], batch=True), capture_output=True
            )
            text = gdb.stdout.decode()
            print(f"gdb: {text.splitlines()[-2] if text.count(chr(10)) > 1 else text!r}"[:100])
            if '"Linux version' not in text:
                problems.append(f"gdb: {gdb!r}")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    if problems:
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PyqvmError as e:
        print(f"pyqvm: {e}", file=sys.stderr)
        sys.exit(125)
