"""The command line: one module per verb, argparse's dispatch and exit codes (no QEMU)."""

from __future__ import annotations

import json
import shlex
import struct
from pathlib import Path

import pytest

import pyqvm.cli
from pyqvm.cli import build_parser, cmdline, doctor, image, main, parse_args, run, template
from pyqvm.cli.specargs import overrides_given


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
        ["run", "--template", "t", "--net", "none", "--forward", "2222:22", "--", "true"],
        ["run", "--memory", "512X", "--", "true"],  # not a size: argparse's type= says so
        ["doctor", "--memory", "lots"],
        ["image", "-v"],  # -v goes after the leaf verb: image build -v
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "usage: pyqvm" in capsys.readouterr().err


def test_the_docstring_lists_every_verb() -> None:
    verbs = [
        "run", "up", "restore", "ps", "exec", "ssh", "console", "logs", "expect", "send", "vnc",
        "gdb", "qmp", "stop",
        "wait", "snapshot", "hotplug", "unplug", "migrate", "save", "cmdline", "image", "template",
        "doctor",
    ]  # fmt: skip
    assert "{" + ",".join(verbs) + "}" in build_parser().format_usage()  # no verb more
    doc = pyqvm.cli.__doc__ or ""
    for verb in verbs:
        assert f"pyqvm {verb}" in doc, verb


def _usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        parse_args(argv)
    return capsys.readouterr().err


def test_the_docstring_lists_every_leaf_of_a_group(capsys: pytest.CaptureFixture[str]) -> None:
    lines = (pyqvm.cli.__doc__ or "").splitlines()
    for group, leaves in (
        ("image", "build,list,prune,export,import"),
        ("template", "create,list,rm"),
    ):
        assert "{" + leaves + "}" in _usage([group], capsys)  # no leaf more
        for leaf in leaves.split(","):
            # On a line of its group: "pyqvm image list | prune [--dry-run]".
            mentioned = [ln for ln in lines if ln.startswith(f"pyqvm {group} ") and leaf in ln]
            assert mentioned, f"{group} {leaf}"


@pytest.mark.parametrize(
    "argv", [["bogus"], ["run", "--accel", "hvf"], ["image"], ["cmdline", "--", "true"]]
)
def test_parse_args_exits_2_itself(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2


def test_template_says_which_overrides_it_ignores(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--template", "t", "x.toml", "--accel", "tcg", "--timeout", "9", "--", "true"]
    with pytest.raises(SystemExit):
        main(argv)
    assert "leave out SPEC, --accel, --timeout" in capsys.readouterr().err
    # A clone's name is its own, so --name goes with --template.
    assert overrides_given(parse_args(["run", "--template", "t", "--name", "c"])) == ["--name"]


def test_cmdline_prints_the_argv(capsys: pytest.CaptureFixture[str]) -> None:
    # The built-in guest (scripts/setup.sh builds it), with an override.
    assert main(["cmdline", "--json", "--accel", "tcg", "--memory", "1G"]) == 0
    argv = json.loads(capsys.readouterr().out)
    assert argv[0].endswith("qemu-system-x86_64") and "1048584K" in argv  # 1 GiB + TCG's 8 KiB
    assert argv[argv.index("-accel") + 1] == "tcg" and "-kernel" in argv


def _bzimage(path: Path) -> Path:
    """Just enough of a bzImage for the spec to boot it (the setup header; no kernel)."""
    setup = bytearray(2 * 512)
    setup[0x1F1] = 1
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    struct.pack_into("<II", setup, 0x248, 0x40, 16)
    path.write_bytes(bytes(setup) + b"\x90" * 0x40 + b"\0" * 32)
    return path


def test_cmdline_of_a_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``pyqvm cmdline SPEC.toml``: shell words, the spec's values, an override on top."""
    kernel = _bzimage(tmp_path / "vmlinuz")
    toml = tmp_path / "vm.toml"
    toml.write_text(f'memory = "768M"\nsmp = 2\nmachine = "q35"\nkernel = "{kernel}"\n')
    assert main(["cmdline", str(toml), "--smp", "3", "--accel", "tcg"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[argv.index("-kernel") + 1] == str(kernel)
    assert argv[argv.index("-m") + 1] == "786440K" and argv[argv.index("-smp") + 1] == "3"
    assert argv[argv.index("-machine") + 1].startswith("q35")


def test_a_pyqvm_failure_exits_125(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cmdline", str(tmp_path / "missing.toml")]) == pyqvm.cli.EXIT_ERROR == 125
    assert "no such spec file" in capsys.readouterr().err
    # A value of the right form that the spec refuses is the spec's error, not a usage error.
    assert main(["cmdline", "--smp", "0"]) == 125
    assert "smp: 0" in capsys.readouterr().err
