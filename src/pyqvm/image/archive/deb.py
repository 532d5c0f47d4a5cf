"""Unpacking a ``.deb`` in Python: what ``dpkg-deb -x`` does, with no Debian tool.

A ``.deb`` is an ar archive (read with python-debian's `arfile`) whose
``data.tar`` member is compressed with xz, gzip, bzip2 or zstd (``zstandard``:
the standard library has no zstd codec, and python-debian would run the host's
``unzstd`` for it). Members are written through tarfile's ``tar`` filter, so
none lands outside the target, whatever its path or the links before it; the
modes are kept as the package has them (setuid included), and ownership as
far as this user may set it: a non-root build leaves files owned by itself,
which is what the busybox images need (their cpio writer records root).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import logging
import lzma
import tarfile
from pathlib import Path
from typing import IO, cast

import zstandard
from debian import arfile
from debian.arfile import ArError

from pyqvm.errors import ArchiveError

log = logging.getLogger(__name__)


def _decompressed(member: IO[bytes], name: str) -> IO[bytes]:
    if name.endswith(".xz"):
        return lzma.open(member)
    if name.endswith(".gz"):
        return cast(IO[bytes], gzip.open(member))
    if name.endswith(".bz2"):
        return bz2.open(member)
    if name.endswith(".zst"):
        return cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(member))
    if name.endswith(".tar"):
        return member
    raise ArchiveError(f"unknown compression of {name}")


def _keep_mode(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    safe = tarfile.tar_filter(member, dest)
    return safe.replace(mode=member.mode, deep=False)


def unpack(deb: Path, root: Path) -> None:
    """The files of ``deb`` under ``root`` (nothing is installed or configured).

    Raises:
        ArchiveError: ``deb`` is not a well-formed package (the message names it).
    """
    log.debug("unpacking %s", deb.name)
    root.mkdir(parents=True, exist_ok=True)
    try:
        ar = arfile.ArFile(str(deb))
        name = next((n for n in ar.getnames() if n.startswith("data.tar")), None)
        if name is None:
            raise ArchiveError(f"{deb} has no data.tar member: not a Debian package")
        with (
            contextlib.closing(ar.getmember(name)) as member,
            _decompressed(member, name) as stream,  # type: ignore[arg-type]
            tarfile.open(fileobj=stream, mode="r|") as tar,
        ):
            tar.extractall(root, filter=_keep_mode)
    except ArchiveError:
        raise
    except ArError as e:
        raise ArchiveError(f"{deb} is not an ar archive: {e}", url=str(deb)) from None
    except (OSError, EOFError, tarfile.TarError, lzma.LZMAError, zstandard.ZstdError) as e:
        raise ArchiveError(f"cannot unpack {deb}: {e}", url=str(deb)) from None


__all__ = ["unpack"]
