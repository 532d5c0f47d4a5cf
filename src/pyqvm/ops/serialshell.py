"""``run`` through a shell on the guest's serial console, for a guest with nothing of ours
(no agent, no sshd), as autopkgtest's QEMU runner drives a root shell on a serial port.

How: press Enter and log in as ``console_user`` if the console shows a login prompt; then,
per command, type lines that run it in a subshell with its stdin, stdout and stderr in the
files of a fresh temporary directory, and print its exit status and both outputs,
base64-encoded, between markers. Each marker is typed in two pieces (``PQ`` and
``-TOKEN``) and printed whole, so the terminal's echo of a command line never matches it.
Input goes in pieces of `INPUT_CHUNK` bytes, each acknowledged, so the guest's tty buffer
(4 KiB) never overflows.

Limits, plainly:

- the guest needs a POSIX shell with ``base64`` and ``mktemp`` (busybox or coreutils);
- one command at a time per VM: they share the console (a second waits its turn), and
  nothing else should type into it meanwhile;
- output is exact (binary too: base64 on the wire) but slow: the emulated UART carries it,
  a third larger than the output itself; kernel messages printed on the console in the
  middle of it make it unreadable (`GuestError`: boot with ``quiet``);
- a command killed by signal N exits 128+N (the shell's way), where the agent says -N;
- a command still running at its timeout is interrupted (Ctrl-C);
- the command line, quoted, must fit the tty's line (`LINE_MAX` bytes).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import shlex
import weakref
from collections.abc import Mapping, Sequence

from pyqvm.channels.agent import ExecResult
from pyqvm.deadline import Deadline
from pyqvm.errors import ConsoleError, GuestError, PyqvmTimeoutError
from pyqvm.machine import Machine
from pyqvm.ops import console
from pyqvm.state import VMState

#: What a login prompt, a password prompt and a shell prompt end with; a shell with line
#: editing may then ask the terminal where its cursor is (busybox ash: ESC [ 6 n).
_QUERIES = r"(?:\x1b\[[0-9;?]*[A-Za-z])*"
LOGIN = rf"(?i)login: ?{_QUERIES}$"
PASSWORD = rf"(?i)password: ?{_QUERIES}$"
PROMPT = rf"[#$%>] ?{_QUERIES}$"
#: A refused login, as getty/login and busybox say it.
REFUSED = (r"(?i)login incorrect", r"(?i)incorrect password")
#: Input bytes typed per acknowledged line (base64: 4/3 of it).
INPUT_CHUNK = 2048
#: The longest line the guest's tty takes in canonical mode (4096 with its newline).
LINE_MAX = 4095
#: Seconds to reach a shell prompt, login included.
LOGIN_TIMEOUT = 30.0

_locks: weakref.WeakKeyDictionary[Machine, asyncio.Lock] = weakref.WeakKeyDictionary()


def _marker(token: str, what: str) -> tuple[str, str]:
    """The shell code that prints marker ``what`` and the regular expression it prints."""
    return f"printf '%s%s\\n' PQ -{token}-{what}", rf"PQ-{token}-{what}\r?\n"


def command_line(argv: Sequence[str], env: Mapping[str, str] | None) -> str:
    """``argv`` as a shell command: quoted, with ``env`` replacing the environment."""
    words = list(argv)
    if env is not None:
        words = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *words]
    return shlex.join(words)


def _line(text: str) -> str:
    if len(text.encode("utf-8")) > LINE_MAX:
        raise GuestError(
            f"the command line is {len(text.encode())} bytes quoted; a serial shell takes "
            f"{LINE_MAX}: pass long data as input instead"
        )
    return text


async def _to_prompt(vm: Machine, deadline: Deadline) -> None:
    """Press Enter until a shell prompt shows, logging in on the way."""
    spec = vm.spec
    port = vm.console_port
    if port is not None:
        port.consume(len(port.pending()))  # what the guest printed before is not an answer
    console.send(vm, console.ENTER)
    logged_in = False
    while True:
        try:
            m = await console.expect(
                vm, [LOGIN, PASSWORD, PROMPT], deadline.left() or 0.01,
                fail_on=(*console.DEFAULT_FAIL_ON, *REFUSED),
            )  # fmt: skip
        except ConsoleError as e:
            if e.pattern in REFUSED:
                raise ConsoleError(
                    f"VM {vm.name!r}: login as {spec.console_user!r} on the serial console "
                    "was refused; check console_user and console_password",
                    pattern=e.pattern,
                    console=e.console,
                ) from None
            raise
        except PyqvmTimeoutError:
            raise PyqvmTimeoutError(
                f"VM {vm.name!r}: no shell prompt on the serial console in "
                f'{deadline.timeout:g} s (exec_via = "serial" needs a shell or a login '
                "prompt there)"
            ) from None
        if m.index == 2:
            return
        if m.index == 0:
            if logged_in:
                raise ConsoleError(
                    f"VM {vm.name!r}: login as {spec.console_user!r} on the serial console "
                    "was refused; check console_user and console_password"
                )
            logged_in = True
            console.send(vm, spec.console_user + console.ENTER)
        else:
            if spec.console_password is None:
                raise ConsoleError(
                    f"VM {vm.name!r}: the serial console asks for a password; set console_password"
                )
            console.send(vm, spec.console_password + console.ENTER)


async def _expect(vm: Machine, pattern: str, deadline: Deadline) -> console.ConsoleMatch:
    return await console.expect(vm, pattern, deadline.left() or 0.01)


async def run(
    vm: Machine,
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> ExecResult:
    """Run ``argv`` through the serial console's shell and collect its output (see the
    module for how, and its limits)."""
    vm.require(VMState.RUNNING, what="running a guest command")
    if not argv:
        raise GuestError(f"{vm.name}: run needs a non-empty argv")
    lock = _locks.setdefault(vm, asyncio.Lock())
    async with lock:
        deadline = Deadline(timeout)
        await _to_prompt(vm, Deadline(min(LOGIN_TIMEOUT, timeout)))
        token = secrets.token_hex(6)
        code, ready = _marker(token, "dir")
        console.send(vm, _line(f"pqT=$(mktemp -d) && {code}") + console.ENTER)
        await _expect(vm, ready, deadline)
        data = input or b""
        for i in range(0, len(data), INPUT_CHUNK):
            piece = base64.b64encode(data[i : i + INPUT_CHUNK]).decode("ascii")
            code, ack = _marker(token, f"in{i}")
            console.send(vm, f'printf %s {piece} >>"$pqT/i"; {code}' + console.ENTER)
            await _expect(vm, ack, deadline)
        stdin = '<"$pqT/in"' if data else "</dev/null"
        decode = 'base64 -d "$pqT/i" >"$pqT/in" && ' if data else ""
        rc = f"PQ-{token}-rc"
        out_code, out = _marker(token, "out")
        err_code, err = _marker(token, "err")
        line = (
            f"{decode}(cd / && exec {command_line(argv, env)}) {stdin} "
            f'>"$pqT/o" 2>"$pqT/e"; pqR=$?; printf \'%s%s %s\\n\' PQ -{token}-rc $pqR; '
            f'base64 "$pqT/o"; '
            f'{out_code}; base64 "$pqT/e"; {err_code}; rm -rf "$pqT"'
        )
        console.send(vm, _line(line) + console.ENTER)
        try:
            status = await console.expect(vm, rf"{rc} (\d+)\r?\n", deadline.left() or 0.01)
        except PyqvmTimeoutError:
            console.send(vm, "\x03")  # Ctrl-C: the command, not the shell
            raise PyqvmTimeoutError(
                f"{vm.name}: {shlex.join(argv)!r} did not finish in {timeout:g} s on the "
                "serial shell (interrupted)"
            ) from None
        stdout = await _expect(vm, out, Deadline(max(deadline.left() or 0, 30.0)))
        stderr = await _expect(vm, err, Deadline(max(deadline.left() or 0, 30.0)))
    return ExecResult(
        returncode=int(status.groups[0] or 0),
        stdout=_decoded(vm, stdout.before, "stdout"),
        stderr=_decoded(vm, stderr.before, "stderr"),
        argv=tuple(argv),
    )


def _decoded(vm: Machine, text: str, stream: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise GuestError(
            f"{vm.name}: the command's {stream} came back garbled on the serial console "
            "(kernel messages in the middle of it? boot the guest with 'quiet')"
        ) from None


__all__ = ["INPUT_CHUNK", "LINE_MAX", "command_line", "run"]
