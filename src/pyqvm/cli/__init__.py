"""``pyqvm``: the command-line face. Parsing, output and exit codes only; the work is in the API.

pyqvm run [SPEC.toml] [options] [-- CMD ARGS...]   boot, run CMD in the guest, exit with its code
pyqvm cmdline SPEC.toml [--json]                   print the QEMU argv pyqvm would run
pyqvm image build [--flavour F] [--force]          build the built-in guest image
pyqvm doctor [--json] [--for MODE] [--fix]         what this host can run (tcg/kvm/vfio/xen)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyqvm.cli import doctor as _doctor
from pyqvm.errors import PyqvmError
from pyqvm.spec import Network, PortForward, VMSpec, load_spec, spec_from_dict
from pyqvm.vm import AsyncVM, preview_argv

log = logging.getLogger("pyqvm.cli")

EXIT_ERROR = 125  # pyqvm itself failed (like `docker run`); CMD's own codes pass through


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "spec", nargs="?", type=Path, help="VM description (TOML); default: built-in guest"
    )
    g = p.add_argument_group("overrides")
    g.add_argument("--kernel", type=Path, help="kernel to boot directly (vmlinux or bzImage)")
    g.add_argument("--initrd", type=Path, help="initial ramdisk for --kernel")
    g.add_argument("--append", help="kernel command line for --kernel")
    g.add_argument("--memory", "-m", help="guest memory, e.g. 512M or 2G")
    g.add_argument("--smp", type=int, help="number of vCPUs")
    g.add_argument("--machine", choices=["auto", "q35", "pc", "microvm"])
    g.add_argument("--accel", choices=["auto", "kvm", "tcg"], help="accelerator (default auto)")
    g.add_argument("--profile", choices=["virtio", "emulated", "passthrough"])
    g.add_argument("--net", choices=["user", "none"], help="network (default: one user-mode NIC)")
    g.add_argument(
        "--forward",
        action="append",
        default=[],
        metavar="HOST:GUEST",
        help="forward a TCP port from 127.0.0.1 into the guest (user network)",
    )
    g.add_argument("--image", choices=["default", "full"], help="built-in image flavour")
    g.add_argument("--name", help="VM name")
    g.add_argument("--timeout", type=float, help="seconds to wait for the guest to be ready")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pyqvm", description="Boot QEMU guests and drive them over QMP."
    )
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    # -v also after the subcommand (`pyqvm run -v ...`); SUPPRESS keeps a top-level -v.
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more logging (-vv: debug)",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        parents=[verbosity],
        help="boot an ephemeral VM and run a command in it",
        description="Boot an ephemeral VM (default: the built-in guest), run CMD in it through "
        "the guest agent, print its output and exit with its exit code. Without CMD, show the "
        "serial console until Ctrl-C.",
    )
    _add_spec_options(run)
    run.epilog = "The command to run in the guest follows --, e.g.: pyqvm run -- uname -a"

    cmdline = sub.add_parser(
        "cmdline", parents=[verbosity], help="print the QEMU command line for a spec"
    )
    _add_spec_options(cmdline)
    cmdline.add_argument(
        "--json", action="store_true", help="print a JSON list instead of shell words"
    )

    image = sub.add_parser("image", help="the built-in guest image")
    isub = image.add_subparsers(dest="image_command", required=True)
    build = isub.add_parser(
        "build", parents=[verbosity], help="build the built-in guest from Debian packages"
    )
    build.add_argument("--flavour", choices=["default", "full", "all"], default="default")
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")
    isub.add_parser("list", parents=[verbosity], help="list the built images, newest first")
    prune = isub.add_parser(
        "prune",
        parents=[verbosity],
        help="remove every built image but the newest of each flavour",
        description="Remove every built image but the newest of each flavour. A state saved "
        "(VM.save) from a VM on an older image needs that image to be restored.",
    )
    prune.add_argument("--dry-run", action="store_true", help="only say what would go")
    _doctor.add_parser(sub, parents=[verbosity])
    return ap


def spec_from_args(args: argparse.Namespace) -> VMSpec:
    """The spec `run`/`cmdline` use: the TOML file (or nothing) plus command-line overrides."""
    data: dict[str, Any] = {}
    kernel: dict[str, Any] = {}
    if args.kernel:
        kernel["kernel"] = str(args.kernel)
    if args.initrd:
        kernel["initrd"] = str(args.initrd)
    if args.append is not None:
        kernel["append"] = args.append
    if kernel and "kernel" not in kernel:
        raise PyqvmError("--initrd/--append need --kernel")
    for key, value in (
        ("memory", args.memory),
        ("smp", args.smp),
        ("machine", args.machine),
        ("accelerator", args.accel),
        ("profile", args.profile),
        ("name", args.name),
        ("ready_timeout", args.timeout),
        ("image", args.image),
    ):
        if value is not None:
            data[key] = value
    if kernel:
        data["kernel"] = kernel
    base = load_spec(args.spec, **data) if args.spec else spec_from_dict(data)

    changes: dict[str, Any] = {}
    # Like `docker run`: the built-in guest unless the spec boots something of its own.
    if base.kernel is None and base.image is None and not base.disks and not base.cdroms:
        changes["image"] = "full" if base.profile == "emulated" else "default"
    if args.net == "none":
        changes["networks"] = ()
    elif args.forward or args.net == "user" or (not base.networks and not args.spec):
        forwards = tuple(_forward(f) for f in args.forward)
        changes["networks"] = (Network(forwards=forwards),)
    return dataclasses.replace(base, **changes) if changes else base


def _forward(text: str) -> PortForward:
    host, sep, guest = text.partition(":")
    if not sep or not host.isdigit() or not guest.isdigit():
        raise PyqvmError(f"--forward {text!r}: use HOST:GUEST port numbers, e.g. 2222:22")
    return PortForward(host_port=int(host), guest_port=int(guest))


async def _run(spec: VMSpec, cmd: Sequence[str]) -> int:
    async with AsyncVM(spec) as vm:
        if not cmd:
            return await _show_console(vm)
        result = await vm.run(cmd, timeout=24 * 3600)
        sys.stdout.buffer.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(result.stderr)
        sys.stderr.flush()
        return result.exitcode if result.signal is None else 128 + result.signal


async def _show_console(vm: AsyncVM) -> int:
    """Copy the serial console to stdout until Ctrl-C or the guest powers off."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    sys.stderr.write(f"pyqvm: {vm.name} is up; console follows (Ctrl-C to stop)\n")
    shown = 0
    exited = asyncio.ensure_future(vm.wait())
    try:
        while not stop.is_set() and not exited.done():
            chunk = vm.read_console(shown)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                shown += len(chunk)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        if not exited.done():
            exited.cancel()
    return 0


