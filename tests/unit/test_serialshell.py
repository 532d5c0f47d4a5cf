"""The serial shell's command lines (`pyqvm.ops.serialshell`), and the options that choose it."""

from __future__ import annotations

import re
import shlex

import pytest

from pyqvm.cli import parse_args, spec_from_args
from pyqvm.errors import GuestError, SpecError
from pyqvm.ops import serialshell
from pyqvm.spec import VMSpec


def test_argv_and_env_are_quoted_for_the_shell() -> None:
    line = serialshell.command_line(["printf", "%s\n", "a b", "$HOME"], {"K": "v w"})
    assert shlex.split(line) == ["env", "-i", "K=v w", "printf", "%s\n", "a b", "$HOME"]


def test_a_line_longer_than_the_tty_takes_is_refused_before_it_is_typed() -> None:
    assert serialshell._line("x" * serialshell.LINE_MAX)
    with pytest.raises(GuestError, match="pass long data as input"):
        serialshell._line("x" * (serialshell.LINE_MAX + 1))


def test_prompts_match_with_and_without_a_cursor_query() -> None:
    for pattern, text in [
        (serialshell.PROMPT, b"/ # \x1b[6n"),
        (serialshell.PROMPT, b"user@host:~$ "),
        (serialshell.LOGIN, b"debian login: "),
        (serialshell.PASSWORD, b"Password: "),
    ]:
        assert re.compile(pattern.encode()).search(text), (pattern, text)
    assert not re.compile(serialshell.PROMPT.encode()).search(b"# not at the end\r\n")


def test_the_command_line_chooses_the_serial_shell_and_its_login() -> None:
    spec = spec_from_args(parse_args(["run", "--exec-via", "serial", "--login", "me:pw"]))
    assert (spec.exec_via, spec.console_user, spec.console_password) == ("serial", "me", "pw")
    assert spec.effective_exec_via == "serial"
    assert VMSpec(guest_agent=False).effective_exec_via == "serial"
    assert VMSpec().effective_exec_via == "agent"
    with pytest.raises(SpecError, match="exec_via"):
        VMSpec(guest_agent=False, exec_via="agent")
    with pytest.raises(SpecError, match="console_user"):
        VMSpec(console_user="a b")
