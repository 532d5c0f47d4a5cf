"""The serial console's live end (`ConsolePort`) and ``expect``'s matching, with a socket
pair standing in for QEMU's chardev: what the guest prints is kept for ``expect``, what
``send`` queues reaches QEMU, interactive clients see the output and type, and a slow
viewer never holds up the guest."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from pyqvm.channels.console import ConsolePort
from pyqvm.errors import ConsoleError, SpecError
from pyqvm.ops.console import DEFAULT_FAIL_ON, compile_patterns, earliest


def _port(tmp_path: Path | None = None) -> tuple[ConsolePort, socket.socket]:
    ours, qemu = socket.socketpair()
    listen = None if tmp_path is None else tmp_path / "console.sock"
    return ConsolePort(ours, listen=listen, name="t"), qemu


def _until(cond: object, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_what_the_guest_prints_waits_for_expect_and_sends_reach_qemu() -> None:
    port, qemu = _port()
    try:
        qemu.sendall(b"login: ")
        _until(lambda: port.pending() == b"login: ")
        port.consume(3)
        assert port.pending() == b"in: "
        port.send(b"root\r")
        qemu.settimeout(5)
        assert qemu.recv(100) == b"root\r"
    finally:
        port.close()
        qemu.close()


def test_a_waiter_wakes_on_output_and_on_the_end() -> None:
    port, qemu = _port()

    async def main() -> None:
        v = port.version
        waiter = asyncio.ensure_future(port.changed(v))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        qemu.sendall(b"x")
        await asyncio.wait_for(waiter, 5)
        v = port.version
        waiter = asyncio.ensure_future(port.changed(v))
        qemu.close()  # QEMU exited
        await asyncio.wait_for(waiter, 5)
        assert port.eof

    try:
        asyncio.run(main())
        with pytest.raises(ConsoleError, match="closed"):
            port.send(b"late")
    finally:
        port.close()


def test_the_linux_panic_line_is_noted_once_it_is_whole() -> None:
    port, qemu = _port()
    try:
        qemu.sendall(b"[  1.0] Kernel panic - not sync")
        time.sleep(0.1)
        assert port.panic_line is None
        qemu.sendall(b"ing: sysrq triggered crash\r\n")
        _until(lambda: port.panic_line is not None)
        assert port.panic_line == "Kernel panic - not syncing: sysrq triggered crash"
    finally:
        port.close()
        qemu.close()


def test_interactive_clients_see_the_output_and_type(tmp_path: Path) -> None:
    port, qemu = _port(tmp_path)
    clients = []
    try:
        for _ in range(2):
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(tmp_path / "console.sock"))
            c.settimeout(5)
            clients.append(c)
        time.sleep(0.1)  # accepted
        qemu.sendall(b"hello")
        assert [c.recv(100) for c in clients] == [b"hello", b"hello"]
        clients[1].sendall(b"ls\r")
        qemu.settimeout(5)
        assert qemu.recv(100) == b"ls\r"
    finally:
        for c in clients:
            c.close()
        port.close()
        qemu.close()
    assert not (tmp_path / "console.sock").exists()


def test_a_viewer_that_does_not_read_is_dropped_not_waited_for(tmp_path: Path) -> None:
    port, qemu = _port(tmp_path)
    viewer = socket.socket(socket.AF_UNIX)
    viewer.connect(str(tmp_path / "console.sock"))
    try:
        time.sleep(0.1)
        chunk = b"y" * 65536
        qemu.settimeout(10)
        for _ in range(64):  # 4 MiB: far more than the viewer's socket buffers hold
            qemu.sendall(chunk)
        _until(lambda: len(port.pending()) >= 4 * 1024 * 1024 - 65536)
        viewer.close()
        # The dropped viewer is forgotten everywhere: the next one (which may get its file
        # descriptor number) is served, and closing while output flows kills nothing.
        for _ in range(20):
            nxt = socket.socket(socket.AF_UNIX)
            nxt.connect(str(tmp_path / "console.sock"))
            nxt.settimeout(5)
            with nxt:
                time.sleep(0.02)
                qemu.sendall(b"after")
                seen = b""
                while b"after" not in seen:
                    got = nxt.recv(65536)
                    assert got, f"the port hung up on a new viewer after {seen!r}"
                    seen += got
            qemu.sendall(b"x" * 4096)  # output while that viewer's end is closing
        assert not port.eof
    finally:
        viewer.close()
        port.close()
        qemu.close()


def test_the_earliest_match_wins_and_ties_go_to_the_first_pattern() -> None:
    rx = compile_patterns(["b+", "a", "ab"], "patterns")
    hit = earliest(rx, b"xxabbb")
    assert hit is not None and hit[0] == 1 and hit[1].group() == b"a"
    assert earliest(rx, b"none") is None
    assert earliest(compile_patterns(list(DEFAULT_FAIL_ON), "fail_on"), b"Oops: 0002 [#1]")


@pytest.mark.parametrize(
    ("patterns", "field"),
    [("(unclosed", "patterns"), (["ok", "[z-a]"], "patterns[1]"), ([b"bytes"], "patterns[0]")],
)
def test_a_pattern_that_is_not_a_regular_expression_is_named(patterns: object, field: str) -> None:
    with pytest.raises(SpecError) as e:
        compile_patterns(patterns, "patterns")  # type: ignore[arg-type]
    assert e.value.field == field


def test_console_text_in_a_message_never_drives_the_readers_terminal() -> None:
    from pyqvm.errors import ConsoleError, tail

    assert tail("a\r\n/ # \x1b[6nb\tc\x07", 5) == "a\n/ # \\x1b[6nb\tc\\x07"
    e = ConsoleError("failed", console="boot\r\n\x1b[2J\x1b[Hprompt")
    assert "\x1b" not in str(e) and "\\x1b[2J" in str(e)
