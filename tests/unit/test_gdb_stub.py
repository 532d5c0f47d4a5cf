"""The gdbstub in the spec and argv, and the gdb command line (no QEMU here)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pyqvm.argv import LaunchContext, build_argv
from pyqvm.cli import build_parser, parse_args
from pyqvm.cli.specargs import spec_from_args
from pyqvm.errors import SpecError
from pyqvm.host.gdb import gdb_argv, vmlinux_for
from pyqvm.spec import KernelBoot, VMSpec
from pyqvm.spec.io import spec_from_dict


def _argv(tmp_path: Path, spec: VMSpec) -> list[str]:
    ctx = LaunchContext(
        qemu=Path("/usr/bin/qemu-system-x86_64"),
        accel="tcg",
        qmp_fd=5,
        console_log=tmp_path / "console.log",
        gdb_socket=tmp_path / "gdb.sock",
    )
    return build_argv(spec, ctx)


def _kernel(tmp_path: Path) -> KernelBoot:
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF")
    return KernelBoot(kernel=k, append="console=ttyS0")


def test_gdb_on_a_unix_socket_and_kaslr_off(tmp_path: Path) -> None:
    argv = _argv(tmp_path, VMSpec(kernel=_kernel(tmp_path), guest_agent=False, gdb=True))
    i = argv.index("-gdb")
    assert argv[i + 1] == "chardev:pq-gdb"
    assert argv[i - 1] == f"socket,id=pq-gdb,server=on,wait=off,path={tmp_path}/gdb.sock"
    assert argv[argv.index("-append") + 1] == "console=ttyS0 nokaslr"
    assert "tcp" not in " ".join(argv)


def test_gdb_off_by_default_and_a_kaslr_choice_is_kept(tmp_path: Path) -> None:
    k = _kernel(tmp_path)
    argv = _argv(tmp_path, VMSpec(kernel=k, guest_agent=False))
    assert "-gdb" not in argv and "nokaslr" not in argv[argv.index("-append") + 1]
    kaslr = KernelBoot(kernel=k.kernel, append="kaslr")
    argv = _argv(tmp_path, VMSpec(kernel=kaslr, guest_agent=False, gdb=True))
    assert argv[argv.index("-append") + 1] == "kaslr"


@pytest.mark.parametrize(
    ("value", "host", "port"), [("127.0.0.1:1234", "127.0.0.1", "1234"), ("[::1]:99", "::1", "99")]
)
def test_gdb_on_tcp_only_when_asked(tmp_path: Path, value: str, host: str, port: str) -> None:
    argv = _argv(tmp_path, VMSpec(kernel=_kernel(tmp_path), guest_agent=False, gdb=value))
    chardev = argv[argv.index("-gdb") - 1]
    assert chardev == f"socket,id=pq-gdb,server=on,wait=off,host={host},port={port}"


@pytest.mark.parametrize("bad", ["", "1234", "localhost:", "h:0", "h:70000", ":1234", 1234, None])
def test_bad_gdb_values_name_the_field(bad: object) -> None:
    with pytest.raises(SpecError) as e:
        VMSpec(gdb=bad)  # type: ignore[arg-type]
    assert e.value.field == "gdb" and "HOST:PORT" in e.value.message


def test_gdb_from_toml_data_and_the_cli() -> None:
    assert spec_from_dict({"gdb": True}).gdb is True
    assert spec_from_dict({"gdb": "127.0.0.1:1"}).gdb == "127.0.0.1:1"
    args = parse_args(["run", "--gdb", "--", "true"])
    assert spec_from_args(args).gdb is True
    args = parse_args(["run", "--", "true"])
    assert spec_from_args(args).gdb is False


def test_gdb_argv(tmp_path: Path) -> None:
    gdb = Path("/usr/bin/gdb")
    sock = str(tmp_path / "gdb.sock")
    assert gdb_argv(sock, gdb=gdb) == [
        "/usr/bin/gdb",
        "-q",
        "-ex",
        "set pagination off",
        "-ex",
        f"target remote {sock}",
    ]
    batch = gdb_argv("127.0.0.1:1", gdb=gdb, vmlinux=Path("/k"), commands=["bt"], batch=True)
    assert batch == [
        "/usr/bin/gdb",
        "-q",
        "-batch",
        "-nx",
        "/k",
        "-ex",
        "set pagination off",
        "-ex",
        "target remote 127.0.0.1:1",
        "-ex",
        "bt",
        "-ex",
        "detach",
    ]


def test_vmlinux_for_an_elf_kernel_is_the_kernel(tmp_path: Path) -> None:
    # A debug vmlinux of an uninstalled release is looked for, then the ELF itself is used.
    elf = Path("/bin/true").resolve()  # any ELF: inspect_kernel reads its header
    try:
        assert vmlinux_for(elf, tmp_path, release="0.0-not-installed") == elf
    except SpecError as e:  # /bin/true is no kernel; the ELF path is taken before that check
        pytest.fail(str(e))
    assert not list(tmp_path.iterdir())


def test_parser_has_the_gdb_verb() -> None:
    args = build_parser().parse_args(["gdb", "x", "-x", "bt", "--ex", "info registers"])
    assert isinstance(args, argparse.Namespace)
    assert args.ex == ["bt", "info registers"] and not args.batch
