"""A writer (and, for tests, a reader) for the cpio "newc" format of initramfs.

Written by hand so every entry is owned by root and device nodes such as
/dev/console can be added without being root (no fakeroot, no cpio binary).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"
_HEADER_LEN = 110


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One archive member; ``data`` is the file content or the symlink target."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


def _pad(n: int) -> bytes:
    return b"\x00" * (-n % 4)


class NewcWriter:
    """Streams entries to ``out``; call `close` to write the trailer."""

    def __init__(self, out: _Sink) -> None:
        self._out = out
        self._ino = 0
        self._names: set[str] = set()

    def add(self, entry: CpioEntry) -> None:
        name = entry.name.strip("/")
        if not name or name in self._names:
            raise ValueError(f"cpio: bad or duplicate name {entry.name!r}")
        self._names.add(name)
        self._write(name, entry)

    def _write(self, name: str, entry: CpioEntry) -> None:
        self._ino += 1
        encoded = name.encode() + b"\x00"
        fields = (
            self._ino,
            entry.mode,
            entry.uid,
            entry.gid,
            2 if stat.S_ISDIR(entry.mode) else 1,
            0,  # mtime: fixed, so equal inputs give an equal archive
            len(entry.data),
            0,
            0,
            entry.rdev_major,
            entry.rdev_minor,
            len(encoded),
            0,
        )
        header = _MAGIC + b"".join(b"%08x" % v for v in fields)
        self._out.write(header + encoded + _pad(_HEADER_LEN + len(encoded)))
        self._out.write(entry.data + _pad(len(entry.data)))

    def add_tree(self, root: Path) -> None:
        """Add everything under ``root`` (not root itself), parents first, as root:root."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath)
            for name in [*dirnames, *sorted(filenames)]:
                path = base / name
                rel = path.relative_to(root).as_posix()
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    entry = CpioEntry(rel, stat.S_IFLNK | 0o777, os.readlink(path).encode())
                elif stat.S_ISDIR(st.st_mode):
                    entry = CpioEntry(rel, stat.S_IFDIR | stat.S_IMODE(st.st_mode))
                elif stat.S_ISREG(st.st_mode):
                    entry = CpioEntry(rel, st.st_mode, path.read_bytes())
                else:
                    raise ValueError(f"cpio: unsupported file type at {path}")
                self.add(entry)

    def close(self) -> None:
        self._write(_TRAILER, CpioEntry(_TRAILER, 0))


def read_newc(data: bytes) -> Iterator[CpioEntry]:
    """Parse a newc archive up to its trailer."""
    pos = 0
    while True:
        if data[pos : pos + 6] != _MAGIC:
            raise ValueError(f"cpio: bad magic at offset {pos}")
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, uid, gid, size, rmaj, rmin, namesize = f[1], f[2], f[3], f[6], f[9], f[10], f[11]
        pos += _HEADER_LEN
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize + len(_pad(_HEADER_LEN + namesize))
        body = data[pos : pos + size]
        pos += size + len(_pad(size))
        if name == _TRAILER:
            return
        yield CpioEntry(name, mode, body, uid, gid, rmaj, rmin)
