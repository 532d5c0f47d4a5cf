"""The built-in images build and boot with no Debian tool and no root (issue 23): a non-root
user, in a mount namespace where apt-get, apt-cache, dpkg, dpkg-deb and mmdebstrap are
hidden (each covered by /dev/null, which no one may execute), builds the default, full and
aarch64 images into an empty cache with pyqvm's archive client and boots each."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e]

DEBIAN_TOOLS = ("apt-get", "apt-cache", "dpkg", "dpkg-deb", "mmdebstrap")
USER = "pyqvm-builder"
PATH = "/usr/local/bin:/usr/bin:/bin"
# Where pyqvm looks for a host tool besides PATH (pyqvm.image.tools): hidden there too.
SEARCHED = (*PATH.split(":"), "/usr/sbin", "/sbin")

# Every driver starts with the proof of the tools' absence, as the build's user sees it.
PROOF = textwrap.dedent("""
    import json, os, shutil, sys
    out = {"uid": os.getuid(), "path": os.environ["PATH"]}
    out["found"] = {t: shutil.which(t, path=sys.argv[2]) for t in sys.argv[1].split(",")}
""")

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


def _reachable_python(stage: Path) -> str:
    """Mounts that let another user run this interpreter when it lives under a directory
    only root may enter (pyenv under /root): that directory becomes, in the namespace only,
    a tmpfs holding just the interpreter's prefix."""
    prefix = Path(sys.base_prefix).resolve()
    blocked = next(
        (d for d in reversed(prefix.parents) if d != Path("/") and not d.stat().st_mode & 0o001),
        None,
    )
    if blocked is None:
        return ""
    stage.mkdir()
    return (
        f'mount --bind "{prefix}" "{stage}"; '
        f'mount -t tmpfs -o mode=0755 pyqvm-test "{blocked}"; mkdir -p "{prefix}"; '
        f'mount --bind "{stage}" "{prefix}"; '
    )


@pytest.fixture(scope="module")
def builder_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", USER], check=True)
        return pwd.getpwnam(USER)


@pytest.fixture
def home(builder_user: pwd.struct_passwd) -> Iterator[Path]:
    # Not under pytest's tmp_path: that is root's, mode 0700.
    d = Path(tempfile.mkdtemp(prefix="pyqvm-builder-"))
    os.chown(d, builder_user.pw_uid, builder_user.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def without_debian_tools(
    user: pwd.struct_passwd, home: Path, driver: str, *args: str, timeout: float
) -> dict[str, Any]:
    """Run ``driver`` (Python) as ``user`` in a mount namespace where the Debian tools are
    covered by /dev/null; returns the JSON it prints last, with the proof of their absence."""
    hidden = sorted(
        {str(Path(d, t).resolve()) for d in SEARCHED for t in DEBIAN_TOOLS if Path(d, t).exists()}
    )
    assert hidden, "this host has none of the Debian tools: nothing to hide"
    mounts = "".join(f'mount --bind /dev/null "{p}"; ' for p in hidden)
    mounts += _reachable_python(home / "prefix")
    env = {
        "HOME": str(home),
        "PATH": PATH,
        "PYQVM_CACHE_DIR": str(home / "cache"),
        "TMPDIR": "/tmp",
        **{k: v for k, v in os.environ.items() if k.startswith(("PQ_", "PYQVM_DEBIAN"))},
    }
    setpriv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
               "--clear-groups", "env", "-i", *(f"{k}={v}" for k, v in env.items())]  # fmt: skip
    proof = PROOF + driver
    argv = [sys.executable, "-c", proof, ",".join(DEBIAN_TOOLS), ":".join(SEARCHED), *args]
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", f'set -e; {mounts}exec "$@"', "sh", *setpriv, *argv],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["uid"] == user.pw_uid != 0
    assert out["path"] == PATH
    # The proof: none of the tools can be found, in PATH or where pyqvm also looks.
    assert out["found"] == dict.fromkeys(DEBIAN_TOOLS), out["found"]
    return out


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


DEBIAN_DRIVER = textwrap.dedent("""
    from pyqvm import VM, VMSpec, imagebuild

    img = imagebuild.build("debian", arch=sys.argv[3])
    with VM(VMSpec(image="debian", arch=sys.argv[3], ready_timeout=600)) as vm:
        state = vm.run(["systemctl", "is-system-running", "--wait"], timeout=600)
        failed = vm.run(["systemctl", "--failed", "--no-legend", "--plain"])
        init = vm.run(["cat", "/proc/1/comm"], check=True).stdout_text
        owner = vm.run(["stat", "-c", "%U:%G %a", "/usr/bin/passwd", "/etc/shadow"], check=True)
    out.update(dir=str(img.directory), state=state.stdout_text.strip(), init=init,
               failed=failed.stdout_text, owners=owner.stdout_text.split("\\n"))
    print(json.dumps(out))
""")


@pytest.mark.distro
def test_the_debian_flavour_builds_and_runs_without_debian_tools_or_root(
    builder_user: pwd.struct_passwd, home: Path
) -> None:
    """The debian flavour bootstrapped in two stages by a non-root user with no apt, dpkg or
    mmdebstrap: its files still belong to the users dpkg gives them, and systemd runs."""
    out = without_debian_tools(builder_user, home, DEBIAN_DRIVER, "x86_64", timeout=3600)
    assert out["dir"].startswith(str(home / "cache" / "images" / "debian-"))
    assert out["init"] == "systemd\n"
    assert out["state"] in ("running", "degraded"), out["failed"]
    # setuid root, and shadow's group: ownership and modes are dpkg's, not the builder's
    assert out["owners"][:2] == ["root:root 4755", "root:shadow 640"], out["owners"]
