"""Host tools the image builder runs (apt, dpkg-deb, depmod, mkfs.ext4, qemu-img, ldd)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyqvm.errors import HostError, ImageError

log = logging.getLogger(__name__)

# Debian package that ships each tool, for the "install it with" hint.
TOOL_PACKAGES = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "depmod": "kmod",
    "mkfs.ext4": "e2fsprogs",
    "qemu-img": "qemu-utils",
    "ldd": "libc-bin",
    "lz4": "lz4",
    "zstd": "zstd",
    "mmdebstrap": "mmdebstrap",
    "mkfs.vfat": "dosfstools",
    "mmd": "mtools",
    "mcopy": "mtools",
    "sfdisk": "fdisk",
}

# Non-root shells often lack the sbin directories, where depmod and mkfs live.
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


def tool(name: str, *, package: str | None = None) -> str:
    """Absolute path of a host tool, or HostError naming the Debian package(s) with it."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH])
    found = shutil.which(name, path=search)
    if found is None:
        package = package or TOOL_PACKAGES.get(name, name)
        raise HostError(
            f"`{name}` is needed to build the guest image but is not installed; "
            f"install it with: apt-get install -y {package}"
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


@dataclass(frozen=True, slots=True)
class Package:
    """A Debian package as apt's candidate: enough to name its .deb file."""

    name: str
    version: str
    arch: str
    depends: str = ""

    @property
    def deb_name(self) -> str:
        # apt-get download's file name: the epoch colon is URL-quoted.
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def compile_static(compiler: str, source: Path, exe: Path) -> Path:
    """Compile the guest helper ``source`` into a static, stripped ``exe`` with ``compiler``
    (the host's gcc, or the guest arch's cross compiler: `pyqvm.arches.cross_compiler`)."""
    run(
        [compiler, "-O2", "-Wall", "-Wextra", "-Werror", "-static", "-s", "-o", str(exe),
         str(source)],
        what=f"compiling {source.name} (its headers and static libc come with libc6-dev)",
    )  # fmt: skip
    return exe


def _apt_hint(names: Sequence[str], stderr: str) -> ImageError:
    return ImageError(
        f"apt does not know {', '.join(names)} ({stderr.strip() or 'no candidate'}); "
        "run apt-get update (as root), and check that Debian's main archive is in the apt sources"
    )


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


def sandbox_options() -> list[str]:
    """apt drops to the ``_apt`` user, who cannot write into our cache dir: not as root."""
    return ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []


def apt_show(names: Sequence[str], *, env: Mapping[str, str] | None = None) -> dict[str, Package]:
    """Candidate versions of ``names`` from `apt-cache show` (``env``: `foreign.apt_env`)."""
    proc = subprocess.run(
        [tool("apt-cache"), "show", "--no-all-versions", *names],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env} if env else None,
    )
    found: dict[str, Package] = {}
    for para in proc.stdout.split("\n\n"):
        fields = dict(re.findall(r"^([\w-]+):[ \t]*(.*)$", para, re.MULTILINE))
        if "Package" in fields and "Version" in fields and fields["Package"] not in found:
            found[fields["Package"]] = Package(
                fields["Package"],
                fields["Version"],
                fields.get("Architecture", "amd64"),
                fields.get("Depends", ""),
            )
    lacking = [n for n in names if n not in found]
    if lacking:
        raise _apt_hint(lacking, proc.stderr)
    return found


def apt_download(pkg: Package, downloads: Path, *, env: Mapping[str, str] | None = None) -> Path:
    """Fetch ``pkg``'s .deb into ``downloads`` unless it is already there."""
    dest = downloads / pkg.deb_name
    if dest.is_file():
        return dest
    log.info("downloading %s %s", pkg.name, pkg.version)
    downloads.mkdir(parents=True, exist_ok=True)
    partial = downloads / f".partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    argv = [tool("apt-get"), "download", "-q", *sandbox_options(), f"{pkg.name}={pkg.version}"]
    try:
        proc = subprocess.run(
            argv,
            cwd=partial,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **env} if env else None,
        )
        if proc.returncode != 0:
            if "Unable to locate" in proc.stderr or "Can't find a source" in proc.stderr:
                raise _apt_hint([pkg.name], proc.stderr)
            tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
            raise ImageError(f"downloading {pkg.name} {pkg.version} failed:\n{tail}")
        debs = list(partial.glob("*.deb"))
        if len(debs) != 1:
            raise ImageError(f"apt-get download of {pkg.name} produced {len(debs)} files")
        debs[0].replace(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest


def unpack(deb: Path, root: Path) -> None:
    """`dpkg-deb -x`: the package's files under ``root``, nothing installed."""
    log.info("unpacking %s", deb.name)
    root.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(deb), str(root)], what=f"unpacking {deb.name}")


def shared_libraries(
    binary: Path, *, library_dirs: Sequence[Path] = (), package: str = "qemu-guest-agent"
) -> list[Path]:
    """Every shared object ``binary`` loads (the dynamic loader included), per host ldd.

    ``library_dirs`` are searched before the host's own (unpacked .debs of libraries a
    stock host lacks); ``package`` is named in the hint when a library is found nowhere.
    """
    env = {"LD_LIBRARY_PATH": os.pathsep.join(map(str, library_dirs))} if library_dirs else None
    out = run(["ldd", str(binary)], what=f"listing the libraries of {binary.name}", env=env)
    libs: list[Path] = []
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            raise HostError(
                f"{binary.name} needs {line.split()[0]}, which this host lacks; "
                f"install it with: apt-get install -y {package}"
            )
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    return libs
