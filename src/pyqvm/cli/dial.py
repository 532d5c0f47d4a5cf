"""The far side of ``pyqvm --host ssh://HOST`` (`pyqvm.named.ssh`): two verbs that a pyqvm
on HOST runs for a client elsewhere, and that a user does not type.

- ``pyqvm dial-stdio NAME`` bridges stdin/stdout to VM NAME's owner socket (as ``docker
  system dial-stdio`` does for its daemon). When the owner ends the connection (its VM
  ended), it returns once the name is free, so a client that waits for the stream to end
  knows the name is free too.
- ``pyqvm owner-start NAME`` reads ``{"request", "timeout"}`` on stdin, starts the owner as
  ``pyqvm up`` would, and writes the ready pipe's JSON lines on stdout; after an
  ``{"incoming": ...}`` line it waits for a line on stdin (the source has sent).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

#: This module's verbs (kept out of the usage line).
VERBS = ("dial-stdio", "owner-start")
#: How long dial-stdio waits for an ended VM's name to be free.
_GONE_WAIT = 10.0


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    d = sub.add_parser("dial-stdio", parents=list(parents), help=argparse.SUPPRESS)
    d.add_argument("name", metavar="NAME")
    d.add_argument("--timeout", type=float, default=5.0, help="for the owner's greeting")
    d.set_defaults(run=run_dial_stdio, over_owner=True)  # the far side: never sent on
    o = sub.add_parser("owner-start", parents=list(parents), help=argparse.SUPPRESS)
    o.add_argument("name", metavar="NAME")
    o.set_defaults(run=run_owner_start, over_owner=True)


def run_dial_stdio(args: argparse.Namespace) -> int:
    from pyqvm.named import registry

    entry = registry.find(args.name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(args.timeout)
    try:  # the owner greets first: an owner that does not is said so here, with its pid
        sock.connect(str(entry.socket))
        greeting = sock.recv(65536)
    except TimeoutError:
        raise entry.not_answering(args.timeout) from None
    sock.settimeout(None)
    _write(greeting)
    client_done = threading.Event()

    def upstream() -> None:  # the client's bytes to the owner
        while data := os.read(sys.stdin.fileno(), 65536):
            sock.sendall(data)
        client_done.set()
        sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    while data := sock.recv(65536):
        _write(data)
    if not client_done.is_set():
        # The owner hung up first: its VM ended. Return once the name is free.
        give_up = time.monotonic() + _GONE_WAIT
        while entry.directory.exists() and entry.alive() and time.monotonic() < give_up:
            time.sleep(0.01)
    return 0


def _write(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(sys.stdout.fileno(), view) :]


def run_owner_start(args: argparse.Namespace) -> int:
    import asyncio

    from pyqvm.errors import PyqvmError
    from pyqvm.named import wire
    from pyqvm.named.client import start_owner

    said = json.loads(sys.stdin.readline())

    def tell(msg: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    async def incoming(where: dict[str, Any]) -> None:
        tell({"incoming": where})
        await asyncio.to_thread(sys.stdin.readline)  # the source has sent

    async def go() -> None:
        try:
            record = await start_owner(
                args.name, said["request"], timeout=float(said["timeout"]), on_incoming=incoming
            )
        except PyqvmError as e:
            tell({"error": wire.error_to_json(e)})
            return
        tell({"ok": record.to_json()})

    asyncio.run(go())
    return 0
