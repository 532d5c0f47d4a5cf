"""The initramfs cpio (newc) writer, read back by our reader and by GNU cpio."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pyqvm.image.cpio import CpioEntry, NewcWriter, read_newc


def archive(build: object) -> bytes:
    out = io.BytesIO()
    writer = NewcWriter(out)
    assert callable(build)
    build(writer)
    writer.close()
    return out.getvalue()


def test_entries_round_trip() -> None:
    def build(w: NewcWriter) -> None:
        w.add(CpioEntry("dev", stat.S_IFDIR | 0o755))
        w.add(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1))
        w.add(CpioEntry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"))
        w.add(CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"/bin/busybox"))
        w.add(CpioEntry("odd", stat.S_IFREG | 0o644, b"x" * 5))

    data = archive(build)
    assert len(data) % 4 == 0
    entries = {e.name: e for e in read_newc(data)}
    assert list(entries) == ["dev", "dev/console", "init", "bin/sh", "odd"]
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdev_major, console.rdev_minor) == (5, 1)
    assert entries["init"].data == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(entries["init"].mode) == 0o755
    assert entries["bin/sh"].data == b"/bin/busybox"
    assert entries["odd"].data == b"xxxxx"
    assert all(e.uid == 0 and e.gid == 0 for e in entries.values())


def test_duplicate_names_are_refused() -> None:
    w = NewcWriter(io.BytesIO())
    w.add(CpioEntry("/init", stat.S_IFREG | 0o755, b""))
    with pytest.raises(ValueError, match="duplicate"):
        w.add(CpioEntry("init", stat.S_IFREG | 0o755, b""))


def make_tree(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "bin/busybox").write_bytes(b"\x7fELF...")
    (root / "bin/busybox").chmod(0o755)
    (root / "bin/sh").symlink_to("/bin/busybox")
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "empty").mkdir()


def test_tree_parents_first_and_owned_by_root(tmp_path: Path) -> None:
    make_tree(tmp_path)
    if os.geteuid() == 0:
        os.lchown(tmp_path / "etc/passwd", 1000, 1000)  # a builder's uid must not leak
    entries = list(read_newc(archive(lambda w: w.add_tree(tmp_path))))
    names = [e.name for e in entries]
    assert set(names) == {"bin", "bin/busybox", "bin/sh", "etc", "etc/passwd", "empty"}
    for e in entries:
        parent = e.name.rpartition("/")[0]
        assert not parent or names.index(parent) < names.index(e.name)
    by_name = {e.name: e for e in entries}
    assert stat.S_ISLNK(by_name["bin/sh"].mode) and by_name["bin/sh"].data == b"/bin/busybox"
    assert stat.S_ISDIR(by_name["empty"].mode)
    assert stat.S_IMODE(by_name["bin/busybox"].mode) == 0o755
    assert all(e.uid == 0 and e.gid == 0 for e in entries)


def test_gnu_cpio_reads_it(tmp_path: Path) -> None:
    assert shutil.which("cpio"), "GNU cpio missing: apt-get install -y cpio"
    make_tree(tmp_path / "tree")

    def build(w: NewcWriter) -> None:
        w.add_tree(tmp_path / "tree")
        w.add(CpioEntry("dev", stat.S_IFDIR | 0o755))
        w.add(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1))

    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive(build), capture_output=True, check=True
    ).stdout.decode()
    assert "bin/sh -> /bin/busybox" in listing
    assert any(
        line.startswith("crw-------") and "dev/console" in line for line in listing.splitlines()
    )
    assert all(" root " in line for line in listing.splitlines())
