"""The serial console as a channel: ``expect`` regular expressions on what the guest
prints, ``send`` and ``sendline`` to type into it (`pyqvm.channels.console.ConsolePort`).

As pexpect and QEMU's own functional tests do it: each ``expect`` searches what the guest
printed since the last match and takes it up to the end of its own; the first pattern to
match earliest wins. ``fail_on`` patterns end the wait at once with `ConsoleError`; a guest
panic (pvpanic, or Linux's panic line) with `GuestPanicError`; QEMU's exit with
`ConsoleError` too. All of them carry the console's tail.

Patterns are Python regular expressions, matched on the bytes (so ``.`` is one byte and
``\\w`` ASCII), and the text returned is decoded as UTF-8. The console also logs to its
file as before, and ``pyqvm console`` can be attached at the same time.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pyqvm.channels.console import ConsolePort
from pyqvm.deadline import Deadline
from pyqvm.errors import ConsoleError, PyqvmTimeoutError, SpecError, printable
from pyqvm.machine import Machine
from pyqvm.state import VMState

#: What ends an ``expect`` by default: Linux's panic, oops and BUG lines.
DEFAULT_FAIL_ON: tuple[str, ...] = (r"Kernel panic - not syncing", r"\bOops: ", r"\bBUG: ")
#: What Enter types on a serial terminal (a tty with ``icrnl``, as getty sets, reads "\n").
ENTER = "\r"


@dataclass(frozen=True, slots=True)
class ConsoleMatch:
    """What an ``expect`` found: which pattern (``index`` into the patterns given), the
    text it matched, its groups, and what the guest printed before it since the last
    match."""

    index: int
    pattern: str
    text: str
    before: str
    groups: tuple[str | None, ...] = ()


def compile_patterns(patterns: str | Sequence[str], field: str) -> list[re.Pattern[bytes]]:
    """``patterns`` compiled for the console's bytes; `SpecError` naming the bad one."""
    given = [patterns] if isinstance(patterns, str) else list(patterns)
    out = []
    for i, p in enumerate(given):
        where = field if isinstance(patterns, str) else f"{field}[{i}]"
        if not isinstance(p, str):
            raise SpecError(where, f"{p!r} is not a string (a regular expression)")
        try:
            out.append(re.compile(p.encode("utf-8")))
        except re.error as e:
            raise SpecError(where, f"{p!r} is not a valid regular expression: {e}") from None
    return out


def earliest(
    regexes: Sequence[re.Pattern[bytes]], data: bytes
) -> tuple[int, re.Match[bytes]] | None:
    """The pattern that matches earliest in ``data`` (the first listed on a tie)."""
    best: tuple[int, re.Match[bytes]] | None = None
    for i, rx in enumerate(regexes):
        m = rx.search(data)
        if m is not None and (best is None or m.start() < best[1].start()):
            best = (i, m)
    return best


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _port(vm: Machine, what: str) -> ConsolePort:
    vm.require(VMState.RUNNING, VMState.PAUSED, what=what)
    port = vm.console_port
    if port is None:
        raise ConsoleError(f"VM {vm.name!r} has no live serial console")
    return port


async def expect(
    vm: Machine,
    patterns: str | Sequence[str],
    timeout: float = 60.0,
    *,
    fail_on: Sequence[str] | None = None,
) -> ConsoleMatch:
    """Wait until one of ``patterns`` shows on the serial console (see the module)."""
    wanted = compile_patterns(patterns, "patterns")
    if not wanted:
        raise SpecError("patterns", "give at least one pattern")
    texts = [patterns] if isinstance(patterns, str) else list(patterns)
    failing_texts = DEFAULT_FAIL_ON if fail_on is None else tuple(fail_on)
    failing = compile_patterns(list(failing_texts), "fail_on")
    port = _port(vm, "expecting console output")
    deadline = Deadline(timeout)
    while True:
        version = port.version  # before reading: nothing arrives unseen
        data = port.pending()
        hit = earliest(wanted, data)
        miss = earliest(failing, data)
        if hit is not None and (miss is None or hit[1].start() <= miss[1].start()):
            i, m = hit
            port.consume(m.end())
            return ConsoleMatch(
                index=i,
                pattern=texts[i],
                text=_text(m.group()),
                before=_text(data[: m.start()]),
                groups=tuple(None if g is None else _text(g) for g in m.groups()),
            )
        if (panic := vm.guest_panic()) is not None:
            raise panic
        if miss is not None:
            raise ConsoleError(
                f"VM {vm.name!r}: the console showed {_text(miss[1].group())!r} (fail_on "
                f"pattern {failing_texts[miss[0]]!r}) while waiting for {texts!r}",
                pattern=failing_texts[miss[0]],
                text=_text(miss[1].group()),
                console=vm.console_text(),
            )
        if port.eof:
            raise ConsoleError(
                f"VM {vm.name!r}: QEMU exited while waiting for {texts!r} on the console",
                console=vm.console_text(),
            )
        if deadline.expired:
            raise PyqvmTimeoutError(
                f"VM {vm.name!r}: none of {texts!r} on the console in {timeout:g} s; "
                f"it printed last:\n{printable(_text(data[-2000:]))}"
            )
        await _changed(vm, port, version, deadline)


async def _changed(vm: Machine, port: ConsolePort, version: int, deadline: Deadline) -> None:
    """Until the console changes, a pvpanic arrives, or the deadline."""
    waits = {
        asyncio.ensure_future(port.changed(version)),
        asyncio.ensure_future(vm.qmp.guest_panicked()),
    }
    try:
        await asyncio.wait(waits, timeout=deadline.left(), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


def send(vm: Machine, data: str | bytes) -> None:
    """Type ``data`` into the guest's serial console (text as UTF-8, as given: no Enter)."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    _port(vm, "typing into the console").send(raw)


__all__ = [
    "DEFAULT_FAIL_ON",
    "ENTER",
    "ConsoleMatch",
    "compile_patterns",
    "earliest",
    "expect",
    "send",
]
