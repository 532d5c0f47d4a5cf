"""Boot-to-ready of the built-in guest: pyqvm vs the identical argv run by hand.

Each round boots the guest once through ``AsyncVM.start()`` and once by hand:
the same argv (taken from the pyqvm launch of that round, with a socket
pair of its own for each of QEMU's sockets, `handmade`, and its own overlay), spawned with plain
``subprocess.Popen``. "Ready" is the same in both: the guest agent answers
``guest-sync`` (the same client, `pyqvm.channels.agent.GuestAgent`, polls both).
Rounds alternate the order so drift in machine load hits both sides. On this kind of host
every other boot tends to run slow; an even ``-n`` gives each side as many of those, where an
odd one hands one side an extra fast boot, and with it a median from the fast cluster.

    python bench/boot.py [-n 8] [--machine auto|q35|pc|microvm|virt] [--image default] [--nic]
                         [--arch x86_64|aarch64] [--cpu MODEL]

The last line is ``result: boot pyqvm=<median s> baseline=<median s> ratio=<r>``
(``boot-aarch64`` for ``--arch aarch64``, ``boot-debian`` for ``--image debian``).

``--baseline-config [IMAGE_DIR]`` compares boot configurations instead (issue 26): the
baseline side boots an image built before (its kernel, initramfs, command line and disk, as
its manifest gives them; by default the newest other built image of the flavour and arch
with the same kernel), through pyqvm like the measured side, which boots the newest image.
Its result line is ``result: boot-config pyqvm=<median s> baseline=<median s> ratio=<r>``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from handmade import socket_pairs, with_fds

from pyqvm import AsyncVM, GuestAgent, Network, VMSpec, image
from pyqvm.image.guest import load_image
from pyqvm.spec import IMAGE_DISK_ID, Disk, KernelBoot


async def boot_pyqvm(spec: VMSpec) -> tuple[float, list[str]]:
    vm = AsyncVM(spec)
    t0 = time.monotonic()
    await vm.start()
    elapsed = time.monotonic() - t0
    argv = vm.argv
    rundir = vm.runtime_dir
    assert rundir is not None
    await vm.stop()
    return elapsed, [a.replace(str(rundir), "{RUNDIR}") for a in argv]


async def boot_by_hand(template: list[str], base_disk: Path) -> float:
    """The same argv, launched with Popen; returns seconds until the agent answers."""
    rundir = Path(tempfile.mkdtemp(prefix="bench-"))
    argv = [a.replace("{RUNDIR}", str(rundir)) for a in template]
    pairs = socket_pairs(argv)
    argv = with_fds(argv, {name: qemu.fileno() for name, (_, qemu) in pairs.items()})
    agent = GuestAgent(name="bench")
    t0 = time.monotonic()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base_disk),
         str(rundir / "root.qcow2")],
        check=True,
    )  # fmt: skip
    proc = subprocess.Popen(
        argv, pass_fds=[qemu.fileno() for _, qemu in pairs.values()], stderr=subprocess.DEVNULL
    )
    try:
        for _, qemu in pairs.values():
            qemu.close()
        await agent.connect(pairs["pq-qga"][0])
        await agent.wait_ready(120)
        elapsed = time.monotonic() - t0
    finally:
        await agent.close()
        proc.kill()
        proc.wait()
        for ours, _ in pairs.values():
            ours.close()
        shutil.rmtree(rundir, ignore_errors=True)
    return elapsed


def baseline_image(given: str, img: image.GuestImage) -> image.GuestImage:
    """The image of the configuration to compare with: ``given`` (a directory), or for
    ``auto`` the newest other built image of ``img``'s flavour and arch, same kernel."""
    if given != "auto":
        found = load_image(Path(given).resolve())
        if found is None:
            raise SystemExit(f"{given}: not a built image directory (no valid manifest.json)")
        return found
    for other in image.built_images(img.flavour, arch=img.arch):
        if other.directory != img.directory and other.kernel_version == img.kernel_version:
            return other
    raise SystemExit(
        f"no other built {img.flavour} image with kernel {img.kernel_version} to compare "
        "with: build one at the revision to compare (e.g. `git stash; pyqvm image build; "
        "git stash pop; pyqvm image build`), or give its directory"
    )


