"""A built image as one file: what a CI cache or another machine carries.

An export is a zstd-compressed tar. Its first member, ``pyqvm-image.json``, is the
index: the format, the image's flavour, arch and cache key, the packages and
versions inside (from its manifest), and every file's size and SHA-256; the
image's files follow, flat. The SHA-256 of the index is the export's *digest*:
it names every byte of the image, so ``import_image(..., digest=...)`` accepts
exactly the export that `export_image` reported and nothing else (a file edited
together with its index included).

Import streams the file once: each member is written into a temporary directory
beside the cache's images while it is hashed, and the directory is renamed into
place only when every listed file is there with its size and hash, and no other
member is. A truncated, corrupt or edited file, or a full disk, leaves nothing
behind.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

from pyqvm.errors import ImageError
from pyqvm.files import built_aside
from pyqvm.image.guest import MANIFEST, GuestImage, cache_dir, load_image

log = logging.getLogger(__name__)

INDEX = "pyqvm-image.json"
FORMAT = 1
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Exported:
    """What `export_image` wrote: the file, its digest (``sha256:<hex>``), its image."""

    path: Path
    digest: str
    image: GuestImage


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def export_image(image: GuestImage, dest: Path, *, level: int = 3) -> Exported:
    """Write ``image`` as one file at ``dest`` (replaced only once complete).

    Raises:
        ImageError: the image directory holds something else than flat files, or the
            file cannot be written (the message says why; nothing is left at ``dest``).
    """
    files = sorted(p for p in image.directory.iterdir())
    if any(not p.is_file() or p.is_symlink() for p in files):
        raise ImageError(f"{image.directory} holds more than plain files: not a built image")
    manifest = json.loads((image.directory / MANIFEST).read_text())
    index = {
        "format": FORMAT,
        "flavour": image.flavour,
        "arch": image.arch,
        "name": image.directory.name,
        "kernel_version": image.kernel_version,
        "packages": manifest.get("packages", {}),
        "kernel_package": manifest.get("kernel_package", ""),
        "files": {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    blob = json.dumps(index, indent=1, sort_keys=True).encode() + b"\n"
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        with (
            tmp.open("wb") as raw,
            zstandard.ZstdCompressor(level=level).stream_writer(raw) as packed,
            tarfile.open(fileobj=packed, mode="w|") as tar,
        ):
            info = tarfile.TarInfo(INDEX)
            info.size, info.mode = len(blob), 0o644
            tar.addfile(info, io.BytesIO(blob))
            for p in files:
                info = tarfile.TarInfo(p.name)
                info.size, info.mode = p.stat().st_size, 0o644
                with p.open("rb") as f:
                    tar.addfile(info, f)
        tmp.replace(dest)
    except OSError as e:
        raise ImageError(f"cannot write the export {dest}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    log.info("exported %s (%s) to %s, digest %s", image.flavour, image.arch, dest, digest)
    return Exported(dest, digest, image)


def _refused(source: Path, why: str) -> ImageError:
    return ImageError(f"{source} is not an intact pyqvm image export: {why}; nothing was imported")


@contextmanager
def _members(source: Path) -> Iterator[Iterator[tuple[tarfile.TarInfo, IO[bytes]]]]:
    with (
        source.open("rb") as raw,
        zstandard.ZstdDecompressor().stream_reader(raw) as stream,
        tarfile.open(fileobj=stream, mode="r|") as tar,
    ):

        def members() -> Iterator[tuple[tarfile.TarInfo, IO[bytes]]]:
            for member in tar:
                f = tar.extractfile(member) if member.isfile() else None
                if f is None:
                    raise _refused(source, f"member {member.name!r} is not a plain file")
                yield member, f

        yield members()


def _read_index(source: Path, member: tarfile.TarInfo, f: IO[bytes]) -> tuple[dict[str, Any], str]:
    if member.name != INDEX or member.size > 1 << 20:
        raise _refused(source, f"its first member is {member.name!r}, not {INDEX}")
    blob = f.read()
    try:
        index = json.loads(blob)
        files = index["files"]
        ok = index.get("format") == FORMAT and isinstance(files, dict) and files
        ok = ok and all(
            isinstance(n, str) and "/" not in n and n not in ("", ".", "..") for n in files
        )
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise _refused(source, f"its {INDEX} is not an index of format {FORMAT}")
    return index, "sha256:" + hashlib.sha256(blob).hexdigest()


def import_image(
    source: Path, *, cache: Path | None = None, digest: str | None = None
) -> GuestImage:
    """Check ``source`` (an `export_image` file) and install its image into the cache.

    ``digest`` (``sha256:<hex>``, as the export reported it) pins the exact export.
    An image already in the cache under the same name is kept as it is.

    Raises:
        ImageError: the file is truncated, corrupt, edited (a file's size or hash is not
            its index's, a member is missing or extra), not the export ``digest`` names,
            or the disk is full; nothing is left in the cache.
    """
    images = (cache or cache_dir()) / "images"
    images.mkdir(parents=True, exist_ok=True)
    try:
        with built_aside(images, f"import-{source.name}") as aside:
            name = _unpack(source, aside.path, digest)
            if load_image(aside.path) is None:
                raise _refused(source, "its files do not make a complete image")
            target = images / name
            if (existing := load_image(target)) is not None:
                log.info("%s is in the cache already: %s", name, target)
                return existing
            aside.place(target)  # an incomplete one there is replaced
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ImageError(
                f"no space left on the device of {images} while importing {source}; free "
                "some space (or set PYQVM_CACHE_DIR) and import again; nothing was imported"
            ) from None
        raise ImageError(f"importing {source} failed: {e}; nothing was imported") from None
    imported = load_image(target)
    assert imported is not None
    log.info("imported %s (%s) into %s", imported.flavour, imported.arch, target)
    return imported


def _unpack(source: Path, tmp: Path, digest: str | None) -> str:
    """Write ``source``'s files into ``tmp``, checking each; returns the image's name."""
    try:
        with _members(source) as members:
            first = next(members, None)
            if first is None:
                raise _refused(source, "it is empty")
            index, got = _read_index(source, *first)
            if digest is not None and got != digest:
                raise _refused(source, f"its digest is {got}, not the {digest} asked for")
            expected: dict[str, dict[str, Any]] = index["files"]
            seen: set[str] = set()
            for member, f in members:
                want = expected.get(member.name)
                if want is None or member.name in seen:
                    raise _refused(source, f"{member.name!r} is not in its index")
                seen.add(member.name)
                h = hashlib.sha256()
                with (tmp / member.name).open("wb") as out:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                if member.size != want["size"] or h.hexdigest() != want["sha256"]:
                    raise _refused(source, f"{member.name} is not the file its index names")
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as e:
        raise _refused(source, f"it is truncated or corrupt ({e})") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise _refused(source, f"it lacks {', '.join(missing)}")
    name = str(index.get("name", ""))
    if "/" in name or not name.startswith(f"{index.get('flavour')}-"):
        raise _refused(source, f"its image name {name!r} is not a cache entry's")
    return name


__all__ = ["FORMAT", "INDEX", "Exported", "export_image", "import_image"]
