"""The VM options `run`, `cmdline` and `template create` share: a spec file plus overrides.

argparse checks each value's form (a number, a size) and exits 2; `spec_from_args` raises
`UsageError` (also exit 2) for what only our own parsing sees (``--forward 22``); the spec
checks the rest (a range, a file that must exist) and raises `SpecError` (exit 125).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyqvm.errors import PyqvmError, SpecError
from pyqvm.spec.fields import parse_size_mib

if TYPE_CHECKING:  # the spec's modules load when a VM is built, not for every verb's parser
    from pyqvm.spec import PortForward, VMSpec
    from pyqvm.spec.shares import Share


class UsageError(PyqvmError):
    """The command line itself is wrong (exit status 2, as argparse's own errors)."""


def memory_size(text: str) -> str:
    """argparse ``type=`` for a memory size: the text itself, once the spec's parser takes it."""
    try:
        parse_size_mib(text, "")
    except SpecError as e:
        raise argparse.ArgumentTypeError(e.message) from e
    return text


def add_spec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "spec", nargs="?", type=Path, help="VM description (TOML); default: built-in guest"
    )
    g = p.add_argument_group("overrides")
    overrides = [
        g.add_argument("--kernel", type=Path, help="kernel to boot directly (vmlinux or bzImage)"),
        g.add_argument("--initrd", type=Path, help="initial ramdisk for --kernel"),
        g.add_argument("--append", help="kernel command line for --kernel"),
        g.add_argument("--memory", "-m", type=memory_size, help="guest memory, e.g. 512M or 2G"),
        g.add_argument("--smp", type=int, help="number of vCPUs"),
        g.add_argument("--arch", choices=["x86_64", "aarch64"], help="guest architecture"),
        g.add_argument("--machine", choices=["auto", "q35", "pc", "microvm", "virt"]),
        g.add_argument(
            "--accel", choices=["auto", "kvm", "tcg"], help="accelerator (default auto)"
        ),
        g.add_argument("--profile", choices=["virtio", "emulated", "passthrough"]),
        g.add_argument(
            "--net", choices=["user", "none"], help="network (default: one user-mode NIC)"
        ),
        g.add_argument(
            "--forward",
            action="append",
            default=[],
            metavar="HOST:GUEST",
            help="forward a TCP port from 127.0.0.1 into the guest (user network)",
        ),
        g.add_argument(
            "--share",
            action="append",
            default=[],
            metavar="HOST[:GUEST][:ro]",
            help="share a host directory (mounted at GUEST, default /mnt/shareN; docs/shares.md)",
        ),
        g.add_argument(
            "--ssh",
            action="store_true",
            default=None,
            help="an SSH server in the guest, through a port forward (pyqvm ssh NAME)",
        ),
        g.add_argument(
            "--gdb",
            action="store_true",
            default=None,
            help="QEMU's gdbstub on a unix socket in the runtime dir (pyqvm gdb NAME)",
        ),
        g.add_argument(
            "--image", choices=["default", "full", "debian"], help="built-in image flavour"
        ),
        g.add_argument(
            "--cloud-init",
            type=Path,
            metavar="USER_DATA",
            help="a cloud-init NoCloud seed with this user-data file (docs/guests.md)",
        ),
        g.add_argument(
            "--exec-via",
            choices=["auto", "agent", "serial"],
            help="how commands reach the guest: its agent, or a shell on its serial console "
            "(a guest with nothing of pyqvm's; docs/unmodified.md)",
        ),
        g.add_argument(
            "--login",
            metavar="USER[:PASSWORD]",
            help="who logs in on the serial console when it asks (--exec-via serial)",
        ),
        g.add_argument("--name", help="VM name"),
        g.add_argument("--timeout", type=float, help="seconds to wait for the guest to be ready"),
    ]
    p.set_defaults(override_options=tuple((a.dest, a.option_strings[0]) for a in overrides))


