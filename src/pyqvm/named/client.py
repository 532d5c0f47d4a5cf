"""A handle on a named VM in another process: `AsyncNamedVMBase`, the part of
`pyqvm.AsyncNamedVM` written by hand (`up`, `attach`, `events`, `migrate`, `_op`).

`AsyncNamedVM.up` reserves the name in the registry, starts the owner
process (`pyqvm.named.owner`) detached, and returns once the guest is ready,
or raises the owner's error (a `LaunchError` with QEMU's stderr and the console
tail, a `SpecError`...) as that same type. `AsyncNamedVM.attach` connects to a
running one. The handle speaks QMP to the owner through `qemu.qmp.QMPClient`
(see `pyqvm.named.wire` for why); its other methods are `AsyncVM`'s, run by
the owner (`pyqvm.faces.derived_named`). Closing a handle leaves the VM running; `stop` ends it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import importlib
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from pyqvm.channels.qmp import EventFilter, event_filter
from pyqvm.codec import callback_argument, from_json, is_callback, to_json
from pyqvm.errors import NamedVMError, PyqvmTimeoutError, tail
from pyqvm.named import registry, ssh, wire
from pyqvm.named.registry import REQUEST, Entry, Record
from pyqvm.named.ssh import Host, SshStream
from pyqvm.named.wire import CALLBACK_EVENT, OP_COMMAND
from pyqvm.spec import VMSpec
from pyqvm.spec.io import spec_to_dict

if TYPE_CHECKING:  # imported where used: `pyqvm exec` pays for no migration machinery
    from pyqvm.ops.migration.types import (
        MigrationStats,
        MigrationTLS,
        MigrationTuning,
        ProgressCallback,
        Storage,
        Transport,
    )

log = logging.getLogger(__name__)

#: How long a client waits for an owner to accept it and greet.
CONNECT_TIMEOUT = 5.0


class AsyncNamedVMBase:
    """What `AsyncNamedVM` does its own way: making and closing handles, the owner's own
    commands, events, a migration into a new named VM, and `_op`, which carries every other
    operation (`pyqvm.faces.derived_named` writes those from AsyncVM's)."""

    #: AsyncVM's `send`, as the derived class carries it (`migrate` sends with it).
    send: Callable[..., Awaitable[MigrationStats]]
    #: Name -> module of the types `_op` is given as text (the derived class's table).
    types: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self, name: str, client: QMPClient, *, entry: Entry | None = None,
        stream: SshStream | None = None,
    ) -> None:  # fmt: skip
        self._name = name
        self._client = client
        #: This host's registry entry of the VM (None for a VM on another host).
        self.entry = entry
        self._stream = stream

    @property
    def name(self) -> str:
        return self._name

    @property
    def host(self) -> Host | None:
        """The host the VM lives on (None: this one)."""
        return None if self._stream is None else self._stream.host

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # --- making and closing handles --------------------------------------------------------

    @classmethod
    async def attach(
        cls, name: str, *, timeout: float = CONNECT_TIMEOUT, host: str | Host | None = None
    ) -> Self:
        """Connect to the running VM called ``name`` (on ``host``, ``ssh://[user@]HOST``:
        see `pyqvm.named.ssh`; default this one).

        `NamedVMError` if there is none (a dead one is pruned and said so), or
        its owner does not answer within ``timeout`` seconds, or the host cannot be reached.
        """
        if host is not None:
            return await cls._attach_over_ssh(name, _host(host), timeout)
        entry = registry.find(name)
        client = QMPClient(f"pyqvm-{name}", readbuflen=wire.LINE_LIMIT)
        try:
            await asyncio.wait_for(client.connect(str(entry.socket)), timeout)
        except TimeoutError:
            await client.disconnect()
            raise entry.not_answering(timeout) from None
        except (QMPError, OSError) as e:
            await client.disconnect()
            if not entry.alive():
                raise NamedVMError(f"VM {name!r} has just ended", name=name) from None
            raise NamedVMError(
                f"VM {name!r}: cannot connect to its owner process ({entry.owner()}) at "
                f"{entry.socket}: {e}; it may still be starting",
                name=name,
            ) from None
        await _check_greeting(client, name)
        return cls(name, client, entry=entry)

    @classmethod
    async def _attach_over_ssh(cls, name: str, host: Host, timeout: float) -> Self:
        stream = SshStream(host, name, timeout)
        client = QMPClient(f"pyqvm-{name}", readbuflen=wire.LINE_LIMIT)
        sock = await stream.open()
        try:
            # The login is part of the wait here: allow ssh its own connect timeout.
            await asyncio.wait_for(client.connect(sock), timeout + 15)
        except TimeoutError:
            await client.disconnect()
            await stream.close(0)
            raise NamedVMError(
                f"VM {name!r} on {host.url}: no answer within {timeout + 15:g} s", name=name
            ) from None
        except (QMPError, OSError, EOFError):
            await client.disconnect()
            raise await stream.error() from None
        try:
            await _check_greeting(client, name)
        except NamedVMError:
            await stream.close(5)
            raise
        return cls(name, client, stream=stream)

    @classmethod
    async def up(
        cls,
        spec: VMSpec | None = None,
        *,
        name: str,
        template: str | None = None,
        templates_dir: Path | None = None,
        restore: Path | None = None,
        image_cache: Path | None = None,
        timeout: float = 600.0,
        host: str | Host | None = None,
    ) -> Self:
        """Start VM ``name`` in an owner process of its own and return once it is ready.

        It boots ``spec``, or is a clone of ``template``, or resumes the state
        ``restore`` names (saved with `save`; its spec is read from there). The
        VM runs on after this process ends, until `stop`. On ``host``
        (``ssh://[user@]HOST``), the owner starts there; paths name that host's files.
        """
        request: dict[str, Any] = {
            "name": name,
            "image_cache": None if image_cache is None else str(image_cache),
        }
        if template is not None:
            request |= {"template": template, "templates_dir": templates_dir and str(templates_dir)}
        elif restore is not None:
            # The owner reads the spec saved with the state (on its host, maybe another).
            here = host is None
            request["restore"] = str(Path(restore).resolve() if here else restore)
        else:
            spec = spec if spec is not None else VMSpec()
            request["spec"] = {**spec_to_dict(spec), "name": name}
        if host is not None:
            await _start_on(_host(host), name, request, timeout)
        else:
            await start_owner(name, request, timeout=timeout)
        return await cls.attach(name, host=host)

    async def close(self) -> None:
        """Hang up (the VM runs on). Quiet if the owner hung up first."""
        # qemu.qmp re-raises here what ended its reader (EOFError when the owner left).
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()
        if self._stream is not None:
            await self._stream.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- talking to the owner --------------------------------------------------------------

    async def call(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one owner command (``pyqvm-*``, or a QMP command relayed to QEMU)."""
        try:
            return await self._client.execute(command, dict(arguments or {}))
        except ExecuteError as e:
            error = e.received.get("error")
            raise wire.error_from_json(error if isinstance(error, dict) else {}) from None
        except (QMPError, OSError, EOFError) as e:
            raise NamedVMError(
                f"VM {self.name!r}: its owner hung up during {command} ({type(e).__name__}); "
                "the VM was stopped or its owner died",
                name=self.name,
            ) from None

    async def info(self) -> dict[str, Any]:
        """The VM's `Record` as JSON, with its ``state`` (pyqvm's) and ``status`` (QEMU's)."""
        info: dict[str, Any] = await self.call("pyqvm-info")
        return info

    async def record(self) -> Record:
        return Record.from_json(await self.info(), self.name)

    @contextlib.asynccontextmanager
    async def events(
        self, names: str | Iterable[str] = (), match: EventFilter | None = None
    ) -> AsyncIterator[EventListener]:
        """QEMU's events, as relayed by the owner, while the block runs (see
        `AsyncVM.events`; ``match`` is a predicate on the event, or a mapping its
        ``data`` must contain)."""
        listener = EventListener(
            [names] if isinstance(names, str) else list(names) or None, event_filter(match)
        )
        with self._client.listen(listener):
            yield listener

    # --- AsyncVM's operations, run by the owner ------------------------------------------------

    async def _op(
        self, operation: str, returns: object, /, **arguments: tuple[object, object]
    ) -> Any:
        """Run AsyncVM's ``operation`` in the owner: each argument is ``(value, its type)``,
        as `pyqvm.faces.derived_named` passes them; the result is decoded as ``returns``.

        A callback argument stays here: the owner calls a stand-in that relays each call
        as a ``PYQVM_CALLBACK`` event, which runs the callback in this process. When the
        operation ended the VM (`stop`, `save`, a `send`), this returns once its owner is
        gone and the name free."""
        args: dict[str, Any] = {}
        callbacks: dict[str, tuple[Callable[[Any], object], object]] = {}
        for name, (value, text) in arguments.items():
            tp = self._type(text)
            if is_callback(tp):
                if value is not None:
                    callbacks[name] = (value, callback_argument(tp))  # type: ignore[assignment]
            else:
                args[name] = to_json(value, tp, name)
        request = {"operation": operation, "arguments": args, "callbacks": sorted(callbacks)}
        if callbacks:
            request["call"] = call = f"{os.getpid()}-{next(_calls)}"
            async with self.events(CALLBACK_EVENT, {"call": call}) as listener:
                relay = asyncio.ensure_future(_relay(listener, callbacks))
                try:
                    reply = await self.call(OP_COMMAND, request)
                finally:
                    relay.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await relay
                    for event in listener.clear():  # what came before the reply
                        _callback(event, callbacks)
        else:
            reply = await self.call(OP_COMMAND, request)
        if reply.get("ended"):
            await self._until_gone()
        return from_json(reply.get("result"), self._type(returns), f"{operation}: result")

    @classmethod
    def _type(cls, text: object) -> object:
        """The type an annotation's text names, its names imported from `types` on first
        use (a type given as itself is returned as it is)."""
        return _resolve(text, tuple(sorted(cls.types.items()))) if isinstance(text, str) else text

    async def migrate(
        self,
        dst: str,
        *,
        transport: Transport = "unix",
        address: str | None = None,
        storage: Storage = "shared",
        tuning: MigrationTuning | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = 600.0,
        tls: MigrationTLS | None = None,
        insecure: bool = False,
    ) -> MigrationStats:
        """Move this running guest into a new named VM ``dst``, started for it with this
        VM's spec and devices in an owner of its own (see `AsyncVM.migrate`); this VM is
        gone afterwards, and ``dst`` takes over its port forwards. On failure this VM runs
        on and ``dst`` is removed."""
        from pyqvm.ops.migration.types import Incoming, MigrationTLS, MigrationTuning

        source = await self.call("pyqvm-migration-source", {"storage": storage})
        stats: list[MigrationStats] = []

        async def send(incoming: dict[str, Any]) -> None:
            target = from_json(incoming, Incoming, "incoming")
            stats.append(
                await self.send(
                    target, storage=storage, tuning=tuning, progress=progress, timeout=timeout,
                    tls=tls, insecure=insecure,
                )
            )  # fmt: skip

        listen = {
            "transport": transport,
            "address": address,
            "storage": storage,
            "tuning": to_json(tuning, MigrationTuning | None, "tuning"),
            "tls": to_json(tls, MigrationTLS | None, "tls"),
            "insecure": insecure,
            "devices": source["devices"],
            "overlays": source["overlays"],
            "without_forwards": bool(source["forwards"]),
        }
        request = {
            "name": dst,
            "spec": {**source["spec"], "name": dst},
            "incoming": {"listen": listen, "timeout": timeout},
        }
        if self.host is not None:
            await _start_on(self.host, dst, request, timeout or 600.0, on_incoming=send)
        else:
            await start_owner(dst, request, timeout=timeout or 600.0, on_incoming=send)
        await self._until_gone()
        if source["forwards"]:
            # This VM has quit: its host ports are free for the destination now.
            async with await type(self).attach(dst, host=self.host) as new:
                for netdev, rule in source["forwards"]:
                    out = await new.call(
                        "human-monitor-command",
                        {"command-line": f"hostfwd_add {netdev} {rule}", "pyqvm-timeout": 60.0},
                    )
                    if str(out).strip():
                        log.warning("%s: port forward %s not restored: %s", dst, rule, out)
        return stats[0]

    async def _until_gone(self, timeout: float = 10.0) -> None:
        """Hang up and wait for the owner to remove its entry (the name is free again)."""
        await self.close()  # over SSH: returns once the far side saw the entry go
        if self.entry is None:
            return
        give_up = time.monotonic() + timeout
        # The owner's last act is to exit; its lock is what tells (no event to wait on).
        while self.entry.directory.exists() and self.entry.alive():
            if time.monotonic() > give_up:
                raise PyqvmTimeoutError(
                    f"VM {self.name!r}: its owner did not exit in {timeout:g} s"
                )
            await asyncio.sleep(0.01)


_calls = itertools.count(1)


@functools.cache
def _resolve(text: str, types: tuple[tuple[str, str], ...]) -> object:
    where = dict(types)

    class Names(dict[str, object]):
        def __missing__(self, name: str) -> object:
            if name not in where:
                raise KeyError(name)
            value = getattr(importlib.import_module(where[name]), name)
            self[name] = value
            return value

    return eval(text, {"__builtins__": builtins}, Names())


async def _relay(listener: EventListener, callbacks: Callbacks) -> None:
    async for event in listener:
        _callback(event, callbacks)


Callbacks = Mapping[str, tuple[Callable[[Any], object], object]]  # parameter -> (fn, its type)


def _callback(event: Mapping[str, Any], callbacks: Callbacks) -> None:
    data = event.get("data") or {}
    fn, tp = callbacks[data["parameter"]]
    fn(from_json(data.get("value"), tp, f"{data['parameter']}: argument"))


async def _start_on(
    host: Host,
    name: str,
    request: Mapping[str, Any],
    timeout: float,
    on_incoming: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
) -> Record:
    """`start_owner` on ``host``, over SSH (`pyqvm.named.ssh.start_owner`)."""
    said = await ssh.start_owner(host, name, request, timeout=timeout, on_incoming=on_incoming)
    if "error" in said:
        raise wire.error_from_json(said["error"])
    return Record.from_json(said["ok"], name)


async def _check_greeting(client: QMPClient, name: str) -> None:
    """Refuse an owner of another protocol, saying both pyqvm versions."""
    greeting = client.greeting
    said = greeting.QMP.version.get("pyqvm") if greeting is not None else None
    said = said if isinstance(said, dict) else {}
    if said.get("protocol") != wire.PROTOCOL:
        await client.disconnect()
        raise NamedVMError(
            f"VM {name!r} is served by an owner of pyqvm {said.get('version', 'unknown')} "
            f"(protocol {said.get('protocol')}); this is pyqvm {wire.VERSION} (protocol "
            f"{wire.PROTOCOL}); use that pyqvm, or end it: pyqvm stop --force {name}",
            name=name,
        )


def _host(host: str | Host) -> Host:
    return host if isinstance(host, Host) else Host.parse(host)


async def start_owner(
    name: str,
    request: Mapping[str, Any],
    *,
    timeout: float,
    on_incoming: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
) -> Record:
    """Reserve ``name``, start its owner process detached, return its `Record` once the
    guest is ready; re-raise the owner's error if it could not start it.

    A migration destination (``request["incoming"]``) first says where it listens:
    ``on_incoming`` gets that (`Incoming` as JSON) and makes the source send."""
    reservation = registry.reserve(name)
    entry = reservation.entry
    owner_pid: int | None = None
    try:
        fd = os.open(entry.directory / REQUEST, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:
            json.dump(request, f)
        r, w = os.pipe()
        log_fd = os.open(
            entry.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        try:
            # The owner forks off at once (it is nobody's child then) and says its pid.
            intermediary = subprocess.Popen(
                [sys.executable, "-m", "pyqvm.named.owner", str(entry.directory), str(w)],
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=(w, reservation.lock_fd),
                start_new_session=True,
            )
        finally:
            os.close(w)
            os.close(log_fd)
        reader, pipe = await _line_reader(r)
        try:
            intermediary.wait()
            hello = await asyncio.wait_for(reader.readline(), 30)
            if hello:
                owner_pid = int(json.loads(hello)["pid"])
            line = await asyncio.wait_for(reader.readline(), timeout) if hello else b""
            while line and "incoming" in (said := json.loads(line)):
                if on_incoming is None:
                    raise NamedVMError(f"VM {name!r}: its owner waits for a migration", name=name)
                await on_incoming(said["incoming"])
                line = await asyncio.wait_for(reader.readline(), timeout)
        finally:
            pipe.close()
    except TimeoutError:
        _kill(owner_pid)
        reservation.release()
        raise PyqvmTimeoutError(f"VM {name!r} was not ready within {timeout:g} s") from None
    except BaseException:
        _kill(owner_pid)
        reservation.release()
        raise
    finally:
        reservation.close()  # the owner holds the name now, or nobody does
    if not line:
        log_tail = _read_tail(entry.log_file)
        shutil.rmtree(entry.directory, ignore_errors=True)
        raise NamedVMError(
            f"VM {name!r}: its owner process died before the guest was ready"
            + (f"; its log ends:\n{log_tail}" if log_tail else ""),
            name=name,
        )
    msg = json.loads(line)
    if "error" in msg:
        raise wire.error_from_json(msg["error"])
    return Record.from_json(msg["ok"], name)


async def _line_reader(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=wire.LINE_LIMIT)
    pipe = os.fdopen(fd, "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    return reader, transport


def _kill(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # its QEMU dies with it


def _read_tail(path: Path) -> str:
    try:
        return tail(path.read_text(errors="replace"), 20)
    except OSError:
        return ""


class _Carrier(Protocol):
    @property
    def name(self) -> str: ...

    def _op(
        self, operation: str, returns: object, /, **arguments: tuple[object, object]
    ) -> Any: ...


class NamedGroup:
    """A group of a named VM's operations (``vm.console``): each carried by the VM's
    ``_op`` as ``GROUP.OPERATION`` (async or blocking, as the VM is)."""

    def __init__(self, vm: _Carrier, group: str) -> None:
        self._vm = vm
        self._group = group

    def _op(self, operation: str, returns: object, /, **arguments: tuple[object, object]) -> Any:
        return self._vm._op(f"{self._group}.{operation}", returns, **arguments)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._vm.name!r}>"


__all__ = ["CONNECT_TIMEOUT", "AsyncNamedVMBase", "NamedGroup", "start_owner"]
