"""A suite's signed release file: its OpenPGP check, and the index hashes it vouches for.

The check is Sequoia's (``pysequoia``): a maintained OpenPGP implementation
that installs from PyPI as a wheel on every host pyqvm runs on, so no host
``gpgv`` (or any Debian tool) is needed, and its `verify` returns the signed
text itself: only those bytes are ever parsed, never the text around the
signature (the class of bug where a client reads fields an attacker put outside
the signed part). Trusted keys are Debian's archive keys shipped with pyqvm
(``keys/``), the host's copy of the same keyring when it has one, and the
keyrings the configuration adds. There is no switch to skip the check.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pysequoia
from debian import deb822

from pyqvm.errors import ArchiveError

log = logging.getLogger(__name__)

SHIPPED_KEYRING = Path(__file__).with_name("keys") / "debian-archive-keyring.gpg"
HOST_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


@cache
def _certs_of(path: Path) -> tuple[pysequoia.Cert, ...]:
    try:
        return tuple(pysequoia.Cert.split_file(str(path)))
    except Exception as e:  # pysequoia raises plain exceptions with Rust backtraces
        raise ArchiveError(
            f"{path} is not an OpenPGP keyring: {_first_line(e)}", url=str(path)
        ) from None


def trusted_certs(extra: Sequence[Path] = ()) -> list[pysequoia.Cert]:
    """The keys a release file may be signed by (see the module's docstring)."""
    rings = [SHIPPED_KEYRING, *([HOST_KEYRING] if HOST_KEYRING.is_file() else []), *extra]
    return [cert for ring in rings for cert in _certs_of(ring)]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@dataclass(frozen=True, slots=True)
class IndexFile:
    """A file the release file lists: its path under ``dists/<suite>/``, size, SHA-256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Release:
    """The verified fields of one suite's release file."""

    suite: str
    codename: str
    date: str
    by_hash: bool
    files: dict[str, IndexFile]  # by path, e.g. "main/binary-amd64/Packages.xz"

    def packages_index(self, component: str, arch: str) -> IndexFile | None:
        """The best compressed form of ``component``'s Packages index for ``arch``."""
        for suffix in (".xz", ".gz", ""):
            found = self.files.get(f"{component}/binary-{arch}/Packages{suffix}")
            if found is not None:
                return found
        return None


def verify(data: bytes, certs: Sequence[pysequoia.Cert], *, url: str) -> bytes:
    """The signed text of the clearsigned ``data``, or `ArchiveError` when no trusted key
    made a valid signature over it."""
    wanted = list(certs)
    try:
        result = pysequoia.verify(bytes=data, store=lambda _ids: wanted)
    except Exception as e:  # pysequoia raises plain exceptions
        raise ArchiveError(
            f"{url}: its OpenPGP signature does not verify against Debian's archive keys "
            f"({_first_line(e)}): the file was altered, or the mirror re-signs with a key of "
            "its own (add it with PYQVM_DEBIAN_KEYRING)",
            url=url,
        ) from None
    if not result.valid_sigs or result.bytes is None:
        raise ArchiveError(f"{url}: no valid signature by a trusted key", url=url)
    return result.bytes


def parse(signed: bytes, *, suite: str, url: str, now: float | None = None) -> Release:
    """The fields of a verified release file; refuses one for another suite, or one whose
    ``Valid-Until`` has passed (a mirror replaying an old, signed state)."""
    fields = deb822.Release(signed)
    codename, named = fields.get("Codename", ""), fields.get("Suite", "")
    if suite not in (codename, named):
        raise ArchiveError(
            f"{url} is signed but is the release file of {codename or named!r}, not {suite!r}: "
            "the mirror serves another suite under this name",
            url=url,
        )
    if until := fields.get("Valid-Until"):
        deadline = email.utils.parsedate_to_datetime(until).timestamp()
        if (now if now is not None else time.time()) > deadline:
            raise ArchiveError(
                f"{url} expired on {until} (its Valid-Until): the mirror is stale or replays "
                "an old state; use an up-to-date mirror",
                url=url,
            )
    files = {
        entry["name"]: IndexFile(entry["name"], int(entry["size"]), entry["sha256"].lower())
        for entry in fields.get("SHA256", [])
    }
    if not files:
        raise ArchiveError(f"{url} lists no SHA256 sums", url=url)
    return Release(
        suite=suite,
        codename=codename,
        date=fields.get("Date", ""),
        by_hash=fields.get("Acquire-By-Hash", "no") == "yes",
        files=files,
    )


__all__ = ["HOST_KEYRING", "SHIPPED_KEYRING", "IndexFile", "Release", "parse", "trusted_certs",
           "verify"]  # fmt: skip
