"""This host's package manager and package names, for every "install it with" message."""

from __future__ import annotations

import platform
from pathlib import Path

from pyqvm.host.facts import find_qemu_binaries
from pyqvm.host.packages import HostDistro, install_hint, read_os_release

FEDORA = HostDistro("fedora", (), "Fedora Linux 41", "dnf")
SUSE = HostDistro("opensuse-leap", ("suse", "opensuse"), "openSUSE Leap 15.6", "zypper")
ARCH = HostDistro("arch", (), "Arch Linux", "pacman")
DEBIAN = HostDistro("debian", (), "Debian GNU/Linux 12 (bookworm)", "apt")


def test_os_release_is_read_with_its_quoting_and_falls_back_to_usr_lib(tmp_path: Path) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/os-release").write_text(
        '# comment\nNAME="openSUSE Leap"\nID="opensuse-leap"\nID_LIKE="suse opensuse"\n'
        "PRETTY_NAME='openSUSE Leap 15.6'\n"
    )
    assert read_os_release(tmp_path) == SUSE
    assert read_os_release(tmp_path / "nowhere").manager is None


def test_the_image_builders_tools_by_each_manager() -> None:
    builder_tools = ["qemu-utils", "kmod", "e2fsprogs", "lz4", "fdisk", "gcc", "libc6-dev"]
    assert install_hint(builder_tools, DEBIAN) == f"apt-get install -y {' '.join(builder_tools)}"
    assert install_hint(builder_tools, FEDORA) == (
        "dnf install -y qemu-img kmod e2fsprogs lz4 util-linux gcc glibc-static"
    )
    assert install_hint(builder_tools, SUSE) == (
        "zypper install -y qemu-tools kmod e2fsprogs lz4 util-linux gcc glibc-devel-static"
    )
    assert install_hint(builder_tools, ARCH) == (
        "pacman -S --needed qemu-img kmod e2fsprogs lz4 util-linux gcc glibc"
    )


def test_what_a_distribution_does_not_package_is_said() -> None:
    cross = ["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"]
    assert install_hint(cross, FEDORA) == (
        "dnf install -y gcc-aarch64-linux-gnu (Fedora Linux 41 does not package what "
        "Debian's libc6-dev-arm64-cross holds)"
    )
    assert install_hint("qemu-system-xen", ARCH) == (
        "Arch Linux does not package what Debian's qemu-system-xen holds"
    )


def test_rhel_qemu_kvm_serves_the_host_arch(tmp_path: Path) -> None:
    kvm = tmp_path / "usr/libexec/qemu-kvm"
    kvm.parent.mkdir(parents=True)
    kvm.write_text("#!/bin/sh\n")
    kvm.chmod(0o755)
    (tmp_path / "usr/bin").mkdir()
    assert dict(find_qemu_binaries(tmp_path)) == {platform.machine(): kvm}