def image_spec(spec: VMSpec, img: image.GuestImage) -> VMSpec:
    """``spec`` booting the built image ``img`` itself, as `image.find` would give it
    (pyqvm knows it for a built image by its kernel and its ``root`` disk)."""
    kernel = KernelBoot(kernel=img.kernel, initrd=img.initrd, append=img.cmdline)
    disk = Disk(path=img.disk, format="qcow2", ephemeral=True, id=IMAGE_DISK_ID)
    return dataclasses.replace(spec, image=None, kernel=kernel, disks=(disk, *spec.disks))


async def compare_configs(
    spec: VMSpec, img: image.GuestImage, old: image.GuestImage, n: int
) -> None:
    """Boots of ``img`` (pyqvm's side) and of ``old`` (the baseline), alternating."""
    print(f"pyqvm: {img.directory.name}  cmdline: {img.cmdline}")
    print(f"baseline: {old.directory.name}  cmdline: {old.cmdline}")
    new_spec, old_spec = image_spec(spec, img), image_spec(spec, old)
    await boot_pyqvm(new_spec)  # warm-up (not counted): page cache
    await boot_pyqvm(old_spec)
    ours: list[float] = []
    theirs: list[float] = []
    for i in range(n):
        for side in ((new_spec, ours), (old_spec, theirs))[:: 1 if i % 2 == 0 else -1]:
            side[1].append((await boot_pyqvm(side[0]))[0])
        print(f"round {i + 1}: new {ours[-1]:.3f} s  baseline {theirs[-1]:.3f} s", flush=True)
    report("new", ours, "baseline", theirs, f"arch={spec.arch} machine={spec.machine} n={n}")
    name = "-".join(["boot-config"] + ([spec.arch] if spec.arch != "x86_64" else []))
    p, b = statistics.median(ours), statistics.median(theirs)
    print(f"result: {name} pyqvm={p:.3f} baseline={b:.3f} ratio={p / b:.3f}")


def report(label: str, xs: list[float], other: str, ys: list[float], what: str) -> None:
    print(what)
    for name, zs in ((label, xs), (other, ys)):
        med = statistics.median(zs)
        print(f"{name:8}  median {med:.3f} s  min {min(zs):.3f}  max {max(zs):.3f}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "-n", type=int, default=8, help="boots per side (default 8: even, see the module doc)"
    )
    ap.add_argument("--machine", default=None, help="machine type (default: the spec default)")
    ap.add_argument("--image", default="default")
    ap.add_argument(
        "--nic", action="store_true", help="give the guest a user-mode NIC (as `pyqvm run`)"
    )
    ap.add_argument("--arch", default="x86_64", help="guest architecture")
    ap.add_argument("--cpu", default=None, help="-cpu model (default: pyqvm's choice)")
    ap.add_argument(
        "--baseline-config",
        nargs="?",
        const="auto",
        default=None,
        metavar="IMAGE_DIR",
        help="baseline: boots of an image built before (default: the newest other one)",
    )
    args = ap.parse_args()

    img = image.find(args.image, arch=args.arch)
    kw: dict[str, object] = {"machine": args.machine} if args.machine else {}
    if args.nic:
        kw["networks"] = (Network(),)
    if args.cpu:
        kw["cpu"] = args.cpu
    spec = VMSpec(image=args.image, arch=args.arch, **kw)  # type: ignore[arg-type]
    if args.baseline_config is not None:
        await compare_configs(spec, img, baseline_image(args.baseline_config, img), args.n)
        return

    # Warm-up (not counted): page cache, and the argv template for the by-hand side.
    _, template = await boot_pyqvm(spec)
    ours: list[float] = []
    theirs: list[float] = []
    for i in range(args.n):
        if i % 2 == 0:
            ours.append((await boot_pyqvm(spec))[0])
            theirs.append(await boot_by_hand(template, img.disk))
        else:
            theirs.append(await boot_by_hand(template, img.disk))
            ours.append((await boot_pyqvm(spec))[0])
        print(f"round {i + 1}: pyqvm {ours[-1]:.3f} s  by hand {theirs[-1]:.3f} s", flush=True)
    nic = "user" if spec.networks else "none"
    report(
        "pyqvm",
        ours,
        "by hand",
        theirs,
        f"arch={spec.arch} machine={spec.machine}:{spec.effective_machine} image={args.image} "
        f"kernel={img.kernel.name} cpu={spec.cpu or 'default'} nic={nic} n={args.n}",
    )
    p, b = statistics.median(ours), statistics.median(theirs)
    name = "-".join(
        ["boot"]
        + ([args.arch] if args.arch != "x86_64" else [])
        + ([args.image] if args.image != "default" else [])
    )
    print(f"result: {name} pyqvm={p:.3f} baseline={b:.3f} ratio={p / b:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