def _cmdline(spec: VMSpec, as_json: bool) -> int:
    argv = preview_argv(spec)
    print(json.dumps(argv) if as_json else shlex.join(argv))
    return 0


def _image(args: argparse.Namespace) -> int:
    from pyqvm import image

    if args.image_command == "build":
        for f in image.FLAVOURS if args.flavour == "all" else (args.flavour,):
            img = image.build(f, force=args.force)
            print(f"{img.flavour}: {img.directory}")
    elif args.image_command == "list":
        newest: set[str] = set()
        for img in image.built_images():
            size = sum(p.stat().st_size for p in img.directory.iterdir()) >> 20
            mark = "" if img.flavour in newest else "  (newest: the one VMs use)"
            newest.add(img.flavour)
            print(f"{img.flavour:8} {img.kernel_version:24} {size:5d} MiB  {img.directory}{mark}")
    else:
        for img in image.prune(dry_run=args.dry_run):
            print(f"{'would remove' if args.dry_run else 'removed'} {img.directory}")
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse; everything after the first ``--`` is the guest command, never an option of ours."""
    argv = list(argv)
    cmd: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, cmd = argv[:i], argv[i + 1 :]
    args = _parser().parse_args(argv)
    if args.command == "run":
        args.cmd = cmd
    elif cmd:
        _parser().error(f"{args.command} takes no command after --")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    if args.command == "image":
        level = min(level, logging.INFO)  # a long build shows its progress
    logging.basicConfig(level=level, format="pyqvm: %(message)s", stream=sys.stderr)
    if args.verbose < 2:
        # qemu.qmp logs a traceback when QEMU hangs up; pyqvm's own error already says why.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        if args.command == "image":
            return _image(args)
        if args.command == "doctor":
            return _doctor.run(args)
        spec = spec_from_args(args)
        if args.command == "cmdline":
            return _cmdline(spec, args.json)
        return asyncio.run(_run(spec, args.cmd))
    except PyqvmError as e:
        print(f"pyqvm: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


__all__ = ["main", "parse_args", "spec_from_args"]


if __name__ == "__main__":
    sys.exit(main())
