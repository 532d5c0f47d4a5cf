"""The shared libraries of a guest's programs, read from their ELF headers.

The programs of a guest image are the guest's (another arch's, or the same
arch's from Debian 12 on a host that runs something else), so the host's
``ldd`` cannot say what they load: `library_closure` reads their ``DT_NEEDED``
entries and program interpreter (pyelftools) and finds each soname in the
unpacked ``.deb`` files of the packages' library dependencies.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

from pyqvm.errors import ImageError
from pyqvm.spec.arches import ArchInfo

log = logging.getLogger(__name__)


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


__all__ = ["library_closure", "resolve_in"]
