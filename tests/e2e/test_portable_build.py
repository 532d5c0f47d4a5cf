"""The built-in images build and boot with no Debian tool and no root (issue 23): a non-root
user, in a mount namespace where apt-get, apt-cache, dpkg, dpkg-deb and mmdebstrap are
hidden (each covered by /dev/null, which no one may execute), builds the default, full and
aarch64 images into an empty cache with pyqvm's archive client and boots each; the debian
flavour too (in `fixtures.nonroot`, whose build the other debian tests boot)."""

from __future__ import annotations

import pwd
import textwrap
from pathlib import Path

import pytest
from fixtures.nonroot import NonrootBuild, without_debian_tools

pytestmark = [pytest.mark.e2e]

DRIVER = textwrap.dedent("""
    from pyqvm import VM, VMSpec, image

    out["images"] = {}
    for flavour, arch in (("default", "x86_64"), ("full", "x86_64"), ("default", "aarch64")):
        img = image.build(flavour, arch=arch)
        with VM(VMSpec(image=flavour, arch=arch)) as vm:
            seen = vm.run(["sh", "-c", "uname -m; uname -r"], check=True).stdout_text.split()
        out["images"][f"{flavour}-{arch}"] = {
            "dir": str(img.directory), "uname": seen, "kernel": img.kernel_version,
            "packages": sorted(json.load(open(img.directory / "manifest.json"))["packages"]),
        }
    print(json.dumps(out))
""")


def test_images_build_and_boot_without_debian_tools_or_root(
    builder_user: pwd.struct_passwd, home: Path
) -> None:
    out = without_debian_tools(builder_user, home, DRIVER, timeout=900)
    images = out["images"]
    assert set(images) == {"default-x86_64", "full-x86_64", "default-aarch64"}
    for name, seen in images.items():
        assert seen["dir"].startswith(str(home / "cache" / "images")), name
        machine, release = seen["uname"]
        assert machine == name.split("-")[1], name
        assert release == seen["kernel"], name
        assert {"busybox-static", "qemu-guest-agent", "dropbear-bin"} <= set(seen["packages"])
    assert images["default-x86_64"]["kernel"].endswith("-cloud-amd64")
    assert images["full-x86_64"]["kernel"].endswith("-amd64")
    assert not images["full-x86_64"]["kernel"].endswith("-cloud-amd64")
    assert images["default-aarch64"]["kernel"].endswith("-arm64")


@pytest.mark.distro
def test_the_debian_flavour_builds_and_runs_without_debian_tools_or_root(
    nonroot_debian: NonrootBuild,
) -> None:
    """The debian flavour bootstrapped in two stages by a non-root user with no apt, dpkg or
    mmdebstrap: its files still belong to the users dpkg gives them, and systemd runs."""
    out = nonroot_debian.out  # checked the proof of the tools' absence already
    assert out["dir"].startswith(str(nonroot_debian.home / "cache" / "images" / "debian-"))
    assert out["init"] == "systemd\n"
    assert out["state"] in ("running", "degraded"), out["failed"]
    # setuid root, and shadow's group: ownership and modes are dpkg's, not the builder's
    assert out["owners"][:2] == ["root:root 4755", "root:shadow 640"], out["owners"]
