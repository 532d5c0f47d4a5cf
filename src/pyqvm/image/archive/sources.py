"""Where Debian's packages come from, and which keys may sign them.

The first of these that says anything wins:

1. ``PYQVM_DEBIAN_MIRROR`` (a URL, or a local directory with a mirror's layout:
   ``dists/`` and ``pool/``) serves `SUITE`; ``PYQVM_DEBIAN_SECURITY`` the same
   for ``SUITE-security`` (unset: no security suite, since a site with a mirror of
   its own rarely mirrors Debian's security archive in the same place).
2. The ``[debian]`` table of ``$XDG_CONFIG_HOME/pyqvm/config.toml`` (``mirror``,
   ``security``), read the same way.
3. The host's apt sources, when it has some for `SUITE` (a Debian 12 host: its
   mirror, which may be a proxy or a local copy, is the one it can reach).
4. Debian's official mirror: `SUITE`, ``SUITE-updates`` and ``SUITE-security``.

``PYQVM_DEBIAN_KEYRING`` (or ``keyring`` in the table) adds a keyring file of
OpenPGP keys trusted besides Debian's own, for a mirror re-signed by its site.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from debian import deb822

from pyqvm.errors import SpecError

SUITE = "bookworm"  # Debian 12, the release every built-in guest is made of
OFFICIAL = "http://deb.debian.org/debian"
OFFICIAL_SECURITY = "http://deb.debian.org/debian-security"
COMPONENT = "main"
_SCHEMES = ("http", "https", "file")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


@dataclass(frozen=True, slots=True)
class Source:
    """One suite of one archive: ``{uri}/dists/{suite}/InRelease`` and its pool."""

    uri: str  # no trailing slash
    suite: str

    def url(self, path: str) -> str:
        return f"{self.uri}/{path.lstrip('/')}"


@dataclass(frozen=True, slots=True)
class ArchiveConfig:
    """The sources to read, the extra keyrings to trust, and where that was decided."""

    sources: tuple[Source, ...]
    keyrings: tuple[Path, ...] = ()
    origin: str = "Debian's official mirror"


def to_uri(value: str, *, field: str) -> str:
    """A mirror given as a URL or a local directory, as a URL without a trailing slash."""
    value = value.strip()
    scheme = urlsplit(value).scheme
    if scheme in _SCHEMES:
        return value.rstrip("/")
    if scheme == "" and value.startswith(("/", ".", "~")):
        path = Path(value).expanduser().resolve()
        if not path.is_dir():
            raise SpecError(field, f"{value!r} is not a directory; give a mirror URL or directory")
        return path.as_uri()
    raise SpecError(
        field, f"{value!r} is not a mirror: use an http(s):// or file:// URL, or a directory"
    )


def config_file(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "pyqvm" / "config.toml"


def _table(path: Path) -> dict[str, object]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SpecError(str(path), f"cannot read the pyqvm config file: {e}") from None
    table = data.get("debian", {})
    if not isinstance(table, dict):
        raise SpecError(f"{path}: debian", "must be a table ([debian])")
    unknown = set(table) - {"mirror", "security", "keyring"}
    if unknown:
        raise SpecError(
            f"{path}: debian", f"unknown keys {sorted(unknown)}; use mirror, security, keyring"
        )
    for key, value in table.items():
        if not isinstance(value, str):
            raise SpecError(f"{path}: debian.{key}", "must be a string")
    return table


def _given(mirror: str, security: str | None, field: str) -> tuple[Source, ...]:
    sources = [Source(to_uri(mirror, field=field), SUITE)]
    if security:
        sources.append(Source(to_uri(security, field=field), f"{SUITE}-security"))
    return tuple(sources)


def apt_sources(paths: Iterable[Path] = APT_SOURCES) -> tuple[Source, ...]:
    """The host's apt sources for `SUITE` and its updates and security suites, with
    ``main``: one-line (``.list``) and deb822 (``.sources``) files alike."""
    files: list[Path] = []
    for p in paths:
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in (".list", ".sources"))
    found: list[Source] = []
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        entries = _deb822_entries(text) if f.suffix == ".sources" else _one_line_entries(text)
        for uri, suites, components in entries:
            if COMPONENT not in components or urlsplit(uri).scheme not in _SCHEMES:
                continue
            wanted = (SUITE, f"{SUITE}-updates", f"{SUITE}-security")
            found += [Source(uri.rstrip("/"), s) for s in suites if s in wanted]
    return tuple(dict.fromkeys(found))


def _deb822_entries(text: str) -> list[tuple[str, list[str], list[str]]]:
    out = []
    for para in deb822.Deb822.iter_paragraphs(text.splitlines(keepends=True)):
        if "deb" not in para.get("Types", "").split() or para.get("Enabled", "yes") == "no":
            continue
        for uri in para.get("URIs", "").split():
            out.append((uri, para.get("Suites", "").split(), para.get("Components", "").split()))
    return out


def _one_line_entries(text: str) -> list[tuple[str, list[str], list[str]]]:
    out = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 3 or words[0] != "deb":
            continue
        if words[1].startswith("["):  # options: "[arch=amd64 signed-by=...]"
            while words and not words[0].endswith("]"):
                words.pop(0)
            words.pop(0)
            words.insert(0, "deb")
        if len(words) >= 4:
            out.append((words[1], [words[2]], words[3:]))
    return out


def load(
    env: Mapping[str, str] = os.environ,
    *,
    config: Path | None = None,
    apt: Iterable[Path] = APT_SOURCES,
) -> ArchiveConfig:
    """The archive configuration in force (see the module's docstring).

    Raises:
        SpecError: a mirror is neither a URL nor a directory, the config file is not
            valid TOML or has unknown keys, or a keyring file does not exist.
    """
    path = config or config_file(env)
    table = _table(path)
    keyrings: list[Path] = []
    for value, field in (
        (str(table.get("keyring", "")), f"{path}: debian.keyring"),
        (env.get("PYQVM_DEBIAN_KEYRING", ""), "PYQVM_DEBIAN_KEYRING"),
    ):
        if value:
            ring = Path(value).expanduser()
            if not ring.is_file():
                raise SpecError(field, f"no such keyring file {value!r}")
            keyrings.append(ring)
    if mirror := env.get("PYQVM_DEBIAN_MIRROR", ""):
        sources = _given(mirror, env.get("PYQVM_DEBIAN_SECURITY"), "PYQVM_DEBIAN_MIRROR")
        return ArchiveConfig(sources, tuple(keyrings), "PYQVM_DEBIAN_MIRROR")
    if "mirror" in table:
        security = env.get("PYQVM_DEBIAN_SECURITY") or str(table.get("security", "")) or None
        sources = _given(str(table["mirror"]), security, f"{path}: debian.mirror")
        return ArchiveConfig(sources, tuple(keyrings), str(path))
    if host := apt_sources(apt):
        return ArchiveConfig(host, tuple(keyrings), "the host's apt sources")
    official = (
        Source(OFFICIAL, SUITE),
        Source(OFFICIAL, f"{SUITE}-updates"),
        Source(OFFICIAL_SECURITY, f"{SUITE}-security"),
    )
    return ArchiveConfig(official, tuple(keyrings))


__all__ = ["COMPONENT", "SUITE", "ArchiveConfig", "Source", "apt_sources", "load", "to_uri"]
