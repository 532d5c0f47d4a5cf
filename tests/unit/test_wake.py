"""Waking a clone through pyqvm-wake's port: the request line and what its answers mean
(the guest side is the e2e tests'; here the daemon is the other end of a socket pair)."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest

from pyqvm import Machine, TemplateError, VMSpec
from pyqvm.ops import wake

T = TypeVar("T")


class PortMachine(Machine):
    """A machine whose wake port is one end of a socket pair (no QEMU)."""

    def __init__(self, port: socket.socket) -> None:
        super().__init__(VMSpec(name="w"))
        self._port = port

    @property
    def wake_port(self) -> socket.socket | None:
        return self._port

    async def until_exit(self, aw: Awaitable[T], what: str) -> T:
        return await aw


async def daemon(peer: socket.socket, answer: bytes | None) -> bytes:
    """Read one request line; answer it (or close without a word)."""
    loop = asyncio.get_running_loop()
    peer.setblocking(False)
    line = b""
    while not line.endswith(b"\n"):
        line += await loop.sock_recv(peer, 4096)
    if answer is None:
        peer.close()
    else:
        await loop.sock_sendall(peer, answer)
    return line


async def wake_with(answer: bytes | None) -> tuple[bytes, Any]:
    ours, peer = socket.socketpair()
    try:
        served = asyncio.ensure_future(daemon(peer, answer))
        try:
            await wake.make_own(PortMachine(ours))
            outcome: Any = None
        except TemplateError as e:
            outcome = e
        return await served, outcome
    finally:
        ours.close()
        peer.close()


@pytest.mark.asyncio
async def test_the_request_is_the_hosts_time_and_64_bytes_of_entropy() -> None:
    before = time.time_ns()
    line, outcome = await wake_with(b"ok\n")
    assert outcome is None
    m = re.fullmatch(rb"(\d+) ([0-9a-f]{128})\n", line)
    assert m is not None, line
    assert before <= int(m[1]) <= time.time_ns()
    line2, _ = await wake_with(b"ok\n")
    assert line2.split()[1] != m[2]  # fresh entropy each time


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (b"error: clock_settime: Operation not permitted\n", "clock_settime: Operation not"),
        (None, "<QEMU closed the port>"),
        (b"bogus\n", "'bogus'"),
    ],
)
async def test_anything_but_ok_is_a_template_error_with_the_daemons_words(
    answer: bytes | None, words: str
) -> None:
    _, outcome = await wake_with(answer)
    assert isinstance(outcome, TemplateError)
    assert words in str(outcome) and "setting the clone's clock" in str(outcome)
