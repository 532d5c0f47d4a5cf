"""The owner process of a named VM: ``python -m pyqvm.named.owner DIR READY_FD``.

`pyqvm.named.client.start_owner` starts it (in a session of its own, no
terminal, its stdout and stderr on ``DIR/owner.log``) with the registry
entry's lock inherited, so the name stays taken exactly as long as this
process lives. It starts the VM that ``DIR/request.json`` describes (a boot, a
clone of a template, or a restore), writes the entry's `Record`, then writes
one JSON line on ``READY_FD`` (``{"ok": record}`` or ``{"error": ...}``) and
serves clients on ``DIR/owner.sock`` until the VM ends: stopped by a client,
powered off by its guest, or QEMU died. It holds QEMU (which dies with it:
``PR_SET_PDEATHSIG``), the only QMP connection and the guest agent.

The protocol is QMP's (see `pyqvm.named.wire`): the ``pyqvm-*`` commands below
are this process's, any other command is relayed to QEMU, and QEMU's events
are relayed to every client. Each command runs in a task of its own, so one
client's long ``exec`` never holds up another's; a command whose client hung
up runs to its end (cancelling a guest command midway would leave the guest
agent's channel mid-reply) and its answer is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pyqvm.codec import callback_argument, from_json, to_json
from pyqvm.errors import NamedVMError, PyqvmError, VMExitedError
from pyqvm.faces.operations import CARRIED, OPERATIONS
from pyqvm.named import registry, wire
from pyqvm.named.registry import REQUEST, Entry, Record
from pyqvm.named.wire import CALLBACK_EVENT, OP_COMMAND
from pyqvm.ops import template as templates
from pyqvm.ops.hotplug import hostfwds
from pyqvm.ops.migration import SavedState
from pyqvm.ops.migration.portable import portable_spec
from pyqvm.spec import VMSpec
from pyqvm.spec.io import spec_from_dict, spec_to_dict
from pyqvm.state import VMState
from pyqvm.vm import AsyncVM

log = logging.getLogger(__name__)

#: How long a stopping owner lets commands in flight send their answers.
_DRAIN = 5.0

Handler = Callable[["Owner", Mapping[str, Any]], Awaitable[Any]]
_COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = fn
        return fn

    return register


class _Client:
    """One connection: replies and events are written in order, never interleaved."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False

    def put(self, msg: Mapping[str, Any]) -> None:
        if self.writer.is_closing():
            return  # the client hung up: its answer is dropped
        self.writer.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")


