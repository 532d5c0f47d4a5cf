"""The command line: one module per verb, argparse's dispatch and exit codes (no QEMU)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import pyqvm.cli
from pyqvm.cli import build_parser, cmdline, doctor, image, main, parse_args, run, template


@pytest.mark.parametrize(
    ("argv", "verb"),
    [
        (["run", "--", "true"], run),
        (["run", "--template", "t", "--", "true"], run),
        (["cmdline"], cmdline),
        (["image", "build"], image),
        (["image", "list"], image),
        (["template", "create", "--name", "t"], template),
        (["template", "rm", "a", "b"], template),
        (["doctor", "--json"], doctor),
    ],
)
def test_each_verb_is_dispatched_to_its_module(argv: list[str], verb: object) -> None:
    assert parse_args(argv).run is verb.run  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "argv",
    [
        ["frobnicate"],
        ["run", "--smp", "two"],
        ["cmdline", "--", "true"],  # only run takes a guest command
        ["run", "--forward", "22", "--", "true"],  # a bad value our own parsing finds
        ["run", "--initrd", "x", "--", "true"],
        ["template", "create"],  # --name is needed
        ["run", "--template", "t", "--memory", "1G", "--", "true"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "usage: pyqvm" in capsys.readouterr().err


def test_the_docstring_lists_every_verb() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"run", "cmdline", "image", "template", "doctor"}
    doc = pyqvm.cli.__doc__ or ""
    for verb in sub.choices:
        assert f"pyqvm {verb}" in doc, verb


def test_cmdline_prints_the_argv(capsys: pytest.CaptureFixture[str]) -> None:
    # The built-in guest (scripts/setup.sh builds it), with an override.
    assert main(["cmdline", "--json", "--accel", "tcg", "--memory", "1G"]) == 0
    argv = json.loads(capsys.readouterr().out)
    assert argv[0].endswith("qemu-system-x86_64") and "1024M" in argv
    assert argv[argv.index("-accel") + 1] == "tcg" and "-kernel" in argv


def test_a_pyqvm_failure_exits_125(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cmdline", str(tmp_path / "missing.toml")]) == pyqvm.cli.EXIT_ERROR == 125
    assert "no such spec file" in capsys.readouterr().err
