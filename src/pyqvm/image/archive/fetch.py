"""Fetching archive files (http, https, file) into a cache that holds only verified files.

A file whose SHA-256 is known before it is fetched (an index listed in a signed
release file, a ``.deb`` listed in a verified index) is stored under its hash,
``sha256/<hex>``: written to a temporary name beside it, checked for size and
hash while it streams, and renamed into place only when both match. A cached
file is reused without the network, so a build whose files are all cached runs
offline. Anything that goes wrong is an `ArchiveError` naming the URL; nothing
partial is ever left under a hash name.

Every file is a connection of its own, but a host's name is looked up once (`_connect`):
a distribution's ~200 packages would otherwise be ~400 DNS queries, and a resolver that
drops one in fifteen (glibc then waits 5 s before asking again) added ~35 s to a build.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pyqvm.errors import ArchiveError

log = logging.getLogger(__name__)

TIMEOUT = 30.0  # seconds without a byte before a fetch fails
_CHUNK = 1 << 16

#: Called with the bytes fetched so far of one file (progress display).
Progress = Callable[[int], None]


def _describe(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"the mirror answered {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"the mirror is unreachable ({e.reason})"
    if isinstance(e, http.client.IncompleteRead):
        return f"the connection closed after {len(e.partial)} bytes"
    return str(e) or type(e).__name__


#: Waits before each retry of a request that failed for a passing reason.
RETRY_WAITS = (0.5, 1.0, 2.0, 4.0)


def _passing(e: BaseException) -> bool:
    """Whether ``e`` is a failure that a moment later may not be there: the resolver's
    "try again" (EAI_AGAIN), a connection reset, a connect timing out. A refused
    connection, a missing host or an HTTP error is an answer, and is not retried."""
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, socket.gaierror):
        return reason.errno == socket.EAI_AGAIN
    return isinstance(reason, ConnectionResetError | TimeoutError)


def _open(url: str) -> IO[bytes]:
    """``url``'s response; a passing failure is retried (as apt's Acquire::Retries does)."""
    for wait in (*RETRY_WAITS, None):
        try:
            return _open_once(url)
        except ArchiveError as e:
            cause = e.__context__
            if wait is None or cause is None or not _passing(cause):
                raise
            log.info("fetching %s: %s; trying again in %g s", url, _describe(cause), wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


#: How long a host's looked-up addresses are reused (a failed connect forgets them at once).
DNS_TTL = 300.0
_addresses: dict[tuple[str, int], tuple[float, list[Any]]] = {}
_addresses_lock = threading.Lock()


def _connect(
    address: tuple[str, int], timeout: float | None = None, source_address: Any = None
) -> socket.socket:
    """`socket.create_connection`, with the host's addresses looked up once per `DNS_TTL`."""
    key = (address[0], int(address[1]))
    now = time.monotonic()
    with _addresses_lock:
        known = _addresses.get(key)
    if known is None or now - known[0] > DNS_TTL:
        known = (now, socket.getaddrinfo(*key, 0, socket.SOCK_STREAM))
        with _addresses_lock:
            _addresses[key] = known
    error: OSError = OSError(f"no address for {key[0]}")
    for family, kind, proto, _name, sockaddr in known[1]:
        sock = socket.socket(family, kind, proto)
        try:
            if isinstance(timeout, int | float):
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    with _addresses_lock:
        _addresses.pop(key, None)  # looked up again on the next try
    raise error


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _connect


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _connect


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPSConnection, req, context=self._context)  # type: ignore[attr-defined]


# urllib's defaults (proxies from the environment, redirects, file://), but its connections
# made by `_connect`.
_opener = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)


def _urlopen(url: str, timeout: float) -> IO[bytes]:
    response: IO[bytes] = _opener.open(url, timeout=timeout)
    return response


def _open_once(url: str) -> IO[bytes]:
    try:
        response: IO[bytes] = _urlopen(url, timeout=TIMEOUT)
        return response
    except (urllib.error.URLError, OSError, ValueError) as e:
        if isinstance(e, urllib.error.HTTPError):
            e.close()  # it holds the connection
        hint = "check the mirror (PYQVM_DEBIAN_MIRROR, docs/guests.md) and the network"
        if isinstance(e, urllib.error.HTTPError) and e.code == 404:
            hint = "the mirror does not have it: check the mirror's URL and that it carries "
            hint += "Debian 12 (bookworm)"
        unreachable = isinstance(e, OSError | urllib.error.URLError) and not isinstance(
            e, urllib.error.HTTPError
        )
        raise ArchiveError(
            f"fetching {url} failed: {_describe(e)}; {hint}", url=url, unreachable=unreachable
        ) from None


def fetch_bytes(url: str, *, limit: int = 64 << 20) -> bytes:
    """A small file (a release file) in memory; `ArchiveError` when it cannot be had."""
    response = _open(url)
    try:
        with response:
            data: bytes = response.read(limit + 1)
    except (TimeoutError, OSError) as e:
        raise ArchiveError(f"fetching {url} failed: {_describe(e)}", url=url) from None
    if len(data) > limit:
        raise ArchiveError(f"{url} is larger than {limit} bytes: not a release file", url=url)
    return data


class HashStore:
    """Files named by their SHA-256 under ``root`` (``root/sha256/<hex>``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256

    def get(
        self,
        url: str,
        sha256: str,
        size: int,
        *,
        package: str = "",
        progress: Progress | None = None,
    ) -> Path:
        """The verified file of ``sha256``: from the cache, else fetched from ``url``.

        Raises:
            ArchiveError: the fetch failed, was cut short, or its size or hash is not
                the one the signed index gives (the file is then not kept).
        """
        dest = self.path(sha256)
        if dest.is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".partial-{sha256}-{os.getpid()}")
        what = f"{package} ({url})" if package else url
        log.debug("fetching %s", url)
        try:
            digest, got = self._stream(url, partial, size, package, progress)
            if got != size:
                raise ArchiveError(
                    f"{what}: got {got} bytes of {size}: the download was cut short or the "
                    "mirror's file differs from its signed index; try again, or use another "
                    "mirror",
                    url=url,
                    package=package,
                )
            if digest != sha256:
                raise ArchiveError(
                    f"{what}: its SHA-256 is {digest}, but the signed index says {sha256}: "
                    "the file was altered or the mirror is inconsistent; it was not kept",
                    url=url,
                    package=package,
                )
            partial.replace(dest)
        finally:
            partial.unlink(missing_ok=True)
        return dest

    def _stream(
        self, url: str, partial: Path, size: int, package: str, progress: Progress | None
    ) -> tuple[str, int]:
        h = hashlib.sha256()
        got = 0
        response = _open(url)
        try:
            with response, partial.open("wb") as out:
                while chunk := response.read(_CHUNK):
                    got += len(chunk)
                    if got > size:
                        break  # longer than the index says: no need to read the rest
                    h.update(chunk)
                    out.write(chunk)
                    if progress is not None:
                        progress(got)
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise ArchiveError(
                    f"no space left on the device of {self.root} while fetching {url}; free "
                    "some space (or set PYQVM_CACHE_DIR) and build again",
                    url=url,
                    package=package,
                ) from None
            raise ArchiveError(
                f"fetching {url} into {partial.parent} failed after {got} bytes: "
                f"{_describe(e)}; try again",
                url=url,
                package=package,
            ) from None
        return h.hexdigest(), got


__all__ = ["TIMEOUT", "HashStore", "Progress", "fetch_bytes"]