class Owner:
    """Serves one running VM on its entry's socket until the VM ends."""

    def __init__(self, vm: AsyncVM, entry: Entry, record: Record) -> None:
        self.vm = vm
        self.entry = entry
        self.record = record
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ended = asyncio.Event()

    async def serve(self, ready: Callable[[], None]) -> None:
        old = os.umask(0o177)  # the socket is 0600 from the start
        try:
            server = await asyncio.start_unix_server(
                self._serve_client, path=str(self.entry.socket), limit=wire.LINE_LIMIT
            )
        finally:
            os.umask(old)
        relay = asyncio.ensure_future(self._relay_events())
        exited = asyncio.ensure_future(self.vm.wait())
        exited.add_done_callback(lambda _: self._ended.set())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._ended.set)
        ready()
        try:
            await self._ended.wait()
            log.info(
                "%s: ending (%s)", self.vm.name, "QEMU exited" if exited.done() else "asked to"
            )
        finally:
            server.close()
            await self._drain()
            relay.cancel()
            exited.cancel()
            with contextlib.suppress(PyqvmError):
                await self.vm.stop()
            for c in self._clients:
                c.writer.close()

    def end(self) -> None:
        self._ended.set()

    def broadcast(self, event: str, data: Mapping[str, Any]) -> None:
        """An event of the owner's own (``PYQVM_*``) to every client."""
        now = time.time()
        msg = {
            "event": event,
            "data": dict(data),
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
        }
        for c in list(self._clients):
            if c.negotiated:
                c.put(msg)

    async def _drain(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=_DRAIN)
        for c in self._clients:
            with contextlib.suppress(OSError):
                await c.writer.drain()

    async def _relay_events(self) -> None:
        async with self.vm.events() as listener:
            async for event in listener:
                msg = dict(event)
                for c in list(self._clients):
                    if c.negotiated:
                        c.put(msg)

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        client = _Client(writer)
        self._clients.add(client)
        client.put(wire.greeting(self.vm.name))
        splitter = wire.Splitter()
        try:
            while not self._ended.is_set():
                try:
                    data = await reader.read(65536)
                    if not data:
                        break
                    for message in splitter.feed(data):
                        self._start(client, message)
                    await writer.drain()
                except (ValueError, OSError) as e:  # not QMP, too long, or a reset
                    log.warning("%s: dropping a client: %s", self.vm.name, e)
                    break
        finally:
            self._clients.discard(client)
            writer.close()

    def _start(self, client: _Client, line: bytes) -> None:
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
                raise ValueError("expected a JSON object with an 'execute' member")
        except ValueError as e:
            client.put({"error": {"class": "GenericError", "desc": f"bad request: {e}"}})
            return
        if msg["execute"] == "qmp_capabilities":
            client.negotiated = True
            client.put({"return": {}, **({"id": msg["id"]} if "id" in msg else {})})
            return
        task = asyncio.ensure_future(self._answer(client, msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, client: _Client, msg: Mapping[str, Any]) -> None:
        name, args = msg["execute"], msg.get("arguments") or {}
        reply: dict[str, Any]
        try:
            if not isinstance(args, dict):
                raise PyqvmError(f"{name}: 'arguments' must be an object")
            handler = _COMMANDS.get(name)
            if handler is None:
                # QEMU's own command; the owner's timeout for it rides along, taken out here.
                timeout = from_json(args.get("pyqvm-timeout", 60.0), float, "pyqvm-timeout")
                qemu_args = {k: v for k, v in args.items() if k != "pyqvm-timeout"}
                result = await self.vm.execute(name, qemu_args, timeout=timeout)
            else:
                result = await handler(self, args)
            reply = {"return": {} if result is None else result}
        except PyqvmError as e:
            if self.vm.state in (VMState.STOPPING, VMState.STOPPED, VMState.FAILED):
                # The guest went away under the command (a stop from another client, a
                # crash): say that, not how the agent's socket looked when it went.
                what = args.get("operation") if name == OP_COMMAND else name
                e = VMExitedError(f"VM {self.vm.name!r} stopped during {what} ({e})")
            reply = {"error": wire.error_to_json(e)}
        except Exception as e:  # a bug here must not take the VM down with it
            log.exception("%s: %s failed", self.vm.name, name)
            reply = {"error": {"class": "GenericError", "desc": f"{name}: internal error: {e!r}"}}
        if "id" in msg:
            reply["id"] = msg["id"]
        client.put(reply)
        with contextlib.suppress(OSError):
            await client.writer.drain()


# --- the pyqvm-* commands -----------------------------------------------------------------


@command("pyqvm-info")
async def _info(owner: Owner, args: Mapping[str, Any]) -> Any:
    vm = owner.vm
    status = None
    if vm.state in (VMState.RUNNING, VMState.PAUSED):
        with contextlib.suppress(PyqvmError):
            status = (await vm.execute("query-status", timeout=5.0))["status"]
    return {**owner.record.to_json(), "state": vm.state.value, "status": status}


@command("pyqvm-migration-source")
async def _migration_source(owner: Owner, args: Mapping[str, Any]) -> Any:
    """What a destination needs to listen for this VM: its spec, its hot-plugged devices,
    its port forwards (taken over once this VM has quit) and, for shared storage, the
    overlays it would open."""
    machine = owner.vm.machine
    storage = args.get("storage", "shared")
    return {
        "spec": spec_to_dict(owner.vm.spec),
        "devices": {d: p.to_json() for d, p in owner.vm.plugged.items()},
        "forwards": [list(f) for f in hostfwds(machine)],
        "overlays": {d: str(p) for d, p in machine.overlays().items()}
        if storage == "shared"
        else {},
    }


@command(OP_COMMAND)
async def _operation(owner: Owner, args: Mapping[str, Any]) -> Any:
    """One of AsyncVM's operations (`pyqvm.faces.operations.CARRIED`), its arguments and
    result through `pyqvm.codec` by AsyncVM's own types. A callback argument is a
    stand-in that sends each call to the clients as a ``PYQVM_CALLBACK`` event."""
    name = args.get("operation")
    op = CARRIED.get(name) if isinstance(name, str) else None
    if op is None:
        raise PyqvmError(f"{OP_COMMAND}: {name!r} is not an operation a named VM carries")
    given = args.get("arguments") or {}
    if not isinstance(given, dict):
        raise PyqvmError(f"{op.name}: 'arguments' must be an object")
    kwargs = {p: from_json(v, op.hints.get(p, Any), f"{op.name}: {p}") for p, v in given.items()}
    for p in args.get("callbacks") or ():
        if p not in op.callbacks:
            raise PyqvmError(f"{op.name}: {p!r} is not a callback of it")
        kwargs[p] = _stand_in(owner, str(args.get("call")), p, callback_argument(op.hints[p]))
    try:
        op.signature.bind(op.target(owner.vm), **kwargs)
    except TypeError as e:
        raise PyqvmError(f"{op.path}: {e}") from None
    result = getattr(op.target(owner.vm), op.name)(**kwargs)
    if inspect.isawaitable(result):
        result = await result
    if (after := AFTER.get(op.path)) is not None:
        after(owner, result)
    ended = owner.vm.state in (VMState.STOPPED, VMState.FAILED)
    if ended:
        owner.end()
    return {"result": to_json(result, op.hints["return"], f"{op.name}: result"), "ended": ended}


def _stand_in(owner: Owner, call: str, parameter: str, tp: object) -> Callable[[Any], None]:
    def relay(value: object) -> None:
        data = {"call": call, "parameter": parameter, "value": to_json(value, tp, parameter)}
        owner.broadcast(CALLBACK_EVENT, data)

    return relay


def _saved(owner: Owner, saved: SavedState) -> None:
    # The spec goes with the state: `pyqvm restore DIR` needs nothing else.
    (saved.directory / "spec.json").write_text(json.dumps(spec_to_dict(owner.vm.spec), indent=2))


#: What the owner does after an operation, besides answering.
AFTER: Mapping[str, Callable[[Owner, Any], None]] = {"save": _saved}


# --- the process ---------------------------------------------------------------------------


def _record(vm: AsyncVM, template: str | None) -> Record:
    spec = vm.resolved_spec
    assert vm.pid is not None and vm.runtime_dir is not None
    forwards = tuple(
        f"{f.protocol} {f.host_address}:{f.host_port} -> {f.guest_port}"
        for n in spec.networks
        for f in n.forwards
    )
    console = vm.machine.console_socket()
    return Record(
        name=vm.name,
        owner_pid=os.getpid(),
        qemu_pid=vm.pid,
        started=time.time(),
        accelerator=vm.accelerator or "",
        machine=spec.effective_machine,
        memory=int(spec.memory),
        smp=spec.smp,
        runtime_dir=str(vm.runtime_dir),
        console_log=str(vm.machine.console.path),
        console_socket=None if console is None else str(console),
        forwards=forwards,
        template=template,
        spec=spec_to_dict(vm.spec),
    )


async def _start(
    request: Mapping[str, Any], say: Callable[[Any], None]
) -> tuple[AsyncVM, str | None]:
    image_cache = Path(request["image_cache"]) if request.get("image_cache") else None
    if request.get("template"):
        directory = Path(request["templates_dir"]) if request.get("templates_dir") else None
        t = templates.get(str(request["template"]), directory=directory)
        vm = AsyncVM(
            dataclasses.replace(t.clone_spec(), name=request["name"]), image_cache=image_cache
        )
        await vm.start_from_template(t)
        return vm, t.name
    if "spec" not in request:  # a restore on this host: the spec was saved with the state
        request = {**request, "spec": _saved_spec(Path(request["restore"]), request["name"])}
    spec: VMSpec = spec_from_dict(request["spec"])
    vm = AsyncVM(spec, image_cache=image_cache)
    if request.get("restore"):
        await vm.restore(request["restore"])
    elif incoming := request.get("incoming"):
        await _incoming(vm, incoming, say)
    else:
        await vm.start()
    return vm, None


def _saved_spec(directory: Path, name: str) -> dict[str, Any]:
    if (spec := portable_spec(directory, name)) is not None:  # it carries its files
        return spec_to_dict(spec)
    try:
        saved = json.loads((directory / "spec.json").read_text())
    except (OSError, ValueError) as e:
        raise NamedVMError(
            f"restore: '{directory}' holds no spec.json of a VM saved with "
            f"`pyqvm save NAME DIR` ({e})",
            name=name,
        ) from None
    return {**saved, "name": name}


async def _incoming(vm: AsyncVM, request: Mapping[str, Any], say: Callable[[Any], None]) -> None:
    """Listen as the destination of a migration (``request["listen"]``: `AsyncVM.listen`'s
    arguments), say where (one line on the ready pipe, for whoever tells the source to
    send), and wait for the guest to arrive."""
    hints = OPERATIONS["listen"].hints
    listen = {p: from_json(v, hints[p], f"listen: {p}") for p, v in request["listen"].items()}
    incoming = await vm.listen(**listen)
    say({"incoming": to_json(incoming, hints["return"], "incoming")})
    timeout = from_json(request.get("timeout", 600.0), float | None, "timeout")
    await vm.accept(incoming, timeout=timeout)


async def run_owner(directory: Path, ready_fd: int) -> int:
    entry = Entry(directory.name, directory)
    ready = os.fdopen(ready_fd, "w")

    def say(msg: Mapping[str, Any]) -> None:
        if not ready.closed:
            ready.write(json.dumps(msg) + "\n")
            ready.close()

    def tell(msg: Mapping[str, Any]) -> None:  # a line before the last
        ready.write(json.dumps(msg) + "\n")
        ready.flush()

    try:
        request = json.loads((directory / REQUEST).read_text())
        vm, template = await _start(request, tell)
    except PyqvmError as e:
        log.error("%s: could not start: %s", entry.name, e)
        say({"error": wire.error_to_json(e)})
        return 1
    except BaseException as e:
        log.exception("%s: could not start", entry.name)
        say({"error": {"class": "PyqvmError", "desc": f"the owner process failed: {e!r}"}})
        return 1
    try:
        record = _record(vm, template)
        registry.write_record(entry, record)
        owner = Owner(vm, entry, record)
        await owner.serve(lambda: say({"ok": record.to_json()}))
    finally:
        with contextlib.suppress(PyqvmError):
            await vm.stop()
        say({"error": {"class": "VMExitedError", "desc": f"{vm.name}: the VM ended at once"}})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m pyqvm.named.owner DIR READY_FD", file=sys.stderr)
        return 2
    directory, ready_fd = Path(args[0]), int(args[1])
    # Fork off: the process that started us exits now, so this one is nobody's child
    # (never a zombie of a long-lived launcher) and lives in its own session.
    if os.fork():
        os._exit(0)
    (directory / registry.LOCK).write_text(f"{os.getpid()}\n")  # for `kill_owner`
    os.write(ready_fd, json.dumps({"pid": os.getpid()}).encode() + b"\n")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        return asyncio.run(run_owner(directory, ready_fd))
    finally:
        # The name is free once this process is gone; the directory goes first, at once:
        # renamed out of the registry (which skips dot names), then removed. A client
        # waiting for the entry to go must never see it half removed (lock gone, dir not).
        gone = directory.with_name(f".gone-{directory.name}-{os.getpid()}")
        try:
            directory.rename(gone)
        except OSError:
            gone = directory
        shutil.rmtree(gone, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Owner", "main", "run_owner"]
