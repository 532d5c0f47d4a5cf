"""Host tools the image builder runs (depmod, mkfs.ext4, qemu-img, lz4, a C compiler)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from pyqvm.errors import HostError, ImageError
from pyqvm.host.packages import TOOL_PACKAGES, install_hint

log = logging.getLogger(__name__)

# Non-root shells often lack the sbin directories, where depmod and mkfs live.
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


def tool(name: str, *, package: str | None = None) -> str:
    """Absolute path of a host tool, or HostError with this host's command to install it
    (``package``: Debian's name(s), space-separated)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH])
    found = shutil.which(name, path=search)
    if found is None:
        package = package or TOOL_PACKAGES.get(name, name)
        raise HostError(
            f"`{name}` is needed to build the guest image but is not installed; "
            f"install it with: {install_hint(package.split())}"
        )
    return found


def run(
    argv: Sequence[str],
    *,
    what: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> str:
    """Run a tool (no shell) and return its stdout; ImageError with stderr on failure.

    ``env`` is added to this process's environment; ``input`` goes to its stdin.
    """
    exe = tool(argv[0])
    log.debug("running %s", " ".join(argv))
    full = {**os.environ, **env} if env else None
    proc = subprocess.run(
        [exe, *argv[1:]],
        cwd=cwd,
        env=full,
        input=input,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        raise ImageError(f"{what} failed: `{' '.join(argv)}` exited {proc.returncode}\n{tail}")
    return proc.stdout


def compile_static(compiler: str, source: Path, exe: Path) -> Path:
    """Compile the guest helper ``source`` into a static, stripped ``exe`` with ``compiler``
    (the host's gcc, or the guest arch's cross compiler: `pyqvm.spec.arches.cross_compiler`)."""
    run(
        [compiler, "-O2", "-Wall", "-Wextra", "-Werror", "-static", "-s", "-o", str(exe),
         str(source)],
        what=f"compiling {source.name} (its headers and static libc come with libc6-dev)",
    )  # fmt: skip
    return exe


_HOST_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def host_apt_sources() -> list[Path]:
    """The host's apt source files (one-line and deb822, empty ones skipped): the mirrors
    a foreign-arch apt configuration and mmdebstrap use, so they match the host's."""
    files: list[Path] = []
    for src in _HOST_SOURCES:
        if src.is_file() and src.stat().st_size:
            files.append(src)
        elif src.is_dir():
            files += sorted(p for p in src.iterdir() if p.suffix in (".list", ".sources"))
    if not files:
        raise ImageError("the host has no apt sources (/etc/apt/sources.list[.d]) to build from")
    return files
