"""A Debian archive client: the image builder's packages, on any host, with no apt or dpkg.

`Archive` fetches each suite's signed release file and checks its signature
(`release`), reads the Packages indices the release file vouches for
(`index`), resolves packages and their dependencies, downloads each ``.deb``
and checks its SHA-256 against the index (`fetch`), and unpacks it (`deb`).
Where the packages come from is `sources`. Nothing unsigned or unverified is
used, and there is no switch to use it.

Cache layout (under the cache dir, `pyqvm.image.guest.cache_dir`)::

    archive/releases/<mirror>/<suite>/InRelease   the last signed release file
    archive/sha256/<hex>                          decompressed indices, by hash
    downloads/sha256/<hex>                        .deb files, by hash

With every file cached, a build runs offline: an unreachable mirror falls back
to the cached release file, checked again (signature and ``Valid-Until``).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import lzma
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyqvm.errors import ArchiveError
from pyqvm.image.archive import release as _release
from pyqvm.image.archive.deb import unpack
from pyqvm.image.archive.fetch import HashStore, fetch_bytes
from pyqvm.image.archive.index import Package, PackageIndex
from pyqvm.image.archive.sources import COMPONENT, SUITE, ArchiveConfig, Source, load

log = logging.getLogger(__name__)

#: Called as a download goes: (package, its bytes so far, its size).
DownloadProgress = Callable[[Package, int], None]
_PARALLEL = 4  # downloads at once: a mirror's latency, not its bandwidth, is the limit


def _decompress(data: bytes, name: str) -> bytes:
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    return data


class Archive:
    """Debian's archive as the configuration names it, under ``cache``.

    Indices are read once per instance and architecture; instances are cheap.
    """

    def __init__(self, cache: Path, config: ArchiveConfig | None = None) -> None:
        self.cache = cache
        self.config = config or load()
        self._store = HashStore(cache / "archive")
        self._debs = HashStore(cache / "downloads")
        self._releases: dict[Source, _release.Release] = {}
        self._indices: dict[str, PackageIndex] = {}

    # -- release files and indices -------------------------------------------------

    def _release_of(self, source: Source) -> _release.Release:
        if (known := self._releases.get(source)) is not None:
            return known
        url = source.url(f"dists/{source.suite}/InRelease")
        mirror = re.sub(r"[^A-Za-z0-9.-]+", "_", source.uri)
        saved = self.cache / "archive" / "releases" / mirror / source.suite / "InRelease"
        certs = _release.trusted_certs(self.config.keyrings)
        try:
            data = fetch_bytes(url)
            fresh = True
        except ArchiveError as e:
            if not (e.unreachable and saved.is_file()):
                raise
            log.warning("%s; using the release file fetched before (%s)", e, saved)
            data, fresh = saved.read_bytes(), False
        signed = _release.verify(data, certs, url=url)
        parsed = _release.parse(signed, suite=source.suite, url=url)
        if fresh:
            saved.parent.mkdir(parents=True, exist_ok=True)
            tmp = saved.with_suffix(".new")
            tmp.write_bytes(data)
            tmp.replace(saved)
        self._releases[source] = parsed
        return parsed

    def _index_text(self, source: Source, arch: str) -> bytes:
        rel = self._release_of(source)
        listed = rel.packages_index(COMPONENT, arch)
        if listed is None:
            raise ArchiveError(
                f"{source.url(f'dists/{source.suite}/InRelease')} lists no {COMPONENT} "
                f"Packages index for {arch}: the mirror does not carry that architecture",
                url=source.url(f"dists/{source.suite}"),
            )
        plain = rel.files.get(f"{COMPONENT}/binary-{arch}/Packages")
        if plain is not None and (cached := self._store.path(plain.sha256)).is_file():
            return cached.read_bytes()
        directory = listed.path.rsplit("/", 1)[0]
        path = f"{directory}/by-hash/SHA256/{listed.sha256}" if rel.by_hash else listed.path
        url = source.url(f"dists/{source.suite}/{path}")
        log.info("fetching the %s index of %s (%d KiB)", arch, source.suite, listed.size >> 10)
        packed = self._store.get(url, listed.sha256, listed.size)
        text = _decompress(packed.read_bytes(), listed.path)
        if plain is not None and packed != self._store.path(plain.sha256):
            if hashlib.sha256(text).hexdigest() != plain.sha256:
                raise ArchiveError(f"{url}: its decompressed text is not the signed one", url=url)
            out = self._store.path(plain.sha256)
            tmp = out.with_name(f".new-{plain.sha256}")
            tmp.write_bytes(text)
            tmp.replace(out)
            packed.unlink()  # the decompressed copy is the one kept
        return text

    def index(self, arch: str) -> PackageIndex:
        """Every package of every configured suite for Debian architecture ``arch``."""
        if arch not in self._indices:
            index = PackageIndex(arch)
            for source in self.config.sources:
                index.add(self._index_text(source, arch), source.uri)
            self._indices[arch] = index
        return self._indices[arch]

    # -- packages ------------------------------------------------------------------

    def candidates(self, names: Iterable[str], arch: str) -> dict[str, Package]:
        """The candidate version of each of ``names``."""
        index = self.index(arch)
        return {name: index.candidate(name) for name in names}

    def closure(
        self,
        names: Iterable[str],
        arch: str,
        *,
        follow: Callable[[Package], bool] = lambda _p: True,
    ) -> list[Package]:
        """``names`` and what they depend on (`PackageIndex.closure`)."""
        return self.index(arch).closure(names, follow=follow)

    def download(
        self, packages: Iterable[Package], *, progress: DownloadProgress | None = None
    ) -> dict[Package, Path]:
        """Each package's verified ``.deb`` (cached by hash)."""
        wanted = list(dict.fromkeys(packages))

        def one(pkg: Package) -> Path:
            cached = self._debs.path(pkg.sha256).is_file()
            if not cached:
                log.debug("downloading %s %s (%d KiB)", pkg.name, pkg.version, pkg.size >> 10)
            report = (lambda done: progress(pkg, done)) if progress is not None else None
            path = self._debs.get(pkg.url, pkg.sha256, pkg.size, package=pkg.name,
                                  progress=report)  # fmt: skip
            if cached and progress is not None:
                progress(pkg, pkg.size)
            return path

        with ThreadPoolExecutor(_PARALLEL) as pool:
            paths = list(pool.map(one, wanted))
        return dict(zip(wanted, paths, strict=True))


__all__ = ["SUITE", "Archive", "ArchiveConfig", "DownloadProgress", "Package", "Source",
           "unpack"]  # fmt: skip
