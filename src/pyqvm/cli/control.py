"""The verbs on a named VM that are one call to its owner each: ``qmp``, ``stop``, ``wait``,
``snapshot``, ``hotplug``, ``unplug``, ``migrate``, ``save`` (a module, not one per verb:
each is a parser and a few lines)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pyqvm.cli.specargs import UsageError, memory_size

if TYPE_CHECKING:  # types only; they are imported when a verb runs
    from pyqvm.faces.derived_named import AsyncNamedVM
    from pyqvm.ops.migration import MigrationProgress

_T = TypeVar("_T")


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """The verbs that drive a named VM through its owner, a family at a time."""
    par = list(parents)
    for add in (_add_qmp, _add_stop_and_wait, _add_snapshot, _add_plugging, _add_moves):
        add(sub, par)


def _add_qmp(sub: Any, par: list[argparse.ArgumentParser]) -> None:
    q = sub.add_parser(
        "qmp",
        parents=par,
        help="run a QMP command in a named VM's QEMU",
        description="Send COMMAND (with ARGS, a JSON object) to the named VM's QEMU through "
        "its owner and print QEMU's JSON answer. Exit status 1 if QEMU answers an error.",
    )
    q.add_argument("name", metavar="NAME")
    q.add_argument("command", metavar="COMMAND")
    q.add_argument("arguments", nargs="?", metavar="JSON-ARGS", help='e.g. \'{"device": "x"}\'')
    q.set_defaults(run=run_qmp, over_owner=True)


def _add_stop_and_wait(sub: Any, par: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("stop", parents=par, help="stop named VMs")
    s.add_argument("names", nargs="*", metavar="NAME")
    s.add_argument("--all", action="store_true", help="every named VM of this user")
    s.add_argument(
        "--force",
        action="store_true",
        help="no clean shutdown of the guest: QEMU is told to quit at once (and killed if "
        "it hangs); an owner that does not answer is killed, and its QEMU with it",
    )
    s.add_argument("--timeout", type=float, default=10.0, help="seconds for a clean stop")
    s.set_defaults(run=run_stop)

    w = sub.add_parser("wait", parents=par, help="wait until a named VM ends")
    w.add_argument("name", metavar="NAME")
    w.set_defaults(run=run_wait, over_owner=True)


def _add_snapshot(sub: Any, par: list[argparse.ArgumentParser]) -> None:
    sn = sub.add_parser("snapshot", parents=par, help="internal snapshots of a named VM")
    sn.add_argument("name", metavar="NAME")
    sn.add_argument("action", choices=["save", "load", "list", "delete"])
    sn.add_argument("tag", nargs="?", metavar="TAG")
    sn.add_argument("--json", action="store_true", help="list as JSON")
    sn.add_argument("--overwrite", action="store_true", help="save over an existing TAG")
    sn.set_defaults(run=run_snapshot, over_owner=True)


def _add_plugging(sub: Any, par: list[argparse.ArgumentParser]) -> None:
    h = sub.add_parser(
        "hotplug",
        parents=par,
        help="plug a device into a named VM",
        description="Plug a disk, NIC, vCPU or memory into the named VM; prints the new "
        "device's id (for unplug).",
    )
    h.add_argument("name", metavar="NAME")
    kinds = h.add_subparsers(dest="kind", required=True)
    d = kinds.add_parser("disk", help="a disk image (a throw-away overlay unless --persistent)")
    d.add_argument("path", type=Path, metavar="PATH")
    d.add_argument("--format", choices=["raw", "qcow2"])
    d.add_argument("--id", default="")
    d.add_argument("--readonly", action="store_true")
    d.add_argument("--persistent", action="store_true", help="write to PATH itself")
    n = kinds.add_parser("nic", help="a user-mode NIC")
    n.add_argument("--mac")
    c = kinds.add_parser("cpu", help="a vCPU (the spec needs max_smp)")
    c.add_argument("--id", default="")
    m = kinds.add_parser("memory", help="a DIMM (the spec needs max_memory)")
    m.add_argument("size", type=memory_size, metavar="SIZE")
    m.add_argument("--id", default="")
    h.set_defaults(run=run_hotplug)

    u = sub.add_parser("unplug", parents=par, help="unplug a device from a named VM")
    u.add_argument("name", metavar="NAME")
    u.add_argument("device", metavar="ID")
    u.add_argument("--timeout", type=float, default=30.0)
    u.set_defaults(run=run_unplug, over_owner=True)


def _add_moves(sub: Any, par: list[argparse.ArgumentParser]) -> None:
    mg = sub.add_parser(
        "migrate",
        parents=par,
        help="live-migrate a named VM into a new named VM",
        description="Move the running guest of NAME into a new named VM NAME2 (started for "
        "it, with the same spec); NAME is gone afterwards. A progress bar shows on a "
        "terminal. On failure NAME runs on, untouched.",
    )
    mg.add_argument("name", metavar="NAME")
    mg.add_argument("--to", required=True, metavar="NAME2")
    mg.add_argument("--transport", choices=["unix", "tcp"], default="unix")
    mg.add_argument(
        "--storage",
        choices=["copied", "shared"],
        default="copied",
        help="copy the disks over NBD (default) or open the same files",
    )
    mg.set_defaults(run=run_migrate, over_owner=True)

    sv = sub.add_parser(
        "save",
        parents=par,
        help="save a named VM into a directory and stop it",
        description="Save the named VM's state, disks and spec into DIR and stop it; "
        "`pyqvm restore DIR --name NAME` resumes it.",
    )
    sv.add_argument("name", metavar="NAME")
    sv.add_argument("directory", type=Path, metavar="DIR")
    sv.add_argument(
        "--portable",
        action="store_true",
        help="carry standalone disks, the kernel and every file the VM needs, to restore "
        "DIR on another host with the same QEMU",
    )
    sv.set_defaults(run=run_save)


def on_vm(args: argparse.Namespace, fn: Callable[[AsyncNamedVM], Awaitable[_T]]) -> _T:
    """Attach to VM ``args.name`` (on ``args.host``), run ``fn`` on the handle, hang up."""
    name, host = args.name, getattr(args, "host", None)
    import asyncio

    from pyqvm.faces.derived_named import AsyncNamedVM

    async def go() -> _T:
        async with await AsyncNamedVM.attach(name, host=host) as vm:
            return await fn(vm)

    return asyncio.run(go())


def print_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2)
    print()


def run_qmp(args: argparse.Namespace) -> int:
    from pyqvm.errors import QMPCommandError

    arguments: Any = {}
    if args.arguments:
        try:
            arguments = json.loads(args.arguments)
        except ValueError as e:
            raise UsageError(f"JSON-ARGS: not JSON ({e})") from None
        if not isinstance(arguments, dict):
            raise UsageError('JSON-ARGS: must be a JSON object, e.g. \'{"id": "x"}\'')
    try:
        print_json(on_vm(args, lambda vm: vm.execute(args.command, arguments)))
    except QMPCommandError as e:
        print_json({"error": {"class": e.error_class, "desc": e.description}})
        return 1
    return 0


def run_stop(args: argparse.Namespace) -> int:
    import asyncio

    from pyqvm.errors import NamedVMError, PyqvmError
    from pyqvm.faces.derived_named import AsyncNamedVM
    from pyqvm.named import registry

    if args.all == bool(args.names):
        raise UsageError("stop: name the VMs to stop, or give --all")
    names = [e.name for e in registry.scan()[0]] if args.all else args.names

    async def stop(name: str) -> str | None:
        try:
            vm = await AsyncNamedVM.attach(name)
        except NamedVMError as e:
            if not args.force or not registry.find(name).alive():
                return f"{name}: {e}"
            # An owner that does not answer: --force kills it (QEMU dies with it).
            registry.kill_owner(registry.find(name))
            return None
        try:
            await vm.stop(args.timeout, graceful=False if args.force else None)
        except PyqvmError as e:
            return f"{name}: {e}"
        return None

    async def go() -> list[str | None]:
        return await asyncio.gather(*(stop(n) for n in names))

    failed = [f for f in asyncio.run(go()) if f]
    for f in failed:
        print(f"pyqvm: error: {f}", file=sys.stderr)
    return 125 if failed else 0


def run_wait(args: argparse.Namespace) -> int:
    on_vm(args, lambda vm: vm.wait())
    return 0


def run_snapshot(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.tag:
        raise UsageError(f"snapshot {args.action} needs a TAG")
    if args.action == "save":
        on_vm(args, lambda vm: vm.snapshot_save(args.tag, overwrite=args.overwrite))
    elif args.action == "load":
        on_vm(args, lambda vm: vm.snapshot_load(args.tag))
    elif args.action == "delete":
        on_vm(args, lambda vm: vm.snapshot_delete(args.tag))
    else:
        from pyqvm.codec import to_json
        from pyqvm.ops.snapshot import SnapshotInfo

        infos = on_vm(args, lambda vm: vm.snapshot_list())
        if args.json:
            print_json(to_json(infos, list[SnapshotInfo]))
        for i in infos if not args.json else ():
            print(f"{i.tag:20} {i.date.isoformat():26} {i.vm_state_size / 2**20:8.1f} MiB")
    return 0


def run_hotplug(args: argparse.Namespace) -> int:
    from pyqvm.spec import Disk, Network

    def plug(vm: AsyncNamedVM) -> Awaitable[str]:
        if args.kind == "disk":
            disk = Disk(
                args.path.resolve(),
                format=args.format,
                id=args.id,
                readonly=args.readonly,
                ephemeral=not args.persistent,
            )
            return vm.hotplug_disk(disk)
        if args.kind == "nic":
            return vm.hotplug_nic(None if args.mac is None else Network(mac=args.mac))
        if args.kind == "cpu":
            return vm.hotplug_cpu(args.id)
        return vm.hotplug_memory(args.size, args.id)

    print(on_vm(args, plug))
    return 0


def run_unplug(args: argparse.Namespace) -> int:
    on_vm(args, lambda vm: vm.unplug(args.device, timeout=args.timeout))
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    bar = _ProgressBar() if sys.stderr.isatty() else None

    stats = on_vm(
        args,
        lambda vm: vm.migrate(
            args.to, transport=args.transport, storage=args.storage, progress=bar
        ),
    )
    if bar is not None:
        bar.done()
    print(
        f"{args.name} -> {args.to}: {stats.transferred / 2**20:.1f} MiB in "
        f"{stats.total_time:.2f} s, downtime {stats.downtime * 1000:.0f} ms"
    )
    return 0


class _ProgressBar:
    """One line on a terminal's stderr, redrawn for each progress report."""

    def __call__(self, p: MigrationProgress) -> None:
        done = 1.0 if not p.total else max(0.0, min(1.0, 1 - p.remaining / p.total))
        filled = int(done * 30)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {done:4.0%} {p.status}"
            f" {p.rate / 2**20:6.1f} MiB/s"
        )
        sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write("\n")


def run_save(args: argparse.Namespace) -> int:
    saved = on_vm(args, lambda vm: vm.save(args.directory.resolve(), portable=args.portable))
    print(saved.directory)
    return 0