def overrides_given(args: argparse.Namespace) -> list[str]:
    """The override options on this command line, by their long names (``--memory``)."""
    options: tuple[tuple[str, str], ...] = args.override_options
    return [flag for dest, flag in options if getattr(args, dest) not in (None, [])]


def refuse_overrides_with_template(args: argparse.Namespace) -> None:
    """`UsageError` when a spec or spec options come with ``--template T``: a clone runs its
    template's spec, and only its name is its own."""
    ignored = (["SPEC"] if args.spec else []) + [o for o in overrides_given(args) if o != "--name"]
    if ignored:
        raise UsageError(f"--template: the template's spec is used; leave out {', '.join(ignored)}")


def spec_from_args(args: argparse.Namespace) -> VMSpec:
    """The spec `run`/`cmdline` use: the TOML file (or nothing) plus command-line overrides."""
    from pyqvm.spec import Network
    from pyqvm.spec.io import load_spec, spec_from_dict

    data: dict[str, Any] = {}
    kernel: dict[str, Any] = {}
    if args.kernel:
        kernel["kernel"] = str(args.kernel)
    if args.initrd:
        kernel["initrd"] = str(args.initrd)
    if args.append is not None:
        kernel["append"] = args.append
    if kernel and "kernel" not in kernel:
        raise UsageError("--initrd/--append need --kernel")
    for key, value in (
        ("arch", args.arch),
        ("memory", args.memory),
        ("smp", args.smp),
        ("machine", args.machine),
        ("accelerator", args.accel),
        ("profile", args.profile),
        ("name", args.name),
        ("ready_timeout", args.timeout),
        ("image", args.image),
        ("gdb", args.gdb),
        ("exec_via", args.exec_via),
    ):
        if value is not None:
            data[key] = value
    if args.login is not None:
        user, _, password = args.login.partition(":")
        data["console_user"] = user
        if password:
            data["console_password"] = password
    if args.cloud_init is not None:
        try:
            data["cloud_init"] = {"user_data": args.cloud_init.read_text()}
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--cloud-init: cannot read {args.cloud_init}: {e}") from None
    if kernel:
        data["kernel"] = kernel
    elif not args.spec and "image" not in data:
        # Like `docker run`: the built-in guest (and an aarch64 spec is not valid without one).
        data["image"] = "full" if data.get("profile") == "emulated" else "default"
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
    if args.ssh:  # with the default user network above: ssh goes through its port forward
        changes["ssh"] = True
    if args.share:
        changes["shares"] = (*base.shares, *(_share(t) for t in args.share))
    return dataclasses.replace(base, **changes) if changes else base


def _share(text: str) -> Share:
    """``HOST[:GUEST][:ro]``: the guest path is the last part that starts with '/'."""
    from pyqvm.spec.shares import Share

    rest, readonly = text, False
    for mode in (":ro", ":rw"):
        if rest.endswith(mode):
            rest, readonly = rest[: -len(mode)], mode == ":ro"
            break
    host, sep, guest = rest.rpartition(":")
    if not sep or not guest.startswith("/"):
        host, guest = rest, ""
    if not host:
        raise UsageError(f"--share {text!r}: use HOST[:GUEST][:ro], e.g. ./src:/mnt/src:ro")
    try:
        return Share(host=Path(host), guest=guest, readonly=readonly)
    except SpecError as e:
        raise SpecError(f"--share {text!r} ({e.field})", e.message) from None


def _forward(text: str) -> PortForward:
    from pyqvm.spec import PortForward

    host, sep, guest = text.partition(":")
    if not sep or not host.isdigit() or not guest.isdigit():
        raise UsageError(f"--forward {text!r}: use HOST:GUEST port numbers, e.g. 2222:22")
    return PortForward(host_port=int(host), guest_port=int(guest))


__all__ = [
    "UsageError",
    "add_spec_options",
    "memory_size",
    "overrides_given",
    "refuse_overrides_with_template",
    "spec_from_args",
]
