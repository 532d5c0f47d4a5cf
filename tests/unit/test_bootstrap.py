"""The first stage of a distribution image (pyqvm.image.bootstrap) against a signed test
archive: the package set, the tree with a merged /usr, the packages set apart, the script
the second stage runs. The second stage itself runs in tests/e2e (test_distro.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.debarchive import FakePackage, MirrorServer, TestArchive

from pyqvm.image import bootstrap
from pyqvm.image.archive import Archive, ArchiveConfig, Source
from pyqvm.spec.arches import arch_info

PACKAGES = [
    FakePackage("base-files", "12", files={"etc/debian_version": b"12.8\n"}),
    FakePackage("libc6", "2.36", files={"lib/x86_64-linux-gnu/libc.so.6": b"libc"}),
    FakePackage("dash", "0.5", depends="libc6", files={"bin/sh": b"#!dash"}),
    FakePackage("apt", "2.6", depends="libc6, libapt", files={"usr/bin/apt": b"apt"}),
    FakePackage("libapt", "2.6", files={"usr/lib/libapt.so": b"a"}),
    FakePackage("openssh-server", "9.2", depends="libc6", files={"usr/sbin/sshd": b"sshd"}),
]
ESSENTIAL = ("base-files", "dash")


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    test = TestArchive(tmp_path / "mirror")
    test.write(PACKAGES, essential=ESSENTIAL)
    with MirrorServer(test.root) as server:
        config = ArchiveConfig((Source(server.url, "bookworm"),), (test.keyring,), "test")
        yield Archive(tmp_path / "cache", config)


def test_the_package_set_is_the_essential_set_apt_and_what_is_asked(archive: Archive) -> None:
    got = bootstrap.package_set(archive, arch_info("x86_64"), ["openssh-server"])
    assert sorted(p.name for p in got) == [
        "apt", "base-files", "dash", "libapt", "libc6", "openssh-server"
    ]  # fmt: skip


def test_the_first_stage_lays_out_a_tree_dpkg_can_run_in(archive: Archive, tmp_path: Path) -> None:
    tree, debs = tmp_path / "tree", tmp_path / "debs"
    made = bootstrap.first_stage(
        archive, arch_info("x86_64"), ["openssh-server"], tree, debs,
        customize=["passwd -d root"],
    )  # fmt: skip
    # a merged /usr, and the essential packages (with libc6, which dash needs) unpacked
    for link, target in {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib",
                         "lib64": "usr/lib64"}.items():  # fmt: skip
        assert (tree / link).is_symlink() and str((tree / link).readlink()) == target
    assert (tree / "usr/bin/sh").read_bytes() == b"#!dash"  # bin/sh, through the link
    assert (tree / "usr/lib/x86_64-linux-gnu/libc.so.6").is_file()
    assert (tree / "etc/debian_version").is_file()
    assert not (tree / "usr/sbin/sshd").exists()  # the rest is dpkg's to unpack
    assert {p.name for p in made.essential} == {"base-files", "dash", "libc6"}
    # dpkg's empty database, and every package set apart for the second stage
    assert (tree / "var/lib/dpkg/status").read_text() == ""
    assert (tree / "var/lib/dpkg/arch").read_text() == "amd64\n"
    assert sorted(p.name for p in debs.iterdir()) == sorted(p.deb_name for p in made.packages)
    script = (tree / bootstrap.SCRIPT).read_text()
    essential_line = next(line for line in script.splitlines() if "--install base-files_12" in line)
    assert "dash_0.5_amd64.deb" in essential_line and "openssh-server" not in essential_line
    assert "--unpack" in script and "openssh-server_9.2_amd64.deb" in script
    assert "passwd -d root" in script and "@" not in script.replace("$@", "")
