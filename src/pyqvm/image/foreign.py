"""Building a guest of another architecture than the host's: its packages and libraries.

apt is pointed at a configuration of pyqvm's own under the cache dir
(``apt/<debian arch>/``): the host's Debian sources, the guest's architecture,
package lists of its own. The host's package configuration is never touched
(no ``dpkg --add-architecture``), and no root is needed but for what apt needs
anyway.

A foreign executable cannot run on the host, so ``ldd`` cannot list its
libraries: `library_closure` reads their ``DT_NEEDED`` entries (pyelftools)
and finds each soname in the unpacked ``.deb`` files of the packages' library
dependencies (`library_packages`).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

from pyqvm.arches import ArchInfo
from pyqvm.errors import ImageError
from pyqvm.image import tools

log = logging.getLogger(__name__)

#: Package lists older than this are refreshed before a build resolves versions.
LISTS_MAX_AGE = 24 * 3600.0


def apt_env(arch: ArchInfo, cache: Path) -> dict[str, str]:
    """The environment that makes apt-get/apt-cache see ``arch``'s packages.

    Writes the configuration on first use and runs ``apt-get update`` for it
    when its lists are missing or older than `LISTS_MAX_AGE`.
    """
    root = cache / "apt" / arch.debian
    conf = root / "apt.conf"
    for d in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
        (root / d).mkdir(parents=True, exist_ok=True)
    _copy_host_sources(root / "sources.list.d")
    (root / "status").touch()
    settings = {
        "APT::Architecture": arch.debian,
        "Dir::State": root,
        "Dir::State::Lists": root / "lists",
        "Dir::State::status": root / "status",
        "Dir::Cache": root / "cache",
        "Dir::Etc::SourceList": root / "sources.list",
        "Dir::Etc::SourceParts": root / "sources.list.d",
        "Dir::Etc::Preferences": root / "preferences",
        "Dir::Etc::PreferencesParts": root / "preferences.d",
        "Acquire::Languages": "none",
    }
    text = "".join(f'{key} "{value}";\n' for key, value in settings.items())
    text += f'APT::Architectures {{ "{arch.debian}"; }};\n'
    if not conf.is_file() or conf.read_text() != text:
        conf.write_text(text)
    env = {"APT_CONFIG": str(conf)}
    stamp = root / "lists" / ".updated"
    if not stamp.is_file() or time.time() - stamp.stat().st_mtime > LISTS_MAX_AGE:
        log.info("apt-get update for %s packages (%s)", arch.debian, root)
        argv = ["apt-get", "update", "-q", *tools.sandbox_options()]
        tools.run(argv, what=f"apt-get update for {arch.debian}", env=env)
        stamp.touch()
    return env


def _copy_host_sources(dest: Path) -> None:
    """The host's apt sources (one-line and deb822), as they are: the same mirrors."""
    files = tools.host_apt_sources()
    for old in dest.iterdir():
        old.unlink()
    for i, src in enumerate(files):
        suffix = ".list" if src.name == "sources.list" else src.suffix
        shutil.copyfile(src, dest / f"{i:02d}-{src.stem}{suffix}")


def library_packages(names: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The library packages ``names`` depend on, recursively (``apt-cache depends``)."""
    out = tools.run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", "--no-pre-depends",
         *names],
        what=f"listing the dependencies of {', '.join(names)}",
        env=env,
    )  # fmt: skip
    found: list[str] = []
    for line in out.splitlines():
        m = re.fullmatch(r"\s*(?:\|?Depends: )?([a-z0-9][a-z0-9.+-]+)", line)
        name = m.group(1) if m else ""
        if (name.startswith("lib") or name == "zlib1g") and name not in (*found, *names):
            found.append(name)
    return found


def _needed(binary: Path) -> tuple[list[str], str | None]:
    """``binary``'s DT_NEEDED sonames and its program interpreter, if any."""
    try:
        with binary.open("rb") as f:
            elf = ELFFile(f)
            interp = None
            for seg in elf.iter_segments():
                if isinstance(seg, InterpSegment):
                    interp = str(seg.get_interp_name())
            needed: list[str] = []
            for sec in elf.iter_sections():
                if isinstance(sec, DynamicSection):
                    needed += [str(t.needed) for t in sec.iter_tags("DT_NEEDED")]  # type: ignore[attr-defined]
            return needed, interp
    except (OSError, ELFError) as e:
        raise ImageError(f"cannot read the ELF file {binary}: {e}") from None


def resolve_in(root: Path, path: str | Path) -> Path | None:
    """``path`` (absolute inside ``root``) with its symlinks followed inside ``root``."""
    current = root / str(path).lstrip("/")
    for _ in range(40):
        if not current.is_symlink():
            return current if current.exists() else None
        target = Path(current.readlink())
        absolute = target.is_absolute()
        current = root / str(target).lstrip("/") if absolute else current.parent / target
    return None


def library_closure(
    binaries: Iterable[Path], roots: Sequence[Path], arch: ArchInfo
) -> list[tuple[Path, str]]:
    """Every shared object ``binaries`` load: (the file in an unpacked root, its path
    in the guest), the program interpreter included; `ImageError` for one found nowhere."""
    dirs = [f"/lib/{arch.gnu_triplet}", f"/usr/lib/{arch.gnu_triplet}", "/lib", "/usr/lib"]
    todo = list(binaries)
    seen: set[str] = set()
    found: list[tuple[Path, str]] = []
    while todo:
        needed, interp = _needed(todo.pop())
        wanted = [(n, [f"{d}/{n}" for d in dirs]) for n in needed]
        if interp is not None:
            wanted.append((interp, [interp]))
        for name, candidates in wanted:
            if name in seen:
                continue
            seen.add(name)
            hit = next(
                (
                    (file, guest)
                    for guest in candidates
                    for root in roots
                    if (file := resolve_in(root, guest)) is not None
                ),
                None,
            )
            if hit is None:
                raise ImageError(
                    f"no {arch.debian} package among the unpacked dependencies has {name}"
                )
            found.append(hit)
            todo.append(hit[0])
    return found


__all__ = ["LISTS_MAX_AGE", "apt_env", "library_closure", "library_packages", "resolve_in"]
